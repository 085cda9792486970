"""Which link each parallel axis uses, and how layers are split into pipeline chunks.

Ranks are placed as in :mod:`paratrain.mesh` (tp innermost, then dp, pp outermost)::

    rank = (pp_index * dp + dp_index) * tp + tp_index,   node = rank // devices_per_node

A group whose members all sit on one node talks over the intra-node link (NVLink, shared
memory); if any group of an axis spans nodes, that axis is costed at the inter-node rate (its
collectives are as slow as their slowest group, since every step waits for all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from paratrain.errors import ConfigError
from paratrain.mesh import MeshShape
from paratrain.models.configs import ModelConfig
from paratrain.parallel import volume
from paratrain.parallel.pipeline.partition import stage_sizes


@lru_cache(maxsize=8192)
def axis_spans_nodes(axis: str, dp: int, pp: int, tp: int, devices_per_node: int) -> bool:
    """True if some ``axis`` group of the ``dp x pp x tp`` mesh has members on two nodes.

    An ``axis`` group is ``size`` ranks ``stride`` apart (tp: stride 1; dp: stride tp; pp: stride
    dp*tp). Group starts are the first ``stride`` ranks of every block of ``stride * size`` ranks;
    whether a group crosses a node boundary depends only on its start modulo the node size, so
    the starts of lcm(block, node) / block blocks cover every case."""
    D = devices_per_node
    shape = MeshShape(dp=dp, pp=pp, tp=tp)
    size = shape.size(axis)
    if size == 1:
        return False
    stride = {"tp": 1, "dp": tp, "pp": dp * tp}[axis]
    if stride * (size - 1) >= D:
        return True  # the first and last member of every group are at least a node apart
    block = stride * size
    blocks = min(shape.world_size // block, math.lcm(block, D) // block)
    for k in range(blocks):
        for j in range(stride):
            first = k * block + j
            if first // D != (first + stride * (size - 1)) // D:
                return True
    return False


@dataclass(frozen=True)
class PipelineShape:
    """Layers of each chunk and each pipeline rank, sends, and which ranks are alike.

    ``groups`` lists (first rank, number of ranks) of runs of ranks with the same chunks, sends,
    speed and first/last role; within a run only the in-flight count differs, and it never grows
    with the rank index (see :func:`formulas.in_flight_microbatches`), so the first rank of a run
    holds the most memory and every rank of it takes the same time."""

    chunks: tuple[int, ...]  # layers of stage s = c * pp + i (chunk c of rank i)
    layers: tuple[int, ...]  # per pipeline rank
    sends: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]


@lru_cache(maxsize=4096)
def pipeline_shape(model: ModelConfig, seq_len: int, pp: int, virtual_stages: int,
                   stage_layers: tuple[int, ...] | None = None, stage_speeds: tuple[float, ...] | None = None,
                   rank_speeds: tuple[float, ...] | None = None) -> PipelineShape:
    """The runtime's partition (given ``stage_layers``, or balanced by FLOPs and ``stage_speeds``:
    the very function ``paratrain train`` uses) and the ranks grouped by alikeness."""
    S = pp * virtual_stages
    chunks = tuple(stage_layers) if stage_layers else stage_sizes(model, pp, virtual_stages, seq_len,
                                                                   stage_speeds=stage_speeds)
    if len(chunks) != S or sum(chunks) != model.num_layers or min(chunks) < 1:
        raise ConfigError(f"stage_layers {chunks} must give {S} chunks of >= 1 layer summing to {model.num_layers}.")
    layers = [0] * pp
    for k, c in enumerate(chunks):
        layers[k % pp] += c
    sends = volume.p2p_sends_per_microbatch(pp, virtual_stages)
    speeds = rank_speeds or (1.0,) * pp

    def signature(i: int) -> tuple:
        return (tuple(chunks[c * pp + i] for c in range(virtual_stages)), i == 0, i == pp - 1, sends[i], speeds[i])

    groups: list[list[int]] = []
    for i in range(pp):
        if groups and signature(groups[-1][0]) == signature(i):
            groups[-1][1] += 1
        else:
            groups.append([i, 1])
    return PipelineShape(chunks, tuple(layers), sends, tuple((i, c) for i, c in groups))
