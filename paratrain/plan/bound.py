"""Lower bounds on a layout's step time, in a few operations: what lets the search
(:func:`paratrain.plan.search.search` with ``top``) price in full only the layouts that can reach
its top. Pure Python (no torch); tested never to exceed :func:`cost.estimate_layout`'s figure,
for one layout (:func:`step_time_lower_bound`) and for a family of layouts that differ only in
micro-batches, sequence parallelism, recomputation and ZeRO stage (:func:`family_lower_bound`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from paratrain.config import Layout
from paratrain.core import bubble, ring, traffic
from paratrain.models.configs import ModelConfig
from paratrain.plan import formulas as f
from paratrain.plan.collectives import Link, buckets, collective_seconds
from paratrain.plan.cost import OPTIMIZER_BYTES_PER_PARAM, _Layout, overlaps_dp
from paratrain.plan.hardware import Hardware
from paratrain.plan.options import CostOptions

MARGIN = 1 - 1e-9  # the estimate sums the same terms in another order (and m C(b / m) >= C(b) in floats)


def variant(layout: Layout, **fields: Any) -> Layout:
    """``dataclasses.replace(layout, **fields)`` for fields that ``Layout.__post_init__`` does not
    normalise (zero, micro-batches, recompute, sequence_parallel), without running ``__init__``
    again: the search builds tens of thousands of these from candidates it built."""
    clone = object.__new__(Layout)
    clone.__dict__.update(layout.__dict__, **fields)
    return clone


def layout_context(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                   precision: str, options: CostOptions) -> _Layout:
    """The per-layout context (``layout`` valid): its ``peak_bytes()`` is the estimate's peak
    memory, :func:`step_time_lower_bound` bounds its step time, :func:`estimate_layout` prices it."""
    return _Layout(model, layout, hw, global_batch, seq_len, precision, options)


def _per_microbatch(ctx: _Layout) -> tuple[float, float]:
    """(C, once) of :func:`step_time_lower_bound`: what the p ranks spend on one micro-batch at
    least, summed over the ranks, and what every rank pays once per step."""
    L = ctx.model.num_layers
    replay = ctx.layer_rec / (3 * ctx.layer_fwd) if ctx.layer_fwd else 0.0
    C = (3 * (L * ctx.layer_fwd + ctx.head_fwd) + L * ctx.layer_rec) / ctx.rate \
        + (L * (ctx.ew_layer + ctx.layer_overhead) * (1 + replay) + ctx.ew_head) / ctx.share
    once = collective_seconds("all_reduce", ctx.r, 4, *ctx.dp_link)
    if ctx.t > 1:
        tp = ctx.tp_seconds(1, False, False)
        C += L * (tp[traffic.FORWARD] + tp[traffic.BACKWARD])
        once += collective_seconds("all_reduce", ctx.t, 4, *ctx.tp_link)
    if ctx.p > 1:
        C += sum(ctx.shape.sends) * ctx.message_s
        bw, lat = ctx.pp_link.bw, ctx.pp_link.latency
        once += collective_seconds("all_reduce", ctx.p, 4, bw, lat) + ring.ring_steps("all_gather", ctx.p) * lat
    return C, once


def step_time_lower_bound(ctx: _Layout, zero: int | None = None) -> float:
    """A lower bound on :func:`estimate_layout`'s step time, in a few operations (what lets the
    search price in full only the layouts that can reach its top). With sum_i t_i over the p
    ranks of the per-micro-batch times and t_max their largest (>= sum / p),

        T_pipe = m t_max + (sum - t_max) / v = (m - 1/v) t_max + sum / v >= sum (m + (p - 1)/v) / p

    since m >= 1 >= 1/v, and sum >= C + L tp_1 + S: C, every chunk's compute, adds up over the
    model (the FLOPs and memory-bound terms of :meth:`_Layout.chunk` are linear in its layers, plus
    the head's); tp_1, one block's tensor-parallel collectives, is linear too (the embedding's and
    the head's are extra); S, every rank's sends (with a given bubble fraction b, T_pipe = m t_max
    / (1 - b)). The step adds what every rank pays once (the loss's all-reduce over dp, the
    pipeline's and tensor-parallel norm syncs: their maximum over ranks is at least that), and for
    the rank holding the most parameters its optimizer step (exact, ZeRO-Offload's host copies
    included) and the data-parallel seconds nothing can hide (:func:`_dp_floor`). ``zero``: at
    that ZeRO stage instead of the layout's (the rest does not depend on it). 0 (no bound) with
    rank speeds or a batch share (heterogeneous devices)."""
    o = ctx.options
    if o.rank_speeds is not None or o.local_batch is not None:
        return 0.0
    if ctx.pipe_bound is None:  # the same for every ZeRO stage
        p, m, v = ctx.p, ctx.m, ctx.v
        C, once = _per_microbatch(ctx)
        pipe = C * m / p / (1 - o.bubble_fraction) if o.bubble_fraction is not None else \
            C * (m + (p - 1) / v * bubble.fill_share(ctx.layout.schedule)) / p
        ctx.pipe_bound = pipe + once
        _most_parameters(ctx)
    return _with_optimizer(ctx, ctx.layout.zero if zero is None else zero, ctx.m)


def step_time_lower_bounds(ctx: _Layout, zeros: tuple[int, ...]) -> dict[int, float]:
    """:func:`step_time_lower_bound` at each ZeRO stage of ``zeros``, in one call."""
    if step_time_lower_bound(ctx, zeros[0]) == 0.0:
        return dict.fromkeys(zeros, 0.0)
    return {zero: _with_optimizer(ctx, zero, ctx.m) for zero in zeros}


def family_lower_bound(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                       precision: str, options: CostOptions, sps: tuple[bool, ...], zeros: tuple[int, ...],
                       microbatches: int | None = None) -> float:
    """A lower bound on the step time of every layout that differs from ``layout`` only in its
    recomputation, ZeRO stage (one of ``zeros``), sequence parallelism (one of ``sps``) and, with
    ``microbatches`` None, micro-batches: what lets the search skip whole families of layouts
    without a context for each.

    Recomputation only adds work (replayed FLOPs, bytes and collectives), so every term is taken
    without it, at the least of the ZeRO stages and sp settings. Any micro-batch count: every term
    of C (:func:`step_time_lower_bound`) is a b + c with a, c >= 0 in the micro-batch size b = B / m
    (FLOPs and bytes per sequence, latencies per collective), so m micro-batches cost m C(B / m) =
    a B + m c >= C(B), and T_pipe >= m C(B / m) / p >= C(B) / p: C taken at one micro-batch, no
    bubble, ZeRO-3's m gathers per step counted once. 0 where :func:`step_time_lower_bound` is."""
    if options.rank_speeds is not None or options.local_batch is not None:
        return 0.0
    best = float("inf")
    for sp in sps:
        whole = variant(layout, microbatches=microbatches or 1, recompute="none", sequence_parallel=sp, zero=zeros[0])
        ctx = _Layout(model, whole, hw, global_batch, seq_len, precision, options)
        if microbatches is None:
            C, once = _per_microbatch(ctx)
            ctx.pipe_bound = C / ctx.p + once
            _most_parameters(ctx)
            best = min(best, min(_with_optimizer(ctx, zero, 1) for zero in zeros))
        else:
            best = min(best, min(step_time_lower_bounds(ctx, zeros).values()))
    return best


def _most_parameters(ctx: _Layout) -> None:
    """Note on ``ctx`` the rank holding the most parameters: its parameters and ZeRO-3 units."""
    params = ctx.group_params()
    ctx.max_params = max(params)
    i = ctx.shape.groups[params.index(ctx.max_params)][0]
    ctx.max_units = ctx.shape.layers[i] + (1 if ctx.shape.holds(i, 0) or ctx.shape.holds(i, ctx.p * ctx.v - 1) else 0)


def _with_optimizer(ctx: _Layout, zero: int, m: int) -> float:
    """The pipeline part of the bound (computed) plus, on the rank with the most parameters, the
    optimizer's step and the exposed data-parallel floor at ZeRO stage ``zero``, ``m``
    micro-batches."""
    hw, owned = ctx.hw, ctx.max_params / (ctx.r if zero >= 1 else 1)
    if ctx.offload:  # as _Layout.rank: the step in host memory, gradients and weights over the host link
        bw = hw.host_memory_bw or hw.memory_bw
        optimizer = (OPTIMIZER_BYTES_PER_PARAM * owned / bw if bw else 0.0) \
            + f.offload_copy_seconds(owned, ctx.G_b, ctx.P_b, hw.host_link_bw)
    else:
        bw = hw.memory_bw * ctx.share
        optimizer = OPTIMIZER_BYTES_PER_PARAM * owned / bw if bw else 0.0
    return (ctx.pipe_bound + optimizer + _dp_floor(ctx, zero, m)) * MARGIN


def _dp_floor(ctx: _Layout, zero: int, m: int) -> float:
    """Seconds of the data-parallel traffic of the rank holding the most parameters that
    :meth:`_Layout.data_parallel` never hides: the last bucket of the gradients' reduction (it
    starts when the last gradient is ready; every bucket with several chunks per rank or without
    overlap: there is no window), the all-gather after ZeRO-1/2's optimizer step, ZeRO-2's earlier
    reductions without overlap, and under ZeRO-3 per micro-batch the last unit's gather before
    forward and its gather and reduce-scatter in backward (the loss's all-reduce is in ``once``)."""
    if ctx.r == 1:
        return 0.0
    overlap = overlaps_dp(ctx.hw, ctx.layout.world_size, ctx.options)
    return _dp_floor_s(zero, m, ctx.r, ctx.max_params, ctx.max_units, ctx.G_b, ctx.P_b, ctx.options.bucket_bytes,
                       ctx.dp_link, overlap, ctx.v > 1, ctx.p, ctx.options.zero3_gather)


@lru_cache(maxsize=65536)
def _dp_floor_s(zero: int, m: int, n: int, params: float, units: int, grad_b: float, param_b: float,
                bucket_bytes: float, link: Link, overlap: bool, no_window: bool, pp: int = 1,
                gather: str = "microbatch") -> float:
    """:func:`_dp_floor` of a rank of ``params`` parameters in ``units`` ZeRO-3 units (the same
    for many layouts of a search: memoized); ``pp``, ``gather``: ZeRO-3 gathered once per step or not."""
    if zero == 3 and not traffic.zero3_per_step(zero, pp, gather):
        gather = collective_seconds("all_gather", n, param_b * params / units, *link)
        scatter = collective_seconds("reduce_scatter", n, grad_b * params / units, *link)
        return m * (gather + gather + scatter) if overlap else m * units * (gather + gather + scatter)
    total = 0.0
    for op, per_param, phase, times in traffic.dp_parts(zero, m, n, grad_b, param_b, pp, gather):
        b = buckets(op, n, per_param * params, bucket_bytes, *link)
        if phase == "step" or no_window or not overlap:
            total += b.total_s
        else:
            total += b.last_s
        if times > 1 and not overlap:
            total += (times - 1) * b.total_s
    return total
