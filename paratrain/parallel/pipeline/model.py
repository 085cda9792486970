"""``PipelineModel``: the training loop's view of a pipeline rank (a :class:`ParallelModel`).

One step: the layout's schedule runs on this rank's chunks (:mod:`.runtime`); data parallelism
reduces gradients during the rank's last backward (``set_sync(False)`` before the others); then
the tied embedding gradient is summed between the first and last stage. The loss lives on the
last stage; :meth:`global_mean` gives every rank the same value. A mixture of experts: every
stage backpropagates its own routers' aux losses (``stage.AuxLossGrad``), and the detached terms
of the stages before the last are summed over the pipeline group into the reported loss.
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import Any

import torch

from paratrain import comm
from paratrain.comm import P2P, Group
from paratrain.config import Layout
from paratrain.core.bubble import bubble_fraction
from paratrain.core.check import check
from paratrain.core.schedules import I, Schedule, build_schedule, placement_of, stage_of
from paratrain.core.timeline import Timeline, from_times
from paratrain.mesh import Mesh
from paratrain.parallel.grad import collective_device
from paratrain.parallel.marks import param_of
from paratrain.parallel.model import GradSync, ParallelModel, sync_chain
from paratrain.parallel.pipeline.runtime import PipelineRuntime
from paratrain.parallel.pipeline.stage import Stage, flatten, unflatten
from paratrain.parallel.shard import gather_full_state
from paratrain.parallel.zero import ZeroDataParallel


@cache
def checked_schedule(name: str, p: int, m: int, v: int, placement: str = "loop") -> Schedule:
    """The schedule, proven by the checker before any rank runs it."""
    schedule = build_schedule(name, p, m, v, placement)
    check(schedule)
    return schedule


def gather_to_first(local: torch.Tensor, sizes: list[int], group: Group, tag: str) -> list[torch.Tensor] | None:
    """Index 0 of ``group`` receives every member's flat ``local`` (member i's has ``sizes[i]``
    elements, known to all); returns them in group order there, None elsewhere."""
    if group.rank != 0:
        comm.batch_p2p([P2P("send", local.contiguous(), 0)], group, tag=tag)
        return None
    parts = [local] + [torch.empty(n, dtype=local.dtype, device=local.device) for n in sizes[1:]]
    comm.batch_p2p([P2P("recv", parts[i], i) for i in range(1, group.size)], group, tag=tag)
    return parts


class PipelineModel(ParallelModel):
    """``stage`` is this rank's share (see :func:`.stage.build_stage`); the rest as in
    :class:`ParallelModel`."""

    def __init__(self, stage: Stage, mesh: Mesh, layout: Layout, grad_sync: GradSync,
                 norm_groups: list[Group], autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(stage.module, mesh, layout, grad_sync, norm_groups, autocast_dtype)
        self.stage = stage
        p, v, r = layout.pp, layout.virtual_stages, mesh.coords.pp
        placement = placement_of(layout.schedule)
        chunk_of_stage = {stage_of(placement, p, r, c): c for c in range(v)}
        local_next = {c: chunk_of_stage[s + 1] for s, c in chunk_of_stage.items() if s + 1 in chunk_of_stage}
        self.runtime = PipelineRuntime(mesh.pp, [self._autocast_chunk(c) for c in stage.chunks],
                                       chunk_of_stage.get(0), chunk_of_stage.get(p * v - 1), local_next)
        self.schedule = checked_schedule(layout.schedule, p, layout.microbatches, v)
        self.eval_schedule = checked_schedule("forward", p, layout.microbatches, v, placement)
        self.times: list[tuple[float, float]] = []  # of the last training step's actions
        self.has_experts = bool(getattr(getattr(stage.module, "cfg", None), "num_experts", 0))
        for chunk in stage.chunks:  # the factor of the last stage's loss, for the aux losses elsewhere
            chunk.aux_scale = grad_sync.grad_scale / layout.microbatches
        # ZeRO-2 under a zero-bubble schedule: buckets reduced once complete over I and W (zero.py)
        splits = any(a.kind == I for actions in self.schedule.ranks for a in actions)
        self.split_zero = [z for z in sync_chain(grad_sync) if isinstance(z, ZeroDataParallel) and z.stage == 2] \
            if splits else []
        for z in self.split_zero:
            z.split_backward = True

    def _autocast_chunk(self, chunk: Any) -> Any:
        def run(x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
            with self._autocast(x):
                return chunk(x, targets)
        return run

    def _run(self, schedule: Schedule, inputs: torch.Tensor, targets: torch.Tensor,
             loss_scale: float | None) -> tuple[torch.Tensor, list[tuple[float, float]]]:
        m = schedule.num_microbatches
        xs, ys = self.local_tokens(inputs).chunk(m), self.local_tokens(targets).chunk(m)
        seq = xs[0].shape[1] // (self.mesh.tp.size if self.layout.sequence_parallel else 1)
        shape = (xs[0].shape[0], seq, self.stage.hidden)  # (B/m, T, H); T/tp between SP blocks
        on_backward = self._before_backward if loss_scale is not None else None
        dtype = next(self.module.parameters()).dtype  # the residual stream's (autocast or not)
        losses, times = self.runtime.run(schedule.ranks[self.mesh.coords.pp], xs, ys, shape,
                                         dtype, loss_scale, on_backward)
        # not the last stage: global_mean brings the loss here
        loss = torch.stack(losses).float().mean() if losses else torch.zeros((), device=inputs.device)
        if self.has_experts:  # the earlier stages' aux terms (mean over micro-batches) join the loss
            aux = [a for a in (c.take_aux() for c in self.stage.chunks) if a is not None]
            if aux:
                loss = loss + torch.stack(aux).sum() / m
            comm.all_reduce(loss, self.mesh.pp, tag="metrics")
        return loss, times

    def _before_backward(self, final: bool, kind: str) -> None:
        for z in self.split_zero:
            z.holding = kind == I
        self.grad_sync.set_sync(final)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule over ``layout.microbatches`` equal slices of this rank's batch; the loss
        of each is scaled by ``grad_scale / m``, so gradients are those of the reference's mean
        loss. Returns the mean loss on the last stage (zero elsewhere)."""
        scale = self.grad_sync.grad_scale / self.layout.microbatches
        zero3 = self._zero3()
        if zero3 is not None:  # ZeRO-3: the stage's units whole for the whole step
            zero3.begin_step()
        loss, self.times = self._run(self.schedule, inputs, targets, scale)
        self.grad_sync.finish()
        if self.stage.tied_group is not None and self.stage.tied_param is not None:
            # dL/dW = (embedding's part) + (head's part); both are already averaged over dp.
            # Under ZeRO the reduced gradient is this rank's shard of W (the same on both stages)
            for t in self.grad_sync.grad_params:
                if param_of(t) is self.stage.tied_param:  # (an offloaded master's: via the device)
                    g = t.grad.to(collective_device(t.grad))
                    comm.all_reduce(g, self.stage.tied_group)
                    if g is not t.grad:
                        t.grad.copy_(g)
        return loss

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        zero3 = self._zero3()
        with zero3.full_params("eval") if zero3 is not None else contextlib.nullcontext():
            loss, _ = self._run(self.eval_schedule, inputs, targets, None)
        self.module.train(was_training)
        return loss

    def _zero3(self) -> Any:
        """The :class:`~paratrain.parallel.zero3_pipeline.PipelineZero3` under the gradient
        sync's wrappers (mixed precision, sequence parallelism), or None."""
        return next((s for s in sync_chain(self.grad_sync) if hasattr(s, "begin_step")), None)

    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average the last stage's value over dp, then broadcast it to every pipeline rank (from
        the rank holding the last stage: rank 0 in the V placement)."""
        out = super().global_mean(value)
        comm.broadcast(out, self.schedule.place(self.schedule.num_stages - 1)[0], self.mesh.pp, tag="metrics")
        return out

    def _leads_gather(self) -> bool:
        """Only the pipeline group of global rank 0 (dp = tp = 0) gathers to rank 0."""
        return self.mesh.coords.dp == 0 and self.mesh.coords.tp == 0 and self.mesh.coords.cp == 0

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The reference-shaped state dict on global rank 0: each stage gathers its tensor-parallel
        shards on its tp index 0, which sends the stage's entries to rank 0 (with every expert of
        its blocks, gathered over the ep group first). Collective."""
        with self.grad_sync.full_params():  # ZeRO-3: each stage's units gathered over its dp group
            return self._full_state_dict()

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from paratrain.parallel.expert import gather_experts

        experts = gather_experts(self.module, self.mesh.ep)  # {} at ep = 1
        if self.mesh.coords.dp != 0 or self.mesh.coords.cp != 0:
            return None
        state = gather_full_state(self.module, self.mesh.tp)  # None off tp index 0
        if state is None:
            return None
        state.update(experts)
        keys = self.stage.keys_by_rank
        local = flatten(state, keys[self.mesh.coords.pp])
        parts = gather_to_first(local, [sum(s.numel() for _, s in k) for k in keys], self.mesh.pp, "state")
        if parts is None:
            return None
        state: dict[str, torch.Tensor] = {}
        for part, k in zip(parts, keys):
            state.update(unflatten(part.cpu(), k))
        return state

    def gather_timeline(self) -> Timeline | None:
        """The last training step's measured timeline on global rank 0 (collective over the
        pipeline group of rank 0; None elsewhere). Clocks: ``perf_counter`` is the machine's
        monotonic clock, shared by the processes of one host."""
        if not self._leads_gather():
            return None
        device = next(self.module.parameters()).device  # NCCL moves only GPU tensors
        local = torch.tensor(self.times, dtype=torch.float64, device=device).reshape(-1)
        sizes = [2 * len(acts) for acts in self.schedule.ranks]
        parts = gather_to_first(local, sizes, self.mesh.pp, "timeline")
        if parts is None:
            return None
        return from_times(self.schedule, [part.cpu().view(-1, 2).tolist() for part in parts])

    @property
    def theoretical_bubble(self) -> float:
        s = self.schedule
        return bubble_fraction(s.name, s.num_ranks, s.num_microbatches, s.num_chunks)
