"""A tiny launcher for the examples: run ``fn(rank, world_size)`` in ``world_size`` CPU processes
that talk through ``torch.distributed`` (the gloo backend), and return what each one returned.

This is what ``paratrain train`` does for you with torch's elastic launcher; here it is ten lines
so that nothing is hidden. The processes are forked from this one, so they start with the same
Python state (the same seeded tensors) and cost no new interpreter.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

torch.set_num_threads(1)  # one thread per process, set before forking (a forked thread pool would hang)


def _child(fn, rank: int, world_size: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results.put((rank, fn(rank, world_size)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
        os._exit(0)  # skip interpreter shutdown: gloo's threads would otherwise abort at exit


def run(fn, world_size: int) -> list:
    """``[fn(0, world_size), fn(1, world_size), ...]``, each computed in its own process."""
    ctx = mp.get_context("fork")
    store = os.path.join(tempfile.mkdtemp(), "store")  # the processes find each other through this file
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, store, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out = dict(results.get() for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a rank failed (exit code {p.exitcode})"
    return [out[r] for r in range(world_size)]


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Print how far ``got`` is from the single-process ``want``; fail past ``tol``. The parallel
    versions add the same numbers in another order, so they differ by float rounding only:
    ~1e-7 relative in fp32, far below 1e-5; a wrong split or a missing reduction is off by O(1)."""
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item() or 1.0
    ok = diff <= tol * scale
    print(f"  {name}: max |parallel - single| = {diff:.2e} ({'matches' if ok else 'DIFFERS'})")
    assert ok, f"{name} does not match the single-process result"
