"""ZeRO's pure parts, in one process: the shard layout (shard / unshard), AdamW on shards with
per-parameter-group weight decay, ZeRO-3 gathering and freeing, the traffic formula against the
planner, memory counting, and the layouts the runtime refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratrain.comm import Group, single_group
from paratrain.config import Layout, TrainConfig
from paratrain.core.traffic import zero_comm_per_step
from paratrain.errors import ConfigError
from paratrain.models.configs import get_model_config, param_count
from paratrain.models.gpt import build_reference
from paratrain.optim import make_optimizer
from paratrain.parallel.marks import param_of
from paratrain.parallel.memory import model_state_bytes
from paratrain.parallel.zero import ZeroDataParallel, owned_pieces, padded_numel
from paratrain.plan.cost import estimate
from paratrain.plan.hardware import get_hardware

TINY = get_model_config("tiny")


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), n=st.integers(1, 6))
def test_pieces_cover_every_element_once(sizes, n):
    """shard then unshard: each rank's pieces, put back in rank order, rebuild every tensor, and
    lie inside the rank's k-element shard without overlapping."""
    k = padded_numel(sum(sizes), n) // n
    assert k * n >= sum(sizes) > k * n - n  # padding < n
    rebuilt: list[list[tuple[int, int]]] = [[] for _ in sizes]
    for rank in range(n):
        used = []
        for i, start, length, at in owned_pieces(sizes, n, rank):
            assert length > 0 and 0 <= at and at + length <= k
            used.append((at, at + length))
            rebuilt[i].append((start, length))
        used.sort()
        assert all(a[1] <= b[0] for a, b in zip(used, used[1:]))
    for size, parts in zip(sizes, rebuilt):
        pos = 0
        for start, length in parts:  # in rank order: consecutive slices from 0 to size
            assert start == pos
            pos += length
        assert pos == size


