"""``paratrain calibrate``: measure this machine and write a device profile for estimate/plan."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
Measure this machine's matmul throughput (fp32 with 1 thread and all threads, bf16), memory
bandwidth (a large copy), the time a training step spends outside matmuls (forward + backward of
the tiny and small GPTs) and in the optimizer, the backward's share of forward + backward and
what a zero-bubble schedule's split backward (I + W) costs beyond a plain one, how much slower
those layers run with every core busy and with twice as many processes as cores, and gloo
all-reduce bandwidth and latency between local processes, and write a device profile (JSON).
Use it with `paratrain estimate/plan --hardware profile:PATH` (or --profile PATH). Takes 80-115 s
on 2 cores (77 s and 114 s measured; --quick: about 25 s)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure this machine into a device profile",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="PATH", help="where to write the profile (default: "
                   "~/.cache/paratrain/profile-<hostname>.json)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings (a few seconds; noisier)")
    p.add_argument("--no-collectives", action="store_true",
                   help="skip the 2-process gloo measurement (link figures become placeholders)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.calibrate import calibrate
    from paratrain.plan.hardware import default_profile_path, save_profile

    start = time.perf_counter()
    hw, measurements = calibrate(quick=args.quick, collectives=not args.no_collectives)
    path = save_profile(args.out or default_profile_path(), hw, measurements)
    print(f"device profile written to {path} in {time.perf_counter() - start:.1f} s:\n"
          f"  peak fp32 {hw.peak_fp32_flops / 1e9:.1f} GFLOP/s, bf16 {hw.peak_bf16_flops / 1e9:.1f} GFLOP/s "
          f"(one thread)\n"
          f"  memory {hw.memory_bytes / 2**30:.1f} GiB per process ({hw.cores_per_node} cores); optimizer at "
          f"{hw.memory_bw / 1e9:.2f} GB/s (28 B/param)\n"
          f"  in a model's layers: matmuls at {hw.compute_efficiency:.0%} of that peak, "
          f"{hw.elementwise_s_per_byte * 1e9:.3f} ns per activation byte outside them, "
          f"{hw.layer_overhead_s * 1e3:.2f} ms per layer\n"
          f"  link {hw.intra_node_bw / 1e9:.2f} GB/s, {hw.intra_node_latency_s * 1e6:.1f} us per step; "
          f"reduce-scatter {hw.reduce_scatter_slowdown:.2f}x, all-gather {hw.all_gather_slowdown:.2f}x the ring\n"
          f"use it with: paratrain estimate --hardware profile:{path} ...")
    return 0
