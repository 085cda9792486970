"""`paratrain prepare-data` and reading its shards, in this process: the shards hold the tokens
`train --data TEXT` trains on, the index is exact, memory does not grow with the corpus, batches
cross shard boundaries exactly as an in-memory stream, and bad input is one paragraph, exit 2."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from paratrain import prepare as pr
from paratrain.cli import main
from paratrain.data import dp_rows, get_batch, load_corpus
from paratrain.shards import TokenStream

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "import", "class", "é", "→"]


def write_text(path: Path, num_bytes: int, seed: int = 0) -> Path:
    """About ``num_bytes`` of random lines of WORDS (a 64 KiB block, repeated: quick to make)."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < min(num_bytes, 1 << 16):
        line = " ".join(rng.choice(WORDS) for _ in range(10)) + "\n"
        lines.append(line)
        size += len(line.encode())
    block = "".join(lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(block * max(1, num_bytes // len(block)))
    return path


@pytest.mark.parametrize("num_files", [1, 45])  # the text split (last tenth) and the per-file CRC split
def test_bytes_shards_hold_exactly_the_text_corpus(tmp_path, num_files, monkeypatch):
    monkeypatch.setattr(pr, "CHUNK_BYTES", 1000)  # many chunks per file: the chunking must not show
    src = tmp_path / "src"
    for i in range(num_files):
        write_text(src / f"d{i % 3}" / f"f{i}.txt", 3000 + 17 * i, seed=i)
    (src / "empty.txt").write_text("")
    index = pr.prepare(str(src), "bytes", str(tmp_path / "p"), shard_tokens=1000)
    assert index["split"] == ("files" if num_files >= pr.FILE_SPLIT_MIN else "text")
    text, prepared = load_corpus(str(src)), load_corpus(str(tmp_path / "p"), verify=True)
    for a, b in ((text.train, prepared.train), (text.val, prepared.val)):
        assert np.array_equal(a, b[np.arange(len(b))])
    assert index["dtype"] == "uint16" and index["vocab_size"] == 256 and index["tokenizer"] == "bytes"
    for name in pr.SPLITS:
        split = index["splits"][name]
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert all(s["tokens"] <= 1000 for s in split["shards"])
        for s in split["shards"]:
            assert hashlib.sha256((tmp_path / "p" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert len(index["splits"]["train"]["shards"]) > 1


def test_batches_across_shards_are_those_of_one_stream():
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 300, size=5000).astype(np.uint16)
    stream = TokenStream([whole[:1200], whole[1200:1201], whole[1201:4000], whole[4000:]])
    assert len(stream) == len(whole)
    for step in range(1, 6):
        want = get_batch(whole, 64, 8, seed=3, step=step)
        got = get_batch(stream, 64, 8, seed=3, step=step)  # type: ignore[arg-type]
        assert all(np.array_equal(a, b) for a, b in zip(want, got))
        parts = [get_batch(stream, 64, 8, 3, step, dp_rows(8, 4, r))[0] for r in range(4)]  # type: ignore[arg-type]
        assert np.array_equal(np.concatenate(parts), want[0])  # layout-free: dp ranks slice the global batch


def test_token_dtype_follows_the_vocabulary():
    assert pr.token_dtype(256) == np.uint16 and pr.token_dtype(65536) == np.uint16
    assert pr.token_dtype(65537) == np.uint32 and pr.token_dtype(128_256) == np.uint32


def _peak_bytes(tmp_path: Path, name: str, num_bytes: int) -> int:
    src = write_text(tmp_path / f"{name}.txt", num_bytes)
    tracemalloc.start()
    pr.prepare(str(src), "bytes", str(tmp_path / name), shard_tokens=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(pr, "CHUNK_BYTES", 1 << 16)
    small = _peak_bytes(tmp_path, "small", 1 << 20)  # 1 MiB of text
    large = _peak_bytes(tmp_path, "large", 10 << 20)  # 10 MiB
    # a few chunks' worth (64 KiB each, and their uint16 copies) either way; reading the corpus
    # whole would show 10 MiB+ in the large case
    assert large < 2 * small + (256 << 10) and large < 2 << 20, (small, large)
    corpus = load_corpus(str(tmp_path / "large"))
    tracemalloc.start()
    for step in range(1, 4):
        get_batch(corpus.train, 128, 16, 0, step)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20  # the batches' pages, not the shards


def test_bpe_trains_locally_round_trips_and_is_reused(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    src = write_text(tmp_path / "c.txt", 60_000)
    assert main(["prepare-data", "--data", str(src), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--out", str(tmp_path / "bpe")]) == 0
    assert "train on it: paratrain train --data" in capsys.readouterr().out
    corpus = load_corpus(str(tmp_path / "bpe"), verify=True)
    index = json.loads((tmp_path / "bpe" / "index.json").read_text())
    assert index["tokenizer"] == "tokenizer.json" and 256 < index["vocab_size"] <= 300
    tokens = corpus.train[np.arange(len(corpus.train))]
    assert corpus.vocab_size == index["vocab_size"] and int(tokens.max()) < index["vocab_size"]
    text = src.read_text(encoding="utf-8")
    ids = corpus.encode(text[:500])
    assert len(ids) < 250 and corpus.decode(ids) == text[:500]  # merges, and byte-level exactness
    assert main(["prepare-data", "--data", str(src), "--tokenizer", str(tmp_path / "bpe" / "tokenizer.json"),
                 "--out", str(tmp_path / "again")]) == 0
    for name in ("train-00000.bin", "val-00000.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "bpe" / name).read_bytes()


def test_sampling_decodes_through_the_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    import torch

    from paratrain.models.configs import get_model_config
    from paratrain.models.gpt import build_reference
    from paratrain.train import sample_text

    src = write_text(tmp_path / "c.txt", 30_000)
    pr.prepare(str(src), "bpe", str(tmp_path / "bpe"), vocab_size=280)
    corpus = load_corpus(str(tmp_path / "bpe"))
    cfg = get_model_config("tiny-odd", vocab_size=corpus.vocab_size)
    state = build_reference(cfg, 0).state_dict()
    got = sample_text(cfg, state, 8, 0, corpus=corpus)
    model = build_reference(cfg, 0)
    idx = torch.tensor([corpus.encode("def ")])
    ids = model.generate(idx, 8, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))[0].tolist()
    assert got == corpus.decode(ids) and got.startswith("def ")


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("paratrain: error: ") and "Traceback" not in err
    return " ".join(err.split())


def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, capsys):
    assert "does not exist" in _err(capsys, ["prepare-data", "--data", str(tmp_path / "nope"), "--out", "x"])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    assert "holds no text" in _err(capsys, ["prepare-data", "--data", str(tmp_path / "blank"), "--out", "x"])
    src = write_text(tmp_path / "c.txt", 5000)
    pr.prepare(str(src), "bytes", str(tmp_path / "p"))
    assert "not an empty folder" in _err(capsys, ["prepare-data", "--data", str(src), "--out", str(tmp_path / "p")])
    assert "no such file" in _err(capsys, ["prepare-data", "--data", str(src), "--tokenizer", "tok.json",
                                           "--out", str(tmp_path / "q")])
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "x.bin").write_bytes(b"\0" * 10)
    train = ["train", "--steps", "1", "--quiet", "--out", str(tmp_path / "run")]
    err = _err(capsys, [*train, "--data", str(binary)])
    assert "neither" not in err and "no index.json of a prepared corpus" in err
    assert "more than the model's embedding" in _err(capsys, [*train, "--data", str(tmp_path / "p"),
                                                              "--vocab-size", "200"])
    (tmp_path / "short.txt").write_text("x" * 300)
    pr.prepare(str(tmp_path / "short.txt"), "bytes", str(tmp_path / "short"))  # 30 validation tokens
    assert "30 tokens, too few for sequences of 64" in _err(capsys, [*train, "--data", str(tmp_path / "short"),
                                                                     "--seq-len", "64"])
    shard = tmp_path / "p" / "train-00000.bin"
    shard.write_bytes(b"\1\0" + shard.read_bytes()[2:])  # same size, one token changed
    assert "does not match its SHA-256" in _err(capsys, [*train, "--data", str(tmp_path / "p")])


def test_tensorboard_missing_is_exit_2(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    src = write_text(tmp_path / "c.txt", 5000)
    err = _err(capsys, ["train", "--data", str(src), "--tensorboard", "--steps", "1", "--quiet",
                        "--out", str(tmp_path / "run")])
    assert "--tensorboard needs the `tensorboard` package" in err and "paratrain[data]" in err
    assert not (tmp_path / "run").exists()


def test_tensorboard_events_read_back_as_the_records(tmp_path):
    pytest.importorskip("tensorboard")
    from paratrain.metrics import MetricsWriter
    from paratrain.tboard import TensorBoardMetrics
    from tests.cli.test_prepared_data_cli import assert_tensorboard_matches_metrics

    writer = TensorBoardMetrics(MetricsWriter(tmp_path / "metrics.jsonl"), tmp_path / "tensorboard")
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 5.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5, "tokens_per_s": 1e4,
                      "comm_bytes": {"dp": 1024 * step}, "checkpoint_blocked_s": 0.01,
                      **({"val_loss": 4.0} if step == 3 else {})})
    writer.close()
    assert_tensorboard_matches_metrics(tmp_path)
