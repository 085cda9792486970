"""Typed, frozen configuration: the ``TrainConfig`` of a run. The ``Layout`` (how the work is split)
and its validity rules live in :mod:`paratrain.layout`; every name of it is re-exported here.

Pure Python, no torch import: the planner and the CLI validate configs without starting anything.
Every check raises :class:`~paratrain.errors.ConfigError` with what is wrong and what is valid,
before any process or process group exists.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from paratrain.core.traffic import ZERO3_GATHERS
from paratrain.core.vocab import padded_vocab_size
from paratrain.errors import ConfigError
from paratrain.expert_rules import expert_refusal
from paratrain.layout import (
    DEVICES,
    DP_IMPLS,
    FIELD_RANGES,
    GRAD_DTYPES,
    MAX_THREADS,
    MAX_TIMEOUT_S,
    PRECISIONS,
    RECOMPUTE,
    SCHEDULES,
    Layout,
    Range,
    check_precision,
    check_range,
    runtime_implements,
    valid_tp,
    vocab_padding_note,
)
from paratrain.models.configs import HF_DROPOUT_KEYS, HF_FIELDS, ModelConfig, get_model_config, hf_dropout, hf_shape

__all__ = ["DEVICES", "DP_IMPLS", "FIELD_RANGES", "GRAD_DTYPES", "MAX_THREADS", "MAX_TIMEOUT_S", "PRECISIONS",
           "RECOMPUTE", "SCHEDULES", "Layout", "Range", "TrainConfig", "check_precision", "check_range",
           "padded_vocab_size", "runtime_implements", "valid_tp", "vocab_padding_note"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``paratrain train`` needs. One source of truth for defaults (the CLI reads them)."""

    model: str = "tiny"
    layout: Layout = field(default_factory=Layout)
    nproc: int = 0  # 0: dp * pp * cp * tp
    steps: int = 500
    seed: int = 0
    global_batch: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    dropout: float = 0.0
    untie_embeddings: bool = False
    precision: str = "fp32"
    bucket_mb: float = 25.0
    dp_impl: str = "bucketed"
    overlap: bool = True
    eval_every: int = 100
    eval_batches: int = 4
    data: str | None = None
    out: str | None = None
    device: str = "auto"
    threads: int = 0  # 0: cores / local processes
    timeout_s: float = 120.0
    sample_tokens: int = 200
    checkpoint: bool = True
    progress: bool = True
    measure_memory: bool = False  # exact model-state and saved-activation bytes of the last step
    checkpoint_every: int = 0  # 0: only the final checkpoint (when checkpoint is on)
    keep_checkpoints: int = 0  # 0: keep every checkpoint
    async_checkpoint: bool = True  # write in the background; training waits only for the host copy
    resume_from: str | None = None  # a verified checkpoint folder (set by `train --resume`)
    init_from: str | None = None  # reference-shaped safetensors file or Hugging Face GPT-2 folder
    max_bad_steps: int = 3  # non-finite steps skipped in a row before the run stops
    max_restarts: int = 0  # a dead rank restarts the job (torch elastic) from the latest checkpoint
    # mixed precision (docs/precision.md): --precision bf16 keeps bf16 weights and gradients and fp32
    # master weights in the optimizer; grad_dtype "fp32" accumulates and reduces the gradients in fp32
    # (None: the weights' dtype); offload_optimizer keeps the masters, AdamW's state and its step in
    # host memory (ZeRO-Offload)
    grad_dtype: str | None = None
    offload_optimizer: bool = False
    # A Hugging Face model instead of `model` (issue 11): its family (gpt2 | llama) and its config
    # fields as a JSON object (random weights from `seed`; nothing is downloaded)
    hf: str | None = None
    hf_config: str | None = None
    # real data (docs/data.md): the embedding's rows; 0 keeps the model's own, a prepared --data
    # folder sets its tokenizer's vocabulary, --tensorboard also writes TensorBoard events
    vocab_size: int = 0
    tensorboard: bool = False
    # mixture of experts (models/moe.py, docs/expert.md): None keeps the model's own top_k,
    # capacity_factor (0: dropless) and aux_loss_coef
    top_k: int | None = None
    capacity_factor: float | None = None
    aux_loss_coef: float | None = None
    # ZeRO-3 inside a pipeline (docs/zero.md): each unit gathered around every micro-batch's forward
    # and backward ("microbatch": ZeRO-3's memory, 3 m psi of dp traffic) or once per step ("step":
    # ZeRO-1's 2 psi; the stage's whole parameters and gradients held through the step)
    zero3_gather: str = "microbatch"

    @property
    def world_size(self) -> int:
        return self.nproc or self.layout.world_size

    def model_config(self) -> ModelConfig:
        if self.hf is not None:  # dropout: the HF config's own fields (0 unless given)
            try:
                fields = json.loads(self.hf_config or "{}")
            except json.JSONDecodeError as e:
                raise ConfigError(f"hf_config is not valid JSON ({e.msg}): {self.hf_config!r}") from None
            if not isinstance(fields, dict):
                raise ConfigError(f"hf_config must be a JSON object of config fields, got {self.hf_config!r}")
            return hf_shape(self.hf, fields, dropout=hf_dropout(self.hf, fields) if self.hf in HF_FIELDS else 0.0)
        overrides: dict[str, Any] = {"dropout": self.dropout}
        if self.untie_embeddings:
            overrides["tie_embeddings"] = False
        if self.vocab_size:
            overrides["vocab_size"] = self.vocab_size
        for name in ("top_k", "capacity_factor", "aux_loss_coef"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        return get_model_config(self.model, **overrides)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> ModelConfig:
        """Check every field; return the model shape. Raises ConfigError on the first problem."""
        model = self.model_config()
        layout = self.layout
        layout.check_degrees()
        if self.nproc and self.nproc != layout.world_size:
            raise ConfigError(
                f"--nproc {self.nproc} does not match the layout: dp*pp*cp*tp = {layout.dp}*{layout.pp}"
                f"*{layout.cp}*{layout.tp} = {layout.world_size}. Either drop --nproc or set the degrees so that "
                f"their product is {self.nproc} (for example --dp {self.nproc})."
            )
        for name, rule in FIELD_RANGES.items():
            check_range(name, getattr(self, name), rule)
        for name, value, valid in (
            ("precision", self.precision, PRECISIONS),
            ("dp_impl", self.dp_impl, DP_IMPLS),
            ("device", self.device, DEVICES),
            ("zero3_gather", self.zero3_gather, ZERO3_GATHERS),
        ):
            if value not in valid:
                raise ConfigError(f"{name} must be one of {', '.join(valid)}, got {value!r}.")
        layout.validate(model, self.global_batch, self.seq_len)
        check_precision(self.precision, self.grad_dtype, self.offload_optimizer, self.dp_impl)
        self._check_implemented()
        refusal = expert_refusal(layout, model, self.dp_impl)
        if refusal:
            raise ConfigError(refusal)
        return model

    def _check_hf(self) -> None:
        """What a Hugging Face model (``--hf``, models/hf.py) does not do: the built-in GPT's
        ``--dropout``, selective recomputation, and dropout in more than one process."""
        layout, keys = self.layout, ", ".join(HF_DROPOUT_KEYS.get(self.hf or "", ()))
        if self.dropout > 0:
            raise ConfigError(
                f"--dropout {self.dropout} sets the built-in GPT's dropout; a Hugging Face model's dropout is "
                f"its config's fields ({keys} in --hf-config). Leave --dropout out with --hf.")
        if layout.recompute == "selective":
            raise ConfigError(
                "--recompute selective replays the built-in GPT's attention core; a Hugging Face model "
                f"(--hf {self.hf}) keeps its own attention. Valid with --hf: --recompute full (every block "
                "replayed in backward) or none.")
        dropout = self.model_config().dropout
        if dropout > 0 and layout.world_size > 1:
            raise ConfigError(
                f"--hf-config gives dropout {dropout} ({keys}): a Hugging Face model draws its dropout masks "
                f"from torch's default generator, so a {layout.world_size}-process layout ({layout}) could not "
                f"reproduce the single-process model's masks. Valid: dropout 0 (leave {keys} out) in any "
                f"layout, or dropout in one process (--nproc 1).")

    def _check_implemented(self) -> None:
        """What the runtime does not implement (the planner may still rank it): the layouts
        :func:`runtime_implements` refuses, and ZeRO over the naive data parallelism."""
        layout = self.layout
        if layout.zero and self.dp_impl != "bucketed":
            raise ConfigError(
                f"ZeRO (zero={layout.zero}) shards the bucketed data parallelism; dp_impl "
                f"{self.dp_impl!r} is the teaching version without buckets. Use --dp-impl bucketed "
                f"(the default) with --zero, or --zero 0 with --dp-impl naive."
            )
        if self.hf is not None and layout.cp > 1:
            raise ConfigError(
                f"context parallelism (cp={layout.cp}) replaces the built-in GPT's attention with ring "
                f"attention; a Hugging Face model (--hf {self.hf}) keeps its own attention. Use --cp 1 with "
                f"--hf, or the built-in --model with --cp."
            )
        if self.hf is not None:
            self._check_hf()
