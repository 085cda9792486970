"""The checkpoint manifest: one JSON file that says what every file of a checkpoint holds.

Pure Python, no torch. A checkpoint folder ``step-N/`` holds one safetensors file per rank that
had something to write, and ``manifest.json``::

    {"format": "paratrain-checkpoint", "version": 1, "step": N,
     "layout": {...}, "config": {...}, "world_size": W,
     "tensors": {"blocks.0.attn.qkv.weight": {"shape": [384, 128], "dtype": "float32",
                 "pieces": [{"file": "rank00000.safetensors", "key": "...", "box": [[0, 192], [0, 128]]},
                            ...]},
                 ...},
     "files": {"rank00000.safetensors": {"sha256": "...", "bytes": 123}, ...},
     "ranks": {"0": {"rng": "rank00000.safetensors"}, ...}}

Every tensor is named as in the reference model's state dict (optimizer state under
``optim.<state>.<parameter>``), with its global (reference) shape; each piece is a box of it
(:mod:`paratrain.checkpoint.boxes`) stored under ``key`` in ``file``. Reading a manifest checks
its structure, that the pieces of each tensor tile it exactly once, and that every file name is a
plain name inside the folder (a ``"file": "../x"`` entry is refused), so a damaged or hostile
manifest is a :class:`CheckpointError`, never a read outside the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paratrain.checkpoint.boxes import Box, full_box, intersect, numel

FORMAT = "paratrain-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool")


class CheckpointError(RuntimeError):
    """A missing, partial, corrupted or incompatible checkpoint (the message names the file)."""


@dataclass(frozen=True)
class Piece:
    file: str
    key: str
    box: Box


@dataclass
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class Manifest:
    step: int
    layout: dict[str, Any]
    config: dict[str, Any]
    world_size: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "step": self.step, "layout": self.layout,
            "config": self.config, "world_size": self.world_size,
            "tensors": {name: {"shape": list(t.shape), "dtype": t.dtype,
                               "pieces": [{"file": p.file, "key": p.key, "box": [list(d) for d in p.box]}
                                          for p in t.pieces]}
                        for name, t in sorted(self.tensors.items())},
            "files": dict(sorted(self.files.items())),
            "ranks": {str(r): v for r, v in sorted(self.ranks.items())},
        }

    def write(self, folder: Path) -> None:
        from paratrain.checkpoint.atomic import atomic_write_bytes

        text = json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)  # C encoder: no indent
        atomic_write_bytes(folder / MANIFEST, text.encode())


def safe_file_name(name: object, where: str) -> str:
    """``name`` if it is a plain file name inside the checkpoint folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name):
        raise CheckpointError(f"{where}: file name {name!r} is not a plain name inside the checkpoint folder; "
                              f"the manifest is damaged or was not written by paratrain.")
    return name


def _int(value: object, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CheckpointError(f"{where}: expected an integer >= {minimum}, got {value!r}.")
    return value


def _box(raw: object, shape: tuple[int, ...], where: str) -> Box:
    if not isinstance(raw, list) or len(raw) != len(shape):
        raise CheckpointError(f"{where}: a box needs one [offset, length] per dimension of {list(shape)}, got {raw!r}.")
    out = []
    for d, (pair, n) in enumerate(zip(raw, shape)):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CheckpointError(f"{where}: dimension {d} of the box is {pair!r}, not [offset, length].")
        off, length = _int(pair[0], where), _int(pair[1], where, 1)
        if off + length > n:
            raise CheckpointError(f"{where}: box {raw} reaches past the tensor's shape {list(shape)}.")
        out.append((off, length))
    return tuple(out)


def parse(raw: object, path: Path) -> Manifest:
    """A :class:`Manifest` from decoded JSON, every field checked (CheckpointError otherwise)."""
    where = str(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a paratrain checkpoint manifest (no \"format\": \"{FORMAT}\").")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{where}: manifest version {raw.get('version')!r}; this paratrain reads {VERSION}.")
    for key, kind in (("layout", dict), ("config", dict), ("tensors", dict), ("files", dict), ("ranks", dict)):
        if not isinstance(raw.get(key), kind):
            raise CheckpointError(f"{where}: \"{key}\" is missing or not an object.")
    files = {}
    for name, info in raw["files"].items():
        safe_file_name(name, where)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{where}: file {name!r} has no SHA-256.")
        files[name] = info
    m = Manifest(_int(raw.get("step"), where), raw["layout"], raw["config"], _int(raw.get("world_size"), where, 1),
                 files=files)
    for name, t in raw["tensors"].items():
        tw = f"{where}: tensor {name!r}"
        if not isinstance(t, dict) or not isinstance(t.get("shape"), list) or not isinstance(t.get("pieces"), list):
            raise CheckpointError(f"{tw} has no shape or pieces.")
        shape = tuple(_int(n, tw) for n in t["shape"])
        if t.get("dtype") not in DTYPES:
            raise CheckpointError(f"{tw}: dtype {t.get('dtype')!r} is not one of {', '.join(DTYPES)}.")
        entry = TensorEntry(shape, t["dtype"])
        for p in t["pieces"]:
            if not isinstance(p, dict) or not isinstance(p.get("key"), str):
                raise CheckpointError(f"{tw}: a piece has no key.")
            file = safe_file_name(p.get("file"), tw)
            if file not in files:
                raise CheckpointError(f"{tw}: piece in {file!r}, a file the manifest does not list.")
            entry.pieces.append(Piece(file, p["key"], _box(p.get("box"), shape, tw)))
        check_tiling(name, entry, where)
        m.tensors[name] = entry
    for r, info in raw["ranks"].items():
        if not (isinstance(r, str) and r.isdigit()) or not isinstance(info, dict):
            raise CheckpointError(f"{where}: \"ranks\" entry {r!r} is not a rank number with an object.")
        m.ranks[int(r)] = info
    return m


def check_tiling(name: str, entry: TensorEntry, where: str) -> None:
    """The pieces of a tensor cover every element exactly once (no hole would be read as zeros,
    no overlap would make the result depend on reading order)."""
    total = sum(numel(p.box) for p in entry.pieces)
    expected = numel(full_box(entry.shape))
    if total != expected:
        raise CheckpointError(f"{where}: tensor {name!r} has {total} of its {expected} elements in its pieces; "
                              f"the checkpoint is incomplete.")
    pieces = entry.pieces
    if len(pieces) <= 64:  # pairwise check; a larger tiling was made by our own writer
        for i, a in enumerate(pieces):
            for b in pieces[i + 1:]:
                if intersect(a.box, b.box) is not None:
                    raise CheckpointError(f"{where}: tensor {name!r} has overlapping pieces {a.box} and {b.box}.")


def read(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a complete paratrain checkpoint: {MANIFEST} is missing.") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}.") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the checkpoint is damaged.") \
            from None
    return parse(raw, path)
