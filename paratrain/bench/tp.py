"""Group ``tp``: our tensor parallelism vs PyTorch's ``torch.distributed.tensor.parallel`` (DTensor).

Throughput rows (``tp2``, ``tp4``, and ``tp2-sp``/``tp4-sp`` with our sequence parallelism):
both sides train the same reference model (same seed) on the same pre-built batches with AdamW
and gradient clipping at 1.0, in the same processes, with the same threads per rank, A/B
alternating. PyTorch's side is ``parallelize_module`` with ColwiseParallel on ``qkv``/``fc1``
and the LM head (vocab-sharded logits, ``loss_parallel`` cross-entropy), RowwiseParallel on
``proj``/``fc2`` and the token embedding; the fused ``qkv``'s rows are permuted first so that a
contiguous shard holds each rank's own q, k and v heads; the LM head is re-tied to the
embedding. Its LayerNorms, biases of row-wise layers and positions stay plain tensors, so its
gradient norm is the DTensor part's and the plain part's combined. Both sides' first-step
losses are reported: they must agree (the same model).

Memory rows (``memory-tp1/2/4``): a model whose weights dominate (``medium``, 25M parameters,
batch 2 x 128), each side in its own processes (tp = 1: one plain process, the same for both).
Reported per rank (the largest over ranks): the exact bytes of parameters + gradients + AdamW
state held by the rank, the growth of its resident set from before the model was built to after
two steps (``malloc_trim``-ed, so freed memory is not counted), and its peak resident set
(``ru_maxrss``), which also holds the torch runtime and, briefly, the full reference model every
rank builds before slicing.
"""

from __future__ import annotations

import ctypes
import gc
import resource
from typing import Any

from paratrain.bench import BenchOptions, Row, alternate, median, rank_worker

MEMORY_MODEL = "medium"
MEMORY_BATCH, MEMORY_SEQ, MEMORY_STEPS = 2, 128, 3  # the first step is not timed
CLIP = 1.0


def run(opts: BenchOptions) -> list[Row]:
    from paratrain.launch import launch

    rows = []
    for n in opts.nprocs:
        result = launch(rank_worker, (_measure_throughput, opts), n)[0]
        tokens = opts.steps * opts.global_batch * opts.seq_len
        ref = tokens / median(result["dtensor"])
        for side in ("ours", "ours_sp"):
            name = f"tp{n}" + ("-sp" if side == "ours_sp" else "")
            rows.append(Row(name, tokens / median(result[side]), ref, {
                "nproc": n, "model": opts.model, "threads_per_rank": result["threads"],
                "first_loss_ours": result["loss"][side], "first_loss_ref": result["loss"]["dtensor"],
                "tp_bytes_per_step": result["bytes"][side], "tp_bytes_formula": result["formula"][side],
                "tp_wire_bytes_per_step": result["wire"][side],
                "note": (f"{'ours with sequence parallelism; ' if side == 'ours_sp' else ''}"
                         f"tp sends {result['wire'][side] / 2**20:.1f} MiB/step/rank (payload = formula: "
                         f"{result['bytes'][side] == result['formula'][side]}), first loss "
                         f"{result['loss'][side]:.5f} vs {result['loss']['dtensor']:.5f}, "
                         f"{result['threads']} thr/rank"),
            }))
    rows += memory_rows(opts)
    return rows


def _setup(opts: BenchOptions, model: str, batch: int, seq: int, tp: int, sp: bool, steps: int) -> Any:
    import torch

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import get_batch, load_corpus

    cfg = TrainConfig(model=model, global_batch=batch, seq_len=seq, seed=opts.seed, grad_clip=CLIP,
                      layout=Layout(tp=tp, sequence_parallel=sp))
    model_cfg = cfg.validate()
    corpus = load_corpus()
    batches = []
    for step in range(1, steps + 1):
        x, y = get_batch(corpus.train, seq, batch, cfg.seed, step)
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))
    return cfg, model_cfg, batches


def _ours(cfg: Any, model_cfg: Any, mesh: Any) -> tuple[Any, Any]:
    """Our parallel model and optimizer; returns (one_step(x, y) -> loss, the ParallelModel)."""
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    pm = parallelize(build_reference(model_cfg, cfg.seed), mesh, cfg.layout)
    opt = make_optimizer(pm.named_parameters(), cfg)

    def step(x: Any, y: Any) -> float:
        loss = pm.forward_backward(x, y)
        pm.clip_grad_norm_(CLIP)
        opt.step()
        pm.zero_grad()
        return float(loss)

    return step, pm


