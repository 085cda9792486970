"""DeepSpeed's ZeRO as the reference of ``paratrain bench --only zero`` (benchmark only).

DeepSpeed is never a dependency of paratrain: ``pip install 'paratrain[bench]'`` adds the
version these rows were measured with. Where it is not installed, the rows that need it are
left out and the benchmark says why (:func:`missing`).

The engine is configured to do what ours does, on the same model, batches and optimizer:
* ZeRO stage k (``zero_optimization.stage``), gradient clipping at the same norm, one
  micro-batch per step (``train_micro_batch_size_per_gpu`` = global batch / dp);
* the torch AdamW ``paratrain.optim.make_optimizer`` builds (DeepSpeed wraps it: the fp32
  partitions it steps replace the parameters in its groups), not DeepSpeed's fused Adam;
* bf16: ``"bf16": {"enabled": true}``: bf16 weights, gradients reduced in bf16 (its default
  ``grad_accum_dtype`` is the model's, as ours), fp32 master partitions in the optimizer;
* offload: ``offload_optimizer: {"device": "cpu"}`` (with the torch AdamW, which it allows
  with ``zero_force_ds_cpu_optimizer: false``);
* its buckets (``reduce_bucket_size``, ``allgather_bucket_size``, ZeRO-3's prefetch bucket) at
  our ``--bucket-mb`` (``cfg.bucket_mb``). Its defaults (5e8 elements) would hold buffers of gigabytes for a model
  of a few million parameters, which is not what a user sizing memory would run.

On a CPU it picks its CPU accelerator (``DS_ACCELERATOR=cpu`` is set so it does not probe for
others) and JIT-builds a small shared-memory comm op the first time (about 30-60 s, cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VERSION = "0.19.8"  # the version the README's rows were measured with (pyproject: the bench extra)


def missing() -> str | None:
    """Why the DeepSpeed rows cannot run here, or None if they can. Checked in the process that
    starts the ranks, before anything starts."""
    if importlib.util.find_spec("deepspeed") is None:
        return (f"deepspeed is not installed (a benchmark-only extra, never needed to train: "
                f"pip install 'paratrain[bench]' for deepspeed=={VERSION})")
    return None


STALE_LOCK_S = 300.0  # the op's build takes 30-60 s here; a lock this old outlived its builder


def clear_stale_build_locks(max_age_s: float = STALE_LOCK_S) -> tuple[list[str], list[str]]:
    """Remove the build locks of DeepSpeed's JIT-built ops that no build holds any more.

    torch's extension builder takes a lock file in the op's build folder (under
    ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and removes it when the
    build ends; a build killed midway (Ctrl-C during the first run) leaves it, and every later
    build waits for it forever. Called in the process that starts the ranks, before they start:
    a lock older than ``max_age_s`` then belongs to no build of this run. Returns (the locks it
    removed, the younger ones it left: a build running elsewhere, or one stopped moments ago)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed, left = [], []
    for lock in [*root.glob("deepspeed*/lock"), *root.glob("*/deepspeed*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
            else:
                left.append(str(lock))
        except FileNotFoundError:
            pass  # its build just ended
    return removed, left


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DeepSpeed's start-up talk (its accelerator, the op build, config dumps) goes to stderr:
    ``--json`` keeps stdout for the rows."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def import_deepspeed() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with _quiet():
        import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # its collectives call torch's deprecated names (reduce_scatter_tensor, ...) at every step
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    return deepspeed


def config(zero: int, micro_batch: int, clip: float, bucket_mb: float, bf16: bool, offload: bool) -> dict[str, Any]:
    """The DeepSpeed config of one row (see the module's docstring for why each entry)."""
    bucket = int(bucket_mb * 2**20) // 4  # elements, as our buckets hold fp32 gradients
    zero_cfg: dict[str, Any] = {"stage": zero, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if zero == 3:
        zero_cfg["stage3_prefetch_bucket_size"] = bucket
    if offload:
        zero_cfg["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "zero_optimization": zero_cfg,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a torch AdamW
        "zero_force_ds_cpu_optimizer": False,   # ... also when offloaded
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def engine(cfg: Any, world: int, zero: int, offload: bool) -> tuple[Any, Any]:
    """A DeepSpeed engine around the reference model of ``cfg`` (same seed as ours) and the
    same AdamW, and that AdamW (it steps DeepSpeed's fp32 partitions); ``cfg.precision`` "bf16"
    or "fp32"."""
    import torch

    from paratrain.models.gpt import build_reference
    from paratrain.optim import make_optimizer

    deepspeed = import_deepspeed()
    threads = torch.get_num_threads()
    model = build_reference(cfg.model_config(), cfg.seed)
    opt = make_optimizer(model.named_parameters(), cfg)
    conf = config(zero, cfg.global_batch // world, cfg.grad_clip, cfg.bucket_mb, cfg.precision == "bf16", offload)
    with _quiet():
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
    torch.set_num_threads(threads)  # the same threads per rank as ours, whatever it set
    return eng, opt


def step(eng: Any, x: Any, y: Any) -> Any:
    """One optimizer step (its ``step`` clips, steps and zeroes the gradients)."""
    loss = eng(x, y)
    eng.backward(loss)
    eng.step()
    return loss.detach()
