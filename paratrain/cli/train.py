"""``paratrain train``: validate, launch the ranks, then report (table, plot, sample)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from paratrain.cli.common import add_train_args, build_train_config, write_json
from paratrain.config import TrainConfig
from paratrain.errors import ConfigError
from paratrain.metrics import format_table

DESCRIPTION = f"""\
Train a GPT on the local processes with the given layout. With no options: the built-in tiny GPT
on the Python standard library's sources, 2 data-parallel processes (gloo on CPU, NCCL on CUDA),
{TrainConfig().steps} steps. Writes metrics.jsonl, config.json, summary.json, loss.png and a
checkpoint into the run folder. Under an outside torchrun (multi-node), each rank runs this same
command and --nproc is ignored.

examples:
  paratrain train                                  # the default job
  paratrain train --nproc 4 --dp 4 --steps 100     # 4 data-parallel ranks
  paratrain train --dp 2 --microbatches 4          # gradient accumulation
  paratrain train --config run.toml --lr 1e-3      # a config file, one flag overriding it"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with a parallel layout",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.set_defaults(run=run)


def _default_out(cfg: TrainConfig) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") if "RANK" in os.environ else None
    stamp = run_id or time.strftime("%Y%m%d-%H%M%S")
    l = cfg.layout
    base = Path("runs") / f"{stamp}-{cfg.model}-dp{l.dp}pp{l.pp}tp{l.tp}"
    out, n = base, 1
    while out.exists() and not run_id:
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def preflight(cfg: TrainConfig) -> Any:
    """Every check that can fail before a process starts (exit 2 on failure)."""
    model_cfg = cfg.validate()
    from paratrain.data import check_corpus, load_corpus

    corpus = load_corpus(cfg.data)
    check_corpus(corpus, cfg.seq_len)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was given, but no CUDA device is visible; use "
                              "--device cpu (gloo) or run on a machine with a GPU.")
        if cfg.world_size > torch.cuda.device_count() and "RANK" not in os.environ:
            raise ConfigError(f"{cfg.world_size} processes need {cfg.world_size} GPUs, but "
                              f"{torch.cuda.device_count()} are visible.")
    return model_cfg, corpus


def run(args: argparse.Namespace) -> int:
    cfg = build_train_config(args)
    model_cfg, corpus = preflight(cfg)
    from paratrain.launch import LaunchError, RankEnv, launch
    from paratrain.models.configs import param_count

    lead = RankEnv.from_env().rank == 0
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    cfg = cfg.replace(out=str(out))
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(cfg))
        print(f"paratrain train: {cfg.model} ({param_count(model_cfg):,} parameters) on "
              f"{cfg.world_size} process(es) [{cfg.layout}]\n  data: {corpus.describe()}\n"
              f"  out:  {out}", flush=True)
    from paratrain.train import train_worker

    try:
        results = launch(train_worker, (cfg,), cfg.world_size)
    except LaunchError as e:
        print(format_failure(e), file=sys.stderr)
        return 1
    summary = results.get(0)
    if not lead:
        return 0
    if summary is None:
        print("paratrain: error: rank 0 returned no result; the run did not finish.", file=sys.stderr)
        return 1
    if cfg.measure_memory:
        summary["memory_per_rank"] = [summary["memory"]] + [
            (results.get(r) or {}).get("memory") for r in range(1, cfg.world_size)]
    report(summary, out)
    return 0


def _user_frames(tb: str) -> str:
    """Drop the launcher's own wrapper frames from a rank's traceback."""
    lines = tb.rstrip().splitlines()
    out: list[str] = []
    skip = False
    for line in lines:
        if line.startswith('  File "'):
            skip = "/torch/distributed/elastic/" in line
        elif not line.startswith("    "):
            skip = False
        if not skip:
            out.append(line)
    return "\n".join(out)


def format_failure(e: Any) -> str:
    lines = [f"paratrain: error: rank {e.rank} failed (exit code {e.exitcode}): {e.message}"]
    if e.traceback:
        lines += ["", f"--- traceback from rank {e.rank} ---", _user_frames(e.traceback)]
    if "Timed out" in e.message or "timed out" in e.message:
        lines += ["", "A collective timed out: another rank is stuck or died before reaching it. If steps "
                  "are legitimately that slow, raise --timeout."]
    if e.others:
        codes = ", ".join(f"rank {r}: {c}" for r, c in sorted(e.others.items()))
        lines += ["", f"the other ranks were stopped ({codes})."]
    lines.append("The run did not finish.")
    return "\n".join(lines)


def report(summary: dict[str, Any], out: Path) -> None:
    from paratrain.metrics import read_metrics
    from paratrain.viz.loss import plot_loss

    records = read_metrics(out / "metrics.jsonl")
    plot_loss(records, out / "loss.png", title=f"{summary['model']} [{summary['layout']}]")
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "sample"})
    val = summary["val_loss"]
    rows = [
        ("model", f"{summary['model']} ({summary['params']:,} parameters)"),
        ("layout", f"{summary['layout']} on {summary['world_size']} process(es), {summary['device']}"),
        ("steps", str(summary["steps"])),
        ("loss", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"),
        ("validation loss", "-" if val is None else f"{val:.4f}"),
        ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s (median step {summary['step_time_s'] * 1e3:.1f} ms, "
                       f"{summary['comm_wait_s'] * 1e3:.1f} ms waiting on communication)"),
        ("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB on rank 0"),
    ]
    if "bubble_measured" in summary:
        rows.append(("pipeline bubble", f"{summary['bubble_measured']:.1%} measured (idle share of the last "
                     f"step's schedule, mean over stages) vs {summary['bubble_theory']:.1%} theory; "
                     f"timeline.png"))
    rows += [
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("outputs", f"{out}/ (metrics.jsonl, loss.png, config.json, summary.json, checkpoint/)"),
    ]
    print()
    print(format_table(rows, title="paratrain train: finished"))
    if summary.get("sample"):
        print("\nsampled from the trained model (prompt 'def '):")
        print("    " + summary["sample"].replace("\n", "\n    "))
