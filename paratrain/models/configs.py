"""Named model shapes and their exact parameter counts. Pure Python: no torch import.

The planner (``paratrain.plan``) reads these shapes without importing torch, and
``paratrain.models.gpt.GPT`` builds exactly the model they describe, so
``param_count(cfg) == sum(p.numel() for p in GPT(cfg).parameters())`` (tested).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from paratrain.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GPT-style decoder (GPT-2 layout: pre-LN blocks, GELU MLP, learned positions).

    ``ffn_hidden`` defaults to ``4 * hidden``. ``planning_only`` marks sizes that exist for the
    planner (far too large to build here); they can still be built on a machine that fits them.
    ``family = "llama"``: the Llama layout instead (RMSNorm without bias, rotary positions, no
    biases, SwiGLU MLP of three ``H x F`` matrices, grouped-query attention with ``num_kv_heads``
    key/value heads; 0 means ``num_heads``).

    Mixture of experts (``num_experts`` > 0, ``models/moe.py``; docs/expert.md): the MLP of every
    ``moe_every``-th block (blocks ``moe_every - 1``, ``2 moe_every - 1``, ...) becomes
    ``num_experts`` MLPs of width ``ffn_hidden`` and a learned router sending each token to its
    ``top_k`` (1 or 2) best experts; ``capacity_factor`` > 0 caps each expert at
    ``ceil(capacity_factor * T * top_k / E)`` tokens of each sequence (the rest are dropped), 0 is
    dropless; ``aux_loss_coef`` weighs the load-balancing loss added to the training loss.

    ``train_seq_len``: the sequence length the planner assumes when none is given, where a published
    model was trained shorter than its ``max_seq_len`` positions (0: ``max_seq_len``).
    """

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    vocab_size: int
    max_seq_len: int
    ffn_hidden: int = 0
    dropout: float = 0.0
    tie_embeddings: bool = True
    planning_only: bool = False
    family: str = "gpt"
    num_kv_heads: int = 0
    num_experts: int = 0
    top_k: int = 1
    moe_every: int = 1
    capacity_factor: float = 0.0
    aux_loss_coef: float = 0.01
    train_seq_len: int = 0

    @property
    def planning_seq_len(self) -> int:
        """The sequence length the planner assumes without --seq-len: the length the published model
        was trained at (``train_seq_len``) where it is shorter than the positions it supports."""
        return self.train_seq_len or self.max_seq_len

    def __post_init__(self) -> None:
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        for field in ("num_layers", "hidden", "num_heads", "vocab_size", "max_seq_len", "ffn_hidden"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}.")
        if (not isinstance(self.train_seq_len, int) or isinstance(self.train_seq_len, bool)
                or not 0 <= self.train_seq_len <= self.max_seq_len):
            raise ConfigError(f"model {self.name!r}: train_seq_len must be 0 (max_seq_len) or a length up to "
                              f"max_seq_len {self.max_seq_len}, got {self.train_seq_len!r}.")
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.family not in ("gpt", "llama") or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model {self.name!r}: family must be gpt or llama and num_kv_heads divide "
                              f"num_heads; got {self.family!r}, {self.num_kv_heads} of {self.num_heads} heads.")
        if self.hidden % self.num_heads:
            raise ConfigError(
                f"model {self.name!r}: hidden size {self.hidden} is not divisible by "
                f"{self.num_heads} heads; the head dimension must be a whole number."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model {self.name!r}: dropout must be in [0, 1), got {self.dropout}.")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.capacity_factor is None:  # None and 0 both mean dropless
            object.__setattr__(self, "capacity_factor", 0.0)
        ints = [(f, getattr(self, f)) for f in ("num_experts", "top_k", "moe_every")]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "num_experts" else 1)
               for f, v in ints):
            raise ConfigError(f"model {self.name!r}: num_experts must be an integer >= 0 and top_k, moe_every "
                              f"positive integers; got {dict(ints)}.")
        if self.num_experts and not 1 <= self.top_k <= min(2, self.num_experts):
            raise ConfigError(f"model {self.name!r}: top_k (experts per token) must be 1 or 2 and at most "
                              f"num_experts={self.num_experts}; got {self.top_k}.")
        for f in ("capacity_factor", "aux_loss_coef"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ConfigError(f"model {self.name!r}: {f} must be a finite number >= 0 (capacity_factor "
                                  f"0: dropless routing), got {v!r}.")

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) holds a mixture of experts instead of one MLP."""
        return self.num_experts > 0 and (index + 1) % self.moe_every == 0

    @property
    def num_moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.num_layers))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def block_param_count(cfg: ModelConfig) -> int:
    """Parameters of one transformer block.

    ln1 (2H) + qkv (H*3H + 3H) + proj (H*H + H) + ln2 (2H) + fc1 (H*F + F) + fc2 (F*H + H)
    = 4H^2 + 2HF + 9H + F   (with F = 4H this is 12H^2 + 13H, Narayanan et al. 2021, eq. 2).
    """
    h, f = cfg.hidden, cfg.ffn_hidden
    if cfg.family == "llama":  # 2 RMSNorms (H) + q, o (H^2 each) + k, v (H x kv heads) + gate, up, down
        return 2 * h + 2 * h * h + 2 * h * cfg.num_kv_heads * cfg.head_dim + 3 * h * f
    return 4 * h * h + 2 * h * f + 9 * h + f


def mlp_param_count(cfg: ModelConfig) -> int:
    """One MLP (one expert): GPT fc1 + fc2 with biases (2HF + F + H); Llama gate, up, down (3HF)."""
    h, f = cfg.hidden, cfg.ffn_hidden
    return 3 * h * f if cfg.family == "llama" else 2 * h * f + f + h


def moe_block_extra(cfg: ModelConfig, experts: int) -> int:
    """What a mixture-of-experts block holds beyond a dense one when ``experts`` of its MLPs are
    counted (all E: the total; top_k: the parameters one token uses): ``experts - 1`` more MLPs
    and the router (H x E, no bias)."""
    return (experts - 1) * mlp_param_count(cfg) + cfg.hidden * cfg.num_experts


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of ``GPT(cfg)``; a tied LM head is counted once.

    P = V*H (token embedding) + S*H (positions) + L * block + 2H (final LayerNorm)
        [+ V*H for an untied LM head; the head has no bias].
    """
    positions = cfg.max_seq_len * cfg.hidden if cfg.family == "gpt" else 0  # Llama: rotary, no weights
    emb = cfg.vocab_size * cfg.hidden + positions
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden
    final_norm = 2 * cfg.hidden if cfg.family == "gpt" else cfg.hidden
    moe = cfg.num_moe_blocks * moe_block_extra(cfg, cfg.num_experts) if cfg.num_experts else 0
    return emb + cfg.num_layers * block_param_count(cfg) + final_norm + head + moe


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters one token's forward uses: :func:`param_count` with only ``top_k`` experts per
    mixture-of-experts block (the router counted); ``param_count`` for a dense model."""
    if not cfg.num_experts:
        return param_count(cfg)
    return param_count(cfg) - cfg.num_moe_blocks * (cfg.num_experts - cfg.top_k) * mlp_param_count(cfg)


# The defaults of transformers' GPT2Config and LlamaConfig, by paratrain field: what a
# --hf-config that leaves a field out gets (read without importing transformers).
HF_FIELDS: dict[str, dict[str, tuple[str, object]]] = {
    "gpt2": {"num_layers": ("n_layer", 12), "hidden": ("n_embd", 768), "num_heads": ("n_head", 12),
             "vocab_size": ("vocab_size", 50257), "max_seq_len": ("n_positions", 1024),
             "ffn_hidden": ("n_inner", None), "tie_embeddings": ("tie_word_embeddings", True)},
    "llama": {"num_layers": ("num_hidden_layers", 32), "hidden": ("hidden_size", 4096),
              "num_heads": ("num_attention_heads", 32), "num_kv_heads": ("num_key_value_heads", None),
              "vocab_size": ("vocab_size", 32000), "max_seq_len": ("max_position_embeddings", 2048),
              "ffn_hidden": ("intermediate_size", 11008), "tie_embeddings": ("tie_word_embeddings", False)},
}


# The dropout fields of each family's config (models/hf.py sets them to 0 unless given).
HF_DROPOUT_KEYS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "llama": ("attention_dropout",)}


def hf_dropout(kind: str, fields: dict[str, object]) -> float:
    """The largest dropout probability the config's fields give (0 when none is given)."""
    return max(float(fields.get(k, 0.0) or 0.0) for k in HF_DROPOUT_KEYS.get(kind, ()))  # type: ignore[arg-type]


