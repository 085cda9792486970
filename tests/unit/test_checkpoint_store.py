"""The sharded checkpoint format, in one process: boxes, manifest checks, atomic commit, reading
boxes of another layout, integrity, and that nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratrain.checkpoint import boxes, manifest
from paratrain.checkpoint.manifest import CheckpointError
from paratrain.checkpoint.store import (
    LATEST,
    CheckpointReader,
    CheckpointSaver,
    Shard,
    begin,
    commit,
    find_valid,
    stage,
    step_dir,
    write_rank,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_flat_range_boxes_cover_the_range_in_order(shape, data):
    total = boxes.numel(boxes.full_box(shape))
    start = data.draw(st.integers(0, total))
    stop = data.draw(st.integers(start, total))
    t = torch.arange(total).view(shape)
    got = []
    for at, box in boxes.flat_range_boxes(shape, start, stop):
        sl = tuple(slice(o, o + n) for o, n in box)
        part = t[sl].reshape(-1)
        assert part.tolist() == list(range(start + at, start + at + part.numel()))  # contiguous, in order
        got += part.tolist()
    assert got == list(range(start, stop))
    assert len(boxes.flat_range_boxes(shape, start, stop)) <= 2 * len(shape) - 1 or start == stop


def test_tp_boxes_match_the_runtime_shard_and_drop_padding():
    from paratrain.parallel.shard import pad, shard

    w = torch.arange(12 * 4).view(12, 4)  # qkv-like: 3 blocks of 4 rows
    for r in range(2):
        local = shard(w, r, 2, dim=0, chunks=3)
        for off, box in boxes.tp_boxes(w.shape, 0, 3, r, 2):
            n = box[0][1]
            assert torch.equal(local[off:off + n], w[box[0][0]:box[0][0] + n])
    v = torch.arange(10 * 2).view(10, 2)  # a vocabulary of 10 rows padded to 16 at tp 4
    pieces = [boxes.tp_boxes(v.shape, 0, 1, r, 4, padded=16) for r in range(4)]
    assert sum(boxes.numel(b) for p in pieces for _, b in p) == v.numel()  # padding in no box
    assert pieces[3] == []  # rows 12..15: all padding
    local = shard(pad(v, 0, 16), 2, 4)
    (off, box), = pieces[2]
    assert torch.equal(local[off:off + box[0][1]], v[8:10])


def _shards(t: torch.Tensor, name: str, parts: list[boxes.Box]) -> list[Shard]:
    return [Shard(name, tuple(t.shape), b, t[tuple(slice(o, o + n) for o, n in b)]) for b in parts]


def _save(root: Path, step: int, layout_boxes: list[list[boxes.Box]], tensors: dict[str, torch.Tensor],
          keep: int = 0) -> Path:
    """Save as if ``len(layout_boxes)`` ranks each held the given boxes of every tensor."""
    folder = begin(root, step, 0, lambda: None)
    for rank, parts in enumerate(layout_boxes):
        shards = [s for name, t in tensors.items()
                  for s in _shards(t, name, parts if t.dim() else [()] if rank == 0 else [])]
        write_rank(folder, rank, stage(shards, {"rng": torch.tensor([rank], dtype=torch.uint8)}))
    return commit(root, step, len(layout_boxes), {"layout": {"dp": len(layout_boxes)}}, keep, 5.0)


def _rows(n: int, ranks: int) -> list[list[boxes.Box]]:
    k = n // ranks
    return [[((r * k, k), (0, 6))] for r in range(ranks)]


def test_save_then_read_under_another_split(tmp_path):
    w = torch.randn(8, 6)
    step = torch.tensor(7.0)
    folder = _save(tmp_path, 3, _rows(8, 4), {"w": w, "step": step})
    assert (tmp_path / LATEST).read_text().strip() == "step-3" and folder == step_dir(tmp_path, 3)
    found, m, notes = find_valid(tmp_path)
    assert found == folder and notes == [] and m.step == 3 and m.layout == {"dp": 4}
    reader = CheckpointReader(found, m)
    # a rank of a 3-way flat split (ZeRO-like) of the same tensor: rows cut mid-way
    out = torch.empty(16)
    for at, box in boxes.flat_range_boxes((8, 6), 16, 32):
        reader.fill("w", box, out[at:at + boxes.numel(box)].view(boxes.lengths(box)))
    assert torch.equal(out, w.reshape(-1)[16:32])
    assert reader.bytes_read == 16 * 4  # only what was asked for
    s = torch.empty(())
    reader.fill("step", (), s)
    assert s.item() == 7.0
    assert reader.local(2)["rng"].tolist() == [2]


def test_missing_elements_are_an_error_not_zeros(tmp_path):
    folder = begin(tmp_path, 1, 0, lambda: None)
    w = torch.randn(4, 6)
    write_rank(folder, 0, stage(_shards(w, "w", [((0, 2), (0, 6))])))  # half of it
    with pytest.raises(CheckpointError, match=r"tensor 'w' has 12 of its 24 elements"):
        commit(tmp_path, 1, 1, {}, 0, 5.0)
    assert not (tmp_path / LATEST).exists()


def test_a_crash_mid_save_keeps_the_previous_checkpoint_selected(tmp_path):
    w = torch.randn(8, 6)
    _save(tmp_path, 2, _rows(8, 2), {"w": w})
    folder = begin(tmp_path, 4, 0, lambda: None)  # step 4: rank 0 wrote, rank 1 died
    write_rank(folder, 0, stage(_shards(w + 1, "w", _rows(8, 2)[0])))
    with pytest.raises(CheckpointError, match="did not finish"):
        commit(tmp_path, 4, 2, {}, 0, 0.2)
    found, m, _ = find_valid(tmp_path)
    assert found.name == "step-2"
    out = torch.empty(8, 6)
    CheckpointReader(found, m).fill("w", boxes.full_box((8, 6)), out)
    assert torch.equal(out, w)


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, _rows(8, 2), {"w": torch.randn(8, 6)}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2", "step-3"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_named_and_resume_falls_back(tmp_path, damage):
    w1, w2 = torch.randn(8, 6), torch.randn(8, 6)
    _save(tmp_path, 1, _rows(8, 2), {"w": w1})
    _save(tmp_path, 2, _rows(8, 2), {"w": w2})
    shard_file = step_dir(tmp_path, 2) / "rank00001.safetensors"
    data = shard_file.read_bytes()
    if damage == "truncate":
        shard_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        shard_file.unlink()
    found, m, notes = find_valid(tmp_path)
    assert found.name == "step-1"
    assert len(notes) == 1 and "rank00001.safetensors" in notes[0]
    out = torch.empty(8, 6)
    CheckpointReader(found, m).fill("w", boxes.full_box((8, 6)), out)
    assert torch.equal(out, w1)


def test_a_pickle_in_place_of_a_shard_is_refused_without_running_it(tmp_path):
    _save(tmp_path, 1, _rows(8, 1), {"w": torch.randn(8, 6)})
    folder = step_dir(tmp_path, 1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shard_file = folder / "rank00000.safetensors"
    shard_file.write_bytes(pickle.dumps(Payload()))
    m = manifest.read(folder)
    with pytest.raises(CheckpointError, match="rank00000.safetensors"):
        CheckpointReader(folder, m).fill("w", boxes.full_box((8, 6)), torch.empty(8, 6))
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_valid(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda raw: "{not json", "not valid JSON"),
    (lambda raw: json.dumps(dict(raw, format="x")), "not a paratrain checkpoint manifest"),
    (lambda raw: json.dumps(dict(raw, files={"../x": {"sha256": "0"}})), "not a plain name"),
    (lambda raw: json.dumps(dict(raw, step="3")), "expected an integer"),
])
def test_malformed_manifest_is_a_checkpoint_error(tmp_path, edit, match):
    _save(tmp_path, 1, _rows(8, 1), {"w": torch.randn(8, 6)})
    path = step_dir(tmp_path, 1) / manifest.MANIFEST
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(CheckpointError, match=match):
        manifest.read(path.parent)


def test_piece_outside_the_folder_is_refused(tmp_path):
    _save(tmp_path, 1, _rows(8, 1), {"w": torch.randn(8, 6)})
    path = step_dir(tmp_path, 1) / manifest.MANIFEST
    raw = json.loads(path.read_text())
    raw["tensors"]["w"]["pieces"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="not a plain name"):
        manifest.read(path.parent)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_saver_records_blocked_and_total_seconds(tmp_path, asynchronous):
    w = torch.randn(64, 64)
    saver = CheckpointSaver(tmp_path, 0, 1, lambda: None, keep=1, asynchronous=asynchronous)
    first = saver.save(1, _shards(w, "w", [boxes.full_box(w.shape)]), {}, {})
    w.add_(1.0)  # training goes on: the save in flight holds its own copy
    record = saver.save(2, _shards(w, "w", [boxes.full_box(w.shape)]), {}, {}) if asynchronous else first
    if not asynchronous:
        saver.save(2, _shards(w, "w", [boxes.full_box(w.shape)]), {}, {})
    last = saver.wait()
    assert record["step"] == 1 and 0 <= record["blocked_s"] <= record["total_s"]
    assert (last or {"step": 2})["step"] == 2
    found, m, _ = find_valid(tmp_path)
    out = torch.empty(64, 64)
    CheckpointReader(found, m).fill("w", boxes.full_box(w.shape), out)
    assert found.name == "step-2" and torch.equal(out, w)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-2"]


def test_a_failed_background_write_is_raised_at_the_next_save(tmp_path, monkeypatch):
    import paratrain.checkpoint.store as store

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_rank", boom)
    saver = CheckpointSaver(tmp_path, 0, 1, lambda: None, asynchronous=True)
    saver.save(1, [], {}, {})
    with pytest.raises(CheckpointError, match="No space left"):
        saver.save(2, [], {}, {})
    assert not os.path.exists(tmp_path / LATEST)


def test_later_saves_need_no_barrier_and_a_crashed_attempts_partial_is_cleared(tmp_path):
    """Two ranks' savers in one process. The first save clears a stale partial folder (with a
    fragment a crashed attempt left); a later one runs without a barrier even when rank 1 starts
    it before rank 0; saving a step already saved writes nothing."""
    w = torch.randn(8, 6)
    stale = tmp_path / ".step-2.partial"
    stale.mkdir(parents=True)
    (stale / "rank00001.json").write_text("{}")  # would pass for rank 1's "done" mark

    def no_barrier():
        raise AssertionError("a barrier in a later save")

    savers = [CheckpointSaver(tmp_path, r, 2, lambda: None, asynchronous=True, timeout_s=10) for r in range(2)]
    for r, s in enumerate(savers):
        s.save(1, _shards(w, "w", _rows(8, 2)[r]), {}, {})
    assert not stale.exists()
    for s in savers:
        s.wait()
        s.barrier = no_barrier
    w.add_(1.0)
    for r in (1, 0):  # rank 1 is ahead: it creates the folder, rank 0 must not clear it
        savers[r].save(2, _shards(w, "w", _rows(8, 2)[r]), {}, {})
    for s in savers:
        s.wait()
    found, m, _ = find_valid(tmp_path)
    out = torch.empty(8, 6)
    CheckpointReader(found, m).fill("w", boxes.full_box((8, 6)), out)
    assert found.name == "step-2" and torch.equal(out, w)
    before = (found / "manifest.json").stat().st_mtime_ns
    assert savers[0].save(2, _shards(w, "w", _rows(8, 2)[0]), {}, {}) is None
    assert (found / "manifest.json").stat().st_mtime_ns == before and not list(tmp_path.glob(".step-*"))


def test_a_commit_waiting_for_a_killed_ranks_file_gives_up_at_once(tmp_path):
    """Rank 1 registered, then was killed (SIGKILL) before writing its part: no collective is
    waiting, so only its exited process can tell rank 0's commit that the file will never come.
    The commit names it within a look or two instead of waiting out the 60 s timeout; while the
    process runs, or if it runs on another machine, the commit keeps waiting (and times out)."""
    import subprocess
    import sys
    import time

    import paratrain.checkpoint.store as store

    w = torch.randn(4, 4)
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        begin(tmp_path, 3, 0, lambda: None, first=True)
        (tmp_path / ".rank00001.pid").write_text(json.dumps({"machine": store._machine(), "pid": peer.pid}))
        write_rank(tmp_path / ".step-3.partial", 0, stage(_shards(w, "w", [boxes.full_box(w.shape)])))
        with pytest.raises(CheckpointError, match="within 1 s"):  # alive: only the timeout ends the wait
            commit(tmp_path, 3, 2, {}, 0, timeout_s=1.0)
        peer.kill()
        peer.wait()
        t0 = time.monotonic()
        with pytest.raises(CheckpointError, match=rf"rank 1's process \(pid {peer.pid}\) exited before writing"):
            commit(tmp_path, 3, 2, {}, 0, timeout_s=60.0)
        assert time.monotonic() - t0 < 10
        (tmp_path / ".rank00001.pid").write_text(json.dumps({"machine": "another-host", "pid": peer.pid}))
        with pytest.raises(CheckpointError, match="within 1 s"):  # elsewhere: its pid means nothing here
            commit(tmp_path, 3, 2, {}, 0, timeout_s=1.0)
    finally:
        peer.kill()
        peer.wait()
    assert not (tmp_path / LATEST).exists()
