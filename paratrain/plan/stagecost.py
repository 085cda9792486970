"""What the cost model computes per pipeline rank (:class:`StageCost`) and per model chunk
(:class:`ChunkCost`) before composing a step (``plan/cost.py``); the simulator replays them."""

from __future__ import annotations

from typing import NamedTuple

from paratrain.core.state import ModelState
from paratrain.plan.collectives import NO_BUCKETS, Buckets
from paratrain.plan.context import NO_RING, Ring


class ChunkCost(NamedTuple):
    """One model chunk (a pipeline stage) per micro-batch: compute and tensor-parallel seconds of
    its forward and backward, and its parameters on one device."""

    layers: int
    first: bool
    last: bool
    params: float
    forward_s: float
    backward_s: float  # includes recomputation
    tp_forward_s: float
    tp_backward_s: float
    tp_bytes: float  # wire bytes per micro-batch
    ring: Ring = NO_RING  # context parallelism: the chunk's exposed ring seconds and bytes (plan/context.py)
    ep: Ring = NO_RING  # expert parallelism: the chunk's all-to-all seconds and wire bytes (forward, backward)
    # of backward_s, the linears' weight-gradient matmuls (dL/dW = dy^T x): a zero-bubble W;
    # its I is the rest (the input gradients, attention's backward, the memory-bound work)
    weight_s: float = 0.0


class StageCost(NamedTuple):
    """One pipeline rank (any of its dp x tp devices: they are alike): per micro-batch seconds,
    per step bytes, and the memory it holds at its peak. (An immutable tuple rather than a frozen
    dataclass: the search builds tens of thousands, and a tuple is several times cheaper to make.)"""

    stage: int
    count: int  # pipeline ranks this entry stands for (1 unless grouped; see PipelineShape)
    num_layers: int
    params: float
    state: ModelState  # predicted: f.model_state_bytes (the runtime measures the same record)
    buffer_bytes: float
    activation_bytes: float  # stored by forwards, at the schedule's peak
    rebuilt_bytes: float  # full recomputation: one block rebuilt during its backward
    forward_s: float
    backward_s: float  # includes recomputation
    tp_s: float
    p2p_s: float
    tp_bytes: float  # per step
    pp_bytes: float  # per step
    dp_bytes: float  # per step
    dp_exposed_s: float
    tp_sync_s: float  # per step, after the schedule: SP-partial and grad-norm all-reduces over tp
    pp_sync_s: float  # per step: tied-embedding and grad-norm all-reduces, loss broadcast over pp
    optimizer_s: float
    chunks: tuple[ChunkCost, ...] = ()
    dp_buckets: Buckets = NO_BUCKETS  # ZeRO-0 gradient buckets (what the simulator replays)
    dp_other_s: float = 0.0  # the part of dp_exposed_s that is not those buckets
    p2p_message_s: float = 0.0  # one pipeline message
    cp_s: float = 0.0  # per micro-batch: the ring attention's exposed transfers
    cp_bytes: float = 0.0  # per step
    ep_s: float = 0.0  # per micro-batch: expert parallelism's all-to-alls
    ep_bytes: float = 0.0  # per step
    # ZeRO-2 with several micro-batches and nothing to hide behind: one micro-batch's reduce-scatter
    # of the rank's gradients, paid m - 1 times within dp_other_s (the last one is the buckets');
    # the simulator pays each inside the schedule, where the runtime waits for it
    dp_microbatch_s: float = 0.0
    # ZeRO-3 gathering per micro-batch with nothing to hide behind: a forward's all-gathers of the
    # rank's units, a backward's all-gathers and reduce-scatters; paid m times within dp_other_s,
    # the simulator pays each inside its F and B (split: half in I, half in W)
    dp_forward_s: float = 0.0
    dp_backward_s: float = 0.0

    @property
    def peak_bytes(self) -> float:
        return self.state.total + self.buffer_bytes + self.activation_bytes + self.rebuilt_bytes

    @property
    def microbatch_s(self) -> float:
        return self.forward_s + self.backward_s + self.tp_s + self.p2p_s + self.cp_s + self.ep_s
