"""``paratrain train --resume OUT``: the settings of the run in OUT, the flags given now on top,
and the latest checkpoint that verifies (falling back past damaged ones, saying so)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from paratrain.cli.common import LAYOUT_FIELDS, TRAIN_FIELDS, build_train_config
from paratrain.config import TrainConfig
from paratrain.errors import ConfigError


def resume_config(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The config to continue with (``resume_from`` set to the checkpoint folder) and one note per
    checkpoint passed over. Before any process starts; the files are verified here (SHA-256)."""
    from paratrain.checkpoint.manifest import CheckpointError
    from paratrain.checkpoint.store import find_valid

    out = Path(args.resume)
    if args.out is not None and Path(args.out) != out:
        raise ConfigError(f"--resume continues the run in its own folder; drop --out {args.out}.")
    saved_path = out / "config.json"
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--resume {out}: {saved_path} does not exist; give the folder of a run that "
                          f"paratrain train wrote (its --out).") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume {out}: {saved_path} cannot be read ({e}).") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {out}: {saved_path} does not hold a run's settings.")
    base: dict[str, Any] = {k: v for k, v in saved.items() if k in TRAIN_FIELDS and k not in ("nproc", "resume_from")}
    if not any(getattr(args, k, None) is not None for k in LAYOUT_FIELDS) and args.nproc is None:
        base.update({k: v for k, v in (saved.get("layout") or {}).items() if k in LAYOUT_FIELDS})
    try:
        folder, m, notes = find_valid(out / "checkpoints")
    except CheckpointError as e:
        raise ConfigError(f"--resume {out}: {e}") from None
    cfg = build_train_config(args, base).replace(out=str(out), resume_from=str(folder), init_from=None)
    for key in ("model", "untie_embeddings"):  # the checkpoint holds that model's tensors, no other's
        if key in base and getattr(cfg, key) != base[key]:
            raise ConfigError(f"--resume {out}: the run trained {key} = {base[key]!r}; its checkpoint cannot continue "
                              f"as {key} = {getattr(cfg, key)!r}. Drop that flag, or start a new run from its "
                              f"weights with: paratrain convert {out} --to-single m.safetensors, then "
                              f"paratrain train --init-from m.safetensors ...")
    for key in ("hf", "hf_config"):  # a Hugging Face model: its checkpoint holds that config's tensors
        if getattr(cfg, key) != base.get(key):
            raise ConfigError(f"--resume {out}: the run trained {key} = {base.get(key)!r}; its checkpoint cannot "
                              f"continue as {key} = {getattr(cfg, key)!r}. Drop that flag to continue the run.")
    if cfg.steps != base.get("steps", cfg.steps):
        import sys

        print(f"paratrain train: note: --steps {cfg.steps} instead of the run's {base['steps']}: the learning-rate "
              f"schedule (warm-up, then cosine decay to the last step) is recomputed for {cfg.steps} steps.",
              file=sys.stderr)
    if m.step >= cfg.steps:
        raise ConfigError(f"--resume {out}: its latest checkpoint is already at step {m.step} of {cfg.steps}; "
                          f"give --steps N with N > {m.step} to train further.")
    return cfg, notes


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (those after it are re-run), atomically."""
    from paratrain.checkpoint.atomic import atomic_write_bytes

    path = out / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(x + "\n" for x in kept).encode())
