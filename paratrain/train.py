"""The training loop every rank runs: mesh, reference model, ``parallelize``, then steps.

:func:`train_worker` is the entry point of one rank (spawned by :func:`paratrain.launch.launch`
or started by an outside torchrun). Global rank 0 writes ``metrics.jsonl``, shows progress,
saves the checkpoint and samples text; it returns the run's summary.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paratrain import comm
from paratrain.config import TrainConfig
from paratrain.data import (
    VAL,
    Corpus,
    CorpusCheck,
    check_corpus,
    decode,
    dp_rows,
    encode,
    get_batch,
    load_corpus,
)
from paratrain.faults import FAULT_ENV, Fault, StepHook  # noqa: F401 - defined there; importable from here too
from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed
from paratrain.mesh import Mesh, MeshShape
from paratrain.metrics import MetricsWriter, Progress, read_metrics
from paratrain.models.configs import param_count
from paratrain.models.gpt import build_reference
from paratrain.models.moe import moe_layers
from paratrain.optim import lr_at, make_optimizer, set_lr
from paratrain.parallel import ParallelModel, parallelize
from paratrain.parallel.expert import router_record
from paratrain.parallel.rng import seed_default_generator

SAMPLE_PROMPT = "def "


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak tensor memory on a GPU; peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_worker(cfg: TrainConfig, checked: CorpusCheck | None = None,
                 on_step: StepHook | None = None) -> dict[str, Any] | None:
    """One rank's whole job. Returns the summary on global rank 0, None elsewhere. ``checked``: the
    config was validated and the corpus checked before launch (``paratrain train``); the rank then
    only asserts that its corpus is the one checked. ``on_step`` runs as each step starts
    (``paratrain train`` passes the :class:`Fault` of ``PARATRAIN_FAULT``)."""
    env = RankEnv.from_env()
    set_threads(cfg.threads, env.local_world_size)
    device = resolve_device(cfg.device, env.local_rank)
    from paratrain.preempt import StopRequest

    stop = StopRequest(deadline_s=cfg.timeout_s)
    undo = stop.install()  # a signal now ends the run after the step in flight and a checkpoint
    attempt = init_distributed(env, device.type, cfg.timeout_s)
    ok = False
    try:
        cfg = _after_restart(cfg, env, attempt)
        result = _train(cfg, env, device, checked, on_step, stop)
        ok = True
        return result
    finally:
        shutdown_distributed(ok)
        undo()


def _after_restart(cfg: TrainConfig, env: RankEnv, attempt: int) -> TrainConfig:
    """A rank started again by the elastic agent (``--max-restarts``) continues from the run's
    latest checkpoint (or from step 1 if none was committed), as ``--resume`` would; rank 0 drops
    the metrics lines of the steps it will train again. The checkpoint was committed atomically
    (``latest`` is written after every file is fsynced), so it is read without re-hashing.
    ``attempt``: the number all ranks agreed on (:func:`paratrain.launch.attempt_store`), not this
    host's restart count, which can lag another host's."""
    if attempt == 0 or not cfg.out:
        return cfg
    from paratrain.checkpoint import manifest as mf
    from paratrain.checkpoint.store import LATEST
    from paratrain.cli.resume import truncate_metrics

    root = Path(cfg.out) / "checkpoints"
    try:
        folder = root / (root / LATEST).read_text().strip()
        step = mf.read(folder).step
    except (OSError, mf.CheckpointError):
        folder, step = None, 0
    if env.rank == 0:
        truncate_metrics(Path(cfg.out), step)
        where = f"from {folder} (step {step})" if folder else "from step 1 (no checkpoint yet)"
        if step >= cfg.steps:  # a rank died after the final checkpoint was committed
            where = f"from {folder}: the run had already finished (step {step} of {cfg.steps}); nothing to train again"
        of = f" of {cfg.max_restarts}" if cfg.max_restarts else ""  # torchrun's own --max-restarts: not ours to know
        print(f"paratrain train: restart {attempt}{of}: continuing {where}",
              file=sys.stderr, flush=True)
    return cfg.replace(resume_from=str(folder) if folder else None)


def evaluate(pm: ParallelModel, corpus: Corpus, cfg: TrainConfig, rows: slice,
             device: torch.device) -> float:
    """Mean validation loss over ``cfg.eval_batches`` fixed global batches (same for every layout)."""
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        x, y = get_batch(corpus.val, cfg.seq_len, cfg.global_batch, cfg.seed, i, rows, split=VAL)
        total += pm.eval_loss(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    return pm.global_mean(total / cfg.eval_batches).item()


@dataclass
class Session:
    """Everything one rank trains with, built by :func:`setup`."""

    cfg: TrainConfig
    mesh: Mesh
    corpus: Corpus
    pm: ParallelModel
    opt: torch.optim.Optimizer
    rows: slice
    device: torch.device
    on_step: StepHook | None = None
    # ``count_states``: train_step records the model states it holds at the optimizer into
    # ``states`` (parallel/memory.model_state_bytes; ZeRO 2/3 release their gradient shards at
    # zero_grad, so after the step they are gone)
    count_states: bool = False
    states: Any = None


def setup(cfg: TrainConfig, env: RankEnv, device: torch.device, corpus: Corpus | None = None,
          checked: CorpusCheck | None = None, on_step: StepHook | None = None) -> Session:
    """Validate, build the mesh, the reference model and its parallel form, and the optimizer.
    With several ranks the default process group must already exist. With ``checked`` (from
    ``paratrain train``, which validated everything before launch) nothing is validated twice: the
    corpus loaded here must match what was checked. ``on_step``: see :func:`train_step`."""
    model_cfg = cfg.validate() if checked is None else cfg.model_config()
    layout = cfg.layout
    if env.world_size != layout.world_size:
        raise RuntimeError(f"{env.world_size} processes were started for a layout of "
                           f"{layout.world_size} ({layout})")
    mesh = Mesh.build(MeshShape(layout.dp, layout.pp, layout.tp, layout.cp, layout.ep), env.rank, cfg.timeout_s)
    if corpus is None:
        corpus = load_corpus(cfg.data)
    if checked is None:
        check_corpus(corpus, cfg.seq_len)
    elif CorpusCheck.of(corpus) != checked:
        raise RuntimeError(f"the data changed after `paratrain train` checked it: checked {checked}, this "
                           f"rank loaded {CorpusCheck.of(corpus)}. Keep --data unchanged while a run starts.")
    pm, opt = parallel_model(cfg, model_cfg, mesh, device)
    rows = dp_rows(cfg.global_batch, layout.dp, mesh.coords.dp)
    return Session(cfg, mesh, corpus, pm, opt, rows, device, on_step)


def parallel_model(cfg: TrainConfig, model_cfg: Any, mesh: Mesh,
                   device: torch.device) -> tuple[ParallelModel, torch.optim.Optimizer]:
    """This rank's share of the model ``cfg`` describes on ``mesh``, and its optimizer: what
    :func:`setup` trains (and ``paratrain bench`` measures against other libraries)."""
    model, plans = build_model(cfg, model_cfg, device)
    if cfg.init_from:
        _init_from(model, cfg.init_from)
    seed_default_generator(cfg.seed, mesh.coords.dp, mesh.coords.pp)  # dropout: see parallel/rng.py
    autocast = torch.bfloat16 if cfg.precision == "bf16-autocast" else None
    mixed = cfg.precision == "bf16"  # bf16 weights, fp32 masters: parallel/mixed.py
    if mixed:
        model.to(torch.bfloat16)
    pm = parallelize(model, mesh, cfg.layout, bucket_mb=cfg.bucket_mb, dp_impl=cfg.dp_impl,
                     overlap=cfg.overlap, autocast_dtype=autocast, seq_len=cfg.seq_len,
                     master_weights=mixed, grad_dtype=torch.float32 if cfg.grad_dtype == "fp32" else None,
                     offload_optimizer=cfg.offload_optimizer, zero3_gather=cfg.zero3_gather, **plans)
    opt = pm.shard_optimizer(make_optimizer(pm.named_parameters(), cfg))  # ZeRO: over the shards
    return pm, opt


def build_model(cfg: TrainConfig, model_cfg: Any, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The reference model from the seed, and the plans ``parallelize`` needs for it (the
    built-in GPT: none; a Hugging Face model: its tp plan and stage spec, ``models/hf.py``)."""
    if cfg.hf is None:
        return build_reference(model_cfg, cfg.seed, device), {}
    from paratrain.models import hf

    hf_cfg = hf.hf_config(cfg.hf, cfg.hf_config)
    model = hf.build_hf(cfg.hf, cfg.hf_config, cfg.seed, device)
    return model, {"tp_plan": hf.tp_plan(cfg.hf, hf_cfg), "stages": hf.stages(cfg.hf, hf_cfg)}


