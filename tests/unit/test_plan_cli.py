"""``paratrain estimate | plan | calibrate``: output, exit codes, no torch, speed."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from paratrain.cli import main

ROOT = Path(__file__).resolve().parents[2]
ISSUE_KEYS = ["params", "flops_per_step", "hardware_flops_per_step", "model_state_bytes_per_device",
              "activation_bytes_per_device", "peak_bytes_per_device", "bubble_fraction", "comm_bytes_per_device",
              "step_time_s", "tokens_per_s", "mfu"]
SHAPE = ["--layers", "24", "--hidden", "2048", "--heads", "16", "--vocab", "51200", "--seq-len", "2048"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "estimate", "--model", "gpt2-124m", "--dp", "2", "--pp", "2", "--microbatches", "4",
                 "--global-batch", "16", "--device", "A100-40GB")
    assert list(d)[:len(ISSUE_KEYS)] == ISSUE_KEYS
    assert d["fits"] is True and d["params"] == 124_439_808
    assert set(d["comm_bytes_per_device"]) == {"dp", "tp", "pp"}
    assert d["layout"]["pp"] == 2 and d["hardware"] == "A100-40GB"


def test_estimate_by_shape_and_recompute(capsys: pytest.CaptureFixture[str]) -> None:
    base = run_json(capsys, "estimate", *SHAPE, "--tp", "4", "--global-batch", "4")
    full = run_json(capsys, "estimate", *SHAPE, "--tp", "4", "--global-batch", "4", "--recompute", "full")
    assert full["flops_per_step"] == base["flops_per_step"]
    assert full["hardware_flops_per_step"] > base["hardware_flops_per_step"]
    assert full["activation_bytes_per_device"] < base["activation_bytes_per_device"]


def test_estimate_non_fitting_layout_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "estimate", "--model", "gpt-70b", "--device", "V100-32GB", "--global-batch", "1")
    assert d["fits"] is False and d["peak_bytes_per_device"] > d["capacity_bytes"]
    assert main(["estimate", "--model", "gpt-70b", "--device", "V100-32GB"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_estimate_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model", "gpt2-1.3b", "--dp", "8", "--global-batch", "64", "--microbatches", "8",
                 "--device", "A100-80GB"]) == 0
    out = capsys.readouterr().out
    for word in ("optimizer state", "activations", "usable capacity", "-> fits", "compute", "pipeline bubble",
                 "exposed data-parallel communication", "tokens/s", "MFU", "6 x params x tokens"):
        assert word in out, word


@pytest.mark.parametrize("argv, message", [
    (["estimate", "--model", "gpt2-1.3b", "--tp", "3"], "does not divide"),
    (["estimate", "--model", "nope"], "unknown model"),
    (["estimate", "--layers", "4", "--hidden", "64"], "missing --heads, --vocab, --seq-len"),
    (["estimate", "--model", "tiny", "--device", "TPU-v9"], "unknown device"),
    (["estimate", "--model", "tiny", "--device", "profile:/nonexistent.json"], "does not exist"),
    (["estimate", "--model", "tiny", "--peak-tflops", "10"], "custom device needs"),
    (["estimate", "--model", "tiny", "--dp", "3", "--global-batch", "4"], "not divisible by dp=3"),
    (["estimate", "--model", "tiny", "--efficiency", "2"], "efficiency"),
    (["plan", "--model", "tiny", "--devices", "4"], "--global-batch"),
    (["plan", "--model", "gpt-175b", "--devices", "8", "--global-batch", "8"], "none of the"),
])
def test_user_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("paratrain: error:") and message in err.replace("\n  ", " ")


def test_explicit_hardware_flags(capsys: pytest.CaptureFixture[str]) -> None:
    base = run_json(capsys, "estimate", *SHAPE, "--dp", "16", "--global-batch", "16", "--device", "A100-80GB")
    slow = run_json(capsys, "estimate", *SHAPE, "--dp", "16", "--global-batch", "16", "--device", "A100-80GB",
                    "--inter-bw-gbs", "1", "--no-overlap", "--memory-gib", "40")
    assert slow["step_time_s"] > base["step_time_s"] and slow["capacity_bytes"] < base["capacity_bytes"]
    custom = run_json(capsys, "estimate", *SHAPE, "--peak-tflops", "100", "--memory-gb", "50", "--intra-bw-gbs", "10")
    assert custom["hardware"] == "custom" and custom["capacity_bytes"] == pytest.approx(0.9 * 50e9)


def test_plan_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *SHAPE, "--devices", "16", "--global-batch", "64", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "searched" in out and "why:" in out and " 5. " in out and " 6. " not in out
    d = run_json(capsys, "plan", *SHAPE, "--devices", "16", "--global-batch", "64", "--top", "3", "--tp", "2")
    assert len(d["ranked"]) == 3 and d["considered"] >= d["fitting"] >= 3
    times = [r["step_time_s"] for r in d["ranked"]]
    assert times == sorted(times) and all(r["layout"]["tp"] == 2 and r["fits"] for r in d["ranked"])


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_planning_commands_do_not_import_torch() -> None:
    """Both commands in a fresh interpreter leave no torch (or numpy) in sys.modules. Their speed
    is measured by benchmarks/planner_speed.py, not asserted here: this machine is shared."""
    code = (
        "import sys, io, contextlib\n"
        "from paratrain.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['estimate', '--model', 'gpt-13b', '--tp', '1', '--pp', '4', '--microbatches', '8']) == 0\n"
        "    assert main(['plan', '--model', 'gpt2-1.3b', '--devices', '64', '--global-batch', '512']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_calibrate_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A quick calibration (real measurements, 2 gloo processes) writes a profile that estimate loads."""
    out = tmp_path / "profile.json"
    proc = _run("-m", "paratrain", "calibrate", "--quick", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[5/5]" in proc.stderr and str(out) in proc.stdout
    doc = json.loads(out.read_text())
    hw = doc["hardware"]
    assert hw["peak_fp32_flops"] > 1e8 and hw["intra_node_bw"] > 1e6 and hw["memory_bw"] > 1e8
    # the layers' fit: a matmul rate within the best one, and time beyond the matmuls (memory-bound
    # work or per-layer cost; a noisy quick fit may drop one of the two, never both)
    assert 0 < hw["compute_efficiency"] <= 1 and hw["cores_per_node"] >= 1
    assert hw["elementwise_s_per_byte"] >= 0 and hw["layer_overhead_s"] >= 0
    assert hw["elementwise_s_per_byte"] + hw["layer_overhead_s"] > 0
    assert len(doc["measurements"]["layer_points"]) == 3
    # busy cores: the same layers alone and on every core at once, one figure per rank (a dict's
    # keys once stood in for the seconds: a "500 ms" median of ranks 0 and 1)
    m = doc["measurements"]
    assert isinstance(m["layers_all_cores_s"], list) and len(m["layers_all_cores_s"]) == hw["cores_per_node"]
    assert hw["busy_compute_slowdown"] == pytest.approx(
        max(1.0, statistics.median(m["layers_all_cores_s"]) / m["layers_alone_s"]))
    # twice as many processes as cores: the time beyond the time-sharing (2 x, and busy cores' factor)
    assert hw["oversubscribed_compute_slowdown"] == pytest.approx(max(1.0, m["layers_oversubscribed_s"] / (
        m["layers_oversubscribed_alone_s"] * 2 * hw["busy_compute_slowdown"])))
    # the split backward (zero-bubble I + W) against a plain one, in one process: the profile's
    # figures are the formulas' of the pieces measured
    sb = m["split_backward"]
    assert all(sb[k] > 0 for k in ("F", "B", "F_split", "I", "W"))
    assert hw["backward_share"] == pytest.approx(sb["B"] / (sb["F"] + sb["B"])) and 0 < hw["backward_share"] < 1
    assert hw["split_backward_slowdown"] == pytest.approx(
        max(1.0, (sb["F_split"] + sb["I"] + sb["W"] - sb["F"]) / sb["B"]))
    assert len(doc["measurements"]["allreduce_seconds_busy"]) == len(doc["measurements"]["allreduce_seconds_idle"]) == 3
    # the tp link inside real tp 2 steps: one (bytes, seconds) point per batch, bytes growing with
    # the batch (the activations all-reduced), and the extra the planner adds, >= 0 (calibrate.py)
    points = m["tp_allreduce_points"]
    assert len(points) == 2 and points[0][0] < points[1][0] and all(t > 0 for _, t in points)
    assert hw["tp_extra_s_per_byte"] >= 0 and hw["tp_extra_s_per_call"] >= 0
    assert hw["tp_reduce_scatter_slowdown"] >= 1 and hw["tp_all_gather_slowdown"] >= 1
    d = run_json(capsys, "estimate", "--model", "tiny", "--dp", "2", "--global-batch", "8", "--seq-len", "128",
                 "--precision", "fp32", "--profile", str(out))
    assert d["hardware"].startswith("profile:") and d["step_time_s"] > 0


def test_version_and_one_sub_command_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` answers; a planning command builds only its own parser (not train's, which
    would import the launcher), yet an unknown command still lists every command."""
    from paratrain import __version__
    from paratrain.cli import COMMANDS, build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"paratrain {__version__}"
    sub = next(a for a in build_parser("plan")._actions if a.dest == "command")
    assert list(sub.choices) == ["plan"]
    with pytest.raises(SystemExit) as e:
        main(["plann"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(f"'{c}'" in err for c in COMMANDS)


def test_layout_flag_help_says_what_each_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    """estimate prices dp = 1 without --dp; plan searches every layout field a flag does not pin."""
    import re

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return re.sub(r"\s+", " ", capsys.readouterr().out)

    assert "--dp N data-parallel degree (default: 1)" in help_of("estimate")
    plan = help_of("plan")
    assert "--dp N data-parallel degree (searched; the flag pins it)" in plan and "2 when nothing" not in plan


def test_every_validation_layout_is_a_run_train_accepts_and_the_planner_predicts(tmp_path: Path) -> None:
    """benchmarks/validate_planner.py's layouts (issue 12: at least 20, with bf16, the zero-bubble
    schedules and ZeRO-3 in a pipeline): each is a valid training configuration whose flags
    `paratrain train` parses back into the same layout, and the planner predicts every rank."""
    import argparse
    import importlib.util

    from paratrain.cli import build_parser
    from paratrain.cli.common import build_train_config

    spec = importlib.util.spec_from_file_location("validate_planner", ROOT / "benchmarks" / "validate_planner.py")
    vp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vp)
    assert len(vp.LAYOUTS) >= 20
    assert {"zb-h1", "zb-v"} <= {lay.get("schedule") for lay in vp.LAYOUTS.values()}
    assert any(lay.get("precision") == "bf16" for lay in vp.LAYOUTS.values())
    assert any(lay.get("zero") == 3 and lay.get("pp", 1) > 1 for lay in vp.LAYOUTS.values())
    opts = argparse.Namespace(model="small", global_batch=16, seq_len=128, steps=12, warmup=3,
                              profile=str(tmp_path / "none.json"))
    for name, lay in vp.LAYOUTS.items():
        argv = vp.train_args(lay, opts, tmp_path / name)[3:]  # after `python -m paratrain`
        cfg = build_train_config(build_parser("train").parse_args(argv))
        fields, model, precision = vp.split(lay, opts)
        assert (cfg.model, cfg.precision) == (model, precision), name
        assert all(getattr(cfg.layout, k) == v for k, v in fields.items()), name
        pred = vp.predict(lay, opts)
        assert len(pred["memory_per_rank"]) == cfg.layout.world_size and pred["step_time_s"] > 0, name


def test_validation_drift_probe_reads_the_calibration_and_slows_only_compute(tmp_path: Path) -> None:
    """validate_planner's drift probe: the calibrated seconds of its point come from the profile
    (none without one), and ``scaled(hw, k)`` makes a one-process step (compute only) k times
    slower while a dp 2 step's communication stays as it was."""
    import importlib.util

    from paratrain.config import Layout, TrainConfig
    from paratrain.plan.hardware import get_hardware
    from paratrain.plan.local import predict_run

    spec = importlib.util.spec_from_file_location("validate_planner", ROOT / "benchmarks" / "validate_planner.py")
    vp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vp)
    assert vp.calibrated_probe(str(tmp_path / "none.json")) is None
    profile = tmp_path / "profile.json"
    points = [{"model": "tiny", "batch": 4, "dtype": "float32", "seconds": 9.0},
              {"model": vp.PROBE[0], "batch": vp.PROBE[1], "dtype": "bfloat16", "seconds": 7.0},
              {"model": vp.PROBE[0], "batch": vp.PROBE[1], "dtype": "float32", "seconds": 0.25}]
    profile.write_text(json.dumps({"measurements": {"layer_points": points}}))
    assert vp.calibrated_probe(str(profile)) == 0.25
    hw = get_hardware("cpu").replace(cores_per_node=2, elementwise_s_per_byte=1e-9, layer_overhead_s=1e-3)
    one = TrainConfig(model="tiny", global_batch=4, seq_len=64)
    base, slow = predict_run(one, hw, "").step_time_s, predict_run(one, vp.scaled(hw, 2.0), "").step_time_s
    assert slow == pytest.approx(2 * base, rel=1e-9)
    two = one.replace(layout=Layout(dp=2))
    b2 = predict_run(two, hw, "").to_dict()["step_time_breakdown_s"]
    s2 = predict_run(two, vp.scaled(hw, 2.0), "").to_dict()["step_time_breakdown_s"]
    assert s2["compute"] == pytest.approx(2 * b2["compute"], rel=1e-9)
    assert s2["dp_comm"] == pytest.approx(b2["dp_comm"], rel=1e-9)


def test_validation_two_process_probe_times_the_probe_in_both_processes(monkeypatch) -> None:
    """validate_planner --pair-probe: the probe's forward + backward in two processes started
    together, the mean of what each measured; a failing child is an error, not a figure."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("validate_planner", ROOT / "benchmarks" / "validate_planner.py")
    vp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vp)
    monkeypatch.setattr(vp, "PROBE", ("tiny", 1))  # a cheap point: this checks the plumbing, not the speed
    seconds = vp.probe_pair(0.05)
    assert 0 < seconds < 5
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: real([args[0], "-c", "import sys; sys.exit(3)"], **kw))
    with pytest.raises(RuntimeError, match=r"two-process drift probe failed \(3\)"):
        vp.probe_pair(0.05)
