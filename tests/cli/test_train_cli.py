"""`paratrain train` as a user runs it: outputs, determinism, bad input, failing ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.common import LOSS_RTOL

REPO = Path(__file__).resolve().parents[2]
FAST = ["--global-batch", "8", "--seq-len", "32", "--eval-every", "3", "--sample-tokens", "16"]


def paratrain(*args: str, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "paratrain", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_like_reference(out: Path, model: str = "tiny", steps: int = 3, global_batch: int = 8,
                          seq_len: int = 32) -> dict:
    """The run in ``out`` has the single-process reference's losses (LOSS_RTOL) and a checkpoint
    of the reference's full shapes (a parallel run gathers it back); returns its model state."""
    from paratrain.checkpoint.convert import model_state
    from paratrain.config import TrainConfig
    from paratrain.reference import reference_train

    ref = reference_train(TrainConfig(model=model, steps=steps, global_batch=global_batch, seq_len=seq_len))
    assert losses(out) == pytest.approx(ref.losses, rel=LOSS_RTOL)
    state, _ = model_state(out)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.state.items()}
    return state


def test_train_writes_outputs_and_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        proc = paratrain("train", "--steps", "6", "--seed", "3", "--out", name, *FAST, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs.append(tmp_path / name)
    out = runs[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert isinstance(r["step"], int)
        for key in ("loss", "lr", "tokens_per_s", "step_time_s"):
            assert isinstance(r[key], float) and r[key] > 0, key
    assert "val_loss" in records[2] and "val_loss" in records[5]
    assert (out / "loss.png").stat().st_size > 1000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["layout"]["dp"] == 2
    assert (out / "checkpoints" / "step-6" / "manifest.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    assert "paratrain train: finished" in proc.stdout and "sampled from the trained model" in proc.stdout
    assert losses(runs[0]) == losses(runs[1])  # same seed: identical, bit for bit


@pytest.mark.equivalence
def test_one_process_equals_two_data_parallel(tmp_path):
    one = paratrain("train", "--nproc", "1", "--steps", "5", "--out", "one", *FAST, cwd=tmp_path)
    two = paratrain("train", "--nproc", "2", "--dp", "2", "--steps", "5", "--out", "two", *FAST, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    # two runs that each round differently from the reference: the floor counts twice
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=2 * LOSS_RTOL)
    # ranks forked from the fork server (the default) or each a fresh interpreter: the same run
    spawned = paratrain("train", "--nproc", "2", "--dp", "2", "--steps", "5", "--out", "spawned", *FAST,
                        cwd=tmp_path, env={"PARATRAIN_START_METHOD": "spawn"})
    assert spawned.returncode == 0, spawned.stderr
    assert losses(tmp_path / "spawned") == losses(tmp_path / "two")


def test_config_file_with_flag_override(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 3\nseed = 5\nglobal_batch = 8\nseq_len = 32\n[layout]\ndp = 2\n')
    r = paratrain("train", "--config", "c.toml", "--steps", "2", "--out", "o", "--sample-tokens", "0",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["steps"], cfg["seed"], cfg["seq_len"]) == (2, 5, 32)
    (tmp_path / "c.yaml").write_text("steps: 2\nlayout: {dp: 1}\nglobal-batch: 4\nseq_len: 16\nsample_tokens: 0\n")
    r = paratrain("train", "--config", "c.yaml", "--nproc", "1", "--out", "y", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(losses(tmp_path / "y")) == 2


BAD_INPUTS = {
    "layout": (["--dp", "3"], "global batch 32 is not divisible by dp=3"),
    "world size": (["--nproc", "3", "--dp", "2"], "--nproc 3 does not match the layout"),
    "batch": (["--global-batch", "6", "--microbatches", "2"], "cannot be split into 2 equal micro-batches"),
    "model": (["--model", "gpt5"], "unknown model 'gpt5'"),
    "data path": (["--data", "/no/such/file.txt"], "data path '/no/such/file.txt' does not exist"),
    "steps": (["--steps", "0"], "steps must be a positive integer"),
    "seq len": (["--seq-len", "100000"], "exceeds model 'tiny'"),
    "tp": (["--tp", "3", "--nproc", "3"], "tp=3 does not divide"),
    "cp seq len": (["--cp", "3", "--seq-len", "32"], "so seq_len must be divisible by 6; got seq_len=32"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_message(case, tmp_path):
    args, message = BAD_INPUTS[case]
    t0 = time.monotonic()
    r = paratrain("train", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start before validation passes"
    assert time.monotonic() - t0 < 20


def test_bad_config_file_key(tmp_path):
    (tmp_path / "c.toml").write_text("stepz = 3\n")
    r = paratrain("train", "--config", "c.toml", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key(s) stepz" in r.stderr


def test_unknown_flag_is_usage_error(tmp_path):
    r = paratrain("train", "--stepz", "3", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --stepz" in r.stderr
    # the sub-command's usage and prefix (issue 15 item 11), not the top-level "paratrain COMMAND"
    assert r.stderr.startswith("usage: paratrain train ") and "paratrain train: error:" in r.stderr
    # one usage line pointing at --help (the whole usage is 20+ lines), and the flag meant
    assert len(r.stderr.splitlines()) == 2 and "paratrain train --help" in r.stderr, r.stderr
    assert "did you mean --steps?" in r.stderr, r.stderr


def test_failing_rank_stops_the_job_with_its_error(tmp_path):
    t0 = time.monotonic()
    r = paratrain("train", "--steps", "50", "--out", "f", *FAST, cwd=tmp_path, env={"PARATRAIN_FAULT": "1:3"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    assert "rank 1 failed" in r.stderr and "injected fault on rank 1 at step 3" in r.stderr
    assert "traceback from rank 1" in r.stderr and "The run did not finish." in r.stderr
    assert "finished" not in r.stdout
    assert elapsed < 60


def test_hanging_rank_times_out_instead_of_hanging(tmp_path):
    t0 = time.monotonic()
    r = paratrain("train", "--steps", "50", "--timeout", "5", "--out", "h", *FAST, cwd=tmp_path,
                  env={"PARATRAIN_FAULT": "1:2:hang"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert "rank 0 failed" in r.stderr  # rank 0's collective timed out waiting for rank 1
    assert "The run did not finish." in r.stderr
    assert elapsed < 60


def test_same_command_under_an_outside_torchrun(tmp_path):
    """Multi-node users start every rank with torchrun; the result must equal our own launcher's."""
    ours = paratrain("train", "--steps", "4", "--out", "ours", *FAST, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                        "-m", "paratrain", "train", "--steps", "4", "--out", "tr", *FAST],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "paratrain train: finished" in r.stdout
    assert losses(tmp_path / "tr") == losses(tmp_path / "ours")
