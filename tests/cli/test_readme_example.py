"""The README's "Bring your own model" script runs as written, in one process and under
torchrun (2 processes: dp 1 x tp 2), and prints the same losses both ways."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def readme_script() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Bring your own model"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n")]


def run(cmd: list[str], cwd: Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (cwd / "ckpt" / "step-5" / "manifest.json").exists()
    return [float(x) for x in re.findall(r"^step \d loss ([\d.]+)$", r.stdout, re.M)]


def test_readme_example_runs_as_written_alone_and_under_torchrun(tmp_path):
    script = tmp_path / "byo.py"
    script.write_text(readme_script())
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    alone = run([sys.executable, str(script)], tmp_path / "one")
    assert len(alone) == 5 and alone[-1] < alone[0]
    tp2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
              tmp_path / "two")
    assert tp2 == pytest.approx(alone, abs=1.5e-4)  # printed to 4 decimals: one rounding step apart at most
