"""EGNN trajectory model: E(n)-equivariant message passing with the velocity term.

Satorras et al.'s EGNN maps one state (x0, v0) to one later state (S2S is P = 1). For P > 1
output times the natural extension used here conditions the invariant features on a sinusoidal
embedding of each offset t / time_scale: the state is repeated along a time axis (a tensor
dimension over the one shared edge list), h(t) = h0 + W emb(t), and the same layers run on all
P copies at once, so each output frame is its own S2S prediction for its own offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surrogate_md.data import keys as K
from surrogate_md.models.base import ModelConfig, TrajectoryModel, scale
from surrogate_md.models.layers import (
    EGNNLayer,
    NodeEncoder,
    edge_type_features,
    output_times,
    read_state,
    time_embedding,
)


@dataclass(frozen=True)
class EGNNConfig(ModelConfig):
    hidden: int = 64  # invariant feature size
    n_layers: int = 4  # message-passing layers
    time_dim: int = 32  # sinusoidal embedding size of t / time_scale
    length_scale_A: float = 2.0  # Å, divides relative vectors before the Gram invariants


class EGNNModel(TrajectoryModel):
    """EGNN with velocity term, one prediction per requested time.

    Input: ``POS``, ``VEL`` (N, C, 3), ``NODE_TYPE``, ``EDGE_INDEX``, ``EDGE_TYPE``, ``TIMES`` (P,).
    Output: (P, N, C, 3) Å.
    """

    name = "egnn"
    config_class = EGNNConfig

    def __init__(self, config: EGNNConfig) -> None:
        super().__init__(config)
        c = config.n_channels
        self.encoder = NodeEncoder(config.n_node_types, c, config.hidden)
        self.time_proj = nn.Linear(config.time_dim, config.hidden)
        self.layers = nn.ModuleList(
            EGNNLayer(config.hidden, c, edge_dim=2, update_features=i < config.n_layers - 1)
            for i in range(config.n_layers))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        pos, vel = read_state(batch, cfg.n_channels)
        vs = scale(self, "velocity_scale", pos)
        v = (vel / vs).unsqueeze(0)
        tau = output_times(batch, scale(self, "time_scale", pos), pos)
        h0 = self.encoder(batch[K.NODE_TYPE], v[0])
        h = h0.unsqueeze(0) + self.time_proj(time_embedding(tau, cfg.time_dim)).unsqueeze(1)
        x = pos.unsqueeze(0).expand(tau.shape[0], -1, -1, -1)
        edge_feat = edge_type_features(batch, pos)
        step = scale(self, "displacement_scale", pos)
        for layer in self.layers:
            h, x = layer(h, x, batch[K.EDGE_INDEX], length_scale=cfg.length_scale_A,
                         step_scale=step, edge_feat=edge_feat, vel=v)
        return x
