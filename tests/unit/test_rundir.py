"""The run folder's rules without starting a run (issue 15, items 1 and 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from paratrain.cli.rundir import LOCK_NAME, claim
from paratrain.errors import ConfigError


def test_a_new_or_empty_folder_is_claimed(tmp_path):
    with claim(tmp_path / "a" / "b") as f:
        assert f.path.is_dir() and f.moved_to is None
    (tmp_path / "empty").mkdir()
    with claim(tmp_path / "empty"):
        pass
    with claim(tmp_path / "empty"):  # only our lock file in it: still an empty run folder
        pass


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\).*--overwrite"):
        claim(run)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_overwrite_moves_the_old_run_aside_whole(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with claim(run, overwrite=True) as f:
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
        assert f.moved_to is not None and f.moved_to.parent == tmp_path
        assert (f.moved_to / "summary.json").read_text() == "{}"
        assert f.moved_to.name.startswith("r.old-")


def test_a_live_run_locks_its_folder_even_against_overwrite(tmp_path):
    run = tmp_path / "r"
    with claim(run):
        (run / "metrics.jsonl").write_text("")
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="is in use by another run"):
                claim(run, overwrite=overwrite)
        assert (run / "metrics.jsonl").exists() and len(list(tmp_path.iterdir())) == 1
    with claim(run, overwrite=True):  # released: now it can be replaced
        pass


@pytest.mark.parametrize("case", ["file", "under a file", "unwritable"])
def test_an_unusable_out_is_a_config_error(tmp_path, case):
    (tmp_path / "f").write_text("x")
    path, message = {
        "file": (tmp_path / "f", "is an existing file"),
        "under a file": (tmp_path / "f" / "sub", "which is a file"),
        "unwritable": (Path("/proc/paratrain-x/run"), "cannot create the run folder"),
    }[case]
    with pytest.raises(ConfigError, match=message):
        claim(path)