def fake_dp_group(rank: int, n: int) -> Group:
    """A dp group of n ranks for code paths that do not communicate (construction, stepping)."""
    return Group("dp", list(range(n)), rank, pg=object())


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_adamw_on_shards_is_adamw(n):
    """n ranks (simulated: each its own copy of the model, ZeRO-3 so that nothing is sent) step
    their pieces with the gradient's shards; the shards put together equal the reference AdamW's
    parameters after 3 steps. Weight decay 0.5 makes a piece in the wrong param group visible
    (matrices/embeddings decay, biases/LayerNorms do not), and n = 3 cuts tensors mid-row."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.5)
    ref = build_reference(TINY, 0)
    ref_opt = make_optimizer(ref.named_parameters(), cfg)
    ranks = []
    for r in range(n):
        model = copy.deepcopy(ref)
        sync = ZeroDataParallel(model, fake_dp_group(r, n), 3, units=[[p for p in model.parameters()]])
        ranks.append((sync, sync.shard_optimizer(make_optimizer(model.named_parameters(), cfg))))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ref.parameters()]
        for p, grad in zip(ref.parameters(), grads):
            p.grad = grad
        ref_opt.step()
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        for sync, opt in ranks:
            (b,) = sync.buckets
            b.grad_shard.copy_(torch.nn.functional.pad(flat, (0, b.padded - b.numel))[b.lo:b.hi])
            opt.step()
    whole = torch.cat([sync.buckets[0].shard for sync, _ in ranks])[:flat.numel()]
    want = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    assert torch.allclose(whole, want, rtol=0, atol=1e-7), (whole - want).abs().max()


def test_zero3_gather_and_free_on_one_rank():
    model = build_reference(TINY, 0)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    sync = ZeroDataParallel(model, single_group("dp"), 3, units=[list(model.parameters())])
    (b,) = sync.buckets
    assert b.flat.untyped_storage().nbytes() == 0  # freed after sharding
    for name, p in model.named_parameters():
        assert p.shape == want[name].shape and p.stride() == (0,) * p.dim()  # placeholder
    with pytest.raises(RuntimeError):
        model.wte.weight.add_(1.0)  # a placeholder cannot be written
    with sync.full_params():
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert b.flat.untyped_storage().nbytes() == 0
    # a forward under the gathering hooks computes the reference's loss
    from paratrain.parallel.zero3 import zero3

    model2, ref = build_reference(TINY, 0), build_reference(TINY, 0)
    zero3(model2, single_group("dp"))
    x = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model2(x, x), ref(x, x))


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("dp,m", [(2, 1), (4, 1), (2, 2), (8, 4)])
def test_traffic_formula_is_the_planners(zero, dp, m):
    """zero_comm_per_step on the wire, with S = 4 psi (one bucket, no padding), is the planner's
    dp communication for the same layout (fp32)."""
    psi = param_count(TINY)
    layout = Layout(dp=dp, zero=zero, microbatches=m)
    est = estimate(TINY, layout, get_hardware("A100-80GB"), 8 * dp * m, 32, precision="fp32")
    ours = zero_comm_per_step(zero, [4 * psi], m)
    wire = sum(b * (dp - 1) / dp for op, (_, b) in ours.items() if op != "grad_norm")
    assert wire == pytest.approx(est.comm_bytes_per_device.dp, rel=1e-12)
    dp_wire = 2 * (dp - 1) / dp * zero_comm_per_step(0, [4 * psi])["all_reduce"][1]
    assert wire == pytest.approx(dp_wire * {1: 1, 2: (m + 1) / 2, 3: 1.5 * m}[zero])


def test_state_bytes_count_each_storage_once():
    model = build_reference(TINY, 0)
    sync = ZeroDataParallel(model, single_group("dp"), 1)  # parameters become views of one flat
    opt = sync.shard_optimizer(make_optimizer(model.named_parameters(), TrainConfig()))
    psi = param_count(TINY)
    assert model_state_bytes(model, opt).params == 4 * psi
    assert model_state_bytes(model, opt).grads == 4 * psi  # the bucket; shard views add nothing
    assert model_state_bytes(model, opt).optimizer == 0  # AdamW's state appears at the first step


BASE = TrainConfig(global_batch=8, seq_len=32)


@pytest.mark.parametrize("layout,dp_impl,match", [
    (Layout(dp=2, zero=1), "naive", "dp_impl 'naive' is the teaching version"),
])
def test_unsupported_zero_layouts_are_config_errors(layout, dp_impl, match):
    with pytest.raises(ConfigError, match=match):
        BASE.replace(layout=layout, dp_impl=dp_impl).validate()


@pytest.mark.parametrize("layout", [Layout(dp=2, zero=3), Layout(dp=2, pp=2, zero=2), Layout(dp=2, tp=2, zero=3),
                                    Layout(zero=1), Layout(dp=2, pp=2, zero=3, microbatches=2, schedule="zb-h1")])
def test_supported_zero_layouts_validate(layout):
    BASE.replace(layout=layout).validate()


@pytest.mark.parametrize("stage", [1, 2])
def test_unused_parameter_gets_zero_and_micro_batches_add_up(stage):
    """On one rank (every collective a copy): a parameter no forward uses reduces to a zero
    gradient (stage 2 writes the bucket without zeroing it first, so the gap must be zeroed),
    and two micro-batches' gradients add up in the shard (stage 2 reduces each)."""
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    module = torch.nn.ModuleList([used, unused])
    ref = copy.deepcopy(used)
    sync = ZeroDataParallel(module, single_group("dp"), stage)
    sync.zero_grad()
    xs = torch.randn(2, 5, 4)
    for i, x in enumerate(xs):
        sync.set_sync(i == len(xs) - 1)
        used(x).square().sum().backward()
        ref(x).square().sum().backward()
    sync.finish()
    grads = {param_of(piece): piece.grad for piece in sync.grad_params}
    for p, q in zip(used.parameters(), ref.parameters()):
        assert torch.allclose(grads[p], q.grad.reshape(-1), rtol=1e-6, atol=0)
    for p in unused.parameters():
        assert torch.equal(grads[p], torch.zeros(p.numel()))


