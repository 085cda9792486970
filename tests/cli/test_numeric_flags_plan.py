"""Every numeric flag of the planning commands (estimate, plan, simulate, schedule; calibrate has
none) with 0, -1, nan, inf and a huge value: exit 0 with a finite answer, or exit 2 with a message
naming the flag as typed; never a traceback, always within seconds. Then the unbounded cases of
issue 15 (item 10), the --out checks (item 11) and --hardware (issue 9 part 5)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from paratrain.cli import build_parser, main
from tests.cli.test_train_cli import REPO

BASE = {  # a quick, valid call of each command, to which one flag is added
    "estimate": ["estimate", "--model", "tiny", "--hardware", "H100-80GB", "--json"],
    "plan": ["plan", "--model", "tiny", "--devices", "4", "--global-batch", "8", "--hardware", "cpu", "--top", "3",
             "--json"],
    "simulate": ["simulate", "--model", "tiny", "--hardware", "H100-80GB", "--json"],
    "schedule": ["schedule"],
}
VALUES = ("0", "-1", "nan", "inf", "1000000000000000000")
LISTS = ("--stage-layers", "--stage-speeds", "--device-speeds")  # comma-separated numbers


def _numeric_flags(command: str) -> list[str]:
    """The flags of ``command`` that take a number (read from the parser: none is forgotten)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = []
    for action in sub._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        flag = action.option_strings[0]
        kind = getattr(action.type, "__name__", "")
        if action.type in (int, float) or kind in ("integer", "number") or flag in LISTS:
            flags.append(flag)
    return flags


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _finite(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


CASES = [(cmd, flag, value) for cmd in BASE for flag in _numeric_flags(cmd) for value in VALUES]


def test_the_table_covers_the_flags() -> None:
    flags = {(cmd, flag) for cmd, flag, _ in CASES}
    for cmd, flag in [("estimate", "--global-batch"), ("estimate", "--seq-len"), ("plan", "--devices"),
                      ("plan", "--top"), ("plan", "--headroom"), ("simulate", "--memory-gib"),
                      ("estimate", "--efficiency"), ("schedule", "--backward-cost"), ("simulate", "--dp"),
                      ("plan", "--device-speeds"), ("estimate", "--devices-per-node")]:
        assert (cmd, flag) in flags
    assert len(CASES) > 400


@pytest.mark.parametrize("cmd,flag,value", CASES)
def test_numeric_flag(cmd: str, flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    code, out, err = _run(BASE[cmd] + [flag, value], capsys)
    assert time.perf_counter() - start < 5
    assert code in (0, 2), (code, err)
    if code == 2:
        assert flag in err, err  # the flag as the user typed it
    elif cmd == "schedule":
        assert "bubble fraction" in out and "nan" not in out and "inf" not in out
    else:
        assert _finite(json.loads(out)), out  # JSON without NaN / Infinity


@pytest.mark.parametrize("argv,flag", [
    (["estimate", "--model", "tiny", "--global-batch", "0"], "--global-batch"),  # silently 1 before
    (["estimate", "--model", "tiny", "--seq-len", "0"], "--seq-len"),  # silently 256 before
    (["plan", "--model", "tiny", "--devices", "0", "--global-batch", "8"], "--devices"),  # planned for 8
    (["estimate", "--model", "tiny", "--efficiency", "nan"], "--efficiency"),
    (["plan", "--model", "tiny", "--global-batch", "8", "--dp", "0"], "--dp"),
])
def test_values_that_were_replaced_are_refused(argv: list[str], flag: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(argv, capsys)
    assert code == 2 and flag in err


@pytest.mark.parametrize("argv,ok", [
    (["plan", "--model", "tiny", "--global-batch", "1000000000", "--devices", "8", "--top", "3"], True),  # 176 s
    (["simulate", "--model", "gpt-175b", "--pp", "8", "--microbatches", "1000000", "--global-batch", "1000000"],
     False),  # MemoryError
    (["schedule", "--pp", "1000", "--microbatches", "100000"], False),  # MemoryError
    (["schedule", "--pp", "10000000", "--microbatches", "1"], False),  # > 300 s, 5 GB
    (["schedule", "--pp", "64", "--microbatches", "1024"], False),  # under each flag's limit, over their product's
])
def test_planning_cost_is_bounded(argv: list[str], ok: bool, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    code, out, err = _run(argv, capsys)
    assert time.perf_counter() - start < 10
    assert code == (0 if ok else 2), err
    if not ok:
        assert "--pp" in err or "--microbatches" in err or "forward passes" in err


def test_a_search_too_large_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A batch with thousands of divisors on many devices: the count of layouts, not the time, says no."""
    code, _, err = _run(["plan", "--model", "gpt2-1.3b", "--devices", "64", "--global-batch", "1102701600"], capsys)
    assert code == 2 and "layouts" in err and "--microbatches" in err


def test_out_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    code, out, err = _run(["simulate", "--model", "tiny", "--out", "d"], capsys)
    assert code == 2 and "folder" in err and out == ""  # refused before any result
    assert list(tmp_path.iterdir()) == [tmp_path / "d"]
    code, out, _ = _run(["simulate", "--model", "tiny", "--out", "e"], capsys)
    assert code == 0 and out.strip().endswith("wrote e.png") and (tmp_path / "e.png").stat().st_size > 0
    for cmd in (["schedule"], ["simulate", "--model", "tiny"]):
        code, out, err = _run(cmd + ["--out", "/proc/x.png"], capsys)
        assert code == 2 and "--out /proc/x.png" in err and out == ""
    code, _, err = _run(["schedule", "--out", "t.xyz"], capsys)
    assert code == 2 and ".png" in err


def test_hardware_flag_and_its_old_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    new = _run(["estimate", "--model", "tiny", "--hardware", "A100-80GB", "--json"], capsys)
    old = _run(["estimate", "--model", "tiny", "--device", "A100-80GB", "--json"], capsys)
    assert new[0] == old[0] == 0 and new[1] == old[1] and json.loads(new[1])["hardware"] == "A100-80GB"
    code, out, _ = _run(["plan", "--help"], capsys)
    assert code == 0 and "--hardware NAME, --device NAME" in out and "old spelling" in out
    assert "fp32" in out and "train" in out  # why the precision defaults differ


@pytest.mark.parametrize("argv,flag", [
    (["plan", "--model", "tiny", "--devices", "0", "--global-batch", "8"], "--devices"),
    (["schedule", "--out", "/proc/x.png"], "--out"),
    (["estimate", "--model", "tiny", "--headroom", "inf"], "--headroom"),
])
def test_exit_code_in_a_fresh_process(argv: list[str], flag: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "paratrain", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert flag in proc.stderr
