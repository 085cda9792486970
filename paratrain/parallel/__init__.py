"""``parallelize`` applies a layout to the reference model, as transforms in a fixed order:
tensor parallelism (shard each layer), then pipeline parallelism (keep this stage's layers), then
data parallelism / ZeRO (reduce gradients over the dp group). Each transform receives only the
group it uses.

Importing this package does not import torch; the classes load on first use. The torch-free
parts it shares with the planner (schedules, checker, partition, traffic formulas) live in
:mod:`paratrain.core`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from paratrain.config import Layout
    from paratrain.mesh import Mesh
    from paratrain.parallel.model import ParallelModel

__all__ = ["ParallelModel", "parallelize", "DataParallel", "NaiveDataParallel", "PipelineModel"]

_LAZY = {
    "ParallelModel": "paratrain.parallel.model",
    "DataParallel": "paratrain.parallel.data",
    "NaiveDataParallel": "paratrain.parallel.data",
    "PipelineModel": "paratrain.parallel.pipeline.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paratrain.parallel' has no attribute {name!r}")


def parallelize(model: nn.Module, mesh: Mesh, layout: Layout, *, bucket_mb: float = 25.0,
                dp_impl: str = "bucketed", overlap: bool = True,
                autocast_dtype: torch.dtype | None = None, seq_len: int | None = None) -> ParallelModel:
    """Turn the reference ``model`` (identical on every rank) into this rank's share of it.
    ``seq_len`` (default: the model's maximum) sizes the attention cost of the pipeline partition."""
    from paratrain.parallel.data import DataParallel, NaiveDataParallel
    from paratrain.parallel.model import GradSync, ParallelModel
    from paratrain.parallel.recompute import apply_recompute
    from paratrain.parallel.tensor import SequenceParallelGradSync

    if layout.tp > 1:  # tensor parallelism: parallel/tensor.py
        # (at tp = 1 it would compute the same model, but its vocab-parallel loss rounds
        # differently from F.cross_entropy; data parallelism alone keeps the reference's arithmetic)
        from paratrain.parallel.rng import ShardedRNG
        from paratrain.parallel.tensor import tensor_parallel

        rng = ShardedRNG(mesh.coords.tp, next(model.parameters()).device)
        model = tensor_parallel(model, mesh.tp, rng, layout.sequence_parallel)
    apply_recompute(model, layout.recompute)
    stage = None
    if layout.pp > 1:  # pipeline parallelism: parallel/pipeline/ (prunes the model in place)
        from paratrain.parallel.pipeline.stage import build_stage

        stage = build_stage(model, mesh, layout, seq_len or model.cfg.max_seq_len)
    sync: GradSync
    weights: list[torch.Tensor] = []
    if layout.zero == 3:  # ZeRO-3: parameters sharded too, gathered per block (parallel/zero3.py)
        from paratrain.parallel.zero3 import zero3

        sync = zero3(model, mesh.dp, bucket_mb=bucket_mb, overlap=overlap)
        weights = [b.flat for b in sync.buckets]  # the gathered units: see ParallelModel.register_weights
    elif layout.zero:  # ZeRO-1/2: parallel/zero.py
        from paratrain.parallel.zero import ZeroDataParallel

        tied = [stage.tied_param] if stage is not None and stage.tied_param is not None else []
        chunks = _distinct_parts([c.parameters() for c in stage.chunks]) if stage is not None else None
        sync = ZeroDataParallel(model, mesh.dp, layout.zero, bucket_mb, overlap, parts=chunks, alone=tied)
    elif dp_impl == "naive":
        sync = NaiveDataParallel(model, mesh.dp)
    else:
        sync = DataParallel(model, mesh.dp, bucket_mb=bucket_mb, overlap=overlap)
    from paratrain.parallel.marks import has_partial_grad

    partial = [p for p in sync.grad_params if has_partial_grad(p)]
    if partial:  # sequence parallelism: summed over tp, after dp
        sync = SequenceParallelGradSync(sync, partial, mesh.tp)
    # ranks of these groups hold different parameters (ZeRO: different shards over dp)
    norm_groups = [mesh.tp, mesh.pp] + ([mesh.dp] if layout.zero else [])
    pm: ParallelModel
    if stage is not None:
        from paratrain.parallel.pipeline.model import PipelineModel

        pm = PipelineModel(stage, mesh, layout, sync, norm_groups, autocast_dtype)
    else:
        pm = ParallelModel(model, mesh, layout, sync, norm_groups, autocast_dtype)
    pm.register_weights(weights)
    return pm


def _distinct_parts(parts: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each parameter in the first part that has it: ZB-V's rank 0 runs the embedding and the
    head, which share the tied embedding."""
    seen: set[int] = set()
    out = []
    for part in parts:
        out.append([p for p in part if id(p) not in seen])
        seen.update(id(p) for p in part)
    return out
