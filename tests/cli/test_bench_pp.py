"""`paratrain bench --only pp` at pp 4 runs as a user runs it (tiny sizes, one repeat): every row
of the group for four pipeline ranks, with the keys of the pp 2 rows (the --json rows are a
public contract), and the zero-bubble rows' weights equal PyTorch's after the warm-up. The speeds
themselves are measured by hand (README); here four ranks share the machine's cores."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli.test_train_cli import paratrain

SCHEDULE_ROW = {"name", "ours_tokens_per_s", "ref_tokens_per_s", "ratio", "pp", "schedule", "microbatches",
                "model", "bubble_measured", "bubble_theory", "stage_layers", "threads_per_rank",
                "param_drift_after_warmup", "note"}
ZB_ROW = {"name", "ours_tokens_per_s", "ref_tokens_per_s", "ratio", "pp", "schedule", "microbatches", "model",
          "reference", "bubble_measured", "bubble_theory", "threads_per_rank", "param_drift_after_warmup", "note"}
VS_1F1B_ROW = {"name", "ours_tokens_per_s", "ref_tokens_per_s", "ratio", "pp", "schedule", "microbatches", "model",
               "reference", "bubble_measured", "bubble_theory", "bubble_simulated", "bubble_1f1b", "mean_seconds",
               "threads_per_rank", "note"}


def test_bench_pp4_has_every_row_with_its_keys(tmp_path):
    # tiny-deep: 8 layers, so zb-v's 2 x 4 chunks have one layer each
    r = paratrain("bench", "--only", "pp", "--model", "tiny-deep", "--nproc", "4", "--repeats", "1", "--steps", "1",
                  "--global-batch", "8", "--seq-len", "16", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())}
    schedules = [f"pp4-{s}-m{m}" for m in (4, 8) for s in ("gpipe", "1f1b")]
    zb = [f"pp4-{s}-m{m}" for m in (4, 8) for s in ("zb-h1", "zb-v")]
    assert sorted(rows) == sorted(schedules + zb + [n + "-vs-1f1b" for n in zb])
    for name, row in rows.items():
        keys = VS_1F1B_ROW if name.endswith("-vs-1f1b") else ZB_ROW if "-zb-" in name else SCHEDULE_ROW
        assert set(row) == keys, name
        assert row["pp"] == 4 and row["ours_tokens_per_s"] > 0 and row["ref_tokens_per_s"] > 0
        if (os.cpu_count() or 1) < 4:  # fewer cores than ranks: the note says so
            assert "4 ranks sharing" in row["note"], name
    for name in zb:
        theirs = "ScheduleZBVZeroBubble" if "zb-v" in name else "ScheduleInterleavedZeroBubble"
        assert rows[name]["reference"] == theirs
        assert rows[name + "-vs-1f1b"]["reference"] == "ours-1f1b"
    # the same warm-up steps from the same weights: ours and PyTorch's interleaved zero-bubble
    # agree exactly (0, as the README's pp 2 run), 1F1B and GPipe likewise
    for name in schedules + [n for n in zb if "zb-h1" in n]:
        assert rows[name]["param_drift_after_warmup"] == 0.0, name


def test_bench_pp_without_zb_v_split_says_so():
    """small (6 layers) cannot give zb-v's 8 chunks at pp 4: those rows are left out and the
    pp 4 zero-bubble rows' notes say why; every other layout is checked before anything starts."""
    from paratrain.bench import BenchOptions
    from paratrain.bench.pp import check, skip_note, zb_cases

    opts = BenchOptions(model="small", nprocs=(2, 4))
    assert zb_cases(opts, 2) == (("zb-h1", 4), ("zb-v", 4), ("zb-h1", 8), ("zb-v", 8))
    assert zb_cases(opts, 4) == (("zb-h1", 4), ("zb-h1", 8))
    assert skip_note(opts, 2) == ""
    assert "zb-v not measured at pp 4: small has fewer than 8 layers" in skip_note(opts, 4)
    check(opts)  # no ConfigError: the zb-v layouts of pp 4 are not asked for


def test_bench_pp_needs_two_ranks():
    from paratrain.bench import BenchOptions
    from paratrain.bench.pp import check
    from paratrain.errors import ConfigError

    check(BenchOptions(nprocs=(1,)))  # the default groups: pp has no rows then
    with pytest.raises(ConfigError, match="--nproc of at least 2"):
        check(BenchOptions(nprocs=(1,)), asked=True)
