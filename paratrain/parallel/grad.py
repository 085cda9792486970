"""Global gradient norm and clipping over a mesh, counting every parameter exactly once.

``||g||^2 = sum over unique parameter elements of g^2``. Each rank sums the squares of the
gradients it *owns* (see :func:`owns`), then one all-reduce per group in ``groups`` adds the
partial sums. A parameter sharded along an axis is owned by every rank of that axis (each has a
different slice); a parameter replicated along a reduced axis is owned only by that axis's index 0;
a duplicate copy (e.g. the LM head tied to the embedding on the last pipeline stage) is owned by
nobody. Transforms mark parameters as sharded along axes or duplicate: ``parallel/marks.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.parallel.marks import is_duplicate, marks


def owns(p: nn.Parameter, groups: Sequence[Group]) -> bool:
    if is_duplicate(p):
        return False
    sharded = marks(p).sharded
    return all(g.rank == 0 or g.name in sharded for g in groups)


def grad_norm(params: Sequence[nn.Parameter], groups: Sequence[Group]) -> torch.Tensor:
    """The global L2 norm of the gradients (fp32 scalar), identical on every rank."""
    groups = [g for g in groups if g.size > 1]
    grads = [p.grad for p in params if p.grad is not None and owns(p, groups)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0)
        sq = torch.stack([n.float() for n in norms]).square().sum()
    else:
        device = params[0].device if params else "cpu"
        sq = torch.zeros((), device=device)
    sq = sq.to(collective_device(sq))
    for g in groups:
        comm.all_reduce(sq, g, tag="grad_norm")
    return sq.sqrt()


def clip_grad_norm_(params: Sequence[nn.Parameter], max_norm: float,
                    groups: Sequence[Group] = ()) -> torch.Tensor:
    """Scale all gradients so their global norm is at most ``max_norm``; return the norm before.
    Same arithmetic as ``torch.nn.utils.clip_grad_norm_``: ``g *= min(1, max / (norm + 1e-6))``."""
    norm = grad_norm(params, groups)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


def collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` can run: NCCL reduces CUDA tensors only, and the fp32 masters of
    ``--offload-optimizer`` (their gradients, hence their norm) live in host memory."""
    import torch.distributed as dist

    if (t.device.type == "cpu" and torch.cuda.is_available() and dist.is_available() and dist.is_initialized()
            and dist.get_backend() == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return t.device
