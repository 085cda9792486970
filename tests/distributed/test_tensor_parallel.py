"""Tensor parallelism (with and without sequence parallelism, alone and under data parallelism,
with a vocabulary tp divides and one it must pad) reproduces the single-process reference:
losses, gradient norms, clipped gradients, every parameter gathered back to full shape, and
exactly the communication its formula states."""

from __future__ import annotations

import functools

import pytest
import torch

from paratrain.config import padded_vocab_size
from paratrain.core.traffic import tp_comm_per_step
from paratrain.parallel.shard import pad, shard
from paratrain.reference import reference_train
from tests.common import (
    BASE,
    FIRST_NORM_RTOL,
    GRAD_ATOL,
    GRAD_RTOL,
    assert_matches_reference,
    max_param_diff,
    param_atol,
    train_ranks_fn,
    with_layout,
)
from tests.harness import run_ranks

# Tolerances: tests/common.py, multiples of the measured noise floor. A tp rank computes each
# matmul over a slice of the contracted dimension (row-parallel layers) or of the vocabulary (the
# loss's sum of exponentials), and the all-reduce adds the slices in another order, so every value
# differs from the reference by float rounding only; a padded vocabulary adds none (its masked
# columns contribute exact zeros). Clipping is active at every step (norms 2.0 to 8.4).

# How the reference tensors are split over tp: (dim, chunks), see parallel/shard.py. Written out
# here, independently of the code, as the test's statement of the layout.
SPLITS = {"attn.qkv.weight": (0, 3), "attn.qkv.bias": (0, 3), "mlp.fc1.weight": (0, 1),
          "mlp.fc1.bias": (0, 1), "attn.proj.weight": (1, 1), "mlp.fc2.weight": (1, 1),
          "wte.weight": (0, 1), "lm_head.weight": (0, 1)}

CASES = {
    "tp2": dict(tp=2),
    "tp4": dict(tp=4),
    "dp2-tp2": dict(dp=2, tp=2),
    "tp2-sp": dict(tp=2, sequence_parallel=True),
    "tp4-sp": dict(tp=4, sequence_parallel=True),
    "dp2-tp2-sp-accum2": dict(dp=2, tp=2, sequence_parallel=True, microbatches=2),
    "tp2-recompute-full": dict(tp=2, recompute="full"),
    "tp2-sp-recompute-selective": dict(tp=2, sequence_parallel=True, recompute="selective"),
    "tp2-sp-recompute-full": dict(tp=2, sequence_parallel=True, recompute="full"),
}
UNTIED = {"tp2-untied": dict(tp=2), "tp2-sp-untied": dict(tp=2, sequence_parallel=True)}
# tiny-odd's vocabulary 257 is prime: padded to 384 rows at tp 2 (rank 1: 65 real, 63 padding)
# and 512 at tp 4 (rank 2: 1 real row, rank 3: padding only).
PADDED = {"odd-tp2": dict(tp=2), "odd-tp4": dict(tp=4), "odd-tp2-sp": dict(tp=2, sequence_parallel=True),
          "odd-tp2-untied": dict(tp=2), "odd-tp4-sp-untied": dict(tp=4, sequence_parallel=True)}
ODD = BASE.replace(model="tiny-odd")


def case_config(name: str):
    base = ODD if name in PADDED else BASE
    if name.endswith("-untied"):
        base = base.replace(untie_embeddings=True)
    return with_layout(base, **{**CASES, **UNTIED, **PADDED}[name])


@functools.cache
def reference(cfg):
    return reference_train(cfg)


@functools.cache
def run(name: str):
    """The ranks' results for one case (cached: the comm test reuses the equivalence runs)."""
    cfg = case_config(name)
    return cfg, run_ranks(cfg.layout.world_size, train_ranks_fn, cfg)


def expected_local(ref_state: dict, rank_tp: int, tp: int) -> dict:
    """This rank's documented shard of every reference tensor; the vocabulary's rows padded
    with zeros to ``padded_vocab_size`` first."""
    out = {}
    for k, v in ref_state.items():
        spec = next((s for suffix, s in SPLITS.items() if k.endswith(suffix)), None)
        if k in ("wte.weight", "lm_head.weight"):
            v = pad(v, 0, padded_vocab_size(v.shape[0], tp))
        out[k] = v if spec is None else shard(v, rank_tp, tp, *spec)
    return out


