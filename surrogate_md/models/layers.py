"""Building blocks shared by the learned models.

Shapes: ``T`` is a leading time axis (output times P for EGNN/EGNO/PAINET, history frames for
ESTAG), ``N`` nodes of the flat node list, ``E`` edges of the one shared edge list, ``C`` vector
channels per node, ``H`` hidden size. Every per-edge tensor is (T, E, ...) and is built by
gathering node tensors with ``h[:, src]``: the graph is never replicated per time point.

Segment reductions use torch's own ``index_add_`` (no torch_scatter), so everything runs on CPU
and CUDA, in float32/float64 and under ``torch.autocast``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surrogate_md.data import keys as K


def segment_sum(src: torch.Tensor, index: torch.Tensor, n_segments: int,
                dim: int = 0) -> torch.Tensor:
    """Sum ``src`` over entries sharing ``index`` along ``dim``: (..., n, ...) -> (..., S, ...)."""
    shape = list(src.shape)
    shape[dim] = n_segments
    out = torch.zeros(shape, dtype=src.dtype, device=src.device)
    return out.index_add_(dim, index, src)


def segment_count(index: torch.Tensor, n_segments: int, like: torch.Tensor) -> torch.Tensor:
    """Entries per segment, (S,), in the dtype/device of ``like``."""
    return torch.bincount(index, minlength=n_segments).to(like.dtype)


def segment_mean(src: torch.Tensor, index: torch.Tensor, n_segments: int,
                 dim: int = 0) -> torch.Tensor:
    """Mean of ``src`` over entries sharing ``index`` along ``dim`` (empty segments give 0)."""
    total = segment_sum(src, index, n_segments, dim)
    count = segment_count(index, n_segments, total).clamp(min=1)
    view = [1] * total.dim()
    view[dim] = n_segments
    return total / count.view(view)


def system_centroid(x: torch.Tensor, graph: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Per-system centroid of vectors, broadcast back to the nodes.

    Args:
        x: (T, N, C, 3) positions, Å.
        graph: (N,) system index of each node.
    Returns:
        (T, N, 1, 3): the mean over all nodes and channels of each node's system at each time.
    """
    per_node = x.mean(dim=2)  # (T, N, 3)
    centre = segment_mean(per_node, graph, n_graphs, dim=1)  # (T, B, 3)
    return centre[:, graph].unsqueeze(2)


def time_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous dimensionless times.

    Args:
        tau: (P,) time offsets in units of the trained jump (t / time_scale), O(1).
        dim: embedding size (even).
    Returns:
        (P, dim) features ``[sin(w_k tau), cos(w_k tau)]`` with w_k from pi/4 to 64 pi, so both
        the whole jump and a fine grid of it are resolved.
    """
    half = dim // 2
    freqs = math.pi * torch.pow(2.0, torch.linspace(-2.0, 6.0, half, dtype=tau.dtype,
                                                    device=tau.device))
    arg = tau.unsqueeze(-1) * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def mlp(n_in: int, n_hidden: int, n_out: int, act_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_out)]
    if act_last:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def small_init_(linear: nn.Linear, gain: float = 1e-3) -> nn.Linear:
    """Near-zero output layer for coordinate updates (as EGNN), so an untrained model starts
    close to its positional prior and training is stable."""
    nn.init.xavier_uniform_(linear.weight, gain=gain)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def gram_features(rel: torch.Tensor, normalised: bool) -> torch.Tensor:
    """Rotation/reflection-invariant features of channel vectors.

    Args:
        rel: (..., C, 3) dimensionless vectors.
        normalised: also append the Frobenius-normalised Gram matrix (ESTAG's multi-channel
            invariant; only added for C > 1, where it carries shape information).
    Returns:
        (..., C*C) or (..., 2*C*C) features.
    """
    gram = torch.einsum("...ax,...bx->...ab", rel, rel)
    feats = gram.flatten(-2)
    if normalised and rel.shape[-2] > 1:
        norm = torch.linalg.matrix_norm(gram).clamp(min=1e-6)
        feats = torch.cat([feats, (gram / norm[..., None, None]).flatten(-2)], dim=-1)
    return feats


def n_gram_features(n_channels: int, normalised: bool) -> int:
    return n_channels * n_channels * (2 if normalised and n_channels > 1 else 1)


def edge_type_features(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(E, 2) one-hot of ``EDGE_TYPE`` (0 bond/radius, 1 two-hop); all bond if absent."""
    n_edges = batch[K.EDGE_INDEX].shape[1]
    if K.EDGE_TYPE in batch:
        etype = batch[K.EDGE_TYPE].clamp(0, 1)
    else:
        etype = torch.zeros(n_edges, dtype=torch.long, device=like.device)
    return nn.functional.one_hot(etype, 2).to(like.dtype)


