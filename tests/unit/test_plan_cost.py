"""estimate(): composition of the formulas into one layout's memory, communication and step time."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paratrain.config import Layout
from paratrain.core.bubble import in_flight_microbatches
from paratrain.core.ring import wire_bytes
from paratrain.errors import ConfigError
from paratrain.mesh import MeshShape
from paratrain.models.configs import ModelConfig, get_model_config, param_count
from paratrain.plan import formulas as f
from paratrain.plan.cost import CostOptions, _estimate, _stages, estimate, stage_costs
from paratrain.plan.hardware import get_hardware
from paratrain.plan.topology import axis_spans_nodes, pipeline_shape

# Divisible by 1..16 in every split dimension, 24 layers: every tp/pp below is valid.
MODEL = ModelConfig("m", num_layers=24, hidden=2048, num_heads=16, vocab_size=51200, max_seq_len=2048)
H100 = get_hardware("H100-80GB")
A100 = get_hardware("A100-80GB")

ISSUE_KEYS = {"params", "flops_per_step", "hardware_flops_per_step", "model_state_bytes_per_device",
              "activation_bytes_per_device", "peak_bytes_per_device", "bubble_fraction", "comm_bytes_per_device",
              "step_time_s", "tokens_per_s", "mfu", "fits"}


def test_json_has_the_issue_keys() -> None:
    d = estimate(MODEL, Layout(dp=2, pp=2, tp=2, microbatches=4), H100, 32, 2048).to_dict()
    assert ISSUE_KEYS <= set(d)
    assert set(d["comm_bytes_per_device"]) == {"dp", "tp", "pp"}
    assert isinstance(d["params"], int) and d["params"] == param_count(MODEL)
    assert d["peak_bytes_per_device"] == pytest.approx(
        d["model_state_bytes_per_device"] + d["activation_bytes_per_device"] + d["memory_bytes"]["buffers"])


def test_single_device_matches_formulas() -> None:
    """dp = pp = tp = 1: every term is one formula, no parallel overhead."""
    B, s = 4, 1024
    est = estimate(MODEL, Layout(), A100, B, s, "bf16")
    P = param_count(MODEL)
    assert est.model_state_bytes_per_device == pytest.approx(16 * P)
    act = 24 * f.layer_activation_bytes(s, B, 2048, 16, 8192, store_scores=False) \
        + f.embedding_activation_bytes(s, B, 2048) + f.output_activation_bytes(s, B, 2048, 51200)
    assert est.activation_bytes_per_device == pytest.approx(act)
    assert est.comm_bytes_per_device.as_dict() == {"dp": 0, "tp": 0, "pp": 0}
    assert est.time.tp_comm == est.time.pp_comm == est.time.dp_comm == est.time.bubble == 0
    rate = A100.peak_bf16_flops * A100.compute_efficiency
    assert est.time.compute == pytest.approx(est.flops_per_step / rate)
    assert est.time.optimizer == pytest.approx(28 * P / A100.memory_bw)
    assert est.mfu == pytest.approx(est.flops_per_step / (est.step_time_s * A100.peak_bf16_flops))
    assert est.tokens_per_s == pytest.approx(B * s / est.step_time_s)


@pytest.mark.parametrize("zero, factor", [(0, 2.0), (1, 2.0), (2, 2.0), (3, 3.0)])
def test_dp_bytes_ring_and_zero(zero: int, factor: float) -> None:
    """[R20] sec. 7: plain DP and ZeRO-1/2 move 2 psi per step, ZeRO-3 3 psi (with 2-byte params
    and grads, each (n-1)/n of it on the wire)."""
    n = 8
    est = estimate(MODEL, Layout(dp=n, zero=zero), H100, 16, 2048)
    psi_bytes = 2 * param_count(MODEL)
    assert est.comm_bytes_per_device.dp == pytest.approx(factor * (n - 1) / n * psi_bytes)


def test_tp_bytes_per_layer() -> None:
    """4 all-reduces of b s h activations per layer (2 forward, 2 backward), plus the embedding's
    and LM head's, the cross-entropy's 2 (3 fp32 values per token) and the gradient norm's;
    sequence parallelism moves the same bytes as all-gathers and reduce-scatters, plus the
    partial gradients and the backward's regathers of the saved input slices; full recomputation
    (no dropout) replays 1 all-reduce per layer."""
    t, b, s, h, l = 4, 2, 2048, 2048, 24
    est = estimate(MODEL, Layout(tp=t), H100, b, s)
    S = 2 * b * s * h
    ar = 2 * (t - 1) / t
    expected = (4 * l + 1 + 1) * ar * S + ar * 3 * 4 * b * s + ar * 4
    assert est.comm_bytes_per_device.tp == pytest.approx(expected)
    sp = estimate(MODEL, Layout(tp=t, sequence_parallel=True), H100, b, s)
    # LayerNorms, row-parallel biases, positions, ln_f: summed as the optimizer's fp32 gradients
    # (under bf16 the fp32 masters': parallel/mixed.py)
    partial = 4 * (l * 6 * h + 2048 * h + 2 * h)
    # and backward all-gathers again the saved input slices of qkv, fc1 (per layer) and the head:
    # (t-1)/t of each gathered tensor on the wire
    regather = (2 * l + 1) * (t - 1) / t * S
    assert sp.comm_bytes_per_device.tp == pytest.approx(expected + ar * partial + regather)
    full = estimate(MODEL, Layout(tp=t, recompute="full"), H100, b, s)
    assert full.comm_bytes_per_device.tp == pytest.approx(expected + l * ar * S)


def test_tp_bytes_are_the_runtimes_formula() -> None:
    """The planner's tp bytes are volume.tp_comm_per_step's payloads (what the runtime's tests
    measure exactly) put on the ring: all-reduce 2(n-1)/n, all-gather/reduce-scatter (n-1)/n."""
    from paratrain.core.traffic import tp_comm_per_step

    model = get_model_config("tiny")
    for layout in (Layout(tp=2), Layout(tp=4, sequence_parallel=True, microbatches=2),
                   Layout(tp=2, recompute="full"), Layout(tp=2, sequence_parallel=True, recompute="full")):
        est = estimate(model, layout, H100, 8, 32, "fp32")
        payload = tp_comm_per_step(model, layout.tp, layout.sequence_parallel, 8, 32, layout.microbatches,
                                   layout.recompute)
        n = layout.tp
        wire = sum((2 if op in ("all_reduce", "grad_norm") else 1) * (n - 1) / n * b for op, (_, b) in payload.items())
        assert est.comm_bytes_per_device.tp == pytest.approx(wire)


def test_pp_bytes() -> None:
    """A middle stage sends each micro-batch's activation forward and its gradient back."""
    p, m, b, s, h = 4, 8, 1, 2048, 2048
    costs = stage_costs(MODEL, Layout(pp=p, microbatches=m), H100, m * b, s, "bf16")
    S = 2 * b * s * h
    assert costs[1].pp_bytes == pytest.approx(2 * m * S)
    # W_e's gradient between first and last stage, as the optimizer's fp32 (master) gradient
    tied = wire_bytes("all_reduce", 2, 4 * 51200 * h)
    assert costs[0].pp_bytes == pytest.approx(m * S + tied)


