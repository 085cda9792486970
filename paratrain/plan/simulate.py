"""Event-level simulation of one training step of a layout (``paratrain simulate``). Pure Python.

What is simulated: **one representative pipeline** -- the ``pp`` ranks of data-parallel replica 0
and tensor-parallel index 0. Data-parallel replicas run the same schedule on equal batches and
tensor-parallel peers the same actions in lockstep, so every other pipeline of the mesh has the
same timeline; a mesh of thousands of devices costs no more than its pipeline (seconds at most).

Per pipeline rank, the real schedule of :mod:`paratrain.core.schedules` (GPipe,
1F1B, interleaved; ``pp = 1`` is 1F1B on one rank: forward and backward of each micro-batch,
i.e. gradient accumulation) is replayed by :func:`paratrain.core.timeline.simulate`
-- the simulator the pipeline module uses, with the runtime's semantics (transfers posted
without waiting, a compute waits for the receive that feeds it, sends awaited at the end) -- on
these durations, all from :func:`paratrain.plan.cost.stage_costs`:

* ``F`` / ``B`` of chunk c: its compute (FLOPs / rate) plus its tensor-parallel collectives
  (on the tp link, on the critical path as the runtime issues them); ``I`` and ``W`` of the
  zero-bubble schedules: half the backward compute each, the tp collectives all in ``I``;
* a pipeline message: ``bytes / bandwidth + latency`` of the pp link (intra- or inter-node by the
  mesh placement ``rank = (pp_i * dp + dp_i) * tp + tp_i``);
* after the schedule, per rank: the data-parallel gradient buckets, launched as the rank's last
  backward produces them (:func:`paratrain.plan.collectives.exposed_reduction` with that
  backward's simulated duration as the window), then the per-step syncs (gradient norm, tied
  embedding, sequence-parallel partial gradients) and the optimizer step;
* except ZeRO-2's reductions of the earlier micro-batches where nothing hides them (processes
  filling the cores): the runtime waits for each before the next, so each is paid inside the
  action that completes that micro-batch's gradients (its ``B``, or ``W`` of a split backward),
  and on shared cores it is slowed like compute (gloo sums the bytes on the same cores).

Shared cores (CPU processes outnumbering the cores, ``Hardware.cores_per_node``): collectives
use ``Hardware.shared_latency_s`` per ring step (measured so by ``paratrain calibrate``), and a
compute runs
at ``min(1, cores / busy processes)`` of its speed, where the busy processes are the node's ranks
computing at the time (``dp x tp`` per busy pipeline rank, weighted by the share of its span not
spent waiting in tensor-parallel collectives). Found by iterating: simulate, average
each compute's concurrency over its span, rescale its duration, simulate again (damped; a few
rounds). Without shared cores one round is exact.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Any

from paratrain.config import Layout
from paratrain.core.schedules import Action, Schedule, build_schedule
from paratrain.core.timeline import Timeline, simulate
from paratrain.models.configs import ModelConfig
from paratrain.plan.collectives import exposed_reduction
from paratrain.plan.cost import (
    DEFAULT_OPTIONS,
    CostOptions,
    Estimate,
    busy_factor,
    chunks_per_rank,
    estimate,
    make_estimate,
    overlaps_dp,
    stage_costs,
)
from paratrain.plan.hardware import Hardware
from paratrain.plan.prediction import StepTime
from paratrain.plan.stagecost import StageCost

SHARING_ROUNDS = 8


@dataclass(frozen=True)
class Simulation:
    """The simulated step: its :class:`Estimate` (step time from the timeline), the timeline of the
    representative pipeline, and where the slowest rank's time went."""

    estimate: Estimate
    timeline: Timeline
    stages: tuple[StageCost, ...]
    finish_s: tuple[float, ...]  # per pipeline rank: end of its schedule + exposed dp reduction
    exposed_dp_s: tuple[float, ...]
    compute_share: tuple[float, ...]  # mean fraction of a core each rank's computes got

    @property
    def step_time_s(self) -> float:
        return self.estimate.step_time_s

    @property
    def bubble(self) -> float:
        return self.timeline.bubble

    def to_dict(self) -> dict[str, Any]:
        """``paratrain simulate --json``: the estimate's keys, then the simulation's."""
        d = self.estimate.to_dict()
        d["simulated"] = {
            "representative_pipeline": "dp index 0, tp index 0 (dp replicas and tp peers are identical)",
            "makespan_s": self.timeline.makespan, "bubble": self.timeline.bubble,
            "idle_fraction_per_rank": self.timeline.idle_fractions(), "finish_s": list(self.finish_s),
            "exposed_dp_s": list(self.exposed_dp_s), "compute_share": list(self.compute_share),
            "actions": sum(len(r) for r in self.timeline.schedule.ranks),
        }
        return d


