"""Flags and config files shared by the commands. No torch import here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from paratrain.config import (
    DEVICES,
    DP_IMPLS,
    FIELD_RANGES,
    GRAD_DTYPES,
    PRECISIONS,
    RECOMPUTE,
    SCHEDULES,
    Layout,
    Range,
    TrainConfig,
    check_range,
)
from paratrain.core.traffic import ZERO3_GATHERS
from paratrain.errors import ConfigError
from paratrain.models.configs import model_names

DEFAULT_NPROC = 2
LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Layout))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "layout")
_DEFAULTS = TrainConfig()
MAX_LOCAL_PROCS = 4096  # processes one machine can start; a larger --nproc is a typo
FLAGS = {"timeout_s": "--timeout"}  # fields whose flag is not --field-name (see add_train_args)
# What the user may give (flag or config key), where it differs from FIELD_RANGES (the rule of a
# finished TrainConfig): an explicit nproc is a count of processes, 0 is not one.
GIVEN_RANGES: dict[str, Range] = dict(
    FIELD_RANGES, nproc=Range(int, 1, high=MAX_LOCAL_PROCS),
    **{name: Range(int, 1) for name in ("dp", "pp", "tp", "cp", "ep", "microbatches", "virtual_stages")},
    top_k=Range(int, 1, high=2), capacity_factor=Range(float, 0), aux_loss_coef=Range(float, 0))
# The type each config-file key wants, from the dataclass fields ("int", "str | None", ...).
_FIELD_TYPES = {f.name: str(f.type) for f in (*dataclasses.fields(TrainConfig), *dataclasses.fields(Layout))}
_WANTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
           "str | None": "a string", "tuple[int, ...] | None": "a list of integers",
           "tuple[float, ...] | None": "a list of numbers"}


def flag_of(name: str) -> str:
    """The flag a TrainConfig/Layout field is given with (``timeout_s`` -> ``--timeout``)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def default(name: str) -> Any:
    if name in LAYOUT_FIELDS:
        return getattr(_DEFAULTS.layout, name)
    return getattr(_DEFAULTS, name)


