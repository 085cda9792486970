"""ZeRO-3 inside a pipeline: each stage's parameters sharded over its dp group, gathered per
micro-batch (``--zero3-gather microbatch``, the default) or once per step (``step``).

A pipeline stage never runs its model as one call: its schedule runs chunks micro-batch by
micro-batch (``F``, ``B``, or ``I`` and ``W`` of zero-bubble schedules), interleaved with the
other micro-batches' passes, so :mod:`.zero3`'s "the root around the model's forward" has no
place here. Two ways instead (docs/zero3_pipeline.md has the measured trade-off):

* **per micro-batch** (:func:`zero3_per_microbatch`, :class:`ModuleGathering`): a unit is each
  block and each module of the stage spec's ``before`` / ``after`` the rank holds; hooks on that
  module gather it around its forward and again around its backward, for every micro-batch;
  each backward reduce-scatters the gradients it produced (stage 3 of ``zero.py``, one bucket's
  reduction in flight). Traffic per step ``3 m S`` (``S`` the stage's
  parameter bytes); held: ZeRO-3's ``16 psi / n`` plus two units (the one in use, the next one
  prefetched) and one or two units' gradient buckets.
* **once per step** (:class:`PipelineZero3`)::

    before the schedule   all-gather every bucket (S)      allocate whole gradient buckets
    F / B / I / W         the parameters are whole; gradients accumulate in the buckets
                          (``p.grad`` a view, as in ZeRO-1); on the rank's last backward each
                          bucket is reduce-scattered as soon as it is complete
    finish                wait; rank r's reduced shard into ``grad_shard``; buckets released,
                          units freed (0 bytes, placeholders)
    optimizer             AdamW on the pieces of the shard, as ZeRO-3 (nothing gathered after it)

  Traffic per step: all-gather ``S``, reduce-scatter ``S`` -- ZeRO-1's, ``2 (n - 1)/n S`` on
  the wire. Memory: between steps ``16 psi / n``; during the step the stage's whole parameters
  and gradients too, ``(P + G) psi`` (ZeRO-1's peak, plus the shards).

Buckets of the per-step mode are ZeRO-1/2's under a pipeline (``bucket_mb`` runs that never mix
a rank's chunks; the tied embedding alone, so its shards coincide on the first and last stage and
are summed shard by shard); the per-micro-batch units keep the tied embedding alone too (it is
its module's only parameter). Both are :class:`~paratrain.parallel.zero.ShardedBucket` of stage
3: checkpoints, the gradient norm and the optimizer see exactly what they see under ZeRO-3
without a pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.parallel.data import DataParallel, _Bucket
from paratrain.parallel.zero import ShardedBucket, ZeroDataParallel
from paratrain.parallel.zero3 import RunInBackward


class PipelineZero3(ZeroDataParallel):
    """ZeRO-3 of one pipeline rank over its dp ``group``, gathered per step (module docstring).
    ``parts`` / ``alone``: as :class:`ZeroDataParallel`'s (the rank's chunks; the tied embedding)."""

    def __init__(self, module: nn.Module, group: Group, bucket_mb: float = 25.0, overlap: bool = True,
                 parts: Sequence[Sequence[nn.Parameter]] | None = None, alone: Sequence[nn.Parameter] = (),
                 grad_dtype: torch.dtype | None = None, axes: Sequence[str] = ("dp",)) -> None:
        super().__init__(module, group, 3, bucket_mb, overlap, parts=parts, alone=alone, grad_dtype=grad_dtype,
                         axes=axes)
        self.in_step = False

    def begin_step(self) -> None:
        """Before the schedule's first action: every unit whole, every gradient bucket allocated
        (zeroed) with each ``p.grad`` a view into it. Collective over dp."""
        for b in self.buckets:
            b.gather(async_op=True)
        for b in self.buckets:
            b.wait_gathered()
            b.allocate()
            for p in b.params:
                if b.dtype == p.dtype:
                    p.grad = b.views[p]
        self.in_step = True

    # ---- reduction: ZeRO-1's (accumulate whole, reduce once), into the persistent shard ----

    def set_sync(self, sync: bool) -> None:
        assert self.in_step, "begin_step() gathers the units before the schedule runs"
        DataParallel.set_sync(self, sync)

    def _store_grad(self, bucket: _Bucket, p: nn.Parameter) -> None:
        DataParallel._store_grad(self, bucket, p)

    def _launch(self, bucket: _Bucket) -> None:
        assert isinstance(bucket, ShardedBucket) and bucket.buffer is not None
        bucket.keep_grad_shard()  # released between steps (zero_grad); the reduction writes all of it
        bucket.handle = comm.reduce_scatter(bucket.grad_shard, bucket.buffer, self.group, async_op=True)

    def finish(self) -> None:
        """After the rank's last backward: every bucket reduced into its ``grad_shard`` (the
        pieces' ``.grad``), the whole gradients released, the units freed."""
        if not self._sync:
            return
        self._launch_rest()
        comm.wait_all([b.handle for b in self.buckets])
        for p in self.params:
            p.grad = None
        for b in self.buckets:
            b.handle = None
            b.release()
            b.free()
            for p, piece in b.pieces.items():
                if piece.dtype == b.dtype:
                    piece.grad = b.piece_grads[p]
        self.in_step = False

    def zero_grad(self) -> None:
        for b in self.buckets:  # the next step's reduce-scatter writes it afresh: no memory till then
            b.drop_grad_shard()


