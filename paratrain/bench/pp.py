"""Group ``pp``: our pipeline runtime vs ``torch.distributed.pipelining`` (ScheduleGPipe, Schedule1F1B).

Pipeline degrees p = the ``--nproc`` counts of at least 2 (default 2 and 4: one launch of p ranks
each; at p = 4 on a 2-core machine the four ranks share the cores, one thread each, which the
rows' notes say), the same model split (our cost-balanced partition, applied to two copies of
the reference model), micro-batches 4 and 8, the same pre-built batches and threads per rank, in
the same processes with alternating A/B repeats. Each side runs its schedule's forward and
backward over the global batch, sums the tied embedding gradient between the two stages (by
hand on the PyTorch side, which does not tie across stages) and takes an AdamW step; neither
clips. Also reported: our measured bubble (idle share of the schedule, mean over both ranks,
median over a few extra steps) against the theory (p-1)/(m+p-1).

Zero-bubble rows: ``pp2-zb-h1-m4`` ours ``zb-h1`` against PyTorch's
``ScheduleInterleavedZeroBubble`` (one stage per rank), ``pp2-zb-v-m4`` ours ``zb-v`` against
``ScheduleZBVZeroBubble``, on the same split (``bench/pp_zb.py``); ``...-vs-1f1b``: the same run
of ours against ours 1F1B at the same m (the "ref" column is our 1F1B), the speed-up the schedule
buys here. All three alternate in the same processes. Their bubble is reported measured, in
theory (F = I = W) and simulated with the step's measured mean F, I and W per rank
(``core.timeline.simulate``).

Rows are named ``pp{p}-{schedule}-m{m}`` (``pp4-zb-h1-m8``, ``pp4-zb-h1-m8-vs-1f1b``, ...).
``zb-v`` needs 2p pipeline chunks of at least one layer each: a model with fewer than 2p layers
(``small``, 6 layers, at p = 4) has no ``pp{p}-zb-v`` rows, and that degree's ``zb-h1`` rows say
so in their note (``--model medium`` or ``tiny-deep``, 8 layers, has them).
"""

from __future__ import annotations

import os
from typing import Any

from paratrain.bench import BenchOptions, Row, alternate, median, rank_worker

CASES = (("gpipe", 4), ("1f1b", 4), ("gpipe", 8), ("1f1b", 8))
ZB_CASES = (("zb-h1", 4), ("zb-v", 4), ("zb-h1", 8), ("zb-v", 8))  # against ours 1F1B


def degrees(opts: BenchOptions) -> tuple[int, ...]:
    """The pipeline degrees this group measures: ``opts.nprocs`` of at least 2 (a pipeline of one
    stage is no pipeline; none: no rows)."""
    return tuple(n for n in opts.nprocs if n >= 2)


def zb_cases(opts: BenchOptions, pp: int) -> tuple[tuple[str, int], ...]:
    """``ZB_CASES`` that ``opts.model`` can split over ``pp`` ranks: zb-v needs ``2 pp`` chunks of
    at least one layer each."""
    from paratrain.config import TrainConfig

    layers = TrainConfig(model=opts.model).model_config().num_layers
    return tuple((s, m) for s, m in ZB_CASES if s != "zb-v" or layers >= 2 * pp)


def skip_note(opts: BenchOptions, pp: int) -> str:
    """What the zero-bubble rows' notes add when ``zb_cases`` leaves zb-v out ("" otherwise)."""
    if len(zb_cases(opts, pp)) == len(ZB_CASES):
        return ""
    return f"; zb-v not measured at pp {pp}: {opts.model} has fewer than {2 * pp} layers for its {2 * pp} chunks"


def check(opts: BenchOptions, asked: bool = False) -> None:
    """Every layout this group will run, validated (ConfigError) before anything starts; ``asked``
    (``--only pp``): no degree of at least 2 is an error too."""
    from paratrain.config import Layout, TrainConfig
    from paratrain.errors import ConfigError

    if asked and not degrees(opts):
        raise ConfigError(f"bench --only pp needs a --nproc of at least 2 (pipeline ranks), got "
                          f"{','.join(map(str, opts.nprocs))}.")
    for pp in degrees(opts):
        for schedule, m in CASES + zb_cases(opts, pp):
            TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                        layout=Layout(pp=pp, microbatches=m, schedule=schedule)).validate()


def run(opts: BenchOptions) -> list[Row]:
    check(opts)
    return [row for pp in degrees(opts) for row in _run(opts, pp)]


