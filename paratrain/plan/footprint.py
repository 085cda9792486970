"""What one pipeline rank holds at its peak: model states, buffers, stashed activations.

Pure Python (no torch). The memory half of the cost model, apart so that the search can drop a
layout that does not fit, or count one that does, without pricing its time; :mod:`cost`'s
per-layout context extends :class:`LayoutMemory`, so both read the same numbers. Per pipeline
rank i (its chunks c = 0..v-1 are stages k = c p + i):

    params_i  = sum_k  layers_k * block + [k first] (V h / t + S_max h) + [k last] (2 h + [copy] V h / t)
    peak_i    = states(params_i, zero, dp) + ZeRO-3 buffers + stashed activations + rebuilt block

(ZeRO-3 buffers: the units whole and the gradient buckets of a backward at the runtime's peak,
:mod:`paratrain.plan.zero3_buffers`; inside a pipeline gathered once per step, ``--zero3-gather
step``, the whole rank's ``(P + G) params_i``.)

with the stash counted as in :func:`core.bubble.in_flight_microbatches` (one chunk per rank) or, for
chunks of different sizes, as the largest over the schedule's stash states
(:func:`topology.stash_states`, n_c micro-batches of chunk c) of

    sum_c n_c (layers_c a + [c first] e_emb + [c last] e_head)
        = (sum_c n_c layers_c) a + n_first e_emb + n_last e_head

with a, e_emb, e_head one micro-batch's activations of a block, the embedding and the head.
Under context parallelism every activation is of the rank's ``s / cp`` tokens (and the ring
attention keeps no ``s x s`` scores), and model states are sharded by ZeRO over the ``dp x cp``
ranks that average the gradients (:mod:`paratrain.plan.context`).

Zero-bubble schedules keep a micro-batch from its F to its W; past its I only what W needs
(``formulas.w_deferred_layer_bytes``): ZB-H1's rank i holds at its peak min(p - i, m) whole
micro-batches and ``core.bubble.deferred_w`` = min(p, m) - min(p - i, m) past their I; ZB-V's
peak is 2 min(p, m) whole chunks of half the rank's layers (both from the schedules; tested).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from paratrain.config import Layout
from paratrain.core.bubble import deferred_w, in_flight_microbatches
from paratrain.core.schedules import LOOP, placement_of
from paratrain.core.state import ModelState
from paratrain.core.vocab import padded_vocab_size
from paratrain.models.configs import ModelConfig
from paratrain.plan import formulas as f
from paratrain.plan.topology import PipelineShape, pipeline_shape, stash_states
from paratrain.plan.zero3_buffers import RankUnits, pending_after_i, rank_units, zero3_buffer_bytes

if TYPE_CHECKING:
    from paratrain.plan.cost import CostOptions


class RankMemory(NamedTuple):
    """Bytes one device of pipeline rank ``stage`` holds at its peak, by kind."""

    params: float  # parameters of the rank's chunks on one device (a count, not bytes)
    state: ModelState
    buffer_bytes: float  # ZeRO-3's gathered units and gradient buckets at their peak
    activation_bytes: float  # stored by forwards, at the schedule's peak
    rebuilt_bytes: float  # full recomputation: one block rebuilt during its backward

    @property
    def peak_bytes(self) -> float:
        return self.state.total + self.buffer_bytes + self.activation_bytes + self.rebuilt_bytes


def chunks_per_rank(layout: Layout) -> int:
    """Model chunks each pipeline rank runs: ``virtual_stages`` with the interleaved schedule (2
    with zb-v) and pp > 1, else 1 (the runtime ignores virtual stages without a pipeline)."""
    return layout.virtual_stages if layout.schedule in ("interleaved", "zb-v") and layout.pp > 1 else 1


class LayoutMemory:
    """The per-layout numbers the memory of every pipeline rank needs, computed once."""

    def __init__(self, model: ModelConfig, layout: Layout, global_batch: int, seq_len: int, precision: str,
                 options: CostOptions) -> None:
        L, p, t, n, m = layout, layout.pp, layout.tp, layout.dp, layout.microbatches
        self.model, self.layout, self.options, self.precision = model, layout, options, precision
        self.global_batch = global_batch
        self.p, self.t, self.n, self.m = p, t, n, m
        self.cp = L.cp
        self.r = n * L.cp  # ranks that average (ZeRO: shard) the gradients: dp x cp
        self.v = chunks_per_rank(L)
        s, h, F = seq_len, model.hidden, model.ffn_hidden
        self.s, self.h = s, h
        self.V = V = padded_vocab_size(model.vocab_size, t)  # rows of the embedding / LM head over all tp ranks
        self.b = b = (options.local_batch if options.local_batch is not None else global_batch / n) / m
        self.e = e = f.ELEM_BYTES[precision]
        self.P_b, self.G_b, _ = f.STATE_BYTES[precision]
        self.G_b = options.grad_bytes or self.G_b
        self.offload = options.offload_optimizer
        self.sp = sp = L.sequence_parallel
        self.shape = pipeline_shape(model, seq_len, p, self.v, options.stage_layers or L.stage_layers,
                                    L.stage_speeds, options.rank_speeds, placement_of(L.schedule) if p > 1 else LOOP)
        self.block = f.block_params_per_device(h, F, t, ep=L.ep, **f.shape_args(model))
        self.expert_block = f.expert_params_per_block(h, F, t, ep=L.ep, **f.shape_args(model))  # in self.block
        self.embed = V * h / t
        # the last stage keeps a copy of W_e, but not in ZB-V's V (rank 0 holds both ends)
        self.head_copy = (not model.tie_embeddings) or (p > 1 and L.schedule != "zb-v")
        pieces = activation_pieces(model, s, L.cp, b, t, sp, L.recompute, e, options, saves_gathered(model, L, options))
        self.act_layer, self.emb_act, self.head_act, self.full_layer, self.w_layer, self.w_head = pieces
        self.out_act = (m if (L.schedule == "gpipe" and p > 1) else 1) * self.head_act
        self.rebuilt = self.full_layer if L.recompute == "full" else 0.0
        self._parts: tuple[tuple[float, float], ...] | None = None

    def _buffers(self, zero: int, params: float, i: int) -> float:
        """ZeRO-3's units and gradient buckets at their peak on rank ``i`` (:mod:`.zero3_buffers`);
        gathered once per step inside a pipeline, the rank's ``params`` whole, with their
        gradients, for the whole step."""
        return zero3_buffer_bytes(zero, self.r, self.p, self.P_b, self.G_b, params, self.options.zero3_gather,
                                  self.units(i) if zero == 3 else None)

    def units(self, i: int) -> RankUnits:
        """Rank ``i``'s ZeRO-3 units (:func:`.zero3_buffers.rank_units`)."""
        L = self.layout
        pending = pending_after_i(L.schedule, self.p, self.m, self.v, placement_of(L.schedule), i)
        return rank_units(self.model, self.shape, i, self.block, self.embed, L.schedule if self.p > 1 else "",
                          pending)

    def chunk_params(self, k: int) -> float:
        """Parameters of stage ``k`` (chunk ``k // p`` of rank ``k % p``) on one device."""
        layers, first, last = self.shape.chunks[k], k == 0, k == self.p * self.v - 1
        gpt = self.model.family == "gpt"  # learned positions and a LayerNorm bias; Llama: rotary, RMSNorm
        return layers * self.block + (self.embed + (self.model.max_seq_len * self.h if gpt else 0) if first else 0) \
            + ((2 if gpt else 1) * self.h + (self.embed if self.head_copy else 0) if last else 0)

    def _rank_parts(self, i: int) -> tuple[float, float]:
        """(parameters, stashed activation bytes) of rank ``i``: the same for every ZeRO stage."""
        return (rank_params(self.model, self.shape, i, self.block, self.embed, self.head_copy),
                rank_activations(self.shape, self.layout.schedule, self.m, i, self.act_layer, self.emb_act,
                                 self.out_act, self.w_layer, self.w_head))

    def _memory(self, params: float, acts: float, zero: int, experts: float, i: int) -> RankMemory:
        state = _model_state_bytes(params - experts, zero, self.r, self.precision, self.G_b, self.offload)
        if experts:  # ZeRO shards a rank's experts over the dp / ep ranks holding them
            x = _model_state_bytes(experts, zero, self.r // self.layout.ep, self.precision, self.G_b, self.offload)
            state = ModelState(state.params + x.params, state.grads + x.grads, state.optimizer + x.optimizer)
        return RankMemory(params, state, self._buffers(zero, params, i), acts, self.rebuilt)

    def experts_of(self, i: int) -> float:
        """Expert parameters of pipeline rank ``i`` on one device (in its parameters)."""
        return self.shape.layers[i] * self.expert_block

    def rank_memory(self, i: int) -> RankMemory:
        """What one device of pipeline rank ``i`` holds at its peak."""
        return self._memory(*self._rank_parts(i), self.layout.zero, self.experts_of(i), i)

    def group_params(self) -> tuple[float, ...]:
        """The parameters of :meth:`group_parts` alone (no activations: what the time's bounds need)."""
        if self._parts is not None:
            return tuple(params for params, _ in self._parts)
        return tuple(rank_params(self.model, self.shape, i, self.block, self.embed, self.head_copy)
                     for i, _ in self.shape.groups)

    def group_parts(self) -> tuple[tuple[float, float], ...]:
        """(parameters, activation bytes) of the first rank of each run of alike ranks, which
        holds its run's most (:class:`topology.PipelineShape`); the same at every ZeRO stage."""
        if self._parts is None:
            self._parts = tuple(self._rank_parts(i) for i, _ in self.shape.groups)
        return self._parts

    def peak_bytes(self, zero: int | None = None) -> float:
        """The most loaded device's peak, :attr:`RankMemory.peak_bytes` of each run's first rank
        summed in the same order (at ZeRO stage ``zero``, default the layout's: the search
        screens the four stages of a layout from one context)."""
        zero = self.layout.zero if zero is None else zero
        return self.peaks((zero,))[zero]

    def peaks(self, zeros: tuple[int, ...]) -> dict[int, float]:
        """:meth:`peak_bytes` at each ZeRO stage of ``zeros``, in one call (the search screens
        every stage of a layout from one context)."""
        parts, rebuilt, n, precision = self.group_parts(), self.rebuilt, self.r, self.precision
        G_b, offload, ep = self.G_b, self.offload, self.layout.ep
        ranks = [i for i, _ in self.shape.groups]
        experts = [self.experts_of(i) for i in ranks]
        return {zero: max(states_total(params, x, zero, n, ep, precision, G_b, offload)
                          + self._buffers(zero, params, i) + acts + rebuilt
                          for (params, acts), x, i in zip(parts, experts, ranks)) for zero in zeros}


class Pieces(NamedTuple):
    """One micro-batch's activation bytes on one device (``b`` sequences of ``s / cp`` tokens):
    a block as its recomputation stores it, the embedding, the head, a block stored whole, and
    what a zero-bubble W keeps of a block and of the head past their I."""

    layer: float
    embedding: float
    head: float
    full_layer: float
    w_layer: float
    w_head: float


def saves_gathered(model: ModelConfig, layout: Layout, options: CostOptions) -> bool:
    """Whether sequence parallelism's linears keep their all-gathered input (``options``'s, else
    as the runtime does: parallel.sp_regathers, core/traffic.py)."""
    if options.sp_saves_gathered is not None:
        return options.sp_saves_gathered
    return model.family != "gpt" or (layout.pp > 1 and layout.schedule in ("zb-h1", "zb-v"))


@lru_cache(maxsize=16384)
def activation_pieces(model: ModelConfig, seq_len: int, cp: int, b: float, t: int, sp: bool, recompute: str,
                      elem_bytes: int, options: CostOptions, gathered: bool) -> Pieces:
    """The :class:`Pieces` of a layout: they depend on these factors only (the search asks for
    each many times); ``gathered``: :func:`saves_gathered`."""
    h, F, a, e = model.hidden, model.ffn_hidden, model.num_heads, elem_bytes
    s_act, V = seq_len // cp, padded_vocab_size(model.vocab_size, t)  # the tokens a rank holds
    act = dict(t=t, sp=sp, elem_bytes=e, dropout=options.dropout,
               store_scores=options.store_scores and cp == 1, sp_saves_gathered=gathered,
               **f.shape_args(model))
    return Pieces(f.layer_activation_bytes(s_act, b, h, a, F, recompute=recompute, **act),
                  f.embedding_activation_bytes(s_act, b, h, t, sp, options.dropout),
                  f.output_activation_bytes(s_act, b, h, V, t, sp, e, gathered),
                  f.layer_activation_bytes(s_act, b, h, a, F, recompute="none", **act),
                  f.w_deferred_layer_bytes(s_act, b, h, F, t, e), f.w_deferred_head_bytes(s_act, b, h, V, t, e))


def rank_params(model: ModelConfig, shape: PipelineShape, i: int, block: float, embed: float,
                head_copy: bool) -> float:
    """Parameters of pipeline rank ``i`` on one device (the module docstring's params_i), in one
    product: parameter counts are integers (tp divides the widths, the vocabulary is padded), so
    no order of the sum over its chunks rounds differently."""
    stages = shape.rank_stages[i]
    first, last = 0 in stages, len(shape.chunks) - 1 in stages
    gpt = model.family == "gpt"  # learned positions and a LayerNorm bias; Llama: rotary, RMSNorm
    return sum(shape.chunks[k] for k in stages) * block \
        + (embed + (model.max_seq_len * model.hidden if gpt else 0) if first else 0) \
        + ((2 if gpt else 1) * model.hidden + (embed if head_copy else 0) if last else 0)


class Stash(NamedTuple):
    """What rank ``i`` stashes at its peak, in integers that serve every micro-batch size,
    recomputation and ZeRO stage: with one chunk per rank ``flight`` whole micro-batches and
    ``past`` (ZB-H1) kept only for their W, of its ``layers`` (+ the embedding if ``first``, the
    head if ``last``); with several, ``terms`` (:func:`_stash_terms`)."""

    flight: float
    past: float
    layers: int
    first: bool
    last: bool
    terms: tuple[tuple[int, int, int], ...] = ()


def stash_of(shape: PipelineShape, schedule: str, m: int, i: int) -> Stash:
    """Rank ``i``'s :class:`Stash` (the module docstring's counts)."""
    p, v = len(shape.layers), len(shape.rank_stages[i])
    stages = shape.rank_stages[i]
    first, last = 0 in stages, p * v - 1 in stages
    if v == 1:
        past_i = deferred_w(schedule, p, m, i)  # ZB-H1: held past their I, for W only
        return Stash(in_flight_microbatches(schedule, p, m, v, i) - past_i, past_i, shape.layers[i], first, last)
    # chunks of different sizes: which of them are in flight matters (topology.stash_states);
    # past the warm-up and one period (topology.stash_states) more micro-batches repeat the states
    steady = -(-(2 * (p - i - 1) + (v - 1) * p + p * v) // v)
    layers = tuple(shape.chunks[k] for k in stages)
    ends = (stages.index(0) if first else -1, stages.index(p * v - 1) if last else -1)
    return Stash(0.0, 0.0, shape.layers[i], first, last, _stash_terms(schedule, p, min(m, steady), v, i, layers, ends))


def stash_bytes(st: Stash, act_layer: float, emb_act: float, out_act: float, w_layer: float, w_head: float) -> float:
    """The bytes of a :class:`Stash`, from one micro-batch's :class:`Pieces` (``out_act``: the
    head's, times m under GPipe)."""
    if st.terms:
        return max(n * act_layer + first * emb_act + last * out_act for n, first, last in st.terms)
    return st.flight * (st.layers * act_layer + (emb_act if st.first else 0)) + (out_act if st.last else 0) \
        + st.past * (st.layers * w_layer + (w_head if st.last else 0))


def rank_activations(shape: PipelineShape, schedule: str, m: int, i: int, act_layer: float, emb_act: float,
                     out_act: float, w_layer: float, w_head: float) -> float:
    """Activation bytes pipeline rank ``i`` stashes at its peak (the module docstring)."""
    return stash_bytes(stash_of(shape, schedule, m, i), act_layer, emb_act, out_act, w_layer, w_head)


@lru_cache(maxsize=16384)
def _state_total(psi: float, zero: int, dp: int, precision: str, grad_bytes: int, offload: bool) -> float:
    return _model_state_bytes(psi, zero, dp, precision, grad_bytes, offload).total


def states_total(psi: float, experts: float, zero: int, r: int, ep: int, precision: str, grad_bytes: int,
                 offload: bool) -> float:
    """Model-state bytes of ``psi`` parameters of which ``experts`` are experts: ZeRO shards the
    rest over the ``r`` ranks averaging gradients, the experts over the ``r / ep`` holding them."""
    if not experts:
        return _state_total(psi, zero, r, precision, grad_bytes, offload)
    return _state_total(psi - experts, zero, r, precision, grad_bytes, offload) \
        + _state_total(experts, zero, r // ep, precision, grad_bytes, offload)


# A rank's parameters do not depend on the micro-batches, recomputation or sequence parallelism:
# the search asks for the same states many times (ModelState is immutable).
_model_state_bytes = lru_cache(maxsize=16384)(f.model_state_bytes)


@lru_cache(maxsize=16384)
def _stash_terms(schedule: str, p: int, m: int, v: int, i: int, layers: tuple[int, ...],
                 ends: tuple[int, int]) -> tuple[tuple[int, int, int], ...]:
    """Rank ``i``'s stash states (its chunks hold ``layers``; ``ends``: its chunks holding the
    first and the last stage, or -1) as (sum_c n_c layers_c, n_first, n_last) of the module
    docstring, the dominated ones dropped: integers, so they serve every batch size,
    recomputation and ZeRO stage of the layout."""
    first, last = ends
    terms = {(sum(n * c for n, c in zip(state, layers)), state[first] if first >= 0 else 0,
              state[last] if last >= 0 else 0)
             for state in stash_states(schedule, p, m, v, i)}
    return tuple(sorted(t for t in terms if not any(o != t and all(a >= b for a, b in zip(o, t)) for o in terms)))