def _dtensor(cfg: Any, model_cfg: Any, n: int, keep_grads: bool = False) -> tuple[Any, Any]:
    """PyTorch's tensor parallelism on the same reference model; returns (one_step, model)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel.shard import shard

    model = build_reference(model_cfg, cfg.seed)
    with torch.no_grad():  # contiguous row shard r of qkv = [q_r; k_r; v_r]
        for b in model.blocks:
            for t in (b.attn.qkv.weight, b.attn.qkv.bias):
                t.copy_(torch.cat([shard(t, r, n, 0, 3) for r in range(n)]))
    plan: dict[str, Any] = {"wte": RowwiseParallel(input_layouts=Replicate()),
                            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(model_cfg.num_layers):
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.fc1": ColwiseParallel(), f"blocks.{i}.mlp.fc2": RowwiseParallel()})
    tied = model_cfg.tie_embeddings
    parallelize_module(model, init_device_mesh("cpu", (n,)), plan)
    if tied:
        model.lm_head.weight = model.wte.weight
    opt = make_optimizer(model.named_parameters(), cfg)
    params = list(model.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]

    def step(x: Any, y: Any) -> float:
        with loss_parallel():
            loss = model(x, y)
            loss.backward()
        norm_sh = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
        norm = torch.sqrt(norm_sh**2 + torch.nn.utils.get_total_norm([p.grad for p in plain]) ** 2)
        coef = min(1.0, CLIP / (float(norm) + 1e-6))
        for group in (sharded, plain):  # foreach ops cannot mix DTensors and tensors
            torch._foreach_mul_([p.grad for p in group], coef)
        opt.step()
        opt.zero_grad(set_to_none=not keep_grads)
        return float(loss.detach().full_tensor())

    return step, model


def _measure_throughput(opts: BenchOptions, rank: int, n: int) -> dict[str, Any]:
    import torch.distributed as dist

    from paratrain.core.traffic import tp_comm_per_step
    from paratrain.mesh import Mesh, MeshShape

    sides, meshes, formula = {}, {}, {}
    for side, sp in (("ours", False), ("ours_sp", True)):
        cfg, model_cfg, batches = _setup(opts, opts.model, opts.global_batch, opts.seq_len, n, sp, opts.steps)
        meshes[side] = Mesh.build(MeshShape(tp=n), rank)
        sides[side] = _ours(cfg, model_cfg, meshes[side])[0]
        traffic = tp_comm_per_step(model_cfg, n, sp, opts.global_batch, opts.seq_len)
        formula[side] = sum(b for _, b in traffic.values())
    sides["dtensor"] = _dtensor(cfg, model_cfg, n)[0]  # cfg: seed and optimizer settings only
    first = {name: step(*batches[0]) for name, step in sides.items()}

    def steps(step: Any) -> Any:
        return lambda: [step(x, y) for x, y in batches]

    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        for step in sides.values():
            steps(step)()
    for m in meshes.values():
        m.tp.stats.reset()
    times = alternate({k: steps(v) for k, v in sides.items()}, opts.repeats, dist.barrier)
    count = opts.repeats * opts.steps
    measured = {k: m.tp.stats.bytes // count for k, m in meshes.items()}
    wire = {k: m.tp.stats.wire_bytes / count for k, m in meshes.items()}
    return {**times, "loss": first, "bytes": measured, "wire": wire, "formula": formula}


# ---- memory -----------------------------------------------------------------------------

def resident_mib() -> float:
    """The resident set now, after returning freed heap memory to the OS (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def _state_bytes(params: list[Any]) -> int:
    """Parameters + gradients + AdamW's two moments, of this rank's local tensors (fp32)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    return 4 * sum(t.numel() * t.element_size() for t in local)


def _memory_worker(opts: BenchOptions, side: str) -> dict[str, Any]:
    import time

    from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed

    env = RankEnv.from_env()
    set_threads(opts.threads, env.local_world_size)
    init_distributed(env, "cpu", timeout_s=600)
    ok = False
    try:
        n = env.world_size
        cfg, model_cfg, batches = _setup(opts, MEMORY_MODEL, MEMORY_BATCH, MEMORY_SEQ, n, False, MEMORY_STEPS)
        before = resident_mib()
        if side == "ours":
            from paratrain.mesh import Mesh, MeshShape

            step, pm = _ours(cfg, model_cfg, Mesh.build(MeshShape(tp=n), env.rank))
            params = pm.parameters()
        else:
            step, model = _dtensor(cfg, model_cfg, n, keep_grads=True)
            params = list(model.parameters())
        step(*batches[0])  # warm-up (DTensor caches its sharding decisions on first use)
        t0 = time.perf_counter()
        for x, y in batches[1:]:
            step(x, y)
        seconds = time.perf_counter() - t0
        result = {"state_mib": _state_bytes(params) / 2**20, "resident_growth_mib": resident_mib() - before,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens_per_s": (MEMORY_STEPS - 1) * MEMORY_BATCH * MEMORY_SEQ / seconds}
        ok = True
        return result
    finally:
        shutdown_distributed(ok)


def _fresh_process(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` alone in a new process (a one-rank job must not share our memory)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def memory_rows(opts: BenchOptions) -> list[Row]:
    from paratrain.launch import launch

    rows = []
    for n in (1, *opts.nprocs):
        if n == 1:  # no tensor parallelism: the plain reference model, the same for both sides
            plain = [_fresh_process(_memory_worker, opts, "ours")]
            per_side = {"ours": plain, "dtensor": plain}
        else:
            per_side = {side: list(launch(_memory_worker, (opts, side), n).values())
                        for side in ("ours", "dtensor")}
        worst = {side: {k: max(r[k] for r in res) for k in res[0]} for side, res in per_side.items()}
        o, d = worst["ours"], worst["dtensor"]
        rows.append(Row(f"memory-tp{n}", o["tokens_per_s"], d["tokens_per_s"], {
            "nproc": n, "model": MEMORY_MODEL, **{f"ours_{k}": v for k, v in o.items()},
            **{f"ref_{k}": v for k, v in d.items()},
            "note": (f"per rank: state {o['state_mib']:.0f} vs {d['state_mib']:.0f} MiB, resident +"
                     f"{o['resident_growth_mib']:.0f} vs +{d['resident_growth_mib']:.0f} MiB, peak RSS "
                     f"{o['peak_rss_mib']:.0f} vs {d['peak_rss_mib']:.0f} MiB"),
        }))
    return rows