def _run(opts: BenchOptions, pp: int) -> list[Row]:
    from paratrain.launch import launch

    result = launch(rank_worker, (_measure_all, opts), pp)[0]
    tokens = opts.steps * opts.global_batch * opts.seq_len
    cores = os.cpu_count() or 1
    shared = f", {pp} ranks sharing {cores} cores" if pp > cores else ""
    skip = skip_note(opts, pp)
    rows = []
    for case in result["cases"]:
        ours, ref = tokens / median(case["ours"]), tokens / median(case["torch"])
        note = (f"bubble {case['bubble']:.3f} measured vs {case['theory']:.3f} theory, stages "
                f"{case['stages']}, {result['threads']} thr/rank, max |ours - PyTorch| weight after "
                f"warm-up {case['param_drift']:.1e}{shared}")
        rows.append(Row(f"pp{pp}-{case['schedule']}-m{case['m']}", ours, ref, {
            "pp": pp, "schedule": case["schedule"], "microbatches": case["m"], "model": opts.model,
            "bubble_measured": case["bubble"], "bubble_theory": case["theory"],
            "stage_layers": case["stages"], "threads_per_rank": result["threads"],
            "param_drift_after_warmup": case["param_drift"], "note": note,
        }))
    for case in result["zb"]:
        ours, ref = tokens / median(case["ours"]), tokens / median(case["torch"])
        rows.append(Row(f"pp{pp}-{case['schedule']}-m{case['m']}", ours, ref, {
            "pp": pp, "schedule": case["schedule"], "microbatches": case["m"], "model": opts.model,
            "reference": case["torch_schedule"], "bubble_measured": case["bubble"],
            "bubble_theory": case["theory"], "threads_per_rank": result["threads"],
            "param_drift_after_warmup": case["param_drift"],
            "note": (f"vs {case['torch_schedule']}, bubble {case['bubble']:.3f} measured vs "
                     f"{case['theory']:.3f} theory, max |ours - PyTorch| weight after warm-up "
                     f"{case['param_drift']:.1e}{shared}{skip}"),
        }))
        ours, ref = tokens / median(case["ours"]), tokens / median(case["1f1b"])
        note = (f"ref = ours 1f1b; bubble {case['bubble']:.3f} measured vs {case['theory']:.3f} theory "
                f"(F=I=W), {case['simulated']:.3f} simulated with the measured F/I/W; 1f1b bubble "
                f"{case['bubble_1f1b']:.3f}{shared}{skip}")
        rows.append(Row(f"pp{pp}-{case['schedule']}-m{case['m']}-vs-1f1b", ours, ref, {
            "pp": pp, "schedule": case["schedule"], "microbatches": case["m"], "model": opts.model,
            "reference": "ours-1f1b", "bubble_measured": case["bubble"], "bubble_theory": case["theory"],
            "bubble_simulated": case["simulated"], "bubble_1f1b": case["bubble_1f1b"],
            "mean_seconds": case["means"], "threads_per_rank": result["threads"], "note": note,
        }))
    return rows


def _measure_all(opts: BenchOptions, rank: int, world: int) -> dict[str, Any]:
    from paratrain.mesh import Mesh, MeshShape

    mesh = Mesh.build(MeshShape(pp=world), rank, timeout_s=600)
    return {"cases": [_measure(opts, mesh, schedule, m) for schedule, m in CASES],
            "zb": [_measure_zero_bubble(opts, mesh, schedule, m) for schedule, m in zb_cases(opts, world)]}


def _ours(opts: BenchOptions, mesh: Any, schedule: str, m: int) -> tuple[Any, Any, list[Any], Any]:
    """Our pipeline for ``schedule``: (PipelineModel, one-repeat function, batches, config)."""
    import torch

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import get_batch, load_corpus
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    cfg = TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                      seed=opts.seed, layout=Layout(pp=mesh.pp.size, microbatches=m, schedule=schedule))
    corpus = load_corpus()
    batches = [tuple(torch.from_numpy(a) for a in get_batch(corpus.train, cfg.seq_len, cfg.global_batch,
                                                            cfg.seed, step)) for step in range(1, opts.steps + 1)]
    pm = parallelize(build_reference(cfg.model_config(), cfg.seed), mesh, cfg.layout, seq_len=cfg.seq_len)
    opt = make_optimizer(pm.named_parameters(), cfg)

    def run() -> None:
        for x, y in batches:
            pm.forward_backward(x, y)
            opt.step()
            pm.zero_grad()
    return pm, run, batches, cfg


def _timelines(pm: Any, batches: list[Any]) -> list[Any]:
    """Timelines of a few extra steps (on rank 0; empty elsewhere), outside the timed repeats."""
    out = []
    for x, y in batches[:3]:
        pm.forward_backward(x, y)
        pm.zero_grad()
        timeline = pm.gather_timeline()
        if timeline is not None:
            out.append(timeline)
    return out


