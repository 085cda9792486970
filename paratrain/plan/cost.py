"""The cost model: memory, communication and step time of one layout, from the formulas.

Pure Python (no torch). :func:`stage_costs` gives what one pipeline rank spends per micro-batch
(compute, tensor-parallel and pipeline communication, chunk by chunk) and holds (model states,
activations); :func:`estimate` composes the stages into one optimizer step:

    t_i     = compute_i + tp_comm_i + p2p_i            one micro-batch on pipeline rank i
    T_pipe  = m max_i t_i + (sum_i t_i - max_i t_i) / v      (v = 1 unless interleaved)
    step    = T_pipe + exposed dp comm + per-step syncs + optimizer

With equal stages T_pipe = (m + (p - 1)/v) t, whose idle share is the analytic bubble
(p - 1)/(v m + p - 1). The model describes paratrain's runtime: the pipeline partition is the
runtime's (:func:`paratrain.core.partition.stage_sizes`), tensor- and pipeline-parallel bytes are
the runtime's (:mod:`paratrain.core.traffic`), data-parallel buckets are reduced as the last
backward produces them (:func:`exposed_reduction`). The event-level simulator
(:mod:`paratrain.plan.simulate`) replays the same per-chunk costs on the real schedule."""

from __future__ import annotations

from functools import cached_property, lru_cache

from paratrain.config import PRECISIONS, Layout, vocab_padding_note
from paratrain.core import bubble, ring, traffic
from paratrain.errors import ConfigError
from paratrain.layout import expert_refusal  # the mixture of experts' part of the one rule
from paratrain.models.configs import ModelConfig, active_param_count, param_count
from paratrain.plan import formulas as f
from paratrain.plan.collectives import (
    NO_BUCKETS,
    Buckets,
    Link,
    buckets,
    chain_buckets,
    collective_seconds,
    exposed_reduction,
    link,
)
from paratrain.plan.context import Ring, experts_cost, ring_cost, score_fraction
from paratrain.plan.footprint import LayoutMemory, chunks_per_rank
from paratrain.plan.hardware import Hardware
from paratrain.plan.options import DEFAULT_OPTIONS, CostOptions
from paratrain.plan.prediction import CommBytes, Estimate, StepTime
from paratrain.plan.stagecost import ChunkCost, StageCost
from paratrain.plan.topology import axis_spans_nodes, pipeline_shape  # noqa: F401 - pipeline_shape: hetero.py

# Adam's update reads the fp32 parameter, the gradient, m and v and writes the parameter, m, v and
# (mixed precision) the 16-bit working copy: 4+2+4+4 + 4+4+4+2 = 28 bytes per parameter it owns
# (fp32: 4+4+4+4 + 4+4+4 = 28). It is memory-bound, so it takes 28 psi / memory bandwidth.
OPTIMIZER_BYTES_PER_PARAM = 28


def compute_share(hw: Hardware, world_size: int) -> float:
    """Fraction of a compute unit each process gets when the processes of a node outnumber its
    cores (CPU ranks time-sharing cores): min(1, cores / processes on the node). 1 for devices
    that are not shared (``cores_per_node`` = 0)."""
    if not hw.cores_per_node:
        return 1.0
    return min(1.0, hw.cores_per_node / min(world_size, hw.devices_per_node))


def busy_factor(hw: Hardware, world_size: int) -> float:
    """How much slower each process computes under ``world_size`` processes, beyond its share of
    a core: the profile's ``busy_compute_slowdown`` when they fill the node's cores (every core
    computes at once and they share memory bandwidth and caches), times its
    ``oversubscribed_compute_slowdown`` when they outnumber the cores (switching processes on a
    core), else 1. A device with ``cores_per_node`` = 0 takes the figures as given (the
    simulator's unshared copy carries the factor decided here)."""
    if not hw.cores_per_node:
        return hw.busy_compute_slowdown * hw.oversubscribed_compute_slowdown
    local = min(world_size, hw.devices_per_node)
    busy = hw.busy_compute_slowdown if local >= hw.cores_per_node else 1.0
    return busy * (hw.oversubscribed_compute_slowdown if local > hw.cores_per_node else 1.0)


