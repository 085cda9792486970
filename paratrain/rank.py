"""Entry point of one launched rank: ``python -m paratrain.rank MODULE:FUNCTION ARGS_FILE RESULT_DIR [LAUNCHER_PID]``,
or :func:`forked_main` with the same arguments in a rank forked from the launcher's fork server.

Runs ``FUNCTION(*args)`` (args unpickled from ARGS_FILE), writes its return value to
``RESULT_DIR/rank-<RANK>.pkl`` atomically, and ends the process with :func:`end_process`.

A local rank binds gloo (and NCCL's bootstrap) to the loopback interface, as the launcher's store
is (``paratrain.launch``). It also watches its launcher (LAUNCHER_PID): if that process dies, even
by SIGKILL, a thread that looks every quarter second sees it (and a spawned rank, whose parent is
the launcher, also gets SIGUSR1 from the kernel at once: ``prctl(PR_SET_PDEATHSIG)``); either way
the rank removes the launch folder and exits, instead of training on unsupervised.

Why every rank ends with ``os._exit``: gloo's worker threads outlive ``destroy_process_group``
(torch keeps references to every group), and a worker that is still destroying a finished work
object when the interpreter starts finalising needs the GIL for a Python reference in the work's
thread-local state; ``take_gil`` then ends that thread with
``pthread_exit``, whose unwinding hits a ``noexcept`` destructor: "terminate called without an
active exception", SIGABRT, after the rank's work was done. Ending with ``os._exit`` once every
output is flushed skips finalisation, so that race cannot happen. (Measured: a plain DDP script
under torchrun aborted at exit in 26 of 100 launches on this 2-core machine under load, and still
in 20 of 100 with ``destroy_process_group``.)
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def end_process(code: int) -> None:
    """Flush Python's streams and leave without interpreter finalisation (see module docstring)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep us alive
            pass
    os._exit(code)


def resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def write_result(result_dir: Path, rank: int, value: Any) -> None:
    final = result_dir / f"rank-{rank}.pkl"
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_error(result_dir: Path, rank: int, exc: BaseException) -> None:
    """The rank's error with a nanosecond timestamp: the launcher reports the earliest one as the
    root cause (peers that fail afterwards only saw the connection close or time out)."""
    record = {"rank": rank, "time_ns": time.time_ns(), "message": f"{type(exc).__name__}: {exc}",
              "traceback": "".join(traceback.format_exception(exc))}
    path = result_dir / f"error-{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    os.replace(path.with_suffix(".tmp"), path)


SHIELDED = ("SIGTERM", "SIGHUP", "SIGQUIT")  # what the fork server ignores (paratrain.rank_server)
ORPHAN_EXIT_CODE = 75  # nobody reads it: the launcher that would is gone
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def bind_loopback() -> None:
    """Make gloo and NCCL listen on the loopback interface only (a local run has no other peer)."""
    names = {name for _, name in socket_interfaces()}
    if "lo" in names:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        os.environ["NCCL_SOCKET_IFNAME"] = "lo"


def socket_interfaces() -> list[tuple[int, str]]:
    import socket

    try:
        return socket.if_nameindex()
    except OSError:
        return []


def watch_launcher(launcher_pid: int, work_dir: Path, interval_s: float = 0.25) -> None:
    """End this rank (and remove ``work_dir``) soon after the launcher ``launcher_pid`` dies.

    A thread looks every ``interval_s`` whether the launcher still runs (a SIGKILLed launcher is a
    zombie until its parent reaps it: that counts as gone). The rank's parent is the launcher
    (``spawn``), whose death the kernel also signals at once (``PR_SET_PDEATHSIG``), or the
    launcher's fork server, which lives as long as any rank does (each rank holds the pipe that
    keeps it up), so there the launcher itself is what is watched."""

    def orphaned() -> None:
        shutil.rmtree(work_dir, ignore_errors=True)
        print(f"paratrain rank {os.environ.get('RANK', '?')}: the launcher (pid {launcher_pid}) is gone; "
              f"stopping.", file=sys.stderr)
        end_process(ORPHAN_EXIT_CODE)

    def on_signal(signum: int, frame: Any) -> None:
        if not process_alive(launcher_pid):  # a spurious one (a launcher thread ended) is ignored
            orphaned()

    def poll() -> None:
        while process_alive(launcher_pid):
            time.sleep(interval_s)
        orphaned()

    if not process_alive(launcher_pid):
        orphaned()  # gone before we looked
    if sys.platform.startswith("linux"):
        import ctypes

        signal.signal(signal.SIGUSR1, on_signal)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)
    threading.Thread(target=poll, name="paratrain-launcher-watch", daemon=True).start()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not): Linux's ``/proc``, else a null signal."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # after the name, which may hold spaces


def run(func_path: str, args_file: str, result_dir: str, launcher: list[str]) -> None:
    """Run the rank's function and write its result, or write its error and end the process."""
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):  # restarted: the last attempt's error is history
        (Path(result_dir) / f"error-{rank}.json").unlink(missing_ok=True)
    bind_loopback()
    if launcher:
        watch_launcher(int(launcher[0]), Path(result_dir))
    try:
        with open(args_file, "rb") as f:
            args = pickle.load(f)
        value = resolve(func_path)(*args)
    except BaseException as e:  # noqa: BLE001 - reported through the error file; exit non-zero
        write_error(Path(result_dir), rank, e)
        end_process(1)
    write_result(Path(result_dir), rank, value)


def main(argv: list[str]) -> None:
    """``python -m paratrain.rank`` (the ``spawn`` start method)."""
    func_path, args_file, result_dir, *launcher = argv
    run(func_path, args_file, result_dir, launcher)
    end_process(0)


def forked_main(func_path: str, args_file: str, result_dir: str, launcher_pid: str) -> None:
    """A rank forked from the launcher's fork server (``paratrain.rank_server``). It returns
    (torch's launcher waits for a return value) and multiprocessing then ends the process with
    ``os._exit``: no interpreter finalisation either. The server ignores the job's signals; a rank
    takes them as a fresh process would."""
    for name in SHIELDED:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    run(func_path, args_file, result_dir, [launcher_pid])


if __name__ == "__main__":
    main(sys.argv[1:])
