"""Error and physical-validity metrics.

Position errors follow EGNO/PAINET: **Å² per atom** = squared distance summed over x, y, z and
averaged over atoms (for residue nodes: over their N, CA, C, O atoms). F-MSE is that error at the
last output frame, A-MSE its mean over the P output frames. (ESTAG's tables also average over the
three coordinates: a factor 3 smaller.)

Validity measures take numpy positions (..., atoms, 3) in Å and need no MD engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from surrogate_md.data.h5md import Topology, chain_index_of, residue_index_of
from surrogate_md.data.selection import residue_code

METRIC_DEFINITION = ("Å² per atom: squared distance summed over x, y, z, averaged over atoms "
                     "(F-MSE: last output frame; A-MSE: mean over the P output frames)")


@dataclass
class ErrorSums:
    """Running sums for F-MSE/A-MSE: per output time, squared error summed over atoms and xyz.

    Attributes:
        per_time: (P,) float64 sum over atoms of squared distance, Å².
        atoms: atoms counted (per output time).
    """

    per_time: np.ndarray = field(default_factory=lambda: np.zeros(0))
    atoms: int = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred``/``target`` (P, N, C, 3) Å."""
        sq = ((pred.detach().to(torch.float64) - target.to(torch.float64)) ** 2).sum(-1)
        sums = sq.reshape(sq.shape[0], -1).sum(1).cpu().numpy()
        self.per_time = sums if self.per_time.size == 0 else self.per_time + sums
        self.atoms += int(sq[0].numel())

    def merge(self, other: ErrorSums) -> None:
        if other.atoms == 0:
            return
        self.per_time = other.per_time.copy() if self.per_time.size == 0 else \
            self.per_time + other.per_time
        self.atoms += other.atoms

    @property
    def mse_per_time(self) -> np.ndarray:
        """(P,) Å² per atom at each output time."""
        return self.per_time / max(self.atoms, 1)

    @property
    def fmse(self) -> float:
        return float(self.mse_per_time[-1]) if self.atoms else float("nan")

    @property
    def amse(self) -> float:
        return float(self.mse_per_time.mean()) if self.atoms else float("nan")


def batch_amse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Differentiable A-MSE of a batch, Å² per atom: (P, N, C, 3) x 2 -> ()."""
    return ((pred - target.to(pred.dtype)) ** 2).sum(-1).mean()


def per_frame_sq_error(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(..., atoms, 3) x 2 -> (...,) Å² per atom."""
    return ((np.asarray(pred) - np.asarray(ref)) ** 2).sum(-1).mean(-1)


# -- physical validity -----------------------------------------------------------------------
def dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> np.ndarray:
    """Dihedral angle (degrees, -180..180) of four points (..., 3) each (IUPAC sign)."""
    b0 = p0 - p1
    b1 = p2 - p1
    b2 = p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    x = (v * w).sum(-1)
    y = (np.cross(b1n, v) * w).sum(-1)
    return np.degrees(np.arctan2(y, x))


