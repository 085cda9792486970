"""Data parallelism by hand: split the batch, all-reduce the gradients.

Every rank holds the whole model. Each step, rank r takes its slice of the global batch, computes
the loss and gradients on it, and the ranks *average* their gradients (an all-reduce sums them,
then we divide by the number of ranks). Since the loss is a mean over the batch,

    grad of mean(loss over B rows) = mean over ranks of (grad of mean(loss over the rank's B/n rows))

so every rank ends with the gradient of the whole batch, takes the same optimizer step, and the
replicas stay identical. Run:  python examples/01_data_parallel.py
"""

import torch
import torch.distributed as dist
from ranks import check, run

torch.manual_seed(0)
X, Y = torch.randn(8, 4), torch.randn(8, 1)  # the global batch: 8 rows


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)  # every rank (and the reference) starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if world_size > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)  # sum over ranks ...
                p.grad /= world_size  # ... then the mean
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def rank_main(rank: int, world_size: int) -> torch.Tensor:
    rows = slice(rank * len(X) // world_size, (rank + 1) * len(X) // world_size)  # this rank's rows
    return train(make_model(), X[rows], Y[rows], world_size)


if __name__ == "__main__":
    reference = train(make_model(), X, Y)  # one process, the whole batch
    params = run(rank_main, world_size=2)
    print("data parallelism, 2 ranks, 3 SGD steps:")
    for rank, p in enumerate(params):
        check(f"rank {rank}'s parameters", p, reference)