def _number_list(kind: type, what: str) -> Any:
    """An argparse type: comma-separated numbers (``3,3,2,2``) to a tuple."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, like 3,3,2,2; got {text!r}") from None

    return parse


def add_layout_args(p: argparse.ArgumentParser, dp_default: str = "the processes left after pp, cp and tp; 2 "
                    "when nothing is given") -> None:
    """--dp/--pp/--tp and the rest of the Layout; every default is None = "not given".
    ``dp_default``: what the command does without --dp (train and the planners differ)."""
    g = p.add_argument_group("layout (dp x pp x cp x tp processes)")
    g.add_argument("--dp", type=int, metavar="N", help=f"data-parallel degree (default: {dp_default})")
    g.add_argument("--pp", type=int, metavar="N", help="pipeline-parallel stages (default: 1)")
    g.add_argument("--tp", type=int, metavar="N", help="tensor-parallel degree (default: 1)")
    g.add_argument("--cp", type=int, metavar="N", help="context-parallel degree: each rank holds seq_len/N "
                   "tokens of every sequence, attention is ring attention over the N ranks; seq_len must be "
                   "divisible by 2N (default: 1)")
    g.add_argument("--ep", type=int, metavar="N", help="expert-parallel degree of a mixture-of-experts model: "
                   "the experts sharded over N of the dp ranks (N divides dp and the number of experts), tokens "
                   "exchanged by all-to-all (default: 1; docs/expert.md)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage over the dp group: 1 shards the "
                   "optimizer state, 2 also the gradients, 3 also the parameters (default: 0, plain data "
                   "parallelism)")
    g.add_argument("--microbatches", type=int, metavar="M", help="micro-batches per step: pipeline slices, or "
                   "gradient accumulation without a pipeline (default: 1)")
    g.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule (default: 1f1b)")
    g.add_argument("--virtual-stages", type=int, metavar="V", help="model chunks per pipeline rank for the "
                   "interleaved schedule (default: 1)")
    g.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="shard LayerNorm/dropout regions along the sequence (needs tp > 1)")
    g.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation (default: none)")
    g.add_argument("--stage-layers", type=_number_list(int, "integers"), metavar="N,N,...",
                   help="transformer layers per pipeline stage (pp x virtual-stages counts, in model "
                   "order; the embedding goes with the first, the head with the last), e.g. 3,3,2,2 "
                   "for 10 layers on 4 stages (default: balanced by estimated FLOPs, embedding and "
                   "head included)")
    g.add_argument("--stage-speeds", type=_number_list(float, "numbers"), metavar="X,X,...",
                   help="relative speed of each pipeline rank's device; the automatic partition "
                   "gives a 2x faster device about 2x the work, e.g. 1,2 (default: all equal)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file (a run's config.json too) with "
                   "any of the options below (keys as the flags: warmup_steps or warmup-steps, timeout, "
                   "quiet = true, no-checkpoint = true; layout keys at top level or in a [layout] table); "
                   "flags override it")
    p.add_argument("--nproc", type=int, metavar="N", help=f"local processes to start (default: dp*pp*cp*tp, "
                   f"{DEFAULT_NPROC} when no degree is given; ignored under torchrun)")
    add_layout_args(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help=f"named model: {', '.join(model_names())} "
                   f"(default: {default('model')})")
    g.add_argument("--data", metavar="PATH", help="text file or folder of text files, or a "
                   "folder written by paratrain prepare-data (default: the Python standard library's sources, "
                   "byte-level)")
    g.add_argument("--seq-len", type=int, metavar="L", help=f"tokens per sequence (default: {default('seq_len')})")
    g.add_argument("--global-batch", type=int, metavar="B", help=f"sequences per optimizer step over all ranks "
                   f"(default: {default('global_batch')})")
    g.add_argument("--dropout", type=float, metavar="P", help=f"dropout probability (default: {default('dropout')})")
    g.add_argument("--untie-embeddings", action="store_true", default=None,
                   help="give the LM head its own weight instead of the token embedding's")
    g.add_argument("--top-k", type=int, metavar="K", help="mixture of experts: experts per token, 1 or 2 "
                   "(default: the model's; tiny-moe 2)")
    g.add_argument("--capacity-factor", type=float, metavar="C", help="mixture of experts: each expert takes at "
                   "most ceil(C x seq_len x top-k / experts) tokens of a sequence, the rest are dropped; 0 = "
                   "dropless (default: the model's; tiny-moe 1.25)")
    g.add_argument("--aux-loss-coef", type=float, metavar="A", help="mixture of experts: weight of the "
                   "load-balancing loss added to the loss (default: the model's; tiny-moe 0.01)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps (default: {default('steps')})")
    g.add_argument("--seed", type=int, metavar="S", help=f"seed for weights and batches (default: {default('seed')})")
    g.add_argument("--lr", type=float, metavar="LR", help=f"peak learning rate (default: {default('lr')})")
    g.add_argument("--warmup-steps", type=int, metavar="N",
                   help=f"linear warm-up steps (default: {default('warmup_steps')})")
    g.add_argument("--min-lr-ratio", type=float, metavar="R",
                   help=f"final lr / peak lr of the cosine decay (default: {default('min_lr_ratio')})")
    g.add_argument("--weight-decay", type=float, metavar="WD",
                   help=f"AdamW weight decay (default: {default('weight_decay')})")
    g.add_argument("--grad-clip", type=float, metavar="C",
                   help=f"global gradient-norm clip, 0 = off (default: {default('grad_clip')})")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="fp32; bf16: bf16 weights, gradients and activations, fp32 master weights and AdamW "
                        "state in the optimizer (2+2+12 bytes per parameter); bf16-autocast: bf16 matmuls "
                        "over fp32 weights (4+4+8) (default: fp32; docs/precision.md)")
    g.add_argument("--grad-dtype", choices=GRAD_DTYPES,
                   help="with --precision bf16: fp32 gradient buffers, accumulated over micro-batches and "
                        "reduced in fp32 (2+4+12 bytes per parameter; default: bf16)")
    g.add_argument("--offload-optimizer", action="store_true", default=None,
                   help="with --precision bf16: fp32 master weights, AdamW state and the optimizer step in "
                        "host memory (ZeRO-Offload)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=DEVICES,
                   help="cuda (NCCL) or cpu (gloo); auto picks cuda when present (default: auto)")
    g.add_argument("--threads", type=int, metavar="N", help="torch threads per rank (default: cores / local processes)")
    g.add_argument("--bucket-mb", type=float, metavar="MIB",
                   help=f"data-parallel gradient bucket size in MiB (default: {default('bucket_mb')})")
    g.add_argument("--dp-impl", choices=DP_IMPLS,
                   help="bucketed (overlapped) or naive per-tensor all-reduce (default: bucketed)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="reduce all buckets after backward instead of during it")
    g.add_argument("--zero3-gather", choices=ZERO3_GATHERS,
                   help="ZeRO-3 inside a pipeline: gather each unit around every micro-batch's forward and "
                        "backward (microbatch: ZeRO-3's memory) or once per step (step: ZeRO-1's traffic, the "
                        "stage's whole parameters and gradients held through the step; default: microbatch)")
    g.add_argument("--timeout", dest="timeout_s", type=float, metavar="SECONDS",
                   help=f"seconds a collective may wait before the job fails (default: {default('timeout_s')})")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", metavar="DIR", help="run folder (default: a new folder under runs/)")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help=f"validation every N steps, 0 = never (default: {default('eval_every')})")
    g.add_argument("--eval-batches", type=int, metavar="N",
                   help=f"global batches per validation (default: {default('eval_batches')})")
    g.add_argument("--sample-tokens", type=int, metavar="N",
                   help=f"tokens of text to sample at the end, 0 = none (default: {default('sample_tokens')})")
    g.add_argument("--quiet", dest="progress", action="store_false", default=None,
                   help="no progress display")
    g = p.add_argument_group("checkpoints (OUT/checkpoints/step-N: each rank's shards + manifest.json)")
    g.add_argument("--no-checkpoint", dest="checkpoint", action="store_false", default=None,
                   help="do not save the final checkpoint")
    g.add_argument("--checkpoint-every", type=int, metavar="K",
                   help="also save every K steps (default: 0, only the final checkpoint)")
    g.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help="keep the newest N checkpoints, deleting older ones (default: 0, keep all)")
    g.add_argument("--async-checkpoint", dest="async_checkpoint", action="store_true", default=None,
                   help="training waits only while the shards are copied to host memory; files are written in "
                   "the background, at most one save in flight, checked before the next save and at the end "
                   "(the default)")
    g.add_argument("--no-async-checkpoint", dest="async_checkpoint", action="store_false",
                   help="write each checkpoint before training goes on")
    g.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its latest valid checkpoint "
                   "(its settings, with any flag given here overriding them: e.g. --steps N for N steps in all, "
                   "or other layout flags to continue in another layout)")
    g.add_argument("--max-restarts", type=int, metavar="R",
                   help="when a rank dies (killed, out of memory), restart all ranks up to R times through torch's "
                   "elastic agent; each restart continues from the latest checkpoint (use --checkpoint-every) "
                   f"(default: {default('max_restarts')}: the job ends, naming the rank that died)")
    g.add_argument("--max-bad-steps", type=int, metavar="N",
                   help="a step whose loss or gradient norm is NaN/infinite skips its update (every rank agrees); "
                   f"after N such steps in a row the run stops, keeping the last good checkpoint "
                   f"(default: {default('max_bad_steps')}; 0 stops at the first)")
    g.add_argument("--init-from", metavar="PATH", help="start from the weights of a reference-shaped "
                   ".safetensors file (paratrain convert --to-single) or a Hugging Face GPT-2 folder")
    g.add_argument("--measure-memory", action="store_true", default=None,
                   help="measure each rank's parameter, gradient and optimizer-state bytes and the peak "
                   "bytes of activations saved for backward during the last step (summary.json: "
                   "memory_per_rank); the figures the planner predicts")
    g = p.add_argument_group("real data and metrics (docs/data.md)")
    g.add_argument("--vocab-size", type=int, metavar="V", help="rows of the token embedding (default: the "
                   "model's own; with --data a folder from paratrain prepare-data, its tokenizer's)")
    g.add_argument("--tensorboard", action="store_true", default=None, help="also write the per-step metrics "
                   "of metrics.jsonl as TensorBoard events into OUT/tensorboard (pip install 'paratrain[data]')")


# Config-file keys are the option names (either spelling: ``warmup-steps`` or ``warmup_steps``);
# where a flag's name differs from its field, both are accepted.
_KEY_ALIASES = {"timeout": "timeout_s"}
# Config keys spelled like a flag that switches something off: ``quiet = true`` is progress = false.
_NEGATED = {"quiet": "progress", "no_checkpoint": "checkpoint", "no_overlap": "overlap",
            "no_async_checkpoint": "async_checkpoint"}


def _normalise(key: str) -> str:
    key = key.strip().lstrip("-").replace("-", "_")
    return _KEY_ALIASES.get(key, key)


_YAML_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_load(text: str) -> Any:
    """PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; YAML 1.2 and every user read it
    as a number, so this loader does too. A quoted ``"1e-3"`` stays a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def coerce_bool(key: str, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: {key} = {value!r} ({type(value).__name__}) is not true or false; write {key} as "
                      f"true or false.")


