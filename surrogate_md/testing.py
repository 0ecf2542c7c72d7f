"""Equivariance harness shared by the test suite.

Checks the contract of every trajectory model: rotating or reflecting the inputs (positions,
velocities, history) rotates the outputs; translating positions and history (not velocities)
translates them; permuting nodes, edges and system labels permutes them. Comparisons run in
float64 with the tolerance table :data:`TOLERANCES`, for every output time slice.

Use ``perturb_parameters`` first: models start near a positional prior (small or zero output
layers), and an untrained model that returns its input is trivially equivariant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from surrogate_md.data import keys as K

Batch = dict[str, torch.Tensor]

# (rtol, atol) per dtype for output comparisons; positions are O(1-10) Å
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
}


def random_batch(n_atoms: Sequence[int] | int = (5, 7), n_channels: int = 1, n_times: int = 4,
                 history: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0,
                 n_two_hop: int = 3, jump_ps: float = 0.4) -> Batch:
    """A batch of random systems with every key a model may read.

    Args:
        n_atoms: node count of each system (one int = one system).
        n_channels: vectors per node C.
        n_times: output times P, evenly spaced up to ``jump_ps``.
        history: history frames T (a random walk ending at the positions), 0 for none.
        n_two_hop: edges per system re-typed as two-hop (EDGE_TYPE 1).
    Returns:
        dict with POS, VEL (N, C, 3), HIST (T, N, C, 3), HIST_DT, NODE_TYPE, MASS, GRAPH,
        N_GRAPHS, EDGE_INDEX (fully connected per system, no self loops), EDGE_TYPE, TIMES.
    """
    rng = np.random.default_rng(seed)
    sizes = [n_atoms] if isinstance(n_atoms, int) else list(n_atoms)
    n = sum(sizes)
    graph = np.repeat(np.arange(len(sizes)), sizes)
    edges, etypes, start = [], [], 0
    for size in sizes:
        ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        keep = ii != jj
        pairs = np.stack([jj[keep], ii[keep]]) + start  # row 0 source j, row 1 target i
        etype = np.zeros(pairs.shape[1], dtype=np.int64)
        etype[rng.choice(pairs.shape[1], size=min(n_two_hop, pairs.shape[1]), replace=False)] = 1
        edges.append(pairs)
        etypes.append(etype)
        start += size
    pos = rng.normal(scale=1.5, size=(n, n_channels, 3))
    vel = rng.normal(scale=2.0, size=(n, n_channels, 3))
    batch = {
        K.POS: pos,
        K.VEL: vel,
        K.NODE_TYPE: rng.choice([1, 6, 7, 8, 16], size=n).astype(np.int64),
        K.MASS: rng.uniform(1.0, 32.0, size=n),
        K.GRAPH: graph.astype(np.int64),
        K.N_GRAPHS: np.int64(len(sizes)),
        K.EDGE_INDEX: np.concatenate(edges, axis=1).astype(np.int64),
        K.EDGE_TYPE: np.concatenate(etypes),
        K.TIMES: jump_ps * np.arange(1, n_times + 1) / n_times,
    }
    if history:
        steps = rng.normal(scale=0.2, size=(history - 1, n, n_channels, 3))
        back = np.cumsum(steps[::-1], axis=0)[::-1]  # oldest first
        batch[K.HIST] = np.concatenate([pos[None] + back, pos[None]], axis=0)
        batch[K.HIST_DT] = np.float64(0.05)
    out = {}
    for key, value in batch.items():
        tensor = torch.as_tensor(value)
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def random_orthogonal(seed: int = 0, reflect: bool | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random 3x3 orthogonal matrix (QR of a Gaussian matrix with sign fix).

    ``reflect=True`` forces det -1, ``False`` det +1, ``None`` leaves it to chance."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if reflect is not None and (np.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return torch.as_tensor(q, dtype=dtype)


def rotate_batch(batch: Batch, rot: torch.Tensor) -> Batch:
    """Apply x -> R x to positions, velocities, history and targets."""
    out = dict(batch)
    for key in (K.POS, K.VEL, K.HIST, K.TARGET):
        if key in out:
            out[key] = out[key] @ rot.T.to(device=out[key].device, dtype=out[key].dtype)
    return out


def translate_batch(batch: Batch, shift: torch.Tensor) -> Batch:
    """Add ``shift`` (3,) Å to positions, history and targets; velocities unchanged."""
    out = dict(batch)
    for key in (K.POS, K.HIST, K.TARGET):
        if key in out:
            out[key] = out[key] + shift.to(device=out[key].device, dtype=out[key].dtype)
    return out


def permute_batch(batch: Batch, seed: int = 0) -> tuple[Batch, torch.Tensor]:
    """Permute nodes, edges and system labels.

    Returns:
        the permuted batch and ``inverse`` (N,) such that ``out_permuted[:, inverse]`` is in the
        original node order.
    """
    gen = torch.Generator().manual_seed(seed)  # CPU draws, the same on every device
    device = batch[K.POS].device
    n = batch[K.POS].shape[0]
    perm = torch.randperm(n, generator=gen).to(device)  # new node k is old node perm[k]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=device)
    n_graphs = int(batch[K.N_GRAPHS])
    relabel = torch.randperm(n_graphs, generator=gen).to(device)
    out = dict(batch)
    for key in (K.POS, K.VEL, K.NODE_TYPE, K.MASS, K.TARGET_MASK):
        if key in out:
            out[key] = out[key][perm]
    out[K.GRAPH] = relabel[batch[K.GRAPH][perm]]
    for key in (K.HIST, K.TARGET):
        if key in out:
            out[key] = out[key][:, perm]
    edge_perm = torch.randperm(batch[K.EDGE_INDEX].shape[1], generator=gen).to(device)
    out[K.EDGE_INDEX] = inverse[batch[K.EDGE_INDEX][:, edge_perm]]
    if K.EDGE_TYPE in out:
        out[K.EDGE_TYPE] = batch[K.EDGE_TYPE][edge_perm]
    return out, inverse


def select_systems(batch: Batch, systems: Sequence[int]) -> Batch:
    """The sub-batch holding only ``systems`` (relabelled 0..len-1, node order kept)."""
    graph = batch[K.GRAPH]
    keep = torch.zeros_like(graph, dtype=torch.bool)
    relabel = torch.full((int(batch[K.N_GRAPHS]),), -1, dtype=torch.long, device=graph.device)
    for new, old in enumerate(systems):
        keep |= graph == old
        relabel[old] = new
    new_index = torch.full((graph.shape[0],), -1, dtype=torch.long, device=graph.device)
    new_index[keep] = torch.arange(int(keep.sum()), device=graph.device)
    edge_keep = keep[batch[K.EDGE_INDEX][0]] & keep[batch[K.EDGE_INDEX][1]]
    out = dict(batch)
    for key in (K.POS, K.VEL, K.NODE_TYPE, K.MASS, K.TARGET_MASK):
        if key in out:
            out[key] = out[key][keep]
    for key in (K.HIST, K.TARGET):
        if key in out:
            out[key] = out[key][:, keep]
    out[K.GRAPH] = relabel[graph[keep]]
    out[K.N_GRAPHS] = torch.tensor(len(systems))
    out[K.EDGE_INDEX] = new_index[batch[K.EDGE_INDEX][:, edge_keep]]
    if K.EDGE_TYPE in out:
        out[K.EDGE_TYPE] = batch[K.EDGE_TYPE][edge_keep]
    return out


@torch.no_grad()
def perturb_parameters(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter so zero- or small-initialised output layers give
    non-trivial outputs (otherwise an equivariance check could not fail)."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        param.add_(scale * noise.to(device=param.device, dtype=param.dtype))


@dataclass
class EquivarianceReport:
    """Largest absolute deviation per check, over all output times."""

    rotation: float
    reflection: float
    translation: float
    permutation: float
    motion: float  # largest |output - input position|: a vacuous model has ~0 here


def _max_dev(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    for p in range(a.shape[0]):
        if not torch.allclose(a[p], b[p], rtol=rtol, atol=atol):
            dev = float((a[p] - b[p]).abs().max())
            raise AssertionError(f"{what}: output time slice {p} deviates by {dev:.3e} "
                                 f"(rtol={rtol}, atol={atol})")
    return float((a - b).abs().max())


@torch.no_grad()
def check_equivariance(model: Callable[[Batch], torch.Tensor], batch: Batch,
                       seed: int = 0, tolerances: dict | None = None) -> EquivarianceReport:
    """Assert rotation, reflection, translation and permutation equivariance of ``model``.

    Args:
        model: callable batch -> (P, N, C, 3) positions.
        batch: e.g. from :func:`random_batch` (float64 recommended).
    Raises:
        AssertionError naming the check and the output time slice that failed.
    """
    rtol, atol = (tolerances or TOLERANCES)[batch[K.POS].dtype]
    dtype = batch[K.POS].dtype
    ref = model(batch)
    n_times = batch[K.TIMES].shape[0]
    expected = (n_times, *batch[K.POS].shape)
    if tuple(ref.shape) != expected:
        raise AssertionError(f"output shape {tuple(ref.shape)}, expected {expected}")
    if not torch.isfinite(ref).all():
        raise AssertionError("output has non-finite values")
    devs = {}
    for label, reflect in (("rotation", False), ("reflection", True)):
        rot = random_orthogonal(seed, reflect=reflect, dtype=dtype)
        out = model(rotate_batch(batch, rot))
        rot = rot.to(ref.device)
        devs[label] = _max_dev(out, ref @ rot.T, rtol, atol, label)
    shift = torch.as_tensor(np.random.default_rng(seed).normal(scale=5.0, size=3), dtype=dtype,
                            device=ref.device)
    devs["translation"] = _max_dev(model(translate_batch(batch, shift)), ref + shift,
                                   rtol, atol, "translation")
    permuted, inverse = permute_batch(batch, seed)
    devs["permutation"] = _max_dev(model(permuted)[:, inverse], ref, rtol, atol, "permutation")
    motion = float((ref - batch[K.POS].unsqueeze(0)).abs().max())
    return EquivarianceReport(motion=motion, **devs)


@torch.no_grad()
def check_batch_independence(model: Callable[[Batch], torch.Tensor], batch: Batch,
                             tolerances: dict | None = None) -> None:
    """Assert that a multi-system batch gives the same outputs as one call per system."""
    rtol, atol = (tolerances or TOLERANCES)[batch[K.POS].dtype]
    joint = model(batch)
    graph = batch[K.GRAPH]
    for b in range(int(batch[K.N_GRAPHS])):
        alone = model(select_systems(batch, [b]))
        _max_dev(joint[:, graph == b], alone, rtol, atol, f"system {b} alone vs in batch")


__all__ = [
    "TOLERANCES", "EquivarianceReport", "check_batch_independence", "check_equivariance",
    "perturb_parameters", "permute_batch", "random_batch", "random_orthogonal", "rotate_batch",
    "select_systems", "translate_batch",
]
