"""Cutting the model into pipeline stages. Pure Python (no torch): the planner uses it too.

The model is a sequence of ``L + 2`` *units*: the embedding, the ``L`` transformer blocks
(*layers*), and the head (final LayerNorm, LM head and loss). A partition gives each of the
``S = pp * v`` stages (in model order; stage ``s`` runs on pipeline rank ``s % pp``) a contiguous
run of at least one layer; the embedding goes with the first stage and the head with the last.
It is written as layers per stage, like the planner's ``CostOptions.stage_layers``
(``--stage-layers 3,3,2,2`` for ``L = 10``).

Automatic partition: with layer costs ``c_i`` (the embedding's cost added to the first layer's,
the head's to the last's) and a relative speed ``w_s`` for the device of stage ``s``, choose the
cut points minimising the slowest stage's time ``max_s (sum of c_i in stage s) / w_s`` -- the
pipeline runs at the pace of its slowest stage. Solved exactly by dynamic programming over prefix
sums (``O(S L^2)``).

Costs (per token, forward; backward costs about twice as much for every unit, so the ratios
hold for a whole step). ``flops``: embedding ``2H`` (gather and add), block
``2(4H^2 + 2HF) + 4TH`` (the four projections, the two MLP matmuls, and attention's ``QK^T`` and
``AV`` over ``T`` positions), head ``2HV`` (LM-head matmul). ``params``: the unit's parameter
count (the head counted in full even when tied: the last stage holds a copy).
"""

from __future__ import annotations

from collections.abc import Sequence

from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig, block_param_count

COSTS = ("flops", "params")


def layer_costs(model: ModelConfig, seq_len: int, by: str = "flops") -> list[float]:
    """Cost of each unit ``[embedding, block 0, ..., block L-1, head]`` (see module doc)."""
    h, f, v = model.hidden, model.ffn_hidden, model.vocab_size
    gpt = model.family == "gpt"
    if by == "flops":  # Llama: k/v project to the kv heads, three MLP matrices (plan/formulas.py)
        kv = model.num_kv_heads * model.head_dim
        block = 2 * (2 * h * h + 2 * h * kv + (2 if gpt else 3) * h * f) + 4 * seq_len * h
        embed, head = 2 * h, 2 * h * v
    elif by == "params":
        embed = v * h + (model.max_seq_len * h if gpt else 0)
        block, head = block_param_count(model), v * h + (2 if gpt else 1) * h
    else:
        raise ConfigError(f"unknown partition cost {by!r}; valid: {', '.join(COSTS)}")
    return [float(embed)] + [float(block)] * model.num_layers + [float(head)]


def partition(costs: Sequence[float], num_stages: int, speeds: Sequence[float] | None = None) -> tuple[int, ...]:
    """Split ``costs`` into ``num_stages`` contiguous non-empty runs minimising
    ``max_s cost(run s) / speeds[s]``; returns the run lengths."""
    n = len(costs)
    speeds = list(speeds) if speeds is not None else [1.0] * num_stages
    if not 1 <= num_stages <= n or len(speeds) != num_stages:
        raise ValueError(f"cannot cut {n} units into {num_stages} stages with {len(speeds)} speeds")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest bottleneck placing units [0, i) on stages [0, k); cut[k][i]: its last cut
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                t = max(best[k - 1][j], (prefix[i] - prefix[j]) / speeds[k - 1])
                if t < best[k][i]:
                    best[k][i], cut[k][i] = t, j
    sizes, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return tuple(reversed(sizes))


def stage_sizes(model: ModelConfig, pp: int, virtual_stages: int, seq_len: int,
                stage_layers: Sequence[int] | None = None, stage_speeds: Sequence[float] | None = None,
                by: str = "flops") -> tuple[int, ...]:
    """Layers per stage for a layout: ``stage_layers`` when given, else balanced by cost, with the
    device speed of stage ``s`` being ``stage_speeds[s % pp]``."""
    if stage_layers is not None:
        return tuple(stage_layers)
    speeds = None
    if stage_speeds is not None:
        speeds = [float(stage_speeds[s % pp]) for s in range(pp * virtual_stages)]
    units = layer_costs(model, seq_len, by)
    costs = units[1:-1]
    costs[0] += units[0]  # the first stage also embeds,
    costs[-1] += units[-1]  # the last one also runs the head
    return partition(costs, pp * virtual_stages, speeds)


def stage_units(sizes: Sequence[int]) -> list[range]:
    """The unit indices (0 = embedding, 1..L = layers, L + 1 = head) of each stage."""
    out, start = [], 1
    for s, n in enumerate(sizes):
        first = 0 if s == 0 else start
        last = start + n + (1 if s == len(sizes) - 1 else 0)
        out.append(range(first, last))
        start += n
    return out
