"""Measure this machine and write a device profile the planner can load (``--device profile:PATH``).

The runtime side of the planner: it imports torch, starts processes with :mod:`paratrain.launch`
and runs its collectives through :mod:`paratrain.comm`, as training does; the planner
(:mod:`paratrain.plan`, torch-free) only reads the profile it writes
(:func:`paratrain.plan.hardware.load_profile`). It measures, on the CPU:

* matmul throughput: ``C = A @ B`` of n x n matrices, 2 n^3 FLOPs, best of several runs, with one
  thread and with every thread, in fp32 and bf16 (bf16: the faster of that and ``F.linear`` of
  1024 x n inputs, the kernel the model's layers call: see :func:`measure_linear`);
* memory bandwidth: ``dst.copy_(src)`` of a large buffer, reading and writing it: 2 S bytes;
* the work of a training step's forward + backward, with one thread: the reference GPTs of
  several shapes and batch sizes (``tiny-deep``, ``tiny``, ``small``, ``medium``; sequences of 128
  tokens, fp32; t: the median of repeated runs) fitted, by least squares on relative error, to

      t = FLOPs / rate + lambda * A + L * c

  where A is the activations they produce (the planner's formulas, as the runtime stores them),
  L the layers run, and the three figures are: the matmul rate the layers really reach (the
  profile's ``compute_efficiency`` = rate / the best matmul rate: a median inside a model, with
  its small and skinny products, is well under a lone square matmul's best), the seconds per
  activation byte of the memory-bound work (``elementwise_s_per_byte``: LayerNorm, GELU,
  softmax, residual adds) and the fixed seconds of one layer's forward + backward
  (``layer_overhead_s``: Python, autograd's bookkeeping and the kernel launches of ~30 small
  operations, whatever the layer's size). Each point and the fit's error on it are kept in the
  measurements. One figure per activation byte alone (this module's first model) missed the
  points by -17% to +22% on an AVX2 machine where the three-figure fit stays within 3-6%;
* the same in bf16 weights and activations (``tiny`` and ``small``, 2-8 sequences): the bf16
  matmul rate the layers reach, ``elementwise_s_per_byte_bf16`` and ``layer_overhead_s_bf16``;
* forward and backward of ``small`` (4 sequences) timed apart, and split as the zero-bubble
  schedules split them (forward under ``SplitLinears``, then I, then W): the backward's share of
  the two (``backward_share``: 0.63 here, where the FLOPs say 2/3) and what the split costs more
  as a factor on the backward (``split_backward_slowdown``: 1.07-1.10 here; the W matmuls read back
  their inputs long after I), which the planner gives the zero-bubble schedules' W;
* the copy a tensor-parallel collective makes of its payload (an activation regrouped by
  sequence slice into one contiguous buffer for gloo, and back), one thread, per byte
  (``pack_s_per_byte``);
* the optimizer phase of a step (gradient-norm clipping, AdamW and zeroing the gradients over
  ``small``'s 4.9M parameters, median of repeated runs), as an effective bandwidth
  ``28 bytes x parameters / seconds``: the planner prices the optimizer as 28 bytes per
  parameter over ``memory_bw``;
* gloo collectives between two local processes, as training sees them (through ``comm``):
  each process alternates ~4 ms of matmuls with an all-reduce of a freshly written buffer of S
  bytes (as layers alternate with collectives; an idle pair of processes answers differently,
  and that is kept as a measurement only), for several S; each device sends 2 (n - 1)/n S = S
  bytes (n = 2) in 2 (n - 1) = 2 latency-bound steps, so the least-squares fit of the medians to
  t = 2 alpha + S / bw gives the link's bandwidth bw and per-step latency alpha;
* forward + backward of ``small`` (4 sequences) alone and in one process per core at once,
  alternately in the same processes: ``busy_compute_slowdown``, what processes that fill the
  cores cost each other;
* the same forward + backward in twice as many processes as cores, all at once: each takes
  2 x ``busy_compute_slowdown`` of its time alone, times ``oversubscribed_compute_slowdown``
  (here 1.03: the kernel switching processes on a core, caches refilled), which the planner
  applies when processes outnumber cores;
* the same all-reduce with twice as many processes as cores (a 4 KiB all-reduce over its 2(n - 1) ring
  steps): ``shared_latency_s``, which the planner uses when processes outnumber cores;
* the link as tensor parallelism sees it: real training steps of ``medium`` at tp 2 and 2, 4
  and 8 sequences (``paratrain.train``'s own setup and step), the seconds ``comm`` counts inside
  the tp group's all-reduces per call against the link's model of the same call: the extra,
  fitted per call and per byte (``tp_extra_s_per_call`` / ``tp_extra_s_per_byte``), which the
  planner adds to every tp collective (all-reduce, and sequence parallelism's gathers and
  scatters) when each process has a core; and the same steps with sequence parallelism give its
  reduce-scatters' and all-gathers' factors on the ring as steps see them
  (``tp_reduce_scatter_slowdown`` / ``tp_all_gather_slowdown``). Inside a step each all-reduce sits between two layers'
  compute on both ranks and waits for the later of them, so it costs more than the same
  collective between matmul loops (here 3.8 ms against 2.4 ms for a 1.9 MiB all-reduce).

The profile's device is one process with one thread (how ``paratrain train`` runs ranks on a
machine with as many cores as ranks): its peak is the best one-thread matmul rate, its compute
efficiency the fitted rate's share of it (the rest of a layer's time is the memory-bound and the
per-layer term), it gets a 1/cores share of
the RAM, and ``cores_per_node`` = cores: more processes than cores time-share them.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paratrain.plan.hardware import Hardware

if TYPE_CHECKING:
    from paratrain.comm import Group

FULL = {"matmul_1t": (128, 256, 512, 1024), "matmul_all": (512, 1024, 2048), "matmul_bf16": (512, 1024),
        "copy_mib": 256, "allreduce_bytes": (2**10, 2**14, 2**18, 2**20, 2**22, 2**24), "budget_s": 0.25,
        "layer_points": (("tiny-deep", 2), ("tiny-deep", 8), ("tiny", 2), ("tiny", 8), ("small", 2), ("small", 4),
                         ("medium", 2)), "busy_point": ("small", 4), "busy_reps": 100,
        "tp_points": ("medium", (2, 4, 8), 6),
        "bf16_points": (("tiny", 2), ("tiny", 8), ("small", 2), ("small", 4))}
QUICK = {"matmul_1t": (128, 256), "matmul_all": (256,), "matmul_bf16": (128,), "copy_mib": 16,
         "allreduce_bytes": (2**10, 2**16, 2**20), "budget_s": 0.02,
         "layer_points": (("tiny-deep", 2), ("tiny", 2), ("small", 2)), "busy_point": ("tiny", 2), "bf16_points": (),
         "busy_reps": 5, "tp_points": ("tiny", (2, 8), 1)}


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


def _median_seconds(fn: Callable[[], None], budget_s: float, min_runs: int = 7) -> float:
    """Median seconds of ``fn`` over at least ``min_runs`` calls and about ``budget_s``: what a
    training step typically takes (the validation compares medians), not its best case."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < min_runs or sum(times) < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def measure_linear(n: int, tokens: int, dtype: str = "bfloat16", budget_s: float = 0.25) -> float:
    """FLOP/s of ``F.linear`` of ``tokens`` x n inputs by an n x n weight (2 tokens n^2 FLOPs),
    one thread: the kernel a model's layers call. In bf16 it is not ``torch.matmul``'s: on a CPU
    without bf16 matrix units (AVX2) the linear's oneDNN kernel ran 4-5x faster (5.6 against
    1.2 GFLOP/s measured), so the bf16 peak is taken from it."""
    import torch
    import torch.nn.functional as F

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(tokens, n, dtype=getattr(torch, dtype))
        w = torch.randn(n, n, dtype=getattr(torch, dtype))
        return _best_rate(lambda: F.linear(x, w), 2.0 * tokens * n * n, budget_s)
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


