"""Devices the planner knows: a catalog with sourced figures, explicit overrides, calibrated profiles.

Pure Python (no torch). A :class:`Hardware` describes *one* device (a GPU, or one CPU process)
and the links it has to its peers. Every figure of the catalog below comes with its source; the
few that are assumptions say so.

Conventions (the cost model relies on them):

* FLOP/s are dense peaks (no structured sparsity), per device.
* Bandwidths are bytes/s **per device, per direction** (what one device can send while it also
  receives). Datasheets quote NVLink as the bidirectional total, so we halve it.
* ``inter_node_bw`` is the share of the node's network one device gets, assuming one NIC per
  device as in NVIDIA DGX systems (so a ring that leaves the node runs at this rate).
* ``compute_efficiency`` is the fraction of peak that the layers' matrix multiplications and the
  memory-bound operations around them achieve *together*, excluding communication and pipeline
  bubbles (those are modelled separately). It is a fitted number, not a datasheet one; see
  ``_A100_EFFICIENCY``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratrain.errors import ConfigError

GiB = 2**30
GB = 10**9
TFLOPS = 10**12

PROFILE_FORMAT = "paratrain-device-profile"
PROFILE_VERSION = 3
# Version 2 profiles (before the per-layer term and the fitted efficiency) still load: their
# missing figures take the defaults (no per-layer cost), the model they were measured for.
PROFILE_VERSIONS_READ = (2, 3)


@dataclass(frozen=True)
class Hardware:
    """One device type and its links. Units: FLOP/s, bytes, bytes/s, seconds.

    ``peak_bf16_flops == 0`` means the device has no bf16 units; bf16 estimates then use the fp16
    peak (mixed precision with fp16 and loss scaling has the same memory and FLOPs).
    ``memory_bw == 0`` means unknown (the optimizer step's memory-bound time is then left out).
    ``cores_per_node``: for CPU processes, the cores the node's processes share; when more
    processes than cores run on a node each computes at cores / processes of its rate
    (:func:`paratrain.plan.cost.compute_share`). 0 (GPUs): every device is its own. It may be
    fractional: the cores other jobs leave free.
    ``elementwise_s_per_byte``: seconds of memory-bound work (LayerNorm, GeLU, residual adds,
    softmax) that a layer's forward + backward spends per byte of the activations
    it produces, on top of its matmul FLOPs at ``peak x efficiency``. 0 (the catalog's GPUs): that
    work is folded into the fitted efficiency instead. ``paratrain calibrate`` measures it on CPUs,
    where small layers spend a fifth to a quarter of their time there.
    ``elementwise_s_per_byte_bf16``: the same for ``--precision bf16``'s bf16 activations (a
    CPU without bf16 units converts every element to fp32 and back: per byte it costs more than
    fp32's); 0 = ``elementwise_s_per_byte``. ``paratrain calibrate`` fits it with the bf16 matmul
    rate the layers reach (the profile's ``peak_bf16_flops`` is that rate / ``compute_efficiency``).
    ``layer_overhead_s``: fixed seconds of one transformer layer's forward + backward of one
    micro-batch, whatever its size (Python, autograd's bookkeeping, kernel launches), on an
    unshared device; 0 (the catalog's GPUs): folded into the efficiency. ``paratrain calibrate``
    fits it on CPUs with the matmul rate and ``elementwise_s_per_byte``.
    ``layer_overhead_s_bf16``: the same for ``--precision bf16``'s layers (0 = ``layer_overhead_s``):
    on a CPU with bf16 matrix units each bf16 matmul call costs more to set up (2.2 ms a layer
    against fp32's 0.67 on this project's AMX machine), fitted by ``paratrain calibrate`` with
    the bf16 rate and ``elementwise_s_per_byte_bf16``.
    ``pack_s_per_byte``: seconds per byte a rank spends copying a tensor-parallel collective's
    payload into or out of the backend's contiguous buffer (the runtime regroups activations by
    sequence slice for sequence parallelism's gathers and scatters and clones gradients before
    reducing them), on its own compute; 0 (the catalog's GPUs): not priced. Measured by
    ``paratrain calibrate``.
    ``busy_compute_slowdown``: how many times longer a process's layers take while every core
    of its node runs one (memory bandwidth and caches shared; >= 1; 1: not measured, or
    devices that share nothing). Measured by ``paratrain calibrate`` (the same forward +
    backward alone and on every core at once); applied when a layout's processes fill the cores.
    ``oversubscribed_compute_slowdown``: how many times longer still a process's layers take when
    the node's processes outnumber its cores, beyond the time-sharing itself (twice as many
    processes as cores: 2 x ``busy_compute_slowdown`` x this): the kernel switching processes on
    a core, each refilling the caches the other evicted (>= 1; 1: not measured). Measured by
    ``paratrain calibrate``; applied when a layout's processes outnumber the cores.
    ``backward_share``: the backward's share of a layer's forward + backward as measured (0: the
    FLOPs' split, backward twice the forward's matmuls and memory-bound work); the planner
    divides each chunk's forward + backward so (pipeline bubbles and the windows that hide
    collectives depend on it). Measured by ``paratrain calibrate`` (0.63 on this project's machine).
    ``split_backward_slowdown``: what a micro-batch split as the zero-bubble schedules split it
    (its forward's linears wrapped, then ``I``, then ``W``) costs beyond a plain forward +
    backward, as a factor on its backward: (F_split + I + W - F) / B (>= 1; 1: not measured). The
    planner adds the extra to ``W``, whose matmuls read their inputs back from memory long after
    ``I`` wrote them. Measured by ``paratrain calibrate`` (1.07-1.10 on this project's machine).
    ``shared_latency_s``: the intra-node latency per ring step when the node's processes
    outnumber its cores (a peer may wait for a core before it answers); 0 = the same as
    ``intra_node_latency_s``. Measured by ``paratrain calibrate``.
    ``reduce_scatter_slowdown`` / ``all_gather_slowdown``: how many times the ring model's
    bandwidth time the backend's reduce-scatter / all-gather take (1: a ring, as NCCL's; gloo's
    reduce-scatter on this project's machine takes ~3x). Measured by ``paratrain calibrate``.
    ``tp_extra_s_per_byte`` / ``tp_extra_s_per_call``: what a tensor-parallel group's blocking
    collective costs more inside a training step than the link's figures say (it sits between
    two layers' compute and waits for the later rank, on caches the layers have filled), per
    byte of its payload and per call, when each process has a core; 0: nothing more. Measured
    by ``paratrain calibrate`` in real tp 2 steps (their all-reduces against the link's model).
    ``tp_reduce_scatter_slowdown`` / ``tp_all_gather_slowdown``: the same groups' factors on the
    ring's bandwidth time (as ``reduce_scatter_slowdown``), measured inside sequence-parallel
    steps with that extra; 0 = the link's.
    ``host_link_bw``: bytes/s one device moves to or from host memory (per direction; a GPU's
    PCIe link), which ``--offload-optimizer`` (ZeRO-Offload) crosses every step; 0 = the device
    is the host (a CPU process): nothing to copy. ``host_memory_bw``: the host memory bandwidth
    one device's share of the host has, for the offloaded optimizer step; 0 = ``memory_bw``.
    """

    name: str
    peak_bf16_flops: float
    peak_fp16_flops: float
    peak_fp32_flops: float
    memory_bytes: float
    memory_bw: float
    intra_node_bw: float
    inter_node_bw: float
    devices_per_node: int
    compute_efficiency: float = 0.5
    intra_node_latency_s: float = 0.0
    inter_node_latency_s: float = 0.0
    cores_per_node: float = 0
    elementwise_s_per_byte: float = 0.0
    elementwise_s_per_byte_bf16: float = 0.0
    layer_overhead_s: float = 0.0
    layer_overhead_s_bf16: float = 0.0
    pack_s_per_byte: float = 0.0
    busy_compute_slowdown: float = 1.0
    oversubscribed_compute_slowdown: float = 1.0
    backward_share: float = 0.0
    split_backward_slowdown: float = 1.0
    shared_latency_s: float = 0.0
    reduce_scatter_slowdown: float = 1.0
    all_gather_slowdown: float = 1.0
    host_link_bw: float = 0.0
    host_memory_bw: float = 0.0
    tp_extra_s_per_byte: float = 0.0
    tp_extra_s_per_call: float = 0.0
    tp_reduce_scatter_slowdown: float = 0.0
    tp_all_gather_slowdown: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible figure."""
        for field in ("peak_fp16_flops", "peak_fp32_flops", "memory_bytes", "intra_node_bw", "inter_node_bw"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"hardware {self.name!r}: {field} must be a positive number, got {value!r}.")
        for field in ("peak_bf16_flops", "memory_bw", "intra_node_latency_s", "inter_node_latency_s",
                      "elementwise_s_per_byte", "elementwise_s_per_byte_bf16", "layer_overhead_s",
                      "layer_overhead_s_bf16", "pack_s_per_byte",
                      "shared_latency_s", "host_link_bw",
                      "host_memory_bw", "tp_extra_s_per_byte", "tp_extra_s_per_call",
                      "tp_reduce_scatter_slowdown", "tp_all_gather_slowdown"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"hardware {self.name!r}: {field} must be >= 0, got {value!r}.")
        if not isinstance(self.cores_per_node, (int, float)) or self.cores_per_node < 0:
            raise ConfigError(f"hardware {self.name!r}: cores_per_node must be a number >= 0, "
                              f"got {self.cores_per_node!r}.")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ConfigError(f"hardware {self.name!r}: devices_per_node must be a positive integer, "
                              f"got {self.devices_per_node!r}.")
        if not isinstance(self.backward_share, (int, float)) or not 0 <= self.backward_share < 1:
            raise ConfigError(f"hardware {self.name!r}: backward_share must be a number in [0, 1) (0 = the FLOPs' "
                              f"split), got {self.backward_share!r}.")
        for field in ("reduce_scatter_slowdown", "all_gather_slowdown", "busy_compute_slowdown",
                      "oversubscribed_compute_slowdown", "split_backward_slowdown"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not value >= 1:
                raise ConfigError(f"hardware {self.name!r}: {field} must be a number >= 1 (1 = a ring / no slowdown), "
                                  f"got {value!r}.")
        if not 0 < self.compute_efficiency <= 1:
            raise ConfigError(f"hardware {self.name!r}: compute_efficiency must be in (0, 1], "
                              f"got {self.compute_efficiency!r}.")

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s for the matmuls of ``precision`` ("bf16" or "fp32").

        fp32 is the plain fp32 rate (PyTorch does not use TF32 for fp32 matmuls by default:
        ``torch.backends.cuda.matmul.allow_tf32`` is False since PyTorch 1.12)."""
        if precision == "fp32":
            return self.peak_fp32_flops
        if precision in ("bf16", "bf16-autocast"):
            return self.peak_bf16_flops or self.peak_fp16_flops
        raise ConfigError(f"precision must be one of fp32, bf16, bf16-autocast, got {precision!r}.")

    def replace(self, **changes: Any) -> Hardware:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "hardware") -> Hardware:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(n for n in names - set(data) if n not in _OPTIONAL)
        if unknown or missing:
            raise ConfigError(f"{where}: unknown key(s) {unknown} / missing key(s) {missing}. "
                              f"Valid keys: {', '.join(sorted(names))}.")
        return cls(**data)


_OPTIONAL = {"compute_efficiency", "intra_node_latency_s", "inter_node_latency_s", "cores_per_node",
             "elementwise_s_per_byte", "elementwise_s_per_byte_bf16", "layer_overhead_s", "layer_overhead_s_bf16",
             "pack_s_per_byte",
             "busy_compute_slowdown", "oversubscribed_compute_slowdown", "backward_share",
             "split_backward_slowdown", "shared_latency_s", "reduce_scatter_slowdown",
             "all_gather_slowdown", "tp_extra_s_per_byte", "tp_extra_s_per_call",
             "tp_reduce_scatter_slowdown", "tp_all_gather_slowdown",
             "source"}

# Fraction of peak reached by the compute of a step on A100s, fitted to Narayanan et al. 2021
# ("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC21),
# Table 1, rows 1.7B-39.1B: 135-142 TFLOP/s/GPU achieved of 312 peak (43-46%, communication and
# bubble included). With this value `estimate` reproduces those rows within 10%
# (tests/unit/test_plan_published.py). We use the same figure for every GPU of the catalog: an
# assumption for H100 and V100, where no comparable published table was reproduced.
_A100_EFFICIENCY = 0.48


def _catalog() -> dict[str, Hardware]:
    devices = [
        Hardware(
            name="H100-80GB",
            # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16/FP16 Tensor Core
            # 1,979 TFLOPS *with sparsity* -> 989 dense; FP32 67 TFLOPS; GPU memory 80GB
            # (5 stacks x 16 GiB HBM3 = 80 GiB); memory bandwidth 3.35 TB/s; NVLink 900 GB/s
            # (bidirectional total -> 450 GB/s per direction).
            peak_bf16_flops=989 * TFLOPS, peak_fp16_flops=989 * TFLOPS, peak_fp32_flops=67 * TFLOPS,
            memory_bytes=80 * GiB, memory_bw=3.35e12, intra_node_bw=450 * GB,
            # NVIDIA DGX H100 datasheet: 8 GPUs, 8x single-port ConnectX-7 400 Gb/s InfiniBand for
            # the compute fabric -> one 400 Gb/s = 50 GB/s NIC per GPU.
            inter_node_bw=50 * GB, devices_per_node=8, compute_efficiency=_A100_EFFICIENCY,
            # host: PCIe Gen5 x16, 128 GB/s both directions -> 64 GB/s each (H100 datasheet);
            # DGX H100: 2 Xeon 8480C, 8 DDR5-4800 channels each (8 x 38.4 = 307 GB/s) per 4 GPUs
            host_link_bw=64 * GB, host_memory_bw=307 * GB / 4,
            source="NVIDIA H100 datasheet (SXM5); DGX H100 datasheet (8x ConnectX-7 400 Gb/s)",
        ),
        Hardware(
            name="A100-80GB",
            # NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB column: BF16/FP16 Tensor Core
            # 312 TFLOPS (dense); FP32 19.5 TFLOPS; 80GB HBM2e; 2,039 GB/s; NVLink 600 GB/s
            # (bidirectional total -> 300 GB/s per direction).
            peak_bf16_flops=312 * TFLOPS, peak_fp16_flops=312 * TFLOPS, peak_fp32_flops=19.5 * TFLOPS,
            memory_bytes=80 * GiB, memory_bw=2.039e12, intra_node_bw=300 * GB,
            # NVIDIA DGX A100 datasheet: 8 GPUs, 8x single-port ConnectX-6 200 Gb/s HDR InfiniBand
            # (the cluster of Narayanan et al. 2021) -> 200 Gb/s = 25 GB/s per GPU.
            inter_node_bw=25 * GB, devices_per_node=8, compute_efficiency=_A100_EFFICIENCY,
            # host: PCIe Gen4 x16, 64 GB/s both directions -> 32 GB/s each (A100 datasheet);
            # DGX A100: 2 EPYC 7742, 8 DDR4-3200 channels each (204.8 GB/s) per 4 GPUs
            host_link_bw=32 * GB, host_memory_bw=204.8 * GB / 4,
            source="NVIDIA A100 datasheet (SXM4 80GB); DGX A100 datasheet (8x ConnectX-6 200 Gb/s)",
        ),
        Hardware(
            name="A100-40GB",
            # Same datasheet, SXM4 40GB column: same compute; 40GB HBM2; 1,555 GB/s.
            peak_bf16_flops=312 * TFLOPS, peak_fp16_flops=312 * TFLOPS, peak_fp32_flops=19.5 * TFLOPS,
            memory_bytes=40 * GiB, memory_bw=1.555e12, intra_node_bw=300 * GB,
            inter_node_bw=25 * GB, devices_per_node=8, compute_efficiency=_A100_EFFICIENCY,
            host_link_bw=32 * GB, host_memory_bw=204.8 * GB / 4,  # as the A100-80GB's
            source="NVIDIA A100 datasheet (SXM4 40GB); DGX A100 datasheet (8x ConnectX-6 200 Gb/s)",
        ),
        Hardware(
            name="V100-32GB",
            # NVIDIA Tesla V100 datasheet, SXM2 column: Tensor Performance (FP16) 125 TFLOPS;
            # no bf16 units (peak_bf16 = 0: bf16 estimates use the fp16 peak); single precision
            # 15.7 TFLOPS; 32 GB HBM2 (32 GiB); 900 GB/s; NVLink 300 GB/s (bidirectional total ->
            # 150 GB/s per direction).
            peak_bf16_flops=0.0, peak_fp16_flops=125 * TFLOPS, peak_fp32_flops=15.7 * TFLOPS,
            memory_bytes=32 * GiB, memory_bw=900 * GB, intra_node_bw=150 * GB,
            # NVIDIA DGX-1 (V100) datasheet: 8 GPUs, 4x 100 Gb/s EDR InfiniBand ->
            # 400 Gb/s = 50 GB/s per node = 6.25 GB/s per GPU.
            inter_node_bw=6.25 * GB, devices_per_node=8, compute_efficiency=_A100_EFFICIENCY,
            # host: PCIe Gen3 x16, 32 GB/s both directions -> 16 GB/s each (V100 datasheet);
            # DGX-1: 2 Xeon E5-2698 v4, 4 DDR4-2400 channels each (76.8 GB/s) per 4 GPUs
            host_link_bw=16 * GB, host_memory_bw=76.8 * GB / 4,
            source="NVIDIA Tesla V100 datasheet (SXM2); DGX-1 datasheet (4x EDR 100 Gb/s)",
        ),
        _CPU,
    ]
    return {d.name: d for d in devices}


# One CPU process pinned to one core (the device `paratrain train --device cpu` uses with one
# thread per rank). Nominal figures, meant to be replaced by `paratrain calibrate`:
#  * fp32 peak: 32 FLOP/cycle (two 256-bit FMA units: 2 x 8 lanes x 2 FLOP; Intel 64 and IA-32
#    Architectures Optimization Reference Manual, Haswell microarchitecture and later) at an
#    assumed 3.0 GHz = 96 GFLOP/s. bf16/fp16: no matrix units assumed -> the same rate.
#  * memory: an assumed 8 GiB per process; bandwidth: one DDR4-3200 channel, 3200 MT/s x 8 B =
#    25.6 GB/s (JEDEC JESD79-4).
#  * links: gloo over loopback TCP inside a node, measured on the development machine (a shared
#    2-core AMD EPYC VM) with three `paratrain calibrate` runs: 1.2-2.0 GB/s and 0.17-0.69 ms per
#    ring step; we take 1.5 GB/s and 0.4 ms. Between nodes an assumed 10 Gb/s Ethernet NIC
#    (1.25 GB/s) shared by the node's 8 processes.
#  * compute efficiency 0.5: an assumption (about the GPUs' fitted 0.48), not a measurement.
_CPU = Hardware(
    name="cpu",
    peak_bf16_flops=96e9, peak_fp16_flops=96e9, peak_fp32_flops=96e9,
    memory_bytes=8 * GiB, memory_bw=25.6 * GB, intra_node_bw=1.5 * GB,
    inter_node_bw=1.25 * GB / 8, devices_per_node=8, compute_efficiency=0.5,
    intra_node_latency_s=0.4e-3, inter_node_latency_s=0.4e-3,
    source="nominal x86 core (AVX2 FMA, 3 GHz, DDR4-3200 channel); gloo links measured here; "
           "run `paratrain calibrate` for this machine's figures",
)

CATALOG: dict[str, Hardware] = _catalog()


def device_names() -> list[str]:
    return list(CATALOG)


def get_hardware(name: str) -> Hardware:
    """A catalog device by name (case-insensitive), or ``profile:PATH`` for a calibrated profile."""
    if name.startswith("profile:"):
        return load_profile(name[len("profile:"):])
    for key, hw in CATALOG.items():
        if key.lower() == name.lower():
            return hw
    raise ConfigError(f"unknown device {name!r}. Valid devices: {', '.join(CATALOG)}, or "
                      f"profile:PATH for a profile written by `paratrain calibrate`.")


def custom_hardware(base: Hardware | None, **figures: Any) -> Hardware:
    """``base`` with the given figures replaced (None values are ignored). Without a base, the
    peak FLOP/s, memory and intra-node bandwidth are required; the rest default to: inter-node
    bandwidth = intra-node, 8 devices per node, unknown memory bandwidth, efficiency 0.5."""
    given = {k: v for k, v in figures.items() if v is not None}
    if base is not None:
        return base.replace(name=base.name + ("*" if given else ""), **given)
    needed = {"peak_fp32_flops": "--peak-tflops", "memory_bytes": "--memory-gib/--memory-gb",
              "intra_node_bw": "--intra-bw-gbs"}
    missing = [flag for key, flag in needed.items() if key not in given]
    if missing:
        raise ConfigError(f"a custom device needs {', '.join(missing)} (or --hardware NAME to start "
                          f"from a catalog device: {', '.join(CATALOG)}).")
    given.setdefault("peak_bf16_flops", given["peak_fp32_flops"])
    given.setdefault("peak_fp16_flops", given["peak_bf16_flops"] or given["peak_fp32_flops"])
    given.setdefault("inter_node_bw", given["intra_node_bw"])
    given.setdefault("memory_bw", 0.0)
    given.setdefault("devices_per_node", 8)
    given.setdefault("source", "explicit flags")
    return Hardware(name="custom", **given)


def default_profile_path() -> Path:
    import socket

    return Path.home() / ".cache" / "paratrain" / f"profile-{socket.gethostname()}.json"


def load_profile(path: str | Path) -> Hardware:
    """Read a device profile written by ``paratrain calibrate`` (its ``hardware`` object)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"device profile {str(p)!r} does not exist; write one with "
                          f"`paratrain calibrate --out {p}`.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"device profile {str(p)!r} could not be read as JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT or "hardware" not in data:
        raise ConfigError(f"{str(p)!r} is not a paratrain device profile (expected a JSON object with "
                          f"\"format\": \"{PROFILE_FORMAT}\" and a \"hardware\" object).")
    if data.get("version") not in PROFILE_VERSIONS_READ:
        raise ConfigError(f"device profile {str(p)!r} has version {data.get('version')!r}; this "
                          f"paratrain reads versions {', '.join(map(str, PROFILE_VERSIONS_READ))}. Run "
                          f"`paratrain calibrate` again.")
    return Hardware.from_dict(data["hardware"], where=f"device profile {str(p)!r}")


def save_profile(path: str | Path, hardware: Hardware, measurements: dict[str, Any]) -> Path:
    """Write ``hardware`` (what estimate/plan load) and the raw ``measurements`` as JSON."""
    import datetime
    import socket

    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "hostname": socket.gethostname(),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "hardware": hardware.to_dict(), "measurements": measurements}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p
