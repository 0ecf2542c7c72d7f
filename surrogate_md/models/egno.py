"""EGNO: equivariant graph neural operator (Xu et al., ICML 2024).

The state at t0 is repeated over the P requested times (a tensor axis over the one shared edge
list, never P graph copies), each copy tagged with a sinusoidal embedding of its continuous offset
t / time_scale. L blocks then mix information along time with an equivariant temporal Fourier
convolution (on the invariant features h and on the vectors (x - per-system centroid, v)) and
across nodes with an EGNN layer applied to all P times at once.

Time grids: the Fourier convolution uses a continuous basis of period one trained jump,
exp(2 pi i k t / time_scale) for the lowest ``modes`` k, evaluated at the requested offsets (see
:class:`~surrogate_md.models.layers.TemporalFourierConv`), with complex weights on the invariant
features and on the vectors. On a training grid finer than twice the highest kept mode (P >= 3
for the default 2 modes) this equals the reference's truncated rFFT; the same weights apply unchanged to a finer grid of the same jump (2P
points: zero-shot resolution change) or to arbitrary offsets, where the forward transform is the
mean over the given times. Offsets beyond one jump see a periodic basis; query them by rollout.
As in the reference, the first block's vector convolution sees the repeated state, constant in
time: only its zero mode acts there, and the imaginary part of its weights never reaches the
output (it keeps its initial value through training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surrogate_md.data import keys as K
from surrogate_md.models.base import ModelConfig, TrajectoryModel, n_graphs, scale
from surrogate_md.models.layers import (
    EGNNLayer,
    NodeEncoder,
    TemporalFourierConv,
    edge_type_features,
    output_times,
    read_state,
    system_centroid,
    time_embedding,
)


@dataclass(frozen=True)
class EGNOConfig(ModelConfig):
    hidden: int = 64  # invariant feature size
    n_layers: int = 4  # blocks of [temporal conv, EGNN layer]
    modes: int = 2  # lowest temporal frequencies kept by the Fourier convolution
    time_dim: int = 32  # sinusoidal embedding size of t / time_scale
    temporal_conv: bool = True  # False: EGNN layers only (the public MD17 configuration)
    length_scale_A: float = 2.0  # Å, divides relative vectors before the Gram invariants


class EGNOModel(TrajectoryModel):
    """State to trajectory: (x0, v0) -> positions at every ``TIMES`` offset, (P, N, C, 3) Å."""

    name = "egno"
    config_class = EGNOConfig

    def __init__(self, config: EGNOConfig) -> None:
        super().__init__(config)
        c, hid = config.n_channels, config.hidden
        self.encoder = NodeEncoder(config.n_node_types, c, hid)
        self.time_in = nn.Linear(hid + config.time_dim, hid)
        self.layers = nn.ModuleList(
            EGNNLayer(hid, c, edge_dim=2, update_features=i < config.n_layers - 1)
            for i in range(config.n_layers))
        if config.temporal_conv:
            self.conv_h = nn.ModuleList(
                TemporalFourierConv(hid, config.modes, vector=False)
                for _ in range(config.n_layers))
            self.conv_x = nn.ModuleList(
                TemporalFourierConv(2 * c, config.modes, vector=True)
                for _ in range(config.n_layers))
        self.act = nn.SiLU()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        c = cfg.n_channels
        pos, vel = read_state(batch, c)
        v0 = vel / scale(self, "velocity_scale", pos)
        tau = output_times(batch, scale(self, "time_scale", pos), pos)
        p = tau.shape[0]
        h0 = self.encoder(batch[K.NODE_TYPE], v0)
        emb = time_embedding(tau, cfg.time_dim)
        h = self.time_in(torch.cat([h0.unsqueeze(0).expand(p, -1, -1),
                                    emb.unsqueeze(1).expand(-1, h0.shape[0], -1).to(h0.dtype)],
                                   dim=-1))
        x = pos.unsqueeze(0).expand(p, -1, -1, -1)
        # velocities in Å (v / velocity_scale * displacement_scale) so x and v share a scale in
        # the vector convolution
        step = scale(self, "displacement_scale", pos)
        v = (v0 * step).unsqueeze(0).expand(p, -1, -1, -1)
        edge_feat = edge_type_features(batch, pos)
        graph, b = batch[K.GRAPH], n_graphs(batch)
        for i, layer in enumerate(self.layers):
            if cfg.temporal_conv:
                h = h + self.act(self.conv_h[i](h, tau))
                centre = system_centroid(x, graph, b)
                vec = torch.cat([x - centre, v], dim=2)  # (P, N, 2C, 3)
                vec = vec + self.conv_x[i](vec, tau)
                x, v = vec[:, :, :c] + centre, vec[:, :, c:]
            h, x = layer(h, x, batch[K.EDGE_INDEX], length_scale=cfg.length_scale_A,
                         step_scale=step, edge_feat=edge_feat, vel=v / step)
        return x