def layer_point(model_name: str, batch: int, seq_len: int, seconds: float, dtype: str = "float32") -> dict[str, Any]:
    """One measured forward + backward of reference GPT ``model_name`` as the fit takes it: its
    seconds, model FLOPs, the bytes of activations it produces (the planner's accounting of the
    runtime) and its layers."""
    from paratrain.models.configs import get_model_config
    from paratrain.plan import formulas as f

    cfg = get_model_config(model_name)
    h, F, a = cfg.hidden, cfg.ffn_hidden, cfg.num_heads
    e = 2 if dtype == "bfloat16" else 4
    acts = cfg.num_layers * f.layer_activation_bytes(seq_len, batch, h, a, F, elem_bytes=e, dropout=False,
                                                     store_scores=False) \
        + f.output_activation_bytes(seq_len, batch, h, cfg.vocab_size, elem_bytes=e)
    return {"model": model_name, "batch": batch, "dtype": dtype, "seconds": seconds,
            "flops": f.step_flops(cfg, batch, seq_len), "activation_bytes": acts, "layers": cfg.num_layers}


def measure_layers(model_name: str, batch: int, seq_len: int, budget_s: float,
                   dtype: str = "float32") -> dict[str, Any]:
    """:func:`layer_point` of forward + backward of ``model_name`` on one thread (fp32, or bf16
    weights and activations as ``--precision bf16`` runs them), the median of repeated runs."""
    import torch

    from paratrain.models.configs import get_model_config
    from paratrain.models.gpt import build_reference

    cfg = get_model_config(model_name)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_reference(cfg, 0).to(getattr(torch, dtype))
        x = torch.randint(0, cfg.vocab_size, (batch, seq_len))

        def step() -> None:
            model(x, x).float().backward()

        seconds = _median_seconds(step, budget_s, min_runs=5)
    finally:
        torch.set_num_threads(old)
    return layer_point(model_name, batch, seq_len, seconds, dtype)


