"""Group ``hf``: a Hugging Face GPT-2 under our dp and tp vs PyTorch DDP and DTensor tensor parallelism.

The model is ``transformers``' ``GPT2LMHeadModel`` built from a config with random weights
(nothing is downloaded), in the shape of ``--model`` (layers, width, heads, vocabulary,
positions): the same seed gives every side the same weights. Rows, each measured in the same
processes with alternating A/B repeats, the same pre-built batches, AdamW and clipping at 1.0,
the same threads per rank (medians; ``ours_s`` / ``ref_s`` are seconds per step, ``ratio`` =
ref_s / ours_s = ours tok/s / ref tok/s, higher is better):

* ``hf-gpt2-dp{n}``: ours = ``parallelize`` with ``Layout(dp=n)`` and the model's stage spec
  (``models/hf.py``), vs ``DistributedDataParallel`` around the same model (its own forward);
* ``hf-gpt2-tp{n}`` (and ``-sp``, ours with sequence parallelism): ours = the ready tp plan of
  ``models/hf.py`` vs ``parallelize_module`` with ``ColwiseParallel`` on ``c_attn`` / ``c_fc`` and
  the LM head (vocab-sharded logits, ``loss_parallel``) and ``RowwiseParallel`` on the two
  ``c_proj`` and the token embedding. DTensor's styles take ``nn.Linear`` only, and GPT-2's
  linears are ``Conv1D`` (``y = x W + b``, weight (in, out)): on the reference side each is
  replaced by the ``nn.Linear`` with weight ``W^T`` (the same function, the same values); the
  fused ``c_attn``'s output features are permuted so that a contiguous shard holds each rank's
  own q, k and v heads (what our ``chunks=3`` split keeps), and each attention's ``split_size`` is
  divided by n as our plan's ``adjust`` does. Positions, LayerNorms and row-wise biases stay
  plain tensors. Both sides' first-step losses are reported: they must agree.
"""

from __future__ import annotations

import json
from typing import Any

from paratrain.bench import BenchOptions, Row, alternate, median, rank_worker

CLIP = 1.0


def hf_config_json(opts: BenchOptions) -> str:
    """The GPT-2 config fields in the shape of ``opts.model``."""
    from paratrain.models.configs import get_model_config

    m = get_model_config(opts.model)
    return json.dumps({"n_layer": m.num_layers, "n_embd": m.hidden, "n_head": m.num_heads,
                       "vocab_size": m.vocab_size, "n_positions": m.max_seq_len, "n_inner": m.ffn_hidden})


def run(opts: BenchOptions) -> list[Row]:
    from paratrain.launch import launch

    rows = []
    tokens = opts.global_batch * opts.seq_len
    for n in opts.nprocs:
        result = launch(rank_worker, (_measure, opts), n)[0]
        pairs = [(f"hf-gpt2-dp{n}", "ours_dp", "ddp", "DDP"), (f"hf-gpt2-tp{n}", "ours_tp", "dtensor", "DTensor"),
                 (f"hf-gpt2-tp{n}-sp", "ours_tp_sp", "dtensor", "DTensor")]
        for name, ours, ref, ref_name in pairs:
            ours_s, ref_s = median(result[ours]) / opts.steps, median(result[ref]) / opts.steps
            loss_o, loss_r = result["loss"][ours], result["loss"][ref]
            rows.append(Row(name, tokens / ours_s, tokens / ref_s, {
                "nproc": n, "model": f"hf-gpt2 ({opts.model} shape)", "ours_s": ours_s, "ref_s": ref_s,
                "reference": ref_name, "threads_per_rank": result["threads"],
                "first_loss_ours": loss_o, "first_loss_ref": loss_r,
                "note": (f"vs {ref_name}{'; ours with sequence parallelism' if name.endswith('-sp') else ''}; "
                         f"{ours_s * 1e3:.1f} vs {ref_s * 1e3:.1f} ms/step; first loss {loss_o:.5f} vs "
                         f"{loss_r:.5f}, {result['threads']} thr/rank"),
            }))
    return rows


def _batches(opts: BenchOptions, cfg: Any, rows: slice) -> list[tuple[Any, Any]]:
    import torch

    from paratrain.data import get_batch, load_corpus

    corpus = load_corpus()
    out = []
    for step in range(1, opts.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step, rows)
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


def _ours(cfg: Any, rank: int) -> Any:
    """Our layout of the HF model (what ``paratrain train --hf gpt2`` runs): one_step(x, y) -> loss."""
    from paratrain.mesh import Mesh, MeshShape
    from paratrain.models import hf
    from paratrain.optim import make_optimizer
    from paratrain.parallel import parallelize

    hf_cfg = hf.hf_config("gpt2", cfg.hf_config)
    lay = cfg.layout
    mesh = Mesh.build(MeshShape(lay.dp, lay.pp, lay.tp), rank)
    pm = parallelize(hf.build_hf("gpt2", cfg.hf_config, cfg.seed), mesh, lay, seq_len=cfg.seq_len,
                     tp_plan=hf.tp_plan("gpt2", hf_cfg), stages=hf.stages("gpt2", hf_cfg))
    opt = pm.shard_optimizer(make_optimizer(pm.named_parameters(), cfg))

    def step(x: Any, y: Any) -> float:
        loss = pm.forward_backward(x, y)
        pm.clip_grad_norm_(CLIP)
        opt.step()
        pm.zero_grad()
        return float(loss)

    return step


