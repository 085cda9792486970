"""What a rank holds, measured exactly, in the terms the planner predicts (not RSS noise).

* **Model states**: the bytes of the rank's parameters, of their gradients and of the
  optimizer's state tensors (AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``), each storage
  counted once (gradients are views into data-parallel buckets; a tied weight is one parameter).
* **Activations**: the tensors autograd saves for backward, captured with
  :func:`torch.autograd.graph.saved_tensors_hooks` while the step runs. A saved tensor is counted
  by its storage (q, k and v are views of one qkv output: one storage), from the moment it is
  saved until autograd frees it after its backward; parameters (a linear saves its weight) are
  not activations. The peak over the step is what the micro-batches in flight hold at once:
  one micro-batch's activations without a pipeline, up to ``min(p - i, m)`` of them on pipeline
  rank ``i`` under 1F1B, and so on -- the planner's ``activation_bytes``.

  Activation recomputation is seen as it happens: ``torch.utils.checkpoint`` saves each
  checkpointed region's inputs through the same hooks (counted) and the region's own tensors
  through inner hooks (not counted: they are not stored). The tensors rebuilt during a
  region's backward are a transient of the backward pass and are not part of this figure.

    meter = ActivationMeter(model.parameters())
    with meter:
        loss = model(x, y); loss.backward()
    meter.peak_bytes
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Saved:
    """What autograd keeps instead of a saved tensor while the meter runs; its deletion (when
    autograd frees the node's saved tensors) releases the storage's count."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: ActivationMeter, key: int, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter._release(self.key)


class ActivationMeter:
    """Peak bytes of saved-for-backward tensors (distinct storages) while the meter is active.
    Re-entrant use accumulates; :meth:`reset` starts a new peak."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._excluded = {p.untyped_storage().data_ptr() for p in params}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks: Any = None

    def reset(self) -> None:
        self.peak_bytes = self.live_bytes

    def _pack(self, t: torch.Tensor) -> Any:
        key, nbytes = _storage(t)
        if key in self._excluded or nbytes == 0:
            return t
        if key not in self._refs:
            self._refs[key], self._sizes[key] = 0, nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] += 1
        return _Saved(self, key, t)

    @staticmethod
    def _unpack(x: Any) -> torch.Tensor:
        return x.tensor if isinstance(x, _Saved) else x

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live_bytes -= self._sizes.pop(key)

    def __enter__(self) -> ActivationMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


def model_state_bytes(params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer | None = None
                      ) -> dict[str, int]:
    """Bytes of ``params``, of their gradients and of ``optimizer``'s state, each storage once."""
    params = list(params)
    seen: set[int] = set()

    def total(tensors: Iterable[torch.Tensor]) -> int:
        out = 0
        for t in tensors:
            key, nbytes = _storage(t)
            if key not in seen:
                seen.add(key)
                out += nbytes
        return out

    state: list[torch.Tensor] = []
    if optimizer is not None:
        for p in params:
            state += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return {"params": total(p.detach() for p in params),
            "grads": total(p.grad for p in params if p.grad is not None),
            "optimizer": total(state)}
