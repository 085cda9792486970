"""Context parallelism (ring attention over the cp ranks, ``parallel/context.py``)."""

from __future__ import annotations

import functools

import pytest
import torch

from paratrain.config import Layout
from paratrain.core.traffic import cp_comm_per_step
from paratrain.reference import reference_train
from tests.common import BASE, assert_matches_reference, with_layout
from tests.harness import run_ranks


def _ring_vs_sdpa(n: int) -> list[float]:
    """Runs on every rank: ring attention of this rank's chunks vs the whole-sequence causal SDPA
    (fp64), forward and the three input gradients; the largest |difference| of each."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from paratrain.mesh import Mesh, MeshShape
    from paratrain.parallel.context import ring_attention, split_sequence

    mesh = Mesh.build(MeshShape(cp=n), dist.get_rank())
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 8 * n, 8, generator=g, dtype=torch.float64) for _ in range(4))
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*whole, is_causal=True)
    ref.backward(grad)

    def local(t: torch.Tensor) -> torch.Tensor:  # (B, h, T, d) -> this rank's (B, h, T/n, d)
        return split_sequence(t.transpose(1, 2), mesh.cp).transpose(1, 2).contiguous()

    mine = [local(t).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, mesh.cp)
    out.backward(local(grad))
    return [(out - local(ref)).abs().max().item()] + [
        (a.grad - local(b.grad)).abs().max().item() for a, b in zip(mine, whole)]


def test_ring_attention_is_causal_attention_fp64():
    """The attention alone, in fp64 (run in the same launches as the training runs below): any
    wrong block, mask, merge or gradient hop is O(1); rounding is ~1e-15."""
    for world in sorted(CASES):
        _, results = _run(world)
        for rank, r in enumerate(results):
            assert max(r["ring"]) < 1e-12, (world, rank, r["ring"])


# --- whole training runs against the single-process reference ---------------------------------
# Tolerances: tests/common.py (multiples of the measured noise floor). A cp rank computes the same
# sums as the reference in another order -- the softmax of each query row from ring blocks merged
# by their log-sum-exp, the gradients of replicated parameters as a sum over dp x cp ranks of
# their tokens' shares -- so it differs from the reference by float rounding only. tiny-odd (2
# blocks of width 64, one of the six references of the noise floor; its vocabulary of 257 padded
# under tp) keeps the 6 layouts' 5 steps cheap.
ODD = BASE.replace(model="tiny-odd")
CASES = {  # world size -> layouts run one after another in the same ranks (one launch per size)
    2: {"cp2": dict(cp=2), "cp2-recompute-selective": dict(cp=2, recompute="selective"),
        "cp2-recompute-full": dict(cp=2, recompute="full"),
        # ZeRO shards over dp x cp, the ranks that replicate the parameters (parallel/__init__.py)
        "cp2-zero1": dict(cp=2, zero=1), "cp2-zero3": dict(cp=2, zero=3)},
    4: {"cp4": dict(cp=4), "cp2-tp2": dict(cp=2, tp=2), "cp2-tp2-sp": dict(cp=2, tp=2, sequence_parallel=True),
        "dp2-cp2": dict(dp=2, cp=2), "cp2-pp2": dict(cp=2, pp=2, microbatches=2),
        "dp2-cp2-zero2-mb2": dict(dp=2, cp=2, zero=2, microbatches=2), "cp2-pp2-zero1": dict(cp=2, pp=2, zero=1,
                                                                                           microbatches=2)},
}


def _train_layouts(cfgs: dict) -> dict:
    """Runs on every rank: each layout's 5 steps (the last under the activation meter), the
    parameters gathered to full shape on rank 0, the cp group's counters of every step."""
    from paratrain.launch import RankEnv
    from paratrain.parallel.memory import ActivationMeter
    from paratrain.train import setup, train_step

    out = {"ring": _ring_vs_sdpa(RankEnv.from_env().world_size)}
    for name, cfg in cfgs.items():
        s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
        records, cp_ops = [], []
        for step in range(1, cfg.steps + 1):
            s.mesh.cp.stats.reset()
            if step == cfg.steps:
                with ActivationMeter(s.pm.weight_tensors()) as meter:
                    records.append(train_step(s, step))
            else:
                records.append(train_step(s, step))
            cp_ops.append({op: (st.calls, st.bytes) for op, st in s.mesh.cp.stats.ops.items() if op != "p2p_wait"})
        out[name] = {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
                     "full_state": s.pm.full_state_dict(), "cp_ops": cp_ops, "activations": meter.peak_bytes,
                     "blocks": sum(1 for b in s.pm.module.blocks if hasattr(b, "attn"))}
    return out


