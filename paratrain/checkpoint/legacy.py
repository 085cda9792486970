"""Checkpoints written atomically and verified on load.

A checkpoint is a folder with ``model.pt`` (the full, reference-shaped state dict plus optimizer
state where given) and ``checkpoint.json`` (step, config, the file's SHA-256). Each file is
written to a temporary name in the same folder, flushed to disk and renamed into place, so a
crash mid-write leaves the previous checkpoint intact; ``load_checkpoint`` refuses a file whose
checksum does not match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from paratrain.checkpoint.atomic import sha256_file
from paratrain.checkpoint.manifest import CheckpointError  # one error type for both formats

MODEL_FILE = "model.pt"
META_FILE = "checkpoint.json"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(folder: Path | str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, nested dicts) and ``meta`` (JSON-able) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    _atomic_write(model_path, lambda f: torch.save(state, f))
    record = dict(meta, file=MODEL_FILE, sha256=sha256_file(model_path))
    _atomic_write(folder / META_FILE, lambda f: f.write(json.dumps(record, indent=2).encode()))
    return folder


def _read_meta(folder: Path, meta_path: Path) -> dict[str, Any]:
    """``checkpoint.json`` as a dict whose ``file`` names a file inside ``folder`` (a manifest is
    data from disk: a ``"../x"`` or absolute path there must not make us read elsewhere)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is not valid JSON ({e}); the checkpoint is "
                              f"damaged. Use an earlier checkpoint.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} must hold a JSON object, not "
                              f"{type(meta).__name__}.")
    name = meta.setdefault("file", MODEL_FILE)
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} names the file {name!r}; it must be a plain "
                              f"file name inside the checkpoint folder (like {MODEL_FILE!r}).")
    return meta


def load_checkpoint(folder: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(state, meta)`` after checking the file against its recorded SHA-256."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{folder} is not a paratrain checkpoint: {META_FILE} is missing.")
    meta = _read_meta(folder, meta_path)
    model_path = folder / meta["file"]
    if not model_path.exists():
        raise CheckpointError(f"checkpoint {folder}: {model_path.name} is missing.")
    digest = sha256_file(model_path)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {folder}: {model_path.name} is corrupted (SHA-256 {digest[:12]}... does "
            f"not match the recorded {str(meta.get('sha256'))[:12]}...). Use an earlier checkpoint."
        )
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    return state, meta