_AfterBackward = RunInBackward  # on a module's input: runs once that module's backward is done


class ModuleGathering:
    """Per micro-batch gathering inside a pipeline (``--zero3-gather microbatch``): each unit is
    all-gathered by a forward pre-hook on the module that uses it and freed by its forward hook;
    gathered again just before that module's backward (``zero3._BeforeBackward`` on its output)
    and freed right after it (:class:`_AfterBackward` on its input; a module whose input needs
    no gradient, the embedding, is freed when its gradients are reduced). So each use of a unit
    gathers it twice per micro-batch whatever the schedule -- also a zero-bubble ``I``, after
    which the unit is not needed: ``W`` multiplies saved activations only. ``ZeroDataParallel``
    reduce-scatters a unit's gradient after every backward that produced some of it (``I`` and
    ``W`` each, for a block). ``uses``: (module, unit) pairs in backward order, ``chunks`` the
    chunk of each. With ``prefetch`` the unit the chunk uses next is all-gathered while this one
    computes (forward: the next module's; backward: the previous one's), so at most two units of
    a chunk are whole at a time."""

    def __init__(self, uses: Sequence[tuple[nn.Module, ShardedBucket]], chunks: Sequence[int] | None = None,
                 prefetch: bool = True) -> None:
        self.uses = list(uses)
        chunks = list(chunks) if chunks is not None else [0] * len(uses)
        self._hooks = []
        def neighbour(i: int, j: int) -> ShardedBucket | None:  # use j, if it prefetches for use i
            ok = prefetch and 0 <= j < len(uses) and chunks[j] == chunks[i] and uses[j][1] is not uses[i][1]
            return uses[j][1] if ok else None

        for i, (module, unit) in enumerate(uses):
            self._hooks.append(module.register_forward_pre_hook(self._before(unit, neighbour(i, i - 1))))
            self._hooks.append(module.register_forward_hook(self._after(unit, neighbour(i, i + 1))))

    @staticmethod
    def _use(unit: ShardedBucket, nxt: ShardedBucket | None) -> None:
        unit.gather()
        unit.wait_gathered()
        if nxt is not None:
            nxt.gather(async_op=True)

    @staticmethod
    def _before(unit: ShardedBucket, nxt: ShardedBucket | None) -> Any:
        def hook(module: nn.Module, args: Any) -> Any:
            ModuleGathering._use(unit, nxt)
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad and torch.is_grad_enabled():
                return (_AfterBackward.apply(unit.free, args[0]), *args[1:])
            return None
        return hook

    @staticmethod
    def _after(unit: ShardedBucket, nxt: ShardedBucket | None) -> Any:
        from paratrain.parallel.zero3 import _BeforeBackward

        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            unit.free()
            if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
                return _BeforeBackward.apply(lambda: ModuleGathering._use(unit, nxt), out)
            return out
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def pipeline_units(model: nn.Module, stage: Any, stages: Any) -> list[tuple[nn.Module, list[nn.Parameter], int]]:
    """The units of a pipeline rank for per-micro-batch gathering, in backward order (the last
    chunk first; in a chunk the head's modules, the blocks, the embedding's, each reversed): each
    of its blocks, and each module of ``stages.before`` / ``stages.after`` it holds (the tied
    embedding is one module's only parameter, so its shards coincide on the first and last
    stage). A module whose parameters another unit already holds (ZB-V's rank 0 runs both the
    embedding and the head, which share the tied weight) uses that unit: returned with ``[]``.
    Each with the index of the rank's chunk that runs it."""
    out: list[tuple[nn.Module, list[nn.Parameter], int]] = []
    seen: set[int] = set()

    def add(module: nn.Module, chunk: int) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        fresh = [p for p in params if id(p) not in seen]
        assert len(fresh) in (0, len(params)), "a module shares only some of its parameters with another"
        seen.update(id(p) for p in fresh)
        if params:
            out.append((module, fresh, chunk))

    for c in reversed(range(len(stage.chunks))):
        chunk = stage.chunks[c]
        if chunk.has_head:
            for name in reversed(stages.after):
                add(model.get_submodule(name), c)
        for block in reversed(chunk.blocks):
            add(block, c)
        if chunk.embeds:
            for name in reversed(stages.before):
                add(model.get_submodule(name), c)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    assert not missing, f"parameters outside the stage spec's modules: {missing}"
    return out


def zero3_per_microbatch(model: nn.Module, group: Group, stage: Any, stages: Any, bucket_mb: float = 25.0,
                         overlap: bool = True, grad_dtype: torch.dtype | None = None,
                         prefetch: bool = True, axes: Sequence[str] = ("dp",)) -> ZeroDataParallel:
    """ZeRO-3 of one pipeline rank, gathered around every micro-batch's forward and backward
    (:class:`ModuleGathering`); gradients reduce-scattered after every backward, as ZeRO-3
    without a pipeline does (``zero.py``, stage 3)."""
    pairs = pipeline_units(model, stage, stages)
    units = [params for _, params, _ in pairs if params]
    sync = ZeroDataParallel(model, group, 3, bucket_mb, overlap, units=units, grad_dtype=grad_dtype, axes=axes)
    unit_of = {id(p): b for b in sync.buckets for p in b.params}
    uses = [(module, unit_of[id(next(p for p in module.parameters() if p.requires_grad))]) for module, _, _ in pairs]
    sync.gathering = ModuleGathering(uses, [c for _, _, c in pairs], prefetch)
    return sync
