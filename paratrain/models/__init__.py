"""Reference models. ``configs`` is pure Python; ``gpt`` needs torch and is imported lazily."""

from paratrain.models.configs import (
    ModelConfig,
    get_model_config,
    model_names,
    param_count,
)

__all__ = ["ModelConfig", "get_model_config", "model_names", "param_count"]
