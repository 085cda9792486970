"""ZeRO stage 1: shard the optimizer state over the data-parallel ranks.

Plain data parallelism keeps a full copy of Adam's two moments on every rank: 2x the model's
size again, per rank. ZeRO-1 (Rajbhandari et al. 2020) gives each of the n ranks 1/n of the
parameters to *update*: flatten all parameters into one vector, rank r owns the slice
[r P/n, (r+1) P/n). Each step: average the gradients (as in data parallelism; a real
implementation reduce-scatters, so each rank receives only its slice, for half the traffic of an
all-reduce), update the owned slice with Adam (moments of that slice only), and all-gather the
updated slices so that every rank has the whole model again for the next forward.
Run:  python examples/04_zero.py
"""

import torch
import torch.distributed as dist
from ranks import check, run

torch.manual_seed(0)
X, Y = torch.randn(8, 4), torch.randn(8, 1)
STEPS = 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2), torch.nn.Linear(2, 1))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def rank_main(rank: int, world_size: int) -> dict:
    model = make_model()
    params = list(model.parameters())
    total = sum(p.numel() for p in params)  # 117: not divisible by 2, so the flat vector is padded
    per = -(-total // world_size)
    mine = slice(rank * per, (rank + 1) * per)
    master = torch.nn.functional.pad(flat(params), (0, per * world_size - total))[mine].clone().requires_grad_()
    opt = torch.optim.Adam([master], lr=0.01)  # Adam's moments: this rank's slice only
    rows = slice(rank * len(X) // world_size, (rank + 1) * len(X) // world_size)
    for _ in range(STEPS):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(X[rows]), Y[rows]).backward()
        g = torch.nn.functional.pad(flat(p.grad for p in params), (0, per * world_size - total))
        dist.all_reduce(g)  # gloo has no reduce-scatter on CPU: all-reduce, then keep my slice
        master.grad = g[mine] / world_size
        opt.step()  # update my slice
        slices = [torch.empty(per) for _ in range(world_size)]
        dist.all_gather(slices, master.detach())  # everyone's updated slices
        full = torch.cat(slices)[:total]
        torch.nn.utils.vector_to_parameters(full, params)
    state = opt.state[master]
    return {"params": flat(params), "state_numel": state["exp_avg"].numel() + state["exp_avg_sq"].numel()}


if __name__ == "__main__":
    reference = make_model()
    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(reference(X), Y).backward()
        opt.step()
    full_state = 2 * sum(p.numel() for p in reference.parameters())
    out = run(rank_main, world_size=2)
    print(f"ZeRO-1, 2 ranks, {STEPS} Adam steps:")
    for rank, got in enumerate(out):
        check(f"rank {rank}'s parameters", got["params"], flat(reference.parameters()))
        print(f"  rank {rank} keeps {got['state_numel']} Adam moment values instead of {full_state}")
