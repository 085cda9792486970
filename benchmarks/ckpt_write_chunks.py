"""How the size of each write(2) changes the cost of writing a checkpoint file (the reason
``paratrain/checkpoint/writer.py`` writes 256 KiB at a time).

Writes a 28 MiB file (one rank's share of the ``small`` model's state under dp 2) per variant and
repeat, rotating the order, fsyncing each, and keeps the files (``--keep 0``) as a run that saves
more than once keeps its page cache full of earlier checkpoints; prints the median CPU time of the
writes (user + kernel, this thread), their wall time and the fsync's.

    python benchmarks/ckpt_write_chunks.py [--repeats 10] [--keep 0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

SIZE = 28 << 20
CHUNKS = (64 << 10, 256 << 10, 1 << 20, 4 << 20, SIZE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--keep", type=int, default=0, help="files kept (0: all, like a run without --keep-checkpoints)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    data = memoryview(os.urandom(SIZE))
    folder = tempfile.mkdtemp(dir=args.dir, prefix="ckpt-write-chunks-")
    cpu: dict[int, list[float]] = {c: [] for c in CHUNKS}
    wall: dict[int, list[float]] = {c: [] for c in CHUNKS}
    sync: dict[int, list[float]] = {c: [] for c in CHUNKS}
    kept: list[str] = []
    try:
        for i in range(args.repeats):
            for chunk in CHUNKS[i % len(CHUNKS):] + CHUNKS[:i % len(CHUNKS)]:
                path = os.path.join(folder, f"{chunk}-{i}")
                w0, c0 = time.perf_counter(), time.thread_time()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                for at in range(0, SIZE, chunk):
                    os.write(fd, data[at:at + chunk])
                w1, c1 = time.perf_counter(), time.thread_time()
                os.fsync(fd)
                os.close(fd)
                cpu[chunk].append(c1 - c0)
                wall[chunk].append(w1 - w0)
                sync[chunk].append(time.perf_counter() - w1)
                kept.append(path)
                if args.keep and len(kept) > args.keep:
                    os.unlink(kept.pop(0))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'write size':>10}  {'cpu ms':>7}  {'wall ms':>7}  {'fsync ms':>8}   (medians of {args.repeats})")
    for chunk in CHUNKS:
        med = [statistics.median(x[chunk]) * 1e3 for x in (cpu, wall, sync)]
        print(f"{chunk >> 10:>7} KiB  {med[0]:7.1f}  {med[1]:7.1f}  {med[2]:8.1f}")


if __name__ == "__main__":
    main()
