"""Measure this machine and write a device profile the planner can load (``--device profile:PATH``).

The only module of :mod:`paratrain.plan` that imports torch. It measures, on the CPU:

* matmul throughput: ``C = A @ B`` of n x n matrices, 2 n^3 FLOPs, best of several runs, with one
  thread and with every thread, in fp32 and bf16;
* memory bandwidth: ``dst.copy_(src)`` of a large buffer, reading and writing it: 2 S bytes;
* gloo collectives between two local processes: all-reduce of several sizes S; each device sends
  2 (n - 1)/n S = S bytes (n = 2) in 2 (n - 1) = 2 latency-bound steps, so the least-squares fit
  t = 2 alpha + S / bw gives the link's bandwidth bw and per-step latency alpha.

The profile's device is one process with one thread (how ``paratrain train`` runs ranks on a
machine with as many cores as ranks): its peak is the best one-thread matmul rate, and it gets a
1/cores share of the memory, of the memory bandwidth (measured with every thread) and of the RAM.
Its compute efficiency is 1.0 (the peak is already a measured rate); the validation of issue 5
fits it against real training steps.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from paratrain.plan.hardware import Hardware

FULL = {"matmul_1t": (128, 256, 512, 1024), "matmul_all": (512, 1024, 2048), "matmul_bf16": (512, 1024),
        "copy_mib": 256, "allreduce_bytes": (2**10, 2**14, 2**18, 2**20, 2**22, 2**24), "budget_s": 0.25}
QUICK = {"matmul_1t": (128, 256), "matmul_all": (256,), "matmul_bf16": (128,), "copy_mib": 16,
         "allreduce_bytes": (2**10, 2**16, 2**20), "budget_s": 0.02}


def _best_rate(fn: Callable[[], None], work: float, budget_s: float) -> float:
    """``work`` units per second of the fastest call of ``fn`` within about ``budget_s``."""
    fn()  # warm-up (allocation, kernel selection)
    best, spent = float("inf"), 0.0
    while spent < budget_s or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return work / best


def measure_matmul(n: int, threads: int, dtype: str = "float32", budget_s: float = 0.25) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs) with ``threads`` intra-op threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, dtype=getattr(torch, dtype))
        out = torch.empty(n, n, dtype=getattr(torch, dtype))
        return _best_rate(lambda: torch.matmul(a, b, out=out), 2.0 * n**3, budget_s)
    finally:
        torch.set_num_threads(old)


def measure_copy_bandwidth(mib: int, threads: int, budget_s: float = 0.25) -> float:
    """Bytes/s of ``dst.copy_(src)`` over ``mib`` MiB: each copy reads and writes it (2 S bytes)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        return _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4, budget_s)
    finally:
        torch.set_num_threads(old)


def allreduce_worker(sizes: tuple[int, ...], budget_s: float, timeout_s: float) -> list[float]:
    """Runs on each of the 2 ranks: seconds per all-reduce of each payload size (bytes)."""
    import torch
    import torch.distributed as dist

    from paratrain.launch import RankEnv, init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    init_distributed(RankEnv.from_env(), "cpu", timeout_s)
    ok = False
    try:
        times = []
        for size in sizes:
            x = torch.zeros(size // 4, dtype=torch.float32)
            for _ in range(3):  # warm-up (first use of a size sets up buffers)
                dist.all_reduce(x)
            reps = max(3, min(200, int(budget_s * 1e9 / max(size, 1) / 4)))  # ~budget at 4 GB/s
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(x)
            times.append((time.perf_counter() - t0) / reps)
        ok = True
        return times
    finally:
        shutdown_distributed(ok)


def fit_link(sizes: tuple[int, ...], seconds: list[float], steps: int) -> tuple[float, float]:
    """Least-squares fit of t = steps * alpha + S / bw over (S, t): returns (bw, alpha)."""
    k = len(sizes)
    mx, my = sum(sizes) / k, sum(seconds) / k
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx
    slope = max(slope, 1e-15)
    intercept = max(my - slope * mx, 0.0)
    return 1.0 / slope, intercept / steps


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrate(quick: bool = False, collectives: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
              ) -> tuple[Hardware, dict[str, Any]]:
    """Measure this machine; return the profile's Hardware and the raw measurements."""
    import platform

    import torch

    cfg = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    budget = cfg["budget_s"]
    meas: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": cores,
                            "torch": torch.__version__, "quick": quick}
    log(f"[1/4] fp32 matmul, 1 thread and {cores} threads")
    one = {n: measure_matmul(n, 1, "float32", budget) for n in cfg["matmul_1t"]}
    every = {n: measure_matmul(n, cores, "float32", budget) for n in cfg["matmul_all"]}
    for label, table in (("1 thread", one), (f"{cores} threads", every)):
        log("      " + label + ": " + ", ".join(f"n={n} {r / 1e9:.1f} GFLOP/s" for n, r in table.items()))
    log("[2/4] bf16 matmul, 1 thread")
    bf16 = {n: measure_matmul(n, 1, "bfloat16", budget) for n in cfg["matmul_bf16"]}
    log("      " + ", ".join(f"n={n} {r / 1e9:.1f} GFLOP/s" for n, r in bf16.items()))
    log(f"[3/4] memory bandwidth (copy of {cfg['copy_mib']} MiB, {cores} threads)")
    copy_bw = measure_copy_bandwidth(cfg["copy_mib"], cores, budget)
    log(f"      {copy_bw / 1e9:.1f} GB/s")
    meas.update(matmul_fp32_1thread=one, matmul_fp32_all_threads=every, matmul_bf16_1thread=bf16,
                copy_bandwidth=copy_bw)
    bw, alpha = 1e9, 0.0
    if collectives:
        from paratrain.launch import launch

        sizes = cfg["allreduce_bytes"]
        log(f"[4/4] gloo all-reduce between 2 local processes, {len(sizes)} sizes (starting processes)")
        seconds = launch(allreduce_worker, (sizes, budget, 60.0), 2)[0]
        bw, alpha = fit_link(sizes, seconds, steps=2)
        log("      " + ", ".join(f"{s / 2**10:g} KiB {t * 1e6:.0f} us" for s, t in zip(sizes, seconds)))
        log(f"      fit: {bw / 1e9:.2f} GB/s, {alpha * 1e6:.1f} us per step")
        meas.update(allreduce_bytes=list(sizes), allreduce_seconds=seconds)
    else:
        log("[4/4] collectives skipped: link figures are placeholders (1 GB/s, no latency)")
    meas.update(link_bandwidth=bw, link_latency_s=alpha, collectives_measured=collectives)
    peak32 = max(one.values())
    hw = Hardware(
        name=f"profile:{platform.node()}", peak_bf16_flops=max(bf16.values()), peak_fp16_flops=max(bf16.values()),
        peak_fp32_flops=peak32, memory_bytes=_ram_bytes() / cores, memory_bw=copy_bw / cores,
        intra_node_bw=bw, inter_node_bw=bw, devices_per_node=cores, compute_efficiency=1.0,
        intra_node_latency_s=alpha, inter_node_latency_s=alpha,
        source=f"paratrain calibrate on {platform.node()}: one process with one thread per core; "
               f"inter-node link not measured (set to the gloo loopback figure)",
    )
    return hw, meas
