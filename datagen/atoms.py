"""Atom bookkeeping shared by the readers and engines: elements, bonds, selections.

Element data come from ASE's tables (``ase.data``); selections use MDAnalysis' selection language
on any :class:`~surrogate_md.data.h5md.Topology`, so ``--select "not name H*"`` means the same for
an MD17 file, an ASE trajectory and a PSF.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from surrogate_md.data.h5md import Topology
from surrogate_md.errors import DataError

log = logging.getLogger(__name__)

#: Two atoms are bonded when closer than this factor times the sum of their covalent radii.
BOND_SCALE = 1.2


def atomic_numbers_from_symbols(symbols) -> np.ndarray:
    """(N,) atomic numbers from element symbols (any case); 0 where the symbol is unknown."""
    from ase.data import atomic_numbers

    out = np.zeros(len(symbols), dtype=np.int64)
    for i, s in enumerate(symbols):
        s = str(s).strip()
        out[i] = atomic_numbers.get(s[:1].upper() + s[1:].lower(), 0)
    return out


def atomic_numbers_from_masses(masses: np.ndarray, tolerance_amu: float = 0.6) -> np.ndarray:
    """(N,) atomic numbers of the elements whose standard mass is within ``tolerance_amu``.

    Robust for force-field topologies (PSF, TPR, prmtop) that carry masses but no elements; 0 for
    virtual sites (mass 0) and unmatched masses (e.g. hydrogen-mass-repartitioned atoms).
    """
    from ase.data import atomic_masses

    masses = np.asarray(masses, dtype=np.float64)
    table = np.asarray(atomic_masses[1:87])
    idx = np.abs(masses[:, None] - table[None, :]).argmin(axis=1)
    z = idx + 1
    z[np.abs(table[idx] - masses) > tolerance_amu] = 0
    return z.astype(np.int64)


def atomic_numbers_from_names(names) -> np.ndarray:
    """(N,) atomic numbers guessed from atom names by MDAnalysis' default guesser ("CA" -> C,
    "HB1" -> H, "SOD" -> Na); 0 where it finds no element."""
    from MDAnalysis.guesser.default_guesser import DefaultGuesser

    guesser = DefaultGuesser(None)
    symbols = []
    for name in names:
        try:
            symbols.append(guesser.guess_atom_element(str(name)))
        except Exception:  # an unguessable name
            symbols.append("")
    return atomic_numbers_from_symbols(symbols)


def standard_masses(atomic_numbers: np.ndarray) -> np.ndarray:
    """(N,) standard atomic masses in amu (ASE's table)."""
    from ase.data import atomic_masses

    return np.asarray(atomic_masses)[np.asarray(atomic_numbers, dtype=np.int64)].astype(np.float64)


def infer_bonds(atomic_numbers: np.ndarray, positions_A: np.ndarray,
                scale: float = BOND_SCALE) -> np.ndarray:
    """Bonds from one frame by the covalent-radii rule ``d < scale * (r_i + r_j)``.

    Args:
        atomic_numbers: (N,) int.
        positions_A: (N, 3) Å, a frame where molecules are whole.
        scale: tolerance factor on the sum of covalent radii (ASE's table).

    Returns:
        (B, 2) int64 index pairs with i < j, sorted.
    """
    from ase.data import covalent_radii
    from scipy.spatial import cKDTree

    z = np.asarray(atomic_numbers, dtype=np.int64)
    if len(z) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    x = np.asarray(positions_A, dtype=np.float64)
    radii = scale * np.asarray(covalent_radii)[np.where(z > 0, z, 1)]
    radii[z == 0] = 0.0
    # candidate pairs within the largest possible bond length (a k-d tree: O(N log N) time and
    # O(bonds) memory, also for proteins in water), then the per-pair covalent-radii rule
    pairs = cKDTree(x).query_pairs(2.0 * float(radii.max()), output_type="ndarray")
    if len(pairs):
        d = np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1)
        pairs = pairs[d < radii[pairs[:, 0]] + radii[pairs[:, 1]]]
    bonds = np.sort(pairs, axis=1).astype(np.int64).reshape(-1, 2)
    return bonds[np.lexsort((bonds[:, 1], bonds[:, 0]))] if len(bonds) else bonds


