"""Entry point of one launched rank: ``python -m paratrain.rank MODULE:FUNCTION ARGS_FILE RESULT_DIR [LAUNCHER_PID]``.

Runs ``FUNCTION(*args)`` (args unpickled from ARGS_FILE), writes its return value to
``RESULT_DIR/rank-<RANK>.pkl`` atomically, and ends the process with :func:`end_process`.

A local rank binds gloo (and NCCL's bootstrap) to the loopback interface, as the launcher's store
is (``paratrain.launch``). It also watches its launcher (LAUNCHER_PID): if that process dies, even
by SIGKILL, the kernel sends the rank SIGUSR1 (``prctl(PR_SET_PDEATHSIG)``) and a thread checks
``os.getppid()`` every quarter second as a fallback (the signal only fires when the parent
*thread* that started us ends, and not at all if the parent was gone before we asked); either way
the rank removes the launch folder and exits, instead of training on unsupervised.

Why a process of our own instead of returning from a spawned function: gloo's worker threads
outlive ``destroy_process_group`` (torch keeps references to every group), and a worker that is
still destroying a finished work object when the interpreter starts finalising needs the GIL for
a Python reference in the work's thread-local state; ``take_gil`` then ends that thread with
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
    """End this rank (and remove ``work_dir``) soon after the launcher ``launcher_pid`` dies."""

    def orphaned() -> None:
        shutil.rmtree(work_dir, ignore_errors=True)
        print(f"paratrain rank {os.environ.get('RANK', '?')}: the launcher (pid {launcher_pid}) is gone; "
              f"stopping.", file=sys.stderr)
        end_process(ORPHAN_EXIT_CODE)

    def on_signal(signum: int, frame: Any) -> None:
        if os.getppid() != launcher_pid:  # a spurious one (a launcher thread ended) is ignored
            orphaned()

    def poll() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(interval_s)
        orphaned()

    if sys.platform.startswith("linux"):
        import ctypes

        signal.signal(signal.SIGUSR1, on_signal)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)
    threading.Thread(target=poll, name="paratrain-launcher-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    func_path, args_file, result_dir, *launcher = argv
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
    end_process(0)


if __name__ == "__main__":
    main(sys.argv[1:])