def test_stage_params_add_up() -> None:
    """Summed over stages and tp shards, parameters = the model's, plus the last stage's copy of the
    tied embedding and the tp-replicated LayerNorms/biases."""
    p, t = 4, 2
    costs = stage_costs(MODEL, Layout(pp=p, tp=t), H100, 1, 2048, "bf16")
    h, V, l = 2048, 51200, 24
    replicated = l * 6 * h + 2048 * h + 2 * h  # per block 6h, positions, final LayerNorm
    assert t * sum(c.params for c in costs) == pytest.approx(param_count(MODEL) + V * h + (t - 1) * replicated)


def test_grouped_stages_equal_every_stage() -> None:
    """_estimate computes one stage per run of alike stages; it must agree with all stages."""
    for layout in (Layout(pp=8, microbatches=16),
                   Layout(pp=4, microbatches=8, schedule="interleaved", virtual_stages=3),
                   Layout(pp=6, microbatches=3, schedule="gpipe"),
                   Layout(dp=2, pp=3, tp=2, microbatches=6, zero=1)):
        B = layout.dp * layout.microbatches
        every = stage_costs(MODEL, layout, A100, B, 2048, "bf16")
        groups = _stages(MODEL, layout, A100, B, 2048, "bf16", CostOptions(), every=False)
        assert sum(g.count for g in groups) == layout.pp
        assert max(g.peak_bytes for g in groups) == max(c.peak_bytes for c in every)
        assert sum(g.count * g.microbatch_s for g in groups) == pytest.approx(sum(c.microbatch_s for c in every))


def test_bubble_time_matches_fraction_for_equal_stages() -> None:
    """With the head's cost removed and equal stages, T = (m + (p-1)/v) t: bubble time / step time
    is the analytic fraction."""
    model = MODEL.replace(vocab_size=16)
    interleaved = Layout(pp=4, microbatches=8, schedule="interleaved", virtual_stages=2)
    for layout in (Layout(pp=4, microbatches=8), interleaved):
        est = estimate(model, layout, A100, 8, 2048)
        pipe = est.time.compute + est.time.pp_comm + est.time.bubble
        assert est.time.bubble / pipe == pytest.approx(est.bubble_fraction, rel=0.02)


