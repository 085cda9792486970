"""The pieces of tensor parallelism one at a time: slicing and gathering, the four collectives
(forward and backward), the dropout streams, and the whole transform at degree 1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratrain.comm import single_group
from paratrain.core.traffic import tp_comm_per_step
from paratrain.models.configs import get_model_config
from paratrain.models.gpt import build_reference
from paratrain.parallel.rng import ShardedRNG, derive_seed, seed_default_generator
from paratrain.parallel.shard import full_shape, gather_full_state, shard, shard_parameter, unshard
from paratrain.parallel.tensor import tensor_parallel
from paratrain.parallel.tp_ops import copy_to_tp, gather_from_sp, reduce_from_tp, reduce_scatter_to_sp
from tests.harness import run_ranks


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([1, 2, 4]), chunks=st.sampled_from([1, 3]), dim=st.sampled_from([0, 1]),
       other=st.integers(1, 3), per=st.integers(1, 3))
def test_shard_unshard_roundtrip(n, chunks, dim, other, per):
    shape = [other, other]
    shape[dim] = chunks * n * per
    t = torch.randn(shape)
    shards = [shard(t, r, n, dim, chunks) for r in range(n)]
    assert all(s.shape[dim] == chunks * per for s in shards)
    assert torch.equal(unshard(shards, dim, chunks), t)


def test_padded_shard_gathers_back_to_the_reference_rows():
    """A vocabulary-sized tensor padded with zero rows before slicing: the shard holds the
    padding, its reference shape and the gathered state do not."""
    ref = torch.nn.Embedding(257, 4)
    p = shard_parameter(ref.weight, single_group("tp"), dim=0, padded_size=320)
    assert p.shape == (320, 4) and torch.equal(p[:257], ref.weight) and torch.count_nonzero(p[257:]) == 0
    assert full_shape(p, 1) == (257, 4) and full_shape(ref.weight, 1) == (257, 4)
    module = torch.nn.Module()
    module.weight = p
    p.grad = torch.ones_like(p)
    assert torch.equal(gather_full_state(module, single_group("tp"))["weight"], ref.weight.detach())
    assert gather_full_state(module, single_group("tp"), grads=True)["weight"].shape == (257, 4)


def test_qkv_shard_holds_this_ranks_heads():
    """Rank r's slice of [W_q; W_k; W_v] is [W_q[r]; W_k[r]; W_v[r]]: chunk(3) of it gives the
    q, k and v rows of its own heads (heads 2r, 2r+1 of 4 with n = 2)."""
    H, n = 8, 2
    w = torch.arange(3 * H, dtype=torch.float32).unsqueeze(1)  # row index as value
    q, k, v = shard(w, 1, n, 0, 3).chunk(3)
    assert q.flatten().tolist() == [4, 5, 6, 7]
    assert k.flatten().tolist() == [12, 13, 14, 15]
    assert v.flatten().tolist() == [20, 21, 22, 23]


def test_collectives_are_identity_on_one_rank():
    g = single_group("tp")
    x = torch.randn(2, 4, 3, requires_grad=True)
    for fn in (copy_to_tp, gather_from_sp, reduce_scatter_to_sp):
        y = fn(x, g)
        assert torch.equal(y, x)
        (grad,) = torch.autograd.grad((y * 2).sum(), x)
        assert torch.equal(grad, torch.full_like(x, 2.0))
    y = reduce_from_tp(x.detach().clone(), g)
    assert torch.equal(y, x.detach())
    assert g.stats.calls == 0


def ops_fn():
    """Each collective's forward and backward on 2 ranks, against what its docstring says."""
    import torch.distributed as dist

    from paratrain.comm import Group

    r = dist.get_rank()
    g = Group("tp", [0, 1], r, dist.group.WORLD)
    out = {}
    x = torch.full((2, 4, 3), float(r + 1), requires_grad=True)  # rank 0: ones, rank 1: twos
    for name, fn in (("f", copy_to_tp), ("g", lambda t, g: reduce_from_tp(t * 1, g)),
                     ("gather", gather_from_sp), ("rs", reduce_scatter_to_sp)):
        y = fn(x, g)
        weight = torch.arange(y.numel(), dtype=torch.float32).view_as(y) * (r + 1)
        (grad,) = torch.autograd.grad((y * weight).sum(), x)
        out[name] = (y.detach(), grad)
    return out


