"""``paratrain schedule``: build, check, simulate and draw a pipeline schedule. No process is
started and torch is not imported: schedules are plain data."""

from __future__ import annotations

import argparse

from paratrain.cli.plan_args import MAX_SIMULATED_PASSES, check_numbers, count, draw, out_path, real
from paratrain.config import SCHEDULES, Layout
from paratrain.errors import ConfigError

DESCRIPTION = """\
Build the per-rank action lists of a pipeline schedule, prove them safe (every send has its
receive in a compatible order, no deadlock, each micro-batch forwarded and backwarded once per
stage, stashed activations within the schedule's bound), simulate them with unit costs and print
the bubble fraction and the peak in-flight activations per rank. With --out, draw the timeline.

examples:
  paratrain schedule --pp 4 --microbatches 8 --schedule 1f1b
  paratrain schedule --pp 4 --microbatches 8 --schedule interleaved --virtual-stages 2 --out t.png
  paratrain schedule --pp 2 --microbatches 4 --schedule gpipe --actions
  paratrain schedule --pp 4 --microbatches 8 --schedule zb-h1 --out zb.png
  paratrain schedule --pp 4 --microbatches 8 --schedule zb-v    # two chunks per rank, V placement

The zero-bubble schedules split each backward into I (input gradient) and W (weight gradients),
each half of --backward-cost (so F = I = W at the default 2)."""


def register(sub: argparse._SubParsersAction) -> None:
    d = Layout()
    p = sub.add_parser("schedule", help="check, simulate and draw a pipeline schedule",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", **count(1, MAX_SIMULATED_PASSES), default=2, help="pipeline ranks (default: 2)")
    p.add_argument("--microbatches", **count(1, MAX_SIMULATED_PASSES), default=4,
                   help="micro-batches per step (default: 4)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"(default: {d.schedule})")
    p.add_argument("--virtual-stages", **count(1, MAX_SIMULATED_PASSES), default=1,
                   help="model chunks per rank, for --schedule interleaved (default: 1)")
    p.add_argument("--backward-cost", **real(0, 1e6, lo_open=True), default=2.0, metavar="X",
                   help="duration of a backward relative to a forward (default: 2)")
    p.add_argument("--out", metavar="PNG", help="draw the simulated timeline to this file")
    p.add_argument("--actions", action="store_true", help="also print every rank's action list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_numbers(args)
    layout = Layout(pp=args.pp, microbatches=args.microbatches, schedule=args.schedule,
                    virtual_stages=args.virtual_stages)
    layout.check_degrees()
    if args.virtual_stages > 1 and args.pp < 2:
        raise ConfigError("--virtual-stages spreads model chunks over pipeline ranks: use --pp 2 or more.")
    p, m, v = args.pp, args.microbatches, layout.virtual_stages  # zb-v: 2
    if p * m * v > MAX_SIMULATED_PASSES:
        from paratrain.core.bubble import bubble_fraction

        raise ConfigError(f"--pp {p} x --microbatches {m} x --virtual-stages {v} = {p * m * v:,} forward passes "
                          f"(and as many backward ones) to build, check and simulate, more than the "
                          f"{MAX_SIMULATED_PASSES:,} done in about a second. The closed form needs none: bubble "
                          f"fraction {bubble_fraction(args.schedule, p, m, v):.4f}. Use fewer ranks or "
                          f"micro-batches to see the schedule itself.")
    out = out_path(args.out) if args.out else None
    from paratrain.core.bubble import bubble_fraction
    from paratrain.core.check import check
    from paratrain.core.schedules import build_schedule
    from paratrain.core.timeline import simulate

    schedule = build_schedule(args.schedule, p, m, v)
    report = check(schedule)
    half = args.backward_cost / 2 / v  # I and W of the zero-bubble schedules
    timeline = simulate(schedule, {"F": 1.0 / v, "B": args.backward_cost / v, "I": half, "W": half})
    theory = bubble_fraction(args.schedule, p, m, v)
    formula = {"interleaved": "(p-1)/(v*m+p-1)", "zb-h1": "1-3m/max(3m+p-1, 2m+2p-1), F=I=W",
               "zb-v": "1-6m/max(6m+p-1, 4p+2m-1), F=I=W per chunk"}.get(args.schedule, "(p-1)/(m+p-1)")
    print(f"schedule {args.schedule}: pp={p}, microbatches={m}, virtual stages={v} -- checked: no deadlock, "
          f"transfers matched in order, every micro-batch forwarded and backwarded once per stage")
    split = " = I + W" if args.schedule.startswith("zb") else ""
    print(f"bubble fraction: {timeline.bubble:.4f} simulated (forward 1, backward{split} {args.backward_cost:g} "
          f"per stage), {theory:.4f} theory {formula}")
    unit = "micro-batch activations of one stage" if v == 1 else f"micro-batch chunks, 1/{v} of a stage each"
    peaks = ", ".join(f"rank {r}: {n}" for r, n in enumerate(report.peak_in_flight))
    bounds = ", ".join(map(str, schedule.in_flight_bound))
    print(f"peak in-flight activations ({unit}): {peaks}  (bound {bounds})")
    if args.actions:
        for r, acts in enumerate(schedule.ranks):
            print(f"rank {r}: {' '.join(map(str, acts))}")
    if out is not None:
        from paratrain.viz.timeline import plot_timeline

        title = (f"{args.schedule}: pp={p}, m={m}" + (f", v={v}" if v > 1 else "")
                 + f" -- bubble {timeline.bubble:.1%} (theory {theory:.1%})")
        draw(lambda path: plot_timeline(timeline.to_json(), path, title, unit="one stage's forward = 1"), out)
        print(f"wrote {out}")
    return 0
