"""A lower bound on a layout's step time, in a few operations: what lets the search
(:func:`paratrain.plan.search.search` with ``top``) price in full only the layouts that can reach
its top. Pure Python (no torch); tested never to exceed :func:`cost.estimate_layout`'s figure."""

from __future__ import annotations

from paratrain.config import Layout
from paratrain.core import bubble, ring, traffic
from paratrain.models.configs import ModelConfig
from paratrain.plan.collectives import collective_seconds
from paratrain.plan.cost import OPTIMIZER_BYTES_PER_PARAM, _Layout
from paratrain.plan.hardware import Hardware
from paratrain.plan.options import CostOptions


def layout_context(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                   precision: str, options: CostOptions) -> _Layout:
    """The per-layout context (``layout`` valid): its ``peak_bytes()`` is the estimate's peak
    memory, :func:`step_time_lower_bound` bounds its step time, :func:`estimate_layout` prices it."""
    return _Layout(model, layout, hw, global_batch, seq_len, precision, options)


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
    pipeline's and tensor-parallel norm syncs: their maximum over ranks is at least that), the
    optimizer (exact) and terms >= 0. ``zero``: at that ZeRO stage instead of the layout's (the
    rest does not depend on it). 0 (no bound) with rank speeds or a batch share (heterogeneous
    devices)."""
    o = ctx.options
    if o.rank_speeds is not None or o.local_batch is not None:
        return 0.0
    if ctx.pipe_bound is None:  # the same for every ZeRO stage
        L, p, t, m, v = ctx.model.num_layers, ctx.p, ctx.t, ctx.m, ctx.v
        replay = ctx.layer_rec / (3 * ctx.layer_fwd) if ctx.layer_fwd else 0.0
        C = (3 * (L * ctx.layer_fwd + ctx.head_fwd) + L * ctx.layer_rec) / ctx.rate \
            + (L * ctx.ew_layer * (1 + replay) + ctx.ew_head) / ctx.share
        once = collective_seconds("all_reduce", ctx.r, 4, *ctx.dp_link)
        if t > 1:
            tp = ctx.tp_seconds(1, False, False)
            C += L * (tp[traffic.FORWARD] + tp[traffic.BACKWARD])
            once += collective_seconds("all_reduce", t, 4, *ctx.tp_link)
        if p > 1:
            C += sum(ctx.shape.sends) * ctx.message_s
            bw, lat = ctx.pp_link.bw, ctx.pp_link.latency
            once += collective_seconds("all_reduce", p, 4, bw, lat) + ring.ring_steps("all_gather", p) * lat
        pipe = C * m / p / (1 - o.bubble_fraction) if o.bubble_fraction is not None else \
            C * (m + (p - 1) / v * bubble.fill_share(ctx.layout.schedule)) / p
        ctx.pipe_bound = pipe + once
        ctx.max_params = max(params for params, _ in ctx.group_parts())
    return _with_optimizer(ctx, ctx.layout.zero if zero is None else zero)


def step_time_lower_bounds(ctx: _Layout, zeros: tuple[int, ...]) -> dict[int, float]:
    """:func:`step_time_lower_bound` at each ZeRO stage of ``zeros``, in one call."""
    if step_time_lower_bound(ctx, zeros[0]) == 0.0:
        return dict.fromkeys(zeros, 0.0)
    return {zero: _with_optimizer(ctx, zero) for zero in zeros}


def _with_optimizer(ctx: _Layout, zero: int) -> float:
    """The pipeline part of the bound (computed) plus the optimizer's step at ZeRO stage ``zero``."""
    bw = ctx.hw.memory_bw * ctx.share
    owned = ctx.max_params / (ctx.r if zero >= 1 else 1)
    optimizer = OPTIMIZER_BYTES_PER_PARAM * owned / bw if bw else 0.0
    return (ctx.pipe_bound + optimizer) * (1 - 1e-9)  # the margin: the estimate sums the terms in another order
