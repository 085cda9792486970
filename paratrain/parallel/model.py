"""``ParallelModel``: the part of the model this rank holds, and how one step's gradients are
computed, synchronised and clipped for the layout. The training loop only talks to this."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.config import Layout
from paratrain.mesh import Mesh
from paratrain.parallel.grad import clip_grad_norm_
from paratrain.parallel.shard import gather_full_state


def sync_chain(sync: Any) -> list[Any]:
    """``sync`` and every gradient sync it wraps (mixed precision's, sequence parallelism's
    ``inner``; expert parallelism's ``inner`` and ``experts``), outermost first."""
    if sync is None:
        return []
    return [sync, *sync_chain(getattr(sync, "inner", None)), *sync_chain(getattr(sync, "experts", None))]


class GradSync(Protocol):
    """What a data-parallel (or ZeRO) wrapper offers the step: see ``parallel/data.py`` and
    ``parallel/zero.py``. ``grad_scale`` multiplies the loss before backward (1/dp when the
    reduction sums). ``grad_params``: the tensors whose ``.grad`` holds this rank's reduced
    gradient after ``finish`` -- the parameters, or under ZeRO this rank's shards of them
    (marked for ``parallel/grad.py``). ``shard_optimizer``: the optimizer to step (the given
    one, or the same over the shards). ``full_params``: a context in which every parameter is
    whole (ZeRO-3 gathers them; collective over dp)."""

    grad_scale: float

    @property
    def grad_params(self) -> list[torch.Tensor]: ...
    def set_sync(self, sync: bool) -> None: ...
    def finish(self) -> None: ...
    def zero_grad(self) -> None: ...
    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer: ...
    def full_params(self) -> contextlib.AbstractContextManager[None]: ...


class ParallelModel:
    """``module`` is this rank's (possibly sharded) model; ``grad_sync`` reduces gradients over
    the dp group; ``norm_groups`` are the groups whose ranks hold *different* parameters, over
    which the gradient norm is summed; ``runner`` computes ``runner(inputs, targets)`` -> mean
    loss (default ``module`` itself; a model without such a forward: a
    :class:`~paratrain.models.plans.StagedForward`)."""

    def __init__(self, module: nn.Module, mesh: Mesh, layout: Layout, grad_sync: GradSync,
                 norm_groups: list[Group], autocast_dtype: torch.dtype | None = None,
                 runner: nn.Module | None = None) -> None:
        self.module = module
        self.runner = module if runner is None else runner
        self.mesh = mesh
        self.layout = layout
        self.grad_sync = grad_sync
        self.norm_groups = norm_groups
        self.autocast_dtype = autocast_dtype
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._weight_buffers: list[torch.Tensor] = []

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.module.named_parameters()

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def register_weights(self, buffers: list[torch.Tensor]) -> None:
        """Tensors that hold parameters although no parameter views them between steps (ZeRO-3's
        gathered units): a linear saves its gathered weight for backward, parameter memory."""
        self._weight_buffers.extend(buffers)

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every tensor whose storage holds this rank's parameters: what an
        :class:`~paratrain.parallel.memory.ActivationMeter` must not count as activations."""
        return [*self._params, *self._weight_buffers]

    def _autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's batch (B_local, T) in ``layout.microbatches``
        equal slices; gradients end up summed over micro-batches and averaged over dp, exactly the
        gradient of the mean loss over the global batch. Returns this rank's mean loss (detached)."""
        m = self.layout.microbatches
        scale = self.grad_sync.grad_scale / m
        inputs, targets = self.local_tokens(inputs), self.local_tokens(targets)
        total = torch.zeros((), device=inputs.device)
        for i, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m))):
            self.grad_sync.set_sync(i == m - 1)
            with self._autocast(x):
                loss = self.runner(x, y)
            (loss * scale).backward()
            total += loss.detach().float()
        self.grad_sync.finish()
        return total / m

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        with self._autocast(inputs):
            loss = self.runner(self.local_tokens(inputs), self.local_tokens(targets)).float()
        self.module.train(was_training)
        return loss

    def local_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) -> this cp rank's (B, T/cp) tokens (``parallel/context.py``); x itself at cp = 1."""
        from paratrain.parallel.context import split_sequence

        return split_sequence(x, self.mesh.cp)

    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a per-rank scalar (e.g. the local loss) over the data-parallel group (dp x cp:
        every cp rank's mean is over as many tokens, so their mean is the global one)."""
        out = value.detach().clone().float()
        comm.all_reduce(out, self.mesh.dpcp, op="avg", tag="metrics")
        return out

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.grad_sync.grad_params, max_norm, self.norm_groups)

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer the step uses, built over :meth:`named_parameters` (ZeRO: the same
        optimizer over this rank's shards; otherwise ``optimizer`` itself)."""
        return self.grad_sync.shard_optimizer(optimizer)

    def zero_grad(self) -> None:
        self.grad_sync.zero_grad()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The reference model's state dict (full shapes) on global rank 0, None elsewhere.
        Collective: every rank calls it (the tp shards are gathered on each tp group)."""
        from paratrain.parallel.expert import gather_experts

        with self.grad_sync.full_params():  # ZeRO-3: copied before they are freed again
            experts = gather_experts(self.module, self.mesh.ep)  # every expert; {} at ep = 1
            lead = self.mesh.coords.dp == 0 and self.mesh.coords.cp == 0
            state = gather_full_state(self.module, self.mesh.tp) if lead else None
            if self.mesh.rank != 0 or state is None:
                return None
            state.update(experts)  # this rank's experts are among them, under the same names
            return {k: v.detach().cpu().clone() for k, v in state.items()}