def hf_shape(kind: str, fields: dict[str, object], dropout: float = 0.0) -> ModelConfig:
    """The shape of a Hugging Face GPT-2 or Llama config (its fields as a dict, defaults filled
    in as transformers does) in paratrain's terms."""
    if kind not in HF_FIELDS:
        raise ConfigError(f"--hf {kind!r} is not a known model family; valid: {', '.join(HF_FIELDS)}")
    shape = {ours: fields.get(theirs, default) for ours, (theirs, default) in HF_FIELDS[kind].items()}
    shape = {k: (0 if v is None else v) for k, v in shape.items()}
    if kind == "llama":
        shape["family"] = "llama"
    return ModelConfig(f"hf-{kind}", dropout=dropout, **shape)  # type: ignore[arg-type]


GPT2_VOCAB = 50257
_MODELS: dict[str, ModelConfig] = {}


def _register(cfg: ModelConfig) -> None:
    _MODELS[cfg.name] = cfg


# Byte-level models that train here in minutes (vocab 256 = one token per byte).
_register(ModelConfig("tiny", num_layers=4, hidden=128, num_heads=4, vocab_size=256, max_seq_len=256))
_register(ModelConfig("small", num_layers=6, hidden=256, num_heads=8, vocab_size=256, max_seq_len=256))
_register(ModelConfig("medium", num_layers=8, hidden=512, num_heads=8, vocab_size=256, max_seq_len=512))
# 8 thin blocks: room for up to 8 pipeline stages (pp x virtual stages) at tiny cost.
_register(ModelConfig("tiny-deep", num_layers=8, hidden=64, num_heads=4, vocab_size=256, max_seq_len=256))
# A prime vocabulary (as GPT-2's 50257 = 29 x 1733 is, for tp = 2, 4, 8): no tp > 1 divides it, so
# tensor parallelism pads it (config.padded_vocab_size). Trains on the byte corpus (ids < 256);
# the extra id 256 is a real row of the reference that the data never uses.
_register(ModelConfig("tiny-odd", num_layers=2, hidden=64, num_heads=4, vocab_size=257, max_seq_len=256))
# GPT-2 family (Radford et al. 2019); gpt2-124m has exactly 124,439,808 parameters.
_register(ModelConfig("gpt2-124m", num_layers=12, hidden=768, num_heads=12, vocab_size=GPT2_VOCAB, max_seq_len=1024))
_register(ModelConfig("gpt2-350m", num_layers=24, hidden=1024, num_heads=16, vocab_size=GPT2_VOCAB, max_seq_len=1024))
_register(ModelConfig("gpt2-774m", num_layers=36, hidden=1280, num_heads=20, vocab_size=GPT2_VOCAB, max_seq_len=1024))
# GPT-3 XL shape (Brown et al. 2020, Table 2.1) with the GPT-2 vocabulary.
_register(ModelConfig("gpt2-1.3b", num_layers=24, hidden=2048, num_heads=16, vocab_size=GPT2_VOCAB, max_seq_len=2048))
# Planning-only sizes: GPT-3 6.7B / 13B shapes and a 70B-class shape (GPT-2 block design).
_register(ModelConfig("gpt-7b", num_layers=32, hidden=4096, num_heads=32, vocab_size=GPT2_VOCAB,
          max_seq_len=2048, planning_only=True))
