"""The single-process reference training run: plain model, whole global batch in one forward,
``torch.nn.utils.clip_grad_norm_``, AdamW. Every layout must reproduce its losses and parameters;
the tests compare against it, and it shares nothing with the parallel code but the model,
the optimizer settings and the batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from paratrain.config import TrainConfig
from paratrain.data import Corpus, get_batch, load_corpus
from paratrain.models.gpt import build_reference
from paratrain.optim import lr_at, make_optimizer, set_lr


@dataclass
class ReferenceRun:
    losses: list[float]
    grad_norms: list[float]
    state: dict[str, torch.Tensor]


def reference_train(cfg: TrainConfig, corpus: Corpus | None = None, device: str = "cpu") -> ReferenceRun:
    """Train ``cfg.model`` (or ``cfg.hf``) for ``cfg.steps`` steps in this process (fp32)."""
    corpus = corpus or load_corpus(cfg.data)
    if cfg.hf is None:
        model = build_reference(cfg.model_config(), cfg.seed, device)
        forward = model
    else:  # the Hugging Face model's own forward (models/hf.py)
        from paratrain.models.hf import build_hf, reference_loss

        model = build_hf(cfg.hf, cfg.hf_config, cfg.seed, device)
        forward = functools.partial(reference_loss, model)
    opt = make_optimizer(model.named_parameters(), cfg)
    losses, norms = [], []
    for step in range(1, cfg.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step)
        set_lr(opt, lr_at(step, cfg))
        loss = forward(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        loss.backward()
        if cfg.grad_clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return ReferenceRun(losses, norms, state)
