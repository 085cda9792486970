"""The bounded search (``search(top=k)``, what ``paratrain plan`` runs): the ``k`` fastest layouts
without pricing most of the others. Pure Python (no torch).

1. **Memory, every layout.** A layout's exact peak (:class:`~paratrain.plan.footprint.LayoutMemory`'s
   figure, the estimate's own) is assembled from pieces memoized on the factors they depend on:
   per (tp, pp, chunks, schedule) the ranks' parameters; per (that, dp x cp) their model states
   and ZeRO-3 buffers at every ZeRO stage; per (micro-batch size, cp, tp, sp, recomputation) one
   micro-batch's activations (:func:`~paratrain.plan.footprint.activation_pieces`); per layout only
   the stash sum of each run of alike ranks (:func:`~paratrain.plan.footprint.stash_bytes`). A
   block of candidates is first bounded with its largest activation pieces (:meth:`MemoryScreen.upper`):
   a block under the capacity fits whole; only the others are summed layout by layout. So the
   count that fit, the least memory-hungry misfit and the pure data-parallel layouts are the
   exhaustive search's, without a context per layout.
2. **Time, best first.** The layouts that fit are grouped in families (dp, pp, tp, cp, schedule,
   virtual stages: they differ in micro-batches, sp, recomputation, ZeRO stage), each with one
   lower bound on its members' step time (:func:`~paratrain.plan.bound.family_lower_bound`).
   A heap holds families, a family's micro-batch counts and layouts, each by a lower bound on its
   step time: a family popped is replaced by its counts (their bound has the bubble), a count by
   its layouts, each with its own bound (:func:`~paratrain.plan.bound.step_time_lower_bound`), and
   a layout popped is priced in full. It stops when the next bound exceeds the ``k``-th step time
   found: every layout left, in a family or alone, takes longer. Ties keep the enumeration order, as the
   exhaustive stable sort does. The best pure data-parallel layout is found the same way (top 1
   of the families with pp = tp = 1).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Sequence
from typing import NamedTuple

from paratrain.config import Layout
from paratrain.core.schedules import LOOP, placement_of
from paratrain.core.vocab import padded_vocab_size
from paratrain.models.configs import ModelConfig
from paratrain.plan import formulas as f
from paratrain.plan.bound import family_lower_bound, layout_context, step_time_lower_bounds, variant
from paratrain.plan.cost import CostOptions, Estimate, _estimate
from paratrain.plan.footprint import (
    Stash,
    activation_pieces,
    chunks_per_rank,
    rank_params,
    saves_gathered,
    stash_bytes,
    stash_of,
    states_total,
)
from paratrain.plan.hardware import Hardware
from paratrain.plan.topology import PipelineShape, pipeline_shape
from paratrain.plan.zero3_buffers import ZERO_BUBBLE, pending_after_i, rank_units, zero3_buffer_bytes

# (valid candidates at the block's first ZeRO stage, the ZeRO stages): the enumeration's unit,
# whose layouts are each candidate at each stage, stage by stage (search.enumerate_layouts' order)
Block = tuple[tuple[Layout, ...], tuple[int, ...]]
Key = tuple[float, float, float]


def rank_key(e: Estimate) -> Key:
    """Fastest first; at the same step time (e.g. data-parallel traffic hidden behind backward
    under ZeRO-1 and ZeRO-3 alike) the layout that moves fewer bytes, then the one using less
    memory: the model cannot see every cost of traffic (contention, jitter), and memory that
    fits is worth nothing more."""
    c = e.comm_bytes_per_device
    return (e.step_time_s, c.dp + c.tp + c.pp + c.cp + c.ep, e.peak_bytes_per_device)


class Bounded(NamedTuple):
    """What :func:`bounded` finds: the ``top`` fastest, the least memory-hungry misfit, the best
    pure data-parallel layout (or its least memory-hungry misfit), the count that fit."""

    ranked: tuple[Estimate, ...]
    smallest_unfit: Estimate | None
    best_pure_dp: Estimate | None
    num_fitting: int
    priced: int  # layouts priced in full


class _Statics(NamedTuple):
    shape: PipelineShape
    params: tuple[float, ...]  # of the first rank of each run of alike ranks (shape.groups)
    block: float  # a block's parameters on one device (ZeRO-3's units: zero3_buffers.rank_units)
    embed: float  # the embedding's
    experts: tuple[float, ...]  # the expert parameters among params (sharded over dp / ep by ZeRO)


class MemoryScreen:
    """Exact peak memory of layouts from memoized pieces (module docstring, step 1): at each
    ZeRO stage of ``zeros`` what ``LayoutMemory.peak_bytes`` gives, summed in the same order."""

    def __init__(self, model: ModelConfig, hw: Hardware, global_batch: int, seq_len: int, precision: str,
                 options: CostOptions, zeros: tuple[int, ...]) -> None:
        self.model, self.global_batch, self.seq_len, self.precision, self.options = \
            model, global_batch, seq_len, precision, options
        self.zeros = zeros
        self.e = f.ELEM_BYTES[precision]
        P_b, G_b, _ = f.STATE_BYTES[precision]
        self.G_b = options.grad_bytes or G_b
        self.P_b = P_b  # a ZeRO-3 unit's parameters gathered (its gradient: G_b)
        self.offload = options.offload_optimizer and hw.host_link_bw > 0  # as cost._Layout's
        self._statics: dict[tuple, _Statics] = {}
        self._shapes: dict[tuple, PipelineShape] = {}
        self._states: dict[tuple, tuple[tuple[float, ...], ...]] = {}
        self._pieces: dict[tuple, tuple[float, ...]] = {}
        self._stashes: dict[tuple, tuple[Stash, ...]] = {}

    def _static(self, key: tuple, layout: Layout, v: int) -> _Statics:
        model, p, t = self.model, layout.pp, layout.tp
        shape = self._shapes.get(key[1:6])  # the pipeline's shape does not depend on tp or ep
        if shape is None:
            shape = self._shapes[key[1:6]] = pipeline_shape(
                model, self.seq_len, p, v, self.options.stage_layers or layout.stage_layers, layout.stage_speeds,
                self.options.rank_speeds, placement_of(layout.schedule) if p > 1 else LOOP)
        block = f.block_params_per_device(model.hidden, model.ffn_hidden, t, ep=layout.ep, **f.shape_args(model))
        embed = padded_vocab_size(model.vocab_size, t) * model.hidden / t
        head_copy = (not model.tie_embeddings) or (p > 1 and layout.schedule != "zb-v")  # as LayoutMemory's
        params = tuple(rank_params(model, shape, i, block, embed, head_copy) for i, _ in shape.groups)
        expert = f.expert_params_per_block(model.hidden, model.ffn_hidden, t, ep=layout.ep, **f.shape_args(model))
        experts = tuple(shape.layers[i] * expert for i, _ in shape.groups)
        static = self._statics[key] = _Statics(shape, params, block, embed, experts)
        return static

    def _setup(self, layout: Layout) -> tuple[tuple[tuple[float, ...], ...], tuple[Stash, ...], float, int, bool]:
        """What a block's layouts share: model states + buffers by group and ZeRO stage, the
        groups' stash counts, the micro-batch size, GPipe's factor on the head's activations,
        whether sequence parallelism keeps the gathered inputs."""
        p, t, schedule, m = layout.pp, layout.tp, layout.schedule, layout.microbatches
        v = chunks_per_rank(layout)
        key = (t, p, v, schedule if p > 1 else "", layout.stage_layers, layout.stage_speeds, layout.ep)
        static = self._statics.get(key) or self._static(key, layout, v)
        r = layout.dp * layout.cp  # ZeRO shards over the dp x cp ranks
        split = p > 1 and schedule in ZERO_BUBBLE  # ZeRO-3's buffers depend on m (zero3_buffers.pending_after_i)
        states = self._states.get((key, r, m if split else 0))
        if states is None:
            states = self._states[key, r, m if split else 0] = tuple(
                tuple(states_total(x, ex, zero, r, layout.ep, self.precision, self.G_b, self.offload)
                      + self._buffers(layout, static, zero, r, x, i) for zero in self.zeros)
                for (i, _), x, ex in zip(static.shape.groups, static.params, static.experts))
        stashes = self._stashes.get((key[1:6], m))  # nor the stashed micro-batches
        if stashes is None:
            stashes = self._stashes[key[1:6], m] = tuple(stash_of(static.shape, schedule, m, i)
                                                         for i, _ in static.shape.groups)
        o = self.options
        b = (o.local_batch if o.local_batch is not None else self.global_batch / layout.dp) / m
        return states, stashes, b, (m if (schedule == "gpipe" and p > 1) else 1), \
            saves_gathered(self.model, layout, self.options)

    def _buffers(self, layout: Layout, static: _Statics, zero: int, r: int, params: float, i: int) -> float:
        """ZeRO-3's buffers on rank ``i``, as ``LayoutMemory._buffers``."""
        if zero != 3 or r == 1:
            return 0.0
        p, schedule = layout.pp, layout.schedule
        pending = pending_after_i(schedule, p, layout.microbatches, chunks_per_rank(layout),
                                  placement_of(schedule), i)
        units = rank_units(self.model, static.shape, i, static.block, static.embed, schedule if p > 1 else "",
                           pending)
        return zero3_buffer_bytes(zero, r, p, self.P_b, self.G_b, params,
                                  self.options.zero3_gather, units)

    def _pieces_of(self, c: Layout, b: float, gathered: bool) -> tuple[float, ...]:
        key = (c.cp, b, c.tp, c.sequence_parallel, c.recompute, gathered)
        pieces = self._pieces.get(key)
        if pieces is None:
            pieces = self._pieces[key] = activation_pieces(self.model, self.seq_len, c.cp, b, c.tp,
                                                           c.sequence_parallel, c.recompute, self.e, self.options,
                                                           gathered)
        return pieces

    def upper(self, block: tuple[Layout, ...]) -> tuple[float, ...]:
        """At each of ``zeros``, a bound no layout of ``block`` exceeds: the peak with every
        activation piece at its largest over the block (the sums and products of non-negative
        pieces are monotone, in floats too). A block under the capacity fits whole."""
        states, stashes, b, gpipe, gathered = self._setup(block[0])
        act, emb, head, full, w_layer, w_head = map(max, *(self._pieces_of(c, b, gathered) for c in block)) \
            if len(block) > 1 else self._pieces_of(block[0], b, gathered)
        rebuilt = full if any(c.recompute == "full" for c in block) else 0.0
        return self._row(states, stashes, act, emb, gpipe * head, w_layer, w_head, rebuilt)

    def _row(self, states: tuple[tuple[float, ...], ...], stashes: tuple[Stash, ...], act: float, emb: float,
             out_act: float, w_layer: float, w_head: float, rebuilt: float) -> tuple[float, ...]:
        if len(stashes) == 1:
            a = stash_bytes(stashes[0], act, emb, out_act, w_layer, w_head)
            row = tuple(map(a.__add__, states[0]))  # (states + buffers) + activations, as LayoutMemory sums
        else:  # max_g (s_g + a_g) + rebuilt = max_g (s_g + a_g + rebuilt): adding is monotone in floats
            row = tuple(map(max, *(map(stash_bytes(st, act, emb, out_act, w_layer, w_head).__add__, s)
                                   for st, s in zip(stashes, states))))
        return tuple(x + rebuilt for x in row) if rebuilt else row

    def peaks(self, block: tuple[Layout, ...]) -> list[tuple[float, ...]]:
        """The peak bytes of the most loaded device of each layout of ``block`` (candidates that
        differ only in sp and recomputation) at each of ``zeros``."""
        states, stashes, b, gpipe, gathered = self._setup(block[0])
        out = []
        for c in block:
            act, emb, head, full, w_layer, w_head = self._pieces_of(c, b, gathered)
            out.append(self._row(states, stashes, act, emb, gpipe * head, w_layer, w_head,
                                 full if c.recompute == "full" else 0.0))
        return out

