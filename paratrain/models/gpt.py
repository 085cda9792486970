"""The reference GPT: a plain single-process decoder, the oracle every layout must reproduce.

No distributed code here. Parallel transforms *replace submodules* (``qkv``, ``proj``, ``fc1``,
``fc2``, ``wte``, ``lm_head``, ``criterion``) with sharded versions sliced from these weights, so
every forward below is written against local widths: attention derives its number of heads from
the width it receives (``width // head_dim``), which is what lets a column-parallel ``qkv`` feed
it only this rank's heads.

Shapes: B batch, T sequence, H hidden, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paratrain.models.configs import ModelConfig
from paratrain.models.moe import MoE, aux_loss, moe_layers


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)  # rows: [q; k; v], each H
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, H_local)
        # Shapes from qkv's output, not from x: under sequence parallelism x is a slice of the
        # sequence (B, T/n, H) and the column-parallel qkv returns the whole of it.
        B, T, width = q.shape
        heads = width // self.head_dim
        q, k, v = (t.view(B, T, heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v)  # (B, h, T, d)
        y = y.transpose(1, 2).reshape(B, T, heads * self.head_dim)
        return self.resid_drop(self.proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core softmax(q k^T / sqrt(d) + causal mask) v, with dropout on the
        probabilities. Its activations grow with T^2; selective recomputation replays just this."""
        p = self.attn_dropout if self.training else 0.0
        if p == 0.0 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) \
                and torch.is_grad_enabled() and q.requires_grad:
            return _CpuHalfAttention.apply(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


class _CpuHalfAttention(torch.autograd.Function):
    """Causal attention of 16-bit q, k, v on CPU: PyTorch's fused kernel forward in 16 bits (what
    ``scaled_dot_product_attention`` runs), its backward in fp32 from the same saved tensors (q,
    k, v, the output and its log-sum-exp: the activations are the kernel's own), gradients
    rounded back. PyTorch 2.13's bf16 CPU backward is the slow part of a bf16 layer: (8, 4, 128,
    32) took 11.3 ms against 2.7 ms upcast to fp32 (forward 0.7 ms), one thread, here."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn_hidden)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MoE(cfg, MLP) if moe else MLP(cfg)  # a mixture of experts: models/moe.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CrossEntropy(nn.Module):
    """Mean token cross-entropy; a module so tensor parallelism can swap in its vocab-parallel one."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)


class GPT(nn.Module):
    """GPT-2-style decoder. ``forward(idx, targets)`` returns the mean loss, or logits without
    targets. The pieces ``embed`` -> ``blocks`` -> ``head`` are public so a pipeline stage can run
    only its share."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_block(i)) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.criterion = CrossEntropy()
        self.moe = moe_layers(self)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) -> mean loss against ``targets`` (B, T), or logits (B, T, V) without them."""
        logits = self.lm_head(self.ln_f(x))
        return logits if targets is None else self.criterion(logits, targets)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss against ``targets`` -- plus, for a mixture of experts, the weighted
        load-balancing losses of its routers (``models/moe.py``) -- or logits without targets."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        out = self.head(x, targets)
        return out if targets is None or not self.moe else out + aux_loss(self, self.moe)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T0); returns (B, T0 + new)."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.max_seq_len:]
            logits = self(ctx)[:, -1, :] / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx


def init_weights(model: GPT, seed: int) -> None:
    """Deterministic GPT-2 initialisation from ``seed``, independent of device and layout.

    Weights ~ N(0, 0.02); the residual projections (``attn.proj``, every ``fc2``: the MLP's or
    each expert's) ~ N(0, 0.02/sqrt(2L))
    so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3);
    biases 0; LayerNorm weight 1. Parameters are drawn in ``named_parameters()`` order.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    resid_std = 0.02 / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            if isinstance(model.get_submodule(owner), nn.LayerNorm):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            else:
                std = resid_std if name.endswith(("attn.proj.weight", ".fc2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_reference(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> GPT:
    """The reference model: built and initialised on the CPU from ``seed``, then moved."""
    with torch.device("cpu"):
        model = GPT(cfg)
    init_weights(model, seed)
    return model.to(device)
