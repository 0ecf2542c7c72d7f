"""PAINET: physics-inspired all-pair interaction network (energy-descent attention).

Encoder: one attention step per output time, each a descent step on the embedding energy,

    h_i <- (1 - eta) h_i + eta * sum_j w_ij v_j / sum_j w_ij,
    w_ij = Phi[a_i, a_j] + Psi[a_i, a_j] * q~_i . k~_j,

with L2-normalised queries/keys q~, k~ (per head), all pairs j of node i's system, and
type-pair matrices Phi = sigmoid(E_phi), Psi = Phi * sigmoid(E_psi) over particle types a.
The paper asks for phi_ij > psi_ij > 0 so that every w_ij > 0 (q~.k~ >= -1); writing Psi as Phi
times a sigmoid enforces that exactly. The paper's learnable scales s1, s2 of Phi and Psi are not
parameters here: a common scale cancels in the normalised sum, and their ratio is what the
sigmoid of E_psi sets per type pair. Decoder: an EGNN over the observed graph from
(X0, V0, H(t)) for all requested times at once (time is a tensor axis over one edge list).

The all-pair sums are computed in their type-factorised form, per system b and particle type e:
n[b, e], sum_j v_j, sum_j k~_j and sum_j k~_j v_j^T; node i then reads the entries of its own
system mixed by its row of Phi and Psi. Cost and memory are linear in atoms; no N x N matrix is
built (:func:`_dense_attention` is the quadratic reference used by the tests). The k~ v^T sums
use a per-system padded layout (B, n_max, ...), which costs nothing extra when the systems of a
batch have equal sizes (the usual case) and B * n_max slots otherwise.

Particle types: a fixed map of ``NODE_TYPE``, documented in :func:`particle_type_table`.
Attention weights are shared across steps. As in the paper, the steps are the output times of
a fixed grid: the p-th requested time is decoded from the state after p steps, whatever its value,
so the model answers only on its trained grid (or its first entries; ``trained_grid_only``;
:meth:`~surrogate_md.Surrogate.predict` refuses other offsets). The decoder also sees an
embedding of each offset t / time_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surrogate_md.data import keys as K
from surrogate_md.errors import ConfigError
from surrogate_md.models.base import ModelConfig, TrajectoryModel, n_graphs, scale
from surrogate_md.models.layers import (
    EGNNLayer,
    NodeEncoder,
    edge_type_features,
    output_times,
    read_state,
    segment_sum,
    time_embedding,
)

# elements that get their own particle type, in order of priority
_ELEMENTS = (1, 6, 7, 8, 16, 15, 9, 17)


@dataclass(frozen=True)
class PAINETConfig(ModelConfig):
    hidden: int = 64  # embedding size (split over heads)
    n_heads: int = 4  # attention heads
    n_particle_types: int = 6  # size of the type-pair matrices Phi, Psi
    eta: float = 0.5  # energy-descent step size, 0 < eta < 1
    n_decoder_layers: int = 3  # EGNN layers of the parallel decoder
    time_dim: int = 32  # sinusoidal embedding size of t / time_scale
    length_scale_A: float = 2.0  # Å, divides relative vectors before the Gram invariants

    def __post_init__(self) -> None:
        if self.n_heads > 0 and self.hidden % self.n_heads:
            nearest = max(self.n_heads, round(self.hidden / self.n_heads) * self.n_heads)
            raise ConfigError(f"model.hidden = {self.hidden} must be a multiple of model.n_heads "
                              f"= {self.n_heads} (painet splits the embedding over its heads); "
                              f"set model.hidden to e.g. {nearest} or change model.n_heads")
        if not 0.0 < self.eta < 1.0:  # NaN fails too
            raise ConfigError(f"model.eta = {self.eta!r}: painet's energy-descent step must lie "
                              "strictly between 0 and 1; set model.eta to e.g. 0.5")


def particle_type_table(n_node_types: int, n_particle_types: int) -> torch.Tensor:
    """Fixed map NODE_TYPE -> particle type, (n_node_types,) long.

    Atoms (NODE_TYPE < 100): H, C, N, O, S, P, F, Cl take types 0, 1, 2, ... while slots last,
    keeping the last slot for every other element. Residue nodes (100 + code) take type
    code mod n_particle_types.
    """
    table = torch.full((n_node_types,), n_particle_types - 1, dtype=torch.long)
    for slot, z in enumerate(_ELEMENTS[: n_particle_types - 1]):
        if z < n_node_types:
            table[z] = slot
    if n_node_types > 100:  # an embedding for atoms only (< 100 types) has no residue codes
        table[100:] = torch.arange(n_node_types - 100) % n_particle_types
    return table


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ptype: torch.Tensor,
                     phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Quadratic reference of the attention average for ONE system (tests only).

    q, k: (N, heads, d) L2-normalised; v: (N, heads, f); ptype: (N,); phi, psi: (A, A).
    Returns (N, heads, f): sum_j w_ij v_j / sum_j w_ij.
    """
    sim = torch.einsum("ihd,jhd->hij", q, k)
    w = phi[ptype][:, ptype] + psi[ptype][:, ptype] * sim  # (heads, N, N)
    return torch.einsum("hij,jhf->ihf", w, v) / w.sum(-1).T.unsqueeze(-1)


