"""Text corpus, byte-level tokens and layout-independent batches.

The default corpus is the Python standard library's own ``.py`` files, sorted by path and
concatenated: present on every machine with Python, nothing downloaded. Tokens are bytes
(vocabulary 256). Every 20th file (by a CRC of its relative path, so the choice is stable) is
held out for validation. A corpus of fewer than ``FILE_SPLIT_MIN`` files (a single file, a small
folder) is split inside its text instead: the last tenth of the concatenated bytes is held out, so
whether it trains no longer depends on how its file names hash.

The global batch of step ``s`` depends only on ``(seed, s)``: its ``B`` start offsets are drawn
from a generator seeded with ``(seed, s)``. A data-parallel rank takes rows
``[r * B/dp, (r+1) * B/dp)`` of it, so every layout trains on exactly the same sequences.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.errors import ConfigError

VOCAB_SIZE = 256
VAL_EVERY = 20  # one file in 20 goes to the validation split
FILE_SPLIT_MIN = 2 * VAL_EVERY  # fewer files: hold out the text's last tenth (the CRC choice is too lumpy)
VAL_FRACTION = 0.1
_SNIFF_BYTES = 8192  # how much of each file is looked at for NUL bytes (binary data)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# The default corpus, read once per process (0.3 s: 1,790 files): the standard library does not
# change under a running process, and its arrays are read-only. A user's --data is read each time.
_STDLIB: Corpus | None = None
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".toml", ".yaml", ".yml", ".csv", ".c", ".h"}


@dataclass(frozen=True)
class Corpus:
    """Token streams for training and validation, and where they came from: uint8 arrays of
    bytes, or the memory-mapped shards of a prepared folder (:mod:`paratrain.shards`), which
    bring their ``tokenizer``, ``vocab_size`` and ``fingerprint`` (a CRC of their index)."""

    train: np.ndarray
    val: np.ndarray
    source: str
    num_files: int
    warnings: tuple[str, ...] = ()
    tokenizer: Any = None  # None: bytes
    fingerprint: int | None = None
    vocab_size: int | None = None  # None: bytes, the model's own vocabulary

    def describe(self) -> str:
        kind = "bytes" if self.tokenizer is None else f"{self.tokenizer.name}, vocabulary {self.vocab_size:,}"
        return (f"{self.source}: {self.num_files} files, {len(self.train):,} train / "
                f"{len(self.val):,} validation tokens ({kind})")

    def decode(self, tokens: list[int]) -> str:
        return decode(tokens) if self.tokenizer is None else self.tokenizer.decode(tokens)

    @functools.cached_property
    def check(self) -> CorpusCheck:
        """Its :class:`CorpusCheck`, computed once: the CRC of the default corpus (30 MB) took
        18 ms, and every checkpoint records it (the arrays are read-only, so it cannot go stale)."""
        if self.fingerprint is not None:  # prepared shards: their index (never read them all)
            return CorpusCheck(self.source, self.num_files, len(self.train), len(self.val), self.fingerprint)
        crc = zlib.crc32(self.val.data, zlib.crc32(self.train.data))
        return CorpusCheck(self.source, self.num_files, len(self.train), len(self.val), crc)

    def encode(self, text: str) -> list[int]:
        return encode(text) if self.tokenizer is None else self.tokenizer.encode(text)


@dataclass(frozen=True)
class CorpusCheck:
    """What ``paratrain train`` checked before any rank started: a rank that loads the corpus again
    asserts it got the same bytes (a file edited in between would train other ranks on other data)."""

    source: str
    num_files: int
    train_tokens: int
    val_tokens: int
    crc32: int

    @classmethod
    def of(cls, corpus: Corpus) -> CorpusCheck:
        return corpus.check


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffixes: set[str]) -> list[Path]:
    files: list[Path] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        files.extend(Path(d) / n for n in names if Path(n).suffix in suffixes)
    return sorted(files)


def _split(root: Path, files: list[Path], source: str) -> Corpus:
    blobs = [(f, f.read_bytes()) for f in files]
    blobs = [(f, data) for f, data in blobs if data]
    train, val = [], []
    if len(blobs) >= FILE_SPLIT_MIN:
        for f, data in blobs:
            rel = str(f.relative_to(root)) if f != root else f.name
            (val if zlib.crc32(rel.encode()) % VAL_EVERY == 0 else train).append(data)
    if not train or not val:  # a few files, or every one hashed to one side: split the text itself
        blob = b"".join(data for _, data in blobs)
        cut = int(len(blob) * (1 - VAL_FRACTION))
        train, val = [blob[:cut]], [blob[cut:]]
    t = np.frombuffer(b"".join(train), dtype=np.uint8)
    v = np.frombuffer(b"".join(val), dtype=np.uint8)
    binary = [str(f) for f, data in blobs if b"\0" in data[:_SNIFF_BYTES]]
    warnings = (f"{len(binary)} file(s) look binary (NUL bytes), e.g. {binary[0]}; the model will learn those "
                f"bytes as if they were text.",) if binary else ()
    return Corpus(t, v, source, len(files), warnings)


def load_corpus(path: str | None = None, verify: bool = False) -> Corpus:
    """The standard library's sources (``path=None``), a user's text file / folder of files, or a
    folder prepared by ``paratrain prepare-data`` (told by its ``index.json``; ``verify``: check
    its shards' SHA-256)."""
    if path is not None and (Path(path).expanduser() / "index.json").is_file():
        from paratrain.shards import load_prepared

        return load_prepared(Path(path).expanduser(), verify)
    if path is None:
        global _STDLIB
        if _STDLIB is None:
            root = stdlib_root()
            _STDLIB = _split(root, _walk(root, {".py"}), f"Python {sysconfig.get_python_version()} stdlib")
        return _STDLIB
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data path {path!r} does not exist; give a text file or a folder of "
                          f"text files ({', '.join(sorted(_TEXT_SUFFIXES))}), or omit --data for "
                          f"the built-in corpus.")
    files = [p] if p.is_file() else _walk(p, _TEXT_SUFFIXES)
    if not files:
        raise ConfigError(f"data folder {path!r} holds no text files with a suffix among "
                          f"{', '.join(sorted(_TEXT_SUFFIXES))}, and no index.json of a prepared corpus; give "
                          f"a folder of text or one written by paratrain prepare-data.")
    return _split(p if p.is_dir() else p.parent, files, str(p))