def backbone_torsion_atoms(topology: Topology, atoms: np.ndarray | None = None
                           ) -> dict[str, np.ndarray]:
    """Atom quadruples for backbone phi and psi, from N/CA/C names of consecutive residues.

    phi(i) = C(i-1), N(i), CA(i), C(i); psi(i) = N(i), CA(i), C(i), N(i+1), for residues of one
    chain (:meth:`Topology.chain_index`) whose numbers differ by one and, when the topology lists
    peptide bonds (C to N of another residue), whose C(i-1)/C(i) and N(i)/N(i+1) are bonded: as
    in :func:`ca_pairs_of`, that keeps chains apart where the numbering runs on from one chain
    into the next under one segment id (an Amber prmtop of a dimer). ``atoms`` (optional)
    restricts to these atom indices and returns quadruples as positions in ``atoms``.

    Returns:
        {"phi": (n, 4) int, "psi": (m, 4) int}
    """
    names = np.char.upper(topology.atom_names.astype(str))
    allowed = np.arange(topology.n_atoms) if atoms is None else np.asarray(atoms)
    where = {int(a): k for k, a in enumerate(allowed)}
    chain = topology.chain_index()
    residue = topology.residue_index()
    peptide = set()
    for a, b in np.asarray(topology.bonds, dtype=np.int64).reshape(-1, 2).tolist():
        if names[a] == "N" and names[b] == "C":
            a, b = b, a
        if names[a] == "C" and names[b] == "N" and residue[a] != residue[b]:
            peptide.add((a, b))

    def joined(c: int, n: int) -> bool:
        return (c, n) in peptide if peptide else True

    table: dict[tuple[int, int], dict[str, int]] = {}
    for a in allowed:
        name = names[a]
        if name in ("N", "CA", "C"):
            key = (int(chain[a]), int(topology.residue_ids[a]))
            table.setdefault(key, {}).setdefault(name, int(a))
    phi, psi = [], []
    for (seg, res), here in table.items():
        if not all(n in here for n in ("N", "CA", "C")):
            continue
        prev = table.get((seg, res - 1), {})
        nxt = table.get((seg, res + 1), {})
        if "C" in prev and joined(prev["C"], here["N"]):
            phi.append([prev["C"], here["N"], here["CA"], here["C"]])
        if "N" in nxt and joined(here["C"], nxt["N"]):
            psi.append([here["N"], here["CA"], here["C"], nxt["N"]])

    def local(q: list) -> np.ndarray:
        return np.array([[where[a] for a in row] for row in q], dtype=np.int64).reshape(-1, 4)

    return {"phi": local(phi), "psi": local(psi)}


def torsions(frames: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """(F, atoms, 3), (n, 4) -> (F, n) degrees."""
    if len(quads) == 0:
        return np.zeros((len(frames), 0))
    return dihedral(*(frames[:, quads[:, k]] for k in range(4)))


def js_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    """Jensen–Shannon divergence (natural log, 0..ln 2) of two histograms (any shape)."""
    p = np.asarray(p, dtype=np.float64).ravel() + eps
    q = np.asarray(q, dtype=np.float64).ravel() + eps
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return float(0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())


def torsion_histogram(phi: np.ndarray, psi: np.ndarray, bins: int = 36) -> np.ndarray:
    """2-D (phi, psi) histogram over -180..180 degrees, normalised to sum 1."""
    h, _, _ = np.histogram2d(np.ravel(phi), np.ravel(psi), bins=bins,
                             range=[[-180, 180], [-180, 180]])
    return h / max(h.sum(), 1)


def _pair_distances(frames: np.ndarray, max_atoms: int, seed: int):
    """Yield the (pairs,) distances of each frame (F, atoms, 3), over a fixed random subset of
    ``max_atoms`` atoms for large systems (the same subset for the same ``seed`` and count)."""
    n = frames.shape[1]
    if n > max_atoms:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=max_atoms, replace=False))
        frames = frames[:, pick]
        n = max_atoms
    i, j = np.triu_indices(n, k=1)
    for f in frames:
        yield np.linalg.norm(f[i] - f[j], axis=-1)


def distance_histogram(frames: np.ndarray, bins: np.ndarray, max_atoms: int = 400,
                       seed: int = 0) -> np.ndarray:
    """Normalised histogram h(r) of pairwise distances (Å) over ``frames`` (F, atoms, 3).

    Large systems use a fixed random subset of ``max_atoms`` atoms (same subset for every call
    with the same ``seed`` and atom count), so the cost stays bounded.

    What an h(r) MAE built on it sees and does not see: pairs beyond ``bins[-1]`` are dropped
    and the histogram is normalised over the pairs left (all zeros when none is left), so it
    compares the *shape* of the distances inside the range only. A structure that blows apart
    loses its far pairs from the histogram instead of showing them, and the MAE of two sum-1
    histograms over n bins is at most 2/n (0.01 for 200 bins) however far apart they are: pair
    it with :func:`fraction_pairs_beyond` (the share of pairs the histogram dropped).
    """
    total = np.zeros(len(bins) - 1)
    for d in _pair_distances(frames, max_atoms, seed):
        total += np.histogram(d, bins=bins)[0]
    return total / max(total.sum(), 1)