def test_collectives_forward_backward_on_two_ranks():
    res = run_ranks(2, ops_fn)
    w = torch.arange(24, dtype=torch.float32).view(2, 4, 3)  # the rank-0 output weight
    for r in range(2):
        x = torch.full((2, 4, 3), float(r + 1))
        y, grad = res[r]["f"]  # identity; backward sums w*1 + w*2
        assert torch.equal(y, x) and torch.equal(grad, 3 * w)
        y, grad = res[r]["g"]  # sum; backward identity (this rank's weight)
        assert torch.equal(y, torch.full_like(x, 3.0)) and torch.equal(grad, w * (r + 1))
        y, grad = res[r]["gather"]  # (2, 8, 3): rank 0's positions then rank 1's
        assert torch.equal(y, torch.cat([torch.ones(2, 4, 3), torch.full((2, 4, 3), 2.0)], dim=1))
        wg = torch.arange(48, dtype=torch.float32).view(2, 8, 3)
        assert torch.equal(grad, 3 * wg[:, 4 * r:4 * r + 4])  # reduce-scatter of w0 + w1
        y, grad = res[r]["rs"]  # (2, 2, 3): this rank's half of T of the sum
        assert torch.equal(y, torch.full((2, 2, 3), 3.0))
        ws = torch.arange(12, dtype=torch.float32).view(2, 2, 3)
        expected = torch.cat([ws, 2 * ws], dim=1)  # all-gather of each rank's weight
        assert torch.equal(grad, expected)


def test_sharded_rng_restores_state_and_differs_by_rank():
    torch.manual_seed(123)
    after_one_draw = torch.get_rng_state()
    torch.randint(0, 2**62, (1,))
    expected = torch.get_rng_state()
    torch.set_rng_state(after_one_draw)
    masks = []
    for tp_index in (0, 1, 0):
        torch.set_rng_state(after_one_draw)
        with ShardedRNG(tp_index).fork():
            masks.append(torch.rand(64))
        assert torch.equal(torch.get_rng_state(), expected)  # the one draw is the only trace
    assert not torch.equal(masks[0], masks[1])  # tp ranks differ
    assert torch.equal(masks[0], masks[2])      # same state, same rank: replayed exactly
    with ShardedRNG(0).fork():
        assert not torch.equal(torch.rand(64), masks[0])  # the next call draws a new mask


def test_default_generator_seeds_by_dp_and_pp_not_tp():
    seeds = {derive_seed(0, "dropout", dp, pp) for dp in range(3) for pp in range(3)}
    assert len(seeds) == 9
    seed_default_generator(7, 1, 0)
    a = torch.rand(4)
    seed_default_generator(7, 1, 0)
    assert torch.equal(torch.rand(4), a)


@pytest.mark.parametrize("sp", [False, True], ids=["tp1", "tp1-sp"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_degree_one_transform_is_the_reference(sp, tied):
    """At tp = 1 the transform is the same code with no-op collectives: the same loss and
    gradients as the reference (to rounding: the loss is computed by our cross-entropy) and the
    same state dict."""
    cfg = get_model_config("tiny", tie_embeddings=tied)
    ref = build_reference(cfg, 0)
    model = tensor_parallel(build_reference(cfg, 0), single_group("tp"), ShardedRNG(0), sp)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = torch.randint(0, cfg.vocab_size, (2, 16))
    ref_loss, loss = ref(x, y), model(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    ref_loss.backward()
    loss.backward()
    grads = gather_full_state(model, single_group("tp"), grads=True)
    for k, p in ref.state_dict(keep_vars=True).items():
        # rounding: within 1e-5 of the tensor's largest gradient (elementwise rtol would trip
        # on elements that are tiny sums of large terms)
        torch.testing.assert_close(grads[k], p.grad, rtol=0, atol=1e-5 * p.grad.abs().max().item())
    state = gather_full_state(model, single_group("tp"))
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
    assert tp_comm_per_step(cfg, 1, sp, 2, 16) == {}