def _measure_zero_bubble(opts: BenchOptions, mesh: Any, schedule: str, m: int) -> dict[str, Any]:
    import torch.distributed as dist

    from paratrain.bench.pp_zb import torch_zero_bubble
    from paratrain.core.timeline import simulate

    zb, run_zb, batches, cfg = _ours(opts, mesh, schedule, m)
    base, run_base, _, _ = _ours(opts, mesh, "1f1b", m)
    theirs, their_model = torch_zero_bubble(mesh, cfg, batches)
    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        run_zb()
        run_base()
        theirs()
    mine = dict(zb.module.named_parameters())  # the same steps from the same weights: a fair race
    drift = max((t - mine[k]).abs().max().item() for k, t in their_model.named_parameters())
    times = alternate({"ours": run_zb, "torch": theirs, "1f1b": run_base}, opts.repeats, dist.barrier)
    tls, base_tls = _timelines(zb, batches), _timelines(base, batches)
    means: list[dict[str, float]] = []
    simulated = float("nan")
    if tls:  # mean duration of each kind per rank over the timelines, then the schedule on them
        for r in range(mesh.pp.size):
            spans = [sp for tl in tls for sp in tl.ranks[r] if sp.action.is_compute]
            means.append({k: median([sp.end - sp.start for sp in spans if sp.action.kind == k])
                          for k in sorted({sp.action.kind for sp in spans})})
        simulated = simulate(zb.schedule, lambda r, a: means[r].get(a.kind, 0.0)).bubble
    return {"schedule": schedule, "m": m, "ours": times["ours"], "1f1b": times["1f1b"], "torch": times["torch"],
            "torch_schedule": "ScheduleZBVZeroBubble" if schedule == "zb-v" else "ScheduleInterleavedZeroBubble",
            "param_drift": drift,
            "bubble": median([t.bubble for t in tls]) if tls else float("nan"),
            "bubble_1f1b": median([t.bubble for t in base_tls]) if base_tls else float("nan"),
            "theory": zb.theoretical_bubble, "simulated": simulated, "means": means}


def _torch_side(opts: BenchOptions, mesh: Any, cfg: Any, schedule: str, batches: list[Any]) -> Any:
    """A PyTorch pipeline over the same split; returns one training step as a function."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel.pipeline.stage import build_stage

    model = build_reference(cfg.model_config(), cfg.seed)
    stage = build_stage(model, mesh, cfg.layout, cfg.seq_len)

    class StageModule(nn.Module):
        """This rank's chunk as a module: activations (or logits on the last stage) out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return stage.chunks[0](x, None)

    module = StageModule()
    pipe_stage = PipelineStage(module, mesh.coords.pp, mesh.pp.size, torch.device("cpu"), group=mesh.pp.pg)
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = cls(pipe_stage, cfg.layout.microbatches, loss_fn=model.criterion)  # mean CE; grads / m
    opt = make_optimizer(module.named_parameters(), cfg)

    def steps() -> None:
        for x, y in batches:
            if mesh.is_first_stage:
                sched.step(x)
            else:
                sched.step(target=y, losses=[])
            if stage.tied_param is not None:
                dist.all_reduce(stage.tied_param.grad, group=stage.tied_group.pg)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return steps, module


def _measure(opts: BenchOptions, mesh: Any, schedule: str, m: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import get_batch, load_corpus
    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    cfg = TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                      seed=opts.seed, layout=Layout(pp=mesh.pp.size, microbatches=m, schedule=schedule))
    corpus = load_corpus()
    batches = []
    for step in range(1, opts.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step)
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))

    pm = parallelize(build_reference(cfg.model_config(), cfg.seed), mesh, cfg.layout, seq_len=cfg.seq_len)
    opt = make_optimizer(pm.named_parameters(), cfg)

    def ours() -> None:
        for x, y in batches:
            pm.forward_backward(x, y)
            opt.step()
            pm.zero_grad()

    theirs, module = _torch_side(opts, mesh, cfg, schedule, batches)
    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        ours()
        theirs()
    # both sides trained the same steps from the same weights: they must agree (a fair race)
    mine = dict(pm.module.named_parameters())
    drift = max((p - mine[k.removeprefix("model.")]).abs().max().item() for k, p in module.named_parameters())
    times = alternate({"ours": ours, "torch": theirs}, opts.repeats, dist.barrier)
    bubbles = []
    for x, y in batches[:3]:  # measured outside the timed repeats: gathering costs a transfer
        pm.forward_backward(x, y)
        pm.zero_grad()
        timeline = pm.gather_timeline()
        if timeline is not None:
            bubbles.append(timeline.bubble)
    return {"schedule": schedule, "m": m, "ours": times["ours"], "torch": times["torch"],
            "bubble": median(bubbles) if bubbles else float("nan"), "theory": pm.theoretical_bubble,
            "stages": ",".join(map(str, pm.stage.sizes)), "param_drift": drift}
