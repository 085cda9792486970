"""Where an asynchronous save's blocked time goes, per rank: wall and CPU seconds (of the training
thread: what other load on the machine does not inflate) of the whole blocked call, and of its
two parts, the check of the cached holdings walk and the copy into the host buffer.

The state of ``paratrain bench --only ckpt`` (the ``small`` model after one step, dp2 with ZeRO-3
and dp2 x tp2); every rank starts each save together after a barrier, as in a training run.

    python benchmarks/ckpt_blocked.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from paratrain.bench import BenchOptions, rank_worker
from paratrain.bench.ckpt import LAYOUTS, _Args, _session


def _timed(fn: Any, *args: Any) -> tuple[float, float, Any]:
    w0, c0 = time.perf_counter(), time.thread_time()
    out = fn(*args)
    return time.perf_counter() - w0, time.thread_time() - c0, out


def _measure(a: _Args, rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from paratrain.checkpoint import session as ck
    from paratrain.checkpoint.store import CheckpointSaver

    s = _session(a, rank)
    saver = CheckpointSaver(Path(a.root), rank, world, dist.barrier, keep=2, asynchronous=True)
    ck.save(saver, s, 1, {})  # the first save walks, plans and allocates
    times: dict[str, list[tuple[float, float]]] = {"blocked": [], "check": [], "copy": []}
    for i in range(a.opts.repeats):
        saver.wait()
        dist.barrier()
        wall, cpu, _ = _timed(ck.save, saver, s, 2 + i, {})
        times["blocked"].append((wall, cpu))
        saver.wait()
        dist.barrier()
        writes = saver.memo["writes"]
        wall, cpu, shards = _timed(writes.shards, s.pm, s.opt, rank)
        times["check"].append((wall, cpu))
        wall, cpu, staged = _timed(saver._buffer.stage, shards, ck.rng_state(s.device))
        times["copy"].append((wall, cpu))
    saver.wait()
    line = (f"rank {rank}: {staged.data.numel() / 2**20:.1f} MiB, {len(shards)} shards in "
            f"{len(saver._buffer._dst)} copies |" + "".join(
                f" {k} {statistics.median(w for w, _ in v) * 1e3:.2f} / {statistics.median(c for _, c in v) * 1e3:.2f}"
                for k, v in times.items()))
    lines: list[Any] = [None] * world
    dist.all_gather_object(lines, line)
    return {"lines": lines}


def main() -> None:
    from paratrain.launch import launch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    for name, layout in LAYOUTS.items():
        world = layout.get("dp", 1) * layout.get("tp", 1)
        root = tempfile.mkdtemp(prefix="paratrain-ckpt-blocked-")
        try:
            r = launch(rank_worker, (_measure, _Args(BenchOptions(repeats=args.repeats), layout, root)), world)[0]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{name}: ms wall / CPU, medians of {args.repeats}")
        for line in r["lines"]:
            print("  ", line)


if __name__ == "__main__":
    main()
