"""The single-process reference training run: plain model, whole global batch in one forward,
``torch.nn.utils.clip_grad_norm_``, AdamW. Every layout must reproduce its losses and parameters;
the tests compare against it, and it shares nothing with the parallel code but the model,
the optimizer settings and the batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from paratrain.config import TrainConfig
from paratrain.data import Corpus, get_batch, load_corpus
from paratrain.models.gpt import build_reference
from paratrain.models.moe import moe_layers, router_stats
from paratrain.optim import lr_at, make_optimizer, set_lr


@dataclass
class ReferenceRun:
    losses: list[float]
    grad_norms: list[float]
    state: dict[str, torch.Tensor]
    router: list[dict] = field(default_factory=list)  # a mixture of experts: models/moe.router_stats per step


def reference_train(cfg: TrainConfig, corpus: Corpus | None = None, device: str = "cpu") -> ReferenceRun:
    """Train ``cfg.model`` (or ``cfg.hf``) for ``cfg.steps`` steps in this process: fp32, or with
    ``cfg.precision`` "bf16" a bf16 model whose fp32 master copies AdamW steps (the gradient
    upcast to fp32, then clipped: parallel/mixed.py's arithmetic), or "bf16-autocast"."""
    corpus = corpus or load_corpus(cfg.data)
    if cfg.hf is None:
        model = build_reference(cfg.model_config(), cfg.seed, device)
        forward = model
    else:  # the Hugging Face model's own forward (models/hf.py)
        from paratrain.models.hf import build_hf, reference_loss

        model = build_hf(cfg.hf, cfg.hf_config, cfg.seed, device)
        forward = functools.partial(reference_loss, model)
    mixed = cfg.precision == "bf16"
    if mixed:
        model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params] if mixed else params
    master_of = {id(p): m for p, m in zip(params, masters)}
    opt = make_optimizer(((n, master_of[id(p)]) for n, p in model.named_parameters() if id(p) in master_of), cfg)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16-autocast")
    losses, norms, router = [], [], []
    moe = moe_layers(model)
    for step in range(1, cfg.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step)
        set_lr(opt, lr_at(step, cfg))
        with autocast:
            loss = forward(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        loss.backward()
        if moe:
            router.append(router_stats(torch.stack([m.take_stats() for m in moe]).sum(0), moe[0].num_experts, len(moe)))
        if mixed:
            for p, m in zip(params, masters):
                m.grad = p.grad.float()
                p.grad = None
        if cfg.grad_clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(masters, cfg.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mixed:
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
        losses.append(loss.item())
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return ReferenceRun(losses, norms, state, router)
