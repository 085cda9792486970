"""Every numeric flag of `train` and `bench` with 0, -1, nan, inf and a huge value (issue 15, item 7).

Each answer is either acceptance (the value reaches the config as given) or exit 2 with a message
naming the flag as the user typed it, never a traceback, within a few seconds. Checked in-process
(parsing and every pre-launch check, no corpus, no process) for the whole table, and through a
real `paratrain` process for a few rows, for the exit code and the absence of a traceback.
"""

from __future__ import annotations

import math
import time

import pytest

from paratrain.cli import build_parser
from paratrain.errors import ConfigError
from tests.cli.test_train_cli import paratrain

VALUES = ("0", "-1", "nan", "inf", "huge")
HUGE_INT, HUGE_FLOAT = str(10**18), "1e30"

# flag -> (values accepted, extra args the flag needs, int or float). Everything else must be refused.
TRAIN = {
    "--nproc": (set(), [], int),
    "--dp": (set(), [], int),
    "--pp": (set(), [], int),
    "--tp": (set(), [], int),
    "--cp": (set(), [], int),
    "--zero": ({"0"}, [], int),
    "--microbatches": (set(), [], int),
    "--virtual-stages": (set(), [], int),
    "--stage-layers": (set(), ["--pp", "2"], int),
    "--stage-speeds": ({"huge"}, ["--pp", "2"], float),
    "--seq-len": (set(), [], int),
    "--global-batch": (set(), [], int),
    "--dropout": ({"0"}, [], float),
    "--steps": ({"huge"}, [], int),
    "--seed": ({"0", "huge"}, [], int),
    "--lr": ({"huge"}, [], float),  # a finite lr that diverges is stopped at run time (item 8)
    "--warmup-steps": ({"0", "huge"}, [], int),
    "--min-lr-ratio": ({"0"}, [], float),
    "--weight-decay": ({"0", "huge"}, [], float),
    "--grad-clip": ({"0", "huge"}, [], float),
    "--threads": ({"0"}, [], int),
    "--bucket-mb": ({"huge"}, [], float),
    "--timeout": (set(), [], float),
    "--eval-every": ({"0", "huge"}, [], int),
    "--eval-batches": ({"huge"}, [], int),
    "--sample-tokens": ({"0", "huge"}, [], int),
    "--vocab-size": ({"0"}, [], int),  # 0: the model's own vocabulary (a prepared --data: its tokenizer's)
}
BENCH = {
    "--global-batch": (set(), int),
    "--seq-len": (set(), int),
    "--steps": ({"huge"}, int),
    "--repeats": ({"huge"}, int),
    "--nproc": (set(), int),
    "--threads": ({"0"}, int),
    "--bucket-mb": ({"huge"}, float),
}
LAYOUT_FIELD = {"--dp": "dp=", "--pp": "pp=", "--tp": "tp=", "--cp": "cp="}  # layout rules name the degree as dp=N


def text(value: str, kind: type, flag: str) -> str:
    v = (HUGE_INT if kind is int else HUGE_FLOAT) if value == "huge" else value
    return f"{v},{v}" if flag == "--stage-speeds" else v


def answer(argv: list[str], check, capsys) -> tuple[str, object]:
    """("ok", parsed) or ("error", message) for one command line, in this process."""
    try:
        args = build_parser().parse_args(argv)
        return "ok", check(args)
    except SystemExit as e:  # argparse: usage error, exit 2
        assert e.code == 2
        return "error", capsys.readouterr().err
    except ConfigError as e:
        return "error", str(e)


def train_check(args):
    from paratrain.cli.common import build_train_config
    from paratrain.cli.train import check_config

    cfg = build_train_config(args)
    check_config(cfg)
    return cfg


def bench_check(args):
    from paratrain.cli.bench import prepare

    return prepare(args)[1]


def assert_answer(kind: str, got: object, accepted: bool, flag: str, value: str, t0: float) -> None:
    assert time.monotonic() - t0 < 5, f"{flag} {value}: validation took {time.monotonic() - t0:.1f} s"
    if accepted:
        assert kind == "ok", f"{flag} {value} should be accepted, got: {got}"
    else:
        assert kind == "error", f"{flag} {value} should be refused, was accepted"
        msg = " ".join(str(got).split())
        assert flag in msg or LAYOUT_FIELD.get(flag, flag) in msg, f"{flag} {value}: message does not name it: {msg}"
        assert "Traceback" not in msg


@pytest.mark.parametrize("flag", list(TRAIN))
def test_train_numeric_flag(flag, capsys):
    accepted, extra, kind = TRAIN[flag]
    for value in VALUES:
        t0 = time.monotonic()
        got_kind, got = answer(["train", *extra, flag, text(value, kind, flag)], train_check, capsys)
        assert_answer(got_kind, got, value in accepted, flag, value, t0)
        if got_kind == "ok" and flag not in ("--stage-speeds", "--stage-layers"):
            field = {"--timeout": "timeout_s"}.get(flag, flag[2:].replace("-", "_"))
            layout = got.layout
            given = getattr(got, field) if hasattr(got, field) else getattr(layout, field)
            want = int(text(value, kind, flag)) if kind is int else float(text(value, kind, flag))
            assert given == want and (kind is int or math.isfinite(given)), (flag, value, given)


def test_plan_auto_nproc(capsys):
    """--plan auto reads --nproc itself (the layout is searched): 0 must not mean the default 2."""
    from paratrain.cli.train import plan_auto

    for value in ("0", "-1", HUGE_INT):
        t0 = time.monotonic()
        kind, got = answer(["train", "--plan", "auto", "--nproc", value], lambda a: plan_auto(a)[0], capsys)
        assert_answer(kind, got, False, "--nproc", value, t0)


@pytest.mark.parametrize("flag", list(BENCH))
def test_bench_numeric_flag(flag, capsys):
    accepted, kind = BENCH[flag]
    for value in VALUES:
        t0 = time.monotonic()
        got_kind, got = answer(["bench", flag, text(value, kind, flag)], bench_check, capsys)
        assert_answer(got_kind, got, value in accepted, flag, value, t0)


@pytest.mark.parametrize("argv, flag", [
    (["train", "--timeout", "nan"], "--timeout"),
    (["train", "--nproc", "0"], "--nproc"),
    (["train", "--lr", "inf"], "--lr"),
    (["bench", "--bucket-mb", "inf"], "--bucket-mb"),
])
def test_through_a_real_process(tmp_path, argv, flag):
    t0 = time.monotonic()
    r = paratrain(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()
    assert time.monotonic() - t0 < 30  # a fresh interpreter importing the package on a loaded machine
