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

from paratrain.config import SUPPORTED_PP, SUPPORTED_TP, SUPPORTED_ZERO, Layout, TrainConfig
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
    return hw.replace(devices_per_node=max(hw.devices_per_node, nproc)), source


def runtime_options(cfg: TrainConfig) -> CostOptions:
    """Cost options that describe how ``paratrain train`` runs ``cfg``: dropout masks only when
    dropout > 0; PyTorch's fused attention; SP saving all-gathered inputs; its bucket size and
    overlap setting."""
    return CostOptions(dropout=cfg.dropout > 0, store_scores=False, sp_saves_gathered=True,
                       bucket_bytes=cfg.bucket_mb * 2**20, overlap_dp=cfg.overlap)


def runtime_supports(layout: Layout) -> bool:
    """Whether the training runtime implements ``layout`` (config.SUPPORTED_*)."""
    return ((layout.tp == 1 or SUPPORTED_TP) and (layout.pp == 1 or SUPPORTED_PP)
            and (layout.zero == 0 or SUPPORTED_ZERO))


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
    ranks = tuple(per_stage[r // (layout.dp * layout.tp)] for r in range(layout.world_size))
    return RunPrediction(sim, ranks, hw.name, source)
