"""This pipeline rank's share of the model: its chunks, cut out of the reference model.

:func:`build_stage` keeps, on every rank, the reference model object itself and removes what
the rank does not run (blocks become ``nn.Identity``, the modules before or after the blocks
are deleted), so the parameters it keeps are the reference's own tensors (never
re-initialised) under their reference names. A :class:`Chunk` runs one stage's units by the model's stage spec
(:class:`~paratrain.models.plans.Stages`: any model that names its list of blocks and what runs
before and after them): ``embed`` on the first stage, its blocks, ``head`` (with the loss) on
the last. Because a chunk only calls the model's public
pieces, a tensor-parallel model (whose submodules were already swapped) pipelines the same way.

Tied embeddings. When the LM head reuses the token embedding ``W`` (V x H), the first stage
holds ``W`` for the embedding, the last stage a copy for the head; the reference gradient
is ``dL/dW = g_embed + g_head``, so after backward the two copies' gradients are summed
by an all-reduce over the group {first stage, last stage} of each (dp, tp) coordinate, and both
copies take the same optimizer step. For the global gradient norm (summed over the pp group)
every kept parameter is marked sharded along ``pp``, and the last stage's copy of ``W``
duplicate (``parallel/marks.py``), so ``W`` counts once.

Mixtures of experts. The reference loss is ``CE + alpha * sum over MoE blocks of aux``; a
stage's ``aux`` terms depend only on its own blocks, so each stage backpropagates its own
(:class:`AuxLossGrad`, together with the activation gradient it receives from the next stage;
the last stage adds its own to the loss); the detached values are kept for the reported loss
(``Chunk.take_aux``; ``pipeline/model.py`` sums them over the pipeline group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from paratrain.comm import Group
from paratrain.config import Layout
from paratrain.core.partition import partition, stage_sizes, stage_units
from paratrain.core.schedules import VEE, place_of, placement_of, stage_of
from paratrain.mesh import Mesh
from paratrain.models.moe import aux_loss, moe_layers
from paratrain.models.plans import Stages
from paratrain.parallel.marks import mark_duplicate, mark_sharded
from paratrain.parallel.shard import full_shape


class AuxLossGrad(torch.autograd.Function):
    """Forward: the stage's output activation ``y`` unchanged. Backward: ``dL/dy`` passes through,
    and the stage's weighted load-balancing loss ``aux`` (a scalar with its graph) receives
    ``scale``, the factor the last stage's loss is backpropagated with (``grad_scale / m``). So the
    stage's ``y.backward(dL/dy)`` also backpropagates ``scale * aux``: the gradient of its own aux
    term, which needs nothing from the later stages."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class Chunk:
    """Runs the units ``units`` of ``model`` by its stage spec: ``(B, T)`` token ids or
    ``(B, T, H)`` activations in; ``(B, T, H)`` activations or, on the last stage, the mean loss
    out. The mixture-of-experts blocks among them add their weighted aux losses: to the loss on
    the last stage, through :class:`AuxLossGrad` (with ``aux_scale``, set by the pipeline model)
    elsewhere."""

    def __init__(self, model: nn.Module, stages: Stages, units: range) -> None:
        self.model = model
        self.stages = stages
        blocks = stages.block_list(model)
        num_layers = len(blocks)
        self.embeds = 0 in units
        self.has_head = num_layers + 1 in units
        self.blocks = [blocks[u - 1] for u in units if 1 <= u <= num_layers]
        self.moe = [m for b in self.blocks for m in moe_layers(b)]
        self.aux_scale = 1.0
        self._aux: list[torch.Tensor] = []  # detached aux terms of the forwards since take_aux

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this chunk's forward uses (a pipeline rank's chunks share none)."""
        names = (self.stages.before if self.embeds else ()) + (self.stages.after if self.has_head else ())
        modules = [self.model.get_submodule(n) for n in names] + self.blocks
        return list(dict.fromkeys(p for mod in modules for p in mod.parameters()))

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        st = self.stages
        if self.embeds:
            x = st.embed(self.model, x)
        for block in self.blocks:
            x = st.run_block(self.model, block, x)
        aux = aux_loss(self.model, self.moe) if self.moe else None
        if self.has_head:
            loss = st.head(self.model, x, targets)
            return loss if aux is None or targets is None else loss + aux
        if aux is None:
            return x
        self._aux.append(aux.detach().float())
        return AuxLossGrad.apply(x, aux, self.aux_scale) if torch.is_grad_enabled() and aux.requires_grad else x

    def take_aux(self) -> torch.Tensor | None:
        """The sum of the weighted aux losses this chunk left out of a loss (it is not the last
        stage) since the last call, over its forwards; None without MoE blocks. Then reset."""
        if not self.moe or self.has_head:
            return None
        out = torch.stack(self._aux).sum() if self._aux else None
        self._aux = []
        return out


@dataclass
class Stage:
    """What :func:`build_stage` returns: the pruned model, this rank's chunks (chunk ``c`` is
    stage ``c * pp + rank``), the layers per stage, the state-dict entries (name, full reference
    shape) each pipeline rank holds, the tied-embedding group (None when nothing is tied), and
    the width of the activations sent between stages."""

    module: nn.Module
    chunks: list[Chunk]
    sizes: tuple[int, ...]
    keys_by_rank: list[list[tuple[str, torch.Size]]]
    tied_group: Group | None
    tied_param: nn.Parameter | None
    hidden: int = 0


def _tied_group(mesh: Mesh) -> Group | None:
    """{first stage, last stage} of every (dp, cp, tp) coordinate, created on every rank in order."""
    shape = mesh.shape
    members = [[shape.rank_of(dp, 0, tp, cp), shape.rank_of(dp, shape.pp - 1, tp, cp)]
               for dp in range(shape.dp) for cp in range(shape.cp) for tp in range(shape.tp)]
    return mesh.build_groups("embed", members)


def _sizes(stages: Stages, num_layers: int, layout: Layout, seq_len: int, placement: str) -> tuple[int, ...]:
    p, v = layout.pp, layout.virtual_stages
    if stages.config is not None or layout.stage_layers is not None:
        return stage_sizes(stages.config, p, v, seq_len, layout.stage_layers, layout.stage_speeds,  # type: ignore[arg-type]
                           placement=placement)
    if num_layers < p * v:
        raise ValueError(f"{p * v} pipeline stages need at least as many blocks; {stages.blocks!r} has {num_layers}")
    ranks = [place_of(placement, p, s)[0] for s in range(p * v)]
    speeds = [float(layout.stage_speeds[r]) for r in ranks] if layout.stage_speeds else None
    return partition([1.0] * num_layers, p * v, speeds, ranks)  # no shape to price: blocks alike


def _drop(model: nn.Module, name: str) -> None:
    """Remove submodule ``name`` from this rank's model (it runs on another stage)."""
    parent, _, leaf = name.rpartition(".")
    delattr(model.get_submodule(parent) if parent else model, leaf)


