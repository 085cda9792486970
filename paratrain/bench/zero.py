"""Group ``zero``: our ZeRO-3 vs PyTorch FSDP2, our ZeRO-1/2 vs DDP + ZeroRedundancyOptimizer.

FSDP2 is ``torch.distributed.fsdp.fully_shard``; ``torch.distributed.optim.ZeroRedundancyOptimizer``
is PyTorch's ZeRO-1 (optimizer state sharded; gradients still all-reduced by DDP).

Both sides train the same reference model (same seed) on the same pre-built batches with AdamW
(weight decay on matrices and embeddings only) and gradient clipping at 1.0, in the same
processes, with the same threads per rank, A/B alternating. FSDP2 shards the same units as ours
(each transformer block, then the root holding the embeddings, final LayerNorm and tied head)
with its defaults: parameters resharded after forward (except the root's), the next unit's
all-gather prefetched, gradients reduce-scattered in fp32. ``ZeroRedundancyOptimizer`` shards
AdamW's state over the ranks by whole parameters behind DDP's all-reduce and broadcasts each
rank's updated parameters. Also reported: the first losses of both sides (the same model, so
they must agree) and our dp bytes per step against :func:`paratrain.core.traffic.zero_comm_per_step`.
"""

from __future__ import annotations

from typing import Any

from paratrain.bench import BenchOptions, Row, alternate, median, rank_worker

CLIP = 1.0
REFS = {3: "FSDP2", 2: "DDP+ZeRO-opt", 1: "DDP+ZeRO-opt"}


def run(opts: BenchOptions) -> list[Row]:
    from paratrain.launch import launch

    rows = []
    for n in opts.nprocs:
        result = launch(rank_worker, (_measure, opts), n)[0]
        tokens = opts.steps * opts.global_batch * opts.seq_len
        for case in result["cases"]:
            z = case["zero"]
            ours, ref = tokens / median(case["ours"]), tokens / median(case["ref"])
            rows.append(Row(f"zero{z}-dp{n}", ours, ref, {
                "nproc": n, "zero": z, "reference": REFS[z], "model": opts.model,
                "threads_per_rank": result["threads"], "first_loss_ours": case["loss_ours"],
                "first_loss_ref": case["loss_ref"], "dp_bytes_per_step": case["bytes"],
                "dp_bytes_formula": case["formula"],
                "note": (f"vs {REFS[z]}; first loss {case['loss_ours']:.5f} vs {case['loss_ref']:.5f}; dp "
                         f"{case['bytes'] / 2**20:.1f} MiB/step (= formula: {case['bytes'] == case['formula']}), "
                         f"{result['threads']} thr/rank"),
            }))
    return rows


def _measure(opts: BenchOptions, rank: int, world: int) -> dict[str, Any]:
    import torch

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import dp_rows, get_batch, load_corpus

    cfg = TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                      layout=Layout(dp=world), seed=opts.seed, grad_clip=CLIP)
    cfg.validate()
    corpus = load_corpus()
    rows = dp_rows(cfg.global_batch, world, rank)
    batches = []
    for step in range(1, opts.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step, rows)
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))
    return {"cases": [_case(opts, cfg, rank, world, zero, batches) for zero in (3, 2, 1)]}


def _case(opts: BenchOptions, cfg: Any, rank: int, world: int, zero: int, batches: list[Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from paratrain.config import Layout
    from paratrain.core.traffic import zero_comm_per_step
    from paratrain.mesh import Mesh, MeshShape

    cfg = cfg.replace(layout=Layout(dp=world, zero=zero))
    mesh = Mesh.build(MeshShape(dp=world), rank, timeout_s=600)
    ours, pm = _ours(cfg, mesh, opts.bucket_mb)
    ref = _fsdp2(cfg) if zero == 3 else _ddp_zero_optimizer(cfg)
    losses = {"ours": ours(batches[:1]), "ref": ref(batches[:1])}  # warm-up, and the same first loss
    for _ in range(max(0, opts.warmup - 1)):
        ours(batches[:1])
        ref(batches[:1])
    mesh.dp.stats.reset()
    times = alternate({"ours": lambda: ours(batches), "ref": lambda: ref(batches)}, opts.repeats, dist.barrier)
    steps = opts.repeats * opts.steps
    ops = mesh.dp.stats.ops
    measured = sum(ops[op].bytes for op in ("reduce_scatter", "all_gather", "grad_norm")) // steps
    sync = pm.grad_sync
    formula = sum(b for _, b in zero_comm_per_step(zero, [b.padded * 4 for b in sync.buckets]).values())
    return {"zero": zero, "ours": times["ours"], "ref": times["ref"], "loss_ours": losses["ours"],
            "loss_ref": losses["ref"], "bytes": measured, "formula": formula}


def _ours(cfg: Any, mesh: Any, bucket_mb: float) -> tuple[Any, Any]:
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    pm = parallelize(build_reference(cfg.model_config(), cfg.seed), mesh, cfg.layout, bucket_mb=bucket_mb)
    opt = pm.shard_optimizer(make_optimizer(pm.named_parameters(), cfg))

    def steps(batches: list[Any]) -> float:
        for x, y in batches:
            loss = pm.forward_backward(x, y)
            pm.clip_grad_norm_(cfg.grad_clip)
            opt.step()
            pm.zero_grad()
        return float(pm.global_mean(loss))

    return steps, pm


def _fsdp2(cfg: Any) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer

    model = build_reference(cfg.model_config(), cfg.seed)
    mesh = init_device_mesh("cpu", (cfg.layout.dp,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.named_parameters(), cfg)
    return _plain_steps(model, opt, cfg)


def _ddp_zero_optimizer(cfg: Any) -> Any:
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.models.gpt import build_reference
    from paratrain.optim import param_groups

    model = DistributedDataParallel(build_reference(cfg.model_config(), cfg.seed))
    groups = param_groups(model.module.named_parameters(), cfg.weight_decay)
    opt = ZeroRedundancyOptimizer(groups[0]["params"], torch.optim.AdamW, lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay)
    opt.add_param_group(groups[1])
    return _plain_steps(model, opt, cfg)


def _plain_steps(model: Any, opt: Any, cfg: Any) -> Any:
    import torch
    import torch.distributed as dist

    def steps(batches: list[Any]) -> float:
        for x, y in batches:
            loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        return float(mean)

    return steps


def memory_worker(cfg: Any) -> tuple[int, int, int]:
    """One rank of ``benchmarks/zero_memory.py``: train ``cfg.steps`` steps, then the exact bytes
    of (parameters, gradients, optimizer state) this rank holds."""
    import torch

    from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed
    from paratrain.parallel.memory import model_state_bytes
    from paratrain.train import setup, train_step

    env = RankEnv.from_env()
    set_threads(1, env.local_world_size)
    init_distributed(env, "cpu", cfg.timeout_s)
    ok = False
    try:
        s = setup(cfg, env, torch.device("cpu"))
        for step in range(1, cfg.steps + 1):
            train_step(s, step)
        m = model_state_bytes(s.pm.module, s.opt)
        ok = True
        return m.params, m.grads, m.optimizer
    finally:
        shutdown_distributed(ok)
