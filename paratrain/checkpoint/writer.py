"""One rank's safetensors file, written straight from a reusable host buffer.

The safetensors layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{key: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}``, padded with spaces to
a multiple of 8), then the tensors' bytes back to back, offsets counted from the end of the header.

A save of a rank's shards here is::

    stage   copy every shard into its slot of one preallocated byte buffer   <- training waits
    write   the header, then the buffer in 256 KiB system calls straight from it: no bytes
            object per tensor, no serialised copy of the file in memory
    hash    SHA-256 of header + buffer on a second thread while the file is written and fsynced
            (hashlib releases the GIL), i.e. the digest of the file without reading it back

The buffer is kept for the next save of the same shapes (a training run saves the same shards
every time), so staging allocates nothing and touches no fresh pages; it is pinned when the
state lives on a GPU, so the device-to-host copies are asynchronous DMA. Slots are ordered by
element size (largest first), so every slot is aligned for its dtype with no padding between
tensors (safetensors allows none), then by where their sources lie in memory, so that shards
that are neighbours there (the boxes of one flat ZeRO range) are copied as one byte range. The
copies themselves are planned once too: a later save of the same shards is one
``torch._foreach_copy_`` call, checked only for the same objects at the same addresses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paratrain.checkpoint.boxes import Box

CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
         torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8", torch.bool: "bool"}
# Bytes per write(2). Measured here (28 MiB files, the page cache already holding earlier
# checkpoints, as in any run that saves more than once): writes of 4 MiB or more cost 70 ms of CPU
# in the kernel, 256 KiB ones 8-10 ms (large page-cache folios need memory compaction; small ones
# do not); below 256 KiB the system calls themselves start to show.
_CHUNK = 256 << 10
_HASH_ON_THREAD = 1 << 20  # below this a thread costs more than the hash


@dataclass
class Shard:
    """One box of one global tensor, as this rank holds it."""

    name: str
    shape: tuple[int, ...]
    box: Box
    data: torch.Tensor  # shaped like the box; a view into the live tensor

    @functools.cached_property
    def key(self) -> str:
        """Its key in the file (cached: a run saves the same shards every time)."""
        return key(self.name, self.box)

    @functools.cached_property
    def entry(self) -> dict[str, Any]:
        """What the manifest records of it."""
        return {"name": self.name, "shape": list(self.shape), "dtype": NAMES[self.data.dtype], "key": self.key,
                "box": [list(d) for d in self.box]}


def key(name: str, box: Box) -> str:
    return name + "@" + ",".join(f"{o}+{n}" for o, n in box)


@dataclass
class Staged:
    """A rank's file, ready to write: header bytes, the data section, and what it holds."""

    header: bytes  # length prefix + padded JSON
    data: torch.Tensor  # uint8, the data section (the host buffer)
    tensors: list[dict[str, Any]]  # the fragment's entries: name, shape, dtype, key, box
    local: list[str]  # names of the rank-local tensors (stored as ``rank/<name>``)