def coerce_value(key: str, value: Any, where: str) -> Any:
    """``value`` of config key ``key`` as its field's type (an int is a valid float, a list a valid
    tuple); otherwise a ConfigError naming the key, the value and the type wanted."""
    kind = _FIELD_TYPES[key]
    if value is None and kind.endswith("| None"):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool), "float": number,
          "bool": isinstance(value, bool), "str": isinstance(value, str), "str | None": isinstance(value, str),
          "int | None": isinstance(value, int) and not isinstance(value, bool), "float | None": number}
    if kind.startswith("tuple["):
        item = int if kind.startswith("tuple[int") else float
        good = isinstance(value, list) and all(
            isinstance(x, item if item is int else (int, float)) and not isinstance(x, bool) for x in value)
        if good:
            return tuple(value)
    elif ok.get(kind, True):
        return float(value) if kind == "float" else value
    shown = f"{value!r} ({type(value).__name__})"
    raise ConfigError(f"{where}: {key} = {shown} is not {_WANTED.get(kind, kind)}; write {key} as "
                      f"{_WANTED.get(kind, kind)}" + (", e.g. 3e-3 (unquoted)" if kind == "float" else "")
                      + ".")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json: e.g. a run's own config.json) file
    into flat TrainConfig/Layout keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            raw = _yaml_load(text) or {}
        elif p.suffix == ".json":
            import json

            raw = json.loads(text)
            if isinstance(raw, dict):  # a run's config.json holds every field: its nulls and defaults say "default"
                defaults = dataclasses.asdict(TrainConfig())
                raw = {k: v for k, v in raw.items() if v is not None and v != defaults.get(k, not v)}
        else:
            raise ConfigError(f"config file {path!r}: use a .toml, .yaml, .yml or .json file.")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of two libraries
        raise ConfigError(f"config file {path!r} could not be parsed: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a table of keys, not {type(raw).__name__}.")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if _normalise(key) == "layout" and isinstance(value, dict):
            flat.update({_normalise(k): v for k, v in value.items()})
        elif _normalise(key) in _NEGATED:  # a flag's spelling (--quiet): the field it switches off
            name = _normalise(key)
            flat[_NEGATED[name]] = not coerce_bool(name, value, f"config file {path!r}")
        else:
            flat[_normalise(key)] = value
    unknown = sorted(set(flat) - set(LAYOUT_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path!r}: unknown key(s) {', '.join(unknown)}. Valid keys: "
                          f"{', '.join(sorted(set(LAYOUT_FIELDS) | set(TRAIN_FIELDS)))}.")
    return {k: coerce_value(k, v, f"config file {path!r}") for k, v in flat.items()}


