"""Hugging Face GPT-2 (``GPT2LMHeadModel``) and Llama (``LlamaForCausalLM``) in every layout
reproduce the single-process HF model: its own forward (``model(input_ids).logits``), the same
seed, batches and AdamW; losses, pre-clip gradient norms and every parameter (under HF's names)
after the steps. Several layouts run one after another inside one ``run_ranks`` call (one
process launch per world size), so the whole file stays within a few seconds per model.

Tolerances: tests/common.py, multiples of the measured noise floor of our own GPT. These models
are the same kind of computation (fp32 matmuls, LayerNorm/RMSNorm, SDPA, AdamW) at a smaller
width, and the parallel layouts reorder the same sums; the HF reference itself differs from our
staged forward (embed -> blocks -> head, what every layout runs) by 0.0 here. A wrong shard (q/k/v
heads of another rank, a transposed Conv1D split the wrong way), a missing reduction or a tied
embedding counted twice moves losses by >> 1e-5 and parameters by O(lr), as for our GPT.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

pytest.importorskip("transformers")

from paratrain.config import Layout, TrainConfig  # noqa: E402
from paratrain.reference import reference_train  # noqa: E402
from tests.common import BASE, assert_matches_reference, bf16_failures  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

# 4 blocks (the interleaved schedule needs pp x 2 of them), width 32, seq 16, byte tokens. GPT-2's vocabulary
# 256 divides by tp; Llama's 257 does not (padded rows), and its 4 query heads share 2 kv heads.
GPT2 = json.dumps({"n_layer": 4, "n_embd": 32, "n_head": 4, "vocab_size": 256, "n_positions": 16})
LLAMA = json.dumps({"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 64, "vocab_size": 257, "max_position_embeddings": 16})
HF_BASE = BASE.replace(steps=3, seq_len=16, global_batch=8)
CFG = {"gpt2": HF_BASE.replace(hf="gpt2", hf_config=GPT2), "llama": HF_BASE.replace(hf="llama", hf_config=LLAMA)}

PP = dict(microbatches=2)
# Every kind of layout once: plain dp (with tp, and with pp), ZeRO 1/2/3, tp with and without
# sequence parallelism, pp under each schedule, and 3D.
LAYOUTS: dict[int, list[tuple[str, Layout]]] = {
    4: [("dp2-tp2", Layout(dp=2, tp=2)),
        ("dp2-tp2-sp-zero1", Layout(dp=2, tp=2, sequence_parallel=True, zero=1)),
        ("dp4-zero3-accum2", Layout(dp=4, zero=3, microbatches=2)),
        ("pp2-dp2-gpipe", Layout(pp=2, dp=2, schedule="gpipe", **PP)),
        ("pp2-tp2-sp-1f1b", Layout(pp=2, tp=2, schedule="1f1b", sequence_parallel=True, **PP)),
        ("pp2-dp2-interleaved-zero2", Layout(pp=2, dp=2, schedule="interleaved", virtual_stages=2, zero=2, **PP)),
        # full recomputation: every block replayed in backward, its tp collectives and ZeRO-3 gathers too
        ("dp2-tp2-sp-zero3-recompute", Layout(dp=2, tp=2, sequence_parallel=True, zero=3, recompute="full")),
        # zero-bubble: Llama's nn.Linear weight gradients deferred to W; GPT-2's Conv1D (addmm, not
        # F.linear) is not split, so its W is computed in I: still the same gradients
        ("pp2-dp2-zb-h1", Layout(pp=2, dp=2, schedule="zb-h1", **PP))],
    8: [("dp2-pp2-tp2-sp", Layout(dp=2, pp=2, tp=2, sequence_parallel=True, **PP))],
}


def layouts_fn(cfgs: list[TrainConfig]) -> list[dict]:
    """Every rank: the production setup and steps of each config in turn."""
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    out = []
    for cfg in cfgs:
        s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
        records = [train_step(s, step) for step in range(1, cfg.steps + 1)]
        out.append({"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
                    "full_state": s.pm.full_state_dict()})
    return out


@functools.cache
def reference(kind: str):
    return reference_train(CFG[kind])


# --precision bf16 (bf16 weights, fp32 masters): in the same launch, compared with the bf16
# reference (tests/common.py's BF16_* tolerances, measured on our GPT; the same arithmetic). Width
# 128 as our `tiny`: the parameter check counts the *fraction* of a tensor's elements off by more
# than a bf16 ulp + 0.5 lr (2%); at width 32 one noisy element of a bias is already 3.1%.
BF16_SHAPES = {"gpt2": {"n_layer": 2, "n_embd": 128}, "llama": {"num_hidden_layers": 2, "hidden_size": 128,
                                                                "intermediate_size": 256}}
BF16 = {4: [("bf16-dp2-tp2-sp-zero1", Layout(dp=2, tp=2, sequence_parallel=True, zero=1)),
            ("bf16-pp2-dp2-1f1b-fp32grad", Layout(pp=2, dp=2, schedule="1f1b", **PP))]}
BF16_CHANGES = {"bf16-pp2-dp2-1f1b-fp32grad": dict(grad_dtype="fp32")}


def bf16_base(kind: str) -> TrainConfig:
    cfg = CFG[kind]
    return cfg.replace(precision="bf16", hf_config=json.dumps({**json.loads(cfg.hf_config), **BF16_SHAPES[kind]}))


def bf16_cfg(kind: str, name: str, layout: Layout) -> TrainConfig:
    return bf16_base(kind).replace(layout=layout, **BF16_CHANGES.get(name, {}))


@functools.cache
def run(world: int) -> list[list[dict]]:
    cfgs = [CFG[kind].replace(layout=layout) for kind in CFG for _, layout in LAYOUTS[world]]
    cfgs += [bf16_cfg(kind, name, layout) for kind in CFG for name, layout in BF16.get(world, [])]
    return run_ranks(world, layouts_fn, cfgs, timeout=240)


@pytest.mark.equivalence
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_hf_layouts_match_the_hf_model(world):
    results = run(world)
    names = [(kind, name) for kind in CFG for name, _ in LAYOUTS[world]]
    for i, (kind, name) in enumerate(names):
        ref, cfg = reference(kind), CFG[kind]
        assert max(ref.grad_norms) > cfg.grad_clip  # clipping was active
        who = f"{kind} {name}"
        for rank, per_rank in enumerate(results):
            assert_matches_reference(per_rank[i], ref, cfg, state=None, who=f"{who} rank {rank}")
        assert_matches_reference(results[0][i], ref, cfg, state="full_state", who=f"{who} gathered state")


@functools.cache
def bf16_reference(kind: str):
    return reference_train(bf16_base(kind))


# Not marked `equivalence` (the bf16 reference is bit-identical under both kernel sets: see
# tests/distributed/test_precision.py); it reads the results of the same launch as the test above.
def test_hf_bf16_matches_the_bf16_hf_model():
    results = run(4)
    first = sum(len(LAYOUTS[4]) for _ in CFG)
    names = [(kind, name, layout) for kind in CFG for name, layout in BF16[4]]
    failures = []
    for i, (kind, name, layout) in enumerate(names):
        res = results[0][first + i]
        assert {v.dtype for v in res["full_state"].values()} == {torch.bfloat16}, name
        cfg = bf16_cfg(kind, name, layout)
        failures += [f"{kind} {name}: {f}" for f in bf16_failures(res, bf16_reference(kind), cfg)]
    assert not failures, "; ".join(failures)
