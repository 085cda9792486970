"""Starting ranks and ending them cleanly.

* :func:`launch` starts ``nproc`` local ranks through ``torch.distributed.run``'s launcher API
  (``elastic_launch``, no restarts). Its rendezvous is one ``TCPStore`` on a socket this process
  bound to 127.0.0.1 (torch's store has no authentication, and the stock c10d rendezvous listens
  on every interface); the ranks join it as clients and bind gloo/NCCL to the loopback interface
  (``paratrain.rank``), so a local run is reachable from this machine only. If the job is already
  under an outside ``torchrun`` (multi-node), it runs the function in this process instead, and
  torchrun binds what its user named. If any rank fails, the launcher stops the others and
  :class:`LaunchError` carries the first failing rank's error and traceback. A signal (Ctrl-C,
  SIGTERM) stops the ranks and raises :class:`Interrupted`; a launcher killed outright is noticed
  by its ranks, which end themselves (``paratrain.rank``).
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
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratrain.errors import Interrupted  # noqa: F401 - defined there, raised here; import it from either
from paratrain.failures import LaunchError, root_cause  # noqa: F401 - LaunchError: import it from either

LOOPBACK = "127.0.0.1"
_RDZV_BACKEND = "paratrain-loopback"
_HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # what torch's launcher catches


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


def init_distributed(env: RankEnv, device_type: str, timeout_s: float) -> int:
    """Join the default process group (gloo on CPU, NCCL on CUDA) when there are several ranks.
    Returns the attempt number every rank agrees on (0 for a first start; see :func:`attempt_store`)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if env.world_size == 1:
        return attempt
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Under torchrun's agent store, which outlives an attempt: it still holds a failed
        # attempt's keys (its ranks' gloo addresses), and torch adds no per-attempt prefix, so a
        # new rank could read a dead peer's address. Every attempt gets its own namespace.
        join = datetime.timedelta(seconds=max(timeout_s, JOIN_TIMEOUT_S))
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                               is_master=False, timeout=join)
        store, attempt = attempt_store(client, env.rank, env.world_size, join, attempt)
        kwargs.update(store=store, rank=env.rank, world_size=env.world_size)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", **kwargs)
    return attempt


JOIN_TIMEOUT_S = 60.0  # how long the ranks of an attempt wait for each other before joining


def attempt_store(client: Any, rank: int, world_size: int, timeout: datetime.timedelta, count: int
                  ) -> tuple[Any, int]:
    """A namespace of ``client`` that every rank of this attempt shares and no earlier attempt used,
    and the attempt number: the largest of the ranks' restart counts ``count``.

    Not ``TORCHELASTIC_RESTART_COUNT``: an agent counts a restart only when its own ranks failed,
    and restarts them uncounted when another host's agent opened a new rendezvous round first
    ("membership change"), so two hosts' ranks can meet with different counts (seen in the
    two-host test: counts 1 and 0, and the count-0 ranks read the failed attempt's addresses).
    Instead rank 0 draws a fresh token and hands it to each rank under a key named by that rank's
    own fresh nonce, which no earlier attempt can have written; the ranks then meet under the
    token (earlier attempts' ranks are all gone: an agent stops its ranks before a new round).
    The agreed number makes every rank resume from the checkpoint when any of them restarted."""
    import torch.distributed as dist

    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        token = uuid.uuid4().hex
        arrived = [f"paratrain/{token}/arrived/{r}" for r in range(1, world_size)]
        answered: dict[int, bytes] = {}
        while not client.check(arrived):
            for r in range(1, world_size):
                ask = f"paratrain/join/{r}"
                if client.check([ask]) and answered.get(r) != (nonce := client.get(ask)):
                    client.set(f"paratrain/join-answer/{nonce.decode()}", token)  # a stale nonce: harmless
                    answered[r] = nonce
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0: not every rank joined within {timeout.total_seconds():.0f} s.")
            time.sleep(0.005)
        counts = [count] + [int(client.get(key)) for key in arrived]
        client.set(f"paratrain/{token}/all", str(max(counts)))
    else:
        nonce = uuid.uuid4().hex
        client.set(f"paratrain/join/{rank}", nonce)
        client.wait([f"paratrain/join-answer/{nonce}"], timeout)
        token = client.get(f"paratrain/join-answer/{nonce}").decode()
        client.set(f"paratrain/{token}/arrived/{rank}", str(count))
        client.wait([f"paratrain/{token}/all"], timeout)
    return dist.PrefixStore(f"paratrain/{token}", client), int(client.get(f"paratrain/{token}/all"))


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


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within this block SIGTERM/SIGHUP/SIGQUIT raise :class:`Interrupted` and Ctrl-C becomes one
    too, so a run stopped from outside unwinds (metrics closed) and ends with one line. The previous
    handlers are restored afterwards (torch's launcher installs its own and leaves them behind)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, n) for n in _HANDLED_SIGNALS if hasattr(signal, n)]
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    for s in sigs:
        if s != signal.SIGINT:
            signal.signal(s, handler)
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _quiet_launcher_logs() -> Iterator[None]:
    """The launcher logs every failure with its own long traceback; we report ours instead."""
    import torch.distributed.launcher.api  # noqa: F401 - creates the launcher's loggers

    names = ("torch.distributed.elastic", "torch.multiprocessing", "torch.distributed.launcher")
    # torch sets a level on each of its module loggers, so the parents' level alone is not enough
    loggers = [logging.getLogger(n) for n in names] + [
        logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith(names)]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)