def build_train_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- ``base`` (a resumed run's settings) <- config file <- flags, then the process
    count and degrees made consistent."""
    values: dict[str, Any] = dict(base or {})
    labels: dict[str, str] = {k: f"{k} in the resumed run's config.json" for k in values}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
        labels.update({k: f"{k} in config file {args.config!r}" for k in values})
    flags = {k: v for k, v in vars(args).items() if (k in TRAIN_FIELDS or k in LAYOUT_FIELDS) and v is not None}
    values.update(flags)
    labels.update({k: flag_of(k) for k in flags})
    check_given(values, labels)
    layout_values = {k: values.pop(k) for k in LAYOUT_FIELDS if k in values}
    _resolve_degrees(values, layout_values)
    return TrainConfig(**values, layout=Layout(**layout_values))


def check_given(values: dict[str, Any], labels: dict[str, str]) -> None:
    """Every number the user gave obeys its rule (GIVEN_RANGES); the error names the flag or the
    config key as the user wrote it, not the field behind it. (--stage-speeds and --stage-layers are
    checked with the layout, which names them.)"""
    for name, value in values.items():
        # None: unset (a resumed run's config.json keeps the fields it left to the model, as top_k)
        if name in GIVEN_RANGES and value is not None:
            check_range(labels[name], value, GIVEN_RANGES[name])


def check_batch_memory(global_batch: int, seq_len: int, flag: str = "--global-batch") -> None:
    """Refuse a batch whose token arrays alone exceed this machine's memory (the activations need
    many times more): int64 inputs and targets of the whole global batch, ``2 x 8 x B x (L + 1)``
    bytes over the local ranks."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = 2 * 8 * global_batch * (seq_len + 1)
    if need > ram:
        raise ConfigError(f"{flag} {global_batch} with --seq-len {seq_len}: the token batch alone needs "
                          f"{need / 2**30:,.0f} GiB, more than this machine's {ram / 2**30:,.0f} GiB of memory, "
                          f"and the activations need many times more. Use a smaller {flag}.")


