"""The equivalence tolerances (tests/common.py) can fail: a run whose gradient reduction is broken on
purpose is reported as different from the reference, by the quantity that is meant to catch it,
by a wide margin -- while the same layout, unbroken, matches (tests/distributed/test_data_parallel.py).
"""

from __future__ import annotations

import functools

import pytest

from paratrain.reference import reference_train
from tests.common import BASE, max_param_diff, param_atol, reference_failures, train_ranks_fn, with_layout
from tests.harness import run_ranks


def sabotaged_train_ranks_fn(cfg, mode: str):
    """train_ranks_fn with every gradient all-reduce / reduce-scatter on the dp group broken (the
    loss average and the norm's sum, which carry a tag, are left alone):

    * ``wrong-scale``: each rank's contribution scaled by 2/3, i.e. divided by dp = 3 instead of 2;
    * ``drop-rank``: dp rank 1 contributes zeros, i.e. its shard of the batch is lost;
    * ``drop-slice``: dp rank 1 contributes zeros in the last 128 elements of each bucket only,
      i.e. one small tensor (a bias or a LayerNorm's weights) is reduced from one rank.
    """
    from paratrain import comm

    def sabotage(tensor, group, op: str, tag: str | None) -> None:
        if group.name != "dp" or tag is not None or op != "sum":
            return
        if mode == "wrong-scale":
            tensor.mul_(2 / 3)
        elif mode == "drop-rank" and group.rank == 1:
            tensor.zero_()
        elif mode == "drop-slice" and group.rank == 1:
            tensor[-128:].zero_()

    real_all_reduce, real_reduce_scatter = comm.all_reduce, comm.reduce_scatter

    def all_reduce(tensor, group, op="sum", async_op=False, tag=None):
        sabotage(tensor, group, op, tag)
        return real_all_reduce(tensor, group, op=op, async_op=async_op, tag=tag)

    def reduce_scatter(output, input, group, op="sum", async_op=False, tag=None):
        sabotage(input, group, op, tag)
        return real_reduce_scatter(output, input, group, op=op, async_op=async_op, tag=tag)

    comm.all_reduce, comm.reduce_scatter = all_reduce, reduce_scatter
    return train_ranks_fn(cfg)


@functools.cache
def reference():
    return reference_train(BASE)


# name -> (layout, the quantities that must report it). A wrong scale is caught by the norms alone:
# AdamW is invariant to a constant gradient scale and clipping (active at every step) removes it.
CASES = {
    "wrong-scale": (dict(dp=2), {"grad norms"}),
    "drop-rank": (dict(dp=2), {"grad norms", "parameters"}),
    "drop-slice": (dict(dp=2, microbatches=2), {"parameters"}),
    "zero2-drop-rank": (dict(dp=2, zero=2), {"grad norms", "parameters"}),
}


@pytest.mark.equivalence
@pytest.mark.parametrize("name", list(CASES))
def test_a_broken_reduction_is_reported(name):
    layout, caught_by = CASES[name]
    cfg = with_layout(BASE, **layout)
    res = run_ranks(cfg.layout.world_size, sabotaged_train_ranks_fn, cfg, name.removeprefix("zero2-"))[0]
    ref = reference()
    failures = reference_failures(res["losses"], res["grad_norms"], res["full_state"], ref, cfg)
    assert caught_by <= {f.split(":")[0] for f in failures}, failures
    if "parameters" in caught_by:  # not a near miss: the broken elements are off by ~lr, not lr/10
        diff, where = max_param_diff(res["full_state"], ref.state)
        assert diff > 3 * param_atol(cfg), f"{diff:.3g} at {where}"
    if name == "wrong-scale":
        assert {f.split(":")[0] for f in failures} == {"grad norms"}, failures
