"""Mixed precision ([R20] sec. 3.1; Micikevicius et al. 2018): the model computes in bf16, the
optimizer steps fp32 *master weights*.

The model's parameters, gradients and activations are bf16 (``--precision bf16``; the model was
cast before ``parallelize``). This wrapper sits on the GradSync that reduces the gradients (data
parallelism or ZeRO) and keeps, for every tensor that GradSync hands the optimizer (a whole
parameter, or under ZeRO this rank's piece of one), an fp32 master copy. One step::

    backward     bf16 gradients; the GradSync accumulates and reduces them in its buffers,
                 bf16 (--grad-dtype bf16) or fp32 (--grad-dtype fp32: Megatron's main_grad)
    finish       master.grad = the reduced gradient, in fp32 (a view of an fp32 buffer, or a
                 transient upcast of a bf16 one)
    clip, step   the global norm and AdamW on the masters, all fp32
    copy back    low = bf16(master); ZeRO-1/2 then all-gather the bf16 shards, ZeRO-3 gathers
                 them at the next use

Bytes per parameter before sharding: bf16 weights 2, gradients 2 (fp32: 4), optimizer 12 (fp32
master 4 + AdamW m 4 + v 4); ZeRO shards the masters with the moments, the 16-bit gradients and
weights as before. The transient upcast of bf16 gradients (4 bytes per parameter the optimizer
steps, only between ``finish`` and ``zero_grad``) is not a model state.

``offload`` (ZeRO-Offload, Ren et al. 2021): the masters and AdamW's state live in host memory
and the step runs there; ``finish`` copies the reduced gradients device -> host (G bytes per
parameter the rank steps), the copy back host -> device (2 bytes). On a CPU run host and
device are the same memory: the same arithmetic, a separate copy of the gradients.
"""

from __future__ import annotations

import contextlib

import torch

from paratrain.parallel.marks import mark_master
from paratrain.parallel.model import GradSync


class MixedPrecision:
    """A :class:`~paratrain.parallel.model.GradSync` over ``inner``: the same reduction, with fp32
    masters as the tensors the norm, the clip and the optimizer see (``grad_params``). ``inner``
    must offer ``grads()``: the reduced gradient of each of its ``grad_params``, in order."""

    def __init__(self, inner: GradSync, offload: bool = False) -> None:
        self.inner = inner
        self.offload = offload
        self.lows: list[torch.Tensor] = list(inner.grad_params)
        host = torch.device("cpu")
        self.masters: list[torch.Tensor] = []
        for low in self.lows:
            master = low.detach().to(host if offload else low.device, torch.float32, copy=True)
            master.requires_grad_(True)
            mark_master(master, low)
            self.masters.append(master)
        self.low_of = {id(m): low for m, low in zip(self.masters, self.lows)}
        self.upcast: set[int] = set()  # ids of the masters whose .grad is this step's transient upcast
        self._attach()

    @property
    def grad_scale(self) -> float:
        return self.inner.grad_scale

    @property
    def grad_params(self) -> list[torch.Tensor]:
        return self.masters

    def set_sync(self, sync: bool) -> None:
        self.inner.set_sync(sync)

    def full_params(self) -> contextlib.AbstractContextManager[None]:
        return self.inner.full_params()

    def _attach(self) -> None:
        """fp32 gradient buffers on the masters' device are the masters' ``.grad`` for good:
        no copy, and the memory meter counts them as the gradients."""
        for master, g in zip(self.masters, self.inner.grads()):
            if g is not None and g.dtype == torch.float32 and g.device == master.device and not self.offload:
                master.grad = g

    def finish(self) -> None:
        self.inner.finish()
        for master, g in zip(self.masters, self.inner.grads()):
            if g is None:
                master.grad = None
            elif master.grad is None or master.grad.data_ptr() != g.data_ptr():
                master.grad = g.to(master.device, torch.float32, copy=True)
                self.upcast.add(id(master))

    def zero_grad(self) -> None:
        self.inner.zero_grad()
        for master in self.masters:
            master.grad = None
        self.upcast.clear()
        self._attach()

    @torch.no_grad()
    def copy_back(self) -> None:
        """The updated masters into the bf16 weights (or shards), rounded to nearest."""
        for master, low in zip(self.masters, self.lows):
            low.copy_(master)

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer ``inner`` would step (its param groups: hyperparameters, weight decay),
        over the masters instead; after each step the masters are copied back, then whatever
        ``inner``'s optimizer does after a step (ZeRO-1/2: all-gather the updated shards) runs."""
        sharded = self.inner.shard_optimizer(optimizer)
        master_of = {id(low): m for m, low in zip(self.masters, self.lows)}
        groups = [dict(g, params=[master_of[id(p)] for p in g["params"]]) for g in sharded.param_groups]
        outer = type(sharded)(groups)
        after = getattr(self.inner, "after_step", None)

        def post_step(*_: object) -> None:
            self.copy_back()
            if after is not None:
                after()

        outer.register_step_post_hook(post_step)
        outer.low_of = self.low_of  # type: ignore[attr-defined]  # checkpoints and the memory meter
        outer.upcast = self.upcast  # type: ignore[attr-defined]  # the memory meter: not a model state
        return outer
