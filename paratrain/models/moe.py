"""The mixture-of-experts MLP of the reference GPT: a learned top-k router and E expert MLPs.

No distributed code: expert parallelism (``parallel/expert.py``) replaces :meth:`MoE.run_experts`
with a version that sends each expert's rows to the rank holding it and back. See docs/expert.md.

Routing, per *group* of tokens = one sequence (GShard's groups), so that the routing of a
sequence does not depend on which rank, micro-batch or batch holds it -- every layout routes
exactly as the single-process reference does:

* router probabilities ``p = softmax(x W_r)`` (B, T, E), in fp32;
* each token's ``k`` best experts by a *stable* descending sort: equal probabilities go to the
  lower expert index, so routing is deterministic;
* gates: ``k = 1`` the top probability itself (Switch: the router learns through it); ``k = 2``
  the two probabilities renormalised to sum to 1 (GShard, Mixtral);
* capacity (``capacity_factor`` c > 0): expert e takes at most ``C = ceil(c T k / E)`` of a
  sequence's assignments, first come first served in the order (choice, position): every
  token's first choice before any second choice, then by position. An assignment past C is
  dropped: the token's output lacks that expert's term (its residual stream passes unchanged
  when all its choices are dropped). ``c = 0``: dropless, every assignment is computed;
* load-balancing loss (Switch eq. 4, per sequence, then the mean over sequences):
  ``aux = E * sum_e f_e P_e`` with ``f_e`` the fraction of the sequence's T k assignments routed to
  e (before capacity) and ``P_e`` the mean router probability of e; 1 when perfectly balanced.
  The model adds ``aux_loss_coef * sum over MoE blocks of aux`` to the training loss.

Output: ``y_t = sum over kept choices j of gate_tj * expert_{e_tj}(x_t)``.
Shapes: B batch, T sequence, H hidden, E experts, k choices, N kept assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paratrain.models.configs import ModelConfig


@dataclass
class Routing:
    """The kept assignments of one forward, sorted by expert (stable: within an expert in
    (sequence, position, choice) order). ``token`` (N,) row of the flattened (B*T, H) input,
    ``expert`` (N,), ``gate`` (N,) fp32 with gradient to the router, ``counts`` (E,) kept rows
    per expert; ``aux`` the load-balancing loss (scalar), ``assigned`` (E,) assignments per
    expert before capacity, ``dropped`` the number of assignments dropped."""

    token: torch.Tensor
    expert: torch.Tensor
    gate: torch.Tensor
    counts: torch.Tensor
    aux: torch.Tensor
    assigned: torch.Tensor
    dropped: torch.Tensor


def route(logits: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Route the tokens of ``logits`` (B, T, E); see the module docstring for the rules."""
    B, T, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (B, T, E)
    top_p, top_e = probs.sort(dim=-1, descending=True, stable=True)
    top_p, top_e = top_p[..., :top_k], top_e[..., :top_k]  # (B, T, k)
    gate = top_p if top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    chosen = F.one_hot(top_e, E).sum(dim=-2)  # (B, T, E): 1 where e is among the token's k
    frac = chosen.float().mean(dim=1) / top_k  # (B, E) f_e
    aux = (E * (frac * probs.mean(dim=1)).sum(dim=-1)).mean()
    keep = torch.ones_like(top_e, dtype=torch.bool)
    if capacity_factor > 0:
        capacity = math.ceil(capacity_factor * T * top_k / E)
        order = F.one_hot(top_e.transpose(1, 2).reshape(B, top_k * T), E)  # (B, kT, E), choice-major
        place = ((order.cumsum(dim=1) - 1) * order).sum(dim=-1)  # place in its expert's queue
        keep = (place < capacity).view(B, top_k, T).transpose(1, 2)  # (B, T, k)
    token = torch.arange(B * T, device=logits.device).repeat_interleave(top_k)
    flat_keep = keep.reshape(-1)
    token, expert, g = token[flat_keep], top_e.reshape(-1)[flat_keep], gate.reshape(-1)[flat_keep]
    by_expert = torch.sort(expert, stable=True).indices
    expert = expert[by_expert]
    return Routing(token[by_expert], expert, g[by_expert], torch.bincount(expert, minlength=E), aux,
                   chosen.sum(dim=(0, 1)), (~keep).sum())


class MoE(nn.Module):
    """``num_experts`` MLPs (``experts``, each the dense block's :class:`~paratrain.models.gpt.MLP`)
    and a router (H -> E, no bias). ``forward`` (B, T, H) -> (B, T, H); it leaves the routing's
    load-balancing loss in ``aux`` (a scalar with its graph) and adds to the step's statistics
    (:meth:`take_stats`)."""

    def __init__(self, cfg: ModelConfig, mlp: type[nn.Module]) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.router = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)
        self.experts: nn.Module = nn.ModuleList(mlp(cfg) for _ in range(cfg.num_experts))
        self.aux: torch.Tensor | None = None
        self._stats: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        r = route(self.router(x), self.top_k, self.capacity_factor)
        self.aux = r.aux
        self._stats.append(torch.cat([r.assigned.float(), r.dropped.float().view(1), r.aux.detach().view(1),
                                      torch.ones(1, device=x.device)]))
        flat = x.reshape(B * T, H)
        out = self.run_experts(flat[r.token], r.counts)  # (N, H), expert-sorted like the rows
        y = torch.zeros_like(flat).index_add_(0, r.token, out * r.gate.unsqueeze(-1).to(out.dtype))
        return y.view(B, T, H)

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``rows`` (N, H) sorted by expert, ``counts[e]`` of them for expert e -> each row
        through its expert (N, H), in the same order."""
        pieces = rows.split(counts.tolist())
        return torch.cat([expert(piece) for expert, piece in zip(self.experts, pieces)])

    def take_stats(self) -> torch.Tensor:
        """The sums since the last call, over forwards: (E + 3,) = assignments per expert, dropped
        assignments, the sum of ``aux``, the number of forwards (zeros if none); then reset."""
        out = torch.stack(self._stats).sum(0) if self._stats else torch.zeros(self.num_experts + 3)
        self._stats = []
        return out


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module, layers: list[MoE]) -> torch.Tensor | float:
    """``aux_loss_coef * sum of the layers' aux`` of the last forward (0 without layers)."""
    if not layers:
        return 0.0
    return model.cfg.aux_loss_coef * torch.stack([m.aux for m in layers]).sum()


def router_stats(totals: torch.Tensor, num_experts: int, num_layers: int) -> dict[str, object]:
    """JSON-friendly router statistics from the summed :meth:`MoE.take_stats` of every layer
    (summed over ranks too, when the caller all-reduced them): tokens per expert (assignments,
    summed over layers), dropped assignments, the mean aux loss per layer."""
    t = totals.double()
    calls = max(float(t[num_experts + 2]), 1.0)
    return {"tokens_per_expert": [int(v) for v in t[:num_experts].round().tolist()],
            "dropped": int(round(float(t[num_experts]))),
            "aux_loss": float(t[num_experts + 1]) / calls if num_layers else 0.0}