class _Family:
    """Layouts that fit and differ only in micro-batches, sp, recomputation and ZeRO stage."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.sps: set[bool] = set()
        self.zeros: set[int] = set()
        # by micro-batches: the layouts that fit, as runs (index of the first, candidates, ZeRO stage,
        # the block's stages): layout index + j is candidate j at that stage
        self.items: dict[int, list[tuple[int, tuple[Layout, ...], int, tuple[int, ...]]]] = {}
        self.pure = layout.pp == 1 and layout.tp == 1
        self.bound: float | None = None
        self.bounds: dict[int, float] = {}  # by micro-batches


def bounded(blocks: Sequence[Block], model: ModelConfig, hw: Hardware, global_batch: int, seq_len: int,
            precision: str, options: CostOptions, top: int) -> Bounded:
    """The search of the module docstring over the layouts of ``blocks``; ``top`` >= 1."""
    capacity = hw.memory_bytes * (1 - options.memory_headroom)
    zeros = tuple(sorted({z for _, zs in blocks for z in zs}))
    where = {z: k for k, z in enumerate(zeros)}
    screen = MemoryScreen(model, hw, global_batch, seq_len, precision, options, zeros)
    families: dict[tuple, _Family] = {}
    misfit: tuple[float, int, Layout, int] | None = None
    pure_misfit: tuple[float, int, Layout, int] | None = None
    fitting = index = 0
    for valid, block_zeros in blocks:
        first = valid[0]  # a block's candidates share the family's fields (search._blocks)
        fam_key = (first.dp, first.pp, first.tp, first.cp, first.ep, first.schedule, first.virtual_stages)
        family = families.get(fam_key) or families.setdefault(fam_key, _Family(first))
        family.zeros.update(block_zeros)
        family.sps.update(c.sequence_parallel for c in valid)
        upper = screen.upper(valid)
        rows = None
        items = family.items.get(first.microbatches)
        for zero in block_zeros:
            k = where[zero]
            if upper[k] <= capacity:  # every candidate fits at this stage
                if items is None:
                    items = family.items.setdefault(first.microbatches, [])
                items.append((index, valid, zero, block_zeros))
                fitting += len(valid)
                index += len(valid)
                continue
            rows = rows or screen.peaks(valid)
            for c, row in zip(valid, rows):
                peak = row[k]
                if peak <= capacity:
                    if items is None:
                        items = family.items.setdefault(first.microbatches, [])
                    items.append((index, (c,), zero, block_zeros))
                    fitting += 1
                else:
                    if misfit is None or (peak, index) < misfit[:2]:
                        misfit = (peak, index, c, zero)
                    if family.pure and (pure_misfit is None or (peak, index) < pure_misfit[:2]):
                        pure_misfit = (peak, index, c, zero)
                index += 1
    priced: dict[int, Estimate] = {}

    def price(index: int, layout: Layout, zero: int) -> Estimate:
        if index not in priced:
            exact = layout if layout.zero == zero else _with_zero(layout, zero)
            priced[index] = _estimate(model, exact, hw, global_batch, seq_len, precision, options)
        return priced[index]

    args = (model, hw, global_batch, seq_len, precision, options)
    fams = [fam for fam in families.values() if fam.items]
    contexts: dict[int, dict[int, float]] = {}
    best = _best_first(fams, top, args, price, contexts)
    pure = _best_first([fam for fam in fams if fam.pure], 1, args, price, contexts)
    if pure:
        pure_est: Estimate | None = pure[0]
    else:
        pure_est = price(*pure_misfit[1:]) if pure_misfit else None
    return Bounded(tuple(best), price(*misfit[1:]) if misfit else None, pure_est, fitting, len(priced))


def _best_first(families: list[_Family], top: int, args: tuple, price: Callable[[int, Layout, int], Estimate],
                contexts: dict[int, dict[int, float]]) -> list[Estimate]:
    """The ``top`` fastest layouts of ``families`` by :func:`rank_key`, then enumeration index
    (module docstring, step 2): a family popped gives its micro-batch counts, each with the
    bound at that count (the bubble now known); one of those popped gives its layouts, each with
    its own bound (``contexts``: by candidate, at each ZeRO stage); a layout popped is priced."""
    model, rest = args[0], args[1:]

    def bound(fam: _Family, m: int | None) -> float:
        zeros = tuple(sorted(fam.zeros))
        return family_lower_bound(model, fam.layout, *rest, tuple(sorted(fam.sps)), zeros, m)

    heap: list[tuple[float, int, int]] = []  # (bound, kind: 0 family / 1 micro-batch count / 2 layout, which)
    for n, fam in enumerate(families):
        if fam.bound is None:
            fam.bound = bound(fam, None)
        heap.append((fam.bound, 0, n))
    heapq.heapify(heap)
    counts: list[tuple[_Family, int]] = []
    items: list[tuple[int, Layout, int]] = []
    best: list[tuple[Key, int]] = []  # (key, index), sorted, at most top
    estimates: dict[int, Estimate] = {}
    while heap:
        low, kind, n = heapq.heappop(heap)
        if len(best) == top and low > best[-1][0][0]:
            break  # every layout left takes longer than the top-th
        if kind == 0:
            fam = families[n]
            for m in fam.items:
                if m not in fam.bounds:
                    fam.bounds[m] = bound(fam, m)
                heapq.heappush(heap, (fam.bounds[m], 1, len(counts)))
                counts.append((fam, m))
        elif kind == 1:
            fam, m = counts[n]
            for first, run, zero, block_zeros in fam.items[m]:
                for j, layout in enumerate(run):
                    bounds = contexts.get(id(layout))
                    if bounds is None:
                        bounds = contexts[id(layout)] = step_time_lower_bounds(layout_context(model, layout, *rest),
                                                                               block_zeros)
                    heapq.heappush(heap, (bounds[zero], 2, len(items)))
                    items.append((first + j, layout, zero))
        else:
            index, layout, zero = items[n]
            est = estimates[index] = price(index, layout, zero)
            bisect.insort(best, (rank_key(est), index))
            del best[top:]
    return [estimates[i] for _, i in best]


def _with_zero(layout: Layout, zero: int) -> Layout:
    """``dataclasses.replace(layout, zero=zero)`` (:func:`~paratrain.plan.bound.variant`)."""
    return variant(layout, zero=zero)
