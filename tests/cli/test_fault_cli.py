"""PARATRAIN_FAULT as a user sets it: parsed once by `paratrain train`, before any rank starts.
(That a valid fault fails or hangs the run: test_train_cli.py's failing/hanging-rank tests.)"""

from __future__ import annotations

import pytest

from tests.cli.test_train_cli import FAST, paratrain


@pytest.mark.parametrize("spec", ["1:three", "1:3:crash"])
def test_a_bad_fault_spec_is_a_usage_error_before_launch(tmp_path, spec):
    r = paratrain("train", "--steps", "2", "--dp", "2", "--out", "f", *FAST, cwd=tmp_path,
                  env={"PARATRAIN_FAULT": spec})
    assert r.returncode == 2, r.stderr
    assert f"PARATRAIN_FAULT={spec!r} is not a fault" in r.stderr and "RANK:STEP or RANK:STEP:hang" in r.stderr
    assert "Traceback" not in r.stderr and "\n\n" not in r.stderr.strip()  # one paragraph
    assert not (tmp_path / "f").exists()  # nothing was started