def test_not_fitting_is_an_answer_and_impossible_is_an_error() -> None:
    big = get_model_config("gpt-70b")
    est = estimate(big, Layout(dp=1), H100, 1, 4096)
    assert not est.fits and est.peak_bytes_per_device > est.capacity_bytes
    with pytest.raises(ConfigError, match="does not divide"):
        estimate(MODEL, Layout(tp=3), H100, 1, 2048)
    with pytest.raises(ConfigError, match="precision"):
        estimate(MODEL, Layout(), H100, 1, 2048, "fp8")


def test_notes() -> None:
    assert estimate(MODEL, Layout(), A100, 1, 2048).notes == ()
    v100 = estimate(MODEL, Layout(), get_hardware("V100-32GB"), 1, 2048)
    assert any("no bf16" in n for n in v100.notes)
    gpt2 = get_model_config("gpt2-124m")
    assert estimate(gpt2, Layout(), A100, 1, 1024).notes == ()
    assert any("50257 padded to 50304 for tp=2" in n for n in estimate(gpt2, Layout(tp=2), A100, 1, 1024).notes)


def test_a_padded_vocabulary_costs_what_the_padded_model_does() -> None:
    """At tp=2 the runtime holds GPT-2's vocabulary as 50304 rows (config.padded_vocab_size):
    memory and time are those of a 50304-token model; at tp=1 nothing is padded."""
    gpt2 = get_model_config("gpt2-124m")
    for layout in (Layout(tp=2), Layout(pp=2, tp=2, microbatches=2)):
        odd, even = (estimate(m, layout, A100, 8, 1024) for m in (gpt2, gpt2.replace(vocab_size=50304)))
        assert odd.params_per_device == even.params_per_device
        assert odd.peak_bytes_per_device == even.peak_bytes_per_device
        assert odd.step_time_s == pytest.approx(even.step_time_s, rel=1e-12)
    assert estimate(gpt2, Layout(), A100, 8, 1024).params_per_device == param_count(gpt2)


def test_fp32_uses_fp32_peak_and_state() -> None:
    est = estimate(MODEL, Layout(dp=2, zero=1), A100, 2, 2048, "fp32")
    P = param_count(MODEL)
    assert est.state.params == pytest.approx(4 * P) and est.state.optimizer == pytest.approx(8 * P / 2)
    assert est.mfu == pytest.approx(est.flops_per_step / (est.step_time_s * 2 * 19.5e12))


def test_overlap_hides_dp_communication() -> None:
    on = estimate(MODEL, Layout(dp=8), H100, 64, 2048)
    off = estimate(MODEL, Layout(dp=8), H100, 64, 2048, options=CostOptions(overlap_dp=False))
    assert on.time.dp_comm < off.time.dp_comm
    assert off.time.dp_comm == pytest.approx(on.comm_bytes_per_device.dp / H100.intra_node_bw)


