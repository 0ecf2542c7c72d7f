"""Parameter-free floors that every results table shows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surrogate_md.data import keys as K
from surrogate_md.models.base import ModelConfig, TrajectoryModel


@dataclass(frozen=True)
class ConstantConfig(ModelConfig):
    pass


class ConstantModel(TrajectoryModel):
    """Predicts no motion: every output frame is the input frame."""

    name = "constant"
    config_class = ConstantConfig
    has_parameters = False

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pos = batch[K.POS]
        return pos.unsqueeze(0).expand(len(batch[K.TIMES]), *pos.shape).clone()


@dataclass(frozen=True)
class LinearConfig(ModelConfig):
    pass


class LinearModel(TrajectoryModel):
    """Ballistic extrapolation x(t) = x0 + v0 t."""

    name = "linear"
    config_class = LinearConfig
    has_parameters = False

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        t = batch[K.TIMES].to(batch[K.POS].dtype).view(-1, 1, 1, 1)
        return batch[K.POS].unsqueeze(0) + t * batch[K.VEL].unsqueeze(0)
