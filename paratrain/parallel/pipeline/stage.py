"""This pipeline rank's share of the model: its chunks, cut out of the reference model.

:func:`build_stage` keeps, on every rank, the reference ``GPT`` object itself and removes what
the rank does not run (blocks become ``nn.Identity``, the embedding or the head are deleted), so
the parameters it keeps are the reference's own tensors (never re-initialised) under their
reference names. A :class:`Chunk` runs one stage's units: ``embed`` on the first stage, its
blocks, ``head`` (with the loss) on the last. Because a chunk only calls the model's public
pieces, a tensor-parallel model (whose submodules were already swapped) pipelines the same way.

Tied embeddings. With ``tie_embeddings`` the LM head reuses the token embedding ``W`` (V x H).
The first stage holds ``W`` for the embedding, the last stage a copy for the head; the reference
gradient is ``dL/dW = g_embed + g_head``, so after backward the two copies' gradients are summed
by an all-reduce over the group {first stage, last stage} of each (dp, tp) coordinate, and both
copies take the same optimizer step. For the global gradient norm (summed over the pp group)
every kept parameter is marked sharded along ``pp``, and the last stage's copy of ``W``
duplicate (``parallel/marks.py``), so ``W`` counts once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from paratrain.comm import Group
from paratrain.config import Layout
from paratrain.core.partition import stage_sizes, stage_units
from paratrain.core.schedules import VEE, place_of, placement_of, stage_of
from paratrain.mesh import Mesh
from paratrain.models.gpt import GPT
from paratrain.parallel.marks import mark_duplicate, mark_sharded
from paratrain.parallel.shard import full_shape


def unit_of_key(key: str, num_layers: int) -> int:
    """The unit (0 = embedding, 1..L = blocks, L + 1 = head) a state-dict entry belongs to."""
    if key.startswith(("wte.", "wpe.")):
        return 0
    if key.startswith("blocks."):
        return int(key.split(".")[1]) + 1
    if key.startswith(("ln_f.", "lm_head.")):
        return num_layers + 1
    raise ValueError(f"state-dict entry {key!r} belongs to no pipeline unit")


class Chunk:
    """Runs the units ``units`` of ``model``: ``(B, T)`` token ids or ``(B, T, H)`` activations
    in; ``(B, T, H)`` activations or, on the last stage, the mean loss out."""

    def __init__(self, model: GPT, units: range) -> None:
        self.model = model
        num_layers = len(model.blocks)
        self.embeds = 0 in units
        self.has_head = num_layers + 1 in units
        self.blocks = [model.blocks[u - 1] for u in units if 1 <= u <= num_layers]

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this chunk's forward uses (a pipeline rank's chunks share none)."""
        m = self.model
        modules = ([m.wte, m.wpe] if self.embeds else []) + self.blocks + ([m.ln_f, m.lm_head] if self.has_head else [])
        return list(dict.fromkeys(p for mod in modules for p in mod.parameters()))

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.embeds:
            x = self.model.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.model.head(x, targets) if self.has_head else x


@dataclass
class Stage:
    """What :func:`build_stage` returns: the pruned model, this rank's chunks (chunk ``c`` is
    stage ``c * pp + rank``), the layers per stage, the state-dict entries (name, full reference
    shape) each pipeline rank holds, and the tied-embedding group (None when nothing is tied)."""

    module: GPT
    chunks: list[Chunk]
    sizes: tuple[int, ...]
    keys_by_rank: list[list[tuple[str, torch.Size]]]
    tied_group: Group | None
    tied_param: nn.Parameter | None


def _tied_group(mesh: Mesh) -> Group | None:
    """{first stage, last stage} of every (dp, tp) coordinate, created on every rank in order."""
    shape = mesh.shape
    members = [[shape.rank_of(dp, 0, tp), shape.rank_of(dp, shape.pp - 1, tp)]
               for dp in range(shape.dp) for tp in range(shape.tp)]
    return mesh.build_groups("embed", members)


def build_stage(model: GPT, mesh: Mesh, layout: Layout, seq_len: int) -> Stage:
    """Cut ``model`` (the full reference, identical on every rank) down to this pipeline rank's
    chunks. Collective (it creates the tied-embedding groups): every rank calls it."""
    cfg = model.cfg
    p, v, rank = layout.pp, layout.virtual_stages, mesh.coords.pp
    placement = placement_of(layout.schedule)
    sizes = stage_sizes(cfg, p, v, seq_len, layout.stage_layers, layout.stage_speeds,
                        placement=placement)
    units = stage_units(sizes)
    owner = {u: place_of(placement, p, s)[0] for s, run in enumerate(units) for u in run}  # unit -> rank
    keys_by_rank: list[list[tuple[str, torch.Size]]] = [[] for _ in range(p)]
    for key, value in model.state_dict(keep_vars=True).items():  # tp shards: their reference shape
        keys_by_rank[owner[unit_of_key(key, cfg.num_layers)]].append((key, full_shape(value, mesh.tp.size)))

    mine = {u for u, r in owner.items() if r == rank}
    for i in range(cfg.num_layers):
        if i + 1 not in mine:
            model.blocks[i] = nn.Identity()
    if 0 not in mine:
        del model.wte, model.wpe
    if cfg.num_layers + 1 not in mine:
        del model.ln_f, model.lm_head
    for param in model.parameters():  # each pipeline rank holds different parameters
        mark_sharded(param, "pp")
    tied_group, tied_param = None, None
    if cfg.tie_embeddings and placement != VEE:  # V: the first and last stage are both on rank 0
        tied_group = _tied_group(mesh)
        if rank == 0:
            tied_param = model.wte.weight
        elif rank == p - 1:
            tied_param = model.lm_head.weight
            mark_duplicate(tied_param)  # counted once, on the first stage
    chunks = [Chunk(model, units[stage_of(placement, p, rank, c)]) for c in range(v)]
    return Stage(model, chunks, sizes, keys_by_rank, tied_group, tied_param)


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
