"""The exact bytes of model states one rank holds: parameters, gradients, optimizer state.

Counted by *storage*: a tensor that is a view (a parameter inside a flat bucket, a ZeRO shard
inside a gradient buffer) adds nothing beyond the storage it views, and each storage counts once,
under the first category that reaches it (parameters, then gradients, then optimizer state).
A freed ZeRO-3 unit's storage has 0 bytes. What is measured is what the rank holds at the
moment of the call -- after a step, the persistent states; transient buffers (ZeRO-2/3
gradient buckets, gathered ZeRO-3 units) are counted only while they exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> StateBytes:
    """Bytes of ``module``'s parameters and gradients and of ``optimizer``'s parameters (ZeRO's
    shards), their gradients and its state (AdamW: two moments and a step count per tensor)."""
    seen: set[tuple[torch.device, int]] = set()

    def count(tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total

    tensors = [*module.parameters(), *(p for g in optimizer.param_groups for p in g["params"])]
    params = count(tensors)
    grads = count(t.grad for t in tensors)
    state = count(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return StateBytes(params, grads, state)
