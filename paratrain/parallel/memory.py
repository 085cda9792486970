"""What a rank holds, measured exactly, in the terms the planner predicts (not RSS noise).

* **Model states** (:func:`model_state_bytes`, a :class:`~paratrain.core.state.ModelState`, the
  record the planner predicts too): the bytes of the rank's parameters, of their
  gradients and of the optimizer's state tensors (AdamW's ``exp_avg``, ``exp_avg_sq`` and
  ``step``), counted by *storage*: a tensor that is a view (a parameter inside a flat bucket, a
  ZeRO shard inside a gradient buffer) adds nothing beyond the storage it views, and each storage
  counts once, under the first category that reaches it (parameters, then gradients, then
  optimizer state). A freed ZeRO-3 unit's storage has 0 bytes. What is measured is what the rank
  holds at the moment of the call -- after a step, the persistent states; transient buffers
  (ZeRO-2/3 gradient buckets, gathered ZeRO-3 units) are counted only while they exist.
* **Activations** (:class:`ActivationMeter`): the tensors autograd saves for backward, captured
  with :func:`torch.autograd.graph.saved_tensors_hooks` while the step runs. A saved tensor is
  counted by its storage (q, k and v are views of one qkv output: one storage), from the moment
  it is saved until autograd frees it after its backward; parameters (a linear saves its weight)
  are not activations: the meter is given the tensors whose storages hold parameters and skips
  those storages -- the parameters, and under ZeRO-3 also each unit's gathered flat buffer
  (between steps the parameters are placeholders, so only the wrapper knows those storages:
  ``ParallelModel.weight_tensors``). The peak over the step is what the micro-batches in flight
  hold at once: one micro-batch's activations without a pipeline, up to ``min(p - i, m)`` of
  them on pipeline rank ``i`` under 1F1B, and so on -- the planner's ``activation_bytes``.

  Activation recomputation is seen as it happens: ``torch.utils.checkpoint`` saves each
  checkpointed region's inputs through the same hooks (counted) and the region's own tensors
  through inner hooks (not counted: they are not stored). The tensors rebuilt during a
  region's backward are a transient of the backward pass and are not part of this figure.
  Tensors kept for backward outside autograd (a zero-bubble ``I`` keeps each linear's input and
  output gradient for its ``W``) are counted through :func:`hold` while they are kept.

    meter = ActivationMeter(pm.weight_tensors())   # or a plain model's model.parameters()
    with meter:
        loss = model(x, y); loss.backward()
    meter.peak_bytes
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from paratrain.core.state import ModelState


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of ``t``'s storage. The identity is the storage object's, not its data
    pointer: a ZeRO-3 unit's storage keeps its identity when it is freed (resized to 0 bytes) and
    regathered (reallocated elsewhere)."""
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


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
    ``weights``: tensors whose storages hold parameters, never counted (their storages are taken
    now; a freed ZeRO-3 buffer keeps its storage's identity when regathered). Re-entrant use
    accumulates; :meth:`reset` starts a new peak."""

    def __init__(self, weights: Iterable[torch.Tensor]) -> None:
        self._excluded = {_storage(t)[0] for t in weights}
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
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)
        self._hooks = None


_ACTIVE: list[ActivationMeter] = []  # the meters running now (innermost last)


def hold(*tensors: torch.Tensor) -> tuple[Any, ...]:
    """Count ``tensors`` as saved activations of the running meter (if any) for as long as the
    returned token lives: for tensors kept for backward outside autograd's saved tensors, such
    as the input and output gradient a zero-bubble ``I`` queues for its ``W``
    (``parallel/pipeline/split.py``). A storage already counted is not counted twice."""
    if not _ACTIVE:
        return ()
    meter = _ACTIVE[-1]
    return tuple(meter._pack(t) for t in tensors)


def model_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> ModelState:
    """Bytes of ``module``'s parameters and gradients and of ``optimizer``'s parameters (ZeRO's
    shards), their gradients and its state (AdamW: two moments and a step count per tensor), as
    exact integers in the planner's record (``plan/formulas.model_state_bytes`` predicts it).
    Under mixed precision (``parallel/mixed.py``) the optimizer steps fp32 masters: they count
    as optimizer state, the bf16 weights (or shards) they stand for as parameters, and an fp32
    gradient buffer attached to the masters as gradients (not the transient fp32 upcast of bf16
    gradients a step makes for them). Read it at the optimizer (between the step's reduction and
    ``zero_grad``): ZeRO 2/3 release their gradient shards at ``zero_grad``."""
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

    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    low_of = getattr(optimizer, "low_of", {})  # mixed precision: the optimizer steps fp32 masters
    masters = [p for p in stepped if id(p) in low_of]
    upcast = getattr(optimizer, "upcast", set())  # masters whose .grad is a transient fp32 copy
    tensors = [*module.parameters(), *(low_of.get(id(p), p) for p in stepped)]
    params = count(tensors)
    grads = count(t.grad for t in [*tensors, *(m for m in masters if id(m) not in upcast)])
    # the fp32 master weights are optimizer state ([R20]'s K = 12: master 4 + m 4 + v 4)
    state = count([*masters, *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))])
    return ModelState(params, grads, state)
