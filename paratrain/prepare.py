"""``paratrain prepare-data``: tokenize a text corpus once into memory-mapped token shards.

The input (a file, or a folder of text files walked as :func:`paratrain.data.load_corpus` walks
it) is streamed in chunks of ``CHUNK_BYTES``: memory stays constant however large the corpus.
Files go to the training or the validation split by the same rule as ``train --data TEXT``
(one file in ``VAL_EVERY`` by a CRC of its path; a corpus of few files holds out the last tenth
of its concatenated bytes), so with ``--tokenizer bytes`` a prepared folder holds exactly the
tokens ``train --data TEXT`` trains on. Each split is written as raw little-endian shards of at
most ``shard_tokens`` tokens (uint16 when the vocabulary fits in 16 bits, else uint32)::

    DIR/index.json  DIR/train-00000.bin ...  DIR/val-00000.bin ...  [DIR/tokenizer.json]

``index.json`` (written last, atomically: a folder without it is not a prepared corpus)::

    {"format": "paratrain-tokens", "version": 1, "tokenizer": "bytes" | "tokenizer.json",
     "vocab_size": 256, "dtype": "uint16", "source": "...", "num_files": 3, "split": "files" | "text",
     "splits": {"train": {"tokens": N, "shards": [{"file": "train-00000.bin", "tokens": N,
                                                   "sha256": "..."}]}, "val": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.data import _TEXT_SUFFIXES, FILE_SPLIT_MIN, VAL_EVERY, VAL_FRACTION, _walk
from paratrain.errors import ConfigError
from paratrain.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

FORMAT = "paratrain-tokens"
VERSION = 1
INDEX = "index.json"
CHUNK_BYTES = 1 << 20  # read (and tokenize) this much text at a time
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MiB of uint16 per shard
DEFAULT_BPE_VOCAB = 4096
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class Source:
    """The input files, in order, each with the split it goes to (``split == "text"``: none yet;
    the concatenation is cut at byte ``cut``)."""

    root: Path
    files: list[Path]
    assign: list[int]  # 0 train, 1 val, per file (split "files")
    split: str
    cut: int
    label: str


def find_source(path: str) -> Source:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--data {path!r} does not exist; give a text file or a folder of text files "
                          f"({', '.join(sorted(_TEXT_SUFFIXES))}).")
    files = [p] if p.is_file() else _walk(p, _TEXT_SUFFIXES)
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise ConfigError(f"--data {path!r} holds no text: no non-empty file with a suffix among "
                          f"{', '.join(sorted(_TEXT_SUFFIXES))}; give a corpus with some text in it.")
    root = p if p.is_dir() else p.parent
    assign = [0] * len(files)
    if len(files) >= FILE_SPLIT_MIN:
        rels = [str(f.relative_to(root)) if f != root else f.name for f in files]
        assign = [1 if zlib.crc32(r.encode()) % VAL_EVERY == 0 else 0 for r in rels]
    split = "files" if 0 < sum(assign) < len(assign) else "text"
    total = sum(f.stat().st_size for f in files)
    return Source(root, files, assign, split, int(total * (1 - VAL_FRACTION)), str(p))


def _chunks(f: Path, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of ``f`` in pieces of about CHUNK_BYTES, each ending after a newline
    where there is one (a BPE then never sees a word cut in two by the chunking)."""
    carry = b""
    with f.open("rb") as fh:
        fh.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            data = fh.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            data = carry + data
            end = data.rfind(b"\n") + 1
            if end == 0 and len(data) < 4 * CHUNK_BYTES:
                carry = data
                continue
            end = end or len(data)
            carry = data[end:]
            yield data[:end]
    if carry:
        yield carry


def stream(src: Source) -> Iterator[tuple[int, bytes]]:
    """(split, text bytes) in corpus order, the split rule of :mod:`paratrain.data` applied."""
    if src.split == "files":
        for f, side in zip(src.files, src.assign):
            for chunk in _chunks(f):
                yield side, chunk
        return
    offset = 0
    for f in src.files:
        size = f.stat().st_size
        if offset + size <= src.cut:
            pieces = [(0, None, 0)]
        elif offset >= src.cut:
            pieces = [(0, None, 1)]
        else:
            pieces = [(0, src.cut - offset, 0), (src.cut - offset, None, 1)]
        for start, stop, side in pieces:
            for chunk in _chunks(f, start, stop):
                yield side, chunk
        offset += size


class ShardWriter:
    """Appends tokens to ``prefix-NNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.prefix, self.dtype, self.limit = folder, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.fh: Any = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self.fh = (self.folder / name).open("wb")
        self.hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(data):
            if self.fh is None or self.shards[-1]["tokens"] == self.limit:
                self._finish()
                self._open()
            room = self.limit - self.shards[-1]["tokens"]
            part, data = data[:room], data[room:]
            raw = part.tobytes()
            self.fh.write(raw)
            self.hash.update(raw)
            self.shards[-1]["tokens"] += len(part)

    def _finish(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.shards[-1]["sha256"] = self.hash.hexdigest()
            self.fh = None

    def close(self) -> dict[str, Any]:
        self._finish()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; give a new folder "
                          f"(prepare-data never writes over files).")


def prepare(data: str, tokenizer: str, out: str, vocab_size: int = DEFAULT_BPE_VOCAB,
            shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict[str, Any]:
    """Tokenize ``data`` into ``out`` (see the module docstring); returns the index."""
    src = find_source(data)
    folder = Path(out)
    _check_out(folder)
    tok: Tokenizer
    if tokenizer == "bpe":
        folder.mkdir(parents=True, exist_ok=True)
        texts = (chunk.decode("utf-8", errors="replace") for side, chunk in stream(src) if side == 0)
        tok = train_bpe(texts, vocab_size, folder / TOKENIZER_FILE)
    else:
        tok = load_tokenizer(tokenizer)
        folder.mkdir(parents=True, exist_ok=True)
        if not isinstance(tok, ByteTokenizer):
            tok.save(folder / TOKENIZER_FILE)  # type: ignore[attr-defined]  # the folder is self-contained
    dtype = token_dtype(tok.vocab_size)
    writers = [ShardWriter(folder, name, dtype, shard_tokens) for name in SPLITS]
    for side, chunk in stream(src):
        writers[side].write(tok.encode_bytes(chunk))  # type: ignore[attr-defined]
    splits = {name: w.close() for name, w in zip(SPLITS, writers)}
    index = {"format": FORMAT, "version": VERSION,
             "tokenizer": "bytes" if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE,
             "vocab_size": tok.vocab_size, "dtype": dtype.name, "source": src.label, "num_files": len(src.files),
             "split": src.split, "splits": splits}
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, folder / INDEX)  # last and atomic: a folder with an index is complete
    return index
