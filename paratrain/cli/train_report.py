"""What ``paratrain train`` prints when a run ends: the finished table (and loss plot), one line
for an interrupted run, a failed rank's error and traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paratrain.cli.common import write_json
from paratrain.cli.rundir import LOCK_NAME
from paratrain.metrics import format_table


def _listing(out: Path) -> list[str]:
    """What the run wrote: files, and folders with a trailing slash."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != LOCK_NAME)


def interrupted_line(e: Any, out: Path, steps: int) -> str:
    """One line for a run stopped by a signal: how far it got and where its outputs are."""
    metrics = out / "metrics.jsonl"
    done = len(metrics.read_text(encoding="utf-8").splitlines()) if metrics.exists() else 0
    files = ", ".join(_listing(out)) if out.is_dir() else "nothing"
    latest = out / "checkpoints" / "latest"
    if latest.is_file():
        saved = latest.read_text(encoding="utf-8").strip()
        return (f"paratrain train: interrupted by {e.name} after {done} of {steps} steps; the latest checkpoint is "
                f"{out / 'checkpoints' / saved}; continue with: paratrain train --resume {out}")
    return (f"paratrain train: interrupted by {e.name} after {done} of {steps} steps; the outputs so far are in "
            f"{out}/ ({files}); no summary or checkpoint was written.")


def predicted_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Predicted vs measured step time and memory per rank (--plan auto)."""
    pred = summary.get("predicted")
    if not pred:
        return []
    measured = summary["step_time_s"]
    rows = [("step time", f"{measured * 1e3:.1f} ms measured (median) vs {pred['step_time_s'] * 1e3:.1f} ms predicted "
             f"({pred['step_time_s'] / measured - 1:+.1%}) on {pred['hardware']}")]
    mem = summary.get("memory_per_rank") or []
    cells = []
    for rank, (m, p) in enumerate(zip(mem, pred["memory_per_rank"])):
        if m is None:
            continue
        got, want = sum(m.values()), sum(p.values())
        cells.append(f"rank {rank}: {got / 2**20:.1f} vs {want / 2**20:.1f} MiB ({want / got - 1:+.1%})")
    if cells:
        rows.append(("memory per rank", "; ".join(cells) + " (measured vs predicted: model states + "
                     "saved activations)"))
    return rows


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
    code = "exit code not seen" if e.exitcode is None else f"exit code {e.exitcode}"
    lines = [f"paratrain: error: rank {e.rank} failed ({code}): {e.message}"]
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
    resumed = (summary.get("resumed_from") or {}).get("step")
    if resumed is not None and records:  # the whole run, not only the part since the resume
        summary.update(first_loss=records[0]["loss"], steps=len(records))
    plot_loss(records, out / "loss.png", title=f"{summary['model']} [{summary['layout']}]",
              resumed_at=None if resumed is None else [resumed])
    since = "" if resumed is None else f"; since the resume at step {resumed}"
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "sample"})
    val = summary["val_loss"]
    rows = [
        ("model", f"{summary['model']} ({summary['params']:,} parameters)"),
        ("layout", f"{summary['layout']} on {summary['world_size']} process(es), {summary['device']}"),
        ("steps", str(summary["steps"]) + ("" if resumed is None else f" (resumed after step {resumed})")),
        ("loss", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"),
        ("validation loss", "-" if val is None else f"{val:.4f}"),
        ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s (median step {summary['step_time_s'] * 1e3:.1f} ms, "
                       f"{summary['comm_wait_s'] * 1e3:.1f} ms waiting on communication{since})"),
        ("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB on rank 0"),
    ]
    rows += predicted_rows(summary)
    if "bubble_measured" in summary:
        rows.append(("pipeline bubble", f"{summary['bubble_measured']:.1%} measured (idle share of the last "
                     f"step's schedule, mean over stages) vs {summary['bubble_theory']:.1%} theory; "
                     f"timeline.png"))
    rows += [
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("outputs", f"{out}/ ({', '.join(_listing(out))})"),
    ]
    print()
    print(format_table(rows, title="paratrain train: finished"))
    if summary.get("sample"):
        print("\nsampled from the trained model (prompt 'def '):")
        print("    " + summary["sample"].replace("\n", "\n    "))