def test_zero_runtime_timing() -> None:
    """ZeRO priced as the runtime runs it: ZeRO-1/2's all-gather after the optimizer step is
    exposed even with overlap (it is the only part a bigger backward does not hide), ZeRO-3's
    per-unit gathers hide behind the passes but for the first unit's."""
    zero0 = estimate(MODEL, Layout(dp=8), H100, 64, 2048)
    zero1 = estimate(MODEL, Layout(dp=8, zero=1), H100, 64, 2048)
    zero3 = estimate(MODEL, Layout(dp=8, zero=3), H100, 64, 2048)
    # ZeRO-1's all-gather of the bf16 parameters, in 25 MiB buckets, none hidden
    payload = zero1.params_per_device * 2
    calls = -(-payload // (25 * 2**20))
    gather = (7 / 8) * payload / H100.intra_node_bw + calls * 7 * H100.intra_node_latency_s
    assert zero1.time.dp_comm >= gather > zero0.time.dp_comm  # ZeRO-0 hides all but its last bucket
    assert 0 < zero3.time.dp_comm < zero1.time.dp_comm  # 25 units: all but the first hidden


def test_no_overlap_when_cpu_processes_fill_the_cores() -> None:
    """gloo moves and sums bytes on CPU threads: with a rank on every core nothing hides."""
    from paratrain.plan.cost import overlaps_dp

    cpu = get_hardware("cpu").replace(cores_per_node=2, devices_per_node=4)
    small = get_model_config("small")
    assert not overlaps_dp(cpu, 2, CostOptions()) and not overlaps_dp(cpu, 4, CostOptions())
    assert overlaps_dp(cpu.replace(cores_per_node=4), 2, CostOptions())  # a spare core per rank
    assert overlaps_dp(H100, 8, CostOptions()) and not overlaps_dp(H100, 8, CostOptions(overlap_dp=False))
    on = estimate(small, Layout(dp=2, zero=3), cpu, 16, 128, precision="fp32")
    off = estimate(small, Layout(dp=2, zero=3), cpu, 16, 128, precision="fp32", options=CostOptions(overlap_dp=False))
    assert on.time.dp_comm == off.time.dp_comm
    spare = estimate(small, Layout(dp=2, zero=3), cpu.replace(cores_per_node=4), 16, 128, precision="fp32")
    assert spare.time.dp_comm < on.time.dp_comm


def test_backend_collective_slowdowns() -> None:
    """A backend whose reduce-scatter is 3x the ring's bandwidth time (gloo here) makes ZeRO's
    reduce-scatters and SP's cost that much more, and nothing else."""
    from paratrain.plan.collectives import collective_seconds, link

    slow = H100.replace(reduce_scatter_slowdown=3.0, all_gather_slowdown=1.5)
    lk = link(slow, False)
    ring = (7 / 8) * 2**20 / H100.intra_node_bw
    lat = 7 * H100.intra_node_latency_s
    assert collective_seconds("reduce_scatter", 8, 2**20, *lk) == pytest.approx(3 * ring + lat)
    assert collective_seconds("all_gather", 8, 2**20, *lk) == pytest.approx(1.5 * ring + lat)
    assert collective_seconds("all_reduce", 8, 2**20, *lk) == pytest.approx(2 * ring + 2 * lat)
    off = CostOptions(overlap_dp=False)
    assert estimate(MODEL, Layout(dp=8), slow, 64, 2048, options=off).time.dp_comm == \
        pytest.approx(estimate(MODEL, Layout(dp=8), H100, 64, 2048, options=off).time.dp_comm)
    assert estimate(MODEL, Layout(dp=8, zero=1), slow, 64, 2048, options=off).time.dp_comm > \
        1.9 * estimate(MODEL, Layout(dp=8, zero=1), H100, 64, 2048, options=off).time.dp_comm
    with pytest.raises(ConfigError, match="reduce_scatter_slowdown"):
        H100.replace(reduce_scatter_slowdown=0.5).validate()


def test_cross_node_groups_use_the_network() -> None:
    one_node = estimate(MODEL, Layout(dp=8), A100, 64, 2048, options=CostOptions(overlap_dp=False))
    two_nodes = estimate(MODEL, Layout(dp=16), A100, 64, 2048, options=CostOptions(overlap_dp=False))
    assert one_node.time.dp_comm == pytest.approx(one_node.comm_bytes_per_device.dp / A100.intra_node_bw)
    assert two_nodes.time.dp_comm == pytest.approx(two_nodes.comm_bytes_per_device.dp / A100.inter_node_bw)


def test_partition_is_the_runtimes() -> None:
    """The planner prices the partition `paratrain train` runs (cost-balanced by FLOPs, the
    head's cost on the last stage), or the one given."""
    from paratrain.core.partition import stage_sizes

    gpt2 = get_model_config("gpt2-124m")
    assert pipeline_shape(gpt2, 1024, 4, 1).chunks == stage_sizes(gpt2, 4, 1, 1024) == (3, 4, 4, 1)
    # the head costs 1.8 layers here: 6,6,7,5 keeps every stage within 7 layers' time
    assert pipeline_shape(MODEL, 2048, 4, 1).chunks == (6, 6, 7, 5)
    assert pipeline_shape(MODEL, 2048, 8, 1).groups == ((0, 1), (1, 5), (6, 1), (7, 1))
    assert pipeline_shape(MODEL, 2048, 2, 1, (20, 4)).layers == (20, 4)
    with pytest.raises(ConfigError):
        estimate(MODEL, Layout(pp=2), H100, 1, 2048, options=CostOptions(stage_layers=(20, 3)))


@settings(max_examples=200, deadline=None)
@given(dp=st.integers(1, 6), pp=st.integers(1, 6), tp=st.integers(1, 6), node=st.sampled_from([1, 2, 3, 4, 6, 8]),
       axis=st.sampled_from(["dp", "pp", "tp"]))
def test_axis_spans_nodes_matches_brute_force(dp: int, pp: int, tp: int, node: int, axis: str) -> None:
    groups = MeshShape(dp=dp, pp=pp, tp=tp).all_groups(axis)
    brute = any(len({r // node for r in g}) > 1 for g in groups)
    assert axis_spans_nodes(axis, dp, pp, tp, node) == brute


layouts = st.builds(
    lambda dp, pp, tp, mb, sched, rec, sp: Layout(
        dp=dp, pp=pp, tp=tp, microbatches=mb * pp, schedule=sched, virtual_stages=2 if sched == "interleaved" else 1,
        recompute=rec, sequence_parallel=sp and tp > 1),
    st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 4, 8]), st.integers(1, 3),
    st.sampled_from(["gpipe", "1f1b", "interleaved"]), st.sampled_from(["none", "selective", "full"]), st.booleans())


def _fit(layout: Layout, **changes: object) -> tuple[Layout, int]:
    layout = dataclasses.replace(layout, **changes)
    return layout, layout.dp * layout.microbatches


@settings(max_examples=150, deadline=None)
@given(layout=layouts, precision=st.sampled_from(["bf16", "fp32"]))
def test_memory_never_grows_with_zero_stage(layout: Layout, precision: str) -> None:
    peaks = []
    for z in range(4):
        lay, B = _fit(layout, zero=z)
        peaks.append(estimate(MODEL, lay, H100, B, 1024, precision).model_state_bytes_per_device)
    assert all(a >= b for a, b in zip(peaks, peaks[1:]))


@settings(max_examples=150, deadline=None)
@given(layout=layouts, zero=st.integers(0, 3))
def test_more_tp_never_adds_model_state(layout: Layout, zero: int) -> None:
    states = []
    for t in (1, 2, 4, 8, 16):
        lay, B = _fit(layout, tp=t, zero=zero, sequence_parallel=layout.sequence_parallel and t > 1)
        states.append(estimate(MODEL, lay, H100, B, 1024).model_state_bytes_per_device)
    assert all(a >= b for a, b in zip(states, states[1:]))


@settings(max_examples=150, deadline=None)
@given(layout=layouts, zero=st.integers(0, 3))
def test_estimate_invariants(layout: Layout, zero: int) -> None:
    lay, B = _fit(layout, zero=zero)
    est = _estimate(MODEL, lay, A100, B, 1024, "bf16", CostOptions())
    t = est.time
    assert min(t.compute, t.tp_comm, t.pp_comm, t.bubble, t.dp_comm, t.optimizer) >= 0
    assert est.step_time_s == pytest.approx(t.compute + t.tp_comm + t.pp_comm + t.bubble + t.dp_comm + t.optimizer)
    assert 0 <= est.bubble_fraction < 1 and 0 < est.mfu <= est.hfu < est.efficiency + 1e-9
    assert est.hardware_flops_per_step >= est.flops_per_step
    assert all(v >= 0 for v in est.comm_bytes_per_device.as_dict().values())


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 6), k=st.integers(1, 4), v=st.integers(2, 4))
def test_stash_from_the_schedule_is_the_closed_form_for_equal_chunks(p: int, k: int, v: int) -> None:
    """Counting the real interleaved schedule's stash gives [K22]'s in-flight formula when every
    chunk is alike; with unequal chunks (the runtime's partition) it is what the rank holds."""
    from paratrain.plan.topology import peak_stash

    m = k * p
    for i in range(p):
        got = peak_stash("interleaved", p, m, v, i, (1.0,) * v)
        assert got == pytest.approx(v * in_flight_microbatches("interleaved", p, m, v, i))


