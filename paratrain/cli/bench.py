"""``paratrain bench``: side-by-side throughput of ours vs PyTorch's implementations."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from paratrain.bench import DEFAULT_GROUPS, GROUPS, BenchOptions, Row
from paratrain.cli.common import MAX_LOCAL_PROCS, check_batch_memory
from paratrain.errors import ConfigError
from paratrain.metrics import format_grid

DESCRIPTION = """\
Measure our parallel implementations against PyTorch's own on the same model, global batch and
threads per rank, in one run: A/B alternating repeats in the same processes, medians reported.
The references: DDP for dp, DTensor tensor parallelism for tp, torch.distributed.pipelining for
pp, FSDP2 and DDP + ZeroRedundancyOptimizer for zero (and DeepSpeed's ZeRO 1/2/3 in fp32, bf16
and with its optimizer offload, where deepspeed is installed: pip install 'paratrain[bench]'),
torch.distributed.checkpoint for ckpt, DDP and DTensor around a Hugging Face GPT-2 for hf; cp
and ep against one process and plain data parallelism of the same model. Prints a table, or one
JSON object per row with --json."""


def register(sub: argparse._SubParsersAction) -> None:
    d = BenchOptions()
    p = sub.add_parser("bench", help="benchmark ours against PyTorch's implementations",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated groups among {', '.join(GROUPS)} (default: all but cp, hf and ep)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--model", default=d.model, help=f"named model (default: {d.model})")
    p.add_argument("--global-batch", type=int, default=d.global_batch,
                   help=f"sequences per step (default: {d.global_batch})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"timed steps per repeat (default: {d.steps})")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help=f"A/B alternations; medians reported (default: {d.repeats})")
    p.add_argument("--nproc", default=",".join(map(str, d.nprocs)),
                   help="process counts to measure, comma-separated; pp measures those of at least 2 "
                   "as pipeline degrees (default: 2,4)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per rank, same on both sides (default: cores / ranks)")
    p.add_argument("--bucket-mb", type=float, default=d.bucket_mb,
                   help=f"our gradient bucket size in MiB; DDP keeps its default (default: {d.bucket_mb})")
    p.set_defaults(run=run)


def _parse_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}.") from None
    if not values or min(values) < 1 or max(values) > MAX_LOCAL_PROCS:
        raise ConfigError(f"{what} must list integers in [1, {MAX_LOCAL_PROCS}], got {text!r}.")
    return values


def check_options(args: argparse.Namespace) -> None:
    """The numeric flags, by the rules ``train`` uses for the same quantities (config.FIELD_RANGES)."""
    from paratrain.config import FIELD_RANGES, Range, check_range

    rules = {"global_batch": FIELD_RANGES["global_batch"], "seq_len": FIELD_RANGES["seq_len"],
             "steps": Range(int, 1), "repeats": Range(int, 1), "threads": FIELD_RANGES["threads"],
             "bucket_mb": FIELD_RANGES["bucket_mb"]}
    for name, rule in rules.items():
        check_range(f"--{name.replace('_', '-')}", getattr(args, name), rule)
    check_batch_memory(args.global_batch, args.seq_len)


def prepare(args: argparse.Namespace) -> tuple[list[str], BenchOptions]:
    """The groups and options to measure, every check done (ConfigError) before anything starts."""
    groups = [g.strip() for g in args.only.split(",")] if args.only else list(DEFAULT_GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ConfigError(f"unknown benchmark group(s) {', '.join(unknown)}; valid: {', '.join(GROUPS)}.")
    check_options(args)
    opts = BenchOptions(model=args.model, global_batch=args.global_batch, seq_len=args.seq_len,
                        steps=args.steps, repeats=args.repeats, nprocs=_parse_list(args.nproc, "--nproc"),
                        threads=args.threads, bucket_mb=args.bucket_mb)
    from paratrain.config import Layout, TrainConfig

    if "hf" in groups:
        _check_hf()
    for n in opts.nprocs:
        for group in (g for g in groups if g not in ("ckpt", "pp")):  # these two check their own layouts
            layout = (Layout(tp=n, sequence_parallel=True) if group in ("tp", "hf") else Layout(cp=n) if group == "cp"
                      else Layout(dp=n, ep=n) if group == "ep" else Layout(dp=n))
            model = opts.model
            if group == "ep":  # a mixture of experts: --model if it has experts, else small-moe
                from paratrain.bench.ep import bench_model

                model = bench_model(opts)
            TrainConfig(model=model, global_batch=opts.global_batch, seq_len=opts.seq_len,
                        layout=layout).validate()
    if "pp" in groups:
        from paratrain.bench import pp

        pp.check(opts, asked=bool(args.only))
    return groups, opts


def _check_hf() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("bench --only hf needs the transformers package: pip install 'paratrain[hf]'.")


def run(args: argparse.Namespace) -> int:
    groups, opts = prepare(args)
    from paratrain.launch import LaunchError

    rows: list[Row] = []
    for group in groups:
        module = importlib.import_module(f"paratrain.bench.{group}")
        if not args.json:
            what = module.__doc__.splitlines()[0].replace("``", "")  # the docstring's reST quotes, not for a terminal
            print(f"[bench {group}] measuring ({what})", file=sys.stderr, flush=True)
        try:
            rows += module.run(opts)
        except LaunchError as e:
            from paratrain.cli.train_report import format_failure

            print(format_failure(e), file=sys.stderr)
            return 1
    if args.json:
        for r in rows:
            print(json.dumps(r.as_json()))
    else:
        print(render(rows, opts))
    return 0


def render(rows: list[Any], opts: BenchOptions) -> str:
    title = (f"model {opts.model}, global batch {opts.global_batch} x {opts.seq_len} tokens, "
             f"{opts.steps} steps x {opts.repeats} A/B repeats (medians)")
    speed = [r for r in rows if not hasattr(r, "ours_s")]
    seconds = [r for r in rows if hasattr(r, "ours_s")]
    parts = [title]
    if speed:
        parts.append(format_grid(["name", "ours tok/s", "PyTorch tok/s", "ours/PyTorch", "notes"],
                                 [_speed_cells(r) for r in speed]))
    if seconds:  # checkpoints: seconds, lower is better; ratio = PyTorch / ours
        parts.append(format_grid(["name", "ours", "PyTorch (DCP)", "PyTorch/ours", "notes"],
                                 [_seconds_cells(r) for r in seconds]))
    return "\n".join(parts)


def _speed_cells(r: Row) -> list[str]:
    note = ""
    if "allreduce_bytes_per_step" in r.extra:
        e = r.extra
        buckets = f"{e['buckets']} bucket" + ("s" if e["buckets"] != 1 else "")
        note = (f"all-reduced {e['allreduce_bytes_per_step'] / 2**20:.2f} MiB/step vs grads "
                f"{e['grad_bytes'] / 2**20:.2f} MiB ({buckets}), {e['threads_per_rank']} thr/rank")
    elif "cp_bytes_per_step" in r.extra:  # the reference side is one process, not PyTorch's CP
        e = r.extra
        note = (f"vs ONE process; activations/rank {e['activations_per_rank'] / 2**20:.1f} MiB vs "
                f"{e['single_activations'] / 2**20:.1f} MiB; ring sent {e['cp_bytes_per_step'] / 2**20:.2f} MiB/step "
                f"(formula {e['cp_bytes_formula'] / 2**20:.2f}), {e['threads_per_rank']} thr/rank")
    elif "a2a_bytes_ours" in r.extra:  # the reference side is our own dp-only MoE, not PyTorch
        e, mib = r.extra, 2**20
        note = (f"vs dp only; {e['model']}; params/rank {e['params_ours'] / mib:.1f} vs "
                f"{e['params_dp'] / mib:.1f} MiB, "
                f"activations/rank {e['activations_ours'] / mib:.1f} vs {e['activations_dp'] / mib:.1f} MiB, "
                f"moved {e['bytes_ours'] / mib:.2f} (all-to-all {e['a2a_bytes_ours'] / mib:.2f}) vs "
                f"{e['bytes_dp'] / mib:.2f} MiB/step, {e['threads_per_rank']} thr/rank")
    elif "note" in r.extra:
        note = str(r.extra["note"])
    return [r.name, f"{r.ours_tokens_per_s:,.0f}", f"{r.ref_tokens_per_s:,.0f}", f"{r.ratio:.3f}", note]


def _seconds_cells(r: Any) -> list[str]:
    note = f"{r.extra['ours_bytes'] / 2**20:.1f} / {r.extra['ref_bytes'] / 2**20:.1f} MiB on disk (ours / DCP)"
    if "note" in r.extra:
        note += f"; {r.extra['note']}"
    ref = "-" if r.ref_s is None else f"{r.ref_s:.3f} s"
    return [r.name, f"{r.ours_s:.3f} s", ref, "-" if r.ratio is None else f"{r.ratio:.3f}", note]