class HostBuffer:
    """The host memory one saver stages into, and the copies that fill it: planned at the first
    save and reused while the same shards are saved (same objects, views of the same memory).

    The copies: a shard whose view is contiguous and starts where the previous slot's source ends
    in the same storage (the 2-3 boxes of one flat ZeRO range, a fused qkv's three row blocks, the
    pieces of one ZeRO-3 bucket) is copied with it as one byte range, and every copy of a save is
    one ``torch._foreach_copy_`` call: per save a few dozen copies instead of one Python-level
    ``copy_`` per box (187 of them on a ZeRO-3 rank of ``small``)."""

    def __init__(self) -> None:
        self._signature: tuple | None = None  # (key, dtype, shape) of every item: the file's layout
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._header = b""
        self._slots: list[torch.Tensor] = []  # per item (in item order): its typed view of the buffer
        self._order: list[int] = []  # the items in buffer order
        self._shards: list[Shard] = []  # the shards the copies were bound to, their views,
        self._views: list[torch.Tensor] = []  # and the views' shapes and addresses
        self._shapes: list[torch.Size] = []
        self._ptrs: list[int] = []
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self._entries: list[dict[str, Any]] = []
        self._on_gpu = False

    def _plan(self, items: list[tuple[str, torch.Tensor]], pin: bool) -> None:
        """The file's layout: slots by element size, largest first (every slot aligned for its
        dtype, no padding), and within a size in the order of their memory (each storage where
        it first appears, then by offset in it), so that neighbours in memory are neighbours in
        the buffer. Deterministic: no address decides it."""
        first_seen: dict[int, int] = {}
        for _, t in items:
            first_seen.setdefault(_storage_ptr(t), len(first_seen))
        order = sorted(range(len(items)), key=lambda i: (-items[i][1].element_size(),
                                                         first_seen[_storage_ptr(items[i][1])],
                                                         items[i][1].storage_offset()))
        header: dict[str, Any] = {}
        spans: dict[int, tuple[int, int]] = {}
        at = 0
        for i in order:
            k, t = items[i]
            if t.dtype not in CODES:
                raise ValueError(f"checkpoint tensor {k!r}: dtype {t.dtype} is not one safetensors stores here.")
            n = t.numel() * t.element_size()
            header[k] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            spans[i] = (at, n)
            at += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._header = struct.pack("<Q", len(text)) + text
        self._buffer = torch.empty(at, dtype=torch.uint8, pin_memory=pin)
        self._slots = [self._buffer[o:o + n].view(t.dtype).view(t.shape) for (o, n), (_, t)
                       in zip((spans[i] for i in range(len(items))), items)]
        self._order = order

    def _bind(self, shards: list[Shard], views: list[torch.Tensor]) -> None:
        """The copies from ``views`` (the shards' data) into their slots, neighbours merged."""
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        run: list = []  # the open byte run: [buffer offset, storage, storage byte offset, bytes]
        base = self._buffer.data_ptr()

        def close() -> None:
            if run:
                at, storage, off, n = run
                dst.append(self._buffer[at:at + n])
                src.append(torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, off, (n,)))
                run.clear()

        for i in self._order:
            if i >= len(views):  # the rank-local tensors: copied on their own (fresh every save)
                continue
            t, slot = views[i], self._slots[i]
            n = t.numel() * t.element_size()
            if n == 0:
                continue
            if not t.is_contiguous():
                close()
                dst.append(slot)
                src.append(t)
                continue
            storage, off, at = t.untyped_storage(), t.storage_offset() * t.element_size(), slot.data_ptr() - base
            if run and run[1].data_ptr() == storage.data_ptr() and run[1].device == storage.device \
                    and run[2] + run[3] == off and run[0] + run[3] == at:
                run[3] += n
                continue
            close()
            run.extend([at, storage, off, n])
        close()
        self._dst, self._src = dst, src
        self._shards, self._views = list(shards), views
        self._shapes, self._ptrs = [t.shape for t in views], [t.data_ptr() for t in views]
        self._entries = [s.entry for s in shards]
        self._on_gpu = any(t.is_cuda for t in views)

    def _bound(self, shards: list[Shard], views: list[torch.Tensor]) -> bool:
        """Whether the copies planned last still hold: the same shard objects, with the same
        view objects, of the same shapes at the same addresses (one C-level pass each)."""
        return (len(shards) == len(self._shards) and all(map(operator.is_, shards, self._shards))
                and all(map(operator.is_, views, self._views)) and [t.shape for t in views] == self._shapes
                and [t.data_ptr() for t in views] == self._ptrs)

    def stage(self, shards: list[Shard], local: dict[str, torch.Tensor]) -> Staged:
        """Copy ``shards`` and ``local`` into the buffer (the part of a save training waits for)."""
        views = [s.data for s in shards]
        names = sorted(local)
        if not self._bound(shards, views) or self._signature is None \
                or self._signature[len(views):] != tuple((f"rank/{k}", local[k].dtype, tuple(local[k].shape))
                                                         for k in local):
            items = [(s.key, s.data) for s in shards] + [(f"rank/{k}", v) for k, v in local.items()]
            signature = tuple((k, t.dtype, tuple(t.shape)) for k, t in items)
            on_gpu = any(t.is_cuda for _, t in items)
            if signature != self._signature:
                self._plan(items, pin=on_gpu and torch.cuda.is_available())
                self._signature = signature
            self._bind(shards, views)
        with torch.no_grad():
            if self._dst:
                torch._foreach_copy_(self._dst, self._src, non_blocking=self._on_gpu)
            for slot, v in zip(self._slots[len(views):], local.values()):
                slot.copy_(v, non_blocking=v.is_cuda)
        if self._on_gpu or any(v.is_cuda for v in local.values()):
            torch.cuda.synchronize()
        return Staged(self._header, self._buffer, self._entries, names)


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data[:_CHUNK])
        data = data[n:]


def write_file(path: Path, staged: Staged) -> tuple[str, int]:
    """Write ``staged`` to ``path`` (temporary name, fsync, rename); its SHA-256 and size.
    The folder's entry is made durable by the commit's one fsync of the folder."""
    data = memoryview(staged.data.numpy()).cast("B")
    digest = hashlib.sha256(staged.header)
    hasher = None
    if len(data) >= _HASH_ON_THREAD:
        hasher = threading.Thread(target=digest.update, args=(data,), name="checkpoint-sha256", daemon=True)
        hasher.start()
    else:
        digest.update(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, memoryview(staged.header))
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if hasher is not None:
            hasher.join()
        tmp.unlink(missing_ok=True)
    return digest.hexdigest(), len(staged.header) + len(data)
