"""Every script in examples/ runs and prints that it matches the single-process result.

All of them in one fresh interpreter (torch imported once; each example forks its ranks), as a
learner would run them one after the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_example_matches_the_single_process_result():
    import importlib.util

    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert len(scripts) >= 5, scripts
    hf = importlib.util.find_spec("transformers") is not None  # 05_hugging_face.py needs paratrain[hf]
    if not hf:
        scripts.remove("05_hugging_face.py")
    code = ("import runpy, sys\n"
            "sys.path.insert(0, '.')\n"
            f"for name in {scripts!r}:\n"
            "    print('=== ' + name, flush=True)\n"
            "    runpy.run_path(name, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=EXAMPLES, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in scripts:
        assert f"=== {name}" in proc.stdout
    assert proc.stdout.count("(matches)") == (16 if hf else 12) and "DIFFERS" not in proc.stdout, proc.stdout
