"""A worker killed outright (SIGKILL) in the middle of training (issue 10): with --max-restarts
the job restarts through torch's elastic agent, continues from the latest checkpoint on its own and
ends with the parameters of a run that was never interrupted; without, it ends promptly naming
the rank that died, leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.cli.test_launcher_robust import REPO, alive, children, rank_pids, wait_for_steps
from tests.cli.test_train_cli import losses, paratrain

RUN = ["train", "--model", "tiny", "--steps", "10", "--global-batch", "4", "--seq-len", "32", "--eval-every", "0",
       "--sample-tokens", "0", "--checkpoint-every", "2", "--timeout", "30", "--quiet"]


def _start_and_kill_a_rank(tmp_path: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "paratrain", *RUN, *extra, "--out", str(out)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, steps=5)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    return proc, err, time.monotonic() - t0


def test_a_killed_worker_restarts_and_ends_like_an_uninterrupted_run(tmp_path):
    from paratrain.checkpoint.convert import model_state

    full = paratrain("train", *RUN[1:], "--out", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    proc, err, _ = _start_and_kill_a_rank(tmp_path, tmp_path / "r", "--max-restarts", "1")
    assert proc.returncode == 0, err
    assert "restart 1 of 1: continuing from" in err
    assert losses(tmp_path / "r") == losses(tmp_path / "full")  # each step once, bit for bit
    a, _ = model_state(tmp_path / "r")
    b, _ = model_state(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_without_restarts_a_killed_worker_ends_the_job_naming_it(tmp_path):
    proc, err, elapsed = _start_and_kill_a_rank(tmp_path, tmp_path / "k", "--steps", "100000")
    assert proc.returncode == 1, err
    assert "rank " in err and "The run did not finish" in err and "Traceback" not in err.split("---")[0]
    headline = err.splitlines()[0]  # the killed rank, not the peer that lost its connection to it
    assert "signal SIGKILL" in headline or "ended without raising a Python error" in headline, err
    assert not any(m in headline for m in ("Connection reset", "Connection closed")), err
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end"
    time.sleep(1)
    assert not [p for p in children(proc.pid) if alive(p)]


def test_under_an_outside_torchrun_a_restart_continues_the_run(tmp_path):
    """Multi-node users restart with torchrun's own --max-restarts: the restarted ranks run the
    CLI again, which continues its own run folder from the latest checkpoint."""
    full = paratrain("train", *RUN[1:], "--out", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                             "-m", "paratrain", *RUN, "--out", "tr"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, tmp_path / "tr", steps=5)
    workers = [p for p in sorted(children(proc.pid))
               if b"paratrain" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "restart 1: continuing from" in err
    assert losses(tmp_path / "tr") == losses(tmp_path / "full")


def test_a_restart_after_the_final_checkpoint_ends_with_the_finished_runs_summary(tmp_path):
    """A rank killed after the last step's checkpoint was committed (in the final barrier, say): the
    restarted attempt has nothing left to train. It used to crash building a summary of zero steps
    (a fresh-clone CI run hit it when the kill above came late); now it ends 0 with the first
    attempt's figures and leaves the checkpoint as it was."""
    run = [*RUN[1:], "--nproc", "1", "--out", "done"]
    first = paratrain("train", *run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = json.loads((tmp_path / "done" / "summary.json").read_text())
    manifest = (tmp_path / "done" / "checkpoints" / "step-10" / "manifest.json").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", TORCHELASTIC_RESTART_COUNT="1")
    again = subprocess.run([sys.executable, "-m", "paratrain", *RUN, "--out", "done"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "the run had already finished (step 10 of 10)" in again.stderr
    after = json.loads((tmp_path / "done" / "summary.json").read_text())
    assert (after["steps"], after["first_loss"], after["final_loss"]) == \
        (before["steps"], before["first_loss"], before["final_loss"])
    assert (tmp_path / "done" / "checkpoints" / "step-10" / "manifest.json").read_bytes() == manifest
