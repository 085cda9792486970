"""What training waits for in an asynchronous save (:mod:`paratrain.checkpoint.writer`,
:class:`paratrain.checkpoint.store.CheckpointSaver`): the copies into the reused host buffer,
planned once (neighbouring byte ranges merged), still copy the current values of the right
memory; the buffer is never overwritten while the previous save is still writing it; the cached
holdings walk notices a replaced tensor; the writer runs at a lower priority."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from paratrain.checkpoint import holdings as hd
from paratrain.checkpoint import store
from paratrain.checkpoint.boxes import flat_range_boxes, full_box
from paratrain.checkpoint.store import CheckpointReader, CheckpointSaver, Shard, find_valid, step_dir
from paratrain.checkpoint.writer import HostBuffer


def _like_a_rank() -> tuple[list[Shard], torch.Tensor, torch.Tensor]:
    """Shards as a rank holds them: a flat ZeRO range of a (6, 5) parameter as 3 boxes (neighbours
    in one storage), the 3 row blocks of a fused (12, 4) qkv, a column box (not contiguous), an
    empty box, two boxes of the range's storage with gaps, a bf16 tensor between them."""
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(40, generator=g)
    qkv = torch.randn(12, 4, generator=g)
    wide = torch.randn(4, 9, generator=g)
    out = []
    for _, box in flat_range_boxes((6, 5), 3, 27):  # elements 3..26 of flat[5:35], read as (6, 5)
        view = flat[5:35].view(6, 5)[tuple(slice(o, o + n) for o, n in box)]
        out.append(Shard("p", (6, 5), box, view))
    out += [Shard("qkv", (12, 4), ((4 * b, 4), (0, 4)), qkv[4 * b:4 * b + 4]) for b in range(3)]
    # the same storage, not adjacent to the range nor to each other: copied on their own
    out += [Shard("edge", (6,), ((0, 2),), flat[0:2]), Shard("edge", (6,), ((2, 4),), flat[36:40])]
    out += [Shard("half", (3,), ((0, 3),), torch.randn(3, generator=g).to(torch.bfloat16)),
            Shard("col", (4, 9), ((0, 4), (2, 3)), wide[:, 2:5]),
            Shard("none", (0,), ((0, 0),), flat[:0])]
    return out, flat, qkv


def _written(staged, tmp_path, name: str) -> dict:
    path = tmp_path / name
    store.write_file(path, staged)
    return load_file(str(path))


def test_merged_copies_stage_every_shard_and_follow_the_live_values(tmp_path):
    shards, flat, qkv = _like_a_rank()
    buffer = HostBuffer()
    staged = buffer.stage(shards, {"cpu_rng": torch.arange(7, dtype=torch.uint8)})
    assert len(buffer._dst) == 6  # 11 shards: the flat range's 3 boxes one copy, the qkv blocks one, 2 edges, col, half
    got = _written(staged, tmp_path, "a.safetensors")
    for s in shards:
        assert torch.equal(got[s.key], s.data), s.key
    assert got["rank/cpu_rng"].tolist() == list(range(7))
    ptr, copies = staged.data.data_ptr(), buffer._dst
    flat.mul_(-2.0)  # training updates in place: the next save copies the new values
    qkv.add_(1.0)
    again = buffer.stage(shards, {"cpu_rng": torch.full((7,), 9, dtype=torch.uint8)})
    assert again.data.data_ptr() == ptr and buffer._dst is copies  # nothing planned or allocated again
    got = _written(again, tmp_path, "b.safetensors")
    for s in shards:
        assert torch.equal(got[s.key], s.data), s.key
    assert got["rank/cpu_rng"].tolist() == [9] * 7


def test_a_view_of_other_memory_is_copied_from_there(tmp_path):
    """``set_`` moves a view to other memory without a new object: its address changes, so the
    copies are bound again (a merged byte range would otherwise read the old storage)."""
    shards, flat, _ = _like_a_rank()
    buffer = HostBuffer()
    buffer.stage(shards, {})
    moved = torch.arange(40, dtype=torch.float32)
    shards[0].data.set_(moved.untyped_storage(), 5, shards[0].data.shape, shards[0].data.stride())
    staged = buffer.stage(shards, {})
    got = _written(staged, tmp_path, "c.safetensors")
    assert torch.equal(got[shards[0].key], shards[0].data) and got[shards[0].key][0, 0].item() == 5.0


def test_a_reused_buffer_is_not_overwritten_while_the_previous_save_is_writing(tmp_path, monkeypatch):
    """At most one save in flight: the next save waits for the previous write before it copies
    into the same buffer. The first write is held back until the second save has had time to
    stage; the first file still holds the first values."""
    w = torch.randn(32, 16)
    before = w.clone()
    gate, writing = threading.Event(), threading.Event()
    real = store.write_rank

    def held(folder, rank, staged):
        writing.set()
        assert gate.wait(30)
        real(folder, rank, staged)

    monkeypatch.setattr(store, "write_rank", held)
    saver = CheckpointSaver(tmp_path, 0, 1, lambda: None, asynchronous=True, timeout_s=30)
    saver.save(1, [Shard("w", (32, 16), full_box((32, 16)), w)], {}, {})
    assert writing.wait(30)
    w.add_(1.0)  # the next step's update
    second = threading.Thread(target=saver.save, args=(2, [Shard("w", (32, 16), full_box((32, 16)), w)], {}, {}))
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # waiting for the first write, not staging over it
    gate.set()
    second.join(30)
    saver.wait()
    first = load_file(str(step_dir(tmp_path, 1) / "rank00000.safetensors"))
    assert torch.equal(next(iter(first.values())), before)
    folder, m, _ = find_valid(tmp_path)
    out = torch.empty(32, 16)
    CheckpointReader(folder, m).fill("w", full_box((32, 16)), out)
    assert folder.name == "step-2" and torch.equal(out, w)


def test_the_cached_walk_notices_a_replaced_optimizer_state_or_buffer(tmp_path):
    from paratrain.config import TrainConfig
    from paratrain.data import load_corpus
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    cfg = TrainConfig(model="tiny", steps=2, global_batch=2, seq_len=16, eval_every=0, sample_tokens=0,
                      progress=False)
    (tmp_path / "a.txt").write_text("print('hello')\n" * 300)
    s = setup(cfg, RankEnv(), torch.device("cpu"), load_corpus(str(tmp_path / "a.txt")))
    train_step(s, 1)
    writes = hd.WriteSet()
    first = writes.shards(s.pm, s.opt, 0)
    assert writes.shards(s.pm, s.opt, 0) is first
    q = s.pm.module.ln_f.bias
    s.opt.state[q]["exp_avg"] = torch.full_like(q, 3.0)  # another object at another address
    second = writes.shards(s.pm, s.opt, 0)
    assert second is not first
    (got,) = [x.data for x in second if x.name == "optim.exp_avg.ln_f.bias"]
    assert torch.equal(got, torch.full_like(q, 3.0))
    s.pm.module.ln_f.register_buffer("extra", torch.zeros(2))  # the module tree changed
    assert writes.shards(s.pm, s.opt, 0) is not second


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_background_writer_yields_the_cpu_to_training(tmp_path):
    saver = CheckpointSaver(tmp_path, 0, 1, lambda: None, asynchronous=True)
    saver.save(1, [Shard("w", (4,), full_box((4,)), torch.zeros(4))], {}, {})
    saver.wait()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    theirs = os.getpriority(os.PRIO_PROCESS, saver._worker.native_id)
    assert theirs == max(mine, store.BACKGROUND_NICE)  # training's own thread is untouched
