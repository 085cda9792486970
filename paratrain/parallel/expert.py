"""Expert parallelism: the experts of every mixture-of-experts block sharded over the ``ep``
group, tokens dispatched to them and combined back with all-to-all (docs/expert.md).

The ep group's ``n`` ranks (``ep`` consecutive dp ranks, ``mesh.py``) each hold ``L = E / n``
experts: rank j the experts ``j L .. (j + 1) L - 1``. Every rank routes its own tokens exactly as
the reference does (``models/moe.py``: per-sequence top-k and capacity); then, per MoE block::

    counts   (E,)  kept rows per expert          all_to_all -> (n, L) rows each source sends me
    rows     (N, H), sorted by expert            all_to_all -> my experts' rows, source-major
    each local expert runs on its rows from every source (concatenated in source order)
    outputs  back in (source, expert) order      all_to_all -> (N, H) in the original order

and the reference's combine (gate x output, summed per token) follows on the token's rank.
:class:`AllToAll` is the autograd function of both exchanges: its backward is the reverse
all-to-all of the gradients (the splits swapped). Each row's expert computation is the
reference's; only the rows' grouping into matrix products differs, hence rounding only.

Gradients: a rank's expert gradient is the sum, over the ep group's tokens that reached it, of
their share of the local losses (each already scaled by 1/dp); :class:`ExpertGradSync` adds
those over the ``edp`` group (the dp / ep ranks holding the same experts) -- sum, no division --
which makes the global mean gradient. Everything else is data-parallel as before, over dp.
Under ZeRO 1/2 the experts' gradients and optimizer state shard over edp, the rest over dp.

Dropout: the experts' output dropout is drawn on the token's rank after the combine, expert by
expert (:meth:`ExpertParallelMoE.dropout_rows`): the draws a rank makes when it runs every expert
itself, so a run's masks do not depend on ep.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.models.configs import ModelConfig
from paratrain.models.moe import MoE, moe_layers, router_stats
from paratrain.parallel.data import DataParallel
from paratrain.parallel.marks import mark_sharded
from paratrain.parallel.model import GradSync


class AllToAll(torch.autograd.Function):
    """Forward: send ``send[j]`` rows of ``x`` to ep member j, receive ``recv[i]`` from member i
    (``comm.all_to_all``, counted under ``tag``). Backward: the same exchange of the gradients
    with the splits swapped (counted under ``<tag>_grad``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, recv: list[int], send: list[int], group: Group,
                tag: str) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group, ctx.tag = recv, send, group, tag
        out = x.new_empty((sum(recv), *x.shape[1:]))
        comm.all_to_all(out, x.contiguous(), group, recv, send, tag=tag)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        comm.all_to_all(out, grad.contiguous(), ctx.group, ctx.send, ctx.recv, tag=f"{ctx.tag}_grad")
        return out, None, None, None, None