def measure_layer_points(points: tuple[tuple[str, int], ...], budget_s: float, dtype: str = "float32",
                         rounds: int = 5) -> list[dict[str, Any]]:
    """:func:`layer_point` of every (model, batch) point, taken round-robin: ``rounds`` passes
    over all the points, about ``budget_s / rounds`` seconds of calls of each per pass, each
    point's median over every pass. A
    machine whose speed drifts over a minute (a VM's neighbours) then moves every point alike,
    which the fit absorbs in its rate, instead of tilting the fit between the points measured
    early and late (one point per block measured: the per-layer term swung 1.2-2.5 ms between
    two calibrations on an AVX2 VM)."""
    import torch

    from paratrain.models.configs import get_model_config
    from paratrain.models.gpt import build_reference

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for name, batch in points:
            cfg = get_model_config(name)
            model = build_reference(cfg, 0).to(getattr(torch, dtype))
            x = torch.randint(0, cfg.vocab_size, (batch, 128))
            runs.append((lambda model=model, x=x: model(x, x).float().backward()))
            runs[-1]()  # warm-up
        times: list[list[float]] = [[] for _ in points]
        for _ in range(rounds):
            for i, step in enumerate(runs):
                spent = 0.0
                while spent < budget_s / rounds:  # at least one call per pass
                    t0 = time.perf_counter()
                    step()
                    times[i].append(time.perf_counter() - t0)
                    spent += times[i][-1]
    finally:
        torch.set_num_threads(old)
    out = []
    for (name, batch), ts in zip(points, times):
        out.append(layer_point(name, batch, 128, statistics.median(ts), dtype))
    return out


def fit_layer_work(points: list[dict[str, float]]) -> tuple[float, float, float]:
    """Least-squares fit of ``seconds = flops / rate + lambda * activation_bytes + layers * c``
    over ``points`` (:func:`measure_layers`' dicts), each weighted by 1 / seconds (relative
    error: the small models count as much as the large). Returns (rate, lambda, c); lambda and
    c are never negative (a term the points do not support is dropped and the rest refitted).
    Pure Python: the planner's tests call it without torch."""
    cols = ("flops", "activation_bytes", "layers")
    best: tuple[float, list[float]] | None = None
    for keep in ((0, 1, 2), (0, 1), (0, 2), (0,)):  # the matmul term always stays
        coef = _least_squares([[p[cols[k]] / p["seconds"] for k in keep] for p in points], [1.0] * len(points))
        if coef is None or min(coef) < 0:
            continue
        full = [0.0, 0.0, 0.0]
        for k, c in zip(keep, coef):
            full[k] = c
        residual = sum((sum(full[k] * p[cols[k]] for k in range(3)) / p["seconds"] - 1) ** 2 for p in points)
        if best is None or residual < best[0] - 1e-15:
            best = (residual, full)
    if best is None:
        raise ValueError("the layer measurements fit no positive matmul rate")
    inv_rate, lam, c = best[1]
    return 1.0 / inv_rate, lam, c


def _least_squares(rows: list[list[float]], target: list[float]) -> list[float] | None:
    """x minimising |rows x - target|^2 (normal equations, Gaussian elimination); None if singular."""
    n = len(rows[0])
    # scale the columns to order 1 so the elimination does not lose the small ones
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(n)]
    a = [[sum(r[i] / scale[i] * r[j] / scale[j] for r in rows) for j in range(n)]
         + [sum(r[i] / scale[i] * t for r, t in zip(rows, target))] for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda i: abs(a[i][col]))
        if abs(a[piv][col]) < 1e-12:
            return None
        a[col], a[piv] = a[piv], a[col]
        for i in range(n):
            if i != col:
                f = a[i][col] / a[col][col]
                a[i] = [x - f * y for x, y in zip(a[i], a[col])]
    return [a[i][n] / a[i][i] / scale[i] for i in range(n)]