def _durations(schedule: Schedule, stages: tuple[StageCost, ...], scale: dict[tuple[int, int], float]) -> Any:
    """``f(rank, action)``: chunk compute x its sharing factor + tp collectives; messages."""
    m = schedule.num_microbatches

    def duration(rank: int, a: Action) -> float:
        st = stages[rank]
        if a.kind == "F":
            c = st.chunks[a.chunk]
            return (c.forward_s * scale.get((rank, id(a)), 1.0) + _dp_part(st, a, scale, rank, m)
                    + c.tp_forward_s + c.ring.forward_s + c.ep.forward_s)
        if a.kind in ("B", "I", "W"):
            return (_compute_part(st, a, scale, rank) + _dp_part(st, a, scale, rank, m)
                    + _tp_part(st, a) + _cp_part(st, a) + _ep_part(st, a))
        return st.p2p_message_s if a.kind in ("send_act", "send_grad") else 0.0
    return duration


def _on_cpu(stages: tuple[StageCost, ...], scale: dict[tuple[int, int], float], r: int, a: Action, m: int
            ) -> float:
    """Fraction of a compute action's span its rank spends on a core (not waiting in the
    tensor-parallel collectives inside it; a ZeRO-2 reduction in it is gloo's threads moving and
    summing bytes on the cores)."""
    c = _compute_part(stages[r], a, scale, r) + _dp_part(stages[r], a, scale, r, m)
    total = c + _tp_part(stages[r], a)
    return c / total if total > 0 else 0.0


def _mean_concurrency(tl: Timeline, stages: tuple[StageCost, ...], scale: dict[tuple[int, int], float], m: int
                      ) -> dict[tuple[int, int], float]:
    """For each compute span: the time-averaged number of pipeline ranks on a core during it
    (each rank weighted by the fraction of its current span it computes)."""
    events = []
    for r, spans in enumerate(tl.ranks):
        for sp in spans:
            if sp.action.is_compute and sp.end > sp.start:
                w = _on_cpu(stages, scale, r, sp.action, m)
                events += [(sp.start, w), (sp.end, -w)]
    events.sort()
    times, counts, busy = [], [], 0.0
    for t, d in events:
        busy += d
        times.append(t)
        counts.append(busy)
    out = {}
    for r, spans in enumerate(tl.ranks):
        for sp in spans:
            if not sp.action.is_compute or sp.end <= sp.start:
                continue
            i = bisect.bisect_right(times, sp.start) - 1
            acc, t = 0.0, sp.start
            while t < sp.end:
                nxt = times[i + 1] if i + 1 < len(times) else sp.end
                seg_end = min(nxt, sp.end)
                acc += max(counts[i], 1.0) * (seg_end - t)
                t, i = seg_end, i + 1
            out[(r, id(sp.action))] = acc / (sp.end - sp.start)
    return out


