"""ZeRO-3 inside a pipeline: each stage's parameters sharded over its dp group, gathered once per
step.

A pipeline stage never runs its model as one call: its schedule runs chunks micro-batch by
micro-batch (``F``, ``B``, or ``I`` and ``W`` of zero-bubble schedules), interleaved with the
other micro-batches' passes. So instead of gathering a unit around each forward and backward
(:mod:`.zero3`, which would all-gather every unit ``2 m`` times per step), a pipeline rank
gathers all its units **once per step**, before its first action, keeps them whole for every
micro-batch, and reduce-scatters each bucket's gradient **once per step**, after the stage's last
backward (its last ``W`` under a zero-bubble schedule)::

    before the schedule   all-gather every bucket (S)      allocate whole gradient buckets
    F / B / I / W         the parameters are whole; gradients accumulate in the buckets
                          (``p.grad`` a view, as in ZeRO-1); on the rank's last backward each
                          bucket is reduce-scattered as soon as it is complete
    finish                wait; rank r's reduced shard into ``grad_shard``; buckets released,
                          units freed (0 bytes, placeholders)
    optimizer             AdamW on the pieces of the shard, as ZeRO-3 (nothing gathered after it)

Traffic per step: all-gather ``S``, reduce-scatter ``S`` -- ZeRO-1's, ``2 (n - 1)/n S`` on the
wire, where re-gathering per micro-batch would send ``3 m (n - 1)/n S``. Memory: between steps
``16 psi / n`` (ZeRO-3's model states); during the step the stage's whole parameters and
gradients too, ``(P + G) psi`` (ZeRO-1's peak). Why this and not per micro-batch: docs/zero.md,
"ZeRO-3 inside a pipeline".

Buckets are ZeRO-1/2's under a pipeline (``bucket_mb`` runs that never mix a rank's chunks; the
tied embedding alone, so its shards coincide on the first and last stage and are summed shard by
shard), each a :class:`~paratrain.parallel.zero.ShardedBucket` of stage 3: checkpoints, the
gradient norm and the optimizer see exactly what they see under ZeRO-3 without a pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.parallel.data import DataParallel, _Bucket
from paratrain.parallel.zero import ShardedBucket, ZeroDataParallel


class PipelineZero3(ZeroDataParallel):
    """ZeRO-3 of one pipeline rank over its dp ``group``, gathered per step (module docstring).
    ``parts`` / ``alone``: as :class:`ZeroDataParallel`'s (the rank's chunks; the tied embedding)."""

    def __init__(self, module: nn.Module, group: Group, bucket_mb: float = 25.0, overlap: bool = True,
                 parts: Sequence[Sequence[nn.Parameter]] | None = None, alone: Sequence[nn.Parameter] = (),
                 grad_dtype: torch.dtype | None = None) -> None:
        super().__init__(module, group, 3, bucket_mb, overlap, parts=parts, alone=alone, grad_dtype=grad_dtype)
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
        for b in self.buckets:
            b.grad_shard.zero_()  # (overwritten by the next reduce-scatter anyway)
