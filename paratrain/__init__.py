"""paratrain: data and model parallel training on torch.distributed, and a planner for layouts.

Public API (torch is imported only when a torch-backed name is first used, so planning code
and the CLI stay light)::

    from paratrain import Layout, build_mesh, parallelize, train_step, save_checkpoint, load_checkpoint

``parallelize(model, mesh, layout, tp_plan=..., stages=...)`` takes any ``nn.Module``: a tensor
parallel plan maps module-name patterns to styles and a :class:`Stages` names the model's blocks
(``paratrain.models.plans``); ``paratrain.models.hf`` holds ready ones for Hugging Face GPT-2
and Llama. See ``paratrain/api.py`` and the README's "Bring your own model".
"""

from __future__ import annotations

import importlib
from typing import Any

from paratrain.config import Layout, TrainConfig
from paratrain.errors import ConfigError
from paratrain.mesh import Mesh, MeshShape
from paratrain.models.configs import ModelConfig, get_model_config, param_count

__version__ = "0.1.0"

_LAZY = {
    "parallelize": "paratrain.parallel",
    "ParallelModel": "paratrain.parallel",
    "GPT": "paratrain.models.gpt",
    "build_reference": "paratrain.models.gpt",
    "setup": "paratrain.train",
    "train_worker": "paratrain.train",
    "reference_train": "paratrain.reference",
    "init": "paratrain.api",
    "finish": "paratrain.api",
    "build_mesh": "paratrain.api",
    "CrossEntropy": "paratrain.models.gpt",
    "train_step": "paratrain.api",
    "save_checkpoint": "paratrain.api",
    "load_checkpoint": "paratrain.api",
    "Stages": "paratrain.models.plans",
    "TPStyle": "paratrain.models.plans",
    "launch": "paratrain.launch",
}

__all__ = ["ConfigError", "Layout", "Mesh", "MeshShape", "ModelConfig", "TrainConfig",
           "get_model_config", "param_count", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paratrain' has no attribute {name!r}")
