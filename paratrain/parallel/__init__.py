"""``parallelize`` applies a layout to the reference model, as transforms in a fixed order:
tensor parallelism (shard each layer), then context parallelism (ring attention, global
positions), then pipeline parallelism (keep this stage's layers), then expert parallelism (this
rank's experts of them), then data parallelism / ZeRO (reduce gradients over the dp group -- over dp x cp
under context parallelism; the experts' over edp). Each transform receives only the group it uses.

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
    from paratrain.models.plans import Stages, TPPlan
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


def parallelize(model: nn.Module, mesh: Mesh, layout: Layout, *, tp_plan: TPPlan | None = None,
                stages: Stages | None = None, bucket_mb: float = 25.0, dp_impl: str = "bucketed",
                overlap: bool = True, autocast_dtype: torch.dtype | None = None,
                seq_len: int | None = None, master_weights: bool = False,
                grad_dtype: torch.dtype | None = None, offload_optimizer: bool = False,
                zero3_gather: str = "microbatch") -> ParallelModel:
    """Turn the reference ``model`` (identical on every rank) into this rank's share of it.

    ``model``: the built-in GPT (its plan and stages are built in), or any ``nn.Module``: with
    ``stages`` (:class:`~paratrain.models.plans.Stages`) the step runs ``stages.loss``, without
    them ``model(inputs, targets)`` must return the mean loss. ``tp_plan`` (module-name patterns
    -> styles, :mod:`paratrain.models.plans`) is needed for tp > 1, ``stages`` for pp > 1.
    ``seq_len`` (default: the model's maximum) sizes the attention cost of the pipeline partition.
    ``master_weights``: the model is bf16 and the optimizer steps fp32 master copies
    (``parallel/mixed.py``; in host memory with ``offload_optimizer``), the gradients reduced in
    ``grad_dtype`` (default: the parameters'). ``zero3_gather``: ZeRO-3 inside a pipeline gathers
    each unit per micro-batch or once per step (``parallel/zero3_pipeline.py``)."""
    from paratrain.models.gpt import GPT
    from paratrain.models.plans import StagedForward, gpt_stages
    from paratrain.parallel.data import DataParallel, NaiveDataParallel
    from paratrain.parallel.model import GradSync, ParallelModel
    from paratrain.parallel.recompute import apply_recompute
    from paratrain.parallel.tensor import SequenceParallelGradSync

    gpt = isinstance(model, GPT)
    if gpt and stages is None:
        stages = gpt_stages(model.cfg)
    runner = model if gpt or stages is None else StagedForward(model, stages)
    _check_given(model, layout, gpt, tp_plan, stages)
    if layout.tp > 1:  # tensor parallelism: parallel/tensor.py, parallel/tp_plan.py
        # (at tp = 1 it would compute the same model, but its vocab-parallel loss rounds
        # differently from F.cross_entropy; data parallelism alone keeps the reference's arithmetic)
        if gpt and tp_plan is None:
            from paratrain.parallel.rng import ShardedRNG
            from paratrain.parallel.tensor import tensor_parallel

            rng = ShardedRNG(mesh.coords.tp, next(model.parameters()).device)
            model = tensor_parallel(model, mesh.tp, rng, layout.sequence_parallel)
        else:
            from paratrain.parallel.tp_plan import apply_tp_plan

            apply_tp_plan(model, tp_plan, mesh.tp, layout.sequence_parallel)  # type: ignore[arg-type]
        if layout.sequence_parallel and not sp_regathers(layout):
            from paratrain.parallel.tensor import ColumnParallelLinear

            for m in model.modules():
                if isinstance(m, ColumnParallelLinear):
                    m.regather = False
    if layout.cp > 1:  # context parallelism: parallel/context.py (splits no parameter)
        if not gpt:
            raise ValueError("context parallelism (cp > 1) is implemented for the built-in GPT only")
        from paratrain.parallel.context import context_parallel

        model = context_parallel(model, mesh.cp)
    if gpt:
        apply_recompute(model, layout.recompute)
    elif layout.recompute == "full":  # any model with a stage spec: each of its blocks replayed
        from paratrain.parallel.recompute import recompute_blocks

        recompute_blocks(stages.block_list(model))  # type: ignore[union-attr]
    stage = None
    if layout.pp > 1:  # pipeline parallelism: parallel/pipeline/ (prunes the model in place)
        from paratrain.parallel.pipeline.stage import build_stage

        assert stages is not None
        stage = build_stage(model, mesh, layout, seq_len or getattr(stages.config, "max_seq_len", 0), stages)
    experts: list[torch.Tensor] = []
    if layout.ep > 1:  # expert parallelism: parallel/expert.py (this rank's experts, all-to-all; after
        # the pipeline cut, so the stage's state-dict entries name every expert of its blocks)
        from paratrain.parallel.expert import expert_parallel

        experts = expert_parallel(model, mesh.ep)
    sync: GradSync
    weights: list[torch.Tensor] = []
    if layout.zero == 3 and stage is not None:  # ZeRO-3 in a pipeline: parallel/zero3_pipeline.py
        from paratrain.parallel.zero3_pipeline import PipelineZero3, zero3_per_microbatch

        assert not experts, "expert_rules.expert_refusal refuses ZeRO-3 with a pipeline for a mixture of experts"
        if zero3_gather == "step":  # over dp x cp: the cp ranks replicate the parameters too
            tied = [stage.tied_param] if stage.tied_param is not None else []
            sync = PipelineZero3(model, mesh.dpcp, bucket_mb, overlap, parts=_distinct_parts([c.parameters() for c in
                                 stage.chunks]), alone=tied, grad_dtype=grad_dtype, axes=_zero_axes(layout))
        else:
            sync = zero3_per_microbatch(model, mesh.dpcp, stage, stages, bucket_mb, overlap, grad_dtype,
                                        axes=_zero_axes(layout))
        weights = [b.flat for b in sync.buckets]
    elif layout.zero == 3:  # ZeRO-3: parameters sharded too, gathered per block (parallel/zero3.py)
        from paratrain.parallel.zero3 import zero3

        blocks = list(stages.block_list(model)) if stages is not None else []
        axes = ("dp", "ep", "edp") if experts else _zero_axes(layout)
        sync = zero3(model, mesh.dpcp, bucket_mb=bucket_mb, overlap=overlap, blocks=blocks, runner=runner,
                     grad_dtype=grad_dtype, axes=axes, skip=experts)
        weights = [b.flat for b in sync.buckets]  # the gathered units: see ParallelModel.register_weights
        if experts:  # each local expert its own unit, sharded over the dp / ep ranks holding it
            from paratrain.parallel.expert import ExpertGradSync, local_experts
            from paratrain.parallel.zero3 import unit_per_module

            inner = unit_per_module(model, local_experts(model), mesh.edp, bucket_mb, overlap, grad_dtype, axes)
            sync = ExpertGradSync(sync, inner)  # type: ignore[arg-type]
            weights += [b.flat for b in inner.buckets]
    elif layout.zero:  # ZeRO-1/2: parallel/zero.py
        from paratrain.parallel.zero import ZeroDataParallel

        tied = [stage.tied_param] if stage is not None and stage.tied_param is not None else []
        chunks = _distinct_parts([c.parameters() for c in stage.chunks]) if stage is not None else None
        if experts:  # the experts' sharded over the dp / ep ranks holding them (parallel/expert.py)
            from paratrain.parallel.expert import expert_sync

            sync = expert_sync(model, ZeroDataParallel, mesh.dp, mesh.edp, experts, stage=layout.zero,
                               bucket_mb=bucket_mb, overlap=overlap, parts=chunks, alone=tied, grad_dtype=grad_dtype)
        else:  # over dp x cp: the cp ranks replicate the parameters too (the dp group when cp = 1)
            sync = ZeroDataParallel(model, mesh.dpcp, layout.zero, bucket_mb, overlap, parts=chunks, alone=tied,
                                    grad_dtype=grad_dtype, axes=_zero_axes(layout))
    elif experts:  # the experts' gradients over the dp / ep ranks holding them, the rest over dp
        from paratrain.parallel.expert import expert_sync

        sync = expert_sync(model, DataParallel, mesh.dp, mesh.edp, experts, bucket_mb=bucket_mb, overlap=overlap,
                           grad_dtype=grad_dtype)
    elif dp_impl == "naive":
        sync = NaiveDataParallel(model, mesh.dpcp)
    else:  # dpcp: the dp group itself when cp = 1
        sync = DataParallel(model, mesh.dpcp, bucket_mb=bucket_mb, overlap=overlap, grad_dtype=grad_dtype)
    if master_weights:  # fp32 masters: the tensors the norm, the clip and the optimizer see
        from paratrain.parallel.mixed import MixedPrecision

        sync = MixedPrecision(sync, offload=offload_optimizer)
    from paratrain.parallel.marks import has_partial_grad

    partial = [p for p in sync.grad_params if has_partial_grad(p)]
    if partial:  # sequence parallelism: summed over tp, after dp
        sync = SequenceParallelGradSync(sync, partial, mesh.tp)
    # ranks of these groups hold different parameters (ZeRO: different shards over dp)
    # (ZeRO: every dp x cp rank owns its pieces, the experts' included, so dpcp replaces ep)
    norm_groups = [mesh.tp, mesh.pp] + ([mesh.dpcp] if layout.zero else [mesh.ep])
    pm: ParallelModel
    if stage is not None:
        from paratrain.parallel.pipeline.model import PipelineModel

        pm = PipelineModel(stage, mesh, layout, sync, norm_groups, autocast_dtype)
    else:
        pm = ParallelModel(model, mesh, layout, sync, norm_groups, autocast_dtype, runner)
    pm.register_weights(weights)
    return pm


def _zero_axes(layout: Layout) -> tuple[str, ...]:
    """The mesh axes along which ZeRO's pieces differ: dp, and under context parallelism cp and
    their product group dpcp (ZeRO shards over dp x cp, the ranks that replicate the parameters)."""
    return ("dp", "cp", "dpcp") if layout.cp > 1 else ("dp",)


def sp_regathers(layout: Layout) -> bool:
    """Whether sequence-parallel column linears keep only their input's slice for backward and
    all-gather it again there (``tp_ops.GatheredLinearSP``). Not under full recomputation (the
    block's forward, gathers included, is replayed anyway) nor zero-bubble schedules (their
    deferred W keeps each linear's whole input until it runs)."""
    return layout.recompute != "full" and not (layout.pp > 1 and layout.schedule in ("zb-h1", "zb-v"))


def _distinct_parts(parts: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each parameter in the first part that has it: ZB-V's rank 0 runs the embedding and the
    head, which share the tied embedding."""
    seen: set[int] = set()
    out = []
    for part in parts:
        out.append([p for p in part if id(p) not in seen])
        seen.update(id(p) for p in part)
    return out


def _check_given(model: nn.Module, layout: Layout, gpt: bool, tp_plan: TPPlan | None,
                 stages: Stages | None) -> None:
    """What a model other than the built-in GPT must come with for this layout."""
    name = type(model).__name__
    if layout.tp > 1 and tp_plan is None and not gpt:
        raise ValueError(f"tp={layout.tp} needs a tensor-parallel plan for {name}: "
                         "parallelize(..., tp_plan={'pattern': 'column' | 'row' | ...}); see paratrain.models.plans")
    if layout.pp > 1 and stages is None:
        raise ValueError(f"pp={layout.pp} needs the stage spec of {name}: parallelize(..., stages=Stages(blocks="
                         "'name of its nn.ModuleList', before=..., after=...)); see paratrain.models.plans")
    if layout.recompute == "full" and stages is None and not gpt:
        raise ValueError(f"recompute='full' replays each block of {name} in backward: it needs the stage spec "
                         "naming the blocks, parallelize(..., stages=Stages(blocks=...)); see paratrain.models.plans")
    if layout.recompute not in ("none", "full") and not gpt:
        raise ValueError(f"recompute={layout.recompute!r} replays the built-in GPT's attention core only; for "
                         f"{name} valid: 'full' (with a stage spec) or 'none'")
