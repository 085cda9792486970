"""Data parallelism: every rank holds the whole model, trains on its slice of the global batch,
and the gradients are averaged over the ``dp`` group before the optimizer steps.

With ``n`` ranks each computing ``g_r = d(mean loss over its B/n sequences)/dw``, the reference
gradient over the global batch is ``g = (1/n) * sum_r g_r`` — one all-reduce per gradient.

Two implementations share one small interface (``grad_scale``, ``set_sync``, ``finish``,
``zero_grad``):

* :class:`NaiveDataParallel` — for learners: after backward, all-reduce each gradient in turn.
* :class:`DataParallel` — what training uses: gradients live in a few flat *buckets*; each
  bucket's all-reduce starts asynchronously the moment its last gradient has been accumulated,
  so communication overlaps the rest of backward. With gradient accumulation the reduction runs
  only on the last micro-batch (``set_sync(False)`` before the others).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group, Handle


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]  # tied weights appear once


class NaiveDataParallel:
    """All-reduce every gradient, one collective per parameter, after backward has finished."""

    grad_scale = 1.0  # the mean is taken after the sum, below

    def __init__(self, module: nn.Module, group: Group) -> None:
        self.module = module
        self.group = group
        self.params = _unique_params(module)
        self._sync = True

    def set_sync(self, sync: bool) -> None:
        self._sync = sync

    def finish(self) -> None:
        if not self._sync:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            comm.all_reduce(p.grad, self.group)
            p.grad.div_(self.group.size)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class _Bucket:
    """A flat buffer holding the gradients of a few parameters, reduced by one collective."""

    def __init__(self, index: int, params: list[nn.Parameter]) -> None:
        self.index = index
        self.params = params
        total = sum(p.numel() for p in params)
        self.buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.views: dict[nn.Parameter, torch.Tensor] = {}
        offset = 0
        for p in params:
            self.views[p] = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.pending = len(params)
        self.handle: Handle | None = None


class DataParallel:
    """Bucketed data parallelism with all-reduces overlapping backward.

    Buckets are filled in reverse parameter order (roughly the order backward produces
    gradients), ``bucket_mb`` MiB each. Every ``param.grad`` is a view into its bucket, so
    autograd accumulates straight into the buffer that is reduced: no copy. A gradient that
    autograd re-created (after ``optimizer.zero_grad(set_to_none=True)``) is copied back once.

    Buckets are *launched in index order* on every rank, whatever order their gradients arrive
    in, because collectives must be issued in the same order everywhere.

    The mean needs a division by ``n``; instead of a pass over every bucket, the step multiplies
    the scalar loss by ``grad_scale = 1/n`` before backward, so gradients arrive pre-divided and
    the all-reduce's sum is already the mean (exact for power-of-two ``n``).
    """

    def __init__(self, module: nn.Module, group: Group, bucket_mb: float = 25.0,
                 overlap: bool = True) -> None:
        self.module = module
        self.group = group
        self.grad_scale = 1.0 / group.size
        self.overlap = overlap
        self.params = _unique_params(module)
        self.buckets = self._make_buckets(reversed(self.params), int(bucket_mb * 2**20))
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        for b in self.buckets:
            for p in b.params:
                self._bucket_of[p] = b
                p.grad = b.views[p]
        self._sync = True
        self._next = 0  # index of the next bucket to launch
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    @staticmethod
    def _make_buckets(params: Iterable[nn.Parameter], cap_bytes: int) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in params:
            if current and (size + p.numel() * p.element_size() > cap_bytes
                            or p.dtype != current[0].dtype or p.device != current[0].device):
                buckets.append(_Bucket(len(buckets), current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            buckets.append(_Bucket(len(buckets), current))
        return buckets

    @property
    def bucket_sizes(self) -> list[int]:
        return [b.buffer.numel() for b in self.buckets]

    def set_sync(self, sync: bool) -> None:
        """Whether the coming backward is the last micro-batch of the step (reduce) or not."""
        self._sync = sync
        if sync:
            self._next = 0
            for b in self.buckets:
                b.pending = len(b.params)

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bucket = self._bucket_of[p]
        view = bucket.views[p]
        if p.grad is not view:
            if p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view
        if not self._sync:
            return
        bucket.pending -= 1
        if bucket.pending == 0 and self.overlap:
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.handle = comm.all_reduce(bucket.buffer, self.group, async_op=True)

    def finish(self) -> None:
        """After the last backward of the step: launch what is left, wait for every bucket."""
        if not self._sync:
            return
        while self._next < len(self.buckets):  # unused parameters, or overlap disabled
            self._launch(self.buckets[self._next])
            self._next += 1
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
        for p in self.params:  # grads must be the reduced bucket views
            p.grad = self._bucket_of[p].views[p]

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()
        for p in self.params:
            p.grad = self._bucket_of[p].views[p]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
