"""Group ``ep``: our expert parallelism (experts sharded over ``n`` ranks, tokens exchanged by
all-to-all) vs the same mixture of experts data-parallel only (every rank holds every expert).

Both sides train the same reference model (same seed; ``--model`` if it has experts, else
``small-moe``) on the same pre-built batches (each of the ``n`` dp ranks its rows of the global
batch) with AdamW and gradient clipping, timed in the same processes, alternating. Also
reported, on rank 0 of each side: the parameter bytes it holds, the saved activations of one
step (``parallel/memory.py``), and the bytes its collectives moved per step (the all-to-alls of
the ep group, the gradient all-reduces of the dp and edp groups).
"""

from __future__ import annotations

from typing import Any

from paratrain.bench import BenchOptions, Row, alternate, median, rank_worker

DEFAULT_MOE = "small-moe"


def bench_model(opts: BenchOptions) -> str:
    """The model the group measures: ``--model`` if it is a mixture of experts, else small-moe."""
    from paratrain.models.configs import get_model_config

    return opts.model if get_model_config(opts.model).num_experts else DEFAULT_MOE


def run(opts: BenchOptions) -> list[Row]:
    from paratrain.launch import launch

    rows = []
    for n in opts.nprocs:
        r = launch(rank_worker, (_measure, opts), n)[0]
        tokens = opts.steps * opts.global_batch * opts.seq_len
        rows.append(Row(f"ep{n}", tokens / median(r["ours"]), tokens / median(r["dp"]), {
            "nproc": n, "model": bench_model(opts), "threads_per_rank": r["threads"],
            **{f"{k}_{side}": r[f"{k}_{side}"] for k in ("params", "activations", "bytes", "a2a_bytes")
               for side in ("ours", "dp")}}))
    return rows


def _side(cfg: Any, model_cfg: Any, rank: int, layout: Any, opts: BenchOptions) -> tuple[Any, Any, Any]:
    from paratrain.mesh import Mesh, MeshShape
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    mesh = Mesh.build(MeshShape(dp=layout.dp, ep=layout.ep), rank)
    pm = parallelize(build_reference(model_cfg, cfg.seed), mesh, layout, bucket_mb=opts.bucket_mb)
    return mesh, pm, make_optimizer(pm.named_parameters(), cfg)


def _measure(opts: BenchOptions, rank: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import dp_rows, get_batch, load_corpus
    from paratrain.parallel.memory import ActivationMeter

    layouts = {"ours": Layout(dp=world, ep=world), "dp": Layout(dp=world)}
    cfg = TrainConfig(model=bench_model(opts), global_batch=opts.global_batch, seq_len=opts.seq_len,
                      layout=layouts["ours"], seed=opts.seed)
    model_cfg = cfg.validate()
    corpus = load_corpus()
    rows = dp_rows(cfg.global_batch, world, rank)
    batches = [tuple(torch.from_numpy(a) for a in get_batch(corpus.train, cfg.seq_len, cfg.global_batch,
                                                            cfg.seed, step, rows)) for step in range(1, opts.steps + 1)]
    sides = {name: _side(cfg, model_cfg, rank, lay, opts) for name, lay in layouts.items()}

    def trainer(name: str) -> Any:
        _, pm, opt = sides[name]

        def steps() -> None:
            for x, y in batches:
                pm.forward_backward(x, y)
                pm.clip_grad_norm_(cfg.grad_clip)
                opt.step()
                pm.zero_grad()
        return steps

    fns = {name: trainer(name) for name in sides}
    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        for fn in fns.values():
            fn()
    for mesh, _, _ in sides.values():
        for g in mesh.groups:
            g.stats.reset()
    times = alternate(fns, opts.repeats, dist.barrier)
    out: dict[str, Any] = dict(times)
    for name, (mesh, pm, _) in sides.items():
        per_step = opts.repeats * opts.steps
        groups = {g.name: g for g in mesh.groups if g.size > 1 and g.name != "world"}
        out[f"bytes_{name}"] = sum(g.stats.bytes for g in groups.values()) / per_step
        out[f"a2a_bytes_{name}"] = groups["ep"].stats.bytes / per_step if "ep" in groups else 0
        out[f"params_{name}"] = sum(p.numel() * p.element_size() for p in pm.parameters())
        with ActivationMeter(pm.weight_tensors()) as meter:
            pm.forward_backward(*batches[0])
        pm.zero_grad()
        out[f"activations_{name}"] = meter.peak_bytes
    return out
