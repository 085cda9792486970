"""What one pipeline rank holds at its peak: model states, buffers, stashed activations.

Pure Python (no torch). The memory half of the cost model, apart so that the search can drop a
layout that does not fit, or count one that does, without pricing its time; :mod:`cost`'s
per-layout context extends :class:`LayoutMemory`, so both read the same numbers. Per pipeline
rank i (its chunks c = 0..v-1 are stages k = c p + i):

    params_i  = sum_k  layers_k * block + [k first] (V h / t + S_max h) + [k last] (2 h + [copy] V h / t)
    peak_i    = states(params_i, zero, dp) + ZeRO-3 buffers + stashed activations + rebuilt block

with the stash counted as in :func:`formulas.in_flight_microbatches` (one chunk per rank) or
:func:`topology.peak_stash` (chunks of different sizes).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple, Self

from paratrain.config import Layout, padded_vocab_size
from paratrain.models.configs import ModelConfig
from paratrain.plan import formulas as f
from paratrain.plan.topology import PipelineShape, peak_stash, pipeline_shape

if TYPE_CHECKING:
    from paratrain.plan.cost import CostOptions


class RankMemory(NamedTuple):
    """Bytes one device of pipeline rank ``stage`` holds at its peak, by kind."""

    params: float  # parameters of the rank's chunks on one device (a count, not bytes)
    state: f.ModelState
    buffer_bytes: float  # ZeRO-3's gathered unit and its gradient
    activation_bytes: float  # stored by forwards, at the schedule's peak
    rebuilt_bytes: float  # full recomputation: one block rebuilt during its backward

    @property
    def peak_bytes(self) -> float:
        return self.state.total + self.buffer_bytes + self.activation_bytes + self.rebuilt_bytes


def chunks_per_rank(layout: Layout) -> int:
    """Model chunks each pipeline rank runs: ``virtual_stages`` with the interleaved schedule and
    pp > 1, else 1 (the runtime ignores virtual stages without a pipeline)."""
    return layout.virtual_stages if layout.schedule == "interleaved" and layout.pp > 1 else 1


class LayoutMemory:
    """The per-layout numbers the memory of every pipeline rank needs, computed once."""

    def __init__(self, model: ModelConfig, layout: Layout, global_batch: int, seq_len: int, precision: str,
                 options: CostOptions) -> None:
        L, p, t, n, m = layout, layout.pp, layout.tp, layout.dp, layout.microbatches
        self.model, self.layout, self.options, self.precision = model, layout, options, precision
        self.global_batch = global_batch
        self.p, self.t, self.n, self.m = p, t, n, m
        self.v = chunks_per_rank(L)
        s, h, F, a = seq_len, model.hidden, model.ffn_hidden, model.num_heads
        self.s, self.h = s, h
        self.V = V = padded_vocab_size(model.vocab_size, t)  # rows of the embedding / LM head over all tp ranks
        self.b = b = (options.local_batch if options.local_batch is not None else global_batch / n) / m
        self.e = e = f.ELEM_BYTES[precision]
        self.P_b, self.G_b, _ = f.STATE_BYTES[precision]
        self.sp = sp = L.sequence_parallel
        self.shape = pipeline_shape(model, seq_len, p, self.v, options.stage_layers or L.stage_layers,
                                    L.stage_speeds, options.rank_speeds)
        self.block = f.block_params_per_device(h, F, t)
        self.embed = V * h / t
        self.head_copy = (not model.tie_embeddings) or p > 1  # the last stage keeps a copy of W_e
        act = dict(t=t, sp=sp, elem_bytes=e, dropout=options.dropout, store_scores=options.store_scores,
                   sp_saves_gathered=options.sp_saves_gathered)
        self.act_layer = f.layer_activation_bytes(s, b, h, a, F, recompute=L.recompute, **act)
        self.emb_act = f.embedding_activation_bytes(s, b, h, t, sp, options.dropout)
        self.head_act = f.output_activation_bytes(s, b, h, V, t, sp, e, options.sp_saves_gathered)
        self.out_act = (m if (L.schedule == "gpipe" and p > 1) else 1) * self.head_act
        self.full_layer = f.layer_activation_bytes(s, b, h, a, F, recompute="none", **act)
        self.rebuilt = self.full_layer if L.recompute == "full" else 0.0
        self.buffers = self._buffers()
        self._groups: tuple[RankMemory, ...] | None = None

    def _buffers(self) -> float:
        """ZeRO-3 gathers one unit (a block, or the embedding) and its gradient at a time."""
        if self.layout.zero == 3 and self.n > 1:
            return (self.P_b + self.G_b) * max(self.block, self.embed)
        return 0.0

    def with_zero(self, layout: Layout) -> Self:
        """This context for ``layout``, which differs from this one's only in its ZeRO stage (the
        search prices the four stages of a layout from one context)."""
        other = copy.copy(self)
        other.layout = layout
        other.buffers = other._buffers()
        other._groups = None
        return other

    def chunk_params(self, k: int) -> float:
        """Parameters of stage ``k`` (chunk ``k // p`` of rank ``k % p``) on one device."""
        return _chunk_params(self.shape.chunks[k], k == 0, k == self.p * self.v - 1, self.block, self.embed,
                             self.head_copy, self.h, self.model.max_seq_len)

    def rank_memory(self, i: int) -> RankMemory:
        """What one device of pipeline rank ``i`` holds at its peak."""
        params = _rank_params(self.shape, self.p, self.v, i, self.block, self.embed, self.head_copy, self.h,
                              self.model.max_seq_len)
        state = f.model_state_bytes(params, self.layout.zero, self.n, self.precision)
        acts = _rank_activations(self.shape, self.layout.schedule, self.p, self.m, self.v, i, self.act_layer,
                                 self.emb_act, self.out_act)
        return RankMemory(params, state, self.buffers, acts, self.rebuilt)

    def group_memory(self) -> tuple[RankMemory, ...]:
        """:meth:`rank_memory` of the first rank of each run of alike ranks, which holds its
        run's most (:class:`topology.PipelineShape`); computed once."""
        if self._groups is None:
            self._groups = tuple(self.rank_memory(i) for i, _ in self.shape.groups)
        return self._groups

    def peak_bytes(self) -> float:
        """The most loaded device's peak."""
        return max(g.peak_bytes for g in self.group_memory())



def _chunk_params(layers: int, first: bool, last: bool, block: float, embed: float, head_copy: bool, h: int,
                  max_seq_len: int) -> float:
    return layers * block + (embed + max_seq_len * h if first else 0) + (2 * h + (embed if head_copy else 0)
                                                                         if last else 0)


# The search asks for the same ranks many times (every ZeRO stage of a layout holds the same
# parameters and activations): both are cached.
@lru_cache(maxsize=16384)
def _rank_params(shape: PipelineShape, p: int, v: int, i: int, block: float, embed: float, head_copy: bool, h: int,
                 max_seq_len: int) -> float:
    return sum(_chunk_params(shape.chunks[k], k == 0, k == p * v - 1, block, embed, head_copy, h, max_seq_len)
               for k in range(i, p * v, p))


@lru_cache(maxsize=16384)
def _rank_activations(shape: PipelineShape, schedule: str, p: int, m: int, v: int, i: int, act_layer: float,
                      emb_act: float, out_act: float) -> float:
    if v == 1:
        flight = f.in_flight_microbatches(schedule, p, m, v, i)
        return flight * (shape.layers[i] * act_layer + (emb_act if i == 0 else 0)) + (out_act if i == p - 1 else 0)
    # chunks of different sizes: which of them are in flight matters (topology.stash_states)
    last = p * v - 1
    per_chunk = tuple(shape.chunks[k] * act_layer + (emb_act if k == 0 else 0) + (out_act if k == last else 0)
                      for k in range(i, p * v, p))
    return peak_stash(schedule, p, m, v, i, per_chunk)