def fraction_pairs_beyond(frames: np.ndarray, max_A: float, max_atoms: int = 400,
                          seed: int = 0) -> float:
    """Fraction of atom pairs (over all ``frames`` (F, atoms, 3)) farther apart than ``max_A``
    Å: the pairs :func:`distance_histogram` with ``bins[-1] = max_A`` leaves out (same atom
    subset for the same ``max_atoms`` and ``seed``). NaN for no frames or fewer than 2 atoms."""
    beyond, pairs = 0, 0
    for d in _pair_distances(frames, max_atoms, seed):
        beyond += int((d > max_A).sum())
        pairs += len(d)
    return beyond / pairs if pairs else float("nan")


def chain_breaks(frames: np.ndarray, ca_pairs: np.ndarray, max_A: float = 4.5) -> np.ndarray:
    """(F,) number of consecutive CA–CA(i, i+1) distances above ``max_A`` Å per frame."""
    if len(ca_pairs) == 0:
        return np.zeros(len(frames), dtype=np.int64)
    d = np.linalg.norm(frames[:, ca_pairs[:, 0]] - frames[:, ca_pairs[:, 1]], axis=-1)
    return (d > max_A).sum(axis=1)


def ca_pairs_of(atom_names, residue_ids, residue_names, segment_ids=None,
                bonds=None) -> np.ndarray:
    """(K, 2) atom pairs CA(i), CA(i+1) of consecutive amino-acid residues of one chain.

    Residues and chains are those of :func:`~surrogate_md.data.h5md.residue_index_of` and
    :func:`~surrogate_md.data.h5md.chain_index_of`. Two residues of a chain are consecutive when
    the bonds join C(i) to N(i+1), or, for a topology without peptide bonds (none listed, or a
    coarse-grained one), when they are numbered n and n + 1. The bond test keeps chains apart
    even where their segment ids are missing and the numbering runs on from one chain into the
    next; only amino acids count, so a calcium ion (atom and residue ``CA``) is never a CA.

    Args: per-atom arrays (N,) of names, residue numbers, residue names and segment ids (or
    None), and bonds (B, 2) atom index pairs (or None).
    """
    names = np.char.upper(np.asarray(atom_names, dtype=str))
    if len(names) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    res_ids = np.asarray(residue_ids, dtype=np.int64)
    residue = residue_index_of(res_ids, segment_ids)
    chain = chain_index_of(res_ids, segment_ids)
    res_names = np.asarray(residue_names, dtype=str)
    bonds = np.asarray([] if bonds is None else bonds, dtype=np.int64).reshape(-1, 2)
    peptide = set()
    for a, b in bonds:
        if names[a] == "N" and names[b] == "C":
            a, b = b, a
        if names[a] == "C" and names[b] == "N":
            peptide.add((int(residue[a]), int(residue[b])))
    ca = [int(i) for i in np.nonzero(names == "CA")[0] if residue_code(res_names[i])]
    pairs = [(a, b) for a, b in zip(ca[:-1], ca[1:]) if chain[a] == chain[b] and (
        (int(residue[a]), int(residue[b])) in peptide if peptide
        else res_ids[b] - res_ids[a] == 1)]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def consecutive_ca_pairs(topology: Topology, atoms: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) positions (in ``atoms``) of CA atoms of consecutive residues of one chain, found
    on the whole topology by :func:`ca_pairs_of` (so peptide bonds to atoms outside ``atoms``
    still count); pairs with an atom outside ``atoms`` are left out."""
    pairs = ca_pairs_of(topology.atom_names, topology.residue_ids, topology.residue_names,
                        topology.segment_ids, topology.bonds)
    if atoms is None:
        return pairs
    atoms = np.asarray(atoms, dtype=np.int64)
    where = np.full(topology.n_atoms, -1, dtype=np.int64)
    where[atoms[::-1]] = np.arange(len(atoms))[::-1]  # the first place an atom appears
    mapped = where[pairs]
    return mapped[(mapped >= 0).all(axis=1)].reshape(-1, 2)


__all__ = ["METRIC_DEFINITION", "ErrorSums", "backbone_torsion_atoms", "batch_amse",
           "ca_pairs_of", "chain_breaks", "consecutive_ca_pairs", "dihedral", "distance_histogram",
           "fraction_pairs_beyond", "js_divergence", "per_frame_sq_error", "torsion_histogram",
           "torsions"]
