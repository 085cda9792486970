"""Flags shared by ``paratrain estimate``, ``plan`` and ``simulate``: model shape, hardware, cost
options, and the checks of every number a planning command reads (finite, in range, named by its
flag). No torch import (these commands must answer in milliseconds)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from paratrain.config import GRAD_DTYPES, PRECISIONS, Layout, check_precision
from paratrain.core.traffic import ZERO3_GATHERS
from paratrain.errors import ConfigError
from paratrain.models.configs import HF_FIELDS, ModelConfig, get_model_config, hf_shape, model_names
from paratrain.plan.cost import CostOptions
from paratrain.plan.hardware import GB, TFLOPS, GiB, Hardware, custom_hardware, device_names, get_hardware

DEFAULT_DEVICE = "H100-80GB"
# Bounds that keep every answer finite and quick (far beyond any real machine or model).
MAX_DEVICES = 2**20
MAX_BATCH = 2**31
# Forward passes (pp x micro-batches x virtual stages) the event-level schedule check and
# simulation take on: about a second here; beyond, the closed forms (`paratrain estimate`) answer.
MAX_SIMULATED_PASSES = 8192


class Bounds(NamedTuple):
    """The values a numeric flag accepts: finite, from ``lo`` to ``hi`` (ends open as said)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and (self.lo < value if self.lo_open else self.lo <= value) \
            and (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e9 else f"{x:g}"

        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


class _Bounded(argparse.Action):
    """Stores the number and notes, for :func:`check_numbers`, a value out of its bounds: the
    error is then a one-paragraph ConfigError naming the flag as typed, like every other."""

    def __init__(self, *args: Any, bounds: Bounds, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bounds = bounds

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        if not self.bounds.holds(values):
            kind = "an integer" if self.type is int else "a finite number"
            errors = getattr(namespace, "number_errors", [])
            namespace.number_errors = [*errors, f"{option_string} must be {kind} in {self.bounds}, got {values}."]


def count(lo: int, hi: int) -> dict[str, Any]:
    """``add_argument`` keywords of an integer flag in [lo, hi] (checked by :func:`check_numbers`)."""
    return {"type": int, "action": _Bounded, "bounds": Bounds(lo, hi)}


def real(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> dict[str, Any]:
    """``add_argument`` keywords of a finite number flag between lo and hi."""
    return {"type": float, "action": _Bounded, "bounds": Bounds(lo, hi, lo_open, hi_open)}


def check_numbers(args: argparse.Namespace) -> None:
    """Raise the first out-of-bounds numeric flag noted while parsing (every planning command
    calls this before anything else)."""
    errors = getattr(args, "number_errors", None)
    if errors:
        raise ConfigError(errors[0])


POSITIVE = real(0, 1e12, lo_open=True)  # a bandwidth, a peak, a memory size: > 0, finite, bounded
_SHAPE = {"layers": "num_layers", "hidden": "hidden", "heads": "num_heads", "vocab": "vocab_size",
          "ffn_hidden": "ffn_hidden"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a name, or a shape; shape flags also override a named model)")
    g.add_argument("--model", help=f"named model: {', '.join(model_names())}")
    g.add_argument("--layers", **count(1, 2**16), help="transformer blocks L")
    g.add_argument("--hidden", **count(1, 2**20), help="hidden size H")
    g.add_argument("--heads", **count(1, 2**16), help="attention heads A")
    g.add_argument("--vocab", **count(1, 2**30), help="vocabulary size V")
    g.add_argument("--ffn-hidden", **count(1, 2**24), help="MLP width F (default: 4 H)")
    g.add_argument("--seq-len", **count(1, 2**24),
                   help="tokens per sequence S (default: the named model's maximum)")
    g.add_argument("--untie-embeddings", action="store_true", help="the LM head has its own weight")
    g.add_argument("--hf-config", metavar="FILE", help="a Hugging Face GPT-2 or Llama config (config.json, or "
                   "the JSON text of its fields): the family from its model_type (or its field names), missing "
                   "fields at transformers' defaults")


def read_hf_fields(spec: str) -> dict[str, Any]:
    """The fields of ``--hf-config``: a config.json file, or the JSON text of its fields."""
    import json
    from pathlib import Path

    try:
        fields = json.loads(spec if spec.lstrip().startswith("{") else Path(spec).read_text())
    except OSError as e:
        raise ConfigError(f"--hf-config {spec!r}: cannot read it ({e.strerror}).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--hf-config {spec!r}: not valid JSON ({e.msg} at character {e.pos}).") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--hf-config {spec!r}: expected a JSON object of config fields.")
    return fields


def hf_config_model(spec: str) -> ModelConfig:
    """The shape of a Hugging Face config file or JSON text (``estimate|plan --hf-config``)."""
    fields = read_hf_fields(spec)
    kind = fields.get("model_type") or ("gpt2" if "n_layer" in fields else
                                        "llama" if "num_hidden_layers" in fields else None)
    if kind not in HF_FIELDS:
        raise ConfigError(f"--hf-config {spec!r}: model_type {kind!r} is not one paratrain knows; valid: "
                          f"{', '.join(HF_FIELDS)} (or give n_layer / num_hidden_layers so the family shows).")
    return hf_shape(kind, fields)


def build_model(args: argparse.Namespace) -> tuple[ModelConfig, int]:
    """The model shape and the sequence length from --model and/or the shape flags."""
    check_numbers(args)
    shape = {field: getattr(args, flag) for flag, field in _SHAPE.items() if getattr(args, flag) is not None}
    extra: dict[str, Any] = {"tie_embeddings": False} if args.untie_embeddings else {}
    if getattr(args, "hf_config", None):
        if args.model:
            raise ConfigError("give either --model or --hf-config, not both.")
        base = hf_config_model(args.hf_config)
        model = base.replace(**shape, **extra) if shape or extra else base
        return model, args.seq_len or model.planning_seq_len
    if args.model:
        base = get_model_config(args.model)
        changes = {**shape, **extra}
        if shape and "hidden" in shape and "ffn_hidden" not in shape:
            changes["ffn_hidden"] = 4 * shape["hidden"]
        model = base.replace(name=base.name + ("*" if changes else ""), **changes) if changes else base
        return model, args.seq_len or model.planning_seq_len
    missing = [f"--{flag.replace('_', '-')}" for flag in ("layers", "hidden", "heads", "vocab")
               if getattr(args, flag) is None] + (["--seq-len"] if args.seq_len is None else [])
    if missing:
        raise ConfigError(f"give a model: --model NAME (one of {', '.join(model_names())}) or its shape; "
                          f"missing {', '.join(missing)}.")
    name = f"custom(L={args.layers},H={args.hidden},A={args.heads},V={args.vocab})"
    return ModelConfig(name=name, max_seq_len=args.seq_len, **shape, **extra), args.seq_len


def add_hardware_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hardware (a catalog device, a calibrated profile, and/or explicit figures)")
    g.add_argument("--hardware", "--device", dest="hardware", metavar="NAME",
                   help=f"the device of the hardware catalog: {', '.join(device_names())}, or profile:PATH "
                   f"(default: {DEFAULT_DEVICE}; explicit figures below replace the device's). --device NAME is "
                   f"the old spelling, still accepted (`paratrain train --device` is cpu/cuda, another thing)")
    g.add_argument("--profile", metavar="PATH", help="device profile written by `paratrain calibrate`")
    g.add_argument("--peak-tflops", **POSITIVE, help="dense peak TFLOP/s for the chosen --precision")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--memory-gib", **POSITIVE, help="device memory in GiB (2^30 bytes; a GPU's '80GB')")
    m.add_argument("--memory-gb", **POSITIVE, help="device memory in GB (10^9 bytes)")
    g.add_argument("--mem-bw-gbs", **POSITIVE, help="memory bandwidth, GB/s")
    g.add_argument("--intra-bw-gbs", **POSITIVE, help="intra-node link, GB/s per device per direction")
    g.add_argument("--inter-bw-gbs", **POSITIVE, help="inter-node link, GB/s per device per direction")
    g.add_argument("--intra-latency-us", **real(0, 1e12), help="intra-node latency per collective step, us")
    g.add_argument("--inter-latency-us", **real(0, 1e12), help="inter-node latency per collective step, us")
    g.add_argument("--devices-per-node", **count(1, MAX_DEVICES), help="devices sharing the intra-node link")
    g.add_argument("--efficiency", **real(0, 1, lo_open=True), help="fraction of peak the compute reaches, (0, 1] "
                   "(default: the device's; 0.48 for GPUs, fitted to Megatron-LM's published runs)")
    g.add_argument("--device-speeds", metavar="X,X,...", help="heterogeneous devices: the relative compute "
                   "speed of each device in rank order (rank = (pp_i * dp + dp_i) * tp + tp_i), e.g. 1,1,2,2; "
                   "or catalog names, whose speed is their peak x efficiency over --hardware's, e.g. "
                   "H100-80GB,H100-80GB,A100-80GB,A100-80GB; 'Nx' repeats an entry: 2xH100-80GB,2xA100-80GB. "
                   "Pipeline stages and batch shares are sized to speed and the gain over an even split printed")


def build_hardware(args: argparse.Namespace, precision: str) -> Hardware:
    """Catalog device or profile, then explicit figures on top (or alone: a custom device)."""
    if args.hardware and args.profile:
        raise ConfigError("give --hardware (or its old spelling --device) or --profile, not both "
                          "(--hardware profile:PATH is --profile PATH).")
    peak = args.peak_tflops * TFLOPS if args.peak_tflops is not None else None
    figures: dict[str, Any] = {
        "memory_bytes": args.memory_gib * GiB if args.memory_gib is not None else
        (args.memory_gb * GB if args.memory_gb is not None else None),
        "memory_bw": _scaled(args.mem_bw_gbs, GB), "intra_node_bw": _scaled(args.intra_bw_gbs, GB),
        "inter_node_bw": _scaled(args.inter_bw_gbs, GB), "devices_per_node": args.devices_per_node,
        "intra_node_latency_s": _scaled(args.intra_latency_us, 1e-6),
        "inter_node_latency_s": _scaled(args.inter_latency_us, 1e-6),
    }
    if peak is not None:
        keys = ("peak_fp32_flops",) if precision == "fp32" else ("peak_bf16_flops", "peak_fp16_flops")
        figures.update({k: peak for k in keys})
    given = any(v is not None for v in figures.values())
    if args.profile or args.hardware:
        base = get_hardware(f"profile:{args.profile}" if args.profile else args.hardware)
    elif given:
        if peak is not None:  # a device described only by flags: one peak for every precision
            figures.update(peak_bf16_flops=peak, peak_fp16_flops=peak, peak_fp32_flops=peak)
        return custom_hardware(None, **figures)
    else:
        base = get_hardware(DEFAULT_DEVICE)
    return custom_hardware(base, **figures)


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value * unit


def add_cost_args(p: argparse.ArgumentParser, batch_help: str) -> None:
    g = p.add_argument_group("step and cost model")
    g.add_argument("--global-batch", **count(1, MAX_BATCH), help=batch_help)
    g.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="bf16: mixed precision, 2+2+12 bytes per parameter (16-bit weights and "
                        "gradients, fp32 master weights and Adam m, v); fp32: 4+4+8; bf16-autocast: 4+4+8 "
                        "with bf16 matmuls and activations (default: bf16, how "
                        "accelerators train; `paratrain train` defaults to fp32, what its CPU ranks run: give "
                        "--precision fp32 to price a train run as it runs by default)")
    g.add_argument("--grad-dtype", choices=GRAD_DTYPES, default=None,
                   help="with --precision bf16: fp32 gradient buffers (accumulation and reduction in fp32: "
                        "2+4+12 bytes per parameter) instead of bf16 (default: the weights' dtype)")
    g.add_argument("--offload-optimizer", action="store_true",
                   help="with --precision bf16: fp32 master weights and Adam state in host memory "
                        "(ZeRO-Offload): not counted on the device; the host copies are priced")
    g.add_argument("--headroom", **real(0, 1, hi_open=True), default=CostOptions.memory_headroom,
                   help="fraction of device memory kept free for the framework (default: %(default)s)")
    g.add_argument("--no-overlap", action="store_true",
                   help="data-parallel communication does not overlap the backward pass")
    g.add_argument("--no-dropout", action="store_true",
                   help="count no dropout masks in the activations (a model trained without dropout)")
    g.add_argument("--eager-attention", action="store_true",
                   help="count the s x s attention scores in the activations (an unfused attention, as in "
                        "Korthikanti et al.'s Table 2); default: a fused kernel, as paratrain runs "
                        "(scaled_dot_product_attention), which keeps a per-row log-sum-exp instead")
    g.add_argument("--zero3-gather", choices=ZERO3_GATHERS, default="microbatch",
                   help="ZeRO-3 inside a pipeline: gathered per micro-batch (default) or once per step, as "
                        "`train --zero3-gather`")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def build_options(args: argparse.Namespace) -> CostOptions:
    check_precision(args.precision, args.grad_dtype, args.offload_optimizer)  # train's rule
    return CostOptions(efficiency=args.efficiency, overlap_dp=not args.no_overlap, memory_headroom=args.headroom,
                       dropout=not args.no_dropout, store_scores=args.eager_attention,
                       grad_bytes=4 if args.grad_dtype == "fp32" else None,
                       offload_optimizer=args.offload_optimizer, zero3_gather=args.zero3_gather)


_LAYOUT_COUNTS = {"dp": MAX_DEVICES, "pp": MAX_DEVICES, "tp": MAX_DEVICES, "cp": MAX_DEVICES, "ep": MAX_DEVICES,
                  "microbatches": MAX_BATCH, "virtual_stages": 2**16}


def given_layout_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The layout flags the user gave (add_layout_args defaults every flag to None), each count
    checked against its range here (the flags are train's too: their parser takes any integer)."""
    given = {k: getattr(args, k) for k in Layout.__dataclass_fields__ if getattr(args, k, None) is not None}
    for name, hi in _LAYOUT_COUNTS.items():
        if name in given and not 1 <= given[name] <= hi:
            raise ConfigError(f"--{name.replace('_', '-')} must be from 1 to {hi:,}, got {given[name]}.")
    return given


def out_path(text: str, flag: str = "--out") -> Path:
    """The file a drawing goes to, checked before any work: not a folder, a format matplotlib
    writes (no suffix: .png is added, and said), a place that can be written."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {text} is a folder; give a file name, e.g. {path / 'timeline.png'}.")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"{flag} {text}: the drawing is written as .png, .pdf or .svg; got {path.suffix!r}.")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {text} cannot be written ({e.strerror}); give a file in a writable folder.") \
            from None
    if not existed:
        path.unlink()
    return path


def draw(plot: Callable[[Path], Any], path: Path, flag: str = "--out") -> None:
    """Run ``plot(path)``; a failure to write (the disk filled, the folder went away) is a user
    error, said in one line, not a traceback after the results."""
    try:
        plot(path)
    except OSError as e:
        raise ConfigError(f"{flag} {path} could not be written ({e.strerror or e}).") from None


def parse_speeds(text: str, hw: Hardware, precision: str) -> tuple[float, ...]:
    """``--device-speeds``: numbers, or catalog names (speed = their peak x efficiency relative to
    ``hw``'s), each optionally prefixed ``Nx`` to repeat it."""
    base = hw.peak_flops(precision) * hw.compute_efficiency
    speeds: list[float] = []
    for token in (t.strip() for t in text.split(",")):
        head, sep, rest = token.partition("x")
        times, value = (head, rest) if sep and head.isdigit() else ("1", token)
        try:
            speed = float(value)
        except ValueError:
            dev = get_hardware(value)
            speed = dev.peak_flops(precision) * dev.compute_efficiency / base
        if not 0 < speed <= 1e6 or not times.isdigit() or not 1 <= int(times) <= MAX_DEVICES:
            raise ConfigError(f"--device-speeds: {token!r} is not a speed in (0, 1e6] or a catalog device "
                              f"({', '.join(device_names())}), optionally prefixed by a count like 4x "
                              f"(at most {MAX_DEVICES:,}).")
        speeds += [speed] * int(times)
    return tuple(speeds)


def build_speeds(args: argparse.Namespace, hw: Hardware, world_size: int) -> tuple[float, ...] | None:
    """The per-device speeds of ``--device-speeds`` (None when not given), one per device."""
    if not getattr(args, "device_speeds", None):
        return None
    speeds = parse_speeds(args.device_speeds, hw, args.precision)
    if len(speeds) != world_size:
        raise ConfigError(f"--device-speeds gives {len(speeds)} devices, the layout has {world_size} "
                          f"(dp x pp x tp); give one speed per device.")
    return speeds


class OneLayout(NamedTuple):
    """What ``estimate`` and ``simulate`` price: one model, layout, batch and device."""

    model: ModelConfig
    seq_len: int
    layout: Layout
    global_batch: int
    hardware: Hardware
    options: CostOptions
    speeds: tuple[float, ...] | None


def add_one_layout_args(p: argparse.ArgumentParser) -> None:
    """The flags of a command that prices one layout: model, layout, cost options, hardware."""
    from paratrain.cli.common import add_layout_args

    add_model_args(p)
    add_layout_args(p, dp_default="1")
    add_cost_args(p, batch_help="sequences per optimizer step over all ranks (default: dp x microbatches)")
    add_hardware_args(p)


def build_one_layout(args: argparse.Namespace) -> OneLayout:
    """Parse :func:`add_one_layout_args`' flags (exit-2 errors for impossible input)."""
    model, seq_len = build_model(args)
    layout = Layout(**given_layout_fields(args))
    layout.check_degrees()
    hw = build_hardware(args, args.precision)
    return OneLayout(model, seq_len, layout, args.global_batch or layout.dp * layout.microbatches, hw,
                     build_options(args), build_speeds(args, hw, layout.world_size))
