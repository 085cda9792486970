"""ZeRO (Rajbhandari et al. 2020): data parallelism that *shards* the model states over the dp
group instead of replicating them. A :class:`~paratrain.parallel.model.GradSync` like
:class:`~paratrain.parallel.data.DataParallel` (same buckets, hooks and launch order), plus the
optimizer wrapper that steps only this rank's shard.

The math. ``n`` dp ranks. A bucket's parameters are laid end to end in a flat vector of ``N``
elements, zero-padded to ``N' = n * ceil(N / n)``; rank ``r`` owns the shard
``[r k, (r + 1) k)``, ``k = N' / n``. As in DP each rank's gradient ``g_r`` arrives pre-scaled
by 1/n (the loss is), so the reference gradient is ``g = sum_r g_r`` and rank ``r`` needs only
its shard of it::

    reduce-scatter   shard_r(g) = sum_r' shard_r(g_r')       wire (n - 1)/n * S
    optimizer        AdamW on shard_r: m, v and w elementwise, the reference's arithmetic
    all-gather       w = cat_r shard_r(w)                    wire (n - 1)/n * S

``S`` = the bucket's padded bytes. Together ``2 (n - 1)/n * S``: DP's all-reduce, which is a
reduce-scatter followed by an all-gather anyway ([R20] sec. 7.2.1).

* stage 1: gradients accumulate whole, in the buckets (views, as in DP); each bucket is
  reduce-scattered once per step, *in place* (this rank's range of the buffer becomes the
  reduced shard); the optimizer state exists for the shard only.
* stage 2: + every backward's buckets are filled (copied from autograd's gradients) and
  reduce-scattered as soon as they are complete, then released; only the gradient shard,
  accumulated over micro-batches, stays, from the step's first reduction to ``zero_grad``
  (between steps its memory is released, as DeepSpeed and FSDP2 do: the forward's activation
  peak does not carry it). A whole gradient of every parameter never exists at once.
  Under a zero-bubble schedule (:attr:`ZeroDataParallel.split_backward`) a micro-batch's
  backward comes in two actions, ``I`` (norms, biases, embeddings) and ``W`` (the linears'
  weights): a bucket is then reduced once *every one of its parameters* has a gradient since its
  last reduction, not at each action, so each micro-batch reduces its buckets once (``m S`` per
  step, as with plain backwards) instead of twice. The gradients an ``I`` produces wait, small,
  in ``p.grad`` (autograd adds the next micro-batch's to them) until their bucket's first ``W``
  gradient arrives; a gradient for a bucket whose reduction is in flight settles it first.
* stage 3: + parameters: each rank stores only its shard; a *unit* (a transformer block, or the
  rest of the model) is all-gathered before its forward and before its backward and freed after
  each: :mod:`paratrain.parallel.zero3`. Its buckets are the units.

Shards cut across tensors. The optimizer runs on *pieces*: the part of each parameter inside
this rank's shard, a view of the shard, in its parameter's param group, so that weight decay
(matrices and embeddings only) stays exactly the reference's. A piece carries its parameter's
marks plus ``"dp"`` in ``sharded`` (``parallel/marks.py``), so the global gradient norm
(``parallel/grad.py``) counts each element once: ``||g||^2 = sum over dp ranks of the squares of
its pieces``, all-reduced over dp (and over tp/pp as before).

Memory per rank for ``psi`` fp32 parameters (P = G = 4 bytes, AdamW K = 8):
stage 0 ``16 psi``; stage 1 ``8 psi + 8 psi / n``; stage 2 ``4 psi + 12 psi / n``;
stage 3 ``16 psi / n`` plus the units gathered at the moment. Traffic:
:func:`paratrain.core.traffic.zero_comm_per_step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group, Handle
from paratrain.parallel.data import DataParallel, _Bucket, group_by_bytes
from paratrain.parallel.marks import mark_piece, mark_sharded


def padded_numel(numel: int, n: int) -> int:
    """``numel`` rounded up to a multiple of ``n``: every shard has the same size."""
    return -(-numel // n) * n


def owned_pieces(sizes: Sequence[int], n: int, rank: int) -> list[tuple[int, int, int, int]]:
    """Tensors of ``sizes`` elements laid end to end and padded to a multiple of ``n``: the parts
    inside ``rank``'s shard, as ``(tensor index, first element in the tensor, length, first
    element in the shard)``. Over all ranks every element is owned exactly once."""
    k = padded_numel(sum(sizes), n) // n
    lo, hi = rank * k, (rank + 1) * k
    out, offset = [], 0
    for i, size in enumerate(sizes):
        a, b = max(offset, lo), min(offset + size, hi)
        if a < b:
            out.append((i, a - offset, b - a, a - lo))
        offset += size
    return out


class ShardedBucket(_Bucket):
    """A bucket whose parameters are also flat and sharded over ``group``.

    ``flat`` (``padded`` elements) holds the whole parameters, which are views into it; ``shard``
    is this rank's ``k`` of them (stage 1/2: a view of ``flat``, stage 3: the only stored copy,
    ``flat``'s memory being allocated only while the unit is gathered). ``grad_shard`` is the
    reduced gradient of the shard (stage 1: a view of the gradient buffer). ``pieces`` maps each
    parameter to its piece of ``shard``, whose ``.grad`` is the matching piece of ``grad_shard``.
    """

    def __init__(self, index: int, params: list[nn.Parameter], group: Group, stage: int,
                 grad_dtype: torch.dtype | None = None, axes: Sequence[str] = ("dp",)) -> None:
        super().__init__(index, params, group.size, allocate=stage == 1, dtype=grad_dtype)
        sizes = [p.numel() for p in params]  # before stage 3 empties the parameters
        self.group = group
        k = self.padded // group.size
        self.lo, self.hi = group.rank * k, (group.rank + 1) * k
        p0 = params[0]
        self.flat = torch.zeros(self.padded, dtype=p0.dtype, device=p0.device)
        self.placeholder = self.flat.new_zeros(())
        self.param_views: dict[nn.Parameter, torch.Tensor] = {}
        with torch.no_grad():
            for p, o in self.offsets.items():
                self.param_views[p] = self.flat[o:o + p.numel()].view_as(p)
                self.param_views[p].copy_(p)
                p.data = self.param_views[p]
        self.gathered = True
        self.gather_handle: Handle | None = None
        if stage < 3:
            self.shard = self.flat[self.lo:self.hi]
        else:
            self.shard = self.flat[self.lo:self.hi].clone()
            self.free()
        if stage == 1:
            assert self.buffer is not None
            self.grad_shard = self.buffer[self.lo:self.hi]
        else:
            self.grad_shard = torch.zeros_like(self.shard, dtype=self.dtype)
        self.filled: set[nn.Parameter] = set()  # stages 2/3: gradients copied in this backward
        self.held: set[nn.Parameter] = set()  # stage 2, split backward: gradients waiting in p.grad
        self.launched = False  # stages 2/3: its reduction was started and not yet accumulated
        self.fresh = True  # no reduction landed in grad_shard since zero_grad
        self.accumulate = False  # the reduction in flight is added to grad_shard, not written
        self.pieces: dict[nn.Parameter, torch.Tensor] = {}
        self.piece_grads: dict[nn.Parameter, torch.Tensor] = {}
        for i, _, length, at in owned_pieces(sizes, group.size, group.rank):
            p = params[i]
            piece = self.shard[at:at + length]
            self.piece_grads[p] = self.grad_shard[at:at + length]
            if self.dtype == piece.dtype:  # (an fp32 gradient of a bf16 piece: parallel/mixed.py)
                piece.grad = self.piece_grads[p]
            mark_piece(piece, p, "dp")
            for axis in axes:  # (with experts: the ep and edp sub-axes of dp too)
                mark_sharded(piece, axis)
            self.pieces[p] = piece

    def drop_grad_shard(self) -> None:
        """Stages 2/3, between steps: release the reduced gradient shard's memory (DeepSpeed's
        ZeRO and FSDP2 hold no gradient between steps either). Its views, the pieces' ``.grad``,
        stay; nothing reads them before the step's first reduction lands (:meth:`keep_grad_shard`)."""
        self.grad_shard.untyped_storage().resize_(0)

    def keep_grad_shard(self) -> None:
        """Memory for the gradient shard again, uninitialized: the reduction about to land writes
        every element (or the caller zeroes it)."""
        storage = self.grad_shard.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.grad_shard.numel() * self.grad_shard.element_size())

    def gather(self, async_op: bool = False, tag: str | None = None) -> None:
        """Stage 3: all-gather the whole parameters into ``flat`` (no-op if gathered)."""
        if self.gathered:
            return
        storage = self.flat.untyped_storage()
        storage.resize_(self.padded * self.flat.element_size())
        # Write through a new tensor on the same storage: the views autograd saved in forward
        # see the data, and their version counter stays untouched (it is not an in-place edit
        # of anything backward depends on: the same values come back).
        out = self.flat.new_empty(0).set_(storage, 0, (self.padded,))
        self.gather_handle = comm.all_gather(out, self.shard, self.group, async_op=True, tag=tag)
        for p, view in self.param_views.items():
            p.data = view
        self.gathered = True
        if not async_op:
            self.wait_gathered()

    def wait_gathered(self) -> None:
        if self.gather_handle is not None:
            self.gather_handle.wait()
            self.gather_handle = None

    def free(self) -> None:
        """Stage 3: release the whole parameters' memory. Each parameter becomes a placeholder
        of its shape with stride 0 over one zero (reads give zeros, writes fail), so shapes stay
        visible (``optim.param_groups`` sorts by ``dim()``) and nothing reads freed memory."""
        if not self.gathered:
            return
        self.wait_gathered()
        self.flat.untyped_storage().resize_(0)
        for p, view in self.param_views.items():
            p.data = self.placeholder.expand(view.shape)
        self.gathered = False


