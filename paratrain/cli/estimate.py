"""``paratrain estimate``: the predicted memory, FLOPs, communication and step time of one layout."""

from __future__ import annotations

import argparse
import json

from paratrain.cli.plan_args import add_one_layout_args, build_one_layout

DESCRIPTION = """\
Predict, for one layout of one model on one kind of device: parameters, FLOPs per step, model
states and activations per device against the device's memory, bytes each device sends, the
pipeline bubble, and the step time split into compute / communication / bubble, with tokens/s and
MFU. A layout that does not fit is still answered ("fits": false); an impossible one (e.g. tp not
dividing the heads) is an error. No torch, no processes: answers in milliseconds.

Example:  paratrain estimate --model gpt2-1.3b --dp 8 --global-batch 64 --hardware A100-80GB"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="predict memory, communication and step time of one layout",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_layout_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.plan.cost import estimate
    from paratrain.plan.report import estimate_report

    one = build_one_layout(args)
    model, layout, hw = one.model, one.layout, one.hardware
    plan = None
    if one.speeds is None:
        est = estimate(model, layout, hw, one.global_batch, one.seq_len, args.precision, one.options)
    else:
        from paratrain.plan.hetero import speed_report, with_speeds

        plan = with_speeds(model, layout, hw, one.global_batch, one.seq_len, args.precision, one.options, one.speeds)
        est = plan.slowest
    if args.json:
        print(json.dumps(dict(est.to_dict(), **({"device_speeds": plan.to_dict()} if plan else {})), indent=2))
    else:
        text = estimate_report(est, hw)
        if plan:  # the devices differ: the header names the reference device the speeds are relative to
            speeds = ", ".join(f"{x:.3g}" for x in one.speeds)
            text = text.replace(f" x {hw.name}\n", f" devices of speeds {speeds} relative to {hw.name} (MFU and "
                                f"HFU: of {hw.name}'s peak)\n", 1) + f"\n\n{speed_report(plan)}"
        print(text)
    return 0
