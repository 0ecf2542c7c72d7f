"""ESTAG: equivariant spatio-temporal attentive graph network (Wu et al., NeurIPS 2023).

History protocol: the model reads ``HIST`` (T, N, C, 3), the T past frames ending at t0.

- EDFT: per-node FFT over T of the centred trajectory (the channel mean of each node minus its
  system's centroid in each frame, a segment mean over ``GRAPH``), giving cross-correlation edge
  features A_ij(k) = w_k(h_i) w_k(h_j) |<f_i(k), f_j(k)>| and amplitudes c_i(k) = w_k(h_i)
  |f_i(k)|^2 with learnable per-frequency filters w_k (only the T//2+1 non-redundant frequencies
  of the real signal).
- ESM: an EGNN layer on every history frame at once (time is a tensor axis over the one edge
  list) using A_ij as edge features and c_i in the node update; for C > 1 channels the messages
  see the Gram matrix of the relative channel vectors and its Frobenius-normalised form.
- ETM: causal attention over each node's frames, h(t) += sum_{s<=t} a_ts v(s) and
  x(t) += sum_{s<=t} a_ts (x(t) - x(s)) phi_x(v(s)); the scores q.k are divided by sqrt(hidden)
  (the paper's Eq. 10 does not scale them: a rescaling of the query weights, so the same
  functions, only a gentler start of training).
- Multi-channel nodes (C > 1, e.g. the four backbone atoms of a residue): the EDFT reads the
  channel mean of each node where the paper's residue setting (its Appendix C.1) takes the CA
  atom alone.
- Equivariant temporal pooling: x*(t) = x_L(T-1) + sum_s w_s(t) (x_L(s) - x_L(T-1)).

Output times: ESTAG's task is one frame after t0 (P = 1). For P > 1 requested offsets the pooling
weights are conditioned on a sinusoidal embedding of t / time_scale, w(t) = b + W emb(t), so one
encoding of the history serves every requested time. All coordinate-update output layers and the
pooling weights start at zero: the untrained model returns the last history frame exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from surrogate_md.data import keys as K
from surrogate_md.models.base import ModelConfig, TrajectoryModel, n_graphs, scale
from surrogate_md.models.layers import (
    EGNNLayer,
    edge_type_features,
    output_times,
    segment_mean,
    time_embedding,
)


@dataclass(frozen=True)
class ESTAGConfig(ModelConfig):
    hidden: int = 64  # invariant feature size
    n_layers: int = 2  # [ESM, ETM] pairs (the paper counts each pair as two layers)
    time_dim: int = 32  # sinusoidal embedding size of frame and output offsets
    n_history: int = 10  # expected history frames T (sizes the EDFT filters)
    length_scale_A: float = 2.0  # Å, divides relative vectors and the EDFT signal


class ETMLayer(nn.Module):
    """Causal temporal attention per node with the equivariant displacement update."""

    def __init__(self, hidden: int, n_channels: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.coord = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(),
                                   nn.Linear(hidden, n_channels))
        nn.init.zeros_(self.coord[-1].weight)
        nn.init.zeros_(self.coord[-1].bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, N, H), x (T, N, C, 3) -> same shapes."""
        t = h.shape[0]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = torch.einsum("tnh,snh->nts", q, k) / math.sqrt(q.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        alpha = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # (N, T, S)
        h = h + torch.einsum("nts,snh->tnh", alpha, v)
        phi = self.coord(v)  # (S, N, C)
        # sum_s a_ts (x(t) - x(s)) phi(s) without building the (T, S, N, C, 3) differences; on
        # positions relative to the last frame (the same sum), so that low-precision autocast
        # never rounds absolute coordinates tens of Å from the origin
        rel = (x - x[-1:]).to(phi.dtype)
        weight = torch.einsum("nts,snc->tnc", alpha, phi)
        pulled = torch.einsum("nts,snc,sncx->tncx", alpha, phi, rel)
        return h, x + (weight.unsqueeze(-1) * rel - pulled).to(x.dtype)


class ESTAGModel(TrajectoryModel):
    """History to future: ``HIST`` (T, N, C, 3) -> positions at ``TIMES``, (P, N, C, 3) Å."""

    name = "estag"
    config_class = ESTAGConfig
    needs_history = True

    def __init__(self, config: ESTAGConfig) -> None:
        super().__init__(config)
        c, hid = config.n_channels, config.hidden
        n_freq = config.n_history // 2 + 1
        self.n_freq = n_freq
        self.embed = nn.Embedding(config.n_node_types, hid)
        self.frame_proj = nn.Linear(config.time_dim, hid)
        self.filters = nn.Linear(hid, n_freq)  # w_k(h_i)
        self.esm = nn.ModuleList(
            EGNNLayer(hid, c, edge_dim=n_freq + 2, node_dim=n_freq, use_velocity=False,
                      normalised_gram=True, zero_init_coords=True)
            for _ in range(config.n_layers))
        self.etm = nn.ModuleList(ETMLayer(hid, c) for _ in range(config.n_layers))
        self.pool_bias = nn.Parameter(torch.zeros(config.n_history - 1))
        self.pool_time = nn.Linear(config.time_dim, config.n_history - 1, bias=False)
        nn.init.zeros_(self.pool_time.weight)

    def _history(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        hist = batch.get(K.HIST)
        if hist is None:
            raise ValueError(f"model 'estag' needs batch[{K.HIST!r}] (T, N, C, 3) past frames; "
                             f"build the dataset windows with the history protocol")
        want = (cfg.n_history, batch[K.POS].shape[0], cfg.n_channels, 3)
        if tuple(hist.shape) != want:
            raise ValueError(f"batch[{K.HIST!r}] has shape {tuple(hist.shape)}, model 'estag' "
                             f"expects {want} (n_history={cfg.n_history}, "
                             f"n_channels={cfg.n_channels}); set them to the dataset's values")
        return hist

    def edft(self, hist: torch.Tensor, h0: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-correlation edge features A (E, K) and amplitudes c (N, K) of the history."""
        cfg = self.config
        graph, b = batch[K.GRAPH], n_graphs(batch)
        signal = hist.mean(dim=2)  # (T, N, 3)
        signal = signal - segment_mean(signal, graph, b, dim=1)[:, graph]
        work = torch.float64 if signal.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=signal.device.type, enabled=False):
            spec = torch.fft.rfft(signal.to(work) / cfg.length_scale_A, dim=0) / hist.shape[0]
        src, dst = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        cross = (spec[:, dst].conj() * spec[:, src]).sum(-1).abs().T  # (E, K)
        power = (spec.abs() ** 2).sum(-1).T  # (N, K)
        w = self.filters(h0)
        amp = w.to(power.dtype) * power
        corr = w[src].to(cross.dtype) * w[dst].to(cross.dtype) * cross
        return corr.to(h0.dtype), amp.to(h0.dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        hist = self._history(batch)
        pos = batch[K.POS]
        ts = scale(self, "time_scale", pos)
        t = hist.shape[0]
        if K.HIST_DT in batch:
            dt = batch[K.HIST_DT].to(dtype=pos.dtype, device=pos.device)
        else:  # frame spacing unknown: spread the window over one trained jump
            dt = ts / t
        frame_tau = (torch.arange(t, dtype=pos.dtype, device=pos.device) - (t - 1)) * dt / ts
        h0 = self.embed(batch[K.NODE_TYPE])
        corr, amp = self.edft(hist, h0, batch)
        edge_feat = torch.cat([corr, edge_type_features(batch, pos).to(corr.dtype)], dim=-1)
        h = h0.unsqueeze(0) + self.frame_proj(time_embedding(frame_tau, cfg.time_dim)
                                              ).unsqueeze(1)
        x = hist
        step = scale(self, "displacement_scale", pos)
        for esm, etm in zip(self.esm, self.etm):
            h, x = esm(h, x, batch[K.EDGE_INDEX], length_scale=cfg.length_scale_A,
                       step_scale=step, edge_feat=edge_feat, node_feat=amp)
            h, x = etm(h, x)
        tau = output_times(batch, ts, pos)
        w = self.pool_bias.to(pos.dtype) + self.pool_time(time_embedding(tau, cfg.time_dim))
        last = x[-1]
        return last.unsqueeze(0) + torch.einsum("ps,snax->pnax", w.to(x.dtype),
                                                x[:-1] - last.unsqueeze(0))
