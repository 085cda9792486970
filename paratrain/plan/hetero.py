"""Heterogeneous devices: size pipeline stages and data-parallel batch shares to device speed,
and predict the gain over an even split. Pure Python (no torch).

``speeds[r]`` is the relative compute speed of the device of global rank r (mesh order
``r = (pp_i * dp + dp_i) * tp + tp_i``); it scales compute and the optimizer step, not links.

* A tensor-parallel group computes in lockstep, so it runs at its slowest member: the speed of
  pipeline rank i of replica d is ``w[i][d] = min_tp speeds``.
* **Stages.** Every replica uses the same partition (data parallelism reduces the same
  parameters), sized to ``w_i = min_d w[i][d]`` by the runtime's speed-aware partition
  (:func:`paratrain.core.partition.stage_sizes` with ``stage_speeds``, what
  ``paratrain train --stage-speeds`` runs): a 2x faster stage gets about 2x the layers.
* **Batch shares** (a planner-side prediction: the runtime gives every replica B/dp). Replica d
  gets ``B_d`` proportional to its throughput ``B_d / T_d(B_d)``, found by fixed-point iteration
  (two rounds from an even split), so that the replicas finish together.
* The **even split** is the same devices with the partition balanced for equal speeds and B/dp
  per replica; the **gain** is its step time over the speed-aware one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from paratrain.config import Layout
from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig
from paratrain.plan.cost import CostOptions, Estimate, chunks_per_rank, estimate, pipeline_shape
from paratrain.plan.hardware import Hardware

if TYPE_CHECKING:  # the event simulation is imported where it runs: plan and estimate start without it
    from paratrain.plan.simulate import Simulation

SHARE_ROUNDS = 2


@dataclass(frozen=True)
class SpeedPlan:
    """The speed-aware and the even split of one layout on devices of the given speeds."""

    layout: Layout  # with the speed-aware stage_speeds
    speeds: tuple[float, ...]
    stage_speeds: tuple[float, ...]
    stage_layers: tuple[int, ...]
    even_layers: tuple[int, ...]
    batch_shares: tuple[float, ...]  # sequences per data-parallel replica
    aware: tuple[Any, ...]  # per replica: Estimate or Simulation
    even: tuple[Any, ...]

    @property
    def aware_step_s(self) -> float:
        return max(x.step_time_s for x in self.aware)

    @property
    def even_step_s(self) -> float:
        return max(x.step_time_s for x in self.even)

    @property
    def gain(self) -> float:
        """Speed-up of the speed-aware split over the even one (1.0 = none)."""
        return self.even_step_s / self.aware_step_s

    @property
    def slowest(self) -> Any:
        """The speed-aware replica that finishes last (its prediction is the step's)."""
        return max(self.aware, key=lambda x: x.step_time_s)

    def to_dict(self) -> dict[str, Any]:
        return {"speeds": list(self.speeds), "stage_speeds": list(self.stage_speeds),
                "stage_layers": list(self.stage_layers), "even_stage_layers": list(self.even_layers),
                "batch_shares": list(self.batch_shares), "step_time_s": self.aware_step_s,
                "even_split_step_time_s": self.even_step_s, "gain": self.gain}


def replica_speeds(layout: Layout, speeds: tuple[float, ...]) -> list[tuple[float, ...]]:
    """``w[d]``: per data-parallel replica d, the speed of each pipeline rank (min over cp and tp)."""
    if len(speeds) != layout.world_size or not all(x > 0 for x in speeds):
        raise ConfigError(f"--device-speeds needs one positive speed per device: {layout.world_size} for "
                          f"[{layout}], got {len(speeds)}.")
    dp, pp, tp, cp = layout.dp, layout.pp, layout.tp, layout.cp
    return [tuple(min(speeds[((i * dp + d) * cp + c) * tp + t] for c in range(cp) for t in range(tp))
                  for i in range(pp)) for d in range(dp)]


def with_speeds(model: ModelConfig, layout: Layout, hw: Hardware, global_batch: int, seq_len: int,
                precision: str, options: CostOptions, speeds: tuple[float, ...],
                simulate: bool = False) -> SpeedPlan:
    """Predict ``layout`` on devices of ``speeds``: speed-aware stages and batch shares vs even."""
    layout.validate(model, global_batch, seq_len)
    w = replica_speeds(layout, speeds)
    stage_speeds = tuple(min(col) for col in zip(*w))
    aware_layout = layout
    if layout.pp > 1 and layout.stage_layers is None:
        aware_layout = replace(layout, stage_speeds=stage_speeds)
    even_layout = replace(layout, stage_speeds=None)

    def run(lay: Layout, rank_speeds: tuple[float, ...], batch: float) -> Estimate | Simulation:
        opts = replace(options, rank_speeds=rank_speeds, local_batch=batch)
        if simulate:
            from paratrain.plan.simulate import simulate_step

            return simulate_step(model, lay, hw, global_batch, seq_len, precision, opts)
        return estimate(model, lay, hw, global_batch, seq_len, precision, opts)

    distinct = sorted(set(w))  # alike replicas are predicted once
    shares = [global_batch / layout.dp] * layout.dp
    even = {ws: run(even_layout, ws, shares[0]) for ws in distinct}
    for _ in range(SHARE_ROUNDS if layout.dp > 1 else 0):
        got = {ws: run(aware_layout, ws, shares[w.index(ws)]) for ws in distinct}
        rates = [shares[d] / got[w[d]].step_time_s for d in range(layout.dp)]
        shares = [global_batch * r / sum(rates) for r in rates]
    aware = {ws: run(aware_layout, ws, shares[w.index(ws)]) for ws in distinct}

    def chunks(lay: Layout) -> tuple[int, ...]:
        return pipeline_shape(model, seq_len, lay.pp, chunks_per_rank(lay), lay.stage_layers, lay.stage_speeds).chunks

    return SpeedPlan(aware_layout, tuple(speeds), stage_speeds, chunks(aware_layout), chunks(even_layout),
                     tuple(shares), tuple(aware[x] for x in w), tuple(even[x] for x in w))


def speed_report(plan: SpeedPlan) -> str:
    """What ``--device-speeds`` adds to the output of estimate / plan / simulate."""
    def fmt(xs: tuple[float, ...]) -> str:
        return ",".join(f"{x:.3g}" for x in xs)

    lines = [f"device speeds {fmt(plan.speeds)} (relative compute speed per device, rank order)"]
    if plan.layout.pp > 1:
        lines.append(f"  pipeline stages sized to speed: stage speeds {fmt(plan.stage_speeds)} "
                     f"-> layers {','.join(map(str, plan.stage_layers))} (even split: "
                     f"{','.join(map(str, plan.even_layers))})")
    if plan.layout.dp > 1:
        lines.append("  data-parallel batch shares proportional to replica speed: "
                     + ", ".join(f"{b:.2f}" for b in plan.batch_shares)
                     + f" sequences (even split: {sum(plan.batch_shares) / len(plan.batch_shares):.2f} each; a "
                     "planner-side prediction: paratrain train splits evenly)")
    lines.append(f"  predicted step time {plan.aware_step_s:.4g} s vs {plan.even_step_s:.4g} s with an even split: "
                 f"{plan.gain:.2f}x ({plan.gain - 1:+.1%})")
    return "\n".join(lines)