@settings(max_examples=80, deadline=None)
@given(p=st.integers(2, 6), k=st.integers(1, 5), v=st.integers(2, 4))
def test_stash_states_are_the_generated_schedules(p: int, k: int, v: int) -> None:
    """The closed-form interleaved stash equals counting the generated schedule's actions."""
    from paratrain.core.schedules import build_schedule
    from paratrain.plan.topology import stash_states

    m = k * p
    s = build_schedule("interleaved", p, m, v)
    for r in range(p):
        counts, seen = [0] * v, set()
        for a in s.compute_order(r):
            counts[a.chunk] += 1 if a.kind == "F" else -1
            if a.kind == "F":
                seen.add(tuple(counts))
        maximal = {x for x in seen if not any(o != x and all(i >= j for i, j in zip(o, x)) for o in seen)}
        assert set(stash_states("interleaved", p, m, v, r)) == maximal


def test_zb_v_stash_states_are_the_lowered_schedules() -> None:
    """The planner counts ZB-V's stash from the list scheduler's orders (no transfers lowered):
    the same compute orders, and so the same states, as the schedule training runs, including
    micro-batch counts under the rank count where the bound is 2m."""
    from paratrain.core.schedules import build_schedule
    from paratrain.core.zero_bubble import zb_v_orders
    from paratrain.plan.topology import stash_states

    for p in range(2, 7):
        for m in range(1, 2 * p + 1):
            lowered, orders = build_schedule("zb-v", p, m), zb_v_orders(p, m)
            for r in range(p):
                assert orders[r] == [(a.kind, a.microbatch, a.chunk) for a in lowered.compute_order(r)]
                counts, seen = [0, 0], set()
                for a in lowered.compute_order(r):
                    if a.kind in ("F", "W"):
                        counts[a.chunk] += 1 if a.kind == "F" else -1
                    if a.kind == "F":
                        seen.add(tuple(counts))
                maximal = {x for x in seen if not any(o != x and all(i >= j for i, j in zip(o, x)) for o in seen)}
                assert set(stash_states("zb-v", p, m, 2, r)) == maximal


