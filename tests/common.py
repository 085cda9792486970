"""Shared pieces of the multi-process tests: a small config, rank functions, comparisons."""

from __future__ import annotations

from typing import Any

import torch

from paratrain.config import Layout, TrainConfig

# Small enough for a few seconds per layout, large enough to exercise every code path.
BASE = TrainConfig(model="tiny", steps=5, global_batch=8, seq_len=32, lr=3e-3, warmup_steps=2,
                   grad_clip=1.0, eval_every=0, sample_tokens=0, checkpoint=False, progress=False)


def with_layout(cfg: TrainConfig, **layout: Any) -> TrainConfig:
    return cfg.replace(layout=Layout(**layout))


def train_ranks_fn(cfg: TrainConfig) -> dict[str, Any]:
    """Runs on every rank under tests.harness.run_ranks: the production setup and step."""
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
    records = [train_step(s, step) for step in range(1, cfg.steps + 1)]
    timeline = s.pm.gather_timeline() if cfg.layout.pp > 1 else None  # of the last step, on rank 0
    return {
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "comm_bytes": [r["comm_bytes"] for r in records],
        "state": {k: v.detach().clone() for k, v in s.pm.module.state_dict().items()},
        "full_state": s.pm.full_state_dict(),
        "ops": {g.name: g.stats.as_dict() for g in s.mesh.groups if g.size > 1},
        "timeline": timeline.to_json() if timeline is not None else None,
    }


REL_L2 = 2e-4  # per tensor: ||p - p_ref|| / ||p_ref||, see the tolerance notes in each test


def max_param_diff(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest element-wise |state - ref| over all tensors (and where). Also asserts equal names
    and shapes, and that every tensor's relative L2 difference is below REL_L2."""
    assert set(state) == set(ref), f"parameter names differ: {set(state) ^ set(ref)}"
    worst, name = 0.0, ""
    for k, v in ref.items():
        assert state[k].shape == v.shape, f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}"
        delta = state[k].float() - v.float()
        rel = (delta.norm() / v.float().norm().clamp_min(1e-12)).item()
        assert rel <= REL_L2, f"{k}: relative L2 difference {rel:.3g} > {REL_L2}"
        d = delta.abs().max().item()
        if d > worst:
            worst, name = d, k
    return worst, name
