"""``paratrain convert``: a run's sharded checkpoint as one reference-shaped file, or as a
Hugging Face GPT-2 folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from paratrain.errors import ConfigError

DESCRIPTION = """\
Convert the latest valid checkpoint of a run (saved in any layout) into one file or folder that
needs no paratrain layout to read.

examples:
  paratrain convert runs/my-run --to-single model.safetensors   # the reference model's state dict
  paratrain convert runs/my-run --to-hf gpt2-dir                # GPT2LMHeadModel.from_pretrained(gpt2-dir)

Either output can start another run: paratrain train --init-from model.safetensors (or gpt2-dir)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="a run's checkpoint as one safetensors file or a Hugging Face folder",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="RUN", help="the run folder, i.e. train's --out (or its checkpoints/ or one "
                   "step-N/ folder)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-single", metavar="FILE", help="write the reference-shaped state dict to FILE (safetensors)")
    g.add_argument("--to-hf", metavar="DIR", help="write model.safetensors and config.json of a transformers "
                   "GPT2LMHeadModel into DIR (GPT-2-layout models)")
    p.add_argument("--force", action="store_true", help="replace an existing output (refused without it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.checkpoint import convert
    from paratrain.checkpoint.manifest import CheckpointError

    src = Path(args.folder)
    if not src.exists():
        raise ConfigError(f"{src} does not exist; give a run folder written by paratrain train --checkpoint-every.")
    target = Path(args.to_single or args.to_hf)
    if not target.resolve().parent.is_dir():
        raise ConfigError(f"{target}: the folder {target.resolve().parent} does not exist; create it or give "
                          f"another path.")
    if args.to_single and target.is_dir():
        raise ConfigError(f"--to-single {target} is a folder; give a file name such as {target / 'model.safetensors'}.")
    if args.to_hf and target.exists() and not target.is_dir():
        raise ConfigError(f"--to-hf {target} is a file; give a folder (it is created if missing).")
    existing = target if args.to_single else target / "model.safetensors"
    if existing.exists() and not args.force:
        raise ConfigError(f"{existing} exists; nothing was written. Give another path, or --force to replace it.")
    try:
        if args.to_single:
            out = convert.to_single(src, target)
        else:
            _, m = convert.model_state(src)
            from paratrain.models.configs import get_model_config

            cfg = m.config
            model = get_model_config(cfg.get("model", "tiny"), dropout=cfg.get("dropout", 0.0),
                                     **({"tie_embeddings": False} if cfg.get("untie_embeddings") else {}),
                                     **({"vocab_size": cfg["vocab_size"]} if cfg.get("vocab_size") else {}))
            out = convert.to_hf(src, target, model)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    print(f"paratrain convert: wrote {out}")
    return 0
