"""Physical-validity measures shared by training (tolerances), evaluation and the guards.

All positions are Å. Functions take numpy arrays and never need an MD engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from surrogate_md.data.graphs import bond_edges, radius_edges


def bond_lengths(positions: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """(..., atoms, 3), (B, 2) -> (..., B) bond lengths in Å."""
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    d = positions[..., bonds[:, 0], :] - positions[..., bonds[:, 1], :]
    return np.linalg.norm(d, axis=-1)


def min_nonbonded_distance(positions: np.ndarray, bonds: np.ndarray, cutoff_A: float = 4.0,
                           exclude_hops: int = 2, excluded: np.ndarray | None = None) -> float:
    """Smallest distance between atoms that are more than ``exclude_hops`` (1 or 2) bonds apart.

    Uses the radius graph (k-d tree on CPU, no N x N matrix); returns ``cutoff_A`` if no such
    pair is closer.
    Args: positions (atoms, 3) Å, bonds (B, 2); ``excluded`` = :func:`excluded_pairs` of the
    bonds, to skip recomputing it when called every frame.
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    edges = radius_edges(torch.from_numpy(pos), cutoff_A).numpy()
    i, j = edges[1], edges[0]
    keep = i < j
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return float(cutoff_A)
    if excluded is None:
        excluded = excluded_pairs(bonds, n, exclude_hops)
    keys = i.astype(np.int64) * n + j
    if len(excluded):  # sorted keys: a binary search beats np.isin's sort of both arrays
        at = np.searchsorted(excluded, keys).clip(max=len(excluded) - 1)
        mask = excluded[at] != keys
    else:
        mask = np.ones(len(keys), dtype=bool)
    if not mask.any():
        return float(cutoff_A)
    return float(np.linalg.norm(pos[i[mask]] - pos[j[mask]], axis=1).min())


def radius_of_gyration(positions: np.ndarray) -> np.ndarray:
    """(..., atoms, 3) Å -> (...) radius of gyration in Å (unweighted: the root-mean-square
    distance of the atoms from their centroid)."""
    x = np.asarray(positions, dtype=np.float64)
    return np.sqrt(((x - x.mean(axis=-2, keepdims=True)) ** 2).sum(-1).mean(-1))


def gyration_summary(model: np.ndarray, reference: np.ndarray,
                     allowed: tuple[float, float] | None) -> dict:
    """The size of a rollout against reference MD, as the guards' size check sees it.

    Args:
        model: (F, atoms, 3) Å, the rollout's frames (non-finite frames are left out).
        reference: (R, atoms, 3) Å, reference MD frames of the same atoms.
        allowed: (smallest, largest) radius of gyration in Å the size check passes
            (``ValidityReference.gyration_range_A``); None: no range, no fractions.
    Returns: JSON-safe dict: ``model_``/``reference_`` ``mean``, ``min``, ``max`` (Å), ``allowed``
    and ``model_outside_fraction``/``reference_outside_fraction``, the fraction of frames the
    size check would fail (compacted or swollen; None without a range).
    """
    out: dict = {}
    for name, frames in (("model", model), ("reference", reference)):
        x = np.asarray(frames, dtype=np.float64)
        rg = radius_of_gyration(x[np.isfinite(x).all(axis=(-2, -1))])
        if len(rg) == 0:
            out.update({f"{name}_mean": None, f"{name}_min": None, f"{name}_max": None,
                        f"{name}_outside_fraction": None})
            continue
        out.update({f"{name}_mean": float(rg.mean()), f"{name}_min": float(rg.min()),
                    f"{name}_max": float(rg.max()),
                    f"{name}_outside_fraction": None if allowed is None else float(
                        ((rg < allowed[0]) | (rg > allowed[1])).mean())})
    out["allowed"] = None if allowed is None else [float(a) for a in allowed]
    return out


