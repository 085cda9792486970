"""`paratrain train --checkpoint-every / --resume` and `paratrain convert` as a user runs them."""

from __future__ import annotations

import json
import re

import pytest

from tests.cli.test_train_cli import losses, paratrain

RUN = ["--model", "tiny", "--steps", "6", "--global-batch", "8", "--seq-len", "32", "--eval-every", "0",
       "--sample-tokens", "0", "--quiet"]


def test_a_crashed_run_resumes_bit_for_bit_and_in_another_layout(tmp_path):
    full = paratrain("train", *RUN, "--checkpoint-every", "2", "--out", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    for name in ("crashed", "crashed2"):
        crash = paratrain("train", *RUN, "--checkpoint-every", "2", "--out", name, cwd=tmp_path,
                          env={"PARATRAIN_FAULT": "1:5"})
        assert crash.returncode == 1 and "injected fault" in crash.stderr
    records = [json.loads(x) for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["checkpoint_blocked_s"] >= 0  # step 2 saved: training waited this long
    saves = [r["checkpoint"] for r in records if "checkpoint" in r]
    assert saves[0]["step"] == 2 and 0 <= saves[0]["blocked_s"] <= saves[0]["total_s"]

    same = paratrain("train", "--resume", "crashed", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "resuming" in same.stdout
    at = int(re.search(r"resuming crashed from \S+ \(step (\d)\)", same.stdout).group(1))  # 2 or 4: async save
    assert f"6 (resumed after step {at})" in same.stdout and f"since the resume at step {at}" in same.stdout
    assert json.loads((tmp_path / "crashed" / "summary.json").read_text())["resumed_from"]["step"] == at
    assert losses(tmp_path / "crashed") == losses(tmp_path / "full")  # bit for bit, steps 1..6 once each

    other = paratrain("train", "--resume", "crashed2", "--nproc", "1", "--dp", "1", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    got, want = losses(tmp_path / "crashed2"), losses(tmp_path / "full")
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-5)
    assert json.loads((tmp_path / "crashed2" / "config.json").read_text())["layout"]["dp"] == 1

    done = paratrain("train", "--resume", "full", cwd=tmp_path)
    assert done.returncode == 2 and "already at step 6" in done.stderr and "Traceback" not in done.stderr
    longer = paratrain("train", "--resume", "full", "--steps", "7", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert [json.loads(x)["step"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 8))


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path):
    r = paratrain("train", *RUN, "--checkpoint-every", "2", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shard = tmp_path / "o" / "checkpoints" / "step-6" / "rank00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    again = paratrain("train", "--resume", "o", "--steps", "7", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "rank00001.safetensors is truncated" in again.stderr and "step-4 (step 4)" in again.stdout


@pytest.mark.parametrize("args,message", [
    (["--resume", "nowhere"], "does not exist"),
    (["--resume", "o", "--out", "x"], "drop --out"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0"),
    (["--init-from", "missing.safetensors"], "--init-from missing.safetensors does not exist"),
])
def test_bad_checkpoint_flags_exit_2(tmp_path, args, message):
    (tmp_path / "o").mkdir()
    r = paratrain("train", *RUN, *args, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_convert_to_single_and_init_from(tmp_path):
    r = paratrain("train", *RUN, "--dp", "2", "--tp", "2", "--nproc", "4", "--steps", "2", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    c = paratrain("convert", "o", "--to-single", "m.safetensors", cwd=tmp_path)
    assert c.returncode == 0 and "wrote m.safetensors" in c.stdout, c.stderr
    from safetensors.torch import load_file

    from paratrain.checkpoint.convert import model_state

    single = load_file(str(tmp_path / "m.safetensors"))
    state, _ = model_state(tmp_path / "o")
    assert set(single) | {"lm_head.weight"} == set(state)
    assert all((single[k] == state[k]).all() for k in single)
    wrong = paratrain("train", *RUN, "--model", "small", "--init-from", "m.safetensors", "--out", "w", cwd=tmp_path)
    assert wrong.returncode == 2 and "another shape than model 'small'" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "w").exists()  # refused before anything
    other = paratrain("train", "--resume", "o", "--model", "small", cwd=tmp_path)
    assert other.returncode == 2 and "cannot continue as model = 'small'" in other.stderr, other.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model"] == "tiny"  # untouched
    again = paratrain("convert", "o", "--to-single", "m.safetensors", cwd=tmp_path)  # never overwrites silently
    assert again.returncode == 2 and "exists; nothing was written" in again.stderr and "--force" in again.stderr
    forced = paratrain("convert", "o", "--to-single", "m.safetensors", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and load_file(str(tmp_path / "m.safetensors")).keys() == single.keys()
    nowhere = paratrain("convert", "o", "--to-single", "no/such/dir/m.safetensors", cwd=tmp_path)
    flat = " ".join(nowhere.stderr.split())  # the message is wrapped, maybe inside its long path
    assert nowhere.returncode == 2 and "does not exist" in flat and "Traceback" not in flat, nowhere.stderr
    init = paratrain("train", *RUN, "--steps", "1", "--nproc", "1", "--dp", "1", "--init-from", "m.safetensors",
                     "--lr", "1e-9", "--warmup-steps", "0", "--out", "i", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert losses(tmp_path / "i")[0] < losses(tmp_path / "o")[0]  # starts from the trained weights, not step 0's
