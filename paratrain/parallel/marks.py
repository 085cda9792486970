"""What the transforms record on a parameter, typed: one :class:`ParamMarks` per tensor.

Transforms change what a rank's tensor *is* relative to the reference parameter; later code
(the gradient norm, the sequence-parallel reduction, the full-state gather, ZeRO's pieces) needs
to know. The record lives on the tensor itself (one attribute, set and read only here), so it
follows the parameter through ``p.data = ...`` swaps (ZeRO flat buffers, ZeRO-3 placeholders)
and ``state_dict(keep_vars=True)``. An unmarked tensor has ``ParamMarks()``: a whole replicated
copy of a reference parameter.

Each mark: what it means; who sets it -> who reads it.

* ``sharded``: the mesh axes along which ranks hold *different* elements of the tensor.
  ``shard.shard_parameter`` (tp), ``pipeline/stage.build_stage`` (pp), ZeRO's pieces (dp)
  -> ``grad.owns``.
* ``duplicate``: a second copy of a parameter that another rank holds and counts (the tied LM
  head on the last pipeline stage). ``pipeline/stage.build_stage`` -> ``grad.owns``.
* ``tp_split``: ``(dim, chunks)``, the tensor is this rank's tp shard (layout: ``parallel/shard.py``).
  ``shard.shard_parameter`` -> ``shard.full_shape``, ``shard.gather_full_state``.
* ``tp_size``: the reference size along ``dim`` when the tensor was padded before slicing (the
  vocabulary); None when not padded. ``shard.shard_parameter`` -> the same readers.
* ``partial_grad``: replicated over tp, but each tp rank's gradient is a partial sum over its own
  tokens (sequence parallelism). ``shard.mark_partial_grad``, ``tensor.RowParallelLinear``
  -> ``parallelize`` (``SequenceParallelGradSync`` sums them over tp).
* ``piece_of``: the parameter a ZeRO piece (a flat view of this rank's shard) is part of.
  ``zero.ShardedBucket`` -> ``pipeline/model`` (the tied ``W``'s reduction), tests.

``grad.owns`` turns ``sharded`` and ``duplicate`` into "which ranks count this tensor in the global
gradient norm": ``||g||^2 = sum over ranks of the squares of the tensors they own``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

_ATTR = "_pt_marks"  # the only attribute paratrain sets on a tensor


@dataclass(frozen=True)
class ParamMarks:
    """See the module table. ``piece_of`` is left out of equality and repr (a tensor)."""

    sharded: frozenset[str] = frozenset()
    duplicate: bool = False
    tp_split: tuple[int, int] | None = None
    tp_size: int | None = None
    partial_grad: bool = False
    piece_of: torch.Tensor | None = field(default=None, compare=False, repr=False)


_NONE = ParamMarks()


def marks(t: torch.Tensor) -> ParamMarks:
    """``t``'s marks (``ParamMarks()`` if no transform marked it)."""
    return getattr(t, _ATTR, _NONE)


def _update(t: torch.Tensor, **changes: object) -> None:
    setattr(t, _ATTR, replace(marks(t), **changes))


def mark_sharded(t: torch.Tensor, axis: str) -> None:
    """Ranks along mesh ``axis`` (``"dp"``, ``"pp"``, ``"tp"``) hold different elements of ``t``."""
    _update(t, sharded=marks(t).sharded | {axis})


def mark_tp_split(t: torch.Tensor, dim: int, chunks: int, size: int | None = None) -> None:
    """``t`` is this rank's tp shard ``(dim, chunks)`` of a reference tensor whose size along
    ``dim`` is ``size`` (None: the shards' total, no padding)."""
    _update(t, tp_split=(dim, chunks), tp_size=size, sharded=marks(t).sharded | {"tp"})


def mark_duplicate(t: torch.Tensor) -> None:
    """``t`` copies a parameter another rank holds (and counts) too."""
    _update(t, duplicate=True)


def mark_partial_grad(t: torch.Tensor) -> None:
    """``t`` is replicated over tp, its gradient a partial sum to be summed over tp."""
    _update(t, partial_grad=True)


def mark_piece(piece: torch.Tensor, param: torch.Tensor, axis: str = "dp") -> None:
    """``piece`` is the part of ``param`` inside this rank's shard along ``axis``: it keeps
    ``param``'s ``sharded``, ``duplicate`` and ``partial_grad`` marks, plus ``axis`` (not its tp
    layout: a piece is a flat view)."""
    m = marks(param)
    setattr(piece, _ATTR, ParamMarks(sharded=m.sharded | {axis}, duplicate=m.duplicate,
                                     partial_grad=m.partial_grad, piece_of=param))


def mark_master(master: torch.Tensor, low: torch.Tensor) -> None:
    """``master`` is the fp32 master copy of ``low`` (a parameter or a ZeRO piece; see
    ``parallel/mixed.py``): the same marks, and it is part of ``low``'s parameter."""
    setattr(master, _ATTR, replace(marks(low), piece_of=param_of(low)))


def is_sharded(t: torch.Tensor, axis: str) -> bool:
    return axis in marks(t).sharded


def is_duplicate(t: torch.Tensor) -> bool:
    return marks(t).duplicate


def has_partial_grad(t: torch.Tensor) -> bool:
    return marks(t).partial_grad


def tp_split(t: torch.Tensor) -> tuple[int, int] | None:
    """``(dim, chunks)`` of a tp shard; None for a tensor that is whole along tp."""
    return marks(t).tp_split


def tp_size(t: torch.Tensor) -> int | None:
    """The reference size along the split dim of a padded tp shard; None when not padded."""
    return marks(t).tp_size


def param_of(t: torch.Tensor) -> torch.Tensor:
    """The parameter a ZeRO piece is part of; ``t`` itself for anything else."""
    p = marks(t).piece_of
    return t if p is None else p