@pytest.mark.parametrize("recompute,passes", [("none", 1.0), ("full", 4 / 3)])
def test_layer_overhead_is_paid_by_every_layer_of_every_micro_batch(recompute: str, passes: float) -> None:
    """``Hardware.layer_overhead_s`` (``paratrain calibrate``'s per-layer term) adds exactly
    layers x micro-batches x c to one rank's step (a third more under full recomputation,
    which replays each layer's forward: a third of its forward + backward), split 1/3 : 2/3
    between forward and backward like the rest of the layer's work; a stage pays for its own
    layers only. Catches the term dropped, paid once per step instead of per micro-batch, or
    paid for the whole model on every pipeline rank."""
    model = get_model_config("small")
    cpu = get_hardware("cpu").replace(cores_per_node=0)
    c = 2e-3
    for layout, layers in ((Layout(microbatches=4, recompute=recompute), 6), (Layout(pp=2, microbatches=4), 3)):
        base = stage_costs(model, layout, cpu, 8, 64, "fp32")[0]
        more = stage_costs(model, layout, cpu.replace(layer_overhead_s=c), 8, 64, "fp32")[0]
        per_mb = passes if layout.pp == 1 else 1.0
        assert more.forward_s - base.forward_s == pytest.approx(layers * c / 3, rel=1e-9)
        assert (more.forward_s + more.backward_s) - (base.forward_s + base.backward_s) == \
            pytest.approx(layers * c * per_mb, rel=1e-9)
    one = Layout(microbatches=4, recompute=recompute)
    step = estimate(model, one, cpu, 8, 64, "fp32").step_time_s
    assert estimate(model, one, cpu.replace(layer_overhead_s=c), 8, 64, "fp32").step_time_s - step == \
        pytest.approx(4 * 6 * c * passes, rel=1e-9)


@pytest.mark.parametrize("sp", [False, True])
def test_a_tp_collective_also_copies_its_whole_payload_on_the_rank(sp: bool) -> None:
    """``Hardware.pack_s_per_byte``: each tensor-parallel collective's payload (the runtime's
    traffic formula, ``core.traffic.tp_traffic``) is copied once on the rank, priced per byte on
    its own share of a core; only the tp time moves. Catches the copy left out, priced on the
    wire bytes (half the payload for a 2-rank all-gather) or per call instead of per byte."""
    from paratrain.core import traffic

    model, t, b, s = get_model_config("small"), 2, 8, 64
    cpu = get_hardware("cpu").replace(cores_per_node=0)
    layout = Layout(tp=t, sequence_parallel=sp)
    pack = 1e-9
    base = stage_costs(model, layout, cpu, b, s, "fp32")[0]
    more = stage_costs(model, layout, cpu.replace(pack_s_per_byte=pack), b, s, "fp32")[0]
    moved = {ph: sum(n for (phase, _op), (_calls, n) in traffic.tp_traffic(
        model, t, sp, b, s, model.num_layers, True, True, "none", 4, 4).items() if phase == ph)
        for ph in (traffic.FORWARD, traffic.BACKWARD)}
    assert more.tp_s - base.tp_s == pytest.approx(pack * (moved[traffic.FORWARD] + moved[traffic.BACKWARD]), rel=1e-9)
    assert (more.forward_s, more.backward_s) == (base.forward_s, base.backward_s)


def test_busy_cores_slow_compute_only_when_the_processes_fill_them() -> None:
    """``Hardware.busy_compute_slowdown`` (calibrate: the layers alone vs on every core at once)
    stretches compute and the optimizer by exactly that factor when a layout's processes fill the
    node's cores, and not when they leave a core free; the simulator agrees. Catches the factor
    applied to one process on a 2-core node, dropped by the simulator's unshared copy, or
    applied to the communication."""
    from paratrain.plan.simulate import simulate_step

    model = get_model_config("tiny")
    cpu = get_hardware("cpu").replace(cores_per_node=2, devices_per_node=2)
    slow = cpu.replace(busy_compute_slowdown=1.25)
    one, two = Layout(), Layout(dp=2)
    assert stage_costs(model, one, slow, 8, 64, "fp32") == stage_costs(model, one, cpu, 8, 64, "fp32")
    base, busy = stage_costs(model, two, cpu, 8, 64, "fp32")[0], stage_costs(model, two, slow, 8, 64, "fp32")[0]
    assert (busy.forward_s, busy.backward_s, busy.optimizer_s) == pytest.approx(
        (1.25 * base.forward_s, 1.25 * base.backward_s, 1.25 * base.optimizer_s), rel=1e-9)
    assert busy.dp_bytes == base.dp_bytes
    sim0, sim1 = simulate_step(model, two, cpu, 8, 64, "fp32"), simulate_step(model, two, slow, 8, 64, "fp32")
    assert sim1.estimate.time.compute == pytest.approx(1.25 * sim0.estimate.time.compute, rel=1e-9)