def _padding(graph: torch.Tensor, n_graphs_: int) -> tuple[torch.Tensor, int]:
    """Slot of each node inside its system, (N,), and the largest system size."""
    counts = torch.bincount(graph, minlength=n_graphs_)
    order = torch.argsort(graph, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(graph)
    slot[order] = torch.arange(graph.shape[0], device=graph.device) - starts[graph[order]]
    return slot, int(counts.max())


def factorised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         ptype: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor,
                         graph: torch.Tensor, n_graphs_: int) -> torch.Tensor:
    """All-pair attention average within each system, linear in atoms.

    Args:
        q, k: (N, heads, d) L2-normalised queries and keys.
        v: (N, heads, f) values.
        ptype: (N,) particle types in 0..A-1; phi, psi: (A, A) type-pair weights.
        graph: (N,) system index; n_graphs_: B.
    Returns:
        (N, heads, f): sum_j w_ij v_j / sum_j w_ij over j in i's system (j = i included).
    """
    n_types = phi.shape[0]
    group = graph * n_types + ptype
    n_groups = n_graphs_ * n_types
    count = segment_sum(torch.ones_like(q[:, 0, 0]), group, n_groups).view(n_graphs_, n_types)
    sum_v = segment_sum(v, group, n_groups).view(n_graphs_, n_types, *v.shape[1:])
    sum_k = segment_sum(k, group, n_groups).view(n_graphs_, n_types, *k.shape[1:])
    phi, psi = phi.to(q.dtype), psi.to(q.dtype)
    # mixed by the query type's row: (B, A, ...), then read at each node's (system, type)
    den = torch.einsum("ae,be->ba", phi, count)[graph, ptype]
    num = torch.einsum("ae,behf->bahf", phi, sum_v)[graph, ptype]
    den_k = torch.einsum("ae,behd->bahd", psi, sum_k)[graph, ptype]
    den = den.unsqueeze(-1) + (q * den_k).sum(-1)  # (N, heads)

    slot, n_max = _padding(graph, n_graphs_)
    onehot = nn.functional.one_hot(ptype, n_types).to(q.dtype)

    def pad(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((n_graphs_, n_max, *t.shape[1:]))
        return out.index_put((graph, slot), t)

    kz = pad(k).unsqueeze(2) * pad(onehot)[..., None, None]  # (B, n, A, heads, d)
    sum_kv = torch.einsum("bnehd,bnhf->behdf", kz, pad(v))  # (B, A, heads, d, f)
    mixed = torch.einsum("ae,behdf->bahdf", psi, sum_kv)
    read = torch.einsum("bnhd,bahdf->bnahf", pad(q), mixed)  # (B, n, A, heads, f)
    num = num + read[graph, slot, ptype]
    return num / den.unsqueeze(-1)


class PAINETModel(TrajectoryModel):
    """State to trajectory with all-pair attention: (x0, v0) -> (P, N, C, 3) Å at ``TIMES``."""

    name = "painet"
    trained_grid_only = True
    config_class = PAINETConfig

    def __init__(self, config: PAINETConfig) -> None:
        super().__init__(config)
        c, hid = config.n_channels, config.hidden
        a = config.n_particle_types
        self.register_buffer("ptype_table", particle_type_table(config.n_node_types, a),
                             persistent=False)
        self.encoder = NodeEncoder(config.n_node_types, c, hid)
        self.qkv = nn.Linear(hid, 3 * hid, bias=False)
        self.norm = nn.LayerNorm(hid)
        self.type_phi = nn.Parameter(torch.zeros(a, a))
        self.type_psi = nn.Parameter(torch.zeros(a, a))
        self.time_in = nn.Linear(hid + config.time_dim, hid)
        self.decoder = nn.ModuleList(
            EGNNLayer(hid, c, edge_dim=2, update_features=i < config.n_decoder_layers - 1)
            for i in range(config.n_decoder_layers))

    def pair_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Phi, Psi: (A, A) with Phi > Psi > 0 (eq. 9 with s1 = 1: only Psi / Phi matters)."""
        phi = torch.sigmoid(self.type_phi)
        return phi, phi * torch.sigmoid(self.type_psi)

    def attention_step(self, h: torch.Tensor, ptype: torch.Tensor, graph: torch.Tensor,
                       n_graphs_: int) -> torch.Tensor:
        """One energy-descent step: (N, H) -> (N, H)."""
        heads = self.config.n_heads
        q, k, v = (t.reshape(t.shape[0], heads, -1) for t in self.qkv(h).chunk(3, dim=-1))
        q = nn.functional.normalize(q, dim=-1)
        k = nn.functional.normalize(k, dim=-1)
        phi, psi = self.pair_weights()
        avg = factorised_attention(q, k, v, ptype, phi, psi, graph, n_graphs_)
        eta = self.config.eta
        return self.norm((1.0 - eta) * h + eta * avg.reshape(h.shape).to(h.dtype))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        pos, vel = read_state(batch, cfg.n_channels)
        v0 = vel / scale(self, "velocity_scale", pos)
        tau = output_times(batch, scale(self, "time_scale", pos), pos)
        p = tau.shape[0]
        graph, b = batch[K.GRAPH], n_graphs(batch)
        ptype = self.ptype_table[batch[K.NODE_TYPE]]
        h = self.encoder(batch[K.NODE_TYPE], v0)
        states = []
        for _ in range(p):  # recurrent by design: one descent step per output time
            h = self.attention_step(h, ptype, graph, b)
            states.append(h)
        hs = torch.stack(states)  # (P, N, H)
        emb = time_embedding(tau, cfg.time_dim).to(hs.dtype)
        hd = self.time_in(torch.cat([hs, emb.unsqueeze(1).expand(-1, hs.shape[1], -1)], -1))
        x = pos.unsqueeze(0).expand(p, -1, -1, -1)
        edge_feat = edge_type_features(batch, pos)
        step = scale(self, "displacement_scale", pos)
        for layer in self.decoder:
            hd, x = layer(hd, x, batch[K.EDGE_INDEX], length_scale=cfg.length_scale_A,
                          step_scale=step, edge_feat=edge_feat, vel=v0.unsqueeze(0))
        return x
