"""Dropout under tensor parallelism: masks equal across tp ranks where the tensor is replicated,
different where it is sharded; the default generators stay in step; recomputation replays the
masks exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paratrain.core.traffic import tp_comm_per_step
from tests.common import BASE, train_ranks_fn, with_layout
from tests.harness import run_ranks

P = 0.1
RESIDUAL = ("drop", "attn.resid_drop", "mlp.drop")  # name suffixes of the residual-stream dropouts


def probe_fn(cfg):
    """One training-mode forward; returns every dropout's mask, draws made inside attention
    (they show which generator the attention dropout uses), block outputs, the loss and the
    default generator's state afterwards."""
    import torch.nn.functional as F

    from paratrain.data import get_batch
    from paratrain.launch import RankEnv
    from paratrain.train import setup

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
    model = s.pm.module
    masks, blocks, attn_draws = {}, [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(lambda m, i, o, name=name: masks.__setitem__(name, o != 0))
    for b in model.blocks:
        b.register_forward_hook(lambda m, i, o: blocks.append(o.detach().clone()))
    sdpa = F.scaled_dot_product_attention

    def probed_sdpa(*args, **kwargs):
        attn_draws.append(torch.rand(4))
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = probed_sdpa
    x, y = get_batch(s.corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, 1, s.rows)
    loss = model(torch.from_numpy(x), torch.from_numpy(y))
    F.scaled_dot_product_attention = sdpa
    return {"masks": masks, "blocks": blocks, "attn": attn_draws, "loss": loss.item(),
            "rng": torch.get_rng_state()}


def residual_masks(res):
    return {k: v for k, v in res["masks"].items() if k.endswith(RESIDUAL)}


def test_replicated_masks_equal_sharded_differ():
    cfg = with_layout(BASE.replace(dropout=P), tp=2)
    r0, r1 = run_ranks(2, probe_fn, cfg)
    masks0, masks1 = residual_masks(r0), residual_masks(r1)
    assert len(masks0) == 1 + 2 * cfg.model_config().num_layers
    for k, m in masks0.items():
        assert m.shape == (cfg.global_batch, cfg.seq_len, 128)
        assert torch.equal(m, masks1[k]), f"{k}: a replicated region drew different masks"
        assert abs(m.float().mean().item() - (1 - P)) < 0.02  # dropout really was on
    for a, b in zip(r0["attn"], r1["attn"], strict=True):  # this rank's heads: its own stream
        assert not torch.equal(a, b)
    for a, b in zip(r0["blocks"], r1["blocks"], strict=True):  # the replicated copies stay equal
        assert torch.equal(a, b)
    assert r0["loss"] == r1["loss"]
    assert torch.equal(r0["rng"], r1["rng"])  # default generators still in step


def test_sequence_parallel_masks_differ():
    cfg = with_layout(BASE.replace(dropout=P), tp=2, sequence_parallel=True)
    r0, r1 = run_ranks(2, probe_fn, cfg)
    masks0, masks1 = residual_masks(r0), residual_masks(r1)
    assert len(masks0) == 1 + 2 * cfg.model_config().num_layers
    for k, m in masks0.items():
        assert m.shape == (cfg.global_batch, cfg.seq_len // 2, 128)  # this rank's slice of T
        assert not torch.equal(m, masks1[k]), f"{k}: sequence shards drew the same mask"
        assert abs(m.float().mean().item() - (1 - P)) < 0.02
    for a, b in zip(r0["attn"], r1["attn"], strict=True):
        assert not torch.equal(a, b)
    assert r0["loss"] == r1["loss"]
    assert torch.equal(r0["rng"], r1["rng"])


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_recompute_replays_dropout(sp):
    """Full recomputation re-runs every block's forward in backward. If a sharded stream kept
    its own state, the replay would draw new masks and the gradients would be wrong; here the
    run is identical to the one without recomputation. Also checks the formula's extra
    collectives of a replay with dropout on."""
    cfg = with_layout(BASE.replace(dropout=P, steps=3), tp=2, sequence_parallel=sp)
    plain = run_ranks(2, train_ranks_fn, cfg)
    cfg_rc = with_layout(cfg, tp=2, sequence_parallel=sp, recompute="full")
    replayed = run_ranks(2, train_ranks_fn, cfg_rc)
    for a, b in zip(plain, replayed, strict=True):
        assert a["losses"] == b["losses"]
        assert a["grad_norms"] == b["grad_norms"]
    expected = tp_comm_per_step(cfg.model_config(), 2, sp, cfg.global_batch, cfg.seq_len, 1, "full")
    assert [s["tp"] for s in replayed[0]["comm_bytes"]] == [sum(b for _, b in expected.values())] * cfg.steps