def overlaps_dp(hw: Hardware, world_size: int, options: CostOptions) -> bool:
    """Whether data-parallel communication can hide behind compute. Not when CPU processes
    occupy every core of their node (``cores_per_node`` > 0): gloo moves and sums the bytes on
    CPU threads, so a transfer "behind" a rank's compute takes the very cores that compute runs
    on. Measured here (``benchmarks/validate_planner.py``, 2 ranks on 2 cores): ZeRO-3's
    prefetched gathers modelled as hidden predicted 14% too fast, as exposed 5%."""
    if not options.overlap_dp:
        return False
    return not (hw.cores_per_node and min(world_size, hw.devices_per_node) >= hw.cores_per_node)


def stage_costs(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                precision: str, options: CostOptions | None = None) -> tuple[StageCost, ...]:
    """Costs of every pipeline rank of ``layout`` (assumed valid: see :func:`estimate`), in order.
    What the simulator replays: per chunk forward/backward/communication seconds."""
    return _stages(model, layout, hw, global_batch, seq_len, precision, options or DEFAULT_OPTIONS, every=True)


@lru_cache(maxsize=65536)
def _tp_seconds(model: ModelConfig, t: int, sp: bool, b: float, s: int, layers: int, first: bool, last: bool,
                recompute: str, e: int, grad_bytes: int, tp_link: Link,
                split_backward: bool = False, pack_s_per_byte: float = 0.0) -> dict[str, float]:
    """Seconds per phase (forward / backward per micro-batch; step once) of one chunk's tp
    collectives, and their ``wire_*`` bytes, from the runtime's traffic formula. Each collective
    also copies its whole payload once on the rank (``pack_s_per_byte``: the regrouping by
    sequence slice around sequence parallelism's gathers and scatters, a gradient's clone)."""
    out = {traffic.FORWARD: 0.0, traffic.BACKWARD: 0.0, traffic.STEP: 0.0}
    for phase in list(out):
        out["wire_" + phase] = 0.0
    for (phase, op), (calls, nbytes) in traffic.tp_traffic(model, t, sp, b, s, layers, first, last, recompute, e,
                                                          grad_bytes, split_backward).items():
        out[phase] += collective_seconds(op, t, nbytes, *tp_link, calls=calls) + nbytes * pack_s_per_byte
        out["wire_" + phase] += ring.wire_bytes(op, t, nbytes)
    return out


