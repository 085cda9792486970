"""Activation recomputation: trade compute for memory (Korthikanti et al. 2022).

* ``full``: keep only each block's input; the whole block's forward is replayed in backward
  (about one extra forward: hardware FLOPs x 4/3).
* ``selective``: replay only the attention core (``attn.attend``: the T^2-sized scores,
  softmax and dropout), the largest activations per FLOP of recomputation.

Applied to the module instances in place (their ``forward`` / ``attend`` wrapped in
``torch.utils.checkpoint``), so parameter names and the state dict stay the reference's. The
checkpoint restores the RNG state before replaying, so dropout masks are the same both times and
results are identical to no recomputation.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return wrapper


def recompute_blocks(blocks: nn.ModuleList) -> int:
    """``full`` for any model: each block of its stage spec keeps only its input, and its forward
    is replayed in backward (a Hugging Face model's blocks: models/hf.py)."""
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return len(blocks)


def apply_recompute(model: nn.Module, mode: str) -> int:
    """Wrap every transformer block (``full``) or attention core (``selective``) of ``model``.
    Returns how many were wrapped; ``none`` does nothing."""
    if mode == "none":
        return 0
    count = 0
    for module in model.modules():
        if mode == "full" and hasattr(module, "attn") and hasattr(module, "mlp"):
            module.forward = _checkpointed(module.forward)
            count += 1
        elif mode == "selective" and hasattr(module, "attend"):
            module.attend = _checkpointed(module.attend)
            count += 1
    if mode not in ("full", "selective"):
        raise ValueError(f"unknown recompute mode {mode!r}")
    return count