def padding_rows(local: torch.Tensor, rank_tp: int, vocab_size: int) -> torch.Tensor:
    """The rows of this rank's vocabulary shard that lie beyond the real vocabulary."""
    rows = local.shape[0]
    return local[max(0, min(rows, vocab_size - rank_tp * rows)):]


@pytest.mark.equivalence
@pytest.mark.parametrize("name", [*CASES, *UNTIED, *PADDED])
def test_tp_matches_reference(name):
    cfg, results = run(name)
    layout = cfg.layout
    ref = reference(cfg.replace(layout=BASE.layout))
    assert max(ref.grad_norms) > cfg.grad_clip  # clipping was active
    for rank, res in enumerate(results):
        assert_matches_reference(res, ref, cfg, state=None, who=f"rank {rank}")
        # every rank holds exactly its documented shard of every reference tensor
        diff, where = max_param_diff(res["state"], expected_local(ref.state, rank % layout.tp, layout.tp))
        assert diff <= param_atol(cfg), f"rank {rank}: max |shard - reference shard| = {diff:.3g} at {where}"
        for k in ("wte.weight", "lm_head.weight"):  # padding: zero gradients, so AdamW left it 0
            rows = padding_rows(res["state"][k], rank % layout.tp, cfg.model_config().vocab_size)
            assert torch.count_nonzero(rows) == 0, f"rank {rank}: {k} padding rows moved"
    # ... and rank 0 gathers them back into the reference's full state dict
    full = results[0]["full_state"]
    assert_matches_reference(results[0], ref, cfg, state="full_state", who="gathered state")
    assert all(r["full_state"] is None for r in results[1:])
    if not cfg.untie_embeddings:
        assert torch.equal(full["lm_head.weight"], full["wte.weight"])


@pytest.mark.parametrize("name", ["tp2", "tp2-sp", "dp2-tp2-sp-accum2", "tp2-recompute-full",
                                  "tp2-sp-recompute-selective", "tp2-sp-recompute-full",
                                  "odd-tp4", "odd-tp4-sp-untied"])
def test_tp_comm_bytes_match_formula(name):
    """Per step: the formula, which has no vocabulary term (padded or not). The one gather of the
    final state (``"checkpoint"``, tp ranks of dp index 0) moves every shard at its padded size."""
    cfg, results = run(name)
    layout, model = cfg.layout, cfg.model_config()
    expected = tp_comm_per_step(model, layout.tp, layout.sequence_parallel,
                                cfg.global_batch // layout.dp, cfg.seq_len, layout.microbatches,
                                layout.recompute)
    # per block qkv (3H^2 + 3H), proj H^2, fc1 (FH + F), fc2 FH; the embedding V'H, untied head V'H
    L, H, F, heads = model.num_layers, model.hidden, model.ffn_hidden, 1 + (not model.tie_embeddings)
    vocab_rows = padded_vocab_size(model.vocab_size, layout.tp)
    gather = (6 * L + heads, 4 * (L * (4 * H * H + 3 * H + 2 * F * H + F) + heads * vocab_rows * H))
    for rank, res in enumerate(results):
        per_step_total = sum(b for _, b in expected.values())
        assert [s["tp"] for s in res["comm_bytes"]] == [per_step_total] * cfg.steps, f"rank {rank}"
        ops = res["ops"]["tp"]
        measured = {op: (s["calls"], s["bytes"]) for op, s in ops.items() if op != "checkpoint"}
        assert measured == {op: (c * cfg.steps, b * cfg.steps) for op, (c, b) in expected.items()}, f"rank {rank}"
        if rank < layout.tp:  # dp index 0
            assert (ops["checkpoint"]["calls"], ops["checkpoint"]["bytes"]) == gather, f"rank {rank}"


