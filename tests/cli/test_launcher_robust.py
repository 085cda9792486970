"""The local launcher as a careful user or an attacker sees it (issue 15, items 2-4): what it
listens on, what happens when it is killed outright, and how a signal ends a run."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LONG = ["train", "--model", "tiny", "--steps", "100000", "--global-batch", "4", "--seq-len", "32",
        "--eval-every", "0", "--sample-tokens", "0", "--no-checkpoint", "--timeout", "30"]


def start(out: Path, *extra: str, **kw) -> subprocess.Popen:
    """The run of ``out``; its temporary launch folder is made in ``out``'s sibling ``tmp`` (a link
    to a short path: the ranks' fork server puts a Unix socket there, whose path may have 107 bytes)."""
    tmp = out.parent / "tmp"
    if not tmp.exists():
        short = Path(tempfile.mkdtemp(prefix="pt-"))
        atexit.register(shutil.rmtree, short, True)
        tmp.symlink_to(short)
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp.resolve()))
    return subprocess.Popen([sys.executable, "-m", "paratrain", *LONG, *extra, "--out", str(out)], cwd=out.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def stop(proc: subprocess.Popen, tree: set[int]) -> None:
    """Kill the launcher and every rank recorded in ``tree`` (orphans would keep our pipes open)."""
    for pid in [proc.pid, *tree]:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc's parent links)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parent[int(d)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def rank_pids(launcher: int) -> list[int]:
    """The launcher's ranks: ``python -m paratrain.rank`` processes (start method ``spawn``) or the
    processes forked from its fork server (``forkserver``, the default)."""
    def cmdline(pid: int) -> list[bytes]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return []

    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return -1

    def server(pid: int) -> bool:
        return any(b"multiprocessing.forkserver import main" in arg for arg in cmdline(pid))

    return sorted(p for p in children(launcher) if b"paratrain.rank" in cmdline(p)
                  or (parent(p) != launcher and server(parent(p))))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not start training in time")


def listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket held by one of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                found.append((addr, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_local_run_listens_on_loopback_only(tmp_path):
    """torch's store has no authentication: nothing of a local run may be reachable from outside."""
    proc = start(tmp_path / "r")
    tree: set[int] = set()
    try:
        wait_for_steps(proc, tmp_path / "r")
        tree = {proc.pid} | children(proc.pid)
        assert len(tree) >= 3, tree  # the launcher and its two ranks
        found = listeners(tree)
        assert found, "the probe sees no listener at all (the store and gloo must listen somewhere)"
        exposed = [(a, p) for a, p in found if a not in LOOPBACK]
        assert not exposed, f"listening beyond loopback: {exposed} (all: {found})"
    finally:
        stop(proc, tree)


def test_killed_launcher_ends_its_ranks_and_launch_folder(tmp_path):
    proc = start(tmp_path / "r")
    ranks: set[int] = set()
    try:
        wait_for_steps(proc, tmp_path / "r")
        ranks = children(proc.pid)  # the two ranks and the server they were forked from
        assert len(ranks) >= 2, ranks
        work_dirs = set((tmp_path / "tmp").glob("paratrain-launch-*"))
        assert len(work_dirs) == 1 and all(d.is_dir() for d in work_dirs), work_dirs
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in ranks if alive(p)]
        assert not left, f"ranks {left} outlived their launcher by 10 s"
        assert not any(d.exists() for d in work_dirs), "the temporary launch folder was left behind"
    finally:
        stop(proc, ranks)


@pytest.mark.parametrize("sig, code, nproc, group", [
    (signal.SIGINT, 130, "2", True),  # Ctrl-C: the terminal signals the whole foreground group
    (signal.SIGTERM, 143, "2", False),  # `kill` or a job scheduler signals the launcher alone ...
    (signal.SIGTERM, 143, "2", True),  # ... or every process of the job (the ranks' fork server too)
    (signal.SIGTERM, 143, "1", False)])  # 1: the run is in this process
def test_signal_ends_the_run_with_one_line(tmp_path, sig, code, nproc, group):
    out = tmp_path / "r"
    proc = start(out, "--nproc", nproc, start_new_session=True)
    wait_for_steps(proc, out)
    ranks, helpers = set(rank_pids(proc.pid)), children(proc.pid)  # helpers: the fork server, resource tracker
    assert len(ranks) == (2 if nproc == "2" else 0), ranks
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stop(proc, helpers)
        pytest.fail("the run did not end after the signal")
    assert proc.returncode == code, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("step ")
             and not ln.startswith("train tiny")]
    assert len(lines) == 1, stderr
    assert f"interrupted by {sig.name}" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in stderr and "SignalException" not in stderr
    assert "finished" not in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= 2
    assert not [p for p in ranks if alive(p)], "ranks outlived the interrupted run"
    deadline = time.monotonic() + 10  # the server ends once its last rank has (its pipe closes)
    while [p for p in helpers if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in helpers if alive(p)], "the launcher's helper processes outlived the run by 10 s"
