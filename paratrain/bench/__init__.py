"""``paratrain bench``: our implementations against PyTorch's own, side by side, in one run.

Each group (``dp``, ``tp``, ``pp``, ``zero``, ``hf``, ...) is a module here with ``run(opts) -> list[Row]``. A row
compares tokens/s of ours and of the PyTorch reference on the same model, the same global batch
and the same threads per rank, measured in the same processes with alternating A/B repeats; the
reported figure is the median over repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GROUPS = ("dp", "tp", "pp", "zero", "ckpt", "cp", "hf", "ep")
# cp, hf and ep only when asked for: cp needs seq_len divisible by 2 x nproc, hf needs transformers,
# ep a mixture-of-experts model
DEFAULT_GROUPS = GROUPS[:5]


@dataclass
class Row:
    name: str
    ours_tokens_per_s: float
    ref_tokens_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours_tokens_per_s / self.ref_tokens_per_s

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ours_tokens_per_s": self.ours_tokens_per_s,
                "ref_tokens_per_s": self.ref_tokens_per_s, "ratio": self.ratio, **self.extra}


@dataclass(frozen=True)
class BenchOptions:
    model: str = "small"
    global_batch: int = 16
    seq_len: int = 128
    steps: int = 5          # timed steps per repeat
    warmup: int = 2         # untimed steps before the first repeat of each side
    repeats: int = 5        # A/B alternations; medians reported
    nprocs: tuple[int, ...] = (2, 4)
    threads: int = 0        # per rank; 0 = cores / ranks (at least 1)
    seed: int = 0
    bucket_mb: float = 25.0  # ours; DDP keeps its default (25 MiB)


def alternate(sides: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Time each side's callable ``repeats`` times, alternating A, B, A, B, ...; ``sync`` (a
    barrier) runs before each timing starts and before it stops, so every rank's work counts."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def rank_worker(measure: Callable[[Any, int, int], dict[str, Any]], opts: Any) -> dict[str, Any] | None:
    """One benchmark rank (launch it with :func:`paratrain.launch.launch`): threads per rank, the
    gloo process group, then ``measure(opts, rank, world_size)`` (a module-level function).
    Returns rank 0's result with ``threads`` (per rank) added, None elsewhere."""
    from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed

    env = RankEnv.from_env()
    threads = set_threads(opts.threads, env.local_world_size)
    init_distributed(env, "cpu", timeout_s=600)
    ok = False
    try:
        result = measure(opts, env.rank, env.world_size)
        ok = True
        return dict(result, threads=threads) if env.rank == 0 else None
    finally:
        shutdown_distributed(ok)


def heap_bytes() -> int | None:
    """Bytes of this process's heap in use after a garbage collection: glibc's ``mallinfo2``
    (``uordblks`` + ``hblkhd``: allocated chunks and mmapped blocks; torch's CPU tensors are
    malloc'd and freed, no caching). One meter for every library's tensors, buffers and
    bookkeeping alike; None where the C library has no ``mallinfo2`` (glibc < 2.33, musl, macOS)."""
    import gc

    info = _mallinfo2()
    if info is None:
        return None
    gc.collect()
    return _in_use(info)


class HeapPeak:
    """The most heap in use (as :func:`heap_bytes`, without the collection) while the ``with``
    block runs: a thread reads ``mallinfo2`` about every 0.1 ms, and the block's ends count too.
    A peak shorter than that can be missed; a step's (its gradients before a reduction frees
    them, its activations) lasts milliseconds. ``peak`` is None without ``mallinfo2``."""

    def __init__(self) -> None:
        import threading

        self.peak: int | None = None
        self._read = _mallinfo2()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _now(self) -> int:
        return _in_use(self._read)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak or 0, self._now())
            time.sleep(1e-4)

    def __enter__(self) -> HeapPeak:
        if self._read is not None:
            self.peak = self._now()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._read is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak or 0, self._now())


def _in_use(mallinfo2: Any) -> int:
    m = mallinfo2()
    return int(m.uordblks + m.hblkhd)


def _mallinfo2() -> Any:
    import ctypes
    import ctypes.util

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Mallinfo2
    return fn


def median(xs: list[float]) -> float:
    return statistics.median(xs)
