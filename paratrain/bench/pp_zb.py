"""The PyTorch side of the zero-bubble rows of ``paratrain bench --only pp``: its own
``ScheduleInterleavedZeroBubble`` (for our ``zb-h1``: one stage per rank) and
``ScheduleZBVZeroBubble`` (for our ``zb-v``: two stages per rank in the V placement) over the same
split as ours -- our partition and placement, applied to a copy of the reference model."""

from __future__ import annotations

from typing import Any


def torch_zero_bubble(mesh: Any, cfg: Any, batches: list[Any]) -> tuple[Any, Any]:
    """A PyTorch zero-bubble pipeline for ``cfg.layout`` (zb-h1 or zb-v); returns (one repeat
    over ``batches`` as a function, the pruned model whose parameters it trains)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble

    from paratrain.core.schedules import placement_of, stage_of
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel.pipeline.stage import build_stage

    layout = cfg.layout
    p, v, rank = layout.pp, layout.virtual_stages, mesh.coords.pp
    model = build_reference(cfg.model_config(), cfg.seed)
    stage = build_stage(model, mesh, layout, cfg.seq_len)

    class ChunkModule(nn.Module):
        """One chunk as a module: its own submodules registered (so its parameters are its
        own), the chunk's forward; logits on the last stage (PyTorch applies the loss)."""

        def __init__(self, chunk: Any) -> None:
            super().__init__()
            names = (chunk.stages.before if chunk.embeds else ()) + (chunk.stages.after if chunk.has_head else ())
            self.parts = nn.ModuleList([chunk.model.get_submodule(n) for n in names] + list(chunk.blocks))
            self.chunk = [chunk]  # not a submodule

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.chunk[0](x, None)

    placement = placement_of(layout.schedule)
    stages = [PipelineStage(ChunkModule(chunk), stage_of(placement, p, rank, c), p * v, torch.device("cpu"),
                            group=mesh.pp.pg) for c, chunk in enumerate(stage.chunks)]
    cls = ScheduleZBVZeroBubble if layout.schedule == "zb-v" else ScheduleInterleavedZeroBubble
    sched = cls(stages, layout.microbatches, loss_fn=model.criterion)  # mean CE; grads / m
    opt = make_optimizer(model.named_parameters(), cfg)
    first = stage_of(placement, p, rank, 0) == 0
    last = any(stage_of(placement, p, rank, c) == p * v - 1 for c in range(v))

    def steps() -> None:
        for x, y in batches:
            args = (x,) if first else ()
            if last:
                sched.step(*args, target=y, losses=[])
            else:
                sched.step(*args)
            if stage.tied_param is not None:  # loop placement: the copies on the first and last rank
                dist.all_reduce(stage.tied_param.grad, group=stage.tied_group.pg)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return steps, model
