"""``paratrain simulate``: an event-level simulation of one training step of a layout."""

from __future__ import annotations

import argparse
import json
import time

from paratrain.cli.plan_args import MAX_SIMULATED_PASSES, add_one_layout_args, build_one_layout, draw, out_path
from paratrain.errors import ConfigError

DESCRIPTION = """\
Simulate one training step of a layout event by event: every pipeline rank runs the real schedule
(GPipe, 1F1B, interleaved, ZB-H1, ZB-V) with per-chunk compute times from the cost model, tensor-parallel
collectives and pipeline messages on links of the device's bandwidth and latency (intra- or
inter-node by the mesh placement), and the data-parallel gradient buckets reduced as the last
backward produces them. Prints the predicted step time, the bubble and the exposed communication,
and draws the timeline (--out). One pipeline is simulated (data-parallel replicas and
tensor-parallel peers run the same timeline), so thousands of devices take well under a second.
No torch, no processes.

Example:  paratrain simulate --model gpt-13b --dp 8 --pp 4 --microbatches 16 --global-batch 256 \\
              --hardware A100-80GB --out step.png"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate one step of a layout event by event, draw its timeline",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_layout_args(p)
    p.add_argument("--out", metavar="PNG", help="draw the simulated timeline of the representative pipeline")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.plan.cost import chunks_per_rank
    from paratrain.plan.hetero import speed_report, with_speeds
    from paratrain.plan.report import fmt_bytes, fmt_seconds
    from paratrain.plan.simulate import simulate_step

    one = build_one_layout(args)
    model, seq_len, layout, global_batch, hw, options, speeds = one
    out = out_path(args.out) if args.out else None
    passes = layout.pp * layout.microbatches * chunks_per_rank(layout)
    if passes > MAX_SIMULATED_PASSES:
        raise ConfigError(f"simulating [{layout}] event by event means {passes:,} forward passes (pp x microbatches "
                          f"x virtual stages) and as many backward ones, more than the {MAX_SIMULATED_PASSES:,} "
                          f"simulated in about a second; `paratrain estimate` with the same flags gives the "
                          f"closed-form step time and bubble.")
    start = time.perf_counter()
    if speeds is not None:
        het = with_speeds(model, layout, hw, global_batch, seq_len, args.precision, options, speeds, simulate=True)
        sim = het.slowest
    else:
        het, sim = None, simulate_step(model, layout, hw, global_batch, seq_len, args.precision, options)
    seconds = time.perf_counter() - start
    if args.json:
        d = sim.to_dict()
        if het is not None:
            d["device_speeds"] = het.to_dict()
        print(json.dumps(d, indent=2))
    else:
        e, t = sim.estimate, sim.estimate.time
        lines = [
            f"{e.model}: {e.params:,} parameters on {e.num_devices} x {hw.name}, layout [{layout}], "
            f"global batch {e.global_batch} x {e.seq_len}",
            f"simulated one pipeline ({layout.pp} rank(s), {sum(len(r) for r in sim.timeline.schedule.ranks):,} "
            f"actions) in {seconds * 1e3:.0f} ms: the {layout.dp} data-parallel replica(s)"
            + (f", {layout.cp} context-parallel rank(s)" if layout.cp > 1 else "")
            + f" and {layout.tp} tensor-parallel peer(s) of each stage run the same timeline",
            "",
            f"predicted step time   {fmt_seconds(sim.step_time_s)}   ({e.tokens_per_s:,.0f} tokens/s, MFU {e.mfu:.1%})",
            f"pipeline bubble       {sim.bubble:.1%} simulated (idle share of the schedule, mean over ranks)",
            f"exposed communication {fmt_seconds(t.tp_comm + t.pp_comm + t.dp_comm + t.cp_comm + t.ep_comm)}: "
            f"tensor-parallel {fmt_seconds(t.tp_comm)}, pipeline syncs {fmt_seconds(t.pp_comm)}, "
            + (f"ring attention (cp) {fmt_seconds(t.cp_comm)}, " if layout.cp > 1 else "")
            + (f"expert all-to-alls (ep) {fmt_seconds(t.ep_comm)}, " if layout.ep > 1 else "")
            + f"data-parallel {fmt_seconds(t.dp_comm)} after the last backward",
            f"slowest rank          compute {fmt_seconds(t.compute)}, idle in the schedule {fmt_seconds(t.bubble)} "
            f"(bubble and waiting for messages), optimizer {fmt_seconds(t.optimizer)}",
            f"memory                {fmt_bytes(e.peak_bytes_per_device)} on the most loaded device "
            f"({'fits' if e.fits else 'DOES NOT FIT'} in {fmt_bytes(e.capacity_bytes)})",
        ]
        if het is not None:
            lines += ["", speed_report(het)]
        print("\n".join(lines))
    if out is not None:
        from paratrain.viz.timeline import plot_timeline

        title = (f"{model.name} [{layout}] on {hw.name}: simulated step {fmt_seconds(sim.step_time_s)}, "
                 f"bubble {sim.bubble:.1%}")
        draw(lambda path: plot_timeline(sim.timeline.to_json(), path, title, unit="s"), out)
        if not args.json:
            print(f"wrote {out}")
    return 0