def test_stage2_gradient_shards_hold_no_memory_between_steps():
    """ZeRO-2 releases each bucket's reduced gradient shard at ``zero_grad`` (as DeepSpeed and
    FSDP2 hold no gradient between steps) and the step's first reduction writes it afresh: over
    two steps the shards are the reference's gradient of that step alone (not the sum with the
    step before, nor stale memory), a bucket no backward reached reads zero, and between steps
    the shards' storage is empty. Catches a release that forgot the restore (reads fail), a
    restore without the first write (garbage), or an unreached bucket left unzeroed."""
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    module = torch.nn.ModuleList([used, unused])
    ref = copy.deepcopy(used)
    sync = ZeroDataParallel(module, single_group("dp"), 2, bucket_mb=4 * 64 * 32 / 2**20)  # a bucket each
    assert len(sync.buckets) >= 2
    for step in range(2):
        sync.zero_grad()
        assert all(b.grad_shard.untyped_storage().nbytes() == 0 for b in sync.buckets)
        ref.zero_grad()
        x = torch.randn(5, 64)
        sync.set_sync(True)
        used(x).square().sum().backward()
        ref(x).square().sum().backward()
        sync.finish()
        grads = {param_of(piece): piece.grad for piece in sync.grad_params}
        for p, q in zip(used.parameters(), ref.parameters()):
            assert torch.allclose(grads[p], q.grad.reshape(-1), rtol=1e-6, atol=0), (step, p.shape)
        for p in unused.parameters():
            assert torch.equal(grads[p], torch.zeros(p.numel())), step
        assert all(b.grad_shard.untyped_storage().nbytes() == b.grad_shard.numel() * 4 for b in sync.buckets)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_on_one_rank_is_the_reference(zero):
    """dp = 1 is the same code path with every collective a copy: the reference's losses, norms
    and parameters, with two micro-batches (stage 2/3 accumulate reduced shards)."""
    from paratrain.launch import RankEnv
    from paratrain.reference import reference_train
    from paratrain.train import setup, train_step
    from tests.common import BASE as TEST_BASE
    from tests.common import max_param_diff, with_layout

    cfg = with_layout(TEST_BASE.replace(steps=3), zero=zero, microbatches=2)
    s = setup(cfg, RankEnv(), torch.device("cpu"))
    records = [train_step(s, step) for step in range(1, cfg.steps + 1)]
    ref = reference_train(cfg.replace(layout=Layout()))
    assert [r["loss"] for r in records] == pytest.approx(ref.losses, rel=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx(ref.grad_norms, rel=1e-5)
    diff, where = max_param_diff(s.pm.full_state_dict(), ref.state)
    assert diff <= 1e-5, where


@pytest.mark.parametrize("order", ["IWIW", "IIWW", "IIIWWW", "IWIIWW"])  # a W after its I
def test_split_backward_reduces_each_bucket_once_per_complete_round(order):
    """Stage 2 under a zero-bubble split (``split_backward``): an ``I`` gives the bias gradients
    (they wait in ``p.grad``), a ``W`` the weights'. However I and W interleave, the shard ends
    with the sum over micro-batches, and a bucket is reduced only when each of its parameters
    has a gradient since the last reduction (plus what is left at ``finish``): never at every
    action. The orders are those of 1F1B-like (IWIW) and deferred-W (IIWW) schedules."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    ref = copy.deepcopy(lin)
    sync = ZeroDataParallel(lin, single_group("dp"), 2)
    sync.split_backward = True
    launches = []
    launch = sync._launch
    sync._launch = lambda b: (launches.append(b.index), launch(b))  # type: ignore[method-assign]
    sync.zero_grad()
    xs = torch.randn(order.count("I"), 5, 4)
    seen = {"I": 0, "W": 0}
    for kind in order:
        x = xs[seen[kind]]
        seen[kind] += 1
        sync.holding = kind == "I"
        sync.set_sync(False)
        y = x @ lin.weight.detach().t() + lin.bias if kind == "I" else x @ lin.weight.t() + lin.bias.detach()
        y.square().sum().backward()
        ref(x).square().sum().backward() if kind == "I" else None
    sync.finish()
    grads = {param_of(piece): piece.grad for piece in sync.grad_params}
    for p, q in zip(lin.parameters(), ref.parameters()):
        assert torch.allclose(grads[p], q.grad.reshape(-1), rtol=1e-6, atol=1e-7), p.shape
    # one bucket: reduced when a W completes it (an I's bias gradient waiting), and at finish
    # what a later W left (the old code reduced at every action: 4, 4, 6, 6 -- fails so)
    assert len(launches) == {"IWIW": 2, "IIWW": 2, "IIIWWW": 2, "IWIIWW": 3}[order], launches
    assert all(p.grad is None for p in lin.parameters())  # nothing left waiting in autograd's tensors
