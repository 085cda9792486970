"""Group ``zero``: our ZeRO-k against PyTorch's (FSDP2; DDP + ZeroRedundancyOptimizer) and DeepSpeed's.

FSDP2 is ``torch.distributed.fsdp.fully_shard``; ``torch.distributed.optim.ZeroRedundancyOptimizer``
is PyTorch's ZeRO-1 (optimizer state sharded; gradients still all-reduced by DDP). DeepSpeed
(``paratrain/bench/zero_ds.py``, a benchmark-only extra: its rows are left out, with the reason,
where it is not installed) runs ZeRO 1, 2 and 3 in fp32 and bf16, and with its optimizer offload.

Both sides train the same reference model (same seed) on the same pre-built batches with AdamW
(weight decay on matrices and embeddings only) and gradient clipping at 1.0, in the same
processes, with the same threads per rank, A/B alternating. Ours is what ``paratrain train``
builds (``train.parallel_model``). FSDP2 shards the same units as ours (each transformer block,
then the root holding the embeddings, final LayerNorm and tied head) with its defaults:
parameters resharded after forward (except the root's), the next unit's all-gather prefetched,
gradients reduce-scattered in fp32. ``ZeroRedundancyOptimizer`` shards AdamW's state over the
ranks by whole parameters behind DDP's all-reduce and broadcasts each rank's updated parameters.

Also reported: the first losses of both sides (the same model, so they must agree), our dp
bytes per step against :func:`paratrain.core.traffic.zero_comm_per_step`, and each side's
model-state bytes per rank, measured the same way for both: the heap bytes in use
(:func:`paratrain.bench.heap_bytes`) as the third step's torch optimizer starts, when the
gradients are reduced (and upcast, for fp32 masters) and the optimizer's state exists, less those
before the side was built (the largest over the ranks); and the peak of the heap over that
whole step (:class:`paratrain.bench.HeapPeak`: activations included, and what a library holds
only inside the step, like gradients it frees once reduced). Each side is built and warmed up once
and thrown away before: what a library allocates once per process is not counted. For ours,
``model_state_bytes_ours_counted`` is the exact sum of its tensors at its first step's optimizer
(``parallel/memory.model_state_bytes``, the planner's figure): the heap figure adds the
transient upcast of bf16 gradients, the tensors' bookkeeping and small buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paratrain.bench import BenchOptions, HeapPeak, Row, alternate, heap_bytes, median, rank_worker

CLIP = 1.0
REFS = {3: "FSDP2", 2: "DDP+ZeRO-opt", 1: "DDP+ZeRO-opt"}
WARMUP = 3  # untimed steps per side; the memory is read in the last one (_warm_up)


@dataclass(frozen=True)
class Case:
    """One row: our ZeRO-``zero`` against ``ref`` ("torch": REFS[zero]; "deepspeed")."""

    zero: int
    ref: str = "torch"
    precision: str = "fp32"
    offload: bool = False

    def name(self, n: int) -> str:
        tags = ([self.precision] if self.precision != "fp32" else []) + (["offload"] if self.offload else [])
        return "-".join([f"zero{self.zero}-dp{n}", *tags] + (["deepspeed"] if self.ref == "deepspeed" else []))

    @property
    def reference(self) -> str:
        if self.ref == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero}" + (" offload_optimizer" if self.offload else "")
        return REFS[self.zero]


@dataclass(frozen=True)
class _Args:
    """What each rank measures (``rank_worker`` reads ``threads``)."""

    opts: BenchOptions
    cases: tuple[Case, ...]

    @property
    def threads(self) -> int:
        return self.opts.threads


def cases(deepspeed: bool) -> tuple[Case, ...]:
    """The rows of one process count: PyTorch's references (fp32), then DeepSpeed's (fp32,
    bf16, bf16 with the optimizer offloaded) when it is installed."""
    torch_rows = tuple(Case(z) for z in (3, 2, 1))
    if not deepspeed:
        return torch_rows
    return torch_rows + tuple(Case(z, "deepspeed", p, off) for p, off in (("fp32", False), ("bf16", False),
                                                                           ("bf16", True)) for z in (1, 2, 3))


def run(opts: BenchOptions) -> list[Row]:
    import sys

    from paratrain.bench import zero_ds
    from paratrain.launch import launch

    why = zero_ds.missing()
    if why:
        print(f"[bench zero] DeepSpeed rows left out: {why}", file=sys.stderr, flush=True)
    else:
        removed, left = zero_ds.clear_stale_build_locks()
        for lock in removed:
            print(f"[bench zero] removed {lock}: left by a DeepSpeed op build that was stopped midway "
                  f"(every later build would wait for it)", file=sys.stderr, flush=True)
        for lock in left:
            print(f"[bench zero] {lock} exists: the DeepSpeed ranks wait until the build holding it ends; "
                  f"if no other DeepSpeed job is building (a run stopped moments ago), delete it", file=sys.stderr,
                  flush=True)
    rows = []
    for n in opts.nprocs:
        result = launch(rank_worker, (_measure, _Args(opts, cases(why is None))), n)[0]
        tokens = opts.steps * opts.global_batch * opts.seq_len
        for case, got in zip(cases(why is None), result["cases"]):
            ours, ref = tokens / median(got["ours"]), tokens / median(got["ref"])
            mib = 2**20
            rows.append(Row(case.name(n), ours, ref, {
                "nproc": n, "zero": case.zero, "reference": case.reference, "precision": case.precision,
                "offload_optimizer": case.offload, "model": opts.model,
                "threads_per_rank": result["threads"], "first_loss_ours": got["loss_ours"],
                "first_loss_ref": got["loss_ref"], "dp_bytes_per_step": got["bytes"],
                "dp_bytes_formula": got["formula"], "model_state_bytes_ours": got["memory_ours"],
                "model_state_bytes_ref": got["memory_ref"], "model_state_bytes_ours_counted": got["counted"],
                "peak_bytes_ours": got["peak_ours"], "peak_bytes_ref": got["peak_ref"],
                "note": (f"vs {case.reference}; first loss {got['loss_ours']:.5f} vs {got['loss_ref']:.5f}; "
                         f"MiB/rank: states {_mib(got['memory_ours'])} vs {_mib(got['memory_ref'])}, peak "
                         f"{_mib(got['peak_ours'])} vs {_mib(got['peak_ref'])}; dp "
                         f"{got['bytes'] / mib:.1f} MiB/step (= formula: {got['bytes'] == got['formula']}), "
                         f"{result['threads']} thr/rank"),
            }))
    return rows


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f}"


def _measure(args: _Args, rank: int, world: int) -> dict[str, Any]:
    import torch

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import dp_rows, get_batch, load_corpus

    opts, todo = args.opts, args.cases
    cfg = TrainConfig(model=opts.model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                      layout=Layout(dp=world), seed=opts.seed, grad_clip=CLIP, bucket_mb=opts.bucket_mb)
    cfg.validate()
    corpus = load_corpus()
    rows = dp_rows(cfg.global_batch, world, rank)
    batches = []
    for step in range(1, opts.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step, rows)
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))
    return {"cases": [_case(opts, cfg, world, case, batches) for case in todo]}


Step = Callable[[Any, Any], Any]  # step(x, y) -> the loss (a detached tensor)


def _case(opts: BenchOptions, cfg: Any, world: int, case: Case, batches: list[Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from paratrain.config import Layout
    from paratrain.core.traffic import zero_comm_per_step
    from paratrain.mesh import Mesh, MeshShape
    from paratrain.parallel.memory import model_state_bytes
    from paratrain.train import parallel_model

    cfg = cfg.replace(layout=Layout(dp=world, zero=case.zero), precision=case.precision,
                      offload_optimizer=case.offload)
    mesh = Mesh.build(MeshShape(dp=world), dist.get_rank(), timeout_s=600)
    pm: Any = None
    opt: Any = None

    counted = 0

    def build_ours() -> tuple[Step, Any]:
        nonlocal pm, opt, counted
        pm, opt = parallel_model(cfg, cfg.model_config(), mesh, torch.device("cpu"))
        counted = 0

        def step(x: Any, y: Any) -> Any:
            nonlocal counted
            loss = pm.forward_backward(x, y)
            pm.clip_grad_norm_(cfg.grad_clip)
            opt.step()
            if not counted:  # the first step's states at the optimizer (ZeRO 2/3 release gradients at zero_grad)
                counted = model_state_bytes(pm.module, opt).total
            pm.zero_grad()
            return loss.detach()

        return step, opt

    build_ref = lambda: _reference(cfg, world, case)  # noqa: E731
    for build in (build_ours, build_ref):  # once, thrown away: what a library allocates once per
        _warm_up(build, batches[0])       # process (kernels' caches, comm buffers) is not a model state
    pm = opt = None  # (freed before the measured build, not during it)
    ours, loss_ours, memory_ours = _warm_up(build_ours, batches[0])
    ref, loss_ref, memory_ref = _warm_up(build_ref, batches[0])
    mesh.dp.stats.reset()
    times = alternate({"ours": lambda: _steps(ours, batches), "ref": lambda: _steps(ref, batches)},
                      opts.repeats, dist.barrier)
    steps = opts.repeats * opts.steps
    ops = mesh.dp.stats.ops
    measured = sum(ops[op].bytes for op in ("reduce_scatter", "all_gather", "grad_norm")) // steps
    inner = getattr(pm.grad_sync, "inner", pm.grad_sync)  # under mixed precision: the ZeRO below the masters
    size = {"fp32": 4, "bf16": 2}[case.precision]
    grads = [b.padded * torch.empty((), dtype=b.dtype).element_size() for b in inner.buckets]
    formula = sum(b for _, b in zero_comm_per_step(case.zero, grads, param_bucket_bytes=[
        b.padded * size for b in inner.buckets]).values())
    metered = memory_ours is not None and memory_ref is not None
    most = torch.tensor([counted, *(memory_ours or (0, 0)), *(memory_ref or (0, 0))], dtype=torch.int64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)  # the most loaded rank (ZeRO's shards can differ by padding)
    figures = [int(v) if metered else None for v in most[1:].tolist()]
    return {"ours": times["ours"], "ref": times["ref"], "loss_ours": loss_ours, "loss_ref": loss_ref,
            "bytes": measured, "formula": formula, "memory_ours": figures[0], "peak_ours": figures[1],
            "memory_ref": figures[2], "peak_ref": figures[3], "counted": int(most[0])}


def _warm_up(build: Callable[[], tuple[Step, Any]], batch: Any) -> tuple[Step, float, tuple[int, int] | None]:
    """Build one side, run WARMUP untimed steps on ``batch``: (its step, the mean first loss
    over the ranks, its (model-state, peak) bytes). Both are heap bytes in use less those before
    the side was built: the model states as the last step's torch optimizer starts (a step
    pre-hook: the gradients are reduced, and upcast for fp32 masters; the optimizer's state
    exists), the peak the most over that whole step (:class:`HeapPeak`)."""
    import torch.distributed as dist

    before = heap_bytes()
    step, optimizer = build()
    first = step(*batch)
    for _ in range(WARMUP - 2):
        step(*batch)
    seen: list[int | None] = []
    hook = optimizer.register_step_pre_hook(lambda *_: seen.append(heap_bytes()) if not seen else None)
    with HeapPeak() as peak:
        step(*batch)
    hook.remove()
    dist.all_reduce(first, op=dist.ReduceOp.AVG)
    if before is None or not seen or seen[0] is None or peak.peak is None:
        return step, float(first), None
    return step, float(first), (seen[0] - before, max(peak.peak, seen[0]) - before)


def _steps(step: Step, batches: list[Any]) -> None:
    for x, y in batches:
        step(x, y)


def _reference(cfg: Any, world: int, case: Case) -> tuple[Step, Any]:
    """The reference side's step and the torch optimizer it steps (DeepSpeed's: the AdamW it wraps)."""
    if case.ref == "deepspeed":
        from paratrain.bench import zero_ds

        eng, adamw = zero_ds.engine(cfg, world, case.zero, case.offload)
        return lambda x, y: zero_ds.step(eng, x, y), adamw
    return _fsdp2(cfg) if case.zero == 3 else _ddp_zero_optimizer(cfg)


def _fsdp2(cfg: Any) -> tuple[Step, Any]:
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
    return _plain_steps(model, opt, cfg), opt


def _ddp_zero_optimizer(cfg: Any) -> tuple[Step, Any]:
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
    return _plain_steps(model, opt, cfg), opt.optim  # the local AdamW over this rank's parameters


def _plain_steps(model: Any, opt: Any, cfg: Any) -> Step:
    import torch

    def step(x: Any, y: Any) -> Any:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def memory_worker(cfg: Any) -> tuple[int, int, int]:
    """One rank of ``benchmarks/zero_memory.py``: train ``cfg.steps`` steps, then the exact bytes
    of (parameters, gradients, optimizer state) this rank holds at the last step's optimizer."""
    import torch

    from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed
    from paratrain.train import setup, train_step

    env = RankEnv.from_env()
    set_threads(1, env.local_world_size)
    init_distributed(env, "cpu", cfg.timeout_s)
    ok = False
    try:
        s = setup(cfg, env, torch.device("cpu"))
        s.count_states = True  # the states at the optimizer: ZeRO 2/3 release gradients at zero_grad
        for step in range(1, cfg.steps + 1):
            train_step(s, step)
        m = s.states
        ok = True
        return m.params, m.grads, m.optimizer
    finally:
        shutdown_distributed(ok)
