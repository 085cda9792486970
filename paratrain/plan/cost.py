"""The cost model: memory, communication and step time of one layout, from the formulas.

Pure Python (no torch). :func:`stage_costs` gives what one pipeline rank spends per micro-batch
(compute, tensor-parallel and pipeline communication) and holds (model states, activations);
:func:`estimate` composes the stages into one optimizer step:

    t_i     = compute_i + tp_comm_i + p2p_i            one micro-batch on pipeline rank i
    T_pipe  = m max_i t_i + (sum_i t_i - max_i t_i) / v      (v = 1 unless interleaved)
    step    = T_pipe + exposed dp comm + optimizer

With equal stages T_pipe = (m + (p - 1)/v) t, whose idle share is the analytic bubble
(p - 1)/(v m + p - 1). Data-parallel traffic overlaps the backward pass (only the part longer
than its compute window is exposed); tensor-parallel collectives and pipeline sends are on the
critical path. A simulator that replays a real schedule can replace T_pipe through
``CostOptions.bubble_fraction``, and a partition module can set ``CostOptions.stage_layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from paratrain.config import PRECISIONS, Layout, padded_vocab_size, vocab_padding_note
from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig, param_count
from paratrain.plan import formulas as f
from paratrain.plan.hardware import Hardware
from paratrain.plan.prediction import CommBytes, Estimate, StepTime
from paratrain.plan.topology import axis_spans_nodes, device_of_chunk, even_partition, p2p_sends_per_microbatch

# Adam's update reads the fp32 parameter, the gradient, m and v and writes the parameter, m, v and
# (mixed precision) the 16-bit working copy: 4+2+4+4 + 4+4+4+2 = 28 bytes per parameter it owns
# (fp32: 4+4+4+4 + 4+4+4 = 28). It is memory-bound, so it takes 28 psi / memory bandwidth.
OPTIMIZER_BYTES_PER_PARAM = 28


@dataclass(frozen=True)
class CostOptions:
    """Knobs of the model that are not part of the layout. Defaults follow the papers.

    efficiency: fraction of peak the compute reaches (None: the hardware's figure).
    overlap_dp: data-parallel collectives overlap backward (bucketed DP, [R20]/DDP); False for a
        naive all-reduce after backward.
    memory_headroom: fraction of device memory kept free for the framework (CUDA context,
        allocator fragmentation, temporary buffers); an assumption, not a measured figure.
    dropout, store_scores: activation accounting of [K22] (dropout masks; the s x s attention
        scores). A model without dropout / with a fused attention kernel stores neither.
    stage_layers: layers per pipeline chunk (pp * virtual_stages entries), None = even split.
    bubble_fraction: idle fraction of the pipeline taken from a simulated schedule, None = analytic.
    bucket_bytes: gradient bucket size (each bucket is one collective; latency term only);
        25 MiB like PyTorch DDP's ``bucket_cap_mb`` and paratrain's ``--bucket-mb`` default.
    """

    efficiency: float | None = None
    overlap_dp: bool = True
    memory_headroom: float = 0.10
    dropout: bool = True
    store_scores: bool = True
    stage_layers: tuple[int, ...] | None = None
    bubble_fraction: float | None = None
    bucket_bytes: float = 25 * 2**20


DEFAULT_OPTIONS = CostOptions()


class StageCost(NamedTuple):
    """One pipeline rank (any of its dp x tp devices: they are alike): per micro-batch seconds,
    per step bytes, and the memory it holds at its peak. (An immutable tuple rather than a frozen
    dataclass: the search builds tens of thousands, and a tuple is several times cheaper to make.)"""

    stage: int
    count: int  # pipeline ranks this entry stands for (1 unless grouped; see PipelineShape)
    num_layers: int
    params: float
    state: f.ModelState
    buffer_bytes: float
    activation_bytes: float
    forward_s: float
    backward_s: float  # includes recomputation
    tp_s: float
    p2p_s: float
    tp_bytes: float  # per step
    pp_bytes: float  # per step
    dp_bytes: float  # per step
    dp_exposed_s: float
    optimizer_s: float

    @property
    def peak_bytes(self) -> float:
        return self.state.total + self.buffer_bytes + self.activation_bytes

    @property
    def microbatch_s(self) -> float:
        return self.forward_s + self.backward_s + self.tp_s + self.p2p_s


def _link(hw: Hardware, cross: bool) -> tuple[float, float]:
    """(bandwidth, latency) of a link: inter-node if the group spans nodes."""
    return (hw.inter_node_bw, hw.inter_node_latency_s) if cross else (hw.intra_node_bw, hw.intra_node_latency_s)


def _dp_parts(zero: int, m: int, n: int, grad_b: float, param_b: float) -> list[tuple[str, float, str, int]]:
    """Data-parallel collectives per step as (op, payload bytes, overlap window, count):

    zero 0: all-reduce the gradients once, during the last backward ([R20] sec. 7: 2 psi).
    zero 1: reduce-scatter the gradients, all-gather the updated parameters (overlapped with the
            next step's first forward): the same 2 psi ([R20] sec. 7.2.1).
    zero 2: the gradient shard is reduced every micro-batch (gradients stay sharded while they
            accumulate), parameters gathered once.
    zero 3: every micro-batch all-gathers the parameters for forward and again for backward and
            reduce-scatters the gradients: 3 psi per micro-batch ([R20] sec. 7.2.2: 1.5x DP)."""
    if n == 1:
        return []
    if zero == 0:
        return [("all_reduce", grad_b, "backward", 1)]
    if zero == 1:
        return [("reduce_scatter", grad_b, "backward", 1), ("all_gather", param_b, "forward", 1)]
    if zero == 2:
        return [("reduce_scatter", grad_b, "backward", m), ("all_gather", param_b, "forward", 1)]
    return [("all_gather", param_b, "forward", m), ("all_gather", param_b, "backward", m),
            ("reduce_scatter", grad_b, "backward", m)]


_WIRE = {"all_reduce": f.all_reduce_wire_bytes, "reduce_scatter": f.reduce_scatter_wire_bytes,
         "all_gather": f.all_gather_wire_bytes}


@dataclass(frozen=True)
class PipelineShape:
    """Layers and sends of each pipeline rank, and which ranks are alike.

    ``groups`` lists (first rank, number of ranks) of runs of ranks with the same layers, sends
    and first/last role; within a run only the in-flight count differs, and it never grows with
    the rank index (see :func:`formulas.in_flight_microbatches`), so the first rank of a run
    holds the most memory and every rank of it takes the same time."""

    layers: tuple[int, ...]
    sends: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]


@lru_cache(maxsize=4096)
def pipeline_shape(num_layers: int, pp: int, virtual_stages: int,
                   stage_layers: tuple[int, ...] | None = None) -> PipelineShape:
    chunks = stage_layers or even_partition(num_layers, pp * virtual_stages)
    if len(chunks) != pp * virtual_stages or sum(chunks) != num_layers or min(chunks) < 1:
        raise ConfigError(f"stage_layers {chunks} must give {pp * virtual_stages} chunks of >= 1 layer "
                          f"summing to {num_layers}.")
    layers = [0] * pp
    for k, c in enumerate(chunks):
        layers[device_of_chunk(k, pp)] += c
    sends = p2p_sends_per_microbatch(pp, virtual_stages)
    groups: list[list[int]] = []
    for i in range(pp):
        sig = (layers[i], i == 0, i == pp - 1, sends[i])
        j = groups[-1][0] if groups else -1
        if groups and (layers[j], j == 0, j == pp - 1, sends[j]) == sig:
            groups[-1][1] += 1
        else:
            groups.append([i, 1])
    return PipelineShape(tuple(layers), sends, tuple((i, c) for i, c in groups))


def stage_costs(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                precision: str, options: CostOptions | None = None) -> tuple[StageCost, ...]:
    """Costs of every pipeline rank of ``layout`` (assumed valid: see :func:`estimate`), in order.
    The hook for a simulator: per micro-batch forward/backward/communication seconds per stage."""
    return _stages(model, layout, hw, global_batch, seq_len, precision, options or DEFAULT_OPTIONS, every=True)


def _stages(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
            precision: str, options: CostOptions, every: bool) -> tuple[StageCost, ...]:
    """Every rank (``every``), or the first rank of each run of alike ranks with its ``count``."""
    L, p, t, n, m = layout, layout.pp, layout.tp, layout.dp, layout.microbatches
    v = L.virtual_stages if L.schedule == "interleaved" else 1
    # V: the vocabulary as the runtime holds it, padded when t does not divide it
    s, h, F, a, V = seq_len, model.hidden, model.ffn_hidden, model.num_heads, padded_vocab_size(model.vocab_size, t)
    b = global_batch // (n * m)  # micro-batch size
    e = f.ELEM_BYTES[precision]
    P_b, G_b, _ = f.STATE_BYTES[precision]
    rate = hw.peak_flops(precision) * (options.efficiency or hw.compute_efficiency)
    sp = L.sequence_parallel
    shape = pipeline_shape(model.num_layers, p, v, options.stage_layers)
    tp_bw, tp_lat = _link(hw, axis_spans_nodes("tp", n, p, t, hw.devices_per_node))
    dp_bw, dp_lat = _link(hw, axis_spans_nodes("dp", n, p, t, hw.devices_per_node))
    pp_bw, pp_lat = _link(hw, axis_spans_nodes("pp", n, p, t, hw.devices_per_node))

    block = f.block_params_per_device(h, F, t)
    embed = V * h / t
    head_copy = (not model.tie_embeddings) or p > 1  # the last stage keeps a copy of W_e
    layer_fwd = f.layer_forward_flops(b, s, h, F) / t
    layer_rec = f.recompute_forward_flops(L.recompute, b, s, h, F) / t
    head_fwd = f.head_forward_flops(b, s, h, V) / t
    act_layer = f.layer_activation_bytes(s, b, h, a, F, t, sp, L.recompute, e, options.dropout, options.store_scores)
    emb_act = f.embedding_activation_bytes(s, b, h, t, sp, options.dropout)
    out_act = (m if (L.schedule == "gpipe" and p > 1) else 1) * f.output_activation_bytes(s, b, h, V, t, sp, e)
    rebuilt = 0.0
    if L.recompute == "full":  # one block's activations are rebuilt during its backward
        rebuilt = f.layer_activation_bytes(s, b, h, a, F, t, sp, "none", e, options.dropout, options.store_scores)
    # ZeRO-3 gathers one unit (a block, or the embedding) and its gradient at a time.
    buffers = (P_b + G_b) * max(block, embed) if (L.zero == 3 and n > 1) else 0.0
    S_act = e * b * s * h  # one micro-batch's hidden states (bytes)
    # Megatron's per-layer f/g: 2 all-reduces forward, 2 backward, 2 more when full recomputation
    # redoes the forward ([N21] sec. 3, [K22] sec. 4.2); sequence parallelism swaps each for an
    # all-gather + reduce-scatter pair of the same wire bytes.
    ar_per_layer = 4 + (2 if L.recompute == "full" else 0)
    ar_wire = f.all_reduce_wire_bytes(t, S_act)
    # Pipeline sends are split over the tp ranks (sequence-parallel shards, or [N21] sec. 4.1's
    # scatter/gather optimisation, which all-gathers on the receiver over the tp link).
    S_p2p = S_act / t
    dp_parts = _dp_parts(L.zero, m, n, G_b, P_b)  # payloads per parameter

    out = []
    ranks = [(i, 1) for i in range(p)] if every else shape.groups
    for i, count in ranks:
        first, last, n_layers, sends = i == 0, i == p - 1, shape.layers[i], shape.sends[i]
        params = n_layers * block + (embed + model.max_seq_len * h if first else 0) \
            + (2 * h + (embed if head_copy else 0) if last else 0)
        state = f.model_state_bytes(params, L.zero, n, precision)
        flight = f.in_flight_microbatches(L.schedule, p, m, v, i)
        acts = flight * (n_layers * act_layer + (emb_act if first else 0)) + (out_act if last else 0) + rebuilt

        fwd = n_layers * layer_fwd + (head_fwd if last else 0)
        fwd_s, bwd_s = fwd / rate, (2 * fwd + n_layers * layer_rec) / rate

        tp_b = tp_calls = 0.0
        if t > 1:
            tp_b, tp_calls = n_layers * ar_per_layer * ar_wire, n_layers * ar_per_layer
            if first:  # vocab-parallel embedding: its output is all-reduced (reduce-scattered with SP)
                tp_b += f.reduce_scatter_wire_bytes(t, S_act) if sp else ar_wire
                tp_calls += 1
            if last:  # head input gradient, and cross-entropy's max / sum-exp / target logit (fp32)
                tp_b += ar_wire + 3 * f.all_reduce_wire_bytes(t, 4 * b * s)
                tp_calls += 4
            if not sp:  # receiver all-gathers each scattered p2p tensor
                tp_b += sends * f.all_gather_wire_bytes(t, S_act)
                tp_calls += sends
        tp_s = tp_b / tp_bw + tp_calls * f.ring_steps("all_reduce", t) * tp_lat
        p2p_s = sends * (S_p2p / pp_bw + pp_lat)
        pp_b = m * sends * S_p2p
        if p > 1 and model.tie_embeddings and (first or last):  # W_e gradient: first <-> last stage
            pp_b += f.all_reduce_wire_bytes(2, G_b * embed)

        dp_b = exposed = 0.0
        for op, per_param, window, times in dp_parts:
            payload = per_param * params
            wire = _WIRE[op](n, payload)
            secs = wire / dp_bw + max(1, math.ceil(payload / options.bucket_bytes)) * f.ring_steps(op, n) * dp_lat
            overlap = (fwd_s if window == "forward" else bwd_s) if options.overlap_dp else 0.0
            dp_b += times * wire
            exposed += times * max(0.0, secs - overlap)
        owned = params / (n if L.zero >= 1 else 1)
        opt_s = OPTIMIZER_BYTES_PER_PARAM * owned / hw.memory_bw if hw.memory_bw else 0.0
        out.append(StageCost(i, count, n_layers, params, state, buffers, acts, fwd_s, bwd_s, tp_s, p2p_s,
                             m * tp_b, pp_b, dp_b, exposed, opt_s))
    return tuple(out)


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
    layout.validate(model, global_batch, seq_len)
    return _estimate(model, layout, hardware, global_batch, seq_len, precision, options)


def _estimate(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
              precision: str, options: CostOptions) -> Estimate:
    stages = _stages(model, layout, hw, global_batch, seq_len, precision, options, every=False)
    p, m = layout.pp, layout.microbatches
    v = layout.virtual_stages if layout.schedule == "interleaved" else 1
    slow = max(stages, key=lambda c: c.microbatch_s)
    t_max = slow.microbatch_s
    if options.bubble_fraction is not None:
        pipe = m * t_max / (1 - options.bubble_fraction)
        bubble_frac = options.bubble_fraction
    else:
        pipe = m * t_max + (sum(c.count * c.microbatch_s for c in stages) - t_max) / v
        bubble_frac = f.bubble_fraction(layout.schedule, p, m, v)
    # The pipeline ends with the embedding-gradient all-reduce between first and last stage
    # (tied embeddings, p > 1); it is small and not overlapped.
    tied_s = 0.0
    if p > 1 and model.tie_embeddings:
        cross = axis_spans_nodes("pp", layout.dp, p, layout.tp, hw.devices_per_node)
        bw, lat = _link(hw, cross)
        G_b = f.STATE_BYTES[precision][1]
        vocab = padded_vocab_size(model.vocab_size, layout.tp)
        tied_s = f.all_reduce_wire_bytes(2, G_b * vocab * model.hidden / layout.tp) / bw + 2 * lat
    time = StepTime(
        compute=m * (slow.forward_s + slow.backward_s), tp_comm=m * slow.tp_s, pp_comm=m * slow.p2p_s + tied_s,
        bubble=pipe - m * t_max, dp_comm=max(c.dp_exposed_s for c in stages),
        optimizer=max(c.optimizer_s for c in stages),
    )
    heavy = max(stages, key=lambda c: c.peak_bytes)
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
        six_p_tokens_flops=f.six_p_tokens(nparams, tokens),
        state=heavy.state, buffer_bytes=heavy.buffer_bytes, activation_bytes_per_device=heavy.activation_bytes,
        peak_bytes_per_device=heavy.peak_bytes,
        capacity_bytes=hw.memory_bytes * (1 - options.memory_headroom), most_loaded_stage=heavy.stage,
        bubble_fraction=bubble_frac,
        comm_bytes_per_device=CommBytes(dp=max(c.dp_bytes for c in stages), tp=max(c.tp_bytes for c in stages),
                                        pp=max(c.pp_bytes for c in stages)),
        time=time, tokens_per_s=tokens / step, mfu=flops / (step * n_dev * peak),
        hfu=hw_flops / (step * n_dev * peak), efficiency=options.efficiency or hw.compute_efficiency,
        notes=_notes(model, layout.tp, hw, precision),
    )


def _notes(model: ModelConfig, tp: int, hw: Hardware, precision: str) -> tuple[str, ...]:
    notes = []
    if precision == "bf16" and not hw.peak_bf16_flops:
        notes.append(f"{hw.name} has no bf16 units: estimated as fp16 mixed precision (same bytes, fp16 peak).")
    if not hw.memory_bw:
        notes.append("memory bandwidth unknown: the optimizer step's time is left out.")
    if padding := vocab_padding_note(model, tp):
        notes.append(padding + ".")
    return tuple(notes)