def check_corpus(corpus: Corpus, seq_len: int) -> None:
    for name, stream in (("training", corpus.train), ("validation", corpus.val)):
        if len(stream) < seq_len + 2:
            raise ConfigError(f"the {name} split of {corpus.source} has {len(stream)} tokens, too "
                              f"few for sequences of {seq_len}; give more text or a smaller --seq-len.")


TRAIN, VAL = 0, 1  # independent random streams for the two splits


def batch_offsets(num_tokens: int, seq_len: int, batch: int, seed: int, step: int,
                  split: int = TRAIN) -> np.ndarray:
    """Start offsets of the ``batch`` sequences of step ``step``: a function of (seed, step) only."""
    rng = np.random.default_rng([seed, split, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=batch)


def get_batch(stream: np.ndarray, seq_len: int, batch: int, seed: int, step: int,
              rows: slice = slice(None), split: int = TRAIN) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, int64 arrays of shape (rows, seq_len), for the given rows
    of the global batch of ``step``."""
    offsets = batch_offsets(len(stream), seq_len, batch, seed, step, split)[rows]
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    tokens = stream[idx].astype(np.int64)
    return tokens[:, :-1], tokens[:, 1:]


def dp_rows(global_batch: int, dp: int, dp_index: int) -> slice:
    """Rows of the global batch that data-parallel rank ``dp_index`` of ``dp`` trains on."""
    local = global_batch // dp
    return slice(dp_index * local, (dp_index + 1) * local)


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    """Bytes -> text; invalid UTF-8, and ids beyond a byte (which a model with a larger
    vocabulary, e.g. ``tiny-odd``, can sample), become U+FFFD."""
    return bytes(t if t < VOCAB_SIZE else 0xFF for t in tokens).decode("utf-8", errors="replace")
