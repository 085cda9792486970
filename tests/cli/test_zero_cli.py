"""`paratrain train --zero`, as a user runs it."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_train_cli import assert_like_reference, paratrain

FAST = ["--steps", "3", "--global-batch", "8", "--seq-len", "32", "--eval-every", "3"]


@pytest.mark.equivalence
@pytest.mark.parametrize("args", [["--nproc", "4", "--dp", "4", "--zero", "2"],
                                  ["--nproc", "2", "--dp", "2", "--zero", "3"]])
def test_zero_from_the_cli(args, tmp_path):
    """The reference's losses (rounding only, see tests/distributed/test_zero.py), ZeRO's
    collectives on the dp group, and -- ZeRO-3 gathering the shards -- a checkpoint of full
    reference shapes and a sample from the trained model."""
    r = paratrain("train", *args, *FAST, "--sample-tokens", "8", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    zero = args[-1]
    assert f"zero={zero} on {args[1]} process(es)" in r.stdout
    assert "sampled from the trained model" in r.stdout
    assert_like_reference(tmp_path / "o")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {"all_gather", "reduce_scatter", "grad_norm"} <= set(summary["comm"]["dp"]["ops"])
    assert "all_reduce" not in summary["comm"]["dp"]["ops"]

