"""run_ranks(n, fn, *args): run ``fn(*args)`` on ``n`` gloo ranks on localhost.

* Ranks are forked from a forkserver that has already imported torch (and torch._dynamo, and
  read the default corpus: tests/preload.py), so a rank starts in a fraction of a second.
* The rendezvous store listens on port 0 (the OS picks a free port; no race with other jobs).
* Every rank gets one intra-op thread and a process-group timeout; the whole call has a deadline.
* If any rank raises, every rank's traceback is shown in the raised :class:`RankFailure`, and the
  survivors are killed after a short grace period, so a failing test never hangs.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

_CTX = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch._dynamo: the first optimizer a process makes imports it (2.3 s, more than torch)
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "paratrain.train",
                                     "tests.preload"])
    return _CTX


class RankFailure(AssertionError):
    pass


def _child(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
           q: Any, pg_timeout: float) -> None:
    import torch
    import torch.distributed as dist

    from paratrain.launch import shutdown_distributed
    from paratrain.rank import end_process

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ok = False
    try:
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=pg_timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        buf = io.BytesIO()
        torch.save(fn(*args), buf)  # tensors as bytes: the queue's shared-memory handles die with us
        q.put((rank, True, buf.getvalue()))
        ok = True
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            shutdown_distributed(ok)
        except Exception:  # noqa: BLE001
            pass
        q.close()
        q.join_thread()  # the result is in the pipe
        end_process(0 if ok else 1)  # no interpreter finalisation: see paratrain/rank.py


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0,
              pg_timeout: float = 30.0, grace: float = 5.0) -> list[Any]:
    """Return ``[fn(*args) on rank 0, ..., on rank world-1]`` or raise RankFailure."""
    import torch.distributed as dist

    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout))
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, world, store.port, fn, args, q, pg_timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_error_at: float | None = None
    try:
        while len(results) + len(errors) < world:
            now = time.monotonic()
            if now > deadline:
                errors.setdefault(-1, f"timed out after {timeout:.0f} s; ranks without a result: "
                                  f"{sorted(set(range(world)) - set(results) - set(errors))}")
                break
            if first_error_at is not None and now > first_error_at + grace:
                break
            try:
                rank, ok, payload = q.get(timeout=0.05)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in results and r not in errors:
                        # its message may still be in the queue: look again before blaming it
                        try:
                            rank, ok, payload = q.get(timeout=0.5)
                        except queue.Empty:
                            errors[r] = f"exited with code {p.exitcode} without reporting"
                            first_error_at = first_error_at or time.monotonic()
                            break
                        (results if ok else errors)[rank] = payload
                        if not ok:
                            first_error_at = first_error_at or time.monotonic()
                        break
                continue
            if ok:
                results[rank] = payload
            else:
                errors[rank] = payload
                first_error_at = first_error_at or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    bad_exit = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (0, None) and r not in errors}
    if errors or bad_exit:
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
        parts += [f"--- rank {r} --- exit code {c} after reporting success" for r, c in bad_exit.items()]
        raise RankFailure("ranks failed:\n" + "\n".join(parts))
    import torch

    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]
