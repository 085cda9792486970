"""How fast the planning commands answer (a benchmark, not a test: this machine is shared).

    python benchmarks/planner_speed.py

Runs `paratrain estimate`, `plan` and `simulate` in fresh interpreters (start-up included), and a
512-device search in-process, several times each; prints the medians. The issue's bar: each
answers in well under a second, so thousands of estimates can be scripted.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMANDS = {
    "estimate gpt-13b pp4": ["estimate", "--model", "gpt-13b", "--pp", "4", "--microbatches", "8"],
    "plan gpt2-1.3b on 64 devices": ["plan", "--model", "gpt2-1.3b", "--devices", "64", "--global-batch", "512"],
    "simulate gpt-175b on 4096 devices": ["simulate", "--model", "gpt-175b", "--vocab", "51200", "--dp", "32",
                                          "--pp", "16", "--tp", "8", "--microbatches", "64", "--sequence-parallel",
                                          "--recompute", "selective", "--global-batch", "2048",
                                          "--device", "H100-80GB"],
}


def main(repeats: int = 5) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    print(f"{'what':<40} {'median s':>9}  (of {repeats}, interpreter start-up included)")
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "paratrain", *argv], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"{name:<40} {statistics.median(times):>9.3f}")
    from paratrain.models.configs import ModelConfig
    from paratrain.plan.hardware import get_hardware
    from paratrain.plan.search import search

    model = ModelConfig("m39", num_layers=48, hidden=8192, num_heads=64, vocab_size=51200, max_seq_len=2048)
    times, considered = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        considered = search(model, 512, get_hardware("A100-80GB"), 1536, 2048).considered
        times.append(time.perf_counter() - t0)
    print(f"{f'search, 512 devices ({considered:,} layouts)':<40} {statistics.median(times):>9.3f}  (in-process)")


if __name__ == "__main__":
    main()
