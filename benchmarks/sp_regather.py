"""What sequence parallelism's regather costs (issue 13, part 3): the qkv, fc1 and LM-head
linears save their input's sequence slice and all-gather it again in backward
(``tp_ops.GatheredLinearSP``) instead of keeping the gathered input. Same model, same batches,
tp 2 with SP, the two ways alternating A/B in one run; medians of the steady steps, and the
activation peak of one step (``ActivationMeter``).

    python benchmarks/sp_regather.py [--model small] [--seq-len 256] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(cfg, regather: bool) -> dict:  # noqa: ANN001 - runs on each rank (paratrain.launch)
    import torch

    from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed
    from paratrain.parallel.memory import ActivationMeter
    from paratrain.parallel.tensor import ColumnParallelLinear
    from paratrain.train import setup, train_step

    env = RankEnv.from_env()
    set_threads(1, env.local_world_size)
    init_distributed(env, "cpu", 120)
    try:
        s = setup(cfg, env, torch.device("cpu"))
        for m in s.pm.module.modules():
            if isinstance(m, ColumnParallelLinear):
                m.regather = regather
        times = [train_step(s, step)["step_time_s"] for step in range(1, cfg.steps)]
        with ActivationMeter(s.pm.weight_tensors()) as meter:
            train_step(s, cfg.steps)
        return {"step_s": statistics.median(times[2:] or times), "acts": meter.peak_bytes}
    finally:
        shutdown_distributed(True)


def main() -> None:
    from paratrain.config import Layout
    from tests.common import BASE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import importlib
    import os

    from paratrain.launch import launch

    # each rank imports the measuring function by name: this file as a module, the repo on its path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    fn = importlib.import_module("benchmarks.sp_regather").measure
    cfg = BASE.replace(model=args.model, seq_len=args.seq_len, global_batch=args.global_batch, steps=args.steps,
                       layout=Layout(tp=2, sequence_parallel=True))
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeats):
        for regather in (False, True):  # A/B alternating
            runs[regather].append(launch(fn, (cfg, regather), 2)[0])
    keep = {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    acts = {k: v[0]["acts"] for k, v in runs.items()}
    print(f"{args.model}, tp 2 + SP, global batch {args.global_batch} x {args.seq_len} tokens, "
          f"medians of {args.repeats} A/B runs")
    print(f"{'saved input':<24} {'step s':>8} {'activations MiB':>16}")
    print(f"{'gathered (before)':<24} {keep[False]:>8.4f} {acts[False] / 2**20:>16.2f}")
    print(f"{'slice, regathered':<24} {keep[True]:>8.4f} {acts[True] / 2**20:>16.2f}")
    print(f"step time x{keep[True] / keep[False]:.3f}, activations x{acts[True] / acts[False]:.3f}")


if __name__ == "__main__":
    main()
