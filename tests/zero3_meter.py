"""Counting ZeRO's transient bytes on a rank as they come and go: each unit's gathered flat
buffer (``ShardedBucket.gather`` / ``free``) and each gradient bucket that exists only during a
backward (``_Bucket.allocate`` / ``release``), exactly, by wrapping those four methods. Used by
tests/distributed/test_zero3_pipeline.py and benchmarks/zero3_pipeline.py."""

from __future__ import annotations

from typing import Any


class TransientMeter:
    """``now``: the bytes live; ``peak``: the most since :meth:`reset`. :meth:`install` wraps the
    methods (in this process, for every bucket), :meth:`remove` restores them."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._saved: list[tuple[type, str, Any]] = []

    def reset(self) -> None:
        """Count the peak afresh from what is live now."""
        self.peak = self.now

    def _add(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def install(self) -> TransientMeter:
        from paratrain.parallel import data, zero

        gather, free = zero.ShardedBucket.gather, zero.ShardedBucket.free
        allocate, release = data._Bucket.allocate, data._Bucket.release
        meter = self

        def gather_(self: Any, async_op: bool = False, tag: Any = None) -> Any:
            was = self.gathered
            out = gather(self, async_op, tag)
            meter._add(0 if was else self.padded * self.flat.element_size())
            return out

        def free_(self: Any) -> None:
            was = self.gathered
            free(self)
            meter._add(-self.padded * self.flat.element_size() if was else 0)

        def allocate_(self: Any, zero: bool = True) -> Any:
            old = self.buffer
            out = allocate(self, zero)
            meter._add(out.numel() * out.element_size() - (0 if old is None else old.numel() * old.element_size()))
            return out

        def release_(self: Any) -> None:
            if self.buffer is not None:
                meter._add(-self.buffer.numel() * self.buffer.element_size())
            release(self)

        for cls, name, fn in ((zero.ShardedBucket, "gather", gather_), (zero.ShardedBucket, "free", free_),
                              (data._Bucket, "allocate", allocate_), (data._Bucket, "release", release_)):
            self._saved.append((cls, name, cls.__dict__[name]))
            setattr(cls, name, fn)
        return self

    def remove(self) -> None:
        for cls, name, fn in reversed(self._saved):
            setattr(cls, name, fn)
        self._saved.clear()