def measure_packing(shape: tuple[int, int, int], parts: int, budget_s: float) -> float:
    """Seconds per byte of the copy a tensor-parallel collective makes of its payload, one
    thread: a (B, T, H) fp32 activation regrouped by sequence slice into one contiguous buffer
    (``parallel/tp_ops.reduce_scatter_seq``; the all-gather's unpacking and backward's gradient
    clones are copies of the same size)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b, t, h = shape
        x = torch.randn(b, t, h)
        seconds = _median_seconds(lambda: x.view(b, parts, t // parts, h).transpose(0, 1).contiguous(), budget_s,
                                  min_runs=21)
    finally:
        torch.set_num_threads(old)
    return seconds / (x.numel() * 4)


def measure_optimizer(model_name: str, budget_s: float) -> dict[str, float]:
    """Seconds of one optimizer phase (clip the gradient norm, AdamW step, zero the gradients) over
    ``model_name``'s parameters, one thread, and its effective bandwidth at 28 bytes per
    parameter (median of repeated runs)."""
    import torch

    from paratrain.models.configs import get_model_config
    from paratrain.models.gpt import build_reference
    from paratrain.plan.cost import OPTIMIZER_BYTES_PER_PARAM

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_reference(get_model_config(model_name), 0)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for p in params:
                p.grad.zero_()

        seconds = _median_seconds(step, budget_s)
    finally:
        torch.set_num_threads(old)
    n = sum(p.numel() for p in params)
    return {"seconds": seconds, "params": n, "bandwidth": OPTIMIZER_BYTES_PER_PARAM * n / seconds}


def measure_split_backward(model_name: str, batch: int, budget_s: float) -> dict[str, float]:
    """Forward and backward of reference GPT ``model_name`` x ``batch`` sequences on one thread,
    alternately plain (``F``, ``B``) and as a zero-bubble schedule splits them (the forward under
    the runtime's ``SplitLinears``, then ``I``, then ``W``: ``parallel/pipeline/split.py``), medians
    of each piece. Returns them (seconds) with ``backward_share`` = B / (F + B) and
    ``split_backward_slowdown`` = (F_split + I + W - F) / B, what a split micro-batch costs beyond
    a plain one as a factor on its backward (the W matmuls read ``x`` and ``dy`` back from memory
    long after I wrote them, and the forward's wrapped linears cost a little more)."""
    import torch

    from paratrain.models.configs import get_model_config
    from paratrain.models.gpt import build_reference
    from paratrain.parallel.pipeline.split import SplitLinears, WeightGrads

    cfg = get_model_config(model_name)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {k: [] for k in ("F", "B", "F_split", "I", "W")}
    try:
        model = build_reference(cfg, 0)
        x = torch.randint(0, cfg.vocab_size, (batch, 128))
        start, runs = time.perf_counter(), 0
        while runs < 7 or (time.perf_counter() - start < budget_s and runs < 50):
            t0 = time.perf_counter()
            loss = model(x, x)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            box = WeightGrads()
            with SplitLinears(box):
                loss = model(x, x)
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            box.run()
            t5 = time.perf_counter()
            if runs:  # the first: warm-up
                for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    times[key].append(dt)
            runs += 1
    finally:
        torch.set_num_threads(old)
    med = {key: statistics.median(v) for key, v in times.items()}
    return {**med, "backward_share": med["B"] / (med["F"] + med["B"]),
            "split_backward_slowdown": max(1.0, (med["F_split"] + med["I"] + med["W"] - med["F"]) / med["B"])}


def _join(timeout_s: float) -> Group:
    """Start this rank's torch.distributed (gloo) and return the group of every rank, through
    which the measured collectives run: :mod:`paratrain.comm`, as in training."""
    import torch

    from paratrain.launch import RankEnv, init_distributed
    from paratrain.mesh import Mesh, MeshShape

    torch.set_num_threads(1)
    env = RankEnv.from_env()
    init_distributed(env, "cpu", timeout_s)
    return Mesh.build(MeshShape(dp=env.world_size), env.rank, timeout_s).world


def allreduce_worker(sizes: tuple[int, ...], budget_s: float, timeout_s: float) -> list[float]:
    """Runs on each of the 2 ranks: seconds per all-reduce of each payload size (bytes)."""
    import torch

    from paratrain import comm
    from paratrain.launch import shutdown_distributed

    world = _join(timeout_s)
    ok = False
    try:
        times = []
        for size in sizes:
            x = torch.zeros(size // 4, dtype=torch.float32)
            for _ in range(3):  # warm-up (first use of a size sets up buffers)
                comm.all_reduce(x, world)
            reps = max(3, min(200, int(budget_s * 1e9 / max(size, 1) / 4)))  # ~budget at 4 GB/s
            comm.barrier(world)
            t0 = time.perf_counter()
            for _ in range(reps):
                comm.all_reduce(x, world)
            times.append((time.perf_counter() - t0) / reps)
        ok = True
        return times
    finally:
        shutdown_distributed(ok)


def busy_allreduce_worker(sizes: tuple[int, ...], compute_s: float, reps: int, timeout_s: float,
                          op: str = "all_reduce") -> list[float]:
    """Runs on each rank: alternate ~``compute_s`` of matmuls with a collective (``op``:
    ``all_reduce``, ``reduce_scatter`` or ``all_gather``, each of a ``size``-byte tensor:
    the reduce-scatter's input, the all-gather's output) of a freshly written buffer, as training
    alternates layers and collectives; returns, per payload size, the mean seconds spent in the
    collective (its peers' compute jitter and scheduling included). The mean, not the median: a
    step pays the sum of its collectives, slow calls included (at 1 KiB the median was 0.4-1.4 ms
    and the mean 1.4-1.8 ms here; the median fit under-priced tp2's 2 MiB all-reduces by ~35%)."""
    import torch

    from paratrain import comm
    from paratrain.launch import shutdown_distributed

    world = _join(timeout_s)
    ok = False
    try:
        a = torch.randn(256, 256)
        t0 = time.perf_counter()
        for _ in range(20):
            a @ a
        n_mm = max(1, int(compute_s / ((time.perf_counter() - t0) / 20)))
        out = []
        for size in sizes:
            x = torch.zeros(size // 4)
            part = torch.zeros(size // 4 // world.size)
            run = {"all_reduce": functools.partial(comm.all_reduce, x, world),
                   "reduce_scatter": functools.partial(comm.reduce_scatter, part, x, world),
                   "all_gather": functools.partial(comm.all_gather, x, part, world)}[op]
            comm.barrier(world)
            times = []
            for _ in range(reps):
                for _ in range(n_mm):
                    a @ a
                x.add_(1.0)
                part.add_(1.0)
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            out.append(statistics.fmean(times))
        ok = True
        return out
    finally:
        shutdown_distributed(ok)


def busy_layers_worker(name: str, batch: int, budget_s: float, timeout_s: float,
                       pairs: int = 3) -> tuple[float | None, float]:
    """Runs on each of ``cores`` ranks: forward + backward of ``name`` x ``batch`` (one thread),
    alternately on rank 0 alone (the others wait at a barrier) and on every rank at once,
    ``pairs`` times, about ``budget_s`` each; returns (rank 0's median alone or None, this
    rank's median with every core busy). Alternating in the same processes keeps a VM's drift
    out of the ratio (one block of each, minutes apart, gave 1.08 to 1.42 on the same machine)."""
    import torch

    from paratrain import comm
    from paratrain.launch import shutdown_distributed
    from paratrain.models.configs import get_model_config
    from paratrain.models.gpt import build_reference

    world = _join(timeout_s)
    ok = False
    try:
        cfg = get_model_config(name)
        model = build_reference(cfg, 0)
        x = torch.randint(0, cfg.vocab_size, (batch, 128))

        def timed(out: list[float]) -> None:
            spent = 0.0
            while spent < budget_s:
                t0 = time.perf_counter()
                model(x, x).backward()
                out.append(time.perf_counter() - t0)
                spent += out[-1]

        model(x, x).backward()  # warm-up
        alone: list[float] = []
        busy: list[float] = []
        for _ in range(pairs):
            comm.barrier(world)
            if world.rank == 0:
                timed(alone)
            comm.barrier(world)
            timed(busy)
        ok = True
        return (statistics.median(alone) if alone else None), statistics.median(busy)
    finally:
        shutdown_distributed(ok)


def tp_link_worker(model: str, batches: tuple[int, ...], steps: int, timeout_s: float,
                   sequence_parallel: bool = False) -> list[dict[str, tuple[float, float, float]]]:
    """Runs on each of 2 ranks: per global batch, ``steps`` training steps of ``model`` at tp 2
    (after 2 warm-up steps) through ``paratrain.train``; returns, per batch, {op: (payload
    bytes, seconds) per call, calls per step} of the tp group's collectives as ``comm`` counted them."""
    import torch

    from paratrain.config import Layout, TrainConfig
    from paratrain.launch import RankEnv, init_distributed, shutdown_distributed
    from paratrain.train import setup, train_step

    torch.set_num_threads(1)
    env = RankEnv.from_env()
    init_distributed(env, "cpu", timeout_s)
    ok = False
    try:
        out, corpus = [], None
        for batch in batches:
            cfg = TrainConfig(model=model, global_batch=batch, seq_len=128, steps=2 + steps, eval_every=0,
                              layout=Layout(tp=2, sequence_parallel=sequence_parallel), timeout_s=timeout_s)
            s = setup(cfg, env, torch.device("cpu"), corpus=corpus)
            corpus = s.corpus  # (the default corpus, read once)
            for step in range(1, 3):
                train_step(s, step)
            before = s.mesh.tp.stats.as_dict()
            for step in range(3, 3 + steps):
                train_step(s, step)
            per_op = {}
            for op, after in s.mesh.tp.stats.as_dict().items():
                b = before.get(op, {})
                calls = after["calls"] - b.get("calls", 0)
                nbytes = (after["bytes"] - b.get("bytes", 0)) / max(calls, 1)
                if op in ("all_reduce", "all_gather", "reduce_scatter") and calls and nbytes > 1024:
                    per_op[op] = (nbytes, (after["seconds"] - b.get("seconds", 0)) / calls, calls / steps)
            out.append(per_op)
        ok = True
        return out
    finally:
        shutdown_distributed(ok)


def _measure_tp_link(cfg: dict[str, Any], bw: float, alpha: float, slow: dict[str, float],
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Real tp 2 steps' collectives against the link's model (``bw``, ``alpha``; ``slow``: the
    reduce-scatter's and all-gather's factors on the ring). The all-reduces (plain tp): the
    extra seconds per call, fitted as ``extra = per_call + S * per_byte`` (relative least
    squares, both >= 0). Sequence parallelism's all-gathers and reduce-scatters: their factors on
    the ring as they are inside steps, once that extra is taken off (median over the points)."""
    from paratrain.launch import launch

    model, batches, steps = cfg["tp_points"]

    def slowest(got: dict[int, list[dict[str, tuple[float, float, float]]]], op: str) -> list[tuple[float, float]]:
        # each rank's seconds include its wait for the other: the slower rank's view is the step's
        return [(got[0][i][op][0], max(got[r][i][op][1] for r in got)) for i in range(len(batches))]

    points = slowest(launch(tp_link_worker, (model, batches, steps, 120.0), 2), "all_reduce")
    extra = [max(t - (s / bw + 2 * alpha), 0.0) for s, t in points]
    rows = [[1 / t, s / t] for s, t in points]
    sol = _least_squares(rows, [x / t for (_, t), x in zip(points, extra)]) if len(rows) >= 2 else None
    per_call, per_byte = (max(sol[0], 0.0), max(sol[1], 0.0)) if sol else (0.0, 0.0)
    log(f"      inside tp 2 training steps of {model}: "
        + ", ".join(f"{s / 2**10:.0f} KiB {t * 1e3:.2f} ms (link model {(s / bw + 2 * alpha) * 1e3:.2f})"
                    for s, t in points)
        + f" per all-reduce: {per_call * 1e6:.0f} us + {per_byte * 1e9:.3f} ns per byte more")
    sp = launch(tp_link_worker, (model, batches, steps, 120.0, True), 2)
    out = {"tp_allreduce_points": points, "tp_extra_s_per_call": per_call, "tp_extra_s_per_byte": per_byte}
    # Sequence parallelism: one factor for its reduce-scatters and all-gathers together. Apart
    # they cannot be told: backward's re-gather runs asynchronously behind a matmul, and gloo
    # runs a group's collectives in order, so the next blocking reduce-scatter waits for it too.
    factors = []
    for i in range(len(batches)):
        calls = payload = seconds = 0.0
        for op in ("reduce_scatter", "all_gather"):
            s_op, _, n_op = sp[0][i][op]  # payload per call, calls per step
            seconds += max(sp[r][i][op][1] for r in sp) * n_op
            payload += s_op * n_op
            calls += n_op
        # t = f * (S / 2) / bw + alpha + extra per call, summed over a step's calls of both
        factors.append((seconds - calls * (alpha + per_call) - payload * per_byte) / (payload / 2 / bw))
    f = max(1.0, statistics.median(factors))
    out["tp_reduce_scatter_slowdown"] = out["tp_all_gather_slowdown"] = f
    log("      sequence parallelism's reduce-scatters and all-gathers there: "
        + ", ".join(f"{sp[0][i]['reduce_scatter'][0] / 2**10:.0f} KiB {sp[0][i]['reduce_scatter'][1] * 1e3:.2f} + "
                    f"{sp[0][i]['all_gather'][1] * 1e3:.2f} ms" for i in range(len(batches)))
        + f" = {f:.2f}x the ring with that extra (between matmul loops: {slow['reduce_scatter']:.2f}x and "
          f"{slow['all_gather']:.2f}x)")
    return out


def fit_link(sizes: tuple[int, ...], seconds: list[float], steps: int) -> tuple[float, float]:
    """Fit of t = steps * alpha + S / bw over (S, t), least squares in *relative* error (each
    point weighted 1 / t^2), so the sizes of 1 KiB - 4 MiB that tensor parallelism sends count as
    much as the 16 MiB one (a plain fit is the largest size's: it missed 2 MiB by 30% here).
    Returns (bw, alpha)."""
    rows = [[steps / t, s / t] for s, t in zip(sizes, seconds) if t > 0]
    sol = _least_squares(rows, [1.0] * len(rows)) if len(rows) >= 2 else None
    if sol is None or sol[1] <= 0:  # degenerate: the largest point's bandwidth, no latency
        return sizes[-1] / max(seconds[-1], 1e-12), 0.0
    alpha, inv_bw = sol
    if alpha < 0:  # latency cannot be negative: refit the bandwidth alone
        ratios = [s / t for s, t in zip(sizes, seconds)]
        alpha, inv_bw = 0.0, sum(ratios) / sum(r * r for r in ratios)
    return 1.0 / inv_bw, alpha


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _measure_compute(cfg: dict[str, Any], cores: int, log: Callable[[str], None]) -> dict[str, Any]:
    budget = cfg["budget_s"]
    log(f"[1/5] fp32 matmul, 1 thread and {cores} threads")
    one = {n: measure_matmul(n, 1, "float32", budget) for n in cfg["matmul_1t"]}
    every = {n: measure_matmul(n, cores, "float32", budget) for n in cfg["matmul_all"]}
    for label, table in (("1 thread", one), (f"{cores} threads", every)):
        log("      " + label + ": " + ", ".join(f"n={n} {r / 1e9:.1f} GFLOP/s" for n, r in table.items()))
    log("[2/5] bf16 matmul and linear, 1 thread")
    bf16 = {n: max(measure_matmul(n, 1, "bfloat16", budget), measure_linear(n, 1024, "bfloat16", budget))
            for n in cfg["matmul_bf16"]}
    log("      " + ", ".join(f"n={n} {r / 1e9:.1f} GFLOP/s" for n, r in bf16.items()))
    log(f"[3/5] memory bandwidth (copy of {cfg['copy_mib']} MiB, {cores} threads)")
    copy_bw = measure_copy_bandwidth(cfg["copy_mib"], cores, budget)
    log(f"      {copy_bw / 1e9:.1f} GB/s")
    peak = max(one.values())
    log("[4/5] forward + backward of reference GPTs, fitted: matmul rate, memory-bound work, per-layer cost")
    points = measure_layer_points(cfg["layer_points"], 4 * budget)
    rate, lam, per_layer = fit_layer_work(points)
    for pt in points:
        fit = pt["flops"] / rate + lam * pt["activation_bytes"] + per_layer * pt["layers"]
        pt["fit_error"] = fit / pt["seconds"] - 1
        log(f"      {pt['model']} x {pt['batch']} sequences: {pt['seconds'] * 1e3:.1f} ms measured, "
            f"{fit * 1e3:.1f} ms fitted ({pt['fit_error']:+.1%})")
    log(f"      fit: matmuls at {rate / 1e9:.1f} GFLOP/s ({rate / peak:.0%} of the best), "
        f"{lam * 1e9:.3f} ns per activation byte, {per_layer * 1e3:.2f} ms per layer")
    # bf16 (weights and activations in bf16, as --precision bf16 trains): its own three figures
    # (a CPU without bf16 units converts to fp32 and back; one with them sets each bf16 matmul up
    # at a cost). The points are tiny and small at 2-8 sequences: with tiny-deep (hidden 64) among
    # them and fp32's per-layer term the fit collapsed on an AMX VM (no memory-bound term, tiny x 8
    # +16%, the validation's dp2-bf16-tiny +17.7%); on these four, with its own per-layer term
    # (2.2 ms against fp32's 0.67), it fit within 1.3%
    bf16_rate, bf16_lam, bf16_layer = 0.0, 0.0, 0.0
    if cfg["bf16_points"]:
        pts = measure_layer_points(cfg["bf16_points"], 4 * budget, "bfloat16")
        bf16_rate, bf16_lam, bf16_layer = fit_layer_work(pts)
        for pt in pts:
            fit = pt["flops"] / bf16_rate + bf16_lam * pt["activation_bytes"] + bf16_layer * pt["layers"]
            pt["fit_error"] = fit / pt["seconds"] - 1
        seen = ", ".join(f"{p['model']} x {p['batch']} {p['seconds'] * 1e3:.0f} ms ({p['fit_error']:+.1%})"
                         for p in pts)
        log(f"      bf16 layers: matmuls at {bf16_rate / 1e9:.1f} GFLOP/s, {bf16_lam * 1e9:.3f} ns per activation "
            f"byte, {bf16_layer * 1e3:.2f} ms per layer ({seen})")
        points += pts
    split = measure_split_backward(*cfg["busy_point"], 8 * budget)
    log(f"      {cfg['busy_point'][0]} x {cfg['busy_point'][1]} sequences: forward {split['F'] * 1e3:.1f} ms, backward "
        f"{split['B'] * 1e3:.1f} ms ({split['backward_share']:.0%} of both); split as zero-bubble schedules run it: "
        f"forward {split['F_split'] * 1e3:.1f}, I {split['I'] * 1e3:.1f}, W {split['W'] * 1e3:.1f} ms = "
        f"x{split['split_backward_slowdown']:.3f} on the backward")
    pack = measure_packing((16, 128, 256), 2, budget)
    log(f"      a collective's packing copy of a 2 MiB activation: {pack * 1e9:.3f} ns per byte")
    opt = measure_optimizer("small", 4 * budget)
    log(f"      clip + AdamW over {opt['params']:,} parameters: {opt['seconds'] * 1e3:.1f} ms = "
        f"{opt['bandwidth'] / 1e9:.1f} GB/s at 28 bytes per parameter")
    return {"matmul_fp32_1thread": one, "matmul_fp32_all_threads": every, "matmul_bf16_1thread": bf16,
            "copy_bandwidth": copy_bw, "layer_points": points, "layer_rate": rate,
            "compute_efficiency": min(1.0, rate / peak), "elementwise_s_per_byte": lam, "layer_overhead_s": per_layer,
            "pack_s_per_byte": pack, "bf16_layer_rate": bf16_rate, "elementwise_s_per_byte_bf16": bf16_lam,
            "layer_overhead_s_bf16": bf16_layer,
            "optimizer": opt, "split_backward": split, "backward_share": split["backward_share"],
            "split_backward_slowdown": split["split_backward_slowdown"]}


def _measure_link(cfg: dict[str, Any], cores: int, log: Callable[[str], None]) -> dict[str, Any]:
    from paratrain.launch import launch

    sizes = cfg["allreduce_bytes"]
    log(f"[5/5] gloo all-reduce between local processes, {len(sizes)} sizes (starting processes)")
    idle = launch(allreduce_worker, (sizes, cfg["budget_s"], 60.0), 2)[0]
    log("      idle peers: " + ", ".join(f"{s / 2**10:g} KiB {t * 1e6:.0f} us" for s, t in zip(sizes, idle)))
    busy_ar = launch(busy_allreduce_worker, (sizes, 4e-3, cfg["busy_reps"], 60.0), 2)[0]
    bw, alpha = fit_link(sizes, busy_ar, steps=2)
    log("      peers computing between collectives: "
        + ", ".join(f"{s / 2**10:g} KiB {t * 1e6:.0f} us" for s, t in zip(sizes, busy_ar)))
    log(f"      fit: {bw / 1e9:.2f} GB/s, {alpha * 1e6:.1f} us per ring step")
    # the layers alone (again, now) and with every core running them at once
    model, batch = cfg["busy_point"]
    got = launch(busy_layers_worker, (model, batch, 2 * cfg["budget_s"], 60.0), cores)  # {rank: (alone, busy)}
    solo, busy = got[0][0], [got[r][1] for r in sorted(got)]
    slowdown = max(1.0, statistics.median(busy) / solo)
    log(f"      {model} x {batch} sequences: {solo * 1e3:.1f} ms alone, {statistics.median(busy) * 1e3:.1f} ms "
        f"with all "
        f"{cores} cores busy: x{slowdown:.3f}")
    n = 2 * cores  # twice as many processes as cores: each has half a core, and pays for the switching
    got = launch(busy_layers_worker, (model, batch, 2 * cfg["budget_s"], 60.0), n)
    over_solo, over_busy = got[0][0], statistics.median(got[r][1] for r in sorted(got))
    oversubscribed = max(1.0, over_busy / (over_solo * n / cores * slowdown))
    log(f"      {n} processes on {cores} cores: {over_busy * 1e3:.1f} ms each ({over_solo * 1e3:.1f} ms alone): "
        f"x{oversubscribed:.3f} beyond the time-sharing")
    shared = launch(busy_allreduce_worker, (sizes[:1], 4e-3, cfg["busy_reps"], 60.0), n)[0][0] / (2 * (n - 1))
    log(f"      {n} processes on {cores} cores: {shared * 1e6:.0f} us per ring step")
    # The backend's reduce-scatter and all-gather against the ring model on the fitted link, on
    # the largest sizes (bandwidth-bound): gloo's reduce-scatter is not a ring and takes several
    # times the ring's (n - 1)/n S. NCCL's are rings: 1.
    big = sizes[-2:]
    slow = {}
    for op in ("reduce_scatter", "all_gather"):
        got = launch(busy_allreduce_worker, (big, 4e-3, cfg["busy_reps"], 60.0, op), 2)[0]
        ring = [size / 2 / bw + alpha for size in big]  # 2 ranks: one step of S/2
        slow[op] = max(1.0, statistics.median(g / r for g, r in zip(got, ring)))
        timings = ", ".join(f"{s / 2**10:g} KiB {t * 1e6:.0f} us" for s, t in zip(big, got))
        log(f"      {op.replace('_', '-')}: {timings} = {slow[op]:.2f}x the ring on this link")
    return {"layers_alone_s": solo, "layers_all_cores_s": busy, "busy_compute_slowdown": slowdown,
            "layers_oversubscribed_alone_s": over_solo, "layers_oversubscribed_s": over_busy,
            "oversubscribed_compute_slowdown": oversubscribed,
            "allreduce_bytes": list(sizes), "allreduce_seconds_idle": idle, "allreduce_seconds_busy": busy_ar,
            "link_bandwidth": bw, "link_latency_s": alpha, "shared_latency_s": max(shared, alpha),
            "reduce_scatter_slowdown": slow["reduce_scatter"], "all_gather_slowdown": slow["all_gather"]}


def calibrate(quick: bool = False, collectives: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
              ) -> tuple[Hardware, dict[str, Any]]:
    """Measure this machine; return the profile's Hardware and the raw measurements."""
    import platform

    import torch

    cfg = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    meas: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": cores,
                            "torch": torch.__version__, "quick": quick}
    meas.update(_measure_compute(cfg, cores, log))
    if collectives:
        meas.update(_measure_link(cfg, cores, log))
        meas.update(_measure_tp_link(cfg, meas["link_bandwidth"], meas["link_latency_s"],
                                     {"reduce_scatter": meas["reduce_scatter_slowdown"],
                                      "all_gather": meas["all_gather_slowdown"]}, log))
    else:
        log("[5/5] collectives skipped: link figures are placeholders (1 GB/s, no latency)")
        meas.update(link_bandwidth=1e9, link_latency_s=0.0, shared_latency_s=0.0, reduce_scatter_slowdown=1.0,
                    all_gather_slowdown=1.0, busy_compute_slowdown=1.0, oversubscribed_compute_slowdown=1.0,
                    tp_extra_s_per_byte=0.0,
                    tp_extra_s_per_call=0.0, tp_reduce_scatter_slowdown=0.0, tp_all_gather_slowdown=0.0)
    meas["collectives_measured"] = collectives
    bf16 = max(meas["matmul_bf16_1thread"].values())
    if meas.get("bf16_layer_rate"):  # the planner's bf16 rate is peak x efficiency: make it the layers' fitted one
        bf16 = meas["bf16_layer_rate"] / meas["compute_efficiency"]
    bw, alpha = meas["link_bandwidth"], meas["link_latency_s"]
    hw = Hardware(
        name=f"profile:{platform.node()}", peak_bf16_flops=bf16, peak_fp16_flops=bf16,
        peak_fp32_flops=max(meas["matmul_fp32_1thread"].values()), memory_bytes=_ram_bytes() / cores,
        memory_bw=meas["optimizer"]["bandwidth"], intra_node_bw=bw, inter_node_bw=bw, devices_per_node=cores,
        compute_efficiency=meas["compute_efficiency"], intra_node_latency_s=alpha, inter_node_latency_s=alpha,
        cores_per_node=cores,
        shared_latency_s=meas["shared_latency_s"], reduce_scatter_slowdown=meas["reduce_scatter_slowdown"],
        all_gather_slowdown=meas["all_gather_slowdown"], busy_compute_slowdown=meas["busy_compute_slowdown"],
        oversubscribed_compute_slowdown=meas["oversubscribed_compute_slowdown"],
        backward_share=meas["backward_share"], split_backward_slowdown=meas["split_backward_slowdown"],
        elementwise_s_per_byte=meas["elementwise_s_per_byte"], layer_overhead_s=meas["layer_overhead_s"],
        pack_s_per_byte=meas["pack_s_per_byte"], elementwise_s_per_byte_bf16=meas["elementwise_s_per_byte_bf16"],
        layer_overhead_s_bf16=meas.get("layer_overhead_s_bf16", 0.0),
        tp_extra_s_per_byte=meas["tp_extra_s_per_byte"], tp_extra_s_per_call=meas["tp_extra_s_per_call"],
        tp_reduce_scatter_slowdown=meas["tp_reduce_scatter_slowdown"],
        tp_all_gather_slowdown=meas["tp_all_gather_slowdown"],
        source=f"paratrain calibrate on {platform.node()}: one process with one thread per core; "
               f"inter-node link not measured (set to the gloo loopback figure)",
    )
    return hw, meas
