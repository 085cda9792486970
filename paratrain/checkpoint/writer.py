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
tensors (safetensors allows none).
"""

from __future__ import annotations

import functools
import hashlib
import json
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
    """The host memory one saver stages into; reused while the shards keep their shapes."""

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._slots: list[torch.Tensor] = []
        self._order: list[int] = []
        self._header = b""

    def _plan(self, items: list[tuple[str, torch.Tensor]], pin: bool) -> None:
        order = sorted(range(len(items)), key=lambda i: -items[i][1].element_size())
        header: dict[str, Any] = {}
        spans, at = [], 0
        for i in order:
            k, t = items[i]
            if t.dtype not in CODES:
                raise ValueError(f"checkpoint tensor {k!r}: dtype {t.dtype} is not one safetensors stores here.")
            n = t.numel() * t.element_size()
            header[k] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            spans.append((at, n, t))
            at += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._header = struct.pack("<Q", len(text)) + text
        self._buffer = torch.empty(at, dtype=torch.uint8, pin_memory=pin)
        self._slots = [self._buffer[o:o + n].view(t.dtype).view(t.shape) for o, n, t in spans]
        self._order = order

    def stage(self, shards: list[Shard], local: dict[str, torch.Tensor]) -> Staged:
        """Copy ``shards`` and ``local`` into the buffer (the part of a save training waits for)."""
        items = [(s.key, s.data) for s in shards] + [(f"rank/{k}", v) for k, v in local.items()]
        signature = tuple((k, t.dtype, tuple(t.shape)) for k, t in items)
        on_gpu = any(t.is_cuda for _, t in items)
        if signature != self._signature:
            self._plan(items, pin=on_gpu and torch.cuda.is_available())
            self._signature = signature
        with torch.no_grad():
            for slot, i in zip(self._slots, self._order):
                slot.copy_(items[i][1], non_blocking=on_gpu)
        if on_gpu:
            torch.cuda.synchronize()
        return Staged(self._header, self._buffer, [s.entry for s in shards], sorted(local))


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
