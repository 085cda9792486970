"""Preemption (issue 10): SIGTERM or Ctrl-C to the launcher lets the ranks finish the step in
flight, write a checkpoint of it, and exit non-zero saying how to resume; the resume continues
from exactly that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.cli.test_launcher_robust import REPO, wait_for_steps
from tests.cli.test_train_cli import paratrain

RUN = ["train", "--model", "tiny", "--steps", "100000", "--global-batch", "4", "--seq-len", "32",
       "--eval-every", "0", "--sample-tokens", "0", "--timeout", "30", "--quiet"]


@pytest.mark.parametrize("nproc,sig,group", [(2, signal.SIGTERM, False), (1, signal.SIGINT, False),
                                             (2, signal.SIGINT, True)],
                         ids=["2-ranks-TERM", "1-rank-INT", "2-ranks-Ctrl-C"])
def test_a_signal_saves_the_step_in_flight_and_says_how_to_resume(tmp_path, nproc, sig, group):
    """``group``: Ctrl-C in a terminal, which signals the launcher and every rank at once; torch's
    launcher then passes the signal on to the ranks again (one request, not a second Ctrl-C)."""
    out = tmp_path / "p"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "paratrain", *RUN, "--nproc", str(nproc), "--dp", str(nproc),
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    wait_for_steps(proc, out, steps=3)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = steps[-1]
    assert steps == list(range(1, last + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{last}"  # the step in flight, saved
    assert f"continue with: paratrain train --resume {out}" in err
    again = paratrain("train", "--resume", str(out), "--steps", str(last + 2), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, last + 3))
