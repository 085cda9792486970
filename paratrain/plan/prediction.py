"""What the cost model predicts for one layout: :class:`Estimate` and its :class:`StepTime`.

Pure data (no torch); :meth:`Estimate.to_dict` is the JSON of ``paratrain estimate --json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paratrain.config import Layout
from paratrain.core.state import ModelState


@dataclass(frozen=True)
class StepTime:
    """Where one step's time goes on the slowest pipeline rank (seconds; they sum to total)."""

    compute: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float
    optimizer: float
    cp_comm: float = 0.0  # the ring attention's transfers that its blocks do not hide
    ep_comm: float = 0.0  # expert parallelism's all-to-alls (blocking: the experts wait for their rows)

    @property
    def total(self) -> float:
        return (self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_comm + self.optimizer
                + self.cp_comm + self.ep_comm)


@dataclass(frozen=True)
class CommBytes:
    """Bytes one device sends per optimizer step on each axis (the most loaded pipeline rank's
    figure for each): ring collectives count (n-1)/n or 2(n-1)/n of the payload, sends count once."""

    dp: float
    tp: float
    pp: float
    cp: float = 0.0  # the ring attention's K/V and dK/dV sends
    ep: float = 0.0  # expert parallelism's token exchanges (all-to-all)

    def as_dict(self) -> dict[str, float]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, **({"cp": self.cp} if self.cp else {}),
                **({"ep": self.ep} if self.ep else {})}


@dataclass(frozen=True)
class Estimate:
    """The prediction for one layout. Bytes and seconds are per device; "per device" figures are
    those of the most loaded device (the pipeline rank with the largest value)."""

    model: str
    layout: Layout
    hardware: str
    num_devices: int
    global_batch: int
    seq_len: int
    precision: str
    params: int
    params_per_device: float
    flops_per_step: float
    hardware_flops_per_step: float
    six_p_tokens_flops: float
    state: ModelState
    buffer_bytes: float
    activation_bytes_per_device: float
    peak_bytes_per_device: float
    capacity_bytes: float
    most_loaded_stage: int
    bubble_fraction: float
    comm_bytes_per_device: CommBytes
    time: StepTime
    tokens_per_s: float
    mfu: float
    hfu: float
    efficiency: float  # fraction of peak assumed for compute
    notes: tuple[str, ...] = ()  # what the user should know about this estimate's assumptions
    grad_bytes: int = 4  # per gradient element (2 under bf16, 4 with --grad-dtype fp32 or fp32)
    host_bytes_per_device: float = 0.0  # --offload-optimizer: the optimizer state in host memory

    @property
    def model_state_bytes_per_device(self) -> float:
        return self.state.total

    @property
    def step_time_s(self) -> float:
        return self.time.total

    @property
    def fits(self) -> bool:
        return self.peak_bytes_per_device <= self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``paratrain estimate --json``: the issue's keys first, then details."""
        t = self.time
        return {
            "params": self.params,
            "flops_per_step": self.flops_per_step,
            "hardware_flops_per_step": self.hardware_flops_per_step,
            "model_state_bytes_per_device": self.model_state_bytes_per_device,
            "activation_bytes_per_device": self.activation_bytes_per_device,
            "peak_bytes_per_device": self.peak_bytes_per_device,
            "bubble_fraction": self.bubble_fraction,
            "comm_bytes_per_device": self.comm_bytes_per_device.as_dict(),
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "fits": self.fits,
            "capacity_bytes": self.capacity_bytes,
            "model": self.model, "hardware": self.hardware, "num_devices": self.num_devices,
            "layout": {k: getattr(self.layout, k) for k in self.layout.__dataclass_fields__},
            "global_batch": self.global_batch, "seq_len": self.seq_len, "precision": self.precision,
            "params_per_device": self.params_per_device,
            "six_p_tokens_flops": self.six_p_tokens_flops, "hfu": self.hfu, "efficiency": self.efficiency,
            "memory_bytes": {**self.state.as_dict(), "buffers": self.buffer_bytes,
                             "activations": self.activation_bytes_per_device},
            "grad_bytes": self.grad_bytes, "host_bytes_per_device": self.host_bytes_per_device,
            "most_loaded_stage": self.most_loaded_stage,
            "notes": list(self.notes),
            "step_time_breakdown_s": {"compute": t.compute, "tp_comm": t.tp_comm, "pp_comm": t.pp_comm,
                                      "bubble": t.bubble, "dp_comm": t.dp_comm, "optimizer": t.optimizer,
                                      **({"cp_comm": t.cp_comm} if t.cp_comm else {}),
                                      **({"ep_comm": t.ep_comm} if t.ep_comm else {})},
        }