def infer_bonds_periodic(atomic_numbers: np.ndarray, positions_A: np.ndarray, cell_A: np.ndarray,
                         pbc, scale: float = BOND_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Bonds by the covalent-radii rule under the minimum-image convention.

    Args:
        atomic_numbers: (N,) int.
        positions_A: (N, 3) Å, possibly wrapped into the cell.
        cell_A: (3, 3) Å, cell vectors as rows.
        pbc: (3,) bool, the periodic directions.
        scale: tolerance factor on the sum of covalent radii (ASE's table).

    Returns:
        ``bonds`` (B, 2) int64 pairs with i < j, sorted, and ``vectors`` (B, 3) Å, the shortest
        image of ``x[j] - x[i]`` for each bond. An atom bonded to its own image, or two atoms
        bonded through more than one image (a network that spans the cell), gives pairs whose
        vectors do not add up around a cycle; :func:`make_whole` detects that.
    """
    from ase.data import covalent_radii
    from ase.neighborlist import primitive_neighbor_list

    z = np.asarray(atomic_numbers, dtype=np.int64)
    radii = scale * np.asarray(covalent_radii)[np.where(z > 0, z, 1)]
    radii[z == 0] = 0.0
    i, j, vec = primitive_neighbor_list("ijD", np.asarray(pbc, dtype=bool),
                                        np.asarray(cell_A, dtype=np.float64),
                                        np.asarray(positions_A, dtype=np.float64), radii,
                                        self_interaction=False)
    keep = i < j
    i, j, vec = i[keep], j[keep], vec[keep]
    order = np.lexsort((j, i))
    bonds = np.stack([i[order], j[order]], axis=1).astype(np.int64).reshape(-1, 2)
    return bonds, vec[order].reshape(-1, 3)


def make_whole(positions_A: np.ndarray, bonds: np.ndarray, vectors_A: np.ndarray
               ) -> np.ndarray | None:
    """Positions with every molecule whole: each bonded atom placed at its bond partner plus the
    bond vector (a spanning tree of each molecule from its first atom).

    Args:
        positions_A: (N, 3) Å.
        bonds: (B, 2) pairs; vectors_A: (B, 3) Å, ``x[j] - x[i]`` of each bond.

    Returns:
        (N, 3) Å, or ``None`` when the bonds do not close on themselves (a pair bonded through
        two images, or a cycle around the cell: a crystal or polymer spanning the box, which has
        no whole form).
    """
    x = np.asarray(positions_A, dtype=np.float64).copy()
    n = len(x)
    neighbours: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for (a, b), v in zip(np.asarray(bonds).tolist(), np.asarray(vectors_A)):
        neighbours[a].append((b, v))
        neighbours[b].append((a, -v))
    placed = np.zeros(n, dtype=bool)
    for root in range(n):
        if placed[root]:
            continue
        placed[root] = True
        stack = [root]
        while stack:
            a = stack.pop()
            for b, v in neighbours[a]:
                if not placed[b]:
                    x[b] = x[a] + v
                    placed[b] = True
                    stack.append(b)
    if len(bonds):
        b = np.asarray(bonds)
        if not np.allclose(x[b[:, 1]] - x[b[:, 0]], vectors_A, atol=1e-6):
            return None
    return x


def select_indices(topology: Topology, select: str | None, source: str | os.PathLike) -> np.ndarray:
    """Indices of the atoms of ``topology`` matching the MDAnalysis selection ``select``.

    ``None`` selects every atom. Raises :class:`DataError` naming ``source`` when the selection is
    invalid or empty.
    """
    n = topology.n_atoms
    if select is None:
        return np.arange(n)
    import MDAnalysis as mda

    # residues as runs of atoms (chains that restart their numbering stay apart)
    res_index = topology.residue_index()
    first = np.unique(res_index, return_index=True)[1]
    res_ids = topology.residue_ids[first]
    u = mda.Universe.empty(n, n_residues=len(first), atom_resindex=res_index,
                           trajectory=False)
    u.add_TopologyAttr("names", topology.atom_names)
    u.add_TopologyAttr("elements", topology.elements)
    u.add_TopologyAttr("types", topology.elements)
    u.add_TopologyAttr("masses", topology.masses)
    u.add_TopologyAttr("resids", res_ids)
    u.add_TopologyAttr("resnames", topology.residue_names[first])
    if len(topology.bonds):
        u.add_TopologyAttr("bonds", [tuple(b) for b in topology.bonds.tolist()])
    return selection_indices(u.atoms, select, source)


def selection_indices(atoms, select: str, source: str | os.PathLike) -> np.ndarray:
    """Indices (into ``atoms``' universe) of an MDAnalysis selection, with clear errors."""
    from MDAnalysis.exceptions import SelectionError

    try:
        group = atoms.select_atoms(select)
    except (SelectionError, ValueError, KeyError, AttributeError) as exc:
        raise DataError(f"{source}: invalid atom selection {select!r} ({exc}); use MDAnalysis "
                        "selection syntax, e.g. 'backbone', 'name CA', 'not name H*'") from exc
    if group.n_atoms == 0:
        raise DataError(f"{source}: the selection {select!r} matches no atom; check atom names "
                        "with MDAnalysis or choose another selection")
    return np.asarray(group.indices, dtype=np.int64)
