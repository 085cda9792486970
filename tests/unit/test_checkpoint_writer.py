"""The direct safetensors writer (:mod:`paratrain.checkpoint.writer`): its files are plain
safetensors that the library reads, with the SHA-256 of the bytes on disk; the host buffer is a
copy, reused; and checkpoints written before it (by ``safetensors.torch.save``) still load."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from paratrain.checkpoint import boxes
from paratrain.checkpoint.atomic import sha256_file
from paratrain.checkpoint.store import CheckpointReader, Shard, begin, find_valid, stage, write_rank
from paratrain.checkpoint.writer import HostBuffer

MAIN = Path(__file__).resolve().parents[1] / "data" / "checkpoint-main"


def _mixed() -> list[Shard]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 10, generator=g)
    return [Shard("a", (4,), ((0, 4),), torch.tensor([1, 0, 1, 1], dtype=torch.uint8)),
            Shard("b", (3,), ((0, 3),), torch.randn(3, generator=g).to(torch.bfloat16)),
            Shard("c", (6, 10), ((0, 6), (2, 5)), wide[:, 2:7]),  # a non-contiguous view (a column box)
            Shard("d", (5,), ((0, 5),), torch.randn(5, generator=g, dtype=torch.float64)),
            Shard("e", (2,), ((0, 2),), torch.tensor([True, False])),
            Shard("f", (), (), torch.tensor(3.0))]


def test_the_file_is_plain_safetensors_with_the_sha256_of_its_bytes(tmp_path):
    shards = _mixed()
    folder = begin(tmp_path, 1, 0, lambda: None)
    write_rank(folder, 0, stage(shards, {"cpu_rng": torch.arange(5, dtype=torch.uint8)}))
    path = folder / "rank00000.safetensors"
    frag = json.loads((folder / "rank00000.json").read_text())
    assert frag["sha256"] == sha256_file(path) and frag["bytes"] == path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0  # the header is padded like safetensors' own
    got = load_file(str(path))  # the library itself reads it, every dtype, each at its offsets
    for s, entry in zip(shards, frag["tensors"]):
        assert entry["key"] in got and entry["dtype"] == str(s.data.dtype).removeprefix("torch.")
        assert torch.equal(got[entry["key"]], s.data)
    assert got["rank/cpu_rng"].tolist() == [0, 1, 2, 3, 4] and frag["local"] == ["cpu_rng"]


def test_the_host_buffer_is_a_copy_and_is_reused():
    w = torch.randn(16, 8)
    buffer = HostBuffer()
    first = buffer.stage([Shard("w", (16, 8), boxes.full_box((16, 8)), w)], {})
    ptr, before = first.data.data_ptr(), w.clone()
    w.add_(1.0)  # training goes on after staging: the staged bytes do not move
    assert torch.equal(first.data.view(torch.float32).view(16, 8), before)
    again = buffer.stage([Shard("w", (16, 8), boxes.full_box((16, 8)), w)], {})
    assert again.data.data_ptr() == ptr and torch.equal(again.data.view(torch.float32).view(16, 8), w)
    other = buffer.stage([Shard("w", (8, 8), boxes.full_box((8, 8)), w[:8])], {})  # new shapes: a new plan
    assert other.data.numel() == 8 * 8 * 4 and torch.equal(other.data.view(torch.float32).view(8, 8), w[:8])


def test_a_checkpoint_written_by_the_previous_writer_still_loads(tmp_path):
    """``tests/data/checkpoint-main``: two ranks' files from ``safetensors.torch.save`` and an
    indented manifest, as main wrote them before the direct writer (its README says how)."""
    shutil.copytree(MAIN, tmp_path / "ck")
    folder, m, notes = find_valid(tmp_path / "ck")
    assert folder.name == "step-7" and notes == [] and m.layout == {"dp": 2}
    reader = CheckpointReader(folder, m)
    w, mom, step = torch.empty(8, 6), torch.empty(8, dtype=torch.float64), torch.empty(())
    reader.fill("w", boxes.full_box((8, 6)), w)
    reader.fill("optim.exp_avg.m", ((2, 4),), mom[2:6])  # a box across both ranks' pieces
    reader.fill("optim.step", (), step)
    assert torch.equal(w, torch.arange(48, dtype=torch.float32).view(8, 6) / 8)
    assert mom[2:6].tolist() == [-1.5, -0.5, 0.5, 1.5] and step.item() == 7.0
    assert reader.local(1)["cpu_rng"].tolist() == [1, 1, 2]
