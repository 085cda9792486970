"""``paratrain schedule``: build, check, simulate and draw a pipeline schedule. No process is
started and torch is not imported: schedules are plain data."""

from __future__ import annotations

import argparse

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
  paratrain schedule --pp 2 --microbatches 4 --schedule gpipe --actions"""


def register(sub: argparse._SubParsersAction) -> None:
    d = Layout()
    p = sub.add_parser("schedule", help="check, simulate and draw a pipeline schedule",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks (default: 2)")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (default: 4)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"(default: {d.schedule})")
    p.add_argument("--virtual-stages", type=int, default=1,
                   help="model chunks per rank, for --schedule interleaved (default: 1)")
    p.add_argument("--backward-cost", type=float, default=2.0, metavar="X",
                   help="duration of a backward relative to a forward (default: 2)")
    p.add_argument("--out", metavar="PNG", help="draw the simulated timeline to this file")
    p.add_argument("--actions", action="store_true", help="also print every rank's action list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    Layout(pp=args.pp, microbatches=args.microbatches, schedule=args.schedule,
           virtual_stages=args.virtual_stages).check_degrees()
    if args.virtual_stages > 1 and args.pp < 2:
        raise ConfigError("--virtual-stages spreads model chunks over pipeline ranks: use --pp 2 or more.")
    if not args.backward_cost > 0:
        raise ConfigError(f"--backward-cost must be > 0, got {args.backward_cost}.")
    from paratrain.core.bubble import bubble_fraction
    from paratrain.core.check import check
    from paratrain.core.schedules import build_schedule
    from paratrain.core.timeline import simulate

    p, m, v = args.pp, args.microbatches, args.virtual_stages
    schedule = build_schedule(args.schedule, p, m, v)
    report = check(schedule)
    timeline = simulate(schedule, {"F": 1.0 / v, "B": args.backward_cost / v})
    theory = bubble_fraction(args.schedule, p, m, v)
    formula = "(p-1)/(v*m+p-1)" if args.schedule == "interleaved" else "(p-1)/(m+p-1)"
    print(f"schedule {args.schedule}: pp={p}, microbatches={m}, virtual stages={v} -- checked: no deadlock, "
          f"transfers matched in order, every micro-batch forwarded and backwarded once per stage")
    print(f"bubble fraction: {timeline.bubble:.4f} simulated (forward 1, backward {args.backward_cost:g} per "
          f"stage), {theory:.4f} theory {formula}")
    unit = "micro-batch activations of one stage" if v == 1 else f"micro-batch chunks, 1/{v} of a stage each"
    peaks = ", ".join(f"rank {r}: {n}" for r, n in enumerate(report.peak_in_flight))
    bounds = ", ".join(map(str, schedule.in_flight_bound))
    print(f"peak in-flight activations ({unit}): {peaks}  (bound {bounds})")
    if args.actions:
        for r, acts in enumerate(schedule.ranks):
            print(f"rank {r}: {' '.join(map(str, acts))}")
    if args.out:
        from paratrain.viz.timeline import plot_timeline

        title = (f"{args.schedule}: pp={p}, m={m}" + (f", v={v}" if v > 1 else "")
                 + f" -- bubble {timeline.bubble:.1%} (theory {theory:.1%})")
        plot_timeline(timeline.to_json(), args.out, title, unit="one stage's forward = 1")
        print(f"wrote {args.out}")
    return 0
