"""The one interface every trajectory model implements.

A model maps a batch (see :mod:`surrogate_md.data.keys`: a flat node list over one shared edge
list) and the requested output times ``batch[TIMES]`` (P,) ps to positions at those times,
shape (P, N, C, 3) in Å. Systems of different sizes mix in one batch through ``batch[GRAPH]``.

Normalisation statistics (computed on the training split by the trainer) live in buffers, so they
travel in the state dict and checkpoints: ``velocity_scale`` (Å/ps), ``displacement_scale`` (Å),
``time_scale`` (ps, the trained jump). Models use them to make inputs O(1); outputs stay in Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from surrogate_md.data import keys as K


@dataclass(frozen=True)
class ModelConfig:
    """Fields shared by every model config. Subclasses add their own (all with defaults)."""

    n_channels: int = 1  # vectors per node: 1 for atoms, 4 for residues (N, CA, C, O)
    n_node_types: int = 128  # embedding size for NODE_TYPE (atomic numbers, 100 + residue code)


class TrajectoryModel(nn.Module):
    """Base class: subclasses set ``name``, ``config_class`` and implement ``forward``.

    Class attributes:
        name: registry name.
        config_class: the frozen dataclass holding this model's hyper-parameters.
        needs_history: True if the model reads ``batch[HIST]`` (history protocol).
        has_parameters: False for analytic baselines (nothing to train).
        trained_grid_only: True if the output at an offset depends on its place in ``TIMES``
            (PAINET: one recurrent step per entry), so only the trained grid, or its first
            entries, can be asked for.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    needs_history: ClassVar[bool] = False
    has_parameters: ClassVar[bool] = True
    trained_grid_only: ClassVar[bool] = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("velocity_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("displacement_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("time_scale", torch.tensor(1.0, dtype=torch.float64))

    def set_normalisation(self, *, velocity_scale: float, displacement_scale: float,
                          time_scale: float) -> None:
        """Store training-split statistics: RMS velocity component (Å/ps), RMS target
        displacement (Å) and the trained jump (ps)."""
        for name, value in (("velocity_scale", velocity_scale),
                            ("displacement_scale", displacement_scale),
                            ("time_scale", time_scale)):
            if not value > 0:
                raise ValueError(f"normalisation {name} must be > 0, got {value}")
            getattr(self, name).fill_(float(value))

    def normalisation(self) -> dict[str, float]:
        return {"velocity_scale": float(self.velocity_scale),
                "displacement_scale": float(self.displacement_scale),
                "time_scale": float(self.time_scale)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Positions at ``batch[TIMES]``: (P, N, C, 3) Å."""
        raise NotImplementedError


def scale(model: TrajectoryModel, name: str, like: torch.Tensor) -> torch.Tensor:
    """A normalisation buffer cast to the dtype/device of ``like`` (buffers are float64)."""
    return getattr(model, name).to(dtype=like.dtype, device=like.device)


def n_graphs(batch: dict[str, torch.Tensor]) -> int:
    return int(batch[K.N_GRAPHS])
