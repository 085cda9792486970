"""`paratrain train --data DIR` on a folder from `paratrain prepare-data`, as a user runs it: the
embedding follows the tokenizer, a crashed run resumed from its checkpoint trains on the same
tokens as an uninterrupted one (bit for bit), and a resume on other data is refused."""

from __future__ import annotations

import json

import pytest

from paratrain.config import TrainConfig
from paratrain.prepare import prepare
from paratrain.reference import reference_train
from tests.cli.test_train_cli import losses, paratrain
from tests.common import LOSS_RTOL
from tests.unit.test_prepare_data import write_text

RUN = ["--steps", "4", "--global-batch", "8", "--seq-len", "32", "--eval-every", "0", "--quiet",
       "--checkpoint-every", "2", "--no-async-checkpoint", "--dp", "2"]


def assert_tensorboard_matches_metrics(out) -> None:
    """Every number of every metrics.jsonl record is a TensorBoard scalar at its step (float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from paratrain.tboard import scalars

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = {}
    for r in records:
        for tag, value in scalars(r):
            want.setdefault(tag, []).append((r["step"], value))
    assert {"loss", "grad_norm", "lr", "val_loss", "comm_bytes/dp", "checkpoint_blocked_s"} <= set(want)
    assert set(events.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # simple_value is float32


def test_resume_on_prepared_shards_is_bit_for_bit(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    src = write_text(tmp_path / "c.txt", 40_000)
    prepare(str(src), "bpe", str(tmp_path / "bpe"), vocab_size=300, shard_tokens=2000)  # batches cross shards
    full = paratrain("train", *RUN, "--data", "bpe", "--sample-tokens", "12", "--tensorboard", "--eval-every", "3",
                     "--out", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert_tensorboard_matches_metrics(tmp_path / "full")
    vocab = json.loads((tmp_path / "bpe" / "index.json").read_text())["vocab_size"]
    assert json.loads((tmp_path / "full" / "config.json").read_text())["vocab_size"] == vocab
    assert f"vocabulary {vocab}" in full.stdout and "sampled from the trained model" in full.stdout
    # dp=2 on the shards trains on the single-process reference's batches: its losses (LOSS_RTOL)
    ref = reference_train(TrainConfig(steps=4, global_batch=8, seq_len=32, data=str(tmp_path / "bpe"),
                                      vocab_size=vocab))
    assert losses(tmp_path / "full") == pytest.approx(ref.losses, rel=LOSS_RTOL)
    crash = paratrain("train", *RUN, "--data", "bpe", "--sample-tokens", "0", "--out", "crashed", cwd=tmp_path,
                      env={"PARATRAIN_FAULT": "1:3"})
    assert crash.returncode == 1 and "injected fault" in crash.stderr
    saved = json.loads((tmp_path / "crashed" / "checkpoints" / "step-2" / "manifest.json").read_text())
    position = saved["config"]["data_position"]
    assert position["next_step"] == 3 and position["tokens_seen"] == 2 * 8 * 32

    prepare(str(write_text(tmp_path / "other.txt", 40_000, seed=1)), "bpe", str(tmp_path / "other"), vocab_size=300)
    from paratrain.cli import main  # refused before any process starts: in this process, no launch

    assert main(["train", "--resume", str(tmp_path / "crashed"), "--data", str(tmp_path / "other")]) == 2
    assert "resume with the same data" in " ".join(capsys.readouterr().err.split())

    same = paratrain("train", "--resume", "crashed", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "resuming crashed from" in same.stdout and "(step 2)" in same.stdout
    assert len(losses(tmp_path / "full")) == 4
    assert losses(tmp_path / "crashed") == losses(tmp_path / "full")  # bit for bit