class _Layout(LayoutMemory):
    """The per-layout numbers every pipeline rank's cost needs, computed once: the memory's
    (:class:`~paratrain.plan.footprint.LayoutMemory`) and the time's."""

    def __init__(self, model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                 precision: str, options: CostOptions) -> None:
        super().__init__(model, layout, global_batch, seq_len, precision, options)
        self.offload = options.offload_optimizer and hw.host_link_bw > 0  # a CPU is its own host
        L, p, t, b, s, h = layout, self.p, self.t, self.b, self.s, self.h
        F, V = model.ffn_hidden, self.V
        self.hw = hw
        # a core's share per process, and what the processes filling the cores cost each other
        self.share = compute_share(hw, L.world_size) / busy_factor(hw, L.world_size)
        self.rate = hw.peak_flops(precision) * (options.efficiency or hw.compute_efficiency) * self.share
        self.speeds = options.rank_speeds or (1.0,) * p
        if compute_share(hw, L.world_size) < 1 and hw.shared_latency_s:  # more processes than cores: peers answer later
            hw = hw.replace(intra_node_latency_s=hw.shared_latency_s)
        self.link_hw = hw
        # per rank: the per-token work of s / cp tokens, the ring's share of the scores (plan/context.py)
        shape = f.shape_args(model)
        cp, attn = L.cp, f.attention_core_forward_flops(b, s, h)
        self.attn_fwd = attn * score_fraction(cp) / t
        whole = f.unsplit_forward_flops(b, s, h, F, **shape)  # a mixture's experts: whole on every tp rank
        self.layer_fwd = (f.layer_forward_flops(b, s, h, F, **shape) - attn - whole) / (t * cp) + whole / cp \
            + self.attn_fwd
        self.layer_rec = {"full": self.layer_fwd, "selective": self.attn_fwd}.get(L.recompute, 0.0)
        self.layer_rec = self.layer_rec if cp > 1 else f.recompute_forward_flops(L.recompute, b, s, h, F, **shape) / t
        self.head_fwd = f.head_forward_flops(b, s, h, V) / (t * cp)
        # memory-bound seconds of one layer's / the head's forward + backward on an unshared device
        lam = hw.elementwise_s_per_byte_bf16 if precision == "bf16" and hw.elementwise_s_per_byte_bf16 \
            else hw.elementwise_s_per_byte
        self.ew_layer = lam * self.full_layer
        self.ew_head = lam * self.head_act
        self.layer_overhead = hw.layer_overhead_s_bf16 if precision == "bf16" and hw.layer_overhead_s_bf16 \
            else hw.layer_overhead_s
        self.pipe_bound: float | None = None  # step_time_lower_bound's pipeline part
        self.max_params = 0.0  # and the largest rank's parameters
        self.max_units = 0  # and ZeRO-3 units

    # The links and payloads below are computed when first asked: the search bounds most layouts
    # without them (step_time_lower_bound needs only tp_link, and only with tp > 1).
    def _spans(self, axis: str) -> bool:
        L = self.layout
        return axis_spans_nodes(axis, L.dp, L.pp, L.tp, self.link_hw.devices_per_node, L.cp)

    def _link(self, axis: str) -> Link:
        return link(self.link_hw, self._spans(axis))

    @cached_property
    def tp_link(self) -> Link:
        """The intra-node link, plus what tp's blocking collectives cost more inside training
        steps (``Hardware.tp_extra_*``, measured by calibrate) when each process has a core."""
        base, hw = self._link("tp"), self.link_hw
        if not self._spans("tp") and compute_share(hw, self.layout.world_size) >= 1:
            return base._replace(extra_s_per_byte=hw.tp_extra_s_per_byte, extra_s_per_call=hw.tp_extra_s_per_call,
                                 reduce_scatter_slowdown=hw.tp_reduce_scatter_slowdown or base.reduce_scatter_slowdown,
                                 all_gather_slowdown=hw.tp_all_gather_slowdown or base.all_gather_slowdown)
        return base

    @cached_property
    def dp_link(self) -> Link:  # the dp x cp ranks that average gradients
        return link(self.link_hw, self._spans("dp") or self._spans("cp"))

    @cached_property
    def ring(self) -> Ring:
        """One block's ring-attention transfers per micro-batch (plan/context.py)."""
        L = self.layout
        return ring_cost(self.model, L.cp, self.t, self.b, self.s, self.e, self.rate, self._link("cp"),
                         L.recompute, overlaps_dp(self.hw, L.world_size, self.options))

    @cached_property
    def experts(self) -> Ring:
        """One block's expert-parallel all-to-alls per micro-batch (plan/context.py)."""
        L = self.layout
        spans = axis_spans_nodes("dp", L.ep, L.pp, L.tp, self.link_hw.devices_per_node, L.cp)  # ep dp ranks
        return experts_cost(self.model, L.ep, self.b, self.s, self.e, link(self.link_hw, spans))

    @cached_property
    def pp_link(self) -> Link:
        return self._link("pp")

    @cached_property
    def message(self) -> float:
        """Bytes of one pipeline message (a micro-batch's activations between stages)."""
        return traffic.p2p_tensor_bytes(self.h, self.b, self.s, self.t, self.sp, self.e)

    @cached_property
    def message_s(self) -> float:
        return collective_seconds("send", 2, self.message, *self.pp_link)

    @cached_property
    def dp_parts(self) -> tuple:
        """The data-parallel collectives' payloads per parameter."""
        return traffic.dp_parts(self.layout.zero, self.m, self.r, self.G_b, self.P_b, self.p,
                                self.options.zero3_gather)

    @cached_property
    def split(self) -> bool:
        """Whether the schedule splits each backward into I and W (the zero-bubble ones)."""
        return self.p > 1 and self.layout.schedule in ("zb-h1", "zb-v")

    def tp_seconds(self, layers: int, first: bool, last: bool) -> dict[str, float]:
        # the sequence-parallel sum acts on the optimizer's gradients: fp32 (the masters' under bf16);
        # a split backward has no SP regather: W keeps the input
        return _tp_seconds(self.model, self.t, self.sp, self.b, self.s, layers, first, last, self.layout.recompute,
                           self.e, 4, self.tp_link, self.split, self.hw.pack_s_per_byte / self.share)

    def chunk(self, k: int, speed: float) -> ChunkCost:
        """Stage ``k`` (chunk ``k // p`` of rank ``k % p``) per micro-batch."""
        layers, first, last = self.shape.chunks[k], k == 0, k == self.p * self.v - 1
        fwd = layers * self.layer_fwd + (self.head_fwd if last else 0)
        tp = self.tp_seconds(layers, first, last)
        params = self.chunk_params(k)
        rate = self.rate * speed
        # memory-bound work outside the matmuls: 1/3 in forward, 2/3 in backward like the FLOPs,
        # plus the replayed forward's share under recomputation (see Hardware.elementwise_s_per_byte)
        # and each layer's fixed cost (Hardware.layer_overhead_s, or its bf16 figure), shared alike
        per_layer = self.ew_layer + self.layer_overhead
        ew = (layers * per_layer + (self.ew_head if last else 0)) / (self.share * speed)
        replay = layers * per_layer * self.layer_rec / (3 * self.layer_fwd) / (self.share * speed)
        forward_s, backward_s = fwd / rate + ew / 3, 2 * fwd / rate + 2 * ew / 3
        if self.hw.backward_share:  # as measured rather than the FLOPs' 1 : 2
            both = forward_s + backward_s
            forward_s, backward_s = both * (1 - self.hw.backward_share), both * self.hw.backward_share
        # W: one matmul per linear as large as its forward's (attention's core has no weights),
        # plus what splitting the backward costs beyond a plain one (Hardware.split_backward_slowdown)
        weight_s = (layers * (self.layer_fwd - self.attn_fwd) + (self.head_fwd if last else 0)) / rate
        extra = (self.hw.split_backward_slowdown - 1) * backward_s if self.split else 0.0
        rg, ex = self.ring, self.experts
        return ChunkCost(layers, first, last, params, forward_s,
                         backward_s + extra + layers * self.layer_rec / rate + replay,
                         tp[traffic.FORWARD], tp[traffic.BACKWARD], tp["wire_forward"] + tp["wire_backward"],
                         Ring(layers * rg.forward_s, layers * rg.backward_s, layers * rg.wire_bytes),
                         Ring(layers * ex.forward_s, layers * ex.backward_s, layers * ex.wire_bytes),
                         weight_s + extra)

    def syncs(self, i: int, n_layers: int) -> tuple[float, float, float, float]:
        """(tp seconds, tp wire bytes, pp seconds, pp wire bytes) once per step after the schedule:
        SP's partial gradients and the gradient norm's sum over tp; the norm's sum over pp, the loss
        broadcast from the last stage, the tied embedding's gradient between first and last."""
        first, last, t, p = self.shape.holds(i, 0), self.shape.holds(i, self.p * self.v - 1), self.t, self.p
        tp_s = tp_b = pp_s = pp_b = 0.0
        if t > 1:
            step = self.tp_seconds(n_layers, first, last)  # per-step terms do not depend on the split
            tp_s = step[traffic.STEP] + collective_seconds("all_reduce", t, 4, *self.tp_link)
            tp_b = step["wire_step"] + ring.wire_bytes("all_reduce", t, 4)
        if p > 1:
            bw, lat = self.pp_link.bw, self.pp_link.latency
            pp_s = collective_seconds("all_reduce", p, 4, bw, lat) + ring.ring_steps("all_gather", p) * lat
            if self.model.tie_embeddings and (first or last) and not (first and last):  # (ZB-V: one rank)
                tied = traffic.tied_embedding_bytes(self.model, t, 4)  # the optimizer's (fp32) gradients
                pp_b = ring.wire_bytes("all_reduce", 2, tied)
                pp_s += collective_seconds("all_reduce", 2, tied, bw, lat)
        return tp_s, tp_b, pp_s, pp_b

    def data_parallel(self, params: float, chunks: list[ChunkCost], experts: float = 0.0
                      ) -> tuple[float, float, Buckets, float, tuple[float, float, float]]:
        """(wire bytes, exposed seconds, ZeRO-0 buckets, the exposed seconds that are not those
        buckets: ZeRO's collectives and the loss average, and of those what nothing hides, per
        micro-batch: (one ZeRO-2 reduction, ZeRO-3's gathers of a forward, its gathers and
        reductions of a backward), which the simulator pays inside the schedule, slowed there by
        the other stages' processes computing meanwhile; without a pipeline the dp ranks are all
        in the collective at once, as when ``calibrate`` measured the link, and they stay after
        it) of the dp traffic of one rank. The
        runtime reduces during the rank's last backward (chunk 0 of the last micro-batch); with
        several chunks the buckets of the others complete only at the end, and since buckets are
        launched in order none of them overlaps. Of the ``params``, ``experts`` are reduced over
        the dp / ep ranks holding the same experts (edp; parallel/expert.py), the rest over dp."""
        n, opts, m = self.r, self.options, self.m
        n_e = n // self.layout.ep  # edp
        overlap = overlaps_dp(self.hw, self.layout.world_size, opts)
        window = chunks[0].backward_s + chunks[0].tp_backward_s if self.v == 1 else 0.0
        fwd_s, bwd_s = sum(c.forward_s for c in chunks), sum(c.backward_s for c in chunks)
        wire = other = settled = z3_fwd = z3_bwd = 0.0
        grads = NO_BUCKETS
        # ZeRO-3 units: each block, and the root (embeddings, head) on a rank that holds it
        layers = sum(c.layers for c in chunks)
        units = layers + (1 if any(c.first or c.last for c in chunks) else 0)
        per_unit = self.layout.zero == 3 and not traffic.zero3_per_step(3, self.p, opts.zero3_gather)
        # a zero-bubble split reduces each block after its I and again after its W, the whole
        # unit each time (core.traffic.zero_comm_per_step's split_bytes)
        split = per_unit and self.split
        if split and n > 1:
            wire += m * layers * ring.wire_bytes("reduce_scatter", n, self.G_b * self.block)
        # ZB-V's rank 0 runs the embedding and the head: the tied weight, one unit, is gathered
        # (twice) and reduced for each of its two uses
        ends = any(c.first for c in chunks) and any(c.last for c in chunks)
        shared = per_unit and self.p > 1 and not self.head_copy and ends
        if shared and n > 1:
            wire += m * (2 * ring.wire_bytes("all_gather", n, self.P_b * self.embed)
                         + ring.wire_bytes("reduce_scatter", n, self.G_b * self.embed))
        for op, per_param, phase, times in self.dp_parts:
            payload, held = per_param * (params - experts), per_param * experts
            wire += times * (ring.wire_bytes(op, n, payload) + ring.wire_bytes(op, n_e, held))
            if per_unit:
                continue  # below: per unit
            b = chain_buckets(buckets(op, n_e, held, opts.bucket_bytes, *self.dp_link),
                     buckets(op, n, payload, opts.bucket_bytes, *self.dp_link))
            if phase == "step":  # ZeRO-1/2's all-gather after the optimizer step (ZeRO-3 in a pipeline:
                # before the schedule): nothing hides it
                other += b.total_s
            else:  # the gradient buckets of the last backward (ZeRO-0 all-reduce, ZeRO-1/2 reduce-scatter)
                grads = b
                if times > 1:  # ZeRO-2: the earlier micro-batches' hide behind the next one's passes
                    hide = fwd_s + bwd_s if overlap else 0.0
                    other += (times - 1) * max(0.0, b.total_s - hide)
                    settled = 0.0 if overlap or self.p == 1 else b.total_s
        if per_unit and n > 1:
            # Per micro-batch every unit is gathered before its forward (the next one prefetched
            # while one computes: the reduction's overlap model mirrored in time) and again
            # before its backward, after which its gradient is reduce-scattered.
            size = params / units  # parameters per unit (on average)
            gather = collective_seconds("all_gather", n, self.P_b * size, *self.dp_link)
            scatter = collective_seconds("reduce_scatter", n, self.G_b * size, *self.dp_link)
            if split:  # the blocks' second reductions, in the same backward windows
                scatter *= 1 + layers / units
            fwd_x = exposed_reduction(Buckets(units, gather, gather), fwd_s, overlap)
            bwd_x = exposed_reduction(Buckets(units, gather + scatter, gather + scatter), bwd_s, overlap)
            other += m * (fwd_x + bwd_x)
            if not overlap and self.p > 1:  # processes fill the cores: the runtime waits in each pass
                z3_fwd, z3_bwd = fwd_x, bwd_x
        other += collective_seconds("all_reduce", n, 4, *self.dp_link)  # the loss, averaged over dp
        return wire, exposed_reduction(grads, window, overlap) + other, grads, other, (settled, z3_fwd, z3_bwd)

    def rank(self, i: int, count: int) -> StageCost:
        """Pipeline rank ``i`` (standing for ``count`` alike ranks)."""
        m = self.m
        n_layers, sends = self.shape.layers[i], self.shape.sends[i]
        chunks = [self.chunk(k, self.speeds[i]) for k in self.shape.rank_stages[i]]
        mem = self.rank_memory(i)
        params, state, acts = mem.params, mem.state, mem.activation_bytes
        tp_sync, tp_step_b, pp_sync, pp_step_b = self.syncs(i, n_layers)
        experts = self.experts_of(i)  # reduced, and sharded by ZeRO, over the dp / ep ranks holding them
        dp_b, exposed, grads, dp_other, dp_mb = self.data_parallel(params, chunks, experts)
        owned = (params - experts) / self.r + experts / (self.r // self.layout.ep) if self.layout.zero >= 1 \
            else params
        bw = self.hw.memory_bw * self.share * self.speeds[i]
        opt_s = OPTIMIZER_BYTES_PER_PARAM * owned / bw if bw else 0.0
        if self.offload:  # ZeRO-Offload: the step runs in host memory, gradients and weights cross the link
            host_bw = (self.hw.host_memory_bw or self.hw.memory_bw) * self.speeds[i]
            opt_s = OPTIMIZER_BYTES_PER_PARAM * owned / host_bw if host_bw else 0.0
            opt_s += f.offload_copy_seconds(owned, self.G_b, self.P_b, self.hw.host_link_bw)
        return StageCost(
            i, count, n_layers, params, state, mem.buffer_bytes, acts, self.rebuilt,
            sum(c.forward_s for c in chunks), sum(c.backward_s for c in chunks),
            sum(c.tp_forward_s + c.tp_backward_s for c in chunks), sends * self.message_s,
            m * sum(c.tp_bytes for c in chunks) + tp_step_b, m * sends * self.message + pp_step_b,
            dp_b, exposed, tp_sync, pp_sync, opt_s, tuple(chunks), grads, dp_other, self.message_s,
            sum(c.ring.forward_s + c.ring.backward_s for c in chunks), m * sum(c.ring.wire_bytes for c in chunks),
            sum(c.ep.forward_s + c.ep.backward_s for c in chunks), m * sum(c.ep.wire_bytes for c in chunks), *dp_mb)


def _stages(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
            precision: str, options: CostOptions, every: bool) -> tuple[StageCost, ...]:
    """Every rank (``every``), or the first rank of each run of alike ranks with its ``count``."""
    ctx = _Layout(model, layout, hw, global_batch, seq_len, precision, options)
    ranks = [(i, 1) for i in range(layout.pp)] if every else ctx.shape.groups
    return tuple(ctx.rank(i, count) for i, count in ranks)


def estimate(model: ModelConfig, layout: Layout, hardware: Hardware, global_batch: int, seq_len: int,
             precision: str = "bf16", options: CostOptions | None = None) -> Estimate:
    """Predict memory, communication and step time of ``layout`` (validated first: an impossible
    layout raises ConfigError; one that does not fit is answered with ``fits == False``)."""
    options = options or DEFAULT_OPTIONS
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if not 0 <= options.memory_headroom < 1:
        raise ConfigError(f"memory headroom must be in [0, 1), got {options.memory_headroom}.")
    if options.efficiency is not None and not 0 < options.efficiency <= 1:
        raise ConfigError(f"efficiency must be in (0, 1], got {options.efficiency}.")
    if options.rank_speeds is not None and (len(options.rank_speeds) != layout.pp
                                            or not all(x > 0 for x in options.rank_speeds)):
        raise ConfigError(f"rank_speeds needs one positive speed per pipeline rank ({layout.pp}), "
                          f"got {options.rank_speeds}.")
    layout.validate(model, global_batch, seq_len)
    return _estimate(model, layout, hardware, global_batch, seq_len, precision, options)


def _estimate(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
              precision: str, options: CostOptions) -> Estimate:
    return estimate_layout(_Layout(model, layout, hw, global_batch, seq_len, precision, options))


def estimate_layout(ctx: _Layout) -> Estimate:
    """The estimate of the layout of ``ctx`` (:func:`layout_context`)."""
    model, layout, hw, options = ctx.model, ctx.layout, ctx.hw, ctx.options
    stages = tuple(ctx.rank(i, count) for i, count in ctx.shape.groups)
    p, m = layout.pp, layout.microbatches
    v = chunks_per_rank(layout)
    slow = max(stages, key=lambda c: c.microbatch_s)
    t_max = slow.microbatch_s
    if options.bubble_fraction is not None:
        pipe = m * t_max / (1 - options.bubble_fraction)
        bubble_frac = options.bubble_fraction
    else:
        pipe = m * t_max + (sum(c.count * c.microbatch_s for c in stages) - t_max) / v \
            * bubble.fill_share(layout.schedule)
        bubble_frac = bubble.bubble_fraction(layout.schedule, p, m, v)
    time = StepTime(
        compute=m * (slow.forward_s + slow.backward_s), tp_comm=m * slow.tp_s + max(c.tp_sync_s for c in stages),
        pp_comm=m * slow.p2p_s + max(c.pp_sync_s for c in stages),
        bubble=pipe - m * t_max, dp_comm=max(c.dp_exposed_s for c in stages),
        optimizer=max(c.optimizer_s for c in stages), cp_comm=m * slow.cp_s, ep_comm=m * slow.ep_s,
    )
    heavy = max(stages, key=lambda c: c.peak_bytes)
    return make_estimate(model, layout, hw, ctx.global_batch, ctx.s, ctx.precision, options, time, bubble_frac,
                         heavy, stages)


def make_estimate(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                  precision: str, options: CostOptions, time: StepTime, bubble_frac: float,
                  heavy: StageCost, stages: tuple[StageCost, ...]) -> Estimate:
    """An :class:`Estimate` from a step time (analytic or simulated) and the stage costs."""
    tokens = global_batch * seq_len
    flops = f.step_flops(model, global_batch, seq_len, "none")
    hw_flops = f.step_flops(model, global_batch, seq_len, layout.recompute)
    n_dev = layout.world_size
    peak = hw.peak_flops(precision)
    step = time.total
    nparams = param_count(model)
    return Estimate(
        model=model.name, layout=layout, hardware=hw.name, num_devices=n_dev,
        global_batch=global_batch, seq_len=seq_len, precision=precision,
        params=nparams, params_per_device=heavy.params,
        flops_per_step=flops, hardware_flops_per_step=hw_flops,
        six_p_tokens_flops=f.six_p_tokens(active_param_count(model), tokens),  # a mixture of experts: active
        state=heavy.state, buffer_bytes=heavy.buffer_bytes + heavy.rebuilt_bytes,
        activation_bytes_per_device=heavy.activation_bytes,
        peak_bytes_per_device=heavy.peak_bytes,
        capacity_bytes=hw.memory_bytes * (1 - options.memory_headroom), most_loaded_stage=heavy.stage,
        bubble_fraction=bubble_frac,
        comm_bytes_per_device=CommBytes(dp=max(c.dp_bytes for c in stages), tp=max(c.tp_bytes for c in stages),
                                        pp=max(c.pp_bytes for c in stages), cp=max(c.cp_bytes for c in stages),
                                        ep=max(c.ep_bytes for c in stages)),
        time=time, tokens_per_s=tokens / step, mfu=flops / (step * n_dev * peak),
        hfu=hw_flops / (step * n_dev * peak), efficiency=options.efficiency or hw.compute_efficiency,
        notes=_notes(model, hw, precision, layout, options),
        grad_bytes=options.grad_bytes or f.STATE_BYTES[precision][1],
        host_bytes_per_device=f.host_state_bytes(heavy.params, layout.zero, layout.dp, precision,
                                                 options.offload_optimizer and hw.host_link_bw > 0),
    )


def _notes(model: ModelConfig, hw: Hardware, precision: str, layout: Layout,
           options: CostOptions = DEFAULT_OPTIONS) -> tuple[str, ...]:
    notes = []
    if options.offload_optimizer and not hw.host_link_bw:
        notes.append(f"{hw.name} is its own host (no host link): with --offload-optimizer the optimizer state "
                     f"stays in the same memory and nothing is copied.")
    if precision != "fp32" and not hw.peak_bf16_flops:
        notes.append(f"{hw.name} has no bf16 units: estimated as fp16 mixed precision (same bytes, fp16 peak).")
    notes += [] if hw.memory_bw else ["memory bandwidth unknown: the optimizer step's time is left out."]
    notes += [padding + "."] if (padding := vocab_padding_note(model, layout.tp)) else []
    if model.num_experts and (refusal := expert_refusal(layout, model)):  # the planner prices it anyway
        notes.append(f"priced, but `paratrain train` does not run it: {refusal}")
    share = compute_share(hw, layout.world_size)
    if share < 1:
        notes.append(f"{layout.world_size} processes share {hw.cores_per_node} cores: each computes at "
                     f"{share:.2f} of a core.")
    return tuple(notes)
