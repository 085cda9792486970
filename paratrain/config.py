"""Typed, frozen configuration: the ``Layout`` (how the work is split) and the ``TrainConfig``.

Pure Python, no torch import: the planner and the CLI validate layouts without starting anything.
Every check raises :class:`~paratrain.errors.ConfigError` with what is wrong and what is valid,
before any process or process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from paratrain.core.vocab import padded_vocab_size
from paratrain.errors import ConfigError
from paratrain.expert_rules import check_experts, expert_refusal
from paratrain.models.configs import HF_DROPOUT_KEYS, HF_FIELDS, ModelConfig, get_model_config, hf_dropout, hf_shape

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("fp32", "bf16", "bf16-autocast")
GRAD_DTYPES = ("bf16", "fp32")  # --grad-dtype under --precision bf16 (docs/precision.md)
DP_IMPLS = ("bucketed", "naive")
DEVICES = ("auto", "cpu", "cuda")


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric field: ``kind`` (int or float; floats must be finite) between
    ``low`` and ``high`` (``None``: unbounded), each end included unless ``*_open``."""

    kind: type
    low: float
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    def describe(self) -> str:
        if self.kind is int:
            if self.high is None:
                return "a positive integer" if self.low == 1 else f"an integer >= {self.low}"
            return f"an integer in [{self.low}, {self.high}]"
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is None:
            return f"{low} (a finite number)"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'} "
                f"(a finite number)")

    def holds(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


MAX_THREADS = 1024  # torch threads per rank; more is a typo, and a pool that size would exhaust the machine
MAX_TIMEOUT_S = 1e9  # ~31 years; torch counts timeouts in int64 nanoseconds, which overflow near 9.2e9 s

# One rule per numeric TrainConfig field: TrainConfig.validate checks them by field name, the CLI
# the same rules by the flag or config key the user wrote (paratrain/cli/common.py).
FIELD_RANGES: dict[str, Range] = {
    "nproc": Range(int, 0),  # 0: dp * pp * cp * tp (the CLI asks >= 1 of a value the user gives)
    "steps": Range(int, 1),
    "seed": Range(int, 0, high=2**63 - 1),  # torch.manual_seed and numpy's generators take 64 bits
    "global_batch": Range(int, 1),
    "seq_len": Range(int, 1),
    "eval_batches": Range(int, 1),
    "eval_every": Range(int, 0),
    "warmup_steps": Range(int, 0),
    "sample_tokens": Range(int, 0),
    "threads": Range(int, 0, high=MAX_THREADS),
    "lr": Range(float, 0, low_open=True),
    "min_lr_ratio": Range(float, 0, high=1),
    "weight_decay": Range(float, 0),
    "grad_clip": Range(float, 0),
    "beta1": Range(float, 0, high=1, high_open=True),
    "beta2": Range(float, 0, high=1, high_open=True),
    "dropout": Range(float, 0, high=1, high_open=True),
    "bucket_mb": Range(float, 0, low_open=True),
    "timeout_s": Range(float, 0, low_open=True, high=MAX_TIMEOUT_S),
    "checkpoint_every": Range(int, 0),  # 0: only the final checkpoint
    "keep_checkpoints": Range(int, 0),  # 0: keep every checkpoint
    "max_bad_steps": Range(int, 0),  # 0: stop at the first non-finite step
    "max_restarts": Range(int, 0, high=1000),
    "vocab_size": Range(int, 0, high=2**31 - 1),  # 0: the model's own (a prepared --data sets its tokenizer's)
}


def check_range(label: str, value: object, rule: Range) -> None:
    """ConfigError naming ``label`` (a field, a flag or a config key) unless ``value`` obeys ``rule``."""
    if not rule.holds(value):
        raise ConfigError(f"{label} must be {rule.describe()}, got {value!r}.")


@dataclass(frozen=True)
class Layout:
    """How one training step is split over ``dp * pp * cp * tp`` processes.

    ``dp``: data-parallel replicas (each takes ``global_batch / dp`` sequences);
    ``pp``: pipeline stages; ``tp``: tensor-parallel shards of every layer;
    ``cp``: context-parallel ranks, each holding ``seq_len / cp`` tokens of every sequence
    (ring attention, ``parallel/context.py``);
    ``zero``: ZeRO stage (0 = plain data parallelism); ``microbatches``: slices of the local
    batch (pipeline micro-batches, or gradient-accumulation steps when ``pp == 1``).
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    zero: int = 0
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    stage_layers: tuple[int, ...] | None = None
    stage_speeds: tuple[float, ...] | None = None
    cp: int = 1
    ep: int = 1  # expert parallelism: sub-divides dp (paratrain/expert_rules.py, docs/expert.md)

    def __post_init__(self) -> None:
        # lists from config files become tuples: a Layout is frozen and hashable
        for name in ("stage_layers", "stage_speeds"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.schedule == "zb-v" and self.pp > 1 and self.virtual_stages == 1:  # two chunks per rank
            object.__setattr__(self, "virtual_stages", 2)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    def __str__(self) -> str:
        parts = [f"dp={self.dp}", f"pp={self.pp}", f"tp={self.tp}"] + ([f"cp={self.cp}"] if self.cp > 1 else [])
        parts += [f"ep={self.ep}"] if self.ep > 1 else []
        if self.zero:
            parts.append(f"zero={self.zero}")
        if self.microbatches > 1:
            parts.append(f"mb={self.microbatches}")
        if self.pp > 1:
            parts.append(self.schedule + (f"(v={self.virtual_stages})" if self.virtual_stages > 1 else ""))
        if self.stage_layers:
            parts.append("stages=" + ",".join(map(str, self.stage_layers)))
        if self.stage_speeds:
            parts.append("speeds=" + ",".join(f"{x:g}" for x in self.stage_speeds))
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        return " ".join(parts)

    def check_degrees(self) -> None:
        """Checks that need no model: types and ranges of every field."""
        dp, pp, tp, cp, ep, m, v = self.dp, self.pp, self.tp, self.cp, self.ep, self.microbatches, self.virtual_stages
        if not (type(dp) is type(pp) is type(tp) is type(cp) is type(ep) is type(m) is type(v) is int  # the planner
                and min(dp, pp, tp, cp, ep, m, v) >= 1):  # checks ~10^4 layouts: the common case in one test
            for name in ("dp", "pp", "tp", "cp", "ep", "microbatches", "virtual_stages"):
                _positive_int(name, getattr(self, name))
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero must be one of 0, 1, 2, 3 (ZeRO stage), got {self.zero!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}.")
        self.check_pipeline()

    def check_pipeline(self) -> None:
        """Pipeline checks that need no model (``paratrain schedule`` runs only these)."""
        if self.schedule == "zb-v" and self.pp > 1 and self.virtual_stages != 2:
            raise ConfigError(
                f"the zb-v schedule runs exactly two chunks per pipeline rank (V placement); got "
                f"virtual_stages={self.virtual_stages} (--virtual-stages). Leave it out or give 2."
            )
        if self.schedule in ("zb-h1", "zb-v") and self.pp > 1 and self.recompute == "full":
            raise ConfigError(
                f"the {self.schedule} schedule defers the weight gradients of each block's linears "
                f"from the forward it records, which full recomputation replays differently; use "
                f"--recompute selective or none with it, or --schedule 1f1b with --recompute full."
            )
        if self.virtual_stages > 1 and self.schedule not in ("interleaved", "zb-v"):
            raise ConfigError(
                f"virtual_stages={self.virtual_stages} (--virtual-stages) needs schedule 'interleaved' "
                f"(got {self.schedule!r}); use virtual_stages=1 with gpipe, 1f1b or zb-h1."
            )
        if self.schedule == "interleaved" and self.pp > 1 and self.microbatches % self.pp:
            valid = ", ".join(str(self.pp * k) for k in range(1, 5))
            raise ConfigError(
                f"the interleaved schedule sends micro-batches through each chunk in groups of pp, "
                f"so microbatches must be a multiple of pp={self.pp} (got {self.microbatches}); "
                f"valid: {valid}, ... Or use --schedule 1f1b."
            )
        for name, flag in (("stage_layers", "--stage-layers"), ("stage_speeds", "--stage-speeds")):
            if getattr(self, name) is not None and self.pp == 1:
                raise ConfigError(f"{flag} describes pipeline stages; it needs --pp 2 or more.")
        if self.stage_layers is not None and self.stage_speeds is not None:
            raise ConfigError(
                "give either --stage-layers (a partition chosen by hand) or --stage-speeds (device "
                "speeds for the automatic partition), not both."
            )
        if self.stage_speeds is not None:
            speeds = self.stage_speeds
            if len(speeds) != self.pp or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")
                    for x in speeds):
                raise ConfigError(
                    f"--stage-speeds needs one positive number per pipeline rank (pp={self.pp}), "
                    f"e.g. {','.join(['1'] * (self.pp - 1) + ['2'])}; got {speeds!r}."
                )

    def validate(self, model: ModelConfig, global_batch: int, seq_len: int) -> None:
        """Raise ConfigError if this layout cannot train ``model`` on the given batch shape."""
        self.check_degrees()
        _positive_int("global_batch", global_batch)
        _positive_int("seq_len", seq_len)
        if seq_len > model.max_seq_len:
            raise ConfigError(
                f"seq_len {seq_len} exceeds model {model.name!r}'s maximum of {model.max_seq_len} "
                f"positions; use --seq-len {model.max_seq_len} or less."
            )
        if global_batch % self.dp:
            raise ConfigError(
                f"global batch {global_batch} is not divisible by dp={self.dp}: every data-parallel "
                f"rank must get the same number of sequences. Use a multiple of {self.dp}."
            )
        local = global_batch // self.dp
        if local % self.microbatches:
            valid = [m for m in range(1, local + 1) if local % m == 0]
            raise ConfigError(
                f"the local batch of {local} sequences (global batch {global_batch} / dp {self.dp}) "
                f"cannot be split into {self.microbatches} equal micro-batches; valid micro-batch "
                f"counts are {valid} (--microbatches)."
            )
        if self.tp > 1:  # the vocabulary need not divide: it is padded (padded_vocab_size)
            for what, size in _tp_split_dims(model):
                if size % self.tp:
                    raise ConfigError(
                        f"tp={self.tp} does not divide the model's {what} ({size}); tensor "
                        f"parallelism splits it evenly. Valid tp values for {model.name!r}: "
                        f"{valid_tp(model)}."
                    )
        if self.sequence_parallel and (self.tp == 1 or seq_len % self.tp):
            raise ConfigError(
                f"sequence parallelism needs tp > 1 and seq_len divisible by tp "
                f"(got tp={self.tp}, seq_len={seq_len}): it splits each sequence over the tp ranks. "
                f"Use a tp > 1 that divides seq_len, or drop --sequence-parallel."
            )
        self._check_context(model, seq_len)
        check_experts(self, model)
        chunks = self.pp * self.virtual_stages
        if chunks > model.num_layers:
            what = (f"pp={self.pp}" if self.virtual_stages == 1
                    else f"pp={self.pp} x virtual_stages={self.virtual_stages} = {chunks}")
            raise ConfigError(
                f"{what} pipeline stages, but model {model.name!r} has only {model.num_layers} "
                f"layers; every stage needs at least one layer. Use pp x virtual_stages <= "
                f"{model.num_layers}, or a deeper model."
            )
        if self.stage_layers is not None:
            self._check_stage_layers(model, chunks)

    def _check_context(self, model: ModelConfig, seq_len: int) -> None:
        """Context parallelism cuts every sequence into 2 cp chunks (rank i holds chunks i and
        2 cp - 1 - i, which balances the causal mask); under sequence parallelism each rank's
        seq_len / cp tokens are split again over tp."""
        if self.cp == 1:
            return
        if seq_len % (2 * self.cp):
            valid = ", ".join(str(c) for c in range(2, 65) if seq_len % (2 * c) == 0) or "none"
            n = 2 * self.cp
            raise ConfigError(
                f"context parallelism (cp={self.cp}) cuts each sequence into 2 x cp = {n} equal chunks "
                f"(rank i holds chunks i and {n - 1}-i, balancing the causal mask), so seq_len must be "
                f"divisible by {n}; got seq_len={seq_len}. Use a multiple of {n} as --seq-len, or a cp "
                f"dividing seq_len / 2 (valid cp > 1 for seq_len {seq_len}: {valid})."
            )
        if self.sequence_parallel and (seq_len // self.cp) % self.tp:
            raise ConfigError(
                f"sequence parallelism with context parallelism splits each rank's seq_len / cp = "
                f"{seq_len // self.cp} tokens over tp={self.tp}, which must divide it. Use a seq_len "
                f"divisible by cp x tp = {self.cp * self.tp}, or drop --sequence-parallel."
            )
        if model.dropout > 0:
            raise ConfigError(
                f"context parallelism (cp={self.cp}) does not implement dropout yet (the ring attention "
                f"would need the same dropout mask in forward and backward, block by block); got "
                f"dropout={model.dropout}. Use --dropout 0 with --cp, or --cp 1."
            )

    def _check_stage_layers(self, model: ModelConfig, chunks: int) -> None:
        layers = self.stage_layers or ()
        if (len(layers) != chunks or sum(layers) != model.num_layers
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in layers)):
            n = model.num_layers
            example = [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]
            raise ConfigError(
                f"--stage-layers needs {chunks} counts of at least 1 (one per pipeline stage: pp x "
                f"virtual_stages) summing to the {n} layers of model {model.name!r} (the embedding "
                f"goes with the first stage, the head with the last); got "
                f"{','.join(map(str, layers))}. Example: {','.join(map(str, example))}."
            )


def vocab_padding_note(model: ModelConfig, tp: int) -> str | None:
    """One line saying how the vocabulary is padded at ``tp`` (None when it is not)."""
    padded = padded_vocab_size(model.vocab_size, tp)
    if padded == model.vocab_size:
        return None
    return (f"vocabulary {model.vocab_size} padded to {padded} for tp={tp} ({padded // tp} rows per rank; "
            f"the {padded - model.vocab_size} padding rows are zero and masked out of the loss)")


def _tp_split_dims(model: ModelConfig) -> tuple[tuple[str, int], ...]:
    """The dimensions tensor parallelism splits evenly, which tp must divide."""
    kv = (("key/value heads (grouped-query attention splits them over tp)", model.num_kv_heads),) \
        if model.num_kv_heads != model.num_heads else ()
    return (("attention heads", model.num_heads), *kv, ("hidden size", model.hidden),
            ("MLP width", model.ffn_hidden))


def check_precision(precision: str, grad_dtype: str | None, offload: bool, dp_impl: str = "bucketed") -> None:
    """``--grad-dtype`` and ``--offload-optimizer`` describe the fp32 master weights of ``--precision
    bf16`` (docs/precision.md); the one rule ``TrainConfig.validate`` and the planner's CLI apply."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if grad_dtype is not None and grad_dtype not in GRAD_DTYPES:
        raise ConfigError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {grad_dtype!r}.")
    why = "fp32 weights are their own masters" if precision == "fp32" else "autocast over fp32 weights has no masters"
    for flag, given in (("--grad-dtype", grad_dtype is not None), ("--offload-optimizer", offload)):
        if given and precision != "bf16":
            raise ConfigError(
                f"{flag} sets how mixed precision keeps its gradients or its fp32 master weights; it needs "
                f"--precision bf16 (bf16 weights, fp32 masters), got --precision {precision} ({why}). "
                f"Use --precision bf16 {flag}{' fp32' if flag == '--grad-dtype' else ''}, or drop {flag}."
            )
    if grad_dtype == "fp32" and dp_impl == "naive":
        raise ConfigError(
            "--grad-dtype fp32 accumulates gradients in fp32 buffers, which the bucketed data "
            "parallelism holds; --dp-impl naive (the teaching version) reduces autograd's bf16 "
            "gradients as they are. Use --dp-impl bucketed (the default) or drop --grad-dtype."
        )


def runtime_implements(layout: Layout, model: ModelConfig | None = None) -> bool:
    """Whether ``paratrain train`` runs ``layout``, valid by :meth:`Layout.validate`: the one
    function ``TrainConfig.validate`` (which explains a refusal) and ``train --plan auto``'s
    search use. The planner prices every valid layout; ZeRO-3 with a pipeline and ZeRO with
    context parallelism are the ones the runtime does not implement; with ``model``, also what a
    mixture of experts does not compose with (``expert_rules.expert_refusal``)."""
    return (not (layout.zero == 3 and layout.pp > 1) and not (layout.zero and layout.cp > 1)
            and (model is None or expert_refusal(layout, model) is None))


def valid_tp(model: ModelConfig) -> list[int]:
    """Tensor-parallel degrees that divide the attention heads, the hidden size and the MLP
    width of ``model``. The vocabulary does not constrain tp: a vocabulary tp does not divide is
    padded (:func:`padded_vocab_size`), so GPT-2's 50257 allows every tp that divides the rest."""
    dims = [size for _, size in _tp_split_dims(model)]
    return [t for t in range(1, model.num_heads + 1) if all(d % t == 0 for d in dims)]


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
        if layout.zero and layout.cp > 1:
            raise ConfigError(
                f"ZeRO (zero={layout.zero}) with context parallelism (cp={layout.cp}) is not implemented "
                f"yet: ZeRO shards over the dp group, while cp ranks average their gradients over dp x cp. "
                f"Use --zero 0 with --cp {layout.cp} (plain data parallelism over the dp x cp ranks), "
                f"or --cp 1 with --zero."
            )
        if self.hf is not None and layout.cp > 1:
            raise ConfigError(
                f"context parallelism (cp={layout.cp}) replaces the built-in GPT's attention with ring "
                f"attention; a Hugging Face model (--hf {self.hf}) keeps its own attention. Use --cp 1 with "
                f"--hf, or the built-in --model with --cp."
            )
        if self.hf is not None:
            self._check_hf()
        if not runtime_implements(layout):  # zero 3 with a pipeline: the one layout left
            raise ConfigError(
                f"ZeRO-3 with pipeline parallelism (pp={layout.pp}) is not implemented: ZeRO-3 "
                f"gathers each block's parameters around its forward and backward, and the rest "
                f"(embeddings, head) around the model's whole forward, which a pipeline stage never "
                f"runs as one call (its schedule runs chunks, micro-batch by micro-batch). Valid: "
                f"--zero 1 or --zero 2 with "
                f"--pp {layout.pp} (optimizer state and gradients sharded over each stage's dp "
                f"group), or --zero 3 with --pp 1."
            )