def _init_from(model: torch.nn.Module, path: str) -> None:
    """Start from the weights of a reference-shaped safetensors file or a GPT-2 folder."""
    from paratrain.checkpoint.convert import read_init

    state = read_init(Path(path))
    want = model.state_dict()
    if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
        bad = sorted(set(state) ^ set(want)) or [k for k in want if state[k].shape != want[k].shape]
        raise ValueError(f"--init-from {path}: its tensors do not fit model {model.cfg.name!r} "
                         f"(differing: {', '.join(bad[:5])}); give weights of the same shape.")
    model.load_state_dict(state)


def _train(cfg: TrainConfig, env: RankEnv, device: torch.device,
           checked: CorpusCheck | None = None, on_step: StepHook | None = None,
           stop: Any = None) -> dict[str, Any] | None:
    from paratrain.checkpoint.session import RunCheckpoints

    s = setup(cfg, env, device, checked=checked, on_step=on_step)
    lead = env.rank == 0
    out = Path(cfg.out) if cfg.out else None
    checkpoints = RunCheckpoints(s, out, dataclasses.asdict(cfg))
    first = checkpoints.restore()  # 1, or the step after the checkpoint resumed from
    writer = MetricsWriter(out / "metrics.jsonl", append=first > 1) if lead and out else None
    if writer and cfg.tensorboard:  # the same records as TensorBoard events, in OUT/tensorboard
        from paratrain.tboard import FOLDER, TensorBoardMetrics

        writer = TensorBoardMetrics(writer, out / FOLDER)
    progress = Progress(cfg.steps, f"train {cfg.model} [{cfg.layout}]", enabled=lead and cfg.progress,
                        initial=first - 1)
    records: list[dict[str, Any]] = []
    val_loss = None
    t_start = time.perf_counter()
    meter = None
    diverged = bad = 0
    if stop is not None:
        stop.armed = True  # a signal from here on: finish the step, checkpoint it, stop
    try:
        for step in range(first, cfg.steps + 1):
            if cfg.measure_memory and step == cfg.steps:  # one step, its peak: see parallel/memory.py
                from paratrain.parallel.memory import ActivationMeter

                s.count_states = True
                with ActivationMeter(s.pm.weight_tensors()) as meter:
                    record = train_step(s, step)
            else:
                record = train_step(s, step)
            bad = bad + 1 if record.get("skipped") else 0  # skipped: the same on every rank
            if bad and bad > cfg.max_bad_steps:  # N skipped in a row, and one more: stop here
                diverged = step
                records.append(record)
                if writer:
                    writer.write(record)
                break
            if bad and lead:
                print(f"paratrain: warning: step {step}: the loss or gradient norm is not finite "
                      f"(loss {record['loss']}, norm {record['grad_norm']}); the update was skipped "
                      f"({bad} in a row of the {cfg.max_bad_steps} --max-bad-steps allows)",
                      file=sys.stderr, flush=True)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_loss = evaluate(s.pm, s.corpus, cfg, s.rows, device)
                record["val_loss"] = val_loss
            checkpoints.after_step(step, record)
            records.append(record)
            if writer:
                writer.write(record)
            progress.update(step, loss=record["loss"], tok_s=f"{record['tokens_per_s']:,.0f}")
            if stop is not None and step < cfg.steps and (signum := stop.agreed(s.mesh)):
                from paratrain.preempt import Preempted

                folder = checkpoints.save_now(step)  # preempted: save this step, then stop
                raise Preempted(signum, step, folder)
    finally:
        if stop is not None:
            stop.armed = False
        progress.close()
        if writer:
            writer.close()
    # the final checkpoint, sharded like the others; none after a divergence (the last good one stays),
    # nor when a restart found it committed already (a rank died after it): nothing was trained again
    finished_before = first > cfg.steps
    last_save = checkpoints.close(cfg.steps, final=not diverged and not finished_before)
    wall = time.perf_counter() - t_start
    if diverged:
        return _diverged_summary(cfg, records, wall, device, s.mesh) if lead else None
    state = s.pm.full_state_dict() if cfg.sample_tokens else None
    timeline = s.pm.gather_timeline() if cfg.layout.pp > 1 else None  # of the last step
    memory = None
    if meter is not None:  # the model states as the last step's optimizer held them
        memory = dict(s.states.as_dict(), activations=meter.peak_bytes)
    if not lead:
        return None if memory is None else {"memory": memory}
    model_cfg = cfg.model_config()
    if finished_before and out:  # the summary of the steps the earlier attempt trained and recorded
        records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) <= cfg.steps]
        val_loss = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    summary = _summary(cfg, records, val_loss, wall, device, param_count(model_cfg), s.mesh)
    if memory is not None:
        summary["memory"] = memory  # rank 0's; `paratrain train` adds every rank's (memory_per_rank)
    if timeline is not None:
        summary.update(bubble_measured=timeline.bubble, bubble_theory=s.pm.theoretical_bubble)
        if out:
            from paratrain.viz.timeline import save_timeline

            save_timeline(dict(timeline.to_json(), bubble_theory=s.pm.theoretical_bubble), out,
                          f"{cfg.model} [{cfg.layout}], step {cfg.steps}: bubble {timeline.bubble:.1%} "
                          f"measured, {s.pm.theoretical_bubble:.1%} theory", unit="s")
    if last_save is not None:
        summary["checkpoint"] = dict(last_save, folder=str(out / "checkpoints" / f"step-{cfg.steps}"))
    if checkpoints.bytes_read:
        summary["resumed_from"] = {"folder": cfg.resume_from, "step": first - 1,
                                   "bytes_read_rank0": checkpoints.bytes_read}
    if cfg.sample_tokens and state is not None and cfg.hf is None:
        summary["sample"] = sample_text(model_cfg, state, cfg.sample_tokens, cfg.seed, corpus=s.corpus)
    return summary


