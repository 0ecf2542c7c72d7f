"""Model registry: the one list of model names.

The CLI choices, the checkpoint loader and the parametrised tests all read :data:`MODELS`; a model
added here is trained, loaded and equivariance-tested without touching anything else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from surrogate_md.errors import ConfigError
from surrogate_md.models.base import ModelConfig, TrajectoryModel
from surrogate_md.models.baselines import ConstantModel, LinearModel

MODELS: dict[str, type[TrajectoryModel]] = {
    cls.name: cls
    for cls in (ConstantModel, LinearModel)
}


def config_from_dict(name: str, values: dict[str, Any] | None = None) -> ModelConfig:
    """The typed config of model ``name`` from plain values; unknown keys are an error."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name].config_class
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"model {name!r} has no option {unknown[0]!r}; its options are "
                          f"{sorted(known)}")
    for key, value in values.items():
        want = known[key].type if isinstance(known[key].type, type) else None
        want = want or type(known[key].default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif want in (int, float, bool, str) and not isinstance(values[key], want):
            raise ConfigError(f"model {name!r} option {key!r} must be {want.__name__}, got "
                              f"{value!r}")
    return cls(**values)


def build_model(name: str, config: ModelConfig | dict[str, Any] | None = None) -> TrajectoryModel:
    """Instantiate registered model ``name`` from its config (dataclass or dict)."""
    if not isinstance(config, ModelConfig):
        config = config_from_dict(name, config)
    return MODELS[name](config)


__all__ = ["MODELS", "ModelConfig", "TrajectoryModel", "build_model", "config_from_dict"]
