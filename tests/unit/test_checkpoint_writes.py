"""Who writes what (:mod:`paratrain.checkpoint.holdings`): the dp replicas split the replicated
tensors between them, and the holdings walk cached between saves still saves the current values."""

from __future__ import annotations

import torch

from paratrain.checkpoint import holdings as hd
from paratrain.checkpoint.boxes import full_box
from paratrain.config import TrainConfig
from paratrain.data import load_corpus
from paratrain.launch import RankEnv
from paratrain.train import setup, train_step


def _replicated(sizes: list[int]) -> list[hd.Holding]:
    out = []
    for i, n in enumerate(sizes):
        t = torch.zeros(n)
        out.append(hd.Holding(f"t{i}", (n,), t, [hd.Segment(full_box((n,)), None, full_box((n,)), full_box((n,)))],
                              owned=True, replicated=True))
    return out


def test_dp_replicas_split_the_replicated_tensors_exactly_once_and_evenly():
    sizes = [4096, 64, 1000, 1000, 3, 512, 2048, 2048, 7, 300]
    for dp in (2, 3, 4):
        writers = []
        for rank in range(dp):  # every replica computes the assignment on its own, from the same list
            hs = _replicated(sizes) + [hd.Holding("own", (5,), torch.zeros(5), [], owned=True)]
            hd._spread(hs, rank, dp)
            assert hs[-1].owned  # a tensor sharded over dp (a ZeRO piece) stays its holder's
            writers.append({h.name for h in hs[:-1] if h.owned})
        assert set.union(*writers) == {f"t{i}" for i in range(len(sizes))}
        assert sum(len(w) for w in writers) == len(sizes)  # each written once
        loads = [sum(sizes[int(n[1:])] for n in w) for w in writers]
        assert max(loads) - min(loads) <= max(sizes), (dp, loads)  # largest first: within one tensor


def test_the_cached_walk_saves_the_current_values_and_follows_a_swapped_tensor(tmp_path):
    cfg = TrainConfig(model="tiny", steps=2, global_batch=2, seq_len=16, eval_every=0, sample_tokens=0,
                      progress=False)
    (tmp_path / "a.txt").write_text("print('hello')\n" * 300)  # not the default corpus: nothing to walk
    s = setup(cfg, RankEnv(), torch.device("cpu"), load_corpus(str(tmp_path / "a.txt")))
    train_step(s, 1)
    writes = hd.WriteSet()
    first = writes.shards(s.pm, s.opt, 0)
    train_step(s, 2)  # in-place updates: the same views, now showing step 2's values
    again = writes.shards(s.pm, s.opt, 0)
    assert again is first
    fresh = hd.shards(hd.holdings(s.pm, s.opt), s.opt, 0)
    assert [(x.name, x.box) for x in again] == [(x.name, x.box) for x in fresh]
    assert all(torch.equal(a.data, b.data) for a, b in zip(again, fresh))
    p = s.pm.module.ln_f.weight
    p.data = p.data.clone() + 1.0  # another storage: the cached views would save the old values
    swapped = writes.shards(s.pm, s.opt, 0)
    assert swapped is not first
    (got,) = [x.data for x in swapped if x.name == "ln_f.weight"]
    assert torch.equal(got, p.detach())
