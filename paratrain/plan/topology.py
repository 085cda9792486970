"""Which link each parallel axis uses, and how layers are split into pipeline chunks.

Ranks are placed as in :mod:`paratrain.mesh` (tp innermost, then dp, pp outermost)::

    rank = (pp_index * dp + dp_index) * tp + tp_index,   node = rank // devices_per_node

A group whose members all sit on one node talks over the intra-node link (NVLink, shared
memory); if any group of an axis spans nodes, that axis is costed at the inter-node rate (its
collectives are as slow as their slowest group, since every step waits for all of them).
"""

from __future__ import annotations

import math
from functools import lru_cache

from paratrain.mesh import MeshShape


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


def even_partition(num_layers: int, num_chunks: int) -> tuple[int, ...]:
    """Layers per pipeline chunk, as even as possible.

    The ``num_layers % num_chunks`` extra layers go to the middle chunks first (the first chunk
    also holds the embedding and the most in-flight activations, the last one the LM head), then
    to the first chunk. A partition module that balances measured costs can replace this through
    ``CostOptions.stage_layers``."""
    base, extra = divmod(num_layers, num_chunks)
    order = list(range(1, num_chunks - 1)) + [0, num_chunks - 1]
    counts = [base] * num_chunks
    for c in order[:extra]:
        counts[c] += 1
    return tuple(counts)


def device_of_chunk(chunk: int, pp: int) -> int:
    """Interleaved assignment (Megatron, [N21] sec. 2.2.2): chunk c runs on pipeline rank c % pp,
    so device i holds chunks i, i + pp, i + 2 pp, ..."""
    return chunk % pp


def p2p_sends_per_microbatch(pp: int, virtual_stages: int) -> tuple[int, ...]:
    """Tensors each pipeline rank sends per micro-batch: at every chunk boundary c -> c + 1 the
    upstream rank sends the activation forward and the downstream rank sends its gradient back."""
    sends = [0] * pp
    for c in range(pp * virtual_stages - 1):
        sends[device_of_chunk(c, pp)] += 1
        sends[device_of_chunk(c + 1, pp)] += 1
    return tuple(sends)
