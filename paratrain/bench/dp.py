"""Group ``dp``: our bucketed, overlapped data parallelism vs ``torch.nn.parallel.DistributedDataParallel``.

Both sides train the same reference model (same seed) on the same pre-built batches with AdamW
and gradient clipping, in the same processes, with the same threads per rank; each side's
defaults are used (25 MiB buckets on both). Also reported: the bytes our all-reduces
moved per step against the model's gradient bytes (they should be equal: each gradient is
reduced exactly once).
"""

from __future__ import annotations

from typing import Any

from paratrain.bench import BenchOptions, Row, alternate, median, rank_worker


def run(opts: BenchOptions) -> list[Row]:
    from paratrain.launch import launch

    rows = []
    for n in opts.nprocs:
        result = launch(rank_worker, (_measure, opts), n)[0]
        tokens = opts.steps * opts.global_batch * opts.seq_len
        ours, ref = tokens / median(result["ours"]), tokens / median(result["ddp"])
        rows.append(Row(f"dp{n}", ours, ref, {
            "nproc": n, "model": opts.model, "threads_per_rank": result["threads"],
            "allreduce_bytes_per_step": result["bytes_per_step"], "grad_bytes": result["grad_bytes"],
            "buckets": result["buckets"],
        }))
    return rows


def _measure(opts: BenchOptions, rank: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import dp_rows, get_batch, load_corpus
    from paratrain.mesh import Mesh, MeshShape
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    cfg = TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                      layout=Layout(dp=world), seed=opts.seed)
    model_cfg = cfg.validate()
    mesh = Mesh.build(MeshShape(dp=world), rank)
    corpus = load_corpus()
    rows = dp_rows(cfg.global_batch, world, mesh.coords.dp)
    batches = []
    for step in range(1, opts.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step, rows)
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))

    pm = parallelize(build_reference(model_cfg, cfg.seed), mesh, cfg.layout, bucket_mb=opts.bucket_mb)
    ours_opt = make_optimizer(pm.named_parameters(), cfg)
    ddp = DistributedDataParallel(build_reference(model_cfg, cfg.seed))
    ddp_opt = make_optimizer(ddp.module.named_parameters(), cfg)

    def ours() -> None:
        for x, y in batches:
            pm.forward_backward(x, y)
            pm.clip_grad_norm_(cfg.grad_clip)
            ours_opt.step()
            pm.zero_grad()

    def ddp_steps() -> None:
        for x, y in batches:
            ddp(x, y).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            ddp_opt.step()
            ddp_opt.zero_grad(set_to_none=True)

    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        ours()
        ddp_steps()
    mesh.dp.stats.reset()
    times = alternate({"ours": ours, "ddp": ddp_steps}, opts.repeats, dist.barrier)
    reduced = mesh.dp.stats.ops["all_reduce"].bytes / (opts.repeats * opts.steps)
    grad_bytes = sum(p.numel() * p.element_size() for p in pm.parameters())
    return {"ours": times["ours"], "ddp": times["ddp"], "bytes_per_step": reduced,
            "grad_bytes": grad_bytes, "buckets": len(pm.grad_sync.buckets)}
