"""The knobs of the cost model that are not part of the layout. Pure Python (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostOptions:
    """Knobs of the model that are not part of the layout. Defaults describe paratrain's runtime.

    efficiency: fraction of peak the compute reaches (None: the hardware's figure).
    overlap_dp: data-parallel collectives overlap backward (bucketed DP, [R20]/DDP); False for a
        naive all-reduce after backward.
    memory_headroom: fraction of device memory kept free for the framework (CUDA context,
        allocator fragmentation, temporary buffers); an assumption, not a measured figure.
    dropout: activation accounting of [K22] counts 1-byte dropout masks (a model trained with
        dropout 0 stores none).
    store_scores: the attention stores its s x s scores (eager attention, [K22]); False (the
        default): a fused kernel, as PyTorch's scaled_dot_product_attention that paratrain runs.
    sp_saves_gathered: under sequence parallelism the qkv/fc1/head linears save their all-gathered
        input (True) or only the shard, re-gathered in backward (False: Megatron, [K22]). None (the
        default): as paratrain's runtime does, the shard, except under zero-bubble schedules (W
        keeps the whole input) and for Llama-family models (their ``tp_input`` regions gather once
        for several linears and keep it).
    stage_layers: layers per pipeline chunk (pp * virtual_stages entries); None = the layout's, or
        the runtime's cost-balanced partition.
    bubble_fraction: idle fraction of the pipeline taken from a simulated schedule, None = analytic.
    bucket_bytes: gradient bucket size (each bucket is one collective); 25 MiB like PyTorch DDP's
        ``bucket_cap_mb`` and paratrain's ``--bucket-mb`` default.
    rank_speeds: relative compute speed of each pipeline rank's devices (heterogeneous devices;
        None = all 1). Scales compute and the optimizer step, not communication.
    local_batch: sequences this data-parallel replica trains per step (None = global batch / dp);
        may be fractional: a speed-proportional share (planner-side prediction only).
    grad_bytes: bytes per gradient element (None = the precision's: 2 for bf16, 4 for fp32);
        4 under bf16 is ``--grad-dtype fp32`` (2 + 4 + 12 bytes per parameter).
    offload_optimizer: ZeRO-Offload (``--offload-optimizer``): the fp32 master weights and AdamW's
        state are in host memory, not the device's; each step copies the gradients the rank steps
        to the host and the updated 16-bit weights back over ``Hardware.host_link_bw``.
    zero3_gather: ZeRO-3 inside a pipeline (``--zero3-gather``): "microbatch" (each unit gathered
        around every micro-batch's forward and backward, ZeRO-3's traffic and memory) or "step"
        (gathered once per step: ZeRO-1's traffic, the rank's whole parameters and gradients held
        through the step).
    """

    efficiency: float | None = None
    overlap_dp: bool = True
    memory_headroom: float = 0.10
    dropout: bool = True
    store_scores: bool = False
    sp_saves_gathered: bool | None = None
    stage_layers: tuple[int, ...] | None = None
    bubble_fraction: float | None = None
    bucket_bytes: float = 25 * 2**20
    rank_speeds: tuple[float, ...] | None = None
    local_batch: float | None = None
    grad_bytes: int | None = None
    offload_optimizer: bool = False
    zero3_gather: str = "microbatch"


DEFAULT_OPTIONS = CostOptions()
