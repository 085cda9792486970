"""Group ``cp``: our context parallelism (ring attention over ``n`` ranks) vs one process training
the same global batch of the same sequences.

Both sides train the same reference model (same seed) on the same pre-built batches with AdamW
and gradient clipping. The one-process side runs on rank 0 while the other ranks wait at the
barrier, so both are timed in the same processes, alternating. Also reported: the saved
activations of one step (the activation meter, ``parallel/memory.py``) on rank 0 of each side,
and the bytes the cp ring moved per step against ``core/traffic.cp_comm_per_step``.

PyTorch's experimental context parallelism (``torch.distributed.tensor.experimental``) is not
compared: it rewrites the fused CUDA attention kernels (flash, memory-efficient, cuDNN), and the
CPU's attention kernel is none of them.
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
        rows.append(Row(f"cp{n}", tokens / median(result["ours"]), tokens / median(result["single"]), {
            "nproc": n, "model": opts.model, "threads_per_rank": result["threads"],
            "activations_per_rank": result["activations"], "single_activations": result["single_activations"],
            "cp_bytes_per_step": result["cp_bytes"], "cp_bytes_formula": result["cp_formula"],
        }))
    return rows


def _measure(opts: BenchOptions, rank: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from paratrain.config import Layout, TrainConfig
    from paratrain.core.traffic import cp_comm_per_step
    from paratrain.data import get_batch, load_corpus
    from paratrain.mesh import Mesh, MeshShape
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize
    from paratrain.parallel.memory import ActivationMeter

    cfg = TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                      layout=Layout(cp=world), seed=opts.seed)
    model_cfg = cfg.validate()
    mesh = Mesh.build(MeshShape(cp=world), rank)
    corpus = load_corpus()
    batches = [tuple(torch.from_numpy(a) for a in get_batch(corpus.train, cfg.seq_len, cfg.global_batch,
                                                            cfg.seed, step)) for step in range(1, opts.steps + 1)]
    pm = parallelize(build_reference(model_cfg, cfg.seed), mesh, cfg.layout, bucket_mb=opts.bucket_mb)
    ours_opt = make_optimizer(pm.named_parameters(), cfg)
    single = build_reference(model_cfg, cfg.seed) if rank == 0 else None
    single_opt = make_optimizer(single.named_parameters(), cfg) if single is not None else None

    def ours() -> None:
        for x, y in batches:
            pm.forward_backward(x, y)
            pm.clip_grad_norm_(cfg.grad_clip)
            ours_opt.step()
            pm.zero_grad()

    def one_process() -> None:
        if single is None:
            return
        for x, y in batches:
            single(x, y).backward()
            torch.nn.utils.clip_grad_norm_(single.parameters(), cfg.grad_clip)
            single_opt.step()
            single_opt.zero_grad(set_to_none=True)

    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        ours()
        one_process()
    mesh.cp.stats.reset()
    times = alternate({"ours": ours, "single": one_process}, opts.repeats, dist.barrier)
    sent = sum(s.bytes for op, s in mesh.cp.stats.ops.items() if op.endswith("_send"))
    formula = sum(b for op, (_, b) in cp_comm_per_step(model_cfg, world, 1, cfg.global_batch, cfg.seq_len).items()
                  if op.endswith("_send"))
    with ActivationMeter(pm.weight_tensors()) as meter:
        pm.forward_backward(*batches[0])
    pm.zero_grad()
    single_act = 0
    if single is not None:
        with ActivationMeter(single.parameters()) as single_meter:
            single(*batches[0]).backward()
        single.zero_grad(set_to_none=True)
        single_act = single_meter.peak_bytes
    return {"ours": times["ours"], "single": times["single"], "activations": meter.peak_bytes,
            "single_activations": single_act, "cp_bytes": sent / (opts.repeats * opts.steps), "cp_formula": formula}
