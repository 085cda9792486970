"""The planner's mixture-of-experts shapes (plan/formulas.py MoEShape, core/traffic.ep_comm_per_step):
pure, no torch."""

from __future__ import annotations

import json

import pytest

from paratrain.config import Layout
from paratrain.core.ring import wire_bytes
from paratrain.core.traffic import ep_comm_per_step
from paratrain.models.configs import active_param_count, get_model_config, mlp_param_count, param_count
from paratrain.plan import formulas as f


@pytest.mark.parametrize("name", ["tiny-moe", "small-moe", "mixtral-8x7b"])
def test_block_formula_counts_every_expert_and_the_router(name):
    m = get_model_config(name)
    block = f.block_params_per_device(m.hidden, m.ffn_hidden, 1, **f.shape_args(m))
    dense = param_count(m.replace(num_experts=0))
    assert dense + m.num_layers * (block - f.block_params_per_device(m.hidden, m.ffn_hidden, 1, **f.shape_args(
        m.replace(num_experts=0)))) == param_count(m)
    # ep shards the experts: each device holds E / ep of them, the router and the rest whole
    sharded = f.block_params_per_device(m.hidden, m.ffn_hidden, 1, ep=m.num_experts, **f.shape_args(m))
    assert block - sharded == pytest.approx((m.num_experts - 1) * mlp_param_count(m))


def test_mixtral_flops_follow_the_active_parameters():
    """Mixtral's model FLOPs per step are about 6 x active parameters x tokens (12.9B, not 46.7B),
    the rest the attention scores (4bs^2h per block) and the 2x MLP of top-2."""
    m = get_model_config("mixtral-8x7b")
    tokens = 8 * 4096
    ratio = f.step_flops(m, 8, 4096) / f.six_p_tokens(active_param_count(m), tokens)
    assert 1.0 < ratio < 1.2, ratio
    dense_one_mlp = f.step_flops(m.replace(num_experts=0), 8, 4096)
    assert f.step_flops(m, 8, 4096) > 1.5 * dense_one_mlp


def test_estimate_params_per_device_fall_with_ep():
    from paratrain.plan.cost import estimate
    from paratrain.plan.hardware import get_hardware

    m, hw = get_model_config("mixtral-8x7b"), get_hardware("H100-80GB")
    peaks = [estimate(m, Layout(dp=8, tp=8, pp=4, ep=ep), hw, 64, 4096, "bf16").params_per_device
             for ep in (1, 2, 8)]
    assert peaks[0] > peaks[1] > peaks[2] and peaks[2] < peaks[0] / 5, peaks


def test_ep_traffic_formula():
    m = get_model_config("tiny-moe")
    t = ep_comm_per_step(m, 2, 4, 32, microbatches=2)
    rows = 2 * 4 * 32 * 2  # top-2, 4 sequences of 32 tokens, 2 MoE blocks: dropless
    assert t["ep_dispatch"] == (4, rows * 64 * 4) == t["ep_combine_grad"]
    assert t["ep_counts"] == (4, 4 * 4 * 8)
    assert ep_comm_per_step(m, 1, 4, 32) == {} == ep_comm_per_step(get_model_config("tiny"), 2, 4, 32)
    assert wire_bytes("all_to_all", 4, 1000) == 750


def test_search_enumerates_ep_and_keeps_a_given_one():
    """ep is searched for a mixture of experts (every divisor of dp dividing the experts, each
    layout valid), never for a dense model; a given --ep is pinned on every candidate."""
    from paratrain.plan.search import enumerate_layouts

    moe = get_model_config("tiny-moe")  # 4 experts
    layouts = list(enumerate_layouts(moe, 8, 16, 32, 8, {"ep": 2}))
    assert layouts and all(lay.ep == 2 and lay.dp % 2 == 0 for lay in layouts)
    searched = list(enumerate_layouts(moe, 8, 16, 32, 8, {}))
    assert {lay.ep for lay in searched} == {1, 2, 4}
    assert {lay.ep for lay in searched if lay.dp == 2} == {1, 2}
    for lay in searched:
        lay.validate(moe, 16, 32)
    assert all(lay.ep == 1 for lay in enumerate_layouts(get_model_config("tiny"), 8, 16, 32, 8, {}))


