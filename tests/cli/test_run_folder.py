"""`--out` as a careless user gives it (issue 15, items 1 and 6): a finished run's folder, a file,
a path under a file, a place that cannot be written."""

from __future__ import annotations

import json
import time

import pytest

from tests.cli.test_train_cli import paratrain

QUICK = ["--nproc", "1", "--steps", "3", "--global-batch", "4", "--seq-len", "32", "--eval-every", "0",
         "--sample-tokens", "0"]


def test_a_finished_run_is_never_mixed_with_a_new_one(tmp_path):
    first = paratrain("train", *QUICK, "--out", "r", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "warm-up (20 steps) is as long as the run" in first.stderr  # a short run is told why lr stays low
    run = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = paratrain("train", *QUICK, "--seed", "2", "--out", "r", cwd=tmp_path, env={"PARATRAIN_FAULT": "0:2"})
    assert again.returncode == 2, again.stderr
    assert "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # untouched
    # --overwrite: the old run moves aside whole; the failed new one does not look finished
    bad = paratrain("train", *QUICK, "--seed", "2", "--out", "r", "--overwrite", cwd=tmp_path,
                    env={"PARATRAIN_FAULT": "0:2"})
    assert bad.returncode != 0
    (old,) = tmp_path.glob("r.old-*")
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    assert (old / "checkpoints" / "latest").exists()
    assert not (run / "summary.json").exists() and not (run / "checkpoints").exists()
    assert json.loads((run / "config.json").read_text())["seed"] == 2
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("case", ["file", "under a file", "unwritable"])
def test_an_unusable_out_is_refused_before_anything_starts(tmp_path, case):
    (tmp_path / "f").write_text("x")
    out, message = {"file": ("f", "is an existing file"), "under a file": ("f/run", "which is a file"),
                    "unwritable": ("/proc/paratrain-run", "cannot create the run folder")}[case]
    t0 = time.monotonic()
    r = paratrain("train", *QUICK, "--out", out, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert (tmp_path / "f").read_text() == "x"
    assert time.monotonic() - t0 < 30


def test_without_out_the_run_gets_a_fresh_folder_under_runs(tmp_path, monkeypatch):
    """`make train` gives no --out: the run folder is runs/<time>-<model>-dp..pp..tp..(cp..), and a
    second one in the same second gets a suffix instead of mixing with the first."""
    from paratrain.cli.train import _default_out
    from paratrain.config import Layout, TrainConfig

    r = paratrain("train", *QUICK, "--no-checkpoint", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    made = list((tmp_path / "runs").iterdir())
    assert len(made) == 1 and made[0].name.endswith("-tiny-dp1pp1tp1") and (made[0] / "summary.json").exists()
    monkeypatch.chdir(tmp_path)
    first = _default_out(TrainConfig(layout=Layout(cp=2)))
    assert first.parent.name == "runs" and first.name.endswith("-tiny-dp1pp1tp1cp2")
    first.mkdir(parents=True)
    second = _default_out(TrainConfig(layout=Layout(cp=2)))
    assert second != first and not second.exists()  # "-2" within the same second, else a later time
    # a Hugging Face run is named after its model, not after the --model default it does not use
    assert _default_out(TrainConfig(hf="llama", layout=Layout(tp=2))).name.endswith("-hf-llama-dp1pp1tp2")
