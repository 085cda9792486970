"""Checkpoints in and out: the plain reference state dict, and Hugging Face GPT-2.

* :func:`to_single` gathers the model tensors of a sharded checkpoint (any layout) into one
  reference-shaped safetensors file;
* :func:`to_hf` writes ``model.safetensors`` + ``config.json`` that
  ``transformers.GPT2LMHeadModel.from_pretrained`` loads, computing the same logits (GPT-2's
  ``Conv1D`` stores ``(in, out)``: our ``nn.Linear`` weights transposed);
* :func:`read_init` reads either back as a reference state dict for ``train --init-from``.

No transformers import: the files are written and read with safetensors and json only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from paratrain.checkpoint import manifest as mf
from paratrain.checkpoint.atomic import atomic_write_bytes
from paratrain.checkpoint.boxes import full_box
from paratrain.checkpoint.manifest import CheckpointError
from paratrain.checkpoint.store import CheckpointReader, find_valid
from paratrain.models.configs import ModelConfig

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}
# ours -> GPT-2's, per block; True: a Linear weight GPT-2 stores transposed (Conv1D)
_BLOCK = {"ln1.weight": ("ln_1.weight", False), "ln1.bias": ("ln_1.bias", False),
          "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
          "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
          "ln2.weight": ("ln_2.weight", False), "ln2.bias": ("ln_2.bias", False),
          "mlp.fc1.weight": ("mlp.c_fc.weight", True), "mlp.fc1.bias": ("mlp.c_fc.bias", False),
          "mlp.fc2.weight": ("mlp.c_proj.weight", True), "mlp.fc2.bias": ("mlp.c_proj.bias", False)}
_TOP = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight"}


def model_state(run_or_checkpoint: Path) -> tuple[dict[str, torch.Tensor], mf.Manifest]:
    """The reference-shaped model tensors of the latest valid checkpoint of a run folder
    (``OUT``, ``OUT/checkpoints`` or one ``step-N`` folder)."""
    path = Path(run_or_checkpoint)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    folder, m = (path, mf.read(path)) if (path / mf.MANIFEST).is_file() else find_valid(root)[:2]
    reader = CheckpointReader(folder, m)
    state = {}
    for name, entry in m.tensors.items():
        if name.startswith("optim."):
            continue
        out = torch.empty(entry.shape, dtype=_TORCH_DTYPES.get(entry.dtype, torch.float32))
        reader.fill(name, full_box(entry.shape), out)
        state[name] = out
    if "lm_head.weight" not in state and "wte.weight" in state:  # tied: saved once, as the reference's
        state["lm_head.weight"] = state["wte.weight"]  # state dict has it under both names
    return state, m


def to_single(run: Path, file: Path) -> Path:
    from safetensors.torch import save

    state, m = model_state(run)
    if state.get("lm_head.weight") is state.get("wte.weight"):
        del state["lm_head.weight"]  # tied: one tensor (read_init restores the alias)
    meta = {"format": "paratrain-reference", "step": str(m.step), "model": str(m.config.get("model", ""))}
    atomic_write_bytes(Path(file), save(state, metadata=meta))
    return Path(file)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.hidden, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.ffn_hidden, "activation_function": "gelu_new",
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": 0, "eos_token_id": 0}


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            hf, transpose = _BLOCK[rest]
            out[f"transformer.h.{i}.{hf}"] = (t.t() if transpose else t).contiguous()
        elif name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # GPT-2 ties it to wte
        else:
            out[_TOP[name]] = t.contiguous()
    return out


def from_hf_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv_top = {v: k for k, v in _TOP.items()}
    inv_block = {v[0]: (k, v[1]) for k, v in _BLOCK.items()}
    out = {}
    for name, t in hf.items():
        if name.startswith("transformer.h."):
            _, _, i, rest = name.split(".", 3)
            if rest not in inv_block:  # e.g. attn.bias / masked_bias buffers of old transformers
                continue
            ours, transpose = inv_block[rest]
            out[f"blocks.{i}.{ours}"] = t.t().contiguous() if transpose else t
        elif name in inv_top:
            out[inv_top[name]] = t
    if "lm_head.weight" not in out and "wte.weight" in out:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def to_hf(run: Path, folder: Path, cfg: ModelConfig) -> Path:
    from safetensors.torch import save

    state, _ = model_state(run)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "model.safetensors", save(to_hf_state(state, cfg), metadata={"format": "pt"}))
    atomic_write_bytes(folder / "config.json", json.dumps(hf_config(cfg), indent=2).encode())
    return folder


def read_init_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The reference names and shapes :func:`read_init` would return, from the file's header only."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"--init-from {path}: {file.name} is not a readable safetensors file ({e}).") from None
    if any(k.startswith("transformer.") for k in shapes):
        return {k: tuple(v.shape) for k, v in from_hf_state({k: torch.empty(s, device="meta")
                                                              for k, s in shapes.items()}).items()}
    if "lm_head.weight" not in shapes and "wte.weight" in shapes:
        shapes["lm_head.weight"] = shapes["wte.weight"]
    return shapes


def read_init(path: Path) -> dict[str, torch.Tensor]:
    """A reference state dict from a ``--to-single`` file, or a GPT-2 folder / ``.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"--init-from {path}: {file.name} is not a readable safetensors file ({e}).") from None
    if any(k.startswith("transformer.") for k in tensors):
        return from_hf_state(tensors)
    if "lm_head.weight" not in tensors and "wte.weight" in tensors:  # tied: stored once
        tensors["lm_head.weight"] = tensors["wte.weight"]
    return tensors
