"""``paratrain prepare-data``: tokenize a corpus once into memory-mapped shards (docs/data.md);
and the checks ``paratrain train`` makes of a prepared ``--data`` folder before it starts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from paratrain.errors import ConfigError

DESCRIPTION = """\
Tokenize a text file or a folder of text files once into memory-mapped token shards (uint16 when
the vocabulary fits, else uint32) with an index (index.json: shards, token counts, dtype,
tokenizer, vocabulary size, SHA-256 of each shard). The input is streamed: memory stays constant
however large the corpus. Train on it with: paratrain train --data DIR

examples:
  paratrain prepare-data --data notes/ --tokenizer bytes --out data/notes
  paratrain prepare-data --data corpus.txt --tokenizer bpe --vocab-size 8192 --out data/bpe
  paratrain prepare-data --data more.txt --tokenizer data/bpe/tokenizer.json --out data/more"""


def register(sub: argparse._SubParsersAction) -> None:
    from paratrain.prepare import DEFAULT_BPE_VOCAB, DEFAULT_SHARD_TOKENS

    p = sub.add_parser("prepare-data", help="tokenize a corpus into memory-mapped token shards",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="PATH", required=True, help="text file or folder of text files")
    p.add_argument("--tokenizer", metavar="bytes|bpe|FILE", default="bytes",
                   help="bytes (vocabulary 256), bpe (train a byte-level BPE on the corpus, saved as "
                   "DIR/tokenizer.json; needs pip install 'paratrain[data]') or a tokenizer.json (default: bytes)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_BPE_VOCAB, metavar="V",
                   help=f"tokens of the BPE vocabulary, with --tokenizer bpe (default: {DEFAULT_BPE_VOCAB})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file at most (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--out", metavar="DIR", required=True, help="a new (or empty) folder for the shards")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.prepare import INDEX, prepare

    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be a positive integer, got {args.shard_tokens}.")
    t0 = time.perf_counter()
    index = prepare(args.data, args.tokenizer, args.out, args.vocab_size, args.shard_tokens)
    dt = time.perf_counter() - t0
    train, val = index["splits"]["train"], index["splits"]["val"]
    total = train["tokens"] + val["tokens"]
    print(f"paratrain prepare-data: {index['source']} ({index['num_files']} files) -> {args.out}/\n"
          f"  tokenizer {index['tokenizer']}, vocabulary {index['vocab_size']:,}, {index['dtype']}\n"
          f"  {train['tokens']:,} train tokens in {len(train['shards'])} shard(s), {val['tokens']:,} validation "
          f"tokens in {len(val['shards'])}\n"
          f"  {dt:.1f} s ({total / max(dt, 1e-9):,.0f} tokens/s); index: {Path(args.out) / INDEX}\n"
          f"  train on it: paratrain train --data {args.out}")
    return 0


def data_vocab(cfg: Any) -> Any:
    """The config with the embedding sized for the data: a prepared folder's tokenizer sets
    ``vocab_size`` unless it was given; a given one must hold every token id of the data."""
    from paratrain.shards import is_prepared, read_index
    from paratrain.tokenizer import BYTES_VOCAB

    path = Path(cfg.data).expanduser() if cfg.data else None
    need = read_index(path)["vocab_size"] if path is not None and is_prepared(path) else None
    hf = getattr(cfg, "hf", None)  # a Hugging Face model's vocabulary is its config's: never resized here
    if need is not None and not cfg.vocab_size and hf is None:
        return cfg.replace(vocab_size=need)
    have = cfg.model_config().vocab_size if hf else (cfg.vocab_size or cfg.model_config().vocab_size)
    need = need or BYTES_VOCAB
    if have < need and hf is not None:
        raise ConfigError(f"--hf-config: vocab_size {have:,} is smaller than the data's vocabulary of {need:,} tokens "
                          f"({'the 256 byte tokens' if need == BYTES_VOCAB else 'its tokenizer'}), so token ids up "
                          f"to {need - 1} would index past the embedding. Give vocab_size >= {need} in --hf-config.")
    if have < need:
        raise ConfigError(f"the data's tokenizer has a vocabulary of {need:,} tokens, more than the model's "
                          f"embedding of {have:,} rows (--vocab-size, the model's own or --hf-config's "
                          f"vocab_size), so token ids up to {need - 1} would index past it. Drop --vocab-size "
                          f"(with a prepared --data the "
                          f"embedding follows its tokenizer) or give at least --vocab-size {need}.")
    return cfg


def check_resume_data(cfg: Any, corpus: Any) -> None:
    """A resumed run continues on the tokens it was trained on: the checkpoint's data position
    names the corpus (its fingerprint); other data would not be the same run continued."""
    if not cfg.resume_from:
        return
    from paratrain.checkpoint.manifest import read
    from paratrain.data import CorpusCheck

    saved = read(Path(cfg.resume_from)).config.get("data_position")
    if not isinstance(saved, dict):
        return  # a checkpoint from before data positions were saved
    now = CorpusCheck.of(corpus).crc32
    if saved.get("fingerprint") != now:
        raise ConfigError(f"--resume: the checkpoint {cfg.resume_from} was trained on {saved.get('source')} "
                          f"(fingerprint {saved.get('fingerprint')}), but --data now gives other tokens "
                          f"({corpus.source}, fingerprint {now}); resume with the same data, or start a new run "
                          f"with --init-from.")
