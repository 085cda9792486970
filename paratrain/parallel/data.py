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

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group, Handle


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]  # tied weights appear once


def group_by_bytes(params: Iterable[nn.Parameter], cap_bytes: int,
                   alone: Iterable[nn.Parameter] = ()) -> list[list[nn.Parameter]]:
    """Consecutive runs of ``params`` of at most ``cap_bytes`` each (a larger tensor alone), never
    mixing dtypes or devices: the parameters of each bucket. Those in ``alone`` get a bucket
    of their own, in their place in the order."""
    single = {id(p) for p in alone}
    groups: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        current = groups[-1] if groups else None
        if (current is None or size + p.numel() * p.element_size() > cap_bytes
                or id(p) in single or id(current[0]) in single
                or p.dtype != current[0].dtype or p.device != current[0].device):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel() * p.element_size()
    return groups


class Replicated:
    """What the two data-parallel classes share: every rank holds whole parameters, so the
    reduced gradients sit in ``p.grad`` of the parameters themselves (``grad_params``), the
    optimizer is the plain one and the parameters are always whole. ZeRO
    (``parallel/zero.py``) answers these three differently."""

    params: list[nn.Parameter]

    @property
    def grad_params(self) -> list[torch.Tensor]:
        return list(self.params)

    def grads(self) -> list[torch.Tensor | None]:
        """The reduced gradient of each of ``grad_params`` (after ``finish``), for
        ``parallel/mixed.py``."""
        return [p.grad for p in self.params]

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        yield


class NaiveDataParallel(Replicated):
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
    """A flat buffer holding the gradients of a few parameters, reduced by one collective.

    The buffer has ``padded`` elements: the parameters' ``numel`` rounded up to a multiple of
    ``multiple`` (1 for all-reduce; the dp size for ZeRO's reduce-scatter, whose shards must
    be equal), the tail zero. ``allocate=False`` leaves it to :meth:`allocate` (ZeRO-2/3
    allocate it for each backward and release it once reduced). ``dtype``: the gradients'
    (default the parameters'; fp32 under bf16 parameters with ``--grad-dtype fp32``: autograd's
    bf16 gradient is then added into the buffer, and accumulation and reduction run in fp32)."""

    def __init__(self, index: int, params: list[nn.Parameter], multiple: int = 1,
                 allocate: bool = True, dtype: torch.dtype | None = None) -> None:
        self.index = index
        self.params = params
        self.dtype = dtype or params[0].dtype
        self.numel = sum(p.numel() for p in params)
        self.padded = -(-self.numel // multiple) * multiple
        self.offsets: dict[nn.Parameter, int] = {}
        offset = 0
        for p in params:
            self.offsets[p] = offset
            offset += p.numel()
        self.buffer: torch.Tensor | None = None
        self.views: dict[nn.Parameter, torch.Tensor] = {}
        if allocate:
            self.allocate()
        self.pending = len(params)
        self.handle: Handle | None = None

    def allocate(self, zero: bool = True) -> torch.Tensor:
        """A buffer (zeroed, or with only its padding zeroed), with each parameter's gradient
        view into it."""
        p0 = self.params[0]
        if zero:
            self.buffer = torch.zeros(self.padded, dtype=self.dtype, device=p0.device)
        else:
            self.buffer = torch.empty(self.padded, dtype=self.dtype, device=p0.device)
            self.buffer[self.numel:].zero_()
        self.views = {p: self.buffer[o:o + p.numel()].view_as(p) for p, o in self.offsets.items()}
        return self.buffer

    def release(self) -> None:
        self.buffer = None
        self.views = {}


class DataParallel(Replicated):
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
                 overlap: bool = True, grad_dtype: torch.dtype | None = None,
                 params: list[nn.Parameter] | None = None) -> None:
        self.module = module
        self.group = group
        self.grad_dtype = grad_dtype
        self.grad_scale = 1.0 / group.size
        self.overlap = overlap
        self.params = _unique_params(module) if params is None else params  # a subset: parallel/expert.py
        self.buckets = self._make_buckets(int(bucket_mb * 2**20))
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        for b in self.buckets:
            for p in b.params:
                self._bucket_of[p] = b
                if b.buffer is not None and b.dtype == p.dtype:
                    p.grad = b.views[p]
        self._sync = True
        self._next = 0  # index of the next bucket to launch
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    def _make_buckets(self, cap_bytes: int) -> list[_Bucket]:
        return [_Bucket(i, ps, dtype=self.grad_dtype)
                for i, ps in enumerate(group_by_bytes(reversed(self.params), cap_bytes))]

    def grads(self) -> list[torch.Tensor | None]:
        return [self._bucket_of[p].views[p] for p in self.params]

    @property
    def bucket_sizes(self) -> list[int]:
        return [b.padded for b in self.buckets]

    def set_sync(self, sync: bool) -> None:
        """Whether the coming backward is the last micro-batch of the step (reduce) or not."""
        self._sync = sync
        if sync:
            self._next = 0
            for b in self.buckets:
                b.pending = len(b.params)

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bucket = self._bucket_of[p]
        self._store_grad(bucket, p)
        if not self._sync:
            return
        bucket.pending -= 1
        if bucket.pending == 0 and self.overlap:
            self._launch_ready()

    def _store_grad(self, bucket: _Bucket, p: nn.Parameter) -> None:
        """Make sure ``p``'s new gradient is in the bucket (it already is, as a view, unless
        autograd re-created ``p.grad``)."""
        view = bucket.views[p]
        if view.dtype != p.dtype:  # an fp32 buffer under bf16 weights: accumulate in fp32
            view.add_(p.grad)
            p.grad = None
            return
        if p.grad is not view:
            if p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.handle = comm.all_reduce(bucket.buffer, self.group, async_op=True)

    def _launch_rest(self) -> None:
        """Launch the buckets not launched yet (unused parameters, or overlap disabled)."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1

    def finish(self) -> None:
        """After the last backward of the step: launch what is left, wait for every bucket."""
        if not self._sync:
            return
        self._launch_rest()
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
        self._attach_grads()

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()
        self._attach_grads()

    def _attach_grads(self) -> None:
        """Every ``p.grad`` is its bucket view (an fp32 view of a bf16 parameter cannot be: there
        the bucket is the gradient, :meth:`grads`)."""
        for p in self.params:
            view = self._bucket_of[p].views[p]
            p.grad = view if view.dtype == p.dtype else None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
