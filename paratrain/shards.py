"""Reading a corpus prepared by ``paratrain prepare-data`` (see :mod:`paratrain.prepare`).

Each shard is memory-mapped (``np.memmap``), never read whole: a batch reads the pages its
sequences touch, so a corpus larger than memory trains with constant RAM. The shards of a split
form one token stream (:class:`TokenStream`); a sequence may run across a shard boundary, so the
batches are drawn exactly as from an in-memory stream (:func:`paratrain.data.get_batch`, a
function of ``(seed, step)`` only: every layout sees the same global batch).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.data import Corpus
from paratrain.errors import ConfigError
from paratrain.prepare import FORMAT, INDEX, SPLITS, VERSION
from paratrain.tokenizer import load_tokenizer


class TokenStream:
    """The shards of one split as one sequence of tokens, indexable by an integer array."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        sizes = np.array([len(a) for a in arrays], dtype=np.int64)
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.arrays) == 1:
            return np.asarray(self.arrays[0][idx])
        out = np.empty(idx.shape, dtype=self.dtype)
        which = np.searchsorted(self.ends, idx, side="right")
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.arrays[k][idx[mask] - self.starts[k]]
        return out


def is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / INDEX).is_file()


def read_index(folder: Path) -> dict[str, Any]:
    """The checked index of a prepared folder (ConfigError naming what is wrong)."""
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--data {folder}: {path} cannot be read as JSON ({e}); prepare the corpus again "
                          f"with paratrain prepare-data.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ConfigError(f"--data {folder}: {path} is not a paratrain token index (format {FORMAT!r}, version "
                          f"{VERSION}); give a folder written by paratrain prepare-data, or a text file or folder.")
    try:
        np.dtype(index["dtype"])
        for name in SPLITS:
            for shard in index["splits"][name]["shards"]:
                if "/" in shard["file"] or shard["file"] in (".", ".."):
                    raise ValueError(f"shard name {shard['file']!r}")
        int(index["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--data {folder}: {path} is damaged ({e}); prepare the corpus again.") from None
    return index


def _open_split(folder: Path, index: dict[str, Any], name: str, verify: bool) -> np.ndarray | TokenStream:
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    arrays = []
    for shard in index["splits"][name]["shards"]:
        path = folder / shard["file"]
        size = path.stat().st_size if path.is_file() else -1
        if size != shard["tokens"] * dtype.itemsize:
            raise ConfigError(f"--data {folder}: shard {shard['file']} is {'missing' if size < 0 else f'{size} bytes'}"
                              f", the index says {shard['tokens']} {dtype.name} tokens; prepare the corpus again.")
        if verify:
            h = hashlib.sha256()
            with path.open("rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
            if h.hexdigest() != shard["sha256"]:
                raise ConfigError(f"--data {folder}: shard {shard['file']} does not match its SHA-256 in {INDEX} "
                                  f"(changed or damaged since prepare-data); prepare the corpus again.")
        if shard["tokens"]:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return arrays[0] if len(arrays) == 1 else TokenStream(arrays)


def load_prepared(folder: Path, verify: bool = False) -> Corpus:
    """The memory-mapped splits of a prepared folder. ``verify``: check every shard's SHA-256
    (``paratrain train`` does, once, before the ranks start)."""
    index = read_index(folder)
    train, val = (_open_split(folder, index, name, verify) for name in SPLITS)
    tokenizer = load_tokenizer(index["tokenizer"], folder)
    if tokenizer.vocab_size != index["vocab_size"]:
        raise ConfigError(f"--data {folder}: its tokenizer has {tokenizer.vocab_size} tokens, the index says "
                          f"{index['vocab_size']}; prepare the corpus again.")
    fingerprint = zlib.crc32((folder / INDEX).read_bytes())  # the index holds every shard's SHA-256
    return Corpus(train, val, f"{folder} (prepared: {index['source']})", index["num_files"],  # type: ignore[arg-type]
                  tokenizer=tokenizer, fingerprint=fingerprint, vocab_size=index["vocab_size"])
