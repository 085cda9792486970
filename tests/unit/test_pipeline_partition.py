"""Partitioning layers into pipeline stages: optimal, speed-aware, by hand."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paratrain.core.partition import layer_costs, partition, stage_sizes, stage_units
from paratrain.models.configs import get_model_config


def bottleneck(costs, sizes, speeds):
    out, start = [], 0
    for n, w in zip(sizes, speeds):
        out.append(sum(costs[start:start + n]) / w)
        start += n
    return max(out)


@settings(max_examples=80, deadline=None)
@given(costs=st.lists(st.integers(1, 50), min_size=1, max_size=9), data=st.data())
def test_partition_is_optimal(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    speeds = data.draw(st.lists(st.sampled_from([1.0, 1.5, 2.0, 3.0]), min_size=k, max_size=k))
    sizes = partition(costs, k, speeds)
    assert len(sizes) == k and sum(sizes) == len(costs) and min(sizes) >= 1
    best = min(bottleneck(costs, (b - a for a, b in zip((0, *cuts), (*cuts, len(costs)))), speeds)
               for cuts in itertools.combinations(range(1, len(costs)), k - 1))
    assert bottleneck(costs, sizes, speeds) == pytest.approx(best)  # brute force agrees


def test_a_2x_faster_device_gets_2x_the_work():
    assert partition([1.0] * 30, 2, [1, 2]) == (10, 20)
    assert partition([1.0] * 30, 2, [2, 1]) == (20, 10)
    model = get_model_config("gpt2-350m")  # 24 layers + embedding + head of different costs
    costs = layer_costs(model, 1024)
    units = stage_units(stage_sizes(model, 2, 1, 1024, stage_speeds=(1, 2)))
    work = [sum(costs[u] for u in run) for run in units]
    assert work[1] / work[0] == pytest.approx(2.0, rel=0.1)


def test_costs_include_embedding_and_head():
    tiny = get_model_config("tiny")
    flops = layer_costs(tiny, 256)
    assert len(flops) == tiny.num_layers + 2
    h, f, v = tiny.hidden, tiny.ffn_hidden, tiny.vocab_size
    assert flops[1] == 2 * (4 * h * h + 2 * h * f) + 4 * 256 * h and flops[-1] == 2 * h * v
    params = layer_costs(tiny, 256, by="params")
    assert params[0] == v * h + tiny.max_seq_len * h
    # a GPT-2 head (V = 50257) costs as much as several layers: the last stage gets fewer
    gpt2 = get_model_config("gpt2-124m")
    assert stage_sizes(gpt2, 4, 1, 1024) == (3, 4, 4, 1)


def test_by_hand_and_units():
    tiny = get_model_config("tiny")
    assert stage_sizes(tiny, 2, 1, 32, stage_layers=(1, 3)) == (1, 3)
    assert stage_sizes(tiny, 2, 1, 32) == (2, 2)
    # units: 0 = embedding, 1..4 = layers, 5 = head
    assert stage_units((1, 3)) == [range(0, 2), range(2, 6)]
    assert stage_units((1, 1, 2)) == [range(0, 2), range(2, 3), range(3, 6)]
