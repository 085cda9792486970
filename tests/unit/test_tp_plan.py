"""Tensor-parallel plans and stage specs, without processes: a plan naming a missing module or a
width tp does not divide is a clear error listing what exists; on a group of one a plan computes
exactly the model it was applied to (the Hugging Face ones included), and so does a stage spec's
staged forward compared with the HF model's own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paratrain.comm import single_group
from paratrain.config import Layout
from paratrain.mesh import Mesh, MeshShape
from paratrain.models.gpt import CrossEntropy
from paratrain.models.plans import StagedForward, TPStyle
from paratrain.parallel import parallelize
from paratrain.parallel.tp_plan import apply_tp_plan, check_tp_plan

transformers = pytest.importorskip("transformers")
from paratrain.models import hf  # noqa: E402

GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 64, "n_positions": 16}
LLAMA = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 48, "vocab_size": 64, "max_position_embeddings": 16}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 12)
        self.up = nn.Linear(12, 30)
        self.down = nn.Linear(30, 12)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(self.emb(idx))).sum()


def test_a_missing_module_lists_the_modules_that_exist():
    with pytest.raises(ValueError, match=r"'mlp\.fc1', which matches no module of Tiny; its modules are: "
                                         r"emb, up, down"):
        check_tp_plan(Tiny(), {"mlp.fc1": "column"}, 2)


def test_a_width_tp_does_not_divide_is_an_error_naming_the_module_and_valid_tp():
    with pytest.raises(ValueError, match=r"tp=4 does not divide the width 30 of 'up'.*valid tp: \[1, 2, 3, 5, 6"):
        check_tp_plan(Tiny(), {"up": "column"}, 4)
    with pytest.raises(ValueError, match="needs a linear layer"):
        check_tp_plan(Tiny(), {"emb": "row"}, 2)
    with pytest.raises(ValueError, match="unknown tensor-parallel style 'colum'"):
        check_tp_plan(Tiny(), {"up": "colum"}, 2)


def test_llama_kv_heads_tp_does_not_divide_say_so():
    model = hf.build_hf("llama", LLAMA)
    check_tp_plan(model, hf.tp_plan("llama", hf.hf_config("llama", LLAMA)), 2)
    with pytest.raises(ValueError, match=r"tp=4 does not divide the 2 key/value heads .* of "
                                         r"'model\.layers\.0\.self_attn\.k_proj'.*valid tp: \[1, 2\]"):
        check_tp_plan(model, hf.tp_plan("llama", hf.hf_config("llama", LLAMA)), 4)


def test_gpt2_fused_qkv_splits_by_heads():
    cfg = dict(GPT2, n_head=2)
    with pytest.raises(ValueError, match=r"tp=4 does not divide the 2 attention heads of "
                                         r"'transformer\.h\.0\.attn\.c_attn' \(each of its 3 fused parts\)"):
        check_tp_plan(hf.build_hf("gpt2", cfg), hf.tp_plan("gpt2", hf.hf_config("gpt2", cfg)), 4)


def test_parallelize_asks_for_the_plans_a_layout_needs():
    mesh = Mesh.build(MeshShape(1, 1, 1), 0)
    with pytest.raises(ValueError, match=r"recompute='full' replays each block of Tiny in backward: it needs the "
                                         r"stage spec"):
        parallelize(Tiny(), mesh, Layout(recompute="full"))
    with pytest.raises(ValueError, match="replays the built-in GPT's attention core only; for Tiny valid: 'full'"):
        parallelize(Tiny(), mesh, Layout(recompute="selective"))


@pytest.mark.parametrize("kind,fields", [("gpt2", GPT2), ("llama", LLAMA)])
def test_hf_plan_on_one_rank_is_the_hf_model(kind, fields):
    torch.set_num_threads(1)
    cfg = hf.hf_config(kind, fields)
    ref = hf.build_hf(kind, fields, seed=3)
    model = hf.build_hf(kind, fields, seed=3)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    want = hf.reference_loss(ref, x, y)
    staged = StagedForward(model, hf.stages(kind, cfg))
    assert torch.equal(staged(x, y), want)  # the staged forward is HF's own, bit for bit
    apply_tp_plan(model, hf.tp_plan(kind, cfg), single_group("tp"), sequence_parallel=True)
    assert type(model.lm_head).__name__ == "ColumnParallelLinear"
    got = staged(x, y)  # the vocab-parallel loss rounds differently from F.cross_entropy
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    got.backward()
    want.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_plan_on_your_own_module():
    torch.manual_seed(0)
    model = Tiny()
    model.criterion = CrossEntropy()
    plan = {"emb": "vocab_embedding", "up": "column", "down": TPStyle("row", unit=3, what="groups")}
    apply_tp_plan(model, plan, single_group("tp"))
    assert [type(m).__name__ for m in (model.emb, model.up, model.down)] == \
        ["VocabParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear"]