def excluded_pairs(bonds: np.ndarray, n: int, hops: int = 2) -> np.ndarray:
    """Sorted keys i*n+j (i<j) of atom pairs within ``hops`` (1 or 2) bonds of each other."""
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    if len(bonds) == 0 or hops < 1:
        return np.zeros(0, dtype=np.int64)
    if hops > 2:
        raise ValueError("exclude_hops must be 1 or 2")
    edges, _ = bond_edges(bonds, n, two_hop=hops == 2)
    a, b = edges.numpy()
    keep = a < b
    return np.unique(a[keep] * n + b[keep])


@dataclass
class ValidityReference:
    """Tolerances learned from reference frames, stored with a model and used by the guards.

    Attributes:
        bonds: (B, 2) node/atom index pairs the model predicts.
        bond_length_mean_A: (B,) mean length in the reference.
        bond_tolerance_A: largest allowed |length - mean| (max seen in the reference + margin).
        min_distance_A: smallest allowed non-bonded distance (min seen in reference x factor).
        gyration_range_A: (smallest, largest) allowed radius of gyration of the model atoms:
            the range seen in the reference widened on each side by ``gyration_margin`` of its
            width, at least 5 % of the mean (None: a reference of an older release, no check).
    """

    bonds: np.ndarray
    bond_length_mean_A: np.ndarray
    bond_tolerance_A: float
    min_distance_A: float
    gyration_range_A: tuple[float, float] | None = None

    @classmethod
    def from_frames(cls, frames: np.ndarray, bonds: np.ndarray, *, margin_A: float = 0.25,
                    clash_factor: float = 0.75, gyration_margin: float = 0.5
                    ) -> ValidityReference:
        """Tolerances from reference frames (F, atoms, 3) Å (a few hundred frames suffice).

        The radius-of-gyration range catches a run that compacts or swells the molecule step by
        step while every bond and contact stays in tolerance (a deterministic AdK model took the
        backbone from 19 to 14.5 Å in 100 jumps, the MD staying at 18.3-20.5 Å); the margin
        allows for a longer run reaching further into the tails than the reference frames
        did."""
        bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
        if len(bonds):
            lengths = bond_lengths(frames, bonds)
            mean = lengths.mean(axis=0)
            tol = float(np.abs(lengths - mean).max()) + margin_A
        else:
            mean, tol = np.zeros(0), float("inf")
        step = max(1, len(frames) // 20)
        excluded = excluded_pairs(bonds, frames.shape[1])
        dmin = min(min_nonbonded_distance(f, bonds, excluded=excluded) for f in frames[::step])
        rg = radius_of_gyration(frames)
        widen = max(gyration_margin * float(rg.max() - rg.min()), 0.05 * float(rg.mean()))
        gyration = (max(float(rg.min()) - widen, 0.0), float(rg.max()) + widen)
        return cls(bonds, mean, tol, float(dmin * clash_factor), gyration)

    def bond_deviation(self, positions: np.ndarray) -> float:
        """Largest |bond length - reference mean| in Å for (atoms, 3) positions."""
        if len(self.bonds) == 0:
            return 0.0
        return float(np.abs(bond_lengths(positions, self.bonds) - self.bond_length_mean_A).max())

    def min_distance(self, positions: np.ndarray, cutoff_A: float = 4.0) -> float:
        """Smallest non-bonded (beyond two bonds) distance in Å for (atoms, 3) positions."""
        n = len(positions)
        if getattr(self, "_excluded_n", None) != n:
            self._excluded = excluded_pairs(self.bonds, n)
            self._excluded_n = n
        return min_nonbonded_distance(positions, self.bonds, cutoff_A, excluded=self._excluded)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bonds"] = self.bonds.tolist()
        d["bond_length_mean_A"] = self.bond_length_mean_A.tolist()
        d["gyration_range_A"] = (None if self.gyration_range_A is None
                                 else [float(v) for v in self.gyration_range_A])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ValidityReference:
        return cls(np.asarray(d["bonds"], dtype=np.int64).reshape(-1, 2),
                   np.asarray(d["bond_length_mean_A"], dtype=np.float64),
                   float(d["bond_tolerance_A"]), float(d["min_distance_A"]),
                   None if d.get("gyration_range_A") is None
                   else (float(d["gyration_range_A"][0]), float(d["gyration_range_A"][1])))
