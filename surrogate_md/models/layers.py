"""Building blocks shared by the learned models.

Shapes: ``T`` is a leading time axis (output times P for EGNN/EGNO/PAINET, history frames for
ESTAG), ``N`` nodes of the flat node list, ``E`` edges of the one shared edge list, ``C`` vector
channels per node, ``H`` hidden size. Every per-edge tensor is (T, E, ...) and is built by
gathering node tensors with ``h[:, src]``: the graph is never replicated per time point. On large
graphs the EGNN edge pass runs in chunks of edges and is recomputed in backward, so per-edge
tensors only ever exist one chunk at a time.

Segment reductions use torch's own ``index_add_`` (no torch_scatter), so everything runs on CPU
and CUDA, in float32/float64 and under ``torch.autocast``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    """Entries per segment, (S,), in the dtype/device of ``like``. Under ``torch.compile`` a sum
    of ones: ``bincount``'s output size depends on the data, which the compiler carries as an
    unbacked size (compiled EGNO aspirin training ran 1.01-1.16x faster with the sum, side by
    side in bench_training.py --compile --compare-src; eager keeps ``bincount``)."""
    if torch.compiler.is_compiling():
        ones = torch.ones(index.shape[0], dtype=like.dtype, device=like.device)
        return torch.zeros(n_segments, dtype=like.dtype, device=like.device).index_add_(
            0, index, ones)
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

    Both updates take the **mean** over neighbours where EGNN, EGNO's notes, ESTAG (Eq. 7) and
    PAINET (Eq. 2) sum: one model then serves molecules with 2-3 neighbours per atom and protein
    graphs with ~40 within 8 Å at the same feature scale, at the price of the neighbour count as
    information (a node's type and features still carry its chemistry).

    The first linear map of phi_m is split into node terms (W_a h_i + W_b h_j) computed per node
    and gathered onto edges, which saves an (T, E, 2H) concatenation. For one channel the Gram
    matrix is the squared length and W, U are scalar gates (no einsum of 1 x 1 matrices).

    On large graphs (many chunks of edges, see :func:`_edge_chunk_rows`) the edge pass runs
    chunk by chunk and is recomputed in backward (:class:`_ChunkedEdges`), so no (T, E, H) tensor
    is kept between forward and backward, in training or inference; the values and gradients are
    those of the plain pass that small graphs take. Under ``compile_model`` each chunk runs
    through a compiled :func:`_chunk_sums` (``compiled_chunk``), which fuses the elementwise work
    around the matrix products.
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
        # a torch.compile'd :func:`_chunk_sums` for the chunked edge pass (set by
        # ``compile_model``; None: eager chunks)
        self.compiled_chunk: Callable | None = None
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
        node_i, node_j = self.msg_i(h), self.msg_j(h)
        # edge features enter per chunk: their (E, H) projection is never kept either
        if self.msg_e is None:
            edge_feat = None
        need_m = self.node is not None
        params = self._edge_params()
        args = (node_i, node_j, x, edge_feat, src, dst, length_scale, need_m)
        rows = _edge_chunk_rows(src.shape[0], t, node_i.shape[-1], x.device)
        if rows is not None:
            m_sum, trans_sum = _ChunkedEdges.apply(self, rows, *args, *params)
        else:
            m_sum, trans_sum = _edge_sums(self, *args, params)

        inv_deg = (1.0 / segment_count(dst, n, trans_sum).clamp(min=1)).view(1, n, 1)
        x = x + step_scale * (trans_sum * inv_deg.unsqueeze(-1))
        if self.vel is not None and vel is not None:
            u = self.vel(h)
            if self.n_channels == 1:  # (T, N, 1) scalar gate: no (1 x 1) matrix products
                x = x + step_scale * (u.unsqueeze(-1) * vel.to(u.dtype))
            else:
                c = self.n_channels
                x = x + step_scale * (u.view(t, n, c, c) @ vel.to(u.dtype))

        if self.node is None:
            return h, x
        magg = m_sum * inv_deg.to(m_sum.dtype)
        parts = [h, magg]
        if node_feat is not None:
            parts.append(node_feat.expand(t, -1, -1) if node_feat.dim() == 3
                         else node_feat.unsqueeze(0).expand(t, -1, -1))
        h = h + self.node(torch.cat([p.to(magg.dtype) for p in parts], dim=-1))
        return h, x

    def _edge_params(self) -> tuple[torch.Tensor, ...]:
        """Weights of the per-edge computation, in the order :meth:`_edge_messages` reads them."""
        out, c0, c2 = self.msg_out[1], self.coord[0], self.coord[2]
        params = (self.msg_g.weight, out.weight, out.bias, c0.weight, c0.bias, c2.weight, c2.bias)
        return params if self.msg_e is None else (*params, self.msg_e.weight)

    def _edge_messages(self, a_i: torch.Tensor, b_j: torch.Tensor, x_i: torch.Tensor,
                       x_j: torch.Tensor, edge_feat: torch.Tensor | None,
                       length_scale: torch.Tensor | float, params: tuple[torch.Tensor, ...]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Messages m (T, e, H) and coordinate terms W(m) r / (1 + |r|) (T, e, C, 3) of a set of
        edges, from their gathered node terms and their own features (e, F_e) or (T, e, F_e)."""
        w_g, w_out, b_out, w_c0, b_c0, w_c2, b_c2 = params[:7]
        linear, silu = nn.functional.linear, nn.functional.silu
        rel = (x_i - x_j) / length_scale  # (T, e, C, 3)
        if self.n_channels == 1:  # Gram matrix = squared length: no einsum, no (1 x 1) products
            size = torch.linalg.vector_norm(rel, dim=-1, keepdim=True)  # (T, e, 1, 1)
            inv = rel.square().sum(-1)  # (T, e, 1)
        else:
            size = rel.flatten(-2).norm(dim=-1)[..., None, None]
            inv = gram_features(rel, self.normalised_gram)
        # all invariant edge inputs through one small product, so the (T, e, H) sum stays in the
        # dtype of the node terms (bf16 under autocast: no float32 copies of edge tensors)
        if edge_feat is not None:
            feat = edge_feat if edge_feat.dim() == 3 else edge_feat.unsqueeze(0)
            inv = torch.cat([inv, feat.to(inv.dtype).expand(inv.shape[0], -1, -1)], dim=-1)
            w_g = torch.cat([w_g, params[7]], dim=1)
        pre = a_i + b_j + linear(inv, w_g)
        m = silu(linear(silu(pre), w_out, b_out))
        w = linear(silu(linear(m, w_c0, b_c0)), w_c2, b_c2)  # (T, e, C*C)
        unit = rel / (1.0 + size)
        if self.n_channels == 1:
            trans = w.unsqueeze(-1) * unit.to(w.dtype)
        else:
            c = self.n_channels
            trans = w.view(*w.shape[:-1], c, c) @ unit.to(w.dtype)
        return m, trans


