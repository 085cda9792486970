"""The small public API for a model of your own (``from paratrain import ...``)::

    init()                                                     # joins torchrun's job, if any
    mesh = build_mesh(layout)                                  # this rank's dp/pp/tp groups
    pm = parallelize(model, mesh, layout, tp_plan=..., stages=...)
    opt = pm.shard_optimizer(torch.optim.AdamW(pm.parameters(), lr=1e-3))
    out = train_step(pm, opt, inputs, targets, grad_clip=1.0)  # {"loss": ..., "grad_norm": ...}
    save_checkpoint("ckpt", pm, opt, step=1)                   # sharded: each rank writes its own
    step = load_checkpoint("ckpt/step-1", pm, opt)             # into any layout
    finish()                                                   # the last call of every rank

Every rank calls each of them (they are collective).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from paratrain.config import Layout
from paratrain.mesh import Mesh, MeshShape
from paratrain.parallel.model import ParallelModel


def init(timeout_s: float = 120.0) -> int:
    """Join the job this process belongs to (under ``torchrun``: its environment; gloo on CPU,
    NCCL on CUDA), or nothing for a single process. Returns the world size."""
    from paratrain.launch import RankEnv, init_distributed

    env = RankEnv.from_env()
    if env.world_size > 1 and not dist.is_initialized():
        init_distributed(env, "cuda" if torch.cuda.is_available() else "cpu", timeout_s)
    return env.world_size


def finish(code: int = 0) -> None:
    """End this rank: wait for the others, destroy the groups, and leave without interpreter
    finalisation (gloo's threads can abort it: ``paratrain/rank.py``). Call it last."""
    from paratrain.launch import shutdown_distributed
    from paratrain.rank import end_process

    shutdown_distributed(code == 0)
    end_process(code)


def build_mesh(layout: Layout, rank: int | None = None, timeout_s: float | None = None) -> Mesh:
    """This rank's :class:`Mesh` for ``layout`` (its coordinates and its dp / pp / tp groups).
    ``rank``: default the process group's rank (0 without one). The world size must be
    ``layout.world_size``."""
    layout.check_degrees()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != layout.world_size:
        raise ValueError(f"the layout {layout} needs {layout.world_size} processes; {world} are running")
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    return Mesh.build(MeshShape(layout.dp, layout.pp, layout.tp), rank, timeout_s)


def train_step(pm: ParallelModel, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, grad_clip: float = 1.0) -> dict[str, float]:
    """One optimizer step on this dp rank's rows of the global batch: forward and backward (over
    the layout's micro-batches, through the pipeline schedule), gradients reduced over dp, the
    global gradient norm clipped to ``grad_clip`` (0: not clipped), the optimizer stepped, the
    gradients zeroed. Returns the mean loss over the global batch and the pre-clip norm (the same
    on every rank). ``inputs`` / ``targets``: (B / dp, T) token ids."""
    local = pm.forward_backward(inputs, targets)
    norm = float(pm.clip_grad_norm_(grad_clip if grad_clip > 0 else float("inf")))
    loss = pm.global_mean(local).item()
    optimizer.step()
    pm.zero_grad()
    return {"loss": loss, "grad_norm": norm}


def _session(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> Any:
    """What ``checkpoint.session`` reads from a training session."""
    from types import SimpleNamespace

    device = next(iter(pm.parameters())).device
    return SimpleNamespace(pm=pm, opt=optimizer, mesh=pm.mesh, device=device,
                           cfg=SimpleNamespace(layout=pm.layout))


def save_checkpoint(root: str | Path, pm: ParallelModel, optimizer: torch.optim.Optimizer, step: int,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``root/step-<step>``: each rank its own shards (safetensors) of the parameters and
    the optimizer state, rank 0 the manifest; atomic and checksummed. Returns the folder."""
    from paratrain.checkpoint.session import save
    from paratrain.checkpoint.store import CheckpointSaver, step_dir

    barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
    saver = CheckpointSaver(Path(root), pm.mesh.rank, pm.mesh.shape.world_size, barrier, asynchronous=False)
    save(saver, _session(pm, optimizer), step, dict(meta or {}))
    return step_dir(Path(root), step)


def load_checkpoint(folder: str | Path, pm: ParallelModel, optimizer: torch.optim.Optimizer) -> int:
    """Fill ``pm`` and ``optimizer`` from a checkpoint folder saved under any layout (each rank
    reads only the slices it holds); returns the step it was saved after."""
    from paratrain.checkpoint import manifest as mf
    from paratrain.checkpoint.session import load

    m = mf.read(Path(folder))
    load(_session(pm, optimizer), Path(folder), m)
    return m.step