def launch(fn: Callable[..., Any], args: tuple[Any, ...], nproc: int, max_restarts: int = 0) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` local ranks and return ``{rank: return value}``. When a rank
    fails, torch's elastic agent restarts all of them up to ``max_restarts`` times (``fn`` sees
    ``TORCHELASTIC_RESTART_COUNT``); then the first failure is raised.

    ``fn`` must be a module-level function and ``args`` picklable: each rank is a process of its
    own that ends without interpreter finalisation (``paratrain.rank``, see there for why), forked
    from a server that has already imported torch (:func:`start_method`). Under an outside
    torchrun, runs ``fn`` here as this process's rank; the caller should then end with
    :func:`paratrain.rank.end_process`."""
    if under_torchrun():
        return {int(os.environ["RANK"]): fn(*args)}
    if nproc == 1:
        with interruptible():
            return {0: fn(*args)}
    import pickle

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    forked = start_method() == "forkserver" and prestart((fn.__module__,))
    _register_loopback_rendezvous()
    work_dir = Path(tempfile.mkdtemp(prefix="paratrain-launch-"))
    args_file = work_dir / "args.pkl"
    args_file.write_bytes(pickle.dumps(args))
    listener = socket.create_server((LOOPBACK, 0), backlog=128)  # the store's socket: loopback only
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
        rdzv_backend=_RDZV_BACKEND, rdzv_endpoint=f"{LOOPBACK}:{listener.getsockname()[1]}",
        rdzv_configs={"listen_fd": listener.fileno()}, local_addr=LOOPBACK, max_restarts=max_restarts,
        monitor_interval=0.1, start_method="forkserver" if forked else "spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(work_dir / "logs")),
    )
    target = f"{fn.__module__}:{fn.__qualname__}"
    rank_args = (target, str(args_file), str(work_dir), str(os.getpid()))
    if forked:
        from paratrain.rank import forked_main

        entrypoint: Any = forked_main
    else:  # a fresh interpreter per rank
        entrypoint, rank_args = sys.executable, ("-m", "paratrain.rank", *rank_args)
    try:
        with _quiet_launcher_logs(), interruptible():
            elastic_launch(config, entrypoint)(*rank_args)
        results = {}
        for r in range(nproc):
            with open(work_dir / f"rank-{r}.pkl", "rb") as f:
                results[r] = pickle.load(f)
        return results
    except SignalException as e:  # the launcher already stopped the ranks
        raise Interrupted(e.sigval) from None
    except ChildFailedError as e:
        cause = root_cause(e, work_dir, nproc)
        if cause.message.startswith("KeyboardInterrupt"):  # Ctrl-C reached the ranks first
            raise Interrupted(signal.SIGINT) from None
        if cause.message.startswith("Preempted"):  # a signal reached the ranks only: they saved, then stopped
            raise Interrupted(_signal_of(cause.message)) from None
        raise cause from None
    finally:
        listener.close()
        shutil.rmtree(work_dir, ignore_errors=True)


START_METHOD_ENV = "PARATRAIN_START_METHOD"
_START_METHODS = ("forkserver", "spawn")


def start_method() -> str:
    """How :func:`launch` starts ranks. ``forkserver`` (the default on Linux): each rank is forked
    from one server process that imported torch and the rank function's module once, so a rank
    starts in milliseconds instead of spending ~2 s of CPU importing torch (on a 2-core machine a
    2-rank launch's imports take as long as a short run). The server is a fresh interpreter (not a
    fork of this launcher: no open files, locks or threads of ours are inherited), never touches a
    GPU, and is started early by :func:`prestart`. ``spawn``: ``python -m paratrain.rank`` per
    rank, a fresh interpreter each; set ``PARATRAIN_START_METHOD=spawn`` to get it."""
    method = os.environ.get(START_METHOD_ENV) or ("forkserver" if sys.platform.startswith("linux") else "spawn")
    if method not in _START_METHODS:
        from paratrain.errors import ConfigError

        raise ConfigError(f"{START_METHOD_ENV}={method!r} is not a way to start ranks: expected "
                          f"{' or '.join(_START_METHODS)} (forkserver is the default on Linux), or unset it.")
    return method


def prestart(modules: tuple[str, ...] = ("paratrain.train",)) -> bool:
    """Start the server ranks are forked from (if that is :func:`start_method`), so it imports
    torch and ``modules`` on another core while this process goes on (reading the corpus,
    importing torch itself). Idempotent; a no-op under an outside torchrun, where ranks are
    torchrun's. ``paratrain.rank_server`` comes first: it makes the server itself immune to the
    signals meant for the job (a Ctrl-C or SIGTERM to the process group stops the ranks, not the
    process that reports their exit codes). The server is multiprocessing's, one per process: if
    this process also starts forkserver children of its own, they come from it too (with those
    signals ignored). True if the server runs; False if it is not the start
    method or could not start (its socket's path under ``$TMPDIR`` is over the 107 bytes a Unix
    socket's may have, say): :func:`launch` then spawns."""
    if under_torchrun() or start_method() != "forkserver":
        return False
    import multiprocessing
    import multiprocessing.forkserver

    # torch._dynamo: the first torch.optim optimizer imports it (2.3 s of CPU here, more than torch)
    preload = ["paratrain.rank_server", "torch", "torch.distributed", "torch._dynamo", "paratrain.rank", *modules]
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(dict.fromkeys(preload)))
    try:
        multiprocessing.forkserver.ensure_running()
    except OSError:
        return False
    return True


def _signal_of(message: str) -> int:
    """The signal named in a rank's ``Preempted: interrupted by SIGTERM`` (SIGTERM if none)."""
    for name in ("SIGINT", "SIGHUP", "SIGTERM"):
        if name in message:
            return int(getattr(signal, name))
    return int(signal.SIGTERM)


def _register_loopback_rendezvous() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(_RDZV_BACKEND, _loopback_rendezvous)


def _loopback_rendezvous(params: Any) -> Any:
    """A single-node rendezvous whose ``TCPStore`` serves on the socket :func:`launch` bound to
    127.0.0.1 (``listen_fd``). Workers reuse it as their store (``use_agent_store``), so it is the
    only listener the launcher opens. The store closes the descriptor it is given, hence a dup."""
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.elastic.rendezvous.api import RendezvousInfo, RendezvousStoreInfo
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

    class LoopbackRendezvous(StaticTCPRendezvous):
        def get_backend(self) -> str:
            return _RDZV_BACKEND

        def next_rendezvous(self) -> RendezvousInfo:
            # A fresh store every round (a restart is a new round): the workers' keys of a failed
            # attempt (their gloo addresses) must not be read by the next one, and the workers
            # use the store as clients without a per-attempt prefix. Each is on a loopback socket.
            if not self._store:
                fd = os.dup(int(params.config["listen_fd"]))
            else:
                fresh = socket.create_server((LOOPBACK, 0), backlog=128)
                self.master_port = fresh.getsockname()[1]
                fd = os.dup(fresh.fileno())
                fresh.close()
            self._store = TCPStore(self.master_addr, self.master_port, None, True, self.timeout,
                                   wait_for_workers=False, multi_tenant=True, master_listen_fd=fd, use_libuv=True)
            return RendezvousInfo(PrefixStore(self.run_id, self._store), 0, 1,
                                  RendezvousStoreInfo(self.master_addr, self.master_port))

    host, _, port = params.endpoint.rpartition(":")
    return LoopbackRendezvous(host, int(port), 0, 1, params.run_id, 600)