def test_experts_stay_whole_over_tp():
    """Like the runtime (models/plans.py), tp splits attention and the dense MLPs but not the
    experts: at tp 2 each device holds every expert's whole MLP (the measured model states of
    ep2 x tp2 are the planner's: tests/distributed/test_memory.py), and the experts' FLOPs are
    not divided by tp; Megatron's split experts (tp_split) for comparison."""
    import dataclasses

    m = get_model_config("small-moe")
    args = f.shape_args(m)
    for t in (2, 4):
        held = f.block_params_per_device(m.hidden, m.ffn_hidden, t, **args)
        sharded = f.block_params_per_device(m.hidden, m.ffn_hidden, t, ep=m.num_experts, **args)
        share = m.num_moe_blocks / m.num_layers
        assert held - sharded == pytest.approx(share * (m.num_experts - 1) * mlp_param_count(m))
        split = dict(args, moe=dataclasses.replace(args["moe"], tp_split=True))
        assert f.block_params_per_device(m.hidden, m.ffn_hidden, t, **split) < held
    whole = f.unsplit_forward_flops(2, 64, m.hidden, m.ffn_hidden, **args)
    assert whole > 0.5 * f.layer_forward_flops(2, 64, m.hidden, m.ffn_hidden, **args) * share
    assert f.unsplit_forward_flops(2, 64, m.hidden, m.ffn_hidden, **f.shape_args(get_model_config("small"))) == 0


def test_ep_all_to_all_in_the_step_and_bytes():
    """The estimate's ep bytes per device are ep_comm_per_step's wire bytes (dropless), and their
    seconds are in the step (ep_comm), growing with ep's (n - 1)/n; none at ep 1."""
    from paratrain.plan.cost import estimate
    from paratrain.plan.hardware import get_hardware

    m, hw = get_model_config("small-moe"), get_hardware("H100-80GB")
    ests = {ep: estimate(m, Layout(dp=8, ep=ep, microbatches=2), hw, 32, 256, "bf16") for ep in (1, 2, 8)}
    assert ests[1].comm_bytes_per_device.ep == 0 == ests[1].time.ep_comm
    for ep in (2, 8):
        ops = ep_comm_per_step(m, ep, 4, 256, 2, elem_bytes=2)
        want = sum(wire_bytes("all_to_all", ep, b) for _, b in ops.values())
        assert ests[ep].comm_bytes_per_device.ep == pytest.approx(want)
        assert ests[ep].time.ep_comm > 0
        assert ests[ep].step_time_s == pytest.approx(ests[ep].time.total)
    assert ests[8].time.ep_comm > ests[2].time.ep_comm


def test_plan_ranks_only_what_the_runtime_trains_for_a_mixture_of_experts(capsys):
    """`paratrain plan` for a mixture of experts leaves out what `paratrain train` refuses with one
    (cp, sequence parallelism, full recomputation: expert_rules.expert_refusal), where the search
    alone prices them; it still searches ep."""
    import json

    from paratrain.cli import main
    from paratrain.config import runtime_implements
    from paratrain.plan.hardware import get_hardware
    from paratrain.plan.search import search

    argv = ["plan", "--model", "tiny-moe", "--devices", "4", "--global-batch", "8", "--seq-len", "64",
            "--hardware", "cpu", "--precision", "fp32", "--top", "0", "--json"]
    assert main(argv) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    layouts = [Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["layout"].items()}) for r in ranked]
    model = get_model_config("tiny-moe")
    assert layouts and all(runtime_implements(lay, model) for lay in layouts)
    assert {lay.ep for lay in layouts} >= {1, 2, 4}
    every = search(model, 4, get_hardware("cpu"), 8, 64, "fp32").ranked  # the search alone: all valid
    assert any(not runtime_implements(e.layout, model) for e in every)
    assert len(layouts) == sum(runtime_implements(e.layout, model) for e in every)


def test_plan_with_ep_on_a_dense_model_says_why(capsys):
    """--ep on a model without experts: the experts' own error, not the generic 'no valid layout'."""
    from paratrain.cli import main

    assert main(["plan", "--model", "tiny", "--ep", "2", "--devices", "4", "--global-batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "has none; use a model with experts" in " ".join(err.split()), err


def test_mixtral_is_planned_at_its_training_context_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --seq-len the planner takes the 32k context Mixtral was trained with, not the 131k
    positions its config allows (4x the activations); --seq-len still wins; a model without a
    training length keeps max_seq_len; a training length past the positions is refused."""
    from paratrain.cli import main
    from paratrain.errors import ConfigError

    def seq(*extra: str) -> int:
        assert main(["estimate", "--model", "mixtral-8x7b", "--dp", "8", "--ep", "8", "--tp", "8", "--pp", "4",
                     "--global-batch", "64", "--hardware", "H100-80GB", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["seq_len"]

    assert get_model_config("mixtral-8x7b").max_seq_len == 131072
    assert seq() == 32768 and seq("--seq-len", "4096") == 4096
    assert get_model_config("gpt2-124m").planning_seq_len == 1024
    with pytest.raises(ConfigError, match="train_seq_len"):
        get_model_config("tiny", train_seq_len=512)
