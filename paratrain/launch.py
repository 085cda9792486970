"""Starting ranks and ending them cleanly.

* :func:`launch` starts ``nproc`` local ranks through ``torch.distributed.run``'s launcher API
  (``elastic_launch``: c10d rendezvous on localhost, no restarts). If the job is already under an
  outside ``torchrun`` (multi-node), it runs the function in this process instead. If any rank
  fails, the launcher stops the others and :class:`LaunchError` carries the first failing rank's
  error and traceback.
* :func:`init_distributed` / :func:`shutdown_distributed` bracket a rank's work. Process groups
  get a timeout, so a collective waiting on a dead peer raises instead of hanging. Shutdown waits
  at a barrier and then destroys every group: a rank that exits with gloo work objects still
  alive aborts during interpreter teardown ("terminate called without an active exception").
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RankEnv:
    """This process's place among the launched processes (from the launcher's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> RankEnv:
        e = os.environ
        world = int(e.get("WORLD_SIZE", 1))
        return cls(int(e.get("RANK", 0)), world, int(e.get("LOCAL_RANK", 0)),
                   int(e.get("LOCAL_WORLD_SIZE", world)))


def under_torchrun() -> bool:
    """True when an outside launcher (torchrun) already started this process as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def set_threads(threads: int, local_world_size: int) -> int:
    """Intra-op threads per rank: ``threads`` or cores / local ranks. Oversubscribing the cores
    (2 ranks x 2 threads on 2 cores) makes gloo jobs several times slower."""
    import torch

    n = threads or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def init_distributed(env: RankEnv, device_type: str, timeout_s: float) -> None:
    """Join the default process group (gloo on CPU, NCCL on CUDA) when there are several ranks."""
    if env.world_size == 1:
        return
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", **kwargs)


def shutdown_distributed(ok: bool) -> None:
    """Barrier (only after success: a failed rank must not wait for peers) and destroy groups."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()


class LaunchError(RuntimeError):
    """A rank failed. ``rank``/``exitcode`` of the first failure, its ``message`` and the
    Python ``traceback`` from inside the rank (empty if it died from a signal)."""

    def __init__(self, rank: int, exitcode: int, message: str, traceback: str = "",
                 others: dict[int, int] | None = None) -> None:
        self.rank, self.exitcode, self.message, self.traceback = rank, exitcode, message, traceback
        self.others = others or {}
        super().__init__(f"rank {rank} failed (exit code {exitcode}): {message}")


def _failure_details(failure: Any) -> tuple[str, str]:
    data = getattr(failure, "error_file_data", None) or {}
    msg = data.get("message", "") if isinstance(data, dict) else ""
    if isinstance(msg, dict):
        tb = msg.get("extraInfo", {}).get("py_callstack", "")
        text = msg.get("message", "")
        return text.strip(), tb
    if failure.exitcode < 0:
        try:
            sig = failure.signal_name()
        except Exception:  # noqa: BLE001 - a name is only a nicety
            sig = str(-failure.exitcode)
        return f"the process was killed by signal {sig} without raising a Python error", ""
    return str(getattr(failure, "message", "") or f"exit code {failure.exitcode}"), ""


@contextlib.contextmanager
def _quiet_launcher_logs() -> Iterator[None]:
    """The launcher logs every failure with its own long traceback; we report ours instead."""
    names = ("torch.distributed.elastic", "torch.multiprocessing", "torch.distributed.launcher")
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)


def launch(fn: Callable[..., Any], args: tuple[Any, ...], nproc: int) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` local ranks and return ``{rank: return value}``.

    ``fn`` must be a module-level function and ``args`` picklable: each rank is a process running
    ``python -m paratrain.rank`` (see there for why). Under an outside torchrun, runs ``fn`` here as
    this process's rank; the caller should then end with :func:`paratrain.rank.end_process`."""
    if under_torchrun():
        return {int(os.environ["RANK"]): fn(*args)}
    if nproc == 1:
        return {0: fn(*args)}
    import pickle
    import sys

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    work_dir = Path(tempfile.mkdtemp(prefix="paratrain-launch-"))
    args_file = work_dir / "args.pkl"
    args_file.write_bytes(pickle.dumps(args))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(work_dir / "logs")),
    )
    target = f"{fn.__module__}:{fn.__qualname__}"
    try:
        with _quiet_launcher_logs():
            elastic_launch(config, sys.executable)("-m", "paratrain.rank", target, str(args_file), str(work_dir))
        results = {}
        for r in range(nproc):
            with open(work_dir / f"rank-{r}.pkl", "rb") as f:
                results[r] = pickle.load(f)
        return results
    except ChildFailedError as e:
        raise _root_cause(e, work_dir) from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _root_cause(e: Any, work_dir: Path) -> LaunchError:
    """The earliest error a rank recorded (see ``paratrain.rank``); a rank killed by a signal
    before any rank recorded an error is reported from the launcher's own information."""
    import json

    codes = {r: f.exitcode for r, f in e.failures.items()}
    errors = [json.loads(p.read_text()) for p in work_dir.glob("error-*.json")]
    if errors:
        first = min(errors, key=lambda x: x["time_ns"])
        rank = first["rank"]
        others = {r: c for r, c in codes.items() if r != rank}
        return LaunchError(rank, codes.get(rank, 1), first["message"], first["traceback"], others)
    rank, failure = e.get_first_failure()
    message, tb = _failure_details(failure)
    return LaunchError(rank, failure.exitcode, message, tb, {r: c for r, c in codes.items() if r != rank})