def _reference_activations(cfg) -> int:
    """Saved-activation bytes of one reference forward/backward on the global batch."""
    from paratrain.data import get_batch, load_corpus
    from paratrain.models.gpt import build_reference
    from paratrain.parallel.memory import ActivationMeter

    model = build_reference(cfg.model_config(), cfg.seed)
    x, y = get_batch(load_corpus(cfg.data).train, cfg.seq_len, cfg.global_batch, cfg.seed, 1)
    with ActivationMeter(model.parameters()) as meter:
        model(torch.from_numpy(x), torch.from_numpy(y)).backward()
    return meter.peak_bytes


@functools.cache
def _run(world: int) -> tuple[dict, dict]:
    cfgs = {name: with_layout(ODD, **layout) for name, layout in CASES[world].items()}
    return cfgs, run_ranks(world, _train_layouts, cfgs, timeout=300)


@functools.cache
def _reference(cfg):
    return reference_train(cfg.replace(layout=Layout()))


@pytest.mark.equivalence
@pytest.mark.parametrize("world", sorted(CASES))
def test_context_parallel_matches_reference(world):
    cfgs, results = _run(world)
    for name, cfg in cfgs.items():
        res = results[0][name]
        assert_matches_reference(res, _reference(cfg), cfg, state="full_state", who=name)
        for rank, r in enumerate(results):  # every rank reports the same global loss and norm
            assert r[name]["losses"] == res["losses"] and r[name]["grad_norms"] == res["grad_norms"], (name, rank)


@pytest.mark.parametrize("world", sorted(CASES))
def test_context_parallel_traffic_and_memory(world):
    """The cp group moves exactly cp_comm_per_step's messages every step; the saved activations
    per rank are about 1/cp (and 1/dp) of the reference's."""
    cfgs, results = _run(world)
    ref_act = _reference_activations(ODD)
    for name, cfg in cfgs.items():
        lay = cfg.layout
        for rank, r in enumerate(results):
            res = r[name]
            want = cp_comm_per_step(cfg.model_config(), lay.cp, lay.tp, cfg.global_batch // lay.dp, cfg.seq_len,
                                    lay.microbatches, num_layers=res["blocks"], recompute=lay.recompute)
            for step, ops in enumerate(res["cp_ops"], 1):
                assert ops == want, (name, rank, step, ops, want)
        if lay.pp == 1 and lay.tp == 1 and lay.recompute != "full":  # full: only block inputs are kept
            ratio = results[0][name]["activations"] / ref_act
            share = 1 / (lay.cp * lay.dp * lay.microbatches)  # (one micro-batch's are kept at a time)
            print(f"{name}: activations {results[0][name]['activations']:,} B = {ratio:.3f} x the reference's")
            # per-token activations split exactly; the reference's attention saves a little more
            assert 0.8 * share <= ratio <= 1.1 * share, (name, ratio, share)


def test_checkpoint_resumes_and_reshards_out_of_cp(tmp_path):
    """A cp2 run saves after step 2 (cp shards no parameter: the cp ranks hold the same tensors and
    only cp index 0 writes them) and goes on; resumed in cp2 it continues bit for bit, resumed in
    dp2 (the record says cp=2, the tensors are whole) within RESHARD_RTOL of the cp2 run."""
    from tests.distributed.test_checkpoint_resume import CFG, RESHARD_RTOL, SAVE_AT, _run

    root = str(tmp_path / "checkpoints")
    saved = run_ranks(2, _run, with_layout(CFG, cp=2), root, None)[0]["losses"]
    import json

    manifest = json.loads(next((tmp_path / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["layout"]["cp"] == 2
    same = run_ranks(2, _run, with_layout(CFG, cp=2), None, root)[0]["losses"]
    assert same == {k: v for k, v in saved.items() if k > SAVE_AT}  # float equality: bit for bit
    other = run_ranks(2, _run, with_layout(CFG, dp=2), None, root)[0]["losses"]
    assert sorted(other) == [3, 4]
    for step, loss in other.items():
        assert loss == pytest.approx(saved[step], rel=RESHARD_RTOL), step
