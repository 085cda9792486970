"""The ``Layout`` -- how the work is split over the mesh -- and the one rule for which layouts are
valid (``Layout.validate``, ``FIELD_RANGES``), plus the rules that go with it (precision, tp widths).

Pure Python, no torch import: the planner and the CLI validate layouts without starting anything.
Every check raises :class:`~paratrain.errors.ConfigError` with what is wrong and what is valid,
before any process or process group exists. ``paratrain.config`` re-exports every name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from paratrain.core.vocab import padded_vocab_size
from paratrain.errors import ConfigError
from paratrain.expert_rules import check_experts, expert_refusal
from paratrain.models.configs import ModelConfig

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
        self._shared_degrees()
        self._check_recompute()

    def _shared_degrees(self) -> None:
        """:meth:`check_degrees` without what reads the recomputation."""
        dp, pp, tp, cp, ep, m, v = self.dp, self.pp, self.tp, self.cp, self.ep, self.microbatches, self.virtual_stages
        if not (type(dp) is type(pp) is type(tp) is type(cp) is type(ep) is type(m) is type(v) is int  # the planner
                and min(dp, pp, tp, cp, ep, m, v) >= 1):  # checks ~10^4 layouts: the common case in one test
            for name in ("dp", "pp", "tp", "cp", "ep", "microbatches", "virtual_stages"):
                _positive_int(name, getattr(self, name))
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero must be one of 0, 1, 2, 3 (ZeRO stage), got {self.zero!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        self._pipeline_shared()

    def _check_recompute(self) -> None:
        """The checks of :meth:`check_degrees` that read the recomputation."""
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}.")
        if self.schedule in ("zb-h1", "zb-v") and self.pp > 1 and self.recompute == "full":
            raise ConfigError(
                f"the {self.schedule} schedule defers the weight gradients of each block's linears "
                f"from the forward it records, which full recomputation replays differently; use "
                f"--recompute selective or none with it, or --schedule 1f1b with --recompute full."
            )

    def check_pipeline(self) -> None:
        """Pipeline checks that need no model."""
        self._pipeline_shared()
        self._check_recompute()

    def _pipeline_shared(self) -> None:
        if self.schedule == "zb-v" and self.pp > 1 and self.virtual_stages != 2:
            raise ConfigError(
                f"the zb-v schedule runs exactly two chunks per pipeline rank (V placement); got "
                f"virtual_stages={self.virtual_stages} (--virtual-stages). Leave it out or give 2."
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
        """Raise ConfigError if this layout cannot train ``model`` on the given batch shape: the
        checks of every field but recomputation and sequence parallelism (:meth:`check_shared`),
        then those of these two (:meth:`check_variant`). The planner's search checks the first
        once for all the variants of a layout that differ only in those two (tested: it never
        reads them)."""
        self.check_shared(model, global_batch, seq_len)
        self.check_variant(seq_len)

    def check_variant(self, seq_len: int) -> None:
        """The checks of :meth:`validate` that read recomputation or sequence parallelism."""
        self._check_recompute()
        if self.sequence_parallel and (self.tp == 1 or seq_len % self.tp):
            raise ConfigError(
                f"sequence parallelism needs tp > 1 and seq_len divisible by tp "
                f"(got tp={self.tp}, seq_len={seq_len}): it splits each sequence over the tp ranks. "
                f"Use a tp > 1 that divides seq_len, or drop --sequence-parallel."
            )
        if self.sequence_parallel and self.cp > 1 and (seq_len // self.cp) % self.tp:
            raise ConfigError(
                f"sequence parallelism with context parallelism splits each rank's seq_len / cp = "
                f"{seq_len // self.cp} tokens over tp={self.tp}, which must divide it. Use a seq_len "
                f"divisible by cp x tp = {self.cp * self.tp}, or drop --sequence-parallel."
            )

    def check_shared(self, model: ModelConfig, global_batch: int, seq_len: int) -> None:
        """:meth:`validate` without :meth:`check_variant`: reads neither ``recompute`` nor
        ``sequence_parallel``."""
        self._shared_degrees()
        _positive_int("global_batch", global_batch)
        _positive_int("seq_len", seq_len)
        if seq_len > model.max_seq_len:
            raise ConfigError(
                f"seq_len {seq_len} exceeds model {model.name!r} (at most {model.max_seq_len} "
                f"positions); use --seq-len {model.max_seq_len} or less."
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
        2 cp - 1 - i, which balances the causal mask; under sequence parallelism each rank's
        seq_len / cp tokens are split again over tp: :meth:`check_variant`)."""
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
    search use. The planner prices every valid layout; with ``model``, the runtime does not
    implement what a mixture of experts does not compose with (``expert_rules.expert_refusal``);
    every other valid layout it runs (ZeRO-3 with a pipeline too: ``parallel/zero3_pipeline.py``)."""
    return model is None or expert_refusal(layout, model) is None


def valid_tp(model: ModelConfig) -> list[int]:
    """Tensor-parallel degrees that divide the attention heads, the hidden size and the MLP
    width of ``model``. The vocabulary does not constrain tp: a vocabulary tp does not divide is
    padded (:func:`padded_vocab_size`), so GPT-2's 50257 allows every tp that divides the rest."""
    dims = [size for _, size in _tp_split_dims(model)]
    return [t for t in range(1, model.num_heads + 1) if all(d % t == 0 for d in dims)]
