"""How the launcher starts, watches and blames ranks (paratrain.launch, paratrain.rank): the parts
that need no launch. (Whole launches with both start methods: tests/cli/test_train_cli.py; a
killed launcher, signals to the launcher or its whole group: tests/cli/test_launcher_robust.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from paratrain.errors import ConfigError
from paratrain.failures import root_cause
from paratrain.launch import start_method
from paratrain.rank import process_alive
from tests.cli.test_train_cli import FAST, REPO, paratrain


def test_start_method_defaults_to_the_fork_server_and_spawn_can_be_asked_for(monkeypatch):
    monkeypatch.delenv("PARATRAIN_START_METHOD", raising=False)
    assert start_method() == ("forkserver" if sys.platform.startswith("linux") else "spawn")
    monkeypatch.setenv("PARATRAIN_START_METHOD", "spawn")
    assert start_method() == "spawn"
    monkeypatch.setenv("PARATRAIN_START_METHOD", "fork")  # fork would copy the launcher's locks and threads
    with pytest.raises(ConfigError, match="forkserver or spawn"):
        start_method()


def test_without_a_fork_server_the_ranks_are_spawned(tmp_path):
    """The server's Unix socket lives under $TMPDIR, and a socket path has at most 107 bytes: with a
    deeper $TMPDIR the server cannot start, and launch spawns the ranks instead of failing."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    code = "from paratrain.launch import prestart; print(prestart())"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(deep)))
    assert got.returncode == 0 and got.stdout.strip() == "False", got.stderr


def test_a_bad_start_method_is_a_usage_error_before_launch(tmp_path):
    r = paratrain("train", "--steps", "2", "--dp", "2", "--out", "s", *FAST, cwd=tmp_path,
                  env={"PARATRAIN_START_METHOD": "threads"})
    assert r.returncode == 2, r.stderr
    assert "PARATRAIN_START_METHOD='threads' is not a way to start ranks" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()  # nothing was started


def test_a_zombie_or_a_reaped_process_is_not_alive():
    """A SIGKILLed launcher stays a zombie until its parent reaps it: its ranks must see it gone."""
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert process_alive(child.pid)
    child.kill()
    deadline = time.monotonic() + 10
    while process_alive(child.pid) and time.monotonic() < deadline:  # killed, not yet reaped
        time.sleep(0.02)
    assert Path(f"/proc/{child.pid}").exists(), "the zombie is still there until waited for"
    assert not process_alive(child.pid)
    child.wait()
    assert not process_alive(child.pid)


def _failure(exitcode: int) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, error_file_data=None, signal_name=lambda: "SIGKILL")


def _error(work_dir: Path, rank: int, message: str, time_ns: int) -> None:
    (work_dir / f"error-{rank}.json").write_text(json.dumps(
        {"rank": rank, "time_ns": time_ns, "message": message, "traceback": ""}))


def test_a_rank_killed_by_a_signal_is_the_root_cause_not_the_peer_that_lost_it(tmp_path):
    """The peer's "connection reset" may be recorded before the launcher learns of the kill: the
    killed rank (no error of its own, a negative exit code) is still the one to name."""
    _error(tmp_path, 0, "RuntimeError: Connection reset by peer", time.time_ns())
    e = SimpleNamespace(failures={0: _failure(1), 1: _failure(-9)})
    cause = root_cause(e, tmp_path)
    assert (cause.rank, cause.exitcode) == (1, -9) and "signal SIGKILL" in cause.message
    assert cause.others == {0: 1}


def test_otherwise_the_earliest_recorded_error_is_theroot_cause(tmp_path):
    _error(tmp_path, 1, "RuntimeError: injected fault", 100)
    _error(tmp_path, 0, "RuntimeError: Connection closed by peer", 200)
    cause = root_cause(SimpleNamespace(failures={0: _failure(1), 1: _failure(1)}), tmp_path)
    assert (cause.rank, cause.message) == (1, "RuntimeError: injected fault")


STUCK = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from paratrain.preempt import StopRequest
stop = StopRequest(deadline_s={deadline})
stop.install()
stop.armed = True  # inside the loop: a signal asks for the step boundary ...
os.kill(os.getpid(), signal.SIGTERM)
print("recorded", stop.signum, flush=True)
time.sleep(60)  # ... which never comes (a rank stuck in its step)
"""


@pytest.mark.parametrize("deadline", [1.0])
def test_a_signalled_rank_that_cannot_reach_the_step_boundary_ends_after_the_deadline(deadline):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", STUCK.format(repo=str(REPO), deadline=deadline)],
                       capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stdout.strip() == f"recorded {int(signal.SIGTERM)}"  # it was recorded, not fatal at once
    assert "the step in flight has not ended" in r.stderr
    assert deadline <= elapsed < 20


ECHOED = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from paratrain.preempt import StopRequest
stop = StopRequest()
stop.install()
stop.armed = True
os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C ...
os.kill(os.getpid(), signal.SIGINT)  # ... and the launcher passing it on: one request
print("recorded", stop.signum, flush=True)
{then}
print("still running", flush=True)
"""


@pytest.mark.parametrize("then, ends", [("", False), ("time.sleep(2.5); os.kill(os.getpid(), signal.SIGINT)", True),
                                        ("os.kill(os.getpid(), signal.SIGTERM)", True)],
                         ids=["echo", "second-ctrl-c", "other-signal"])
def test_the_same_signal_echoed_at_once_is_one_request_a_later_or_other_one_ends_the_rank(then, ends):
    """Ctrl-C reaches a rank twice within milliseconds (the terminal's and torch's launcher's): it
    must still finish its step and save; a second Ctrl-C seconds later, or another signal, ends it."""
    r = subprocess.run([sys.executable, "-c", ECHOED.format(repo=str(REPO), then=then)],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.splitlines()[0] == f"recorded {int(signal.SIGINT)}", (r.stdout, r.stderr)
    if ends:
        assert r.returncode == 128 + (signal.SIGTERM if "SIGTERM" in then else signal.SIGINT), r.stderr
        assert "still running" not in r.stdout
    else:
        assert r.returncode == 0 and "still running" in r.stdout, r.stderr


def test_a_commit_that_gave_up_on_a_dead_rank_does_not_pass_for_the_cause(tmp_path):
    """Forked ranks: the launcher may report only rank 0's exit. Rank 0's checkpoint commit said
    rank 1 exited without its file; rank 1 (neither an error nor a result) is the one to name."""
    from paratrain.checkpoint.store import EXITED_UNWRITTEN

    _error(tmp_path, 0, f"CheckpointError: checkpoint of step 6: rank 1's process (pid 7) {EXITED_UNWRITTEN} of "
                        f"the checkpoint.", time.time_ns())
    cause = root_cause(SimpleNamespace(failures={0: _failure(1)}), tmp_path, nproc=2)
    assert cause.rank == 1 and "ended without raising a Python error" in cause.message