def simulate_step(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                  precision: str = "bf16", options: CostOptions | None = None) -> Simulation:
    """Simulate one step of ``layout`` (validated like :func:`~paratrain.plan.cost.estimate`)."""
    options = options or DEFAULT_OPTIONS
    analytic = estimate(model, layout, hw, global_batch, seq_len, precision, options)  # validates
    cores = hw.cores_per_node
    shared = bool(cores) and min(layout.world_size, hw.devices_per_node) > cores
    # sharing is simulated below, not averaged; the busy cores' slowdown is carried as decided
    base_hw = hw.replace(cores_per_node=0, busy_compute_slowdown=busy_factor(hw, layout.world_size),
                         oversubscribed_compute_slowdown=1.0)
    if shared and hw.shared_latency_s:  # processes outnumber cores: peers answer later
        base_hw = base_hw.replace(intra_node_latency_s=hw.shared_latency_s)
    # whether dp traffic can hide is the real machine's property (base_hw no longer shares cores)
    stages = stage_costs(model, layout, base_hw, global_batch, seq_len, precision,
                         replace(options, overlap_dp=overlaps_dp(hw, layout.world_size, options)))
    v = chunks_per_rank(layout)
    schedule = build_schedule(layout.schedule if layout.pp > 1 else "1f1b", layout.pp, layout.microbatches, v)
    procs_per_rank = layout.dp * layout.cp * layout.tp
    scale: dict[tuple[int, int], float] = {}
    if shared:  # start from every rank busy all the time
        static = layout.world_size / cores
        scale = {(r, id(a)): static for r, acts in enumerate(schedule.ranks) for a in acts if a.is_compute}
    timeline = simulate(schedule, _durations(schedule, stages, scale))
    for _ in range(SHARING_ROUNDS if shared else 0):
        conc = _mean_concurrency(timeline, stages, scale, layout.microbatches)
        new = {k: max(1.0, procs_per_rank * c / cores) for k, c in conc.items()}
        scale = {k: 0.5 * (scale.get(k, 1.0) + x) for k, x in new.items()}  # damped
        timeline = simulate(schedule, _durations(schedule, stages, scale))
    return _compose(model, layout, hw, global_batch, seq_len, precision, options, analytic, stages, timeline,
                    scale, shared)


def _compose(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int, precision: str,
             options: CostOptions, analytic: Estimate, stages: tuple[StageCost, ...], timeline: Timeline,
             scale: dict[tuple[int, int], float], shared: bool) -> Simulation:
    """Step time = the slowest rank's (schedule end + exposed dp reduction) + per-step syncs +
    optimizer; the breakdown is that rank's."""
    t0 = timeline.start
    finish, exposed, shares = [], [], []
    static = layout.world_size / hw.cores_per_node if shared else 1.0
    overlap = overlaps_dp(hw, layout.world_size, options)
    m = layout.microbatches
    inside = [sum(_dp_part(stages[r], sp.action, scale, r, m) for sp in spans)  # paid in the schedule
              for r, spans in enumerate(timeline.ranks)]
    for r, spans in enumerate(timeline.ranks):
        end = max(sp.end for sp in spans) - t0
        last_b = [sp for sp in spans if sp.action.kind == "B"]
        window = (last_b[-1].end - last_b[-1].start) if last_b and chunks_per_rank(layout) == 1 else 0.0
        st = stages[r]  # the rest were paid in the schedule:
        after = st.dp_other_s - (m - 1) * st.dp_microbatch_s - m * (st.dp_forward_s + st.dp_backward_s)
        x = exposed_reduction(stages[r].dp_buckets, window, overlap) + after
        exposed.append(x + inside[r])
        finish.append(end + x)
        factors = [scale.get((r, id(sp.action)), 1.0) for sp in spans if sp.action.is_compute]
        shares.append(len(factors) / sum(factors) if factors else 1.0)
    crit = max(range(len(finish)), key=lambda r: finish[r])
    st = stages[crit]
    compute = sum(_compute_part(st, sp.action, scale, crit) for sp in timeline.ranks[crit])
    tp = sum(_tp_part(st, sp.action) for sp in timeline.ranks[crit])
    cp = sum(_cp_part(st, sp.action) for sp in timeline.ranks[crit])
    ep = sum(_ep_part(st, sp.action) for sp in timeline.ranks[crit])
    span = max(sp.end for sp in timeline.ranks[crit]) - t0
    idle = span - compute - tp - cp - ep - inside[crit]  # waiting in the schedule: the bubble and messages
    assert idle >= -1e-9 * span, f"rank {crit} busy {compute + tp} s in a {span} s schedule"
    time = StepTime(
        compute=compute, tp_comm=tp + max(s.tp_sync_s for s in stages), pp_comm=max(s.pp_sync_s for s in stages),
        bubble=max(0.0, idle), dp_comm=exposed[crit], optimizer=max(s.optimizer_s for s in stages) * static,
        cp_comm=cp, ep_comm=ep)
    heavy = max(stages, key=lambda c: c.peak_bytes)
    est = make_estimate(model, layout, hw, global_batch, seq_len, precision, options, time, timeline.bubble,
                        heavy, stages)
    est = replace(est, state=analytic.state, capacity_bytes=analytic.capacity_bytes)
    return Simulation(est, timeline, stages, tuple(finish), tuple(exposed), tuple(shares))


