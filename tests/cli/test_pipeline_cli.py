"""`paratrain train` with a pipeline, as a user runs it: same run as one process, plus a timeline."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_train_cli import FAST, losses, paratrain
from tests.common import LOSS_RTOL


@pytest.mark.equivalence
def test_pipeline_run_matches_one_process_and_writes_a_timeline(tmp_path):
    one = paratrain("train", "--nproc", "1", "--steps", "4", "--out", "one", *FAST, cwd=tmp_path)
    pp = paratrain("train", "--nproc", "2", "--pp", "2", "--microbatches", "4", "--steps", "4", "--out", "pp",
                   *FAST, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert pp.returncode == 0, pp.stderr
    # two runs that each round differently from the reference (tests/common.py): the floor counts twice
    assert losses(tmp_path / "pp") == pytest.approx(losses(tmp_path / "one"), rel=2 * LOSS_RTOL)
    val = [json.loads(x).get("val_loss") for x in (tmp_path / d / "metrics.jsonl" for d in ("one", "pp"))
           for x in x.read_text().splitlines()[2:3]]
    assert val[1] == pytest.approx(val[0], rel=2 * LOSS_RTOL)  # evaluation runs through the pipeline too
    out = tmp_path / "pp"
    timeline = json.loads((out / "timeline.json").read_text())
    assert timeline["schedule"] == "1f1b" and len(timeline["ranks"]) == 2
    assert timeline["bubble_theory"] == pytest.approx(1 / 5)  # (p-1)/(m+p-1)
    assert 0 < timeline["bubble"] < 1
    assert (out / "timeline.png").stat().st_size > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bubble_measured"] == pytest.approx(timeline["bubble"])
    assert "pipeline bubble" in pp.stdout and "20.0% theory" in pp.stdout
    assert (out / "checkpoints" / "latest").exists()  # every stage wrote its shards
    assert "sampled from the trained model" in pp.stdout
