"""Hugging Face ``transformers`` models with ready tensor-parallel plans and stage specs:
GPT-2 (``GPT2LMHeadModel``) and Llama (``LlamaForCausalLM``), built from a config with random
weights (nothing is downloaded). No distributed code: ``paratrain.parallel`` applies the plans.

GPT-2 stores its linears as ``Conv1D`` (weight (in, out)) and fuses the attention input into
one ``c_attn`` of output ``[q; k; v]`` (3H): its column split is ``chunks=3`` so each rank keeps
the q, k and v of the same heads. Llama: grouped-query attention (``q_proj`` has the query
heads, ``k_proj``/``v_proj`` the fewer key/value heads, each split over tp, which must divide
both), rotary position embeddings computed per attention call from the positions of the
sequence it sees, and the SwiGLU MLP ``down(silu(gate(x)) * up(x))``: gate and up column,
down row. The attention and the MLP are ``tp_input`` regions: their input enters the tp region
once (under sequence parallelism: one all-gather) for the several column linears inside.

The loss: each model gets a ``criterion`` child (the reference's mean token cross-entropy,
which the ``vocab_loss`` style swaps for the vocab-parallel one); targets are the next tokens,
already shifted (HF's ``labels`` shift internally; paratrain's batches come shifted).
Dropout is set to 0 unless the config gives it: equivalence with the single-process model
holds without dropout (the HF modules draw from the default generator).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from paratrain.errors import ConfigError
from paratrain.models.configs import HF_DROPOUT_KEYS, ModelConfig, hf_shape
from paratrain.models.gpt import CrossEntropy
from paratrain.models.plans import Stages, TPStyle

KINDS = ("gpt2", "llama")
_DROPOUT_KEYS = HF_DROPOUT_KEYS


def _config_class(kind: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("--hf needs the transformers package: pip install 'paratrain[hf]'") from None
    return {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[kind]


def parse_hf_config(kind: str, overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The config fields given (JSON text or a mapping), checked against the config class: an
    unknown key is a ConfigError naming the valid ones."""
    if kind not in KINDS:
        raise ConfigError(f"--hf {kind!r} is not a known model family; valid: {', '.join(KINDS)}")
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--hf-config is not valid JSON ({e.msg} at character {e.pos}): {overrides!r}") from None
    given = dict(overrides or {})
    if not isinstance(overrides, Mapping) and overrides is not None:
        raise ConfigError(f"--hf-config must be a JSON object of config fields, got {overrides!r}")
    known = set(_config_class(kind)().to_dict())
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"--hf-config: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a field "
                          f"of the {kind} config; valid fields: {', '.join(sorted(known))}")
    return given


def hf_config(kind: str, overrides: str | Mapping[str, Any] | None = None) -> Any:
    """The ``transformers`` config: its defaults, dropout 0, SDPA attention, then ``overrides``."""
    given = parse_hf_config(kind, overrides)
    fields: dict[str, Any] = {k: 0.0 for k in _DROPOUT_KEYS[kind]}
    if kind == "gpt2" and given.get("vocab_size", 50257) <= 50256:  # GPT-2's special ids would lie outside
        fields.update(bos_token_id=None, eos_token_id=None)
    fields.update(given)
    cfg = _config_class(kind)(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def model_config(kind: str, cfg: Any) -> ModelConfig:
    """The shape in paratrain's terms (what validation, the partition and the summary read)."""
    return hf_shape(kind, cfg.to_dict())


def _rotary_inside(attn: nn.Module, rotary: nn.Module) -> None:
    """Llama attention computes its rotary embedding from the sequence it is given (positions
    0..T-1): under sequence parallelism only the attention sees the whole sequence."""
    forward = attn.forward

    def run(hidden_states: torch.Tensor, position_embeddings: Any = None, **kwargs: Any) -> Any:
        pos = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        return forward(hidden_states, position_embeddings=rotary(hidden_states, pos), **kwargs)

    attn.forward = run


def build_hf(kind: str, overrides: str | Mapping[str, Any] | None = None, seed: int = 0,
             device: str | torch.device = "cpu") -> nn.Module:
    """``GPT2LMHeadModel`` or ``LlamaForCausalLM`` from the config, random weights from ``seed``
    (the same on every rank), with a ``criterion`` child."""
    import transformers

    cfg = hf_config(kind, overrides)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}[kind]
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = cls(cfg)
    model.criterion = CrossEntropy()
    if kind == "llama":
        for layer in model.model.layers:
            _rotary_inside(layer.self_attn, model.model.rotary_emb)
    return model.to(device)


