"""A Hugging Face model trained with paratrain: GPT-2 in data and in tensor parallelism.

`transformers`' GPT2LMHeadModel, built from a small config with random weights (nothing is
downloaded; `pip install 'paratrain[hf]'`), is trained for 3 AdamW steps three ways:

* in one process, with the model's own forward: the reference;
* on 2 processes with data parallelism (dp = 2): each rank keeps the whole model and takes half
  of the batch; paratrain averages the gradients over the ranks;
* on 2 processes with tensor parallelism (tp = 2): each rank keeps half of every weight matrix.
  paratrain's ready plan for GPT-2 (paratrain/models/hf.py) says how: the attention's fused
  c_attn and the MLP's c_fc are split by output columns (each rank keeps the q, k and v of its
  own heads), the two c_proj by input rows (their partial outputs summed by an all-reduce), the
  embedding by vocabulary rows.

The parallel runs compute the same sums in another order, so their losses and final weights
equal the single-process ones up to float rounding. Run:  python examples/05_hugging_face.py
"""

import torch
from ranks import check, run

import paratrain as pt
from paratrain.models import hf

CONFIG = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 64, "n_positions": 16}
STEPS = 3
torch.manual_seed(0)
BATCH = torch.randint(0, 64, (4, 17))  # the global batch: 4 sequences of 16 tokens (+1 for the targets)
X, Y = BATCH[:, :-1], BATCH[:, 1:]  # inputs and next-token targets


def make_model() -> torch.nn.Module:
    return hf.build_hf("gpt2", CONFIG, seed=1)  # the same random weights in every process


def single_process() -> tuple[torch.Tensor, dict]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = hf.reference_loss(model, X, Y)  # the HF model's own forward, then the mean cross-entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses), model.state_dict()


def parallel(layout: pt.Layout) -> tuple[torch.Tensor, dict | None]:
    model = make_model()
    cfg = model.config
    mesh = pt.build_mesh(layout)  # this rank's coordinates and its dp / tp process groups
    pm = pt.parallelize(model, mesh, layout, tp_plan=hf.tp_plan("gpt2", cfg), stages=hf.stages("gpt2", cfg))
    opt = pm.shard_optimizer(torch.optim.AdamW(pm.parameters(), lr=1e-2))
    rows = X.chunk(layout.dp)[mesh.coords.dp], Y.chunk(layout.dp)[mesh.coords.dp]  # this rank's share
    losses = [pt.train_step(pm, opt, *rows, grad_clip=1.0)["loss"] for _ in range(STEPS)]
    return torch.tensor(losses), pm.full_state_dict()  # the full weights, gathered on rank 0


def rank_main(rank: int, world_size: int) -> dict:
    out = {}
    for name, layout in (("dp=2", pt.Layout(dp=2)), ("tp=2", pt.Layout(tp=2))):
        losses, state = parallel(layout)
        # numpy arrays travel back by value (torch tensors would be shared memory this process frees at exit)
        out[name] = losses.numpy(), state and {k: v.numpy() for k, v in state.items()}
    return out


if __name__ == "__main__":
    ref_losses, ref_state = single_process()
    results = run(rank_main, world_size=2)[0]  # rank 0's answers
    print(f"Hugging Face GPT-2 ({sum(v.numel() for v in make_model().parameters()):,} parameters), "
          f"{STEPS} AdamW steps, 2 ranks:")
    for name, (losses, state) in results.items():
        check(f"{name} losses", torch.from_numpy(losses), ref_losses)
        weights = torch.cat([torch.from_numpy(state[k]).flatten() for k in ref_state])  # every tensor, HF's names
        # AdamW moves a weight by about lr per step whatever its gradient, so it amplifies rounding
        # where a gradient is itself ~0 (the key bias): 1e-3 of the largest weight (the LayerNorm
        # gains, 1.0) is a tenth of one step (lr 1e-2); a wrong split moves weights by whole steps
        check(f"{name} weights", weights, torch.cat([v.flatten() for v in ref_state.values()]), tol=1e-3)
