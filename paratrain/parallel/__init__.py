"""``parallelize`` applies a layout to the reference model, as transforms in a fixed order:
tensor parallelism (shard each layer), then pipeline parallelism (keep this stage's layers), then
data parallelism / ZeRO (reduce gradients over the dp group). Each transform receives only the
group it uses."""

from __future__ import annotations

import torch
from torch import nn

from paratrain.config import Layout
from paratrain.mesh import Mesh
from paratrain.parallel.data import DataParallel, NaiveDataParallel
from paratrain.parallel.model import ParallelModel
from paratrain.parallel.recompute import apply_recompute
from paratrain.parallel.rng import ShardedRNG
from paratrain.parallel.shard import partial_grad_params
from paratrain.parallel.tensor import SequenceParallelGradSync, tensor_parallel

__all__ = ["ParallelModel", "parallelize", "DataParallel", "NaiveDataParallel"]


def parallelize(model: nn.Module, mesh: Mesh, layout: Layout, *, bucket_mb: float = 25.0,
                dp_impl: str = "bucketed", overlap: bool = True,
                autocast_dtype: torch.dtype | None = None) -> ParallelModel:
    """Turn the reference ``model`` (identical on every rank) into this rank's share of it."""
    if layout.pp > 1 or layout.zero > 0:
        raise NotImplementedError("pipeline parallelism and ZeRO are not implemented in the runtime so far")
    if layout.tp > 1:  # tensor parallelism: parallel/tensor.py
        # (at tp = 1 it would compute the same model, but its vocab-parallel loss rounds
        # differently from F.cross_entropy; data parallelism alone keeps the reference's arithmetic)
        rng = ShardedRNG(mesh.coords.tp, next(model.parameters()).device)
        model = tensor_parallel(model, mesh.tp, rng, layout.sequence_parallel)
    apply_recompute(model, layout.recompute)
    if dp_impl == "naive":
        sync = NaiveDataParallel(model, mesh.dp)
    else:
        sync = DataParallel(model, mesh.dp, bucket_mb=bucket_mb, overlap=overlap)
    if partial := partial_grad_params(model):  # sequence parallelism: summed over tp, after dp
        sync = SequenceParallelGradSync(sync, partial, mesh.tp)
    norm_groups = [mesh.tp, mesh.pp]  # ranks of these groups hold different parameters
    return ParallelModel(model, mesh, layout, sync, norm_groups, autocast_dtype)