def _compute_part(st: StageCost, a: Action, scale: dict[tuple[int, int], float], r: int) -> float:
    if a.kind == "F":
        return st.chunks[a.chunk].forward_s * scale.get((r, id(a)), 1.0)
    if a.kind == "B":
        return st.chunks[a.chunk].backward_s * scale.get((r, id(a)), 1.0)
    if a.kind in ("I", "W"):  # the split backward: W the linears' dL/dW matmuls, I the rest of B
        c = st.chunks[a.chunk]
        w = c.weight_s if 0 < c.weight_s < c.backward_s else c.backward_s / 2
        return (w if a.kind == "W" else c.backward_s - w) * scale.get((r, id(a)), 1.0)
    return 0.0


def _dp_part(st: StageCost, a: Action, scale: dict[tuple[int, int], float], r: int, m: int) -> float:
    """The dp collectives the runtime waits for inside a pass when nothing hides them, the
    chunk's share by parameters, on the cores like compute (gloo moves and sums the bytes on CPU
    threads, so sharing cores slows it alike): ZeRO-2's reduction of a micro-batch's gradients
    (all but the last) in the action completing them (its B, or W of a split backward); ZeRO-3's
    per-micro-batch gathers in each F, its gathers and reductions in each B (half in I, half in W)."""
    per_pass = {"F": st.dp_forward_s, "B": st.dp_backward_s, "I": st.dp_backward_s / 2,
                "W": st.dp_backward_s / 2}.get(a.kind, 0.0)
    if st.dp_microbatch_s and a.kind in ("B", "W") and a.microbatch < m - 1:
        per_pass += st.dp_microbatch_s
    if not per_pass:
        return 0.0
    total = sum(c.params for c in st.chunks)
    share = st.chunks[a.chunk].params / total if total else 1.0 / len(st.chunks)
    return per_pass * share * scale.get((r, id(a)), 1.0)


def _cp_part(st: StageCost, a: Action) -> float:
    if a.kind in ("F", "B", "I"):  # ring attention's backward yields input gradients: in I
        ring = st.chunks[a.chunk].ring
        return ring.forward_s if a.kind == "F" else ring.backward_s
    return 0.0


def _ep_part(st: StageCost, a: Action) -> float:
    if a.kind in ("F", "B", "I"):  # the exchanges of the rows' gradients yield input gradients: in I
        ex = st.chunks[a.chunk].ep
        return ex.forward_s if a.kind == "F" else ex.backward_s
    return 0.0


def _tp_part(st: StageCost, a: Action) -> float:
    if a.kind == "F":
        return st.chunks[a.chunk].tp_forward_s
    if a.kind in ("B", "I"):  # the tp collectives of a split backward are all in I (dL/dx)
        return st.chunks[a.chunk].tp_backward_s
    return 0.0