def test_oversubscribed_cores_slow_compute_only_when_processes_outnumber_them() -> None:
    """``Hardware.oversubscribed_compute_slowdown`` (calibrate: twice as many processes as cores,
    against their time alone and the time-sharing) stretches compute and the optimizer by that
    factor when a layout's processes outnumber the node's cores (4 on 2), on top of the busy
    cores' factor, and not when they just fill them (2 on 2); the simulator agrees and does not
    apply it twice (its unshared copy). Catches the factor applied at every core count, dropped
    by the simulator, or applied to communication."""
    from paratrain.plan.simulate import simulate_step

    model = get_model_config("tiny")
    cpu = get_hardware("cpu").replace(cores_per_node=2, devices_per_node=4, busy_compute_slowdown=1.1)
    over = cpu.replace(oversubscribed_compute_slowdown=1.2)
    two, four = Layout(dp=2), Layout(dp=4)
    assert stage_costs(model, two, over, 8, 64, "fp32") == stage_costs(model, two, cpu, 8, 64, "fp32")
    base, slow = stage_costs(model, four, cpu, 8, 64, "fp32")[0], stage_costs(model, four, over, 8, 64, "fp32")[0]
    assert (slow.forward_s, slow.backward_s, slow.optimizer_s) == pytest.approx(
        (1.2 * base.forward_s, 1.2 * base.backward_s, 1.2 * base.optimizer_s), rel=1e-9)
    assert slow.dp_bytes == base.dp_bytes and slow.dp_exposed_s == pytest.approx(base.dp_exposed_s, rel=1e-9)
    sim0, sim1 = simulate_step(model, four, cpu, 8, 64, "fp32"), simulate_step(model, four, over, 8, 64, "fp32")
    assert sim1.estimate.time.compute == pytest.approx(1.2 * sim0.estimate.time.compute, rel=1e-6)
    # the simulator shares the cores itself: its stages are the analytic ones without the 2 x sharing
    assert sim1.stages[0].forward_s == pytest.approx(slow.forward_s / 2, rel=1e-9)


def test_bf16_layers_pay_their_own_per_layer_cost() -> None:
    """``Hardware.layer_overhead_s_bf16`` (calibrate: the bf16 layers' own fit) replaces
    ``layer_overhead_s`` in every layer of a ``--precision bf16`` estimate: each layer's forward +
    backward grows by exactly the difference; fp32 and bf16-autocast (fp32 weights) keep
    ``layer_overhead_s``; 0 means the fp32 figure. The search's lower bound stays below the
    estimate. Catches the bf16 figure ignored, applied to fp32, or missing from the bound."""
    from paratrain.plan.bound import layout_context, step_time_lower_bound

    model = get_model_config("tiny")
    cpu = get_hardware("cpu").replace(cores_per_node=2, devices_per_node=2, layer_overhead_s=1e-3)
    more = cpu.replace(layer_overhead_s_bf16=3e-3)
    layout = Layout(dp=2)
    def costs(hw, precision):
        return stage_costs(model, layout, hw, 16, 128, precision)

    for precision in ("fp32", "bf16-autocast"):
        assert costs(more, precision) == costs(cpu, precision)
    base, got = costs(cpu, "bf16")[0], costs(more, "bf16")[0]
    assert got.forward_s + got.backward_s - base.forward_s - base.backward_s == pytest.approx(
        model.num_layers * 2e-3, rel=1e-9)
    assert costs(cpu.replace(layer_overhead_s_bf16=0.0), "bf16") == costs(cpu, "bf16")
    est = estimate(model, layout, more, 16, 128, "bf16")
    bound = step_time_lower_bound(layout_context(model, layout, more, 16, 128, "bf16", CostOptions()))
    fp32_bound = step_time_lower_bound(layout_context(model, layout, cpu, 16, 128, "bf16", CostOptions()))
    assert fp32_bound < bound <= est.step_time_s