def reference_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The single-process HF model's own forward, then the mean next-token cross-entropy."""
    return model.criterion(model(input_ids=idx).logits, targets)


def _gpt2_head_dim(cfg: Any) -> int:
    return cfg.n_embd // cfg.n_head


def _split_heads(attn: nn.Module, tp: int) -> None:
    """GPT2Attention splits c_attn's output in three of ``split_size``: now this rank's width."""
    attn.split_size = attn.split_size // tp


def tp_plan(kind: str, cfg: Any) -> dict[str, str | TPStyle]:
    """The tensor-parallel plan of the model family (module-name patterns -> styles)."""
    if kind == "gpt2":
        hd = _gpt2_head_dim(cfg)
        return {
            "transformer.wte": "vocab_embedding", "transformer.wpe": "sp_positions",
            "lm_head": "vocab_head", "criterion": "vocab_loss",
            "transformer.h.*.attn": TPStyle("adjust", fn=_split_heads),
            "transformer.h.*.attn.c_attn": TPStyle("column", chunks=3, unit=hd, what="attention heads"),
            "transformer.h.*.attn.c_proj": TPStyle("row", unit=hd, what="attention heads"),
            "transformer.h.*.mlp.c_fc": "column", "transformer.h.*.mlp.c_proj": "row",
            "transformer.h.*.ln_1": "sp_norm", "transformer.h.*.ln_2": "sp_norm", "transformer.ln_f": "sp_norm",
        }
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = TPStyle("column", unit=hd, what="key/value heads (grouped-query attention splits them over tp)")
    return {
        "model.embed_tokens": "vocab_embedding", "lm_head": "vocab_head", "criterion": "vocab_loss",
        "model.layers.*.self_attn": "tp_input",
        "model.layers.*.self_attn.q_proj": TPStyle("column", unit=hd, what="attention heads"),
        "model.layers.*.self_attn.k_proj": kv, "model.layers.*.self_attn.v_proj": kv,
        "model.layers.*.self_attn.o_proj": TPStyle("row", unit=hd, what="attention heads"),
        "model.layers.*.mlp": "tp_input",
        "model.layers.*.mlp.gate_proj": "column", "model.layers.*.mlp.up_proj": "column",
        "model.layers.*.mlp.down_proj": "row",
        "model.layers.*.input_layernorm": "sp_norm", "model.layers.*.post_attention_layernorm": "sp_norm",
        "model.norm": "sp_norm",
    }


def _head(norm: str) -> Any:
    def head(m: nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        logits = m.lm_head(m.get_submodule(norm)(x))
        return logits if targets is None else m.criterion(logits, targets)
    return head


def _gpt2_embed(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    t = m.transformer
    pos = torch.arange(idx.shape[1], device=idx.device)  # (T,): SequenceParallelPositions slices it
    return t.drop(t.wte(idx) + t.wpe(pos))


def stages(kind: str, cfg: Any) -> Stages:
    """The stage spec: the list of blocks and what runs before and after them."""
    shape = model_config(kind, cfg)
    if kind == "gpt2":
        return Stages(blocks="transformer.h", before=("transformer.wte", "transformer.wpe"),
                      after=("transformer.ln_f", "lm_head"), embed=_gpt2_embed, head=_head("transformer.ln_f"),
                      hidden=cfg.n_embd, config=shape)
    return Stages(blocks="model.layers", before=("model.embed_tokens",), after=("model.norm", "lm_head"),
                  embed=lambda m, idx: m.model.embed_tokens(idx), head=_head("model.norm"),
                  hidden=cfg.hidden_size, config=shape)