def _edge_chunk_rows(n_edges: int, n_times: int, hidden: int, device: torch.device
                     ) -> int | None:
    """Edges per chunk of the recomputed edge pass, or None for the plain pass.

    Chunks are (T, rows, H) blocks of about 0.5 M values on CPU (2 MiB in float32, so the
    elementwise work stays in cache) and 32 M on GPUs. Graphs of fewer than eight chunks take the
    plain pass: their edge tensors are small, and keeping them saves the recomputation (about 7%
    of a training step at MD17 size on one CPU thread). Under bf16 autocast on CPU the blocks are
    2 M values (4 MiB in bf16) and only graphs of up to two blocks take the plain pass: fewer,
    larger chunks cut the per-chunk overhead of the recomputation, and AdK backbone steps (855
    nodes, 8 Å graph, P = 4, hidden 128, batch 1 and 8) ran about 1.1x faster than in 0.5 M-value
    chunks at 1.2-1.5x the memory (the plain pass, 1.2x faster still, took 12x the memory).
    On GPUs only a graph of one block takes the plain pass: at eight 32 M-value blocks each of
    the (T, E, H) tensors it keeps for backward (about six per layer) would be 1 GiB in float32,
    enough to exhaust a 16-24 GiB card on an AdK batch. Compiled inference (no gradient) uses
    the GPU's rule on every device: inductor fuses the plain pass's elementwise work itself, and
    the chunk loop (``torch.unique`` per chunk) would break the traced graph (the whole forward
    then falls back to eager pieces).
    """
    plain_chunks = 8
    if device.type == "cuda" or (torch.compiler.is_compiling() and not torch.is_grad_enabled()):
        budget, plain_chunks = 2**25, 1
    elif (torch.is_autocast_enabled(device.type)
          and torch.get_autocast_dtype(device.type) == torch.bfloat16):
        budget, plain_chunks = 2**21, 2
    else:
        budget = 2**19
    rows = max(budget // max(n_times * hidden, 1), 256)
    return rows if n_edges > plain_chunks * rows else None


def _gather_edges(node_i: torch.Tensor, node_j: torch.Tensor, x: torch.Tensor,
                  edge_feat: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor
                  ) -> tuple[torch.Tensor, ...]:
    """Node terms and positions at the targets and sources of edges, plus their own features."""
    return (node_i.index_select(1, dst), node_j.index_select(1, src), x.index_select(1, dst),
            x.index_select(1, src), edge_feat)


def bucket_rows(n: int) -> int:
    """``n`` rounded up to one of 16 values per octave (k * 2^j with 16 <= k < 32; at most 1/16
    more): the bounded set of edge-block sizes that :func:`_pads_edge_rows` pads to."""
    step = 1 << max(n.bit_length() - 5, 0)
    return -(-n // step) * step


def _pads_edge_rows(device: torch.device) -> bool:
    """Whether edge blocks are padded to :func:`bucket_rows` sizes: on CPU under bf16/fp16
    autocast, whose matrix products run through oneDNN, which keeps memory for every new shape
    it sees (measured with torch 2.13: a bf16 linear layer fed 200 blocks of random row counts
    grew the process by 2.2 MB per new shape, 0.8 MB with its primitive cache off, and not at
    all when the row counts came from a set of ten; AdK training grew by ~200 MB per epoch,
    a radius graph having a new edge count in every batch). float32 CPU products (MKL) and CUDA
    keep nothing per shape, and are not padded."""
    return (device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16))


def _pad_edges(src: torch.Tensor, dst: torch.Tensor, edge_feat: torch.Tensor | None, rows: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Edges padded to ``rows`` by repeats of the last one (their results are sliced off before
    any sum, so they add nothing, in values or gradients)."""
    e = src.shape[0]
    if rows <= e or e == 0:
        return src, dst, edge_feat
    extra = rows - e
    src = torch.cat([src, src[-1:].expand(extra)])
    dst = torch.cat([dst, dst[-1:].expand(extra)])
    if edge_feat is not None:
        last = edge_feat.narrow(-2, e - 1, 1)
        edge_feat = torch.cat([edge_feat, last.expand(*last.shape[:-2], extra, last.shape[-1])],
                              dim=-2)
    return src, dst, edge_feat


_LOW_PRECISION_SUM_MAX_DEGREE = 16  # mean in-degree up to which messages are summed in bf16


def _edge_sums(layer: EGNNLayer, node_i: torch.Tensor, node_j: torch.Tensor, x: torch.Tensor,
               edge_feat: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor,
               length_scale: torch.Tensor | float, need_m: bool,
               params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-target sums of messages (T, N, H) (None unless ``need_m``) and of coordinate terms
    (T, N, C, 3), through ordinary autograd (every edge intermediate is kept for backward)."""
    n, e = x.shape[1], src.shape[0]
    padded = (_pad_edges(src, dst, edge_feat, bucket_rows(e)) if _pads_edge_rows(x.device)
              else (src, dst, edge_feat))
    m, trans = layer._edge_messages(*_gather_edges(node_i, node_j, x, padded[2], *padded[:2]),
                                    length_scale, params)
    m, trans = m[:, :e], trans[:, :e]
    # coordinate terms summed in the positions' precision, whatever autocast does; messages too,
    # except on sparse graphs (a few bonded neighbours per node, as molecules at MD17 size),
    # where summing bf16 messages in bf16 adds little to their own rounding and saves a (T, E, H)
    # conversion each way (5 % of a bf16 training step at MD17 size on CPU)
    trans_sum = segment_sum(trans.to(x.dtype), dst, n, dim=1)
    if not need_m:
        return None, trans_sum
    if src.shape[0] <= _LOW_PRECISION_SUM_MAX_DEGREE * n:
        return segment_sum(m, dst, n, dim=1).to(x.dtype), trans_sum
    return segment_sum(m.to(x.dtype), dst, n, dim=1), trans_sum


def _chunk_sums(layer: EGNNLayer, node_i: torch.Tensor, node_j: torch.Tensor, x: torch.Tensor,
                edge_feat: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor,
                length_scale: torch.Tensor | float, need_m: bool,
                params: tuple[torch.Tensor, ...], n_edges: int | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One chunk's contribution to the per-target sums (T, N, H) and (T, N, C, 3), gathers and
    sums included: the unit the compiled edge pass hands to ``torch.compile``, called with the
    node tensors of the chunk's own nodes and edges numbered within them (:func:`_chunk_nodes`).
    ``n_edges``: the chunk's real edges when ``src``/``dst`` were padded (:func:`_pad_edges`);
    only their results are summed.

    Compiled whole, its gathers, activations, conversions and sums are fused into a few loops
    around the matrix products, in forward and in the backward that autograd derives from it
    (the gathers' gradients are sums onto nodes, the sums' gradients gathers); the eager chunked
    pass gathers, sums and differentiates op by op instead. Measured on one Intel Xeon thread
    (AMX; AdK backbone, EGNO hidden 128, 4 layers): training steps 1.15-1.24x faster in bf16,
    1.05-1.16x in fp32 (batch 8 and 1). Eager, this form is 1.1x slower than the gathered-leaf
    one, which eager runs keep.
    """
    n = x.shape[1]
    m, trans = layer._edge_messages(*_gather_edges(node_i, node_j, x, edge_feat, src, dst),
                                    length_scale, params)
    if n_edges is not None:
        m, trans, dst = m[:, :n_edges], trans[:, :n_edges], dst[:n_edges]
    trans_sum = x.new_zeros((x.shape[0], n, *trans.shape[2:])).index_add(1, dst,
                                                                          trans.to(x.dtype))
    if not need_m:
        return None, trans_sum
    return x.new_zeros((m.shape[0], n, m.shape[-1])).index_add(1, dst, m.to(x.dtype)), trans_sum


class _ChunkedEdges(torch.autograd.Function):
    """The edge pass of an EGNN layer in chunks of edges, recomputed chunk by chunk in backward.

    Only the node-level inputs are kept for backward, never a (T, E, H) edge tensor: activation
    memory per layer drops from about six (T, E, H) blocks to the (T, N, H) node terms, and each
    chunk's elementwise work runs in cache. Backward re-runs each chunk's forward (the same ops in
    the same order, so the same values) and differentiates it with autograd: one extra forward of
    the edge MLPs, exact gradients. Autocast state is recorded in forward and restored for the
    recomputation.
    """

    @staticmethod
    def forward(ctx, layer: EGNNLayer, rows: int, node_i: torch.Tensor, node_j: torch.Tensor,
                x: torch.Tensor, edge_feat: torch.Tensor | None, src: torch.Tensor,
                dst: torch.Tensor, length_scale: torch.Tensor | float, need_m: bool,
                *params: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.layer, ctx.rows, ctx.length_scale, ctx.need_m = layer, rows, length_scale, need_m
        ctx.has_feat = edge_feat is not None
        # pad the last, shorter chunk to a bounded set of sizes where the products need it
        ctx.pad = _pads_edge_rows(x.device)
        n = x.shape[1]
        m_sum = trans_sum = None
        for lo in range(0, src.shape[0], rows):
            hi = min(lo + rows, src.shape[0])
            if layer.compiled_chunk is not None:
                nodes, s, d, feat = _chunk_nodes(edge_feat, src, dst, lo, hi)
                s, d, feat, real = _pad_chunk(s, d, feat, rows, ctx.pad)
                m_part, trans_part = layer.compiled_chunk(
                    layer, node_i.index_select(1, nodes), node_j.index_select(1, nodes),
                    x.index_select(1, nodes), feat, s, d, length_scale, need_m, params, real)
                if trans_sum is None:
                    trans_sum = x.new_zeros((x.shape[0], n, *trans_part.shape[2:]))
                    m_sum = x.new_zeros((x.shape[0], n, node_i.shape[-1])) if need_m else None
                trans_sum.index_add_(1, nodes, trans_part)
                if need_m:
                    m_sum.index_add_(1, nodes, m_part)
                continue
            s, d, feat, _ = _pad_chunk(src[lo:hi], dst[lo:hi], _rows(edge_feat, lo, hi), rows,
                                       ctx.pad)
            m, trans = layer._edge_messages(*_gather_edges(node_i, node_j, x, feat, s, d),
                                            length_scale, params)
            m, trans = m[:, :hi - lo], trans[:, :hi - lo]
            if trans_sum is None:  # sums in the positions' precision, whatever autocast does
                trans_sum = x.new_zeros((x.shape[0], n, *trans.shape[2:]))
                if need_m:
                    m_sum = x.new_zeros((m.shape[0], n, m.shape[-1]))
            trans_sum.index_add_(1, dst[lo:hi], trans.to(x.dtype))
            if need_m:
                m_sum.index_add_(1, dst[lo:hi], m.to(x.dtype))
        ctx.save_for_backward(node_i, node_j, x, edge_feat, src, dst, *params)
        return m_sum, trans_sum

    @staticmethod
    def backward(ctx, grad_m: torch.Tensor | None, grad_trans: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        node_i, node_j, x, edge_feat, src, dst, *params = ctx.saved_tensors
        layer, rows = ctx.layer, ctx.rows
        need = ctx.needs_input_grad
        want_i, want_j, want_x, want_feat = need[2], need[3], need[4], need[5]
        want_params = need[10:]
        g_i = torch.zeros_like(node_i) if want_i else None
        g_j = torch.zeros_like(node_j) if want_j else None
        g_x = torch.zeros_like(x) if want_x else None
        g_feat = torch.zeros_like(edge_feat) if ctx.has_feat and want_feat else None
        g_params = [torch.zeros_like(p) if w else None for p, w in zip(params, want_params)]
        use_m = ctx.need_m and grad_m is not None
        enabled, dtype = ctx.autocast
        if layer.compiled_chunk is not None:
            _compiled_backward(ctx, (g_i, g_j, g_x, g_feat, *g_params), grad_m, grad_trans)
            return (None, None, g_i, g_j, g_x, g_feat, None, None, None, None, *g_params)
        for lo in range(0, src.shape[0], rows):
            hi = min(lo + rows, src.shape[0])
            e = hi - lo
            s, d = src[lo:hi], dst[lo:hi]
            ps, pd, feat, _ = _pad_chunk(s, d, _rows(edge_feat, lo, hi), rows, ctx.pad)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype,
                                                     enabled=enabled):
                leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in
                          zip(_gather_edges(node_i, node_j, x, feat, ps, pd),
                              (want_i, want_j, want_x, want_x, want_feat))]
                weights = [p.detach().requires_grad_(w) for p, w in zip(params, want_params)]
                m, trans = layer._edge_messages(*leaves, ctx.length_scale, tuple(weights))
                m, trans = m[:, :e], trans[:, :e]
                outs, grads = [trans], [grad_trans.index_select(1, d).to(trans.dtype)]
                if use_m:
                    outs.append(m)
                    grads.append(grad_m.index_select(1, d).to(m.dtype))
                targets = [t for t in leaves + weights if t is not None and t.requires_grad]
                if not targets:
                    break
                found = iter(torch.autograd.grad(outs, targets, grads, allow_unused=True))
            got = [next(found) if t is not None and t.requires_grad else None
                   for t in leaves + weights]
            # the padded edges' rows (zero gradients) are dropped
            gi, gj, gxi, gxj, gb = (None if g is None else g.narrow(-2 if k == 4 else 1, 0, e)
                                    for k, g in enumerate(got[:5]))
            if gi is not None:
                g_i.index_add_(1, d, gi.to(g_i.dtype))
            if gj is not None:
                g_j.index_add_(1, s, gj.to(g_j.dtype))
            if gxi is not None:
                g_x.index_add_(1, d, gxi.to(g_x.dtype))
            if gxj is not None:
                g_x.index_add_(1, s, gxj.to(g_x.dtype))
            if gb is not None:
                g_feat.narrow(-2, lo, e).add_(gb.to(g_feat.dtype))
            for acc, g in zip(g_params, got[5:]):
                if acc is not None and g is not None:
                    acc.add_(g.to(acc.dtype))
        return (None, None, g_i, g_j, g_x, g_feat, None, None, None, None, *g_params)


def _compiled_backward(ctx, acc: tuple[torch.Tensor | None, ...], grad_m: torch.Tensor | None,
                       grad_trans: torch.Tensor) -> None:
    """Backward of :class:`_ChunkedEdges` through the layer's compiled :func:`_chunk_sums`: each
    chunk is recomputed and differentiated with respect to the node tensors and weights, whose
    gradients add into ``acc`` (node_i, node_j, x, edge features, then the weights; None where
    not wanted)."""
    node_i, node_j, x, edge_feat, src, dst, *params = ctx.saved_tensors
    layer, rows = ctx.layer, ctx.rows
    use_m = ctx.need_m and grad_m is not None
    enabled, dtype = ctx.autocast
    for lo in range(0, src.shape[0], rows):
        hi = min(lo + rows, src.shape[0])
        nodes, s, d, feat = _chunk_nodes(edge_feat, src, dst, lo, hi)
        s, d, feat, real = _pad_chunk(s, d, feat, rows, ctx.pad)
        local = [t.index_select(1, nodes) for t in (node_i, node_j, x)]
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            leaves = [t.detach().requires_grad_(a is not None) if t is not None else None
                      for t, a in zip((*local, feat, *params), acc)]
            m_part, trans_part = layer.compiled_chunk(
                layer, *leaves[:4], s, d, ctx.length_scale, use_m, tuple(leaves[4:]), real)
            outs, grads = [trans_part], [grad_trans.index_select(1, nodes)]
            if use_m:
                outs.append(m_part)
                grads.append(grad_m.index_select(1, nodes))
            targets = [t for t in leaves if t is not None and t.requires_grad]
            if not targets:
                return
            found = iter(torch.autograd.grad(outs, targets, grads, allow_unused=True))
        for k, (t, into) in enumerate(zip(leaves, acc)):
            g = next(found) if t is not None and t.requires_grad else None
            if g is None or into is None:
                continue
            if k < 3:  # node terms and positions of the chunk's own nodes
                into.index_add_(1, nodes, g.to(into.dtype))
            elif k == 3:  # the chunk's own edge features (padded rows dropped)
                into.narrow(-2, lo, hi - lo).add_(g.narrow(-2, 0, hi - lo).to(into.dtype))
            else:
                into.add_(g.to(into.dtype))


def _pad_chunk(src: torch.Tensor, dst: torch.Tensor, edge_feat: torch.Tensor | None, rows: int,
               pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]:
    """A chunk's edges padded (if ``pad``) to a multiple of ``rows`` / 8: full chunks keep their
    size, the shorter last one takes one of 8 sizes (its size is spread evenly over 0..rows from
    batch to batch, so finer buckets would still make dozens of shapes; this pads at most an
    eighth of a chunk per pass). Returns the (padded) src, dst, features and the real edge count
    if padded, else None."""
    e = src.shape[0]
    step = max(rows // 8, 1)
    target = min(-(-e // step) * step, rows) if pad else e
    if target <= e:
        return src, dst, edge_feat, None
    return (*_pad_edges(src, dst, edge_feat, target), e)


def _chunk_nodes(edge_feat: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor, lo: int,
                 hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The nodes that edges lo..hi touch (u,), the edges' sources and targets numbered within
    them, and the edges' own features (a copy, not a view).

    The compiled chunk works on these u nodes only, so a chunk's cost is in its edges, not in the
    graph: the whole graph's (T, N, H) node terms per chunk would make a pass over all chunks cost
    O(E N) (measured: AdK x8 steps slower than eager). Fresh tensors, not views: a compiled function
    guards on a view's storage offset and would recompile for every chunk."""
    e = hi - lo
    nodes, local = torch.unique(torch.cat([src[lo:hi], dst[lo:hi]]), return_inverse=True)
    feat = _rows(edge_feat, lo, hi)
    return nodes, local[:e], local[e:], None if feat is None else feat.clone()


def _rows(edge_feat: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Edges lo..hi of an (E, F) or (T, E, F) per-edge tensor."""
    return None if edge_feat is None else edge_feat.narrow(-2, lo, hi - lo)


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
    at the same times (c_0 = 1, c_k = 2). On a uniform grid tau_p = p / P whose Nyquist frequency
    lies above every kept mode (2 (modes - 1) < P: P >= 3 for the default 2 modes) this is exactly
    the truncated rFFT -> mix -> irFFT of the reference; on a finer uniform grid (2P points) of the
    same jump the coefficients of a band-limited signal are unchanged, so the same weights act on
    it (zero-shot resolution change); on a non-uniform grid the mean is a simple quadrature. On
    coarser grids (P = 1 or 2 with 2 modes) the modes at and above the Nyquist frequency fold onto
    lower ones: still a linear mixing along time (a reparametrisation of the reference's), but its
    weights do not carry over to other grids.

    Mode ``"scalar"``: f is (P, N, H), complex weights (modes, H, H) mix the channels.
    Mode ``"vector"``: f is (P, N, V, 3), complex weights (modes, V, V) mix the vector channels
    and never the x/y/z components (a complex number per channel pair acts on each Cartesian
    component alike), so rotations and reflections commute with the layer.
    """

    def __init__(self, channels: int, modes: int, vector: bool) -> None:
        super().__init__()
        self.modes = modes
        self.vector = vector
        scale = 1.0 / channels
        if vector:
            # Near zero: the layer is used as a residual update of positions, so an identity-like
            # start would move every atom by a multiple of its distance from the centroid and an
            # untrained model would be far worse than copying the input.
            # (real part ``weight``, imaginary part ``weight_im``: checkpoints of format 1 had
            # real weights only and are migrated with a zero imaginary part)
            self.weight = nn.Parameter(1e-2 * scale * torch.randn(modes, channels, channels))
            self.weight_im = nn.Parameter(1e-2 * scale * torch.randn(modes, channels, channels))
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
            w_re, w_im = self.weight.to(f.dtype), self.weight_im.to(f.dtype)
            g_re = (torch.einsum("kab,knbx->knax", w_re, f_re)
                    - torch.einsum("kab,knbx->knax", w_im, f_im))
            g_im = (torch.einsum("kab,knbx->knax", w_re, f_im)
                    + torch.einsum("kab,knbx->knax", w_im, f_re))
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
