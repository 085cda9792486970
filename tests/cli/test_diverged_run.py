"""A run whose loss becomes NaN is never reported as finished (issue 15, item 8), and the run
folder's JSON files stay strict JSON (no NaN/Infinity)."""

from __future__ import annotations

import json

from tests.cli.test_train_cli import paratrain


def strict(text: str):
    def refuse(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_diverging_run_stops_with_an_error_and_writes_no_nan(tmp_path):
    r = paratrain("train", "--lr", "1e6", "--warmup-steps", "0", "--steps", "6", "--global-batch", "4",
                  "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "0", "--max-bad-steps", "0",
                  "--out", "d", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "finished" not in r.stdout
    assert "training diverged" in r.stderr and "Lower --lr" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "d"
    records = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] is None and "loss" in records[-1]["nonfinite"]
    assert len(records) < 6  # it stopped at the first non-finite loss
    assert all(isinstance(rec["loss"], float) for rec in records[:-1])
    summary = strict((out / "summary.json").read_text())
    assert summary["diverged"]["step"] == records[-1]["step"] and summary["final_loss"] is None
    assert "final_loss" in summary["nonfinite"]
    strict((out / "config.json").read_text())
    assert not (out / "checkpoint").exists() and not (out / "checkpoints").exists()


def test_non_finite_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(tmp_path):
    """--max-bad-steps 2: two non-finite steps skip their updates (a warning each), the third
    stops the run; the checkpoint written before stays the latest."""
    r = paratrain("train", "--lr", "1e6", "--warmup-steps", "0", "--steps", "12", "--global-batch", "4",
                  "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "0", "--max-bad-steps", "2",
                  "--checkpoint-every", "1", "--no-async-checkpoint", "--out", "d", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    records = [strict(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    bad = [rec for rec in records if rec.get("skipped")]
    assert len(bad) == 3 and [rec["step"] for rec in bad] == [records[-1]["step"] - 2 + i for i in range(3)]
    assert r.stderr.count("the update was skipped") == 2 and "3 non-finite steps in a row" in r.stderr
    good = records[-1]["step"] - 3  # the last step whose update was applied: its checkpoint is the latest
    latest = (tmp_path / "d" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{good}", latest