_register(ModelConfig("gpt-13b", num_layers=40, hidden=5120, num_heads=40, vocab_size=GPT2_VOCAB,
          max_seq_len=2048, planning_only=True))
_register(ModelConfig("gpt-70b", num_layers=80, hidden=8192, num_heads=64, vocab_size=GPT2_VOCAB,
          max_seq_len=4096, planning_only=True))
_register(ModelConfig("gpt-175b", num_layers=96, hidden=12288, num_heads=96, vocab_size=GPT2_VOCAB,
          max_seq_len=2048, planning_only=True))
# Llama 3 (Meta, 2024; the configs of meta-llama/Meta-Llama-3-8B and -70B): grouped-query attention
# with 8 kv heads, SwiGLU, RMSNorm, rotary positions, untied head, vocabulary 128,256. Exactly
# 8,030,261,248 and 70,553,706,496 parameters, the published counts (tested).
LLAMA3_VOCAB = 128256
_register(ModelConfig("llama-3-8b", num_layers=32, hidden=4096, num_heads=32, vocab_size=LLAMA3_VOCAB,
          max_seq_len=8192, ffn_hidden=14336, tie_embeddings=False, planning_only=True, family="llama",
          num_kv_heads=8))
_register(ModelConfig("llama-3-70b", num_layers=80, hidden=8192, num_heads=64, vocab_size=LLAMA3_VOCAB,
          max_seq_len=8192, ffn_hidden=28672, tie_embeddings=False, planning_only=True, family="llama",
          num_kv_heads=8))