def _resolve_degrees(values: dict[str, Any], layout: dict[str, Any]) -> None:
    """Fill in dp and nproc: under torchrun the world size is given; otherwise --nproc, the
    degrees, or the default of 2 data-parallel processes."""
    pp, tp, cp = layout.get("pp", 1), layout.get("tp", 1), layout.get("cp", 1)
    if not all(isinstance(v, int) and v >= 1 for v in (pp, tp, cp)):
        return  # Layout validation reports it
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None
    nproc = world or values.get("nproc")
    if "dp" not in layout:
        others = pp * cp * tp
        if nproc:
            if nproc % others:
                what = f"pp={pp} x tp={tp}" + (f" x cp={cp}" if cp > 1 else "")
                raise ConfigError(f"{nproc} processes cannot be split into {what} "
                                  f"groups; use a multiple of {others} processes.")
            layout["dp"] = nproc // others
        else:
            layout["dp"] = DEFAULT_NPROC if others == 1 else 1
            ep = layout.get("ep", 1)
            if isinstance(ep, int) and ep > 1 and layout["dp"] % ep:  # --ep alone: its ep ranks are the dp ranks
                layout["dp"] = ep
    if world:
        values["nproc"] = world


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: a NaN/infinite number is written as null and its key listed under "nonfinite"."""
    from paratrain.metrics import dumps_finite

    path.write_text(dumps_finite(obj, indent=2) + "\n", encoding="utf-8")
