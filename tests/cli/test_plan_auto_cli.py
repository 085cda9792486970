"""`paratrain train --plan auto`: search what the runtime implements, train the winner, compare."""

from __future__ import annotations

import json

import pytest

from paratrain.config import TrainConfig
from paratrain.plan import local
from paratrain.plan.hardware import get_hardware
from tests.cli.test_train_cli import paratrain

CPU = get_hardware("cpu").replace(cores_per_node=2)


def test_plan_auto_trains_the_choice_and_compares(tmp_path):
    proc = paratrain("train", "--plan", "auto", "--nproc", "2", "--profile", str(tmp_path / "none.json"),
                     "--model", "tiny", "--steps", "4", "--global-batch", "8", "--seq-len", "32", "--eval-every", "0",
                     "--sample-tokens", "0", "--no-checkpoint", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "catalog device 'cpu'" in out and "chose [" in out and "why:" in out
    assert "ms measured (median) vs" in out and "rank 1:" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["nproc"] == 2 and cfg["measure_memory"] is True
    pred = summary["predicted"]
    assert pred["step_time_s"] > 0 and len(pred["memory_per_rank"]) == len(summary["memory_per_rank"]) == 2
    for got, want in zip(summary["memory_per_rank"], pred["memory_per_rank"]):
        assert sum(got.values()) == pytest.approx(sum(want.values()), rel=0.01)


def test_auto_layout_respects_runtime_support(monkeypatch):
    """--plan auto trains only what the runtime implements (config.runtime_implements, the one
    function TrainConfig.validate also asks): ZeRO-3 with a pipeline when pinned; and whatever that
    function refuses, the search never offers."""
    cfg = TrainConfig(model="tiny", global_batch=8, seq_len=32)
    plan = local.auto_layout(cfg, 4, CPU.replace(devices_per_node=4), "test")
    assert plan.layout.world_size == 4
    pinned = local.auto_layout(cfg, 4, CPU, "test", fixed={"zero": 3, "pp": 2}).layout
    assert (pinned.zero, pinned.pp) == (3, 2)
    assert local.auto_layout(cfg, 4, CPU, "test", fixed={"zero": 3}).layout.zero == 3  # pp > 1 allowed
    assert local.auto_layout(cfg, 4, CPU, "test", fixed={"zero": 2}).layout.zero == 2
    monkeypatch.setattr(local, "runtime_implements", lambda layout, model=None: layout.zero == 0 and layout.pp == 1)
    plan = local.auto_layout(cfg, 4, CPU, "test")
    assert plan.layout.zero == 0 and all(lay.zero == 0 and lay.pp == 1 for lay, _ in plan.candidates)


def test_pinned_flags_and_profile_choice(tmp_path):
    cfg = TrainConfig(model="tiny", global_batch=8, seq_len=32)
    plan = local.auto_layout(cfg, 4, CPU, "test", fixed={"tp": 2})
    assert plan.layout.tp == 2 and plan.layout.dp * plan.layout.pp == 2
    hw, source = local.local_hardware(4, tmp_path / "missing.json")
    assert hw.name == "cpu" and "catalog" in source and hw.devices_per_node >= 4 and hw.cores_per_node >= 1


def test_output_into_a_closed_pipe_is_quiet(tmp_path):
    """`paratrain plan --top 0 | head -1`: the reader leaves early; no traceback, exit 141 (SIGPIPE's)."""
    import os
    import subprocess
    import sys

    from tests.cli.test_train_cli import REPO

    cmd = [sys.executable, "-m", "paratrain", "plan", "--model", "gpt2-350m", "--devices", "16", "--device",
           "H100-80GB", "--global-batch", "256", "--top", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert first.startswith(b"gpt2-350m") and "Traceback" not in stderr and stderr == ""