class ZeroDataParallel(DataParallel):
    """ZeRO stage 1, 2 or 3 over ``group`` (see the module docstring).

    ``units`` (stage 3): the parameter lists of the buckets, in backward order, instead of
    ``bucket_mb`` runs. ``parts``: groups of parameters no bucket may mix (a pipeline rank's
    chunks: under an interleaved schedule each backward covers one chunk, and stage 2 reduces
    each chunk's buckets after its own backward). ``alone``: parameters that get a bucket of
    their own, so that their shard is the same on ranks whose other parameters differ (the tied
    embedding's two copies on the first and last pipeline stage, summed shard by shard).
    ``params``: the parameters it reduces (default: all of ``module``'s; a subset under expert
    parallelism, ``parallel/expert.py``); ``axes``: the mesh axes along which the ranks hold
    different pieces (``"dp"``; under expert parallelism also its sub-axes ``"ep"`` and ``"edp"``,
    whichever group this one shards over: every dp rank holds its own piece of everything).
    """

    buckets: list[ShardedBucket]
    gathering: object | None = None  # stage 3: the hooks of parallel/zero3.py
    # Stage 2 under a zero-bubble schedule (set by the pipeline): buckets are reduced when
    # complete over I and W, not at every backward action (module docstring); ``holding``: the
    # running backward is an I, whose gradients wait in ``p.grad``.
    split_backward: bool = False
    holding: bool = False

    def __init__(self, module: nn.Module, group: Group, stage: int, bucket_mb: float = 25.0,
                 overlap: bool = True, units: list[list[nn.Parameter]] | None = None,
                 parts: Sequence[Sequence[nn.Parameter]] | None = None,
                 alone: Sequence[nn.Parameter] = (), grad_dtype: torch.dtype | None = None,
                 params: list[nn.Parameter] | None = None, axes: Sequence[str] = ("dp",)) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
        self.stage = stage
        self._units = units
        self._parts = parts
        self._alone = list(alone)
        self._axes = tuple(axes)
        super().__init__(module, group, bucket_mb, overlap, grad_dtype, params)
        self.pieces = [piece for b in self.buckets for piece in b.pieces.values()]

    def _make_buckets(self, cap_bytes: int) -> list[_Bucket]:
        groups = self._units
        if groups is None:
            mine = {id(p) for p in self.params}
            parts = [[p for p in part if id(p) in mine] for part in self._parts or [self.params]]
            groups = [g for part in reversed(parts) for g in group_by_bytes(reversed(part), cap_bytes, self._alone)]
        assert sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in self.params)
        return [ShardedBucket(i, ps, self.group, self.stage, self.grad_dtype, self._axes)
                for i, ps in enumerate(groups)]

    # ---- what ParallelModel asks of a GradSync ------------------------------------------

    @property
    def grad_params(self) -> list[torch.Tensor]:
        """This rank's pieces: after :meth:`finish` their ``.grad`` is the reduced gradient."""
        return list(self.pieces)

    def grads(self) -> list[torch.Tensor | None]:
        return [b.piece_grads[p] for b in self.buckets for p in b.pieces]

    def after_step(self) -> None:
        """Stages 1/2: every rank's updated shard to every rank (stage 3 gathers at the next use)."""
        if self.stage < 3:
            self.gather_params()

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The same optimizer class with the same param groups (hyperparameters, weight decay),
        over this rank's pieces of their parameters. Stages 1 and 2 all-gather the updated
        parameters after every step (a step post-hook). The optimizer must be elementwise
        (SGD, Adam, AdamW: each element's update depends only on that element)."""
        return sharded_optimizer(optimizer, [self])

    def piece(self, p: nn.Parameter) -> torch.Tensor | None:
        """This rank's piece of ``p`` (None: none of it in this rank's shard, or not reduced here)."""
        bucket = self._bucket_of.get(p)
        return None if bucket is None else bucket.pieces.get(p)

    @contextlib.contextmanager
    def full_params(self, tag: str = "checkpoint") -> Iterator[None]:
        """Stage 3: every parameter whole inside the block (collective over dp). The
        all-gathers are filed under ``tag``: not training traffic."""
        if self.stage < 3:
            yield
            return
        for b in self.buckets:
            b.gather(async_op=True, tag=tag)
        for b in self.buckets:
            b.wait_gathered()
        try:
            yield
        finally:
            for b in self.buckets:
                b.free()

    # ---- reduction ----------------------------------------------------------------------

    def set_sync(self, sync: bool) -> None:
        """Stage 1: as DP (reduce on the last micro-batch only). Stages 2/3 reduce every
        backward: finish the previous backward's reductions, then count afresh."""
        if self.stage == 1:
            super().set_sync(sync)
            return
        if self._split:  # buckets are reduced as they complete, and the rest in finish()
            self._sync = True
            return
        self._flush()
        self._sync = True
        self._next = 0
        for b in self.buckets:
            b.pending = len(b.params)

    @property
    def _split(self) -> bool:
        return self.stage == 2 and self.split_backward

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self._split:
            super()._on_grad_ready(p)
            return
        bucket = self._bucket_of[p]
        assert isinstance(bucket, ShardedBucket)
        if bucket.launched:  # a new round for this bucket: its reduction in flight lands first
            self._settle(bucket)
        new = p not in bucket.filled and p not in bucket.held
        if p in bucket.held:
            pass  # autograd added this gradient to the waiting p.grad
        elif self.holding and bucket.buffer is None and bucket.dtype == p.dtype:
            bucket.held.add(p)  # an I's (small) gradient waits in p.grad for the bucket's W
        else:
            self._store_grad(bucket, p)
        if new:
            bucket.pending -= 1
            if bucket.pending == 0 and self.overlap:
                self._launch_ready()

    def _launch_ready(self) -> None:
        if not self._split:
            super()._launch_ready()
            return
        n = len(self.buckets)  # index order, wrapping round: the same order on every rank
        while self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next = (self._next + 1) % n

    def _store_grad(self, bucket: _Bucket, p: nn.Parameter) -> None:
        if self.stage == 1:
            super()._store_grad(bucket, p)
            return
        assert isinstance(bucket, ShardedBucket)
        if bucket.buffer is None:
            self._open(bucket)
        if p in bucket.filled:  # split backward: a later micro-batch's, before the reduction
            bucket.views[p].add_(p.grad)
        else:
            bucket.views[p].copy_(p.grad)
            bucket.filled.add(p)
        p.grad = None  # autograd's tensor is freed; the bucket holds the gradient until reduced

    def _open(self, bucket: ShardedBucket) -> None:
        """A buffer for the bucket's next reduction (every element is written before it is
        reduced: a parameter without a gradient is zeroed at launch), holding the gradients
        that waited in ``p.grad``."""
        bucket.allocate(zero=False)
        bucket.filled.clear()
        for q in bucket.held:
            bucket.views[q].copy_(q.grad)
            bucket.filled.add(q)
            q.grad = None
        bucket.held.clear()

    def _launch(self, bucket: _Bucket) -> None:
        """Reduce-scatter a complete bucket. Stages 2/3 keep at most one reduction in flight:
        the bucket launched before it is settled first (its reduction has had this bucket's
        backward to run) and its buffer released, so a backward holds the bucket it fills and the
        one being reduced, not every bucket until the backward is over."""
        assert isinstance(bucket, ShardedBucket)
        if self.stage > 1:
            for b in self.buckets:
                if b.launched and b is not bucket:
                    self._settle(b)
        if self.stage == 3:
            bucket.free()  # its backward is over: every gradient of the unit has arrived
        if bucket.buffer is None and bucket.held:
            self._open(bucket)
        if bucket.buffer is None:
            bucket.allocate()
        elif self.stage > 1 and len(bucket.filled) < len(bucket.params):
            for p in bucket.params:  # no gradient in this backward: it contributes zero
                if p not in bucket.filled:
                    bucket.views[p].zero_()
        assert bucket.buffer is not None
        bucket.accumulate = self.stage > 1 and not bucket.fresh
        if not bucket.accumulate:
            bucket.keep_grad_shard()  # (released since the last step: zero_grad)
        out = bucket.grad_shard if not bucket.accumulate else bucket.buffer[bucket.lo:bucket.hi]
        bucket.handle = comm.reduce_scatter(out, bucket.buffer, self.group, async_op=True)
        bucket.launched = True  # (on a group of one there is no handle: the copy is done)
        if self._split:
            bucket.pending = len(bucket.params)  # the next round counts afresh

    def _flush(self) -> None:
        """Stages 2/3: reduce what the last backward left in the buckets, wait, accumulate into
        the gradient shards, release the buffers."""
        if self._split:  # every bucket with a gradient, from the next in launch order on
            n = len(self.buckets)
            for b in [self.buckets[(self._next + i) % n] for i in range(n)]:
                if (b.buffer is not None or b.held) and not b.launched:
                    self._launch(b)
        else:
            for b in self.buckets[self._next:]:
                if b.buffer is not None:  # partly filled (parameters this backward did not reach)
                    self._launch(b)
        self._next = len(self.buckets)
        for b in self.buckets:
            if b.launched:
                self._settle(b)
        if self._split:  # the next step starts a round in every bucket
            self._next = 0
            for b in self.buckets:
                b.pending = len(b.params)

    def _settle(self, b: ShardedBucket) -> None:
        """One launched bucket's end: wait for its reduction, accumulate its shard, release it."""
        if b.handle is not None:
            b.handle.wait()
            b.handle = None
        b.launched = False
        if b.accumulate:
            assert b.buffer is not None
            b.grad_shard.add_(b.buffer[b.lo:b.hi])
        b.fresh = False
        b.release()
        b.filled.clear()

    def finish(self) -> None:
        """After the last backward of the step: every reduced gradient is in the pieces'
        ``.grad`` (the parameters' own ``.grad`` is None: there is no whole reduced gradient)."""
        if self.stage == 1:
            if not self._sync:
                return
            self._launch_rest()
            comm.wait_all([b.handle for b in self.buckets])
            for b in self.buckets:
                b.handle = None
            for p in self.params:
                p.grad = None
        else:
            self._flush()
            for b in self.buckets:
                if b.fresh:  # no gradient reached it this step: zero, as a whole gradient would be
                    b.keep_grad_shard()
                    b.grad_shard.zero_()
                    b.fresh = False
        for b in self.buckets:  # robust to an optimizer.zero_grad(set_to_none=True)
            for p, piece in b.pieces.items():
                if piece.dtype == b.dtype:
                    piece.grad = b.piece_grads[p]

    def zero_grad(self) -> None:
        if self.stage == 1:
            super().zero_grad()  # also zeroes the shards: they are views of the buffers
            return
        for b in self.buckets:  # the next step's first reduction writes the shard afresh
            b.drop_grad_shard()
            b.fresh = True

    def gather_params(self) -> None:
        """Stages 1/2, after the optimizer step: every rank's updated shard to every rank (in
        place: this rank's shard is already where the all-gather puts it)."""
        handles = [comm.all_gather(b.flat, b.shard, self.group, async_op=True) for b in self.buckets]
        comm.wait_all(handles)


def sharded_optimizer(optimizer: torch.optim.Optimizer, syncs: Sequence[ZeroDataParallel]) -> torch.optim.Optimizer:
    """``optimizer``'s class and param groups over this rank's pieces, each parameter's from the
    one of ``syncs`` that reduces it (expert parallelism: the experts' sharded over edp, the rest
    over dp); after every step each of ``syncs`` all-gathers its updated shards (stages 1/2)."""
    def piece(p: nn.Parameter) -> torch.Tensor | None:
        assert any(p in s._bucket_of for s in syncs), "a parameter no ZeRO group reduces"
        return next((q for s in syncs if (q := s.piece(p)) is not None), None)

    groups = [dict(g, params=[q for p in g["params"] if (q := piece(p)) is not None]) for g in optimizer.param_groups]
    sharded = type(optimizer)(groups)
    sharded.register_step_post_hook(lambda *_: [s.after_step() for s in syncs])
    return sharded