# Mixtures of experts (models/moe.py). tiny-moe: 2 blocks of width 64, each MLP 4 experts of width
# 128 with top-2 routing and a capacity factor of 1.25 (tokens beyond it are dropped).
_register(ModelConfig("tiny-moe", num_layers=2, hidden=64, num_heads=4, vocab_size=256, max_seq_len=256,
          ffn_hidden=128, num_experts=4, top_k=2, capacity_factor=1.25))
# tiny-moe-deep: 4 such blocks, every second one a mixture (blocks 1 and 3): room for 4 pipeline
# stages (interleaved, zero-bubble V), some of them holding no router at all.
_register(ModelConfig("tiny-moe-deep", num_layers=4, hidden=64, num_heads=4, vocab_size=256, max_seq_len=256,
          ffn_hidden=128, num_experts=4, top_k=2, capacity_factor=1.25, moe_every=2))
# small-moe: the ep benchmark's model (paratrain bench --only ep): 4 blocks of width 256, each MLP 8
# experts of width 512, top-2, capacity factor 1.25; 9.6M parameters, 3.3M of them active per token.
_register(ModelConfig("small-moe", num_layers=4, hidden=256, num_heads=8, vocab_size=256, max_seq_len=256,
          ffn_hidden=512, num_experts=8, top_k=2, capacity_factor=1.25))
# Mixtral 8x7B (Jiang et al. 2024; transformers' MixtralConfig defaults): the Llama layout with 8
# SwiGLU experts of width 14336 in every block, top-2, router aux coefficient 0.001, 32k vocabulary,
# 4096 x 32 positions. 46,702,792,704 parameters, 12,879,925,248 active per token: the published
# 46.7B / 12.9B (tested). Planned at the 32k context it was trained with (the paper, section 2), not
# at the 131k positions the config allows: 4x the activations of any run its authors describe.
_register(ModelConfig("mixtral-8x7b", num_layers=32, hidden=4096, num_heads=32, vocab_size=32000,
          max_seq_len=4096 * 32, ffn_hidden=14336, tie_embeddings=False, planning_only=True, family="llama",
          num_kv_heads=8, num_experts=8, top_k=2, aux_loss_coef=0.001, train_seq_len=32768))


def model_names() -> list[str]:
    return list(_MODELS)


def get_model_config(name: str, **overrides: object) -> ModelConfig:
    """Look up a named shape; ``overrides`` replace fields (e.g. ``dropout=0.1``)."""
    try:
        cfg = _MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}. Valid names are: {', '.join(_MODELS)}."
        ) from None
    return cfg.replace(**overrides) if overrides else cfg
