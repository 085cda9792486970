"""parallel/marks.py: the typed marks transforms leave on parameters, and what their readers do with them."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from paratrain.comm import single_group
from paratrain.models.configs import get_model_config
from paratrain.models.gpt import build_reference
from paratrain.parallel import marks
from paratrain.parallel.grad import owns
from paratrain.parallel.marks import ParamMarks
from paratrain.parallel.shard import full_shape, shard_parameter
from paratrain.parallel.zero import ZeroDataParallel


def group(name: str, rank: int) -> SimpleNamespace:
    """What ``grad.owns`` reads of a group: its axis name and this rank's index in it."""
    return SimpleNamespace(name=name, rank=rank, size=2)


def test_an_unmarked_tensor_is_a_whole_replicated_parameter() -> None:
    p = nn.Parameter(torch.zeros(3))
    assert marks.marks(p) == ParamMarks()
    assert marks.tp_split(p) is None and marks.tp_size(p) is None
    assert not marks.is_duplicate(p) and not marks.has_partial_grad(p) and not marks.is_sharded(p, "tp")
    assert marks.param_of(p) is p
    assert owns(p, [group("tp", 0)]) and not owns(p, [group("tp", 1)])  # index 0 counts a replica


def test_marks_accumulate_and_drive_ownership() -> None:
    """tp then pp sharding: every rank of both axes counts its slice; a duplicate counts nowhere."""
    p = nn.Parameter(torch.zeros(4, 2))
    marks.mark_tp_split(p, 0, 1)
    marks.mark_sharded(p, "pp")
    assert marks.marks(p).sharded == {"tp", "pp"} and marks.tp_split(p) == (0, 1)
    assert owns(p, [group("tp", 1), group("pp", 1)])
    assert not owns(p, [group("tp", 1), group("dp", 1)])  # replicated over dp: only dp index 0
    marks.mark_duplicate(p)
    assert marks.marks(p).sharded == {"tp", "pp"}  # earlier marks kept
    assert not owns(p, [group("tp", 0), group("pp", 0)])


def test_shard_parameter_marks_layout_and_padding() -> None:
    g = single_group("tp")
    ref = nn.Parameter(torch.randn(5, 3))
    padded = shard_parameter(ref, g, dim=0, padded_size=8)
    assert marks.tp_split(padded) == (0, 1) and marks.tp_size(padded) == 5 and marks.is_sharded(padded, "tp")
    assert full_shape(padded, 1) == (5, 3)  # the padding rows are not the reference's
    plain = shard_parameter(ref, g, dim=1)
    assert marks.tp_split(plain) == (1, 1) and marks.tp_size(plain) is None
    assert marks.marks(ref) == ParamMarks()  # the reference parameter itself is left unmarked


def test_marks_survive_a_data_swap() -> None:
    """ZeRO points parameters at flat buffers (``p.data = view``): the marks stay with the object."""
    p = nn.Parameter(torch.zeros(4))
    marks.mark_partial_grad(p)
    p.data = torch.ones(4)
    assert marks.has_partial_grad(p)


def test_zero_pieces_inherit_their_parameters_marks() -> None:
    model = build_reference(get_model_config("tiny"), 0)
    tied = model.lm_head.weight
    marks.mark_duplicate(tied)
    marks.mark_partial_grad(model.ln_f.weight)
    marks.mark_tp_split(model.blocks[0].mlp.fc1.weight, 0, 1)
    sync = ZeroDataParallel(model, single_group("dp"), 1)
    by_param = {marks.param_of(piece): piece for piece in sync.grad_params}
    assert set(by_param) == {p for p in model.parameters()}  # one piece per parameter at dp = 1
    for p, piece in by_param.items():
        got = marks.marks(piece)
        assert got.sharded == marks.marks(p).sharded | {"dp"}
        assert got.duplicate == marks.is_duplicate(p) and got.partial_grad == marks.has_partial_grad(p)
        assert got.tp_split is None  # a piece is a flat view: no tp layout
    assert marks.is_duplicate(by_param[tied]) and marks.has_partial_grad(by_param[model.ln_f.weight])


def test_equality_ignores_the_piece_link() -> None:
    a, b = torch.zeros(2), torch.zeros(2)
    pa, pb = torch.zeros(1), torch.zeros(1)
    marks.mark_piece(pa, a)
    marks.mark_piece(pb, b)
    assert marks.marks(pa) == marks.marks(pb) and hash(marks.marks(pa)) == hash(marks.marks(pb))
    assert marks.param_of(pa) is a and marks.param_of(pb) is b
