"""The planner for runs on this machine: which device profile, which cost options describe the
runtime, what a :class:`~paratrain.config.TrainConfig` will cost. Pure Python (no torch).

Used by ``paratrain train --plan auto`` (search, then train with the winner, then compare) and
by ``benchmarks/validate_planner.py`` (predicted vs measured on real runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratrain.config import Layout, TrainConfig, runtime_implements
from paratrain.plan.cost import CostOptions
from paratrain.plan.hardware import Hardware, default_profile_path, get_hardware, load_profile
from paratrain.plan.simulate import Simulation, simulate_step


def local_hardware(nproc: int, profile: str | Path | None = None) -> tuple[Hardware, str]:
    """This machine as the planner sees it, and where the figures come from: the calibrated
    profile (``profile``, else ``paratrain calibrate``'s default path) if there is one, else the
    catalog's nominal ``cpu`` with this machine's core count. All ``nproc`` processes run on this
    node, sharing its cores."""
    path = Path(profile).expanduser() if profile else default_profile_path()
    if path.is_file():
        hw, source = load_profile(path), f"calibrated profile {path}"
    else:
        hw = get_hardware("cpu").replace(cores_per_node=os.cpu_count() or 1)
        source = f"catalog device 'cpu' (nominal figures: no profile at {path}; run `paratrain calibrate`)"
    node = max(hw.devices_per_node, nproc)
    # a profile's memory is a 1/cores share of the RAM: nproc > cores processes share it too
    return hw.replace(devices_per_node=node, memory_bytes=hw.memory_bytes * hw.devices_per_node / node), source


def runtime_options(cfg: TrainConfig) -> CostOptions:
    """Cost options that describe how ``paratrain train`` runs ``cfg``: dropout masks only when
    dropout > 0; PyTorch's fused attention; SP saving input slices (re-gathered in backward); its
    bucket size and overlap setting."""
    return CostOptions(dropout=cfg.dropout > 0, store_scores=False, sp_saves_gathered=None,
                       bucket_bytes=cfg.bucket_mb * 2**20, overlap_dp=cfg.overlap,
                       grad_bytes=4 if cfg.grad_dtype == "fp32" else None,
                       offload_optimizer=cfg.offload_optimizer, zero3_gather=cfg.zero3_gather)


@dataclass(frozen=True)
class RunPrediction:
    """What the planner predicts for one run: the simulated step and, per global rank, the
    bytes ``--measure-memory`` measures (params, grads, optimizer, activations)."""

    simulation: Simulation
    memory_per_rank: tuple[dict[str, float], ...]
    hardware: str
    source: str

    @property
    def step_time_s(self) -> float:
        return self.simulation.step_time_s

    def to_dict(self) -> dict[str, Any]:
        """The ``predicted`` object of ``summary.json``."""
        sim = self.simulation
        return {"step_time_s": sim.step_time_s, "bubble": sim.bubble, "hardware": self.hardware,
                "source": self.source, "memory_per_rank": [dict(m) for m in self.memory_per_rank],
                "step_time_breakdown_s": sim.estimate.to_dict()["step_time_breakdown_s"]}


def predict_run(cfg: TrainConfig, hw: Hardware, source: str = "") -> RunPrediction:
    """Simulate ``cfg``'s step on ``hw`` and predict every rank's memory."""
    model = cfg.model_config()
    layout = cfg.layout
    sim = simulate_step(model, layout, hw, cfg.global_batch, cfg.seq_len, cfg.precision, runtime_options(cfg))
    per_stage = [{"params": st.state.params, "grads": st.state.grads, "optimizer": st.state.optimizer,
                  "activations": st.activation_bytes} for st in sim.stages]
    ranks = tuple(per_stage[r // (layout.dp * layout.cp * layout.tp)] for r in range(layout.world_size))
    return RunPrediction(sim, ranks, hw.name, source)


@dataclass(frozen=True)
class AutoPlan:
    """``paratrain train --plan auto``'s choice: the layout, its prediction, and why."""

    layout: Layout
    prediction: RunPrediction
    considered: int
    explanation: str
    candidates: tuple[tuple[Layout, float], ...]  # the simulated shortlist: (layout, step seconds)


def auto_layout(cfg: TrainConfig, nproc: int, hw: Hardware, source: str, fixed: dict[str, Any] | None = None,
                shortlist: int = 8) -> AutoPlan:
    """The fastest layout of ``nproc`` local processes for ``cfg``'s model and batch that the
    runtime implements and that fits: every layout is estimated (``plan.search``, pinned by
    ``fixed``), the ``shortlist`` fastest that fit are simulated on the real schedule, and the
    fastest simulated one wins."""
    from paratrain.plan.search import search

    model = cfg.model_config()
    result = search(model, nproc, hw, cfg.global_batch, cfg.seq_len, cfg.precision, runtime_options(cfg),
                    fixed=fixed, keep=lambda lay: runtime_implements(lay, model), top=shortlist)
    if not result.ranked:
        from paratrain.errors import ConfigError

        raise ConfigError(f"no layout of {nproc} processes that the runtime implements fits {cfg.model} with "
                          f"global batch {cfg.global_batch} on {hw.name} ({result.considered} considered); use "
                          f"another --nproc, --global-batch or --seq-len, or fewer pinned layout flags.")
    sims = [predict_run(cfg.replace(layout=est.layout, nproc=nproc), hw, source) for est in result.ranked[:shortlist]]
    fastest = min(p.step_time_s for p in sims)
    # predictions within 1% tie; then the simplest layout wins (fewer micro-batches, chunks and
    # recomputation: each costs a little the model does not see, e.g. smaller matmuls)
    ties = [p for p in sims if p.step_time_s <= fastest * (1 + TIE)]
    pred = min(ties, key=lambda p: _complexity(p.simulation.estimate.layout))
    layout = pred.simulation.estimate.layout
    why = result.explain()
    if layout != result.best.layout:  # the choice first; the estimate's own first only as its ranking
        best = f"[{result.best.layout}] wins at"
        how = f"the simplest of the {len(ties)} within {TIE:.0%} of the fastest" if len(ties) > 1 else "the fastest"
        why = (f"Chosen [{layout}]: simulated on the real schedule, the {len(sims)} fastest estimates give it "
               f"{pred.step_time_s * 1e3:.1f} ms, {how}. " + why.replace(best, f"By the estimate alone {best}", 1))
    ranked = sorted(sims, key=lambda p: p.step_time_s)
    return AutoPlan(layout, pred, result.considered, why,
                    tuple((p.simulation.estimate.layout, p.step_time_s) for p in ranked))


TIE = 0.01


def _complexity(layout: Layout) -> tuple[int, ...]:
    return (layout.pp * layout.tp, layout.zero, layout.microbatches, layout.virtual_stages,
            ("none", "selective", "full").index(layout.recompute), int(layout.sequence_parallel))
