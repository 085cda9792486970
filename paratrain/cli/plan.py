"""``paratrain plan``: search every valid layout of N devices and rank those that fit."""

from __future__ import annotations

import argparse
import json
import time

from paratrain.cli.common import LAYOUT_FIELDS, add_layout_args
from paratrain.cli.plan_args import (
    MAX_DEVICES,
    add_cost_args,
    add_hardware_args,
    add_model_args,
    build_hardware,
    build_model,
    build_options,
    count,
    given_layout_fields,
    parse_speeds,
)
from paratrain.errors import ConfigError

DESCRIPTION = """\
Search every valid layout (dp x pp x cp x tp, ep for a mixture of experts, ZeRO stage,
micro-batches, schedule, virtual stages, sequence parallelism, recomputation) of N devices,
predict each one's memory and step time, drop those that do not fit and rank the rest by step
time (then memory). Layout flags pin that part of the layout. No torch, no processes.

Example:  paratrain plan --model gpt-13b --devices 64 --hardware H100-80GB --global-batch 512"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="find the fastest layout that fits",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--devices", **count(1, MAX_DEVICES),
                   help="devices to plan for (default: one node of --hardware)")
    p.add_argument("--top", **count(0, 2**31), default=10, help="layouts to show (0 = all; default: %(default)s)")
    p.add_argument("--allow-cross-node-tp", action="store_true",
                   help="also consider tensor parallelism wider than one node")
    add_layout_args(p)
    for action in p._actions:  # plan searches the layout: a flag pins its part instead of a default
        if action.help and action.dest in LAYOUT_FIELDS and "(default:" in action.help:
            action.help = action.help[:action.help.index("(default:")] + "(searched; the flag pins it)"
    add_cost_args(p, batch_help="sequences per optimizer step over all ranks (required)")
    add_hardware_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.config import runtime_implements
    from paratrain.plan.hardware import GiB
    from paratrain.plan.report import plan_json, plan_report
    from paratrain.plan.search import search

    model, seq_len = build_model(args)
    fixed = given_layout_fields(args)
    hw = build_hardware(args, args.precision)
    if args.global_batch is None:
        raise ConfigError("plan needs --global-batch B (sequences per optimizer step over all devices).")
    speeds = parse_speeds(args.device_speeds, hw, args.precision) if args.device_speeds else None
    devices = args.devices or (len(speeds) if speeds else hw.devices_per_node)
    if speeds is not None and len(speeds) != devices:
        raise ConfigError(f"--device-speeds gives {len(speeds)} devices, --devices {devices}; give one speed "
                          f"per device.")
    start = time.perf_counter()
    # a mixture of experts: only what `paratrain train` runs (expert_rules.expert_refusal); a dense
    # model's every valid layout is run
    keep = (lambda lay: runtime_implements(lay, model)) if model.num_experts else None
    result = search(model, devices, hw, args.global_batch, seq_len, args.precision, build_options(args),
                    fixed=fixed, allow_cross_node_tp=args.allow_cross_node_tp,
                    device_speeds=speeds, keep=keep, top=args.top)
    seconds = time.perf_counter() - start
    if not result.ranked:
        worst = result.smallest_unfit
        assert worst is not None
        raise ConfigError(
            f"none of the {result.considered:,} layouts of {model.name} on {devices} x {hw.name} fits: the least "
            f"memory-hungry one [{worst.layout}] needs {worst.peak_bytes_per_device / GiB:.1f} GiB per device, "
            f"more than the {worst.capacity_bytes / GiB:.1f} GiB usable. Use more devices (--devices), a smaller "
            f"--global-batch or --seq-len, or a device with more memory.")
    if args.json:
        print(json.dumps(plan_json(result, hw, args.top), indent=2))
    else:
        print(plan_report(result, hw, seconds, args.top))
    return 0