def _ddp(cfg: Any) -> Any:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.models import hf
    from paratrain.optim import make_optimizer

    model = hf.build_hf("gpt2", cfg.hf_config, cfg.seed)
    ddp = DistributedDataParallel(model)
    opt = make_optimizer(model.named_parameters(), cfg)

    def step(x: Any, y: Any) -> float:
        loss = model.criterion(ddp(input_ids=x, use_cache=False).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _as_linear(conv: Any, rows: Any = None) -> Any:
    """The ``nn.Linear`` computing what a ``Conv1D`` does (``x W + b``): weight ``W^T``;
    ``rows`` reorders its output features."""
    import torch

    w, b = conv.weight.detach().t(), conv.bias.detach()
    if rows is not None:
        w, b = w[rows], b[rows]
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _qkv_rows(hidden: int, n: int) -> Any:
    """Output features of ``[q; k; v]`` reordered to ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``:
    contiguous shard r of n holds rank r's heads of all three."""
    import torch

    w = hidden // n
    return torch.cat([torch.arange(part * hidden + r * w, part * hidden + (r + 1) * w)
                      for r in range(n) for part in range(3)])


def _dtensor(cfg: Any, n: int) -> Any:
    """PyTorch's tensor parallelism on the same HF model: one_step(x, y) -> loss."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    from paratrain.models import hf
    from paratrain.optim import make_optimizer

    model = hf.build_hf("gpt2", cfg.hf_config, cfg.seed)
    hidden = model.config.n_embd
    plan: dict[str, Any] = {"transformer.wte": RowwiseParallel(input_layouts=Replicate()),
                            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i, block in enumerate(model.transformer.h):
        block.attn.c_attn = _as_linear(block.attn.c_attn, _qkv_rows(hidden, n))
        block.attn.c_proj = _as_linear(block.attn.c_proj)
        block.mlp.c_fc = _as_linear(block.mlp.c_fc)
        block.mlp.c_proj = _as_linear(block.mlp.c_proj)
        block.attn.split_size //= n  # the local q, k, v widths (our plan's `adjust` does the same)
        p = f"transformer.h.{i}"
        plan.update({f"{p}.attn.c_attn": ColwiseParallel(), f"{p}.attn.c_proj": RowwiseParallel(),
                     f"{p}.mlp.c_fc": ColwiseParallel(), f"{p}.mlp.c_proj": RowwiseParallel()})
    tied = model.lm_head.weight is model.transformer.wte.weight
    parallelize_module(model, init_device_mesh("cpu", (n,)), plan)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    opt = make_optimizer(model.named_parameters(), cfg)
    params = list(model.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]

    def step(x: Any, y: Any) -> float:
        with loss_parallel():
            loss = model.criterion(model(input_ids=x, use_cache=False).logits, y)
            loss.backward()
        norm_sh = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
        norm = torch.sqrt(norm_sh**2 + torch.nn.utils.get_total_norm([p.grad for p in plain]) ** 2)
        coef = min(1.0, CLIP / (float(norm) + 1e-6))
        for group in (sharded, plain):  # foreach ops cannot mix DTensors and tensors
            torch._foreach_mul_([p.grad for p in group], coef)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach().full_tensor())

    return step


def _measure(opts: BenchOptions, rank: int, n: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from paratrain.config import Layout, TrainConfig
    from paratrain.data import dp_rows

    base = TrainConfig(hf="gpt2", hf_config=hf_config_json(opts), global_batch=opts.global_batch,
                       seq_len=opts.seq_len, seed=opts.seed, grad_clip=CLIP)
    dp_cfg = base.replace(layout=Layout(dp=n))
    tp_cfg, sp_cfg = base.replace(layout=Layout(tp=n)), base.replace(layout=Layout(tp=n, sequence_parallel=True))
    dp_batches = _batches(opts, base, dp_rows(opts.global_batch, n, rank))
    full = _batches(opts, base, slice(None))
    sides = {"ours_dp": (_ours(dp_cfg, rank), dp_batches), "ddp": (_ddp(dp_cfg), dp_batches),
             "ours_tp": (_ours(tp_cfg, rank), full), "ours_tp_sp": (_ours(sp_cfg, rank), full),
             "dtensor": (_dtensor(tp_cfg, n), full)}
    first = {}
    for name, (step, batches) in sides.items():
        loss = torch.tensor([step(*batches[0])])
        if name in ("ours_dp", "ddp"):  # this rank's rows only: the global batch's mean
            dist.all_reduce(loss)
            loss /= n
        first[name] = float(loss)

    def steps(step: Any, batches: list[Any]) -> Any:
        return lambda: [step(x, y) for x, y in batches]

    fns = {name: steps(*side) for name, side in sides.items()}
    for _ in range(max(1, opts.warmup // max(1, opts.steps))):
        for fn in fns.values():
            fn()
    times = alternate(fns, opts.repeats, dist.barrier)
    return {**times, "loss": first}
