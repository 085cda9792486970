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
sums (``O(S L^2)``). Where a rank holds several stages (interleaved 1F1B: ``r, r + p, ...``; ZB-V:
``r`` and ``2p - 1 - r``) it runs all of them for every micro-batch, so the slowest *rank* (the sum
of its stages) sets the pace: then the cut minimises the slowest rank first and the slowest stage
second (``_balance_ranks``; measured on ``small`` in ZB-V over 2 ranks: the stage-optimal 1,2,2,1
gave one rank twice the other's layers, the ZB-V step 8% slower than 1F1B's where it is now faster).

Costs (per token, forward; backward costs about twice as much for every unit, so the ratios
hold for a whole step). ``flops``: embedding ``2H`` (gather and add), block
``2(4H^2 + 2HF) + 4TH`` (the four projections, the two MLP matmuls, and attention's ``QK^T`` and
``AV`` over ``T`` positions), head ``2HV`` (LM-head matmul). ``params``: the unit's parameter
count (the head counted in full even when tied: the last stage holds a copy).
"""

from __future__ import annotations

from collections.abc import Sequence

from paratrain.core.schedules import place_of
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


def partition(costs: Sequence[float], num_stages: int, speeds: Sequence[float] | None = None,
              ranks: Sequence[int] | None = None) -> tuple[int, ...]:
    """Split ``costs`` into ``num_stages`` contiguous non-empty runs minimising
    ``max_s cost(run s) / speeds[s]``; returns the run lengths. ``ranks[s]``: the rank holding
    stage ``s`` when a rank holds several (interleaved, ZB-V): then the slowest *rank* (the sum of
    its stages, each over its speed) is minimised first and the slowest stage second, by
    :func:`_balance_ranks` from the stage-optimal cut."""
    sizes = _cut(costs, num_stages, speeds)
    if ranks is None or len(set(ranks)) == len(ranks):
        return sizes
    return _balance_ranks(costs, sizes, list(speeds) if speeds is not None else [1.0] * num_stages, ranks)


def _cut(costs: Sequence[float], num_stages: int, speeds: Sequence[float] | None) -> tuple[int, ...]:
    """The stage-optimal cut of :func:`partition` (dynamic programming, exact)."""
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


def _balance_ranks(costs: Sequence[float], sizes: tuple[int, ...], speeds: Sequence[float],
                   ranks: Sequence[int]) -> tuple[int, ...]:
    """The cut minimising (slowest rank, slowest stage), lexicographically: each rank runs all its
    stages for every micro-batch, so in the steady state the pipeline runs at the pace of its
    slowest rank; the slowest stage still sets the fill and drain.

    Exact when every unit costs the same ``c`` but the first and the last (which carry the
    embedding and the head: :func:`layer_costs` gives that shape): a cut is then only how many
    layers each stage gets. Slowest rank: give each next layer to the rank it leaves fastest
    (optimal for a min-max of increasing terms). Slowest stage: the smallest bound ``U`` among
    the stage times at which per-stage caps ``floor((U w - e_s) / c)`` still hold ``L`` layers
    without a rank passing the first answer; then fill under those caps. Other costs: ``sizes``
    (the stage-optimal cut) as given."""
    n, S = len(costs), len(sizes)
    c = costs[1] if n > 2 else 0.0
    if c <= 0 or any(abs(x - c) > 1e-12 * c for x in costs[1:-1]) or min(costs[0], costs[-1]) < c:
        return sizes
    extra = [0.0] * S
    extra[0] += costs[0] - c
    extra[-1] += costs[-1] - c
    held: dict[int, list[int]] = {}
    for s, r in enumerate(ranks):
        held.setdefault(r, []).append(s)
    fuzz = 1e-9 * (sum(costs) / min(speeds))

    def time_of(r: int, k: int) -> float:  # rank r holding k layers (its speed: its stages')
        return (k * c + sum(extra[s] for s in held[r])) / speeds[held[r][0]]

    count = {r: len(ss) for r, ss in held.items()}  # one layer per stage to start
    for _ in range(n - S):
        r = min(held, key=lambda r: (time_of(r, count[r] + 1), -r))
        count[r] += 1
    slowest = max(time_of(r, k) for r, k in count.items()) + fuzz
    most = {r: max(k for k in range(len(held[r]), n + 1) if time_of(r, k) <= slowest) for r in held}

    def caps(bound: float) -> list[int]:  # layers each stage may hold within ``bound``
        return [int((bound * speeds[s] - extra[s]) / c + 1e-9) for s in range(S)]

    def fits(cap: list[int]) -> bool:
        return min(cap) >= 1 and sum(min(most[r], sum(cap[s] for s in ss)) for r, ss in held.items()) >= n

    bounds = sorted({(k * c + extra[s]) / speeds[s] for s in range(S) for k in range(1, n - S + 2)})
    lo, hi = 0, len(bounds) - 1  # the largest bound fits: the first answer's cut lies within it
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(caps(bounds[mid] + fuzz)) else (mid + 1, hi)
    cap = caps(bounds[lo] + fuzz)
    out = [1] * S
    for _ in range(n - S):  # fill: the stage left fastest (the later on a tie), within its cap and its rank's
        open_ = [s for s in range(S) if out[s] < cap[s] and sum(out[t] for t in held[ranks[s]]) < most[ranks[s]]]
        s = min(open_, key=lambda s: (((out[s] + 1) * c + extra[s]) / speeds[s], -s))
        out[s] += 1

    def key(sz: Sequence[int]) -> tuple[float, float]:
        stage = [(k * c + extra[s]) / speeds[s] for s, k in enumerate(sz)]
        return max(sum(stage[s] for s in ss) for ss in held.values()), max(stage)

    # the stage-optimal cut when it is as good (it puts ties' extra layers on later stages,
    # which hold fewer micro-batches in flight)
    mine, theirs = key(out), key(sizes)
    return sizes if theirs[0] <= mine[0] + fuzz and theirs[1] <= mine[1] + fuzz else tuple(out)


def stage_sizes(model: ModelConfig, pp: int, virtual_stages: int, seq_len: int,
                stage_layers: Sequence[int] | None = None, stage_speeds: Sequence[float] | None = None,
                by: str = "flops", placement: str = "loop") -> tuple[int, ...]:
    """Layers per stage for a layout: ``stage_layers`` when given, else balanced by cost, with the
    device speed of stage ``s`` being that of the rank holding it (``stage_speeds[s % pp]`` in
    the loop placement; ``placement`` "v": see :func:`paratrain.core.schedules.place_of`)."""
    if stage_layers is not None:
        return tuple(stage_layers)
    speeds = None
    ranks = [place_of(placement, pp, s)[0] for s in range(pp * virtual_stages)]
    if stage_speeds is not None:
        speeds = [float(stage_speeds[r]) for r in ranks]
    units = layer_costs(model, seq_len, by)
    costs = units[1:-1]
    costs[0] += units[0]  # the first stage also embeds,
    costs[-1] += units[-1]  # the last one also runs the head
    return partition(costs, pp * virtual_stages, speeds, ranks)


def stage_units(sizes: Sequence[int]) -> list[range]:
    """The unit indices (0 = embedding, 1..L = layers, L + 1 = head) of each stage."""
    out, start = [], 1
    for s, n in enumerate(sizes):
        first = 0 if s == 0 else start
        last = start + n + (1 if s == len(sizes) - 1 else 0)
        out.append(range(first, last))
        start += n
    return out