def _diverged_summary(cfg: TrainConfig, records: list[dict[str, Any]], wall: float, device: torch.device,
                      mesh: Mesh) -> dict[str, Any]:
    """The loss became NaN or infinite: no checkpoint (it would hold those weights), no sample; the
    summary says where it stopped (``paratrain train`` reports it and exits non-zero)."""
    summary = _summary(cfg, records, None, wall, device, param_count(cfg.model_config()), mesh)
    step, loss = records[-1]["step"], records[-1]["loss"]
    skipped = sum(1 for r in records if r.get("skipped"))
    why = f"the training loss was {loss} at step {step}: training diverged"
    if cfg.max_bad_steps:
        why += f" ({cfg.max_bad_steps + 1} non-finite steps in a row; their updates were skipped)"
    summary["diverged"] = {"step": step, "loss": str(loss), "lr": records[-1]["lr"], "skipped_steps": skipped,
                           "why": why}
    return summary


def train_step(s: Session, step: int) -> dict[str, Any]:
    """One optimizer step on the global batch of ``step``; returns its metrics record. The
    session's ``on_step`` hook (if any) runs first, with this rank and ``step``."""
    cfg, pm, device = s.cfg, s.pm, s.device
    if s.on_step is not None:
        s.on_step(pm.mesh.rank, step)
    groups = pm.mesh.groups
    bytes0 = {g.name: g.stats.bytes for g in groups}
    comm0 = sum(g.stats.seconds for g in groups)
    t0 = time.perf_counter()
    x, y = get_batch(s.corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step, s.rows)
    lr = lr_at(step, cfg)
    set_lr(s.opt, lr)
    moe, model = moe_layers(pm.module), cfg.model_config()  # a pipeline stage: its MoE blocks only
    for m in moe:
        m.take_stats()  # forget the evaluation's forwards
    local_loss = pm.forward_backward(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    norm = float(pm.clip_grad_norm_(cfg.grad_clip))  # the global norm: the same on every rank
    loss = pm.global_mean(local_loss).item()  # likewise; also a sync point for CUDA
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:  # a non-finite step leaves the weights and the optimizer state as they were
        s.opt.step()
    if s.count_states:
        from paratrain.parallel.memory import model_state_bytes

        s.states = model_state_bytes(pm.module, s.opt)
    pm.zero_grad()
    dt = time.perf_counter() - t0
    comm_s = sum(g.stats.seconds for g in groups) - comm0
    return {**({"skipped": True} if skipped else {}),
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens_per_s": cfg.global_batch * cfg.seq_len / dt,
        "step_time_s": dt,
        "comm_wait_s": comm_s,
        "comm_bytes": {g.name: g.stats.bytes - bytes0[g.name] for g in groups if g.size > 1},
        **({"router": router_record(moe, model, [pm.mesh.dpcp, pm.mesh.pp])}  # parallel/expert.py
           if model.num_experts else {}),
    }


def _summary(cfg: TrainConfig, records: list[dict[str, Any]], val_loss: float | None, wall: float,
             device: torch.device, params: int, mesh: Mesh) -> dict[str, Any]:
    steady = records[min(len(records) - 1, 2):]  # the first steps include warm-up costs
    return {
        "model": cfg.model_config().name if cfg.hf else cfg.model,
        "params": params,
        "layout": str(cfg.layout),
        "world_size": cfg.layout.world_size,
        "device": str(device),
        "steps": len(records),
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "val_loss": val_loss,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "comm_wait_s": statistics.median(r["comm_wait_s"] for r in steady),
        "peak_memory_mb": peak_memory_mb(device),
        "wall_s": wall,
        "comm": comm.summarize([g for g in mesh.groups if g.size > 1]),
        "out": cfg.out,
    }


def sample_text(model_cfg: Any, state: dict[str, torch.Tensor], num_tokens: int, seed: int,
                prompt: str = SAMPLE_PROMPT, corpus: Corpus | None = None) -> str:
    """Generate ``num_tokens`` tokens after ``prompt`` with the trained weights (on the CPU),
    encoded and decoded by the corpus's tokenizer (bytes by default)."""
    model = build_reference(model_cfg, seed)
    model.load_state_dict(state)
    idx = torch.tensor([corpus.encode(prompt) if corpus else encode(prompt)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, num_tokens, temperature=0.8, top_k=40, generator=g)
    return corpus.decode(out[0].tolist()) if corpus else decode(out[0].tolist())