def _params(model: nn.Module, names: Sequence[str]) -> set[int]:
    return {id(p) for n in names for p in model.get_submodule(n).parameters()}


def build_stage(model: nn.Module, mesh: Mesh, layout: Layout, seq_len: int, stages: Stages | None = None) -> Stage:
    """Cut ``model`` (the full reference, identical on every rank) down to this pipeline rank's
    chunks, by its stage spec (default: the built-in GPT's). Collective (it creates the
    tied-embedding groups): every rank calls it. A weight held both before and after the blocks
    (a tied embedding) is the tied parameter."""
    if stages is None:
        from paratrain.models.plans import gpt_stages

        stages = gpt_stages(model.cfg)  # type: ignore[arg-type]
    p, v, rank = layout.pp, layout.virtual_stages, mesh.coords.pp
    placement = placement_of(layout.schedule)
    blocks = stages.block_list(model)
    num_layers = len(blocks)
    sizes = _sizes(stages, num_layers, layout, seq_len, placement)
    units = stage_units(sizes)
    owner = {u: place_of(placement, p, s)[0] for s, run in enumerate(units) for u in run}  # unit -> rank
    keys_by_rank: list[list[tuple[str, torch.Size]]] = [[] for _ in range(p)]
    for key, value in model.state_dict(keep_vars=True).items():  # tp shards: their reference shape
        keys_by_rank[owner[stages.unit_of_key(key, num_layers)]].append((key, full_shape(value, mesh.tp.size)))
    tied_ids = sorted(_params(model, stages.before) & _params(model, stages.after))

    mine = {u for u, r in owner.items() if r == rank}
    for i in range(num_layers):
        if i + 1 not in mine:
            blocks[i] = nn.Identity()
    if 0 not in mine:
        for name in stages.before:
            _drop(model, name)
    if num_layers + 1 not in mine:
        for name in stages.after:
            _drop(model, name)
    for param in model.parameters():  # each pipeline rank holds different parameters
        mark_sharded(param, "pp")
    tied_group, tied_param = None, None
    if tied_ids and placement != VEE:  # V: the first and last stage are both on rank 0
        assert len(tied_ids) == 1, "one tied weight (the embedding) is supported"
        tied_group = _tied_group(mesh)
        if rank in (0, p - 1):
            tied_param = next(q for q in model.parameters() if id(q) == tied_ids[0])
            if rank == p - 1:
                mark_duplicate(tied_param)  # counted once, on the first stage
    chunks = [Chunk(model, stages, units[stage_of(placement, p, rank, c)]) for c in range(v)]
    return Stage(model, chunks, sizes, keys_by_rank, tied_group, tied_param, stages.hidden)


def flatten(state: dict[str, torch.Tensor], keys: Sequence[tuple[str, torch.Size]]) -> torch.Tensor:
    """The tensors named in ``keys``, in that order, as one flat tensor."""
    return torch.cat([state[k].detach().reshape(-1) for k, _ in keys])


def unflatten(flat: torch.Tensor, keys: Sequence[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, shape in keys:
        n = shape.numel()
        out[key] = flat[offset:offset + n].view(shape).clone()
        offset += n
    return out
