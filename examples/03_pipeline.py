"""A two-stage pipeline with micro-batches (the GPipe schedule).

The model's layers are split in two: rank 0 runs the first half, rank 1 the second half and the
loss. The batch is cut into micro-batches; rank 0 sends each micro-batch's activations forward
(dist.send), rank 1 sends the gradient of the loss with respect to them back, and each rank runs
backward through its own layers. Gradients add up over the micro-batches, so after all of them
each rank holds exactly the gradient of its layers for the whole batch (the loss of a micro-batch
is scaled by 1/num_microbatches so that the sum is the batch mean). While rank 1 works on
micro-batch k, rank 0 can already compute micro-batch k+1: that overlap is the point of
micro-batches (the idle start and end are the "bubble"). Run:  python examples/03_pipeline.py
"""

import torch
import torch.distributed as dist
from ranks import check, run

torch.manual_seed(0)
X, Y = torch.randn(8, 4), torch.randn(8, 1)
MICROBATCHES = 4


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),  # stage 0
                               torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # stage 1


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rank_main(rank: int, world_size: int) -> torch.Tensor:
    model = make_model()
    stage = model[:2] if rank == 0 else model[2:]  # this rank's layers
    xs, ys = X.chunk(MICROBATCHES), Y.chunk(MICROBATCHES)
    saved = []  # what backward needs, per micro-batch
    for x, y in zip(xs, ys):  # all forwards ...
        if rank == 0:
            act = stage(x)
            dist.send(act.detach(), dst=1)
            saved.append(act)
        else:
            act = torch.empty(len(x), 16)
            dist.recv(act, src=0)
            act.requires_grad_()
            loss = torch.nn.functional.mse_loss(stage(act), y) / MICROBATCHES
            saved.append((act, loss))
    for k in range(MICROBATCHES):  # ... then all backwards
        if rank == 1:
            act, loss = saved[k]
            loss.backward()
            dist.send(act.grad, dst=0)  # d loss / d (stage 0's output)
        else:
            grad = torch.empty(len(xs[k]), 16)
            dist.recv(grad, src=1)
            saved[k].backward(grad)
    return grads(stage)


if __name__ == "__main__":
    reference = make_model()
    torch.nn.functional.mse_loss(reference(X), Y).backward()  # one process, the whole batch
    want = [grads(reference[:2]), grads(reference[2:])]
    got = run(rank_main, world_size=2)
    print(f"pipeline, 2 stages, {MICROBATCHES} micro-batches:")
    for rank in range(2):
        check(f"stage {rank}'s gradients", got[rank], want[rank])
