"""Tensor parallelism: split one weight matrix over ranks, then an MLP (column, then row split).

For Y = X W with W of shape (in, out):

* column split: rank r holds W[:, cols_r] and computes Y[:, cols_r] = X W[:, cols_r]; gathering
  the column blocks (an all-gather) gives Y. The input X is needed whole on every rank.
* row split: rank r holds W[rows_r, :] and X[:, rows_r]; X[:, rows_r] W[rows_r, :] is a partial
  sum, and Y = sum over ranks (an all-reduce).

An MLP  Y = GELU(X A) B  chains the two (Megatron-LM): A split by columns gives each rank its own
columns of H = GELU(X A) (GELU acts elementwise, so no communication is needed), which is exactly
the row slice of B's input: one all-reduce per MLP, and no all-gather at all.
Run:  python examples/02_tensor_parallel.py
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import check, run

torch.manual_seed(0)
X = torch.randn(4, 8)  # (batch, in)
W = torch.randn(8, 6)  # (in, out)
A, B = torch.randn(8, 16), torch.randn(16, 8)  # the MLP: 8 -> 16 -> 8


def part(n: int, rank: int, world_size: int) -> slice:
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def rank_main(rank: int, world_size: int) -> dict:
    # column-parallel matmul: my columns of the output, then gather everyone's
    cols = part(W.shape[1], rank, world_size)
    mine = X @ W[:, cols]  # (4, 3)
    blocks = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(blocks, mine)
    y_col = torch.cat(blocks, dim=1)

    # row-parallel matmul: my slice of the inner dimension, a partial sum, then sum over ranks
    rows = part(W.shape[0], rank, world_size)
    y_row = X[:, rows] @ W[rows, :]
    dist.all_reduce(y_row)

    # the MLP: A by columns, B by rows; H's columns never leave this rank
    inner = part(A.shape[1], rank, world_size)
    h = F.gelu(X @ A[:, inner])  # (4, 16 / world_size)
    y_mlp = h @ B[inner, :]  # a partial sum of the output
    dist.all_reduce(y_mlp)  # the MLP's only communication
    return {"column": y_col, "row": y_row, "mlp": y_mlp}


if __name__ == "__main__":
    out = run(rank_main, world_size=2)
    print("tensor parallelism, 2 ranks:")
    for rank, got in enumerate(out):
        check(f"rank {rank}: X W, column split", got["column"], X @ W)
        check(f"rank {rank}: X W, row split", got["row"], X @ W)
        check(f"rank {rank}: GELU(X A) B, column then row", got["mlp"], F.gelu(X @ A) @ B)