class EGNNLayer(nn.Module):
    """E(n)-equivariant message passing (Satorras et al.) over a leading time axis and C vector
    channels per node, with the velocity term.

    m_ij = phi_m(h_i, h_j, G_ij, e_ij) with G_ij the Gram matrix of (x_i - x_j) / length_scale
    over channels (||x_ij||^2 for C = 1);
    x_i += step_scale * mean_j W(m_ij) r_ij + step_scale * U(h_i) v_i, where W, U are (C, C)
    invariant matrices mixing vector channels (never x/y/z components) and r_ij the relative
    vector softly normalised by (1 + |x_ij| / length_scale);
    h_i += phi_h(h_i, mean_j m_ij, node_feat_i) (skipped with ``update_features=False``).

    The first linear map of phi_m is split into node terms (W_a h_i + W_b h_j) computed per node
    and gathered onto edges, which saves an (T, E, 2H) concatenation.
    """

    def __init__(self, hidden: int, n_channels: int, *, edge_dim: int = 0, node_dim: int = 0,
                 use_velocity: bool = True, normalised_gram: bool = False,
                 zero_init_coords: bool = False, update_features: bool = True) -> None:
        super().__init__()
        c = n_channels
        self.n_channels = c
        self.normalised_gram = normalised_gram
        self.msg_i = nn.Linear(hidden, hidden)
        self.msg_j = nn.Linear(hidden, hidden, bias=False)
        self.msg_g = nn.Linear(n_gram_features(c, normalised_gram), hidden, bias=False)
        self.msg_e = nn.Linear(edge_dim, hidden, bias=False) if edge_dim else None
        self.msg_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coord = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, c * c))
        self.vel = (nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, c * c))
                    if use_velocity else None)
        # the last layer of a stack needs no feature update (it would get no gradient)
        self.node = mlp(2 * hidden + node_dim, hidden, hidden) if update_features else None
        for head in (self.coord, self.vel):
            if head is None:
                continue
            if zero_init_coords:
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
            else:
                small_init_(head[-1])

    def forward(self, h: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor, *,
                length_scale: torch.Tensor | float, step_scale: torch.Tensor | float,
                edge_feat: torch.Tensor | None = None, node_feat: torch.Tensor | None = None,
                vel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One message-passing step.

        Args:
            h: (T, N, H) invariant features.
            x: (T, N, C, 3) positions, Å.
            edge_index: (2, E) source j, target i.
            length_scale: Å, makes relative vectors O(1).
            step_scale: Å, size of the coordinate updates (the displacement scale).
            edge_feat: (E, F_e) or (T, E, F_e) invariant edge features.
            node_feat: (N, F_n) or (T, N, F_n) extra invariant node features.
            vel: (T or 1, N, C, 3) dimensionless velocities (v / velocity_scale).
        Returns:
            (h, x) with the same shapes.
        """
        t, n = x.shape[0], x.shape[1]
        src, dst = edge_index[0], edge_index[1]
        rel = (x[:, dst] - x[:, src]) / length_scale  # (T, E, C, 3)
        pre = self.msg_i(h)[:, dst] + self.msg_j(h)[:, src] + self.msg_g(
            gram_features(rel, self.normalised_gram))
        if self.msg_e is not None and edge_feat is not None:
            pre = pre + self.msg_e(edge_feat)
        m = self.msg_out(pre)  # (T, E, H)

        inv_deg = 1.0 / segment_count(dst, n, m).clamp(min=1)
        c = self.n_channels
        w = self.coord(m).view(t, -1, c, c)
        size = rel.flatten(-2).norm(dim=-1)[..., None, None]
        trans = torch.einsum("teab,tebx->teax", w, rel / (1.0 + size))
        agg = segment_sum(trans, dst, n, dim=1) * inv_deg.view(1, n, 1, 1).to(trans.dtype)
        x = x + step_scale * agg
        if self.vel is not None and vel is not None:
            u = self.vel(h).view(t, n, c, c)
            x = x + step_scale * torch.einsum("tnab,tnbx->tnax", u, vel.expand(t, -1, -1, -1)
                                              .to(u.dtype))

        if self.node is None:
            return h, x
        magg = segment_sum(m, dst, n, dim=1) * inv_deg.view(1, n, 1).to(m.dtype)
        parts = [h, magg]
        if node_feat is not None:
            parts.append(node_feat.expand(t, -1, -1) if node_feat.dim() == 3
                         else node_feat.unsqueeze(0).expand(t, -1, -1))
        h = h + self.node(torch.cat([p.to(magg.dtype) for p in parts], dim=-1))
        return h, x


class NodeEncoder(nn.Module):
    """Invariant node features at t0: embedding of ``NODE_TYPE`` plus an MLP of the velocity
    Gram matrix (v / velocity_scale), (N, H)."""

    def __init__(self, n_node_types: int, n_channels: int, hidden: int,
                 use_velocity: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_node_types, hidden)
        self.use_velocity = use_velocity
        self.vel = mlp(n_channels * n_channels, hidden, hidden) if use_velocity else None

    def forward(self, node_type: torch.Tensor, vel: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(node_type)
        if self.vel is not None and vel is not None:
            gram = torch.einsum("nax,nbx->nab", vel, vel).flatten(-2)
            h = h + self.vel(gram.to(h.dtype))
        return h


def fourier_basis(tau: torch.Tensor, modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous Fourier basis of period 1 (one trained jump) at the actual times.

    Args:
        tau: (P,) times in units of the trained jump.
        modes: number of lowest frequencies kept (k = 0 .. modes-1).
    Returns:
        cos, sin: (modes, P) with cos[k, p] = cos(2 pi k tau_p).
    """
    k = torch.arange(modes, dtype=tau.dtype, device=tau.device)
    arg = 2.0 * math.pi * k[:, None] * tau[None, :]
    return torch.cos(arg), torch.sin(arg)


class TemporalFourierConv(nn.Module):
    """Fourier convolution along the time axis, on invariant features or on equivariant vectors.

    The forward transform is the quadrature F_k = mean_p f(tau_p) exp(-2 pi i k tau_p) over the
    requested times, evaluated with a continuous basis of period one trained jump instead of
    ``torch.fft`` over the sample index; the inverse evaluates sum_k c_k Re(G_k exp(2 pi i k tau))
    at the same times (c_0 = 1, c_k = 2). On a uniform grid tau_p = p / P this is exactly the
    truncated rFFT -> mix -> irFFT of the reference; on a finer uniform grid (2P points) of the same
    jump the coefficients of a band-limited signal are unchanged, so the same weights act on it
    (zero-shot resolution change); on a non-uniform grid the mean is a simple quadrature.

    Mode ``"scalar"``: f is (P, N, H), complex weights (modes, H, H) mix the channels.
    Mode ``"vector"``: f is (P, N, V, 3), real weights (modes, V, V) mix the vector channels and
    never the x/y/z components, so rotations and reflections commute with the layer.
    """

    def __init__(self, channels: int, modes: int, vector: bool) -> None:
        super().__init__()
        self.modes = modes
        self.vector = vector
        scale = 1.0 / channels
        if vector:
            eye = torch.eye(channels).expand(modes, channels, channels)
            self.weight = nn.Parameter(scale * (eye + 0.1 * torch.randn(modes, channels, channels)))
        else:
            self.weight_re = nn.Parameter(scale * torch.randn(modes, channels, channels))
            self.weight_im = nn.Parameter(scale * torch.randn(modes, channels, channels))

    def forward(self, f: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        cos, sin = fourier_basis(tau.to(f.dtype), self.modes)
        p = tau.shape[0]
        eq = "kp,pn...->kn..."
        f_re = torch.einsum(eq, cos, f) / p
        f_im = -torch.einsum(eq, sin, f) / p
        coef = torch.ones(self.modes, dtype=f.dtype, device=f.device)
        coef[1:] = 2.0
        if self.vector:
            w = self.weight.to(f.dtype)
            g_re = torch.einsum("kab,knbx->knax", w, f_re)
            g_im = torch.einsum("kab,knbx->knax", w, f_im)
            out = "k,kp,knax->pnax"
        else:
            w_re, w_im = self.weight_re.to(f.dtype), self.weight_im.to(f.dtype)
            g_re = (torch.einsum("kab,knb->kna", w_re, f_re)
                    - torch.einsum("kab,knb->kna", w_im, f_im))
            g_im = (torch.einsum("kab,knb->kna", w_re, f_im)
                    + torch.einsum("kab,knb->kna", w_im, f_re))
            out = "k,kp,kna->pna"
        return torch.einsum(out, coef, cos, g_re) - torch.einsum(out, coef, sin, g_im)


def output_times(batch: dict[str, torch.Tensor], time_scale: torch.Tensor,
                 like: torch.Tensor) -> torch.Tensor:
    """(P,) requested offsets in units of the trained jump, dtype of ``like``."""
    times = batch[K.TIMES].to(dtype=like.dtype, device=like.device)
    if times.dim() != 1 or times.numel() == 0:
        raise ValueError(f"batch[{K.TIMES!r}] must be a non-empty (P,) tensor of ps offsets, "
                         f"got shape {tuple(times.shape)}")
    return times / time_scale


def read_state(batch: dict[str, torch.Tensor], n_channels: int,
               need_velocity: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions (N, C, 3) Å and velocities (N, C, 3) Å/ps of a batch, checked against the
    model's channel count."""
    pos = batch[K.POS]
    if pos.dim() != 3 or pos.shape[1:] != (n_channels, 3):
        raise ValueError(f"batch[{K.POS!r}] must be (N, {n_channels}, 3) for a model built with "
                         f"n_channels={n_channels}, got {tuple(pos.shape)}; build the model with "
                         f"the dataset's channel count")
    vel = batch.get(K.VEL)
    if vel is None and need_velocity:
        raise ValueError(f"batch has no {K.VEL!r} (N, C, 3) Å/ps velocities; this model needs "
                         f"them (use a dataset with velocities or finite-difference ones)")
    if vel is not None and vel.shape != pos.shape:
        raise ValueError(f"batch[{K.VEL!r}] has shape {tuple(vel.shape)}, expected "
                         f"{tuple(pos.shape)} like batch[{K.POS!r}]")
    return pos, vel