class ExpertParallelMoE:
    """Replaces one :class:`MoE`'s ``run_experts``: this rank's experts, the others' over ``group``."""

    def __init__(self, moe: MoE, group: Group) -> None:
        self.group = group
        self.local = moe.num_experts // group.size
        first = group.rank * self.local
        mine = {str(first + i): moe.experts[first + i] for i in range(self.local)}  # global names kept
        moe.experts = nn.ModuleDict(mine)
        self.experts = list(mine.values())
        for p in moe.experts.parameters():
            mark_sharded(p, "ep")
        # Dropout: drawn on the token's rank, after the combine (see dropout_rows); the experts
        # here compute other ranks' rows without it. A child of the MoE: train() / eval() reach it.
        p_drop = max((m.p for e in self.experts for m in e.modules() if isinstance(m, nn.Dropout)), default=0.0)
        for e in self.experts:
            for name, m in list(e.named_children()):
                if isinstance(m, nn.Dropout):
                    setattr(e, name, nn.Identity())
        moe.expert_drop = nn.Dropout(p_drop)
        self.drop = moe.expert_drop

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n, L = self.group.size, self.local
        received = torch.empty_like(counts)  # (n * L,): what each source sends each of my experts
        comm.all_to_all(received, counts, self.group, tag="ep_counts")
        got = received.view(n, L).tolist()
        send = counts.view(n, L).sum(1).tolist()
        recv = [sum(r) for r in got]
        inbox = AllToAll.apply(rows, recv, send, self.group, "ep_dispatch")  # (sum recv, H): source-major, then expert
        pieces = inbox.split([c for r in got for c in r])  # piece s * L + l: source s, my expert l
        outs = [expert(torch.cat([pieces[s * L + i] for s in range(n)])) for i, expert in enumerate(self.experts)]
        per_source = [o.split([got[s][i] for s in range(n)]) for i, o in enumerate(outs)]
        back = torch.cat([per_source[i][s] for s in range(n) for i in range(L)])
        return self.dropout_rows(AllToAll.apply(back, send, recv, self.group, "ep_combine"), counts)

    def dropout_rows(self, out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' output dropout, on the rank of the rows' tokens: ``out`` (N, H) is sorted
        by expert, ``counts[e]`` rows each, and each expert's rows are dropped in expert order --
        the very draws (same generator, shapes, order) the experts' own dropouts make when this
        rank runs every expert itself (ep = 1), so the masks do not depend on ep."""
        if not self.drop.training or self.drop.p == 0:
            return out
        return torch.cat([self.drop(piece) for piece in out.split(counts.tolist())])


def expert_parallel(model: nn.Module, group: Group) -> list[nn.Parameter]:
    """Keep only this rank's experts of every MoE block of ``model`` (in place) and route the
    others' rows over ``group``. Returns the expert parameters this rank holds."""
    params: list[nn.Parameter] = []
    for moe in moe_layers(model):
        moe.run_experts = ExpertParallelMoE(moe, group)  # type: ignore[method-assign]
        params += list(moe.experts.parameters())
    return params


def local_experts(model: nn.Module) -> list[nn.Module]:
    """This rank's experts of every MoE block of ``model``, in forward order."""
    return [e for moe in moe_layers(model) for e in moe.experts.values()]


class ExpertGradSync:
    """A :class:`~paratrain.parallel.model.GradSync`: ``inner`` (data parallelism over dp)
    reduces every parameter but the experts; ``experts`` (bucketed, over ``edp``) sums the
    expert gradients -- already scaled by ``inner``'s 1/dp -- over the ranks holding the same
    experts. Both overlap backward. Under ZeRO both are ``ZeroDataParallel``: the rest
    sharded over dp as without experts, the experts over edp (the ranks that replicate them; at
    stage 3 each local expert is a unit of its own, gathered around its forward and backward),
    and the optimizer steps the pieces of both."""

    def __init__(self, inner: GradSync, experts: DataParallel) -> None:
        self.inner = inner
        self.experts = experts

    @property
    def grad_scale(self) -> float:
        return self.inner.grad_scale

    @property
    def grad_params(self) -> list[torch.Tensor]:
        return self.inner.grad_params + self.experts.grad_params

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from paratrain.parallel.zero import ZeroDataParallel, sharded_optimizer

        if isinstance(self.inner, ZeroDataParallel):  # ZeRO: the pieces of both, gathered after the step
            return sharded_optimizer(optimizer, [self.inner, self.experts])  # type: ignore[list-item]
        return self.inner.shard_optimizer(optimizer)

    def full_params(self) -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()  # ZeRO-3: both gathered (collective over dp, then edp)
        stack.enter_context(self.inner.full_params())
        stack.enter_context(self.experts.full_params())
        return stack

    def set_sync(self, sync: bool) -> None:
        self.inner.set_sync(sync)
        self.experts.set_sync(sync)

    def finish(self) -> None:
        self.inner.finish()
        self.experts.finish()

    def zero_grad(self) -> None:
        self.inner.zero_grad()
        self.experts.zero_grad()

    def grads(self) -> list[torch.Tensor | None]:
        return self.inner.grads() + self.experts.grads()  # type: ignore[attr-defined]


@torch.no_grad()
def gather_experts(module: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """Every expert's tensors (reference names, ``blocks.i.mlp.experts.e.*``) from the ep
    ``group``'s ranks, on each of them; {} without expert parallelism. Collective over ``group``."""
    if group.size == 1:
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, moe in ((n, m) for n, m in module.named_modules() if isinstance(m, MoE)):
        local = [(k, v.detach()) for k, v in moe.experts.state_dict().items()]
        flat = torch.cat([v.reshape(-1) for _, v in local])
        full = flat.new_empty(group.size * flat.numel())
        comm.all_gather(full, flat, group, tag="checkpoint")
        per_rank = full.view(group.size, -1)
        size = len(moe.experts)
        for r in range(group.size):
            offset = 0
            for k, v in local:
                e, leaf = k.split(".", 1)
                glob = int(e) - group.rank * size + r * size
                out[f"{name}.experts.{glob}.{leaf}"] = per_rank[r, offset:offset + v.numel()].view_as(v).clone()
                offset += v.numel()
    return out


def expert_sync(module: nn.Module, inner_cls: Any, dp: Group, edp: Group, experts: list[nn.Parameter],
                **kwargs: Any) -> ExpertGradSync:
    """Data parallelism (``inner_cls``: bucketed, or ZeRO with ``stage=`` in ``kwargs``) over ``dp``
    for all parameters but ``experts``, and over ``edp`` for those."""
    skip = {id(p) for p in experts}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in skip]
    if "stage" in kwargs:  # ZeRO: every dp rank holds its own piece of both (parallel/zero.py)
        kwargs["axes"] = ("dp", "ep", "edp")
    inner = inner_cls(module, dp, params=rest, **kwargs)
    return ExpertGradSync(inner, inner_cls(module, edp, params=experts, **kwargs))


def router_record(layers: list[MoE], model: ModelConfig, groups: list[Group]) -> dict[str, Any]:
    """The step's router statistics over the global batch (``models/moe.router_stats``): every
    rank's sums over its ``layers`` added over ``groups`` -- dp, and pp where each pipeline stage
    holds other blocks (the tp ranks of a dp rank route the same tokens; cp is refused with
    experts). A rank without MoE blocks adds zeros. Collective over ``groups`` (under "metrics")."""
    totals = (torch.stack([m.take_stats() for m in layers]).sum(0) if layers
              else torch.zeros(model.num_experts + 3))
    for group in groups:
        comm.all_reduce(totals, group, tag="metrics")
    return router_stats(totals, model.num_experts, model.num_moe_blocks)
