"""Which atoms become model nodes.

A :class:`NodeSelection` maps model nodes to atoms of the full system: ``index`` is (nodes, C)
with C = 1 for atom nodes and C = 4 for residue nodes (N, CA, C, O). Names:

- ``all``: every atom; ``heavy``: every atom except hydrogens (and virtual sites, atomic
  number 0);
- ``backbone``: protein backbone atoms N, CA, C, O (as MDAnalysis' ``backbone``, without the
  caps ACE and NME);
- ``ca``: alpha carbons;
- ``residues``: one 4-channel node per residue having all of N, CA, C, O.

Protein residues are the 20 amino acids under the names force fields give them: protonation
states (Amber HID/HIE/HIP, CHARMM HSD/HSE/HSP, GROMACS HISD/HISE/HISH, CYS2, LYSH, ASPH, GLUH...)
and Amber's terminal residues (NALA, CALA, ...) count as their parent amino acid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from surrogate_md.data.h5md import Topology
from surrogate_md.errors import DataError

SELECTIONS = ("all", "heavy", "backbone", "ca", "residues")
BACKBONE_NAMES = ("N", "CA", "C", "O")
AMINO_ACIDS = ("ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL"
               ).split()
# Protonation variants used by common force fields (Amber, CHARMM, GROMACS/GROMOS/OPLS; the
# names of MDAnalysis' protein list) map to their parent residue.
_ALIASES = {**dict.fromkeys(("HID", "HIE", "HIP", "HSD", "HSE", "HSP", "HISD", "HISE", "HISH",
                             "HISA", "HISB", "HIS1", "HIS2"), "HIS"),
            **dict.fromkeys(("CYX", "CYM", "CYS1", "CYS2", "CYSH"), "CYS"),
            **dict.fromkeys(("ASH", "ASPH"), "ASP"), **dict.fromkeys(("GLH", "GLUH"), "GLU"),
            **dict.fromkeys(("LYN", "LYSH"), "LYS"), "ARGN": "ARG", "ASN1": "ASN",
            "ALAD": "ALA", "MSE": "MET"}
# residue names of water and of monatomic ions in common force fields (Amber, CHARMM, GROMACS)
WATER_RESIDUES = frozenset("HOH WAT SOL TIP3 TIP3P TIP4 TIP4P TIP5 TIP5P SPC SPCE T3P T4P".split())
ION_RESIDUES = frozenset("NA NA+ CL CL- K K+ SOD CLA POT MG CAL CS LI RB ZN".split())
RESIDUE_TYPE_OFFSET = 100  # node types of residue nodes: 100 + 1..20 (0 = unknown residue)


def parent_residue(name: str) -> str:
    """The amino acid a residue name stands for (``"HISD"`` and ``"NHIE"`` -> ``"HIS"``), or the
    name itself (upper case) when it is none."""
    name = name.strip().upper()
    parent = _ALIASES.get(name, name)
    if parent not in AMINO_ACIDS and len(name) == 4 and name[0] in "NC":
        # Amber's N- and C-terminal residues: NALA, CALA, NHIE, CCYX ...
        inner = _ALIASES.get(name[1:], name[1:])
        if inner in AMINO_ACIDS:
            return inner
    return parent


def residue_code(name: str) -> int:
    """1..20 for the standard amino acids (under any of their force-field names, see the module
    doc), 0 otherwise."""
    name = parent_residue(name)
    return AMINO_ACIDS.index(name) + 1 if name in AMINO_ACIDS else 0


@dataclass(frozen=True)
class NodeSelection:
    """Model nodes as atoms of the full system.

    Attributes:
        name: selection name (one of :data:`SELECTIONS`).
        index: (nodes, C) int atom indices into the full system.
        node_type: (nodes,) int: atomic number, or 100 + residue code for residue nodes.
        mass: (nodes,) float amu (summed over channels).
        n_atoms_total: atom count of the full system the selection was made on.
    """

    name: str
    index: np.ndarray
    node_type: np.ndarray
    mass: np.ndarray
    n_atoms_total: int

    @property
    def n_nodes(self) -> int:
        return int(self.index.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.index.shape[1])

    @property
    def atom_index(self) -> np.ndarray:
        """(nodes * C,) flat atom indices (node-major)."""
        return self.index.reshape(-1)

    def gather(self, frames: np.ndarray) -> np.ndarray:
        """(..., atoms, 3) full-system array -> (..., nodes, C, 3)."""
        return frames[..., self.index, :]

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index.tolist(),
                "node_type": self.node_type.tolist(), "mass": self.mass.tolist(),
                "n_atoms_total": self.n_atoms_total}

    @classmethod
    def from_dict(cls, d: dict) -> NodeSelection:
        return cls(d["name"], np.asarray(d["index"], dtype=np.int64).reshape(len(d["index"]), -1),
                   np.asarray(d["node_type"], dtype=np.int64), np.asarray(d["mass"]),
                   int(d["n_atoms_total"]))


def select_nodes(topology: Topology, name: str = "all", *, source: str = "") -> NodeSelection:
    """Build the named selection on ``topology`` (``source`` names the file in errors)."""
    where = f"{source}: " if source else ""
    z = topology.atomic_numbers
    names = np.char.upper(topology.atom_names.astype(str))
    if name == "all":
        idx = np.arange(topology.n_atoms)
    elif name == "heavy":
        idx = np.nonzero(z > 1)[0]  # no hydrogens, no virtual sites (0: TIP4P's M, ...)
    elif name == "backbone":
        idx = np.nonzero(np.isin(names, BACKBONE_NAMES) & _is_protein(topology))[0]
    elif name == "ca":
        idx = np.nonzero((names == "CA") & _is_protein(topology))[0]
    elif name == "residues":
        return _residue_nodes(topology, where)
    else:
        raise DataError(f"{where}unknown atom selection {name!r}; choose one of {SELECTIONS}")
    if len(idx) == 0:
        raise DataError(f"{where}selection {name!r} matches no atoms; choose another selection "
                        f"(the system has residues {sorted(set(topology.residue_names))[:5]})")
    return NodeSelection(name, idx.reshape(-1, 1), z[idx], topology.masses[idx], topology.n_atoms)


def _is_protein(topology: Topology) -> np.ndarray:
    return np.array([residue_code(r) > 0 for r in topology.residue_names], dtype=bool)


def _residue_nodes(topology: Topology, where: str) -> NodeSelection:
    names = np.char.upper(topology.atom_names.astype(str))
    residue = topology.residue_index()
    starts = np.flatnonzero(np.diff(residue, prepend=-1))
    rows, types = [], []
    for start, stop in zip(starts, [*starts[1:], topology.n_atoms]):
        members = np.arange(start, stop)
        found = [members[names[members] == b] for b in BACKBONE_NAMES]
        if all(len(f) for f in found):
            rows.append([int(f[0]) for f in found])
            types.append(RESIDUE_TYPE_OFFSET + residue_code(topology.residue_names[start]))
    if not rows:
        raise DataError(f"{where}selection 'residues' found no residue with all of N, CA, C, O; "
                        "use an atom selection for non-protein systems")
    index = np.asarray(rows, dtype=np.int64)
    return NodeSelection("residues", index, np.asarray(types, dtype=np.int64),
                         topology.masses[index].sum(axis=1), topology.n_atoms)