def clipped_grads_fn(cfg, clip: float):
    """One step's gradients after clipping, gathered to full shapes (on global rank 0), and this
    rank's gradients of its vocabulary padding rows (before clipping; empty without padding)."""
    from paratrain.data import get_batch, load_corpus
    from paratrain.launch import RankEnv
    from paratrain.parallel.shard import gather_full_state
    from paratrain.train import setup

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"), load_corpus())
    x, y = get_batch(s.corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, 1, s.rows)
    s.pm.forward_backward(torch.from_numpy(x), torch.from_numpy(y))
    params = dict(s.pm.named_parameters())
    vocab = cfg.model_config().vocab_size
    padding = {k: padding_rows(params[k].grad, s.mesh.coords.tp, vocab).clone()
               for k in ("wte.weight", "lm_head.weight") if k in params}
    norm = s.pm.clip_grad_norm_(clip)
    grads = gather_full_state(s.pm.module, s.mesh.tp, grads=True) if s.mesh.coords.dp == 0 else None
    return float(norm), grads, padding


def reference_clipped_grads(cfg, clip: float):
    from paratrain.data import get_batch, load_corpus
    from paratrain.models.gpt import build_reference

    model = build_reference(cfg.model_config(), cfg.seed)
    x, y = get_batch(load_corpus().train, cfg.seq_len, cfg.global_batch, cfg.seed, 1)
    model(torch.from_numpy(x), torch.from_numpy(y)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return float(norm), {k: p.grad for k, p in model.state_dict(keep_vars=True).items()}


@pytest.mark.equivalence
@pytest.mark.parametrize("base,layout", [(BASE, dict(tp=2)), (BASE, dict(dp=2, tp=2, sequence_parallel=True)),
                                         (ODD, dict(tp=4))], ids=["tp2", "dp2-tp2-sp", "odd-tp4"])
def test_clipping_counts_each_parameter_once(base, layout):
    """The clipped gradients equal the reference's with a clip value that really clips (the
    coefficient is ~0.04): a replicated parameter counted twice, or a shard counted once, would
    change the norm and with it every clipped gradient. With a padded vocabulary the padding
    rows' gradients are exactly zero (so they add nothing to the norm, and AdamW never moves
    them)."""
    cfg = with_layout(base, **layout)
    ref_norm, ref_grads = reference_clipped_grads(cfg, clip=0.3)
    results = run_ranks(cfg.layout.world_size, clipped_grads_fn, cfg, 0.3)
    assert 0.3 / ref_norm < 0.5
    for rank, (norm, _, padding) in enumerate(results):
        assert norm == pytest.approx(ref_norm, rel=FIRST_NORM_RTOL)  # one step: see tests/common.py
        for k, rows in padding.items():
            assert torch.count_nonzero(rows) == 0, f"rank {rank}: {k} padding rows got a gradient"
    if base is ODD:  # rank 3 of 4 holds padding rows only (257 -> 512: rows 384..511)
        assert [tuple(r["wte.weight"].shape) for _, _, r in results] == [(0, 64), (0, 64), (127, 64), (128, 64)]
    grads = results[0][1]
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        # rounding only; atol for the ~1e-9 noise of the mathematically-zero key bias (tests/common.py)
        torch.testing.assert_close(grads[k], g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m, k=k: f"{k}: {m}")


def test_tp_comm_bytes_of_a_mixture_of_experts_match_formula():
    """tiny-moe at tp 2: the experts and the router stay whole on every tp rank (models/plans.py),
    so a mixture-of-experts block has no MLP reduction: the formula (core/traffic.tp_traffic's
    moe_blocks) must count only attention's, and does, op by op, every step."""
    cfg = with_layout(BASE.replace(model="tiny-moe"), tp=2)
    model = cfg.model_config()
    assert model.num_moe_blocks == model.num_layers  # every block: the MLP reductions all go
    expected = tp_comm_per_step(model, 2, False, cfg.global_batch, cfg.seq_len)
    for rank, res in enumerate(run_ranks(2, train_ranks_fn, cfg)):
        assert [s["tp"] for s in res["comm_bytes"]] == [sum(b for _, b in expected.values())] * cfg.steps, rank
        measured = {op: (s["calls"], s["bytes"]) for op, s in res["ops"]["tp"].items() if op != "checkpoint"}
        assert measured == {op: (c * cfg.steps, b * cfg.steps) for op, (c, b) in expected.items()}, rank
