"""Tokenizers: bytes (the default, vocabulary 256) or a byte-level BPE in a ``tokenizer.json``.

A BPE tokenizer is trained locally on the corpus with the Hugging Face ``tokenizers`` library
(``pip install paratrain[data]``); nothing is downloaded. Byte-level means every byte has a token
of its own before any merge, so any text encodes and decodes back exactly, as with bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from paratrain.errors import ConfigError

BYTES_VOCAB = 256
TOKENIZER_FILE = "tokenizer.json"
MISSING = ("the `tokenizers` package is not installed; --tokenizer bpe and --tokenizer FILE.json need it: "
           "pip install 'paratrain[data]' (or pip install tokenizers), or use --tokenizer bytes.")


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255."""

    name = "bytes"
    vocab_size = BYTES_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> Any:
        import numpy as np

        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        """Invalid UTF-8, and ids beyond a byte (a model with a larger vocabulary can sample them),
        become U+FFFD."""
        return bytes(t if t < BYTES_VOCAB else 0xFF for t in ids).decode("utf-8", errors="replace")


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(MISSING) from None
    return tokenizers


class JsonTokenizer:
    """A ``tokenizers`` tokenizer read from a ``tokenizer.json``."""

    def __init__(self, path: Path, inner: Any = None) -> None:
        self.path = Path(path)
        if inner is None:
            tk = _tokenizers()
            try:
                inner = tk.Tokenizer.from_file(str(path))
            except Exception as e:  # the library raises a bare Exception on a malformed file
                raise ConfigError(f"--tokenizer {path} is not a tokenizers tokenizer.json ({e}); give one "
                                  f"saved by tokenizers' Tokenizer.save, or --tokenizer bpe / bytes.") from None
        self.inner = inner
        self.name = str(path)
        self.vocab_size = int(inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text, add_special_tokens=False).ids)

    def encode_bytes(self, data: bytes) -> Any:
        import numpy as np

        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]  # padded vocabulary rows can be sampled
        return str(self.inner.decode(ids, skip_special_tokens=False))

    def save(self, path: Path) -> None:
        self.inner.save(str(path))


def train_bpe(texts: Iterator[str], vocab_size: int, path: Path) -> JsonTokenizer:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (streamed), saved to ``path``."""
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTES_VOCAB + 1:
        raise ConfigError(f"--vocab-size {vocab_size}: a byte-level BPE needs more than its {BYTES_VOCAB} byte "
                          f"tokens; give at least {BYTES_VOCAB + 1}.")
    inner = tk.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    inner.train_from_iterator(texts, trainer=trainer)
    inner.save(str(path))
    return JsonTokenizer(path, inner)


def load_tokenizer(spec: str | None, folder: Path | None = None) -> Tokenizer:
    """``bytes`` (or None), or the ``tokenizer.json`` at ``spec`` (relative: to ``folder`` first)."""
    if spec in (None, "bytes"):
        return ByteTokenizer()
    path = Path(spec)
    if folder is not None and not path.is_absolute() and (folder / path).exists():
        path = folder / path
    if not path.is_file():
        raise ConfigError(f"--tokenizer {spec}: no such file; give bytes, bpe or the path of a tokenizer.json.")
    return JsonTokenizer(path)
