"""Model states on one device: the one record the runtime measures into and the planner predicts.

A device's *model states* ([R20] sec. 3) are three byte counts:

    params      the parameters it stores (P bytes each; ZeRO-3: only its 1/N_d shard)
    grads       their gradients (G bytes each; ZeRO-2/3: the shard)
    optimizer   the optimizer's state (K bytes per parameter; ZeRO-1/2/3: the shard)
    total       params + grads + optimizer

Two sides fill the same record:

* the runtime *measures* it (``paratrain.parallel.memory.model_state_bytes``: the exact bytes of
  the storages a rank holds, integers), into ``summary.json``'s ``memory`` and
  ``--measure-memory``'s ``memory_per_rank``;
* the planner *predicts* it (``paratrain.plan.formulas.model_state_bytes``: ZeRO's closed form,
  floats), shown by ``paratrain estimate`` and priced into each pipeline rank's peak.

Because both are a :class:`ModelState`, a test compares a measurement with a prediction field by
field (``measured.params - predicted.params``, ...), and a new kind of state is added to both at
once. Torch-free: the planner imports it without torch.

[R20] Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
SC20 (arXiv:1910.02054).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PARTS: tuple[str, ...] = ("params", "grads", "optimizer")  # the JSON keys, in this order


@dataclass(frozen=True)
class ModelState:
    """Bytes of parameters, gradients and optimizer state on one device (measured: ints;
    predicted: floats)."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, float]:
        """``{"params": .., "grads": .., "optimizer": ..}``: the keys of ``summary.json``'s
        ``memory`` and of ``estimate --json``'s ``memory_bytes`` (values unchanged: ints stay ints)."""
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer}

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> ModelState:
        """The record of :meth:`as_dict`'s keys in ``d`` (other keys, e.g. ``activations``, ignored)."""
        return cls(*(d[k] for k in PARTS))

    def __sub__(self, other: ModelState) -> ModelState:
        """Field by field: how far a measurement is from a prediction."""
        return ModelState(self.params - other.params, self.grads - other.grads, self.optimizer - other.optimizer)
