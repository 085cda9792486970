"""How fast the planning commands answer (a benchmark, not a test: this machine is shared).

    python benchmarks/planner_speed.py

Runs `paratrain estimate`, `plan` and `simulate` in fresh interpreters (start-up included), and a
512-device search in-process, several times each; prints the medians, wall clock and CPU (the CPU
seconds are what a shared machine does not inflate). The bars of issue 9 (part 7), end to end:
`plan` for gpt2-1.3b under 0.3 s on 64 devices and under 1 s on 512.
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
    "plan gpt2-1.3b on 64 devices (< 0.3 s)": ["plan", "--model", "gpt2-1.3b", "--devices", "64",
                                               "--global-batch", "512"],
    "plan gpt2-1.3b on 512 devices (< 1 s)": ["plan", "--model", "gpt2-1.3b", "--devices", "512",
                                              "--global-batch", "512"],
    "simulate gpt-175b on 4096 devices": ["simulate", "--model", "gpt-175b", "--vocab", "51200", "--dp", "32",
                                          "--pp", "16", "--tp", "8", "--microbatches", "64", "--sequence-parallel",
                                          "--recompute", "selective", "--global-batch", "2048",
                                          "--hardware", "H100-80GB"],
}


def main(repeats: int = 5) -> None:
    # As a user's installation runs: with compiled bytecode cached (pip writes it; an editable
    # install on the first import). Some sandboxes set PYTHONDONTWRITEBYTECODE, which makes every
    # start compile paratrain's sources again (~0.04 s here); one untimed run per command warms it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(REPO)
    print(f"{'what':<42} {'median s':>9} {'CPU s':>7}  (of {repeats}, interpreter start-up included)")
    for name, argv in COMMANDS.items():
        times, cpu = [], []
        subprocess.run([sys.executable, "-m", "paratrain", *argv], env=env, check=True, capture_output=True)
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), os.times()
            subprocess.run([sys.executable, "-m", "paratrain", *argv], env=env, check=True, capture_output=True)
            c1 = os.times()
            times.append(time.perf_counter() - t0)
            cpu.append(c1.children_user + c1.children_system - c0.children_user - c0.children_system)
        print(f"{name:<42} {statistics.median(times):>9.3f} {statistics.median(cpu):>7.3f}")
    from paratrain.models.configs import ModelConfig
    from paratrain.plan.hardware import get_hardware
    from paratrain.plan.search import search

    model = ModelConfig("m39", num_layers=48, hidden=8192, num_heads=64, vocab_size=51200, max_seq_len=2048)
    for top, what in ((10, "top 10"), (0, "every layout ranked")):
        times, considered = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            considered = search(model, 512, get_hardware("A100-80GB"), 1536, 2048, top=top).considered
            times.append(time.perf_counter() - t0)
        label = f"search, 512 devices ({considered:,} layouts), {what}"
        print(f"{label:<42} {statistics.median(times):>9.3f}  (in-process)")


if __name__ == "__main__":
    main()