def test_measured_backward_share_divides_each_chunk_and_the_split_costs_its_w_more() -> None:
    """``Hardware.backward_share`` (calibrate: B / (F + B) timed apart) divides each chunk's
    forward + backward so, their sum unchanged (recomputation's replay stays on the backward);
    ``split_backward_slowdown`` (calibrate: (F_split + I + W - F) / B) adds (factor - 1) x the
    backward to a zero-bubble schedule's W, and so to its backward, and nothing under 1F1B or
    without a pipeline. The simulator's W and I then follow: I unchanged, W longer by the extra.
    Catches the share applied to the sum (changing it), the extra put on I or on every schedule,
    or dropped by the simulator."""
    from paratrain.plan.simulate import _compute_part, simulate_step

    model = get_model_config("small")
    cpu = get_hardware("cpu").replace(cores_per_node=2, devices_per_node=2)
    one = Layout(pp=2, microbatches=4, schedule="1f1b")
    base = stage_costs(model, one, cpu, 16, 128, "fp32")
    shared = stage_costs(model, one, cpu.replace(backward_share=0.6), 16, 128, "fp32")
    for b, s in zip(base, shared):
        for cb, cs in zip(b.chunks, s.chunks):
            assert cs.forward_s + cs.backward_s == pytest.approx(cb.forward_s + cb.backward_s, rel=1e-12)
            assert cs.backward_s / (cs.forward_s + cs.backward_s) == pytest.approx(0.6, rel=1e-12)
            assert cb.backward_s / (cb.forward_s + cb.backward_s) > 0.65  # the FLOPs' split: about 2/3
    slow = cpu.replace(split_backward_slowdown=1.25)
    assert stage_costs(model, one, slow, 16, 128, "fp32") == base  # 1F1B: a plain backward
    assert stage_costs(model, Layout(dp=2), slow, 16, 128, "fp32") == stage_costs(model, Layout(dp=2), cpu, 16, 128,
                                                                                     "fp32")
    zb = Layout(pp=2, microbatches=4, schedule="zb-v")
    plain, split = stage_costs(model, zb, cpu, 16, 128, "fp32"), stage_costs(model, zb, slow, 16, 128, "fp32")
    for b, s in zip(plain, split):
        for cb, cs in zip(b.chunks, s.chunks):
            assert cs.forward_s == cb.forward_s
            assert cs.backward_s - cb.backward_s == pytest.approx(0.25 * cb.backward_s, rel=1e-12)
            assert cs.weight_s - cb.weight_s == pytest.approx(0.25 * cb.backward_s, rel=1e-12)
    sims = simulate_step(model, zb, cpu, 16, 128, "fp32"), simulate_step(model, zb, slow, 16, 128, "fp32")
    parts = [{k: sum(_compute_part(sim.stages[0], sp.action, {}, 0) for sp in sim.timeline.ranks[0]
                     if sp.action.kind == k) for k in "FIW"} for sim in sims]
    assert parts[1]["F"] == pytest.approx(parts[0]["F"]) and parts[1]["I"] == pytest.approx(parts[0]["I"])
    assert parts[1]["W"] - parts[0]["W"] == pytest.approx(0.25 * 4 * sum(c.backward_s for c in plain[0].chunks))
    assert sims[1].estimate.step_time_s > sims[0].estimate.step_time_s


@pytest.mark.parametrize("sp", [False, True])
def test_tp_collectives_pay_the_in_step_extra_when_each_process_has_a_core(sp: bool) -> None:
    """``Hardware.tp_extra_s_per_byte`` / ``tp_extra_s_per_call`` (calibrate: real tp 2 steps'
    all-reduces against the link's model) add exactly ``payload x per_byte + calls x per_call``
    to the tp time, over the runtime's traffic formula (``core.traffic.tp_traffic``), when every
    process has a core; ``tp_*_slowdown`` replace the link's reduce-scatter and all-gather
    factors for those groups. With more processes than cores (tp 4 on 2) nothing changes: the
    figures were measured with a core each. Catches the extra priced on wire bytes, once per
    step, or applied to oversubscribed layouts."""
    from paratrain.core import traffic

    model, b, s = get_model_config("small"), 8, 64
    cpu = get_hardware("cpu").replace(cores_per_node=2, devices_per_node=2)
    per_byte, per_call = 1e-9, 2e-4
    more = cpu.replace(tp_extra_s_per_byte=per_byte, tp_extra_s_per_call=per_call)
    layout = Layout(tp=2, sequence_parallel=sp)
    base, got = stage_costs(model, layout, cpu, b, s, "fp32")[0], stage_costs(model, layout, more, b, s, "fp32")[0]
    per = traffic.tp_traffic(model, 2, sp, b, s, model.num_layers, True, True, "none", 4, 4)
    moved = sum(n for (phase, _), (_, n) in per.items() if phase in (traffic.FORWARD, traffic.BACKWARD))
    calls = sum(c for (phase, _), (c, _) in per.items() if phase in (traffic.FORWARD, traffic.BACKWARD))
    assert got.tp_s - base.tp_s == pytest.approx(moved * per_byte + calls * per_call, rel=1e-9)
    assert (got.forward_s, got.backward_s) == (base.forward_s, base.backward_s)
    if sp:  # the in-step factor on the ring replaces the link's for the tp group
        slower = stage_costs(model, layout, more.replace(tp_reduce_scatter_slowdown=9.0,
                                                         tp_all_gather_slowdown=9.0), b, s, "fp32")[0]
        assert slower.tp_s > got.tp_s
    crowded = Layout(tp=4)  # 4 processes on 2 cores
    assert stage_costs(model, crowded, more, b, s, "fp32") == stage_costs(model, crowded, cpu, b, s, "fp32")
