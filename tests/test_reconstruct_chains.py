"""Residues and chains of multi-chain proteins whose residue numbers restart in every chain.

One definition (``surrogate_md.data.h5md.residue_index_of`` / ``chain_index_of``) is shared by
side-chain reconstruction, the chain-break guard and the ``residues`` node selection.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from integrations.guards import GuardConfig, Guards, _consecutive_ca_pairs
from integrations.reconstruct import Reconstructor
from surrogate_md.data.h5md import Topology, chain_index_of, residue_index_of
from surrogate_md.data.selection import select_nodes

openmm = pytest.importorskip("openmm")


@functools.cache
def two_chains() -> tuple[Topology, np.ndarray]:
    """Two ACE-ALA-NME chains 20 Å apart, both with blank chain ids and residues 1, 2, 3
    (as OpenMM's Modeller and PDB files number them), parametrised with amber14."""
    from openmm import app, unit

    import datagen
    from datagen.openmm_md import PROTEIN_FORCEFIELD, topology_from_openmm

    pdb = app.PDBFile(str(datagen.__path__[0] + "/systems/alanine-dipeptide.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    x = np.asarray(pdb.positions.value_in_unit(unit.angstrom))
    modeller.add(pdb.topology, (x + [20.0, 0.0, 0.0]) * unit.angstrom)
    assert [c.id for c in modeller.topology.chains()] == [" ", " "]
    system = app.ForceField(*PROTEIN_FORCEFIELD).createSystem(modeller.topology)
    topo = topology_from_openmm(modeller.topology, system)
    return topo, np.asarray(modeller.positions.value_in_unit(unit.angstrom))


def test_residue_and_chain_index_follow_segments_and_restarts():
    res = [1, 1, 2, 2, 1, 1, 7, 7, 7]
    np.testing.assert_array_equal(residue_index_of(res), [0, 0, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(chain_index_of(res), [0, 0, 0, 0, 1, 1, 1, 1, 1])
    seg = ["A", "A", "A", "A", "A", "A", "B", "B", "B"]
    np.testing.assert_array_equal(chain_index_of(res, seg), [0, 0, 0, 0, 1, 1, 2, 2, 2])
    # the same residue number in two segments: two residues, two chains
    np.testing.assert_array_equal(residue_index_of([5, 5, 5], ["A", "A", "B"]), [0, 0, 1])
    np.testing.assert_array_equal(chain_index_of([5, 5, 5], ["A", "A", "B"]), [0, 0, 1])
    assert residue_index_of([]).shape == (0,)


def test_openmm_topology_gets_one_segment_id_per_chain():
    topo, _ = two_chains()
    assert list(np.unique(topo.segment_ids)) == ["0", "1"]
    np.testing.assert_array_equal(topo.chain_index(), np.repeat([0, 1], 22))
    np.testing.assert_array_equal(topo.residue_index(),
                                  np.repeat([0, 1, 2, 3, 4, 5], [6, 10, 6, 6, 10, 6]))


@pytest.mark.parametrize("segments", ["from the topology", "none (checkpoint topology)",
                                      "blank"])
def test_side_chains_follow_their_own_chain(segments):
    topo, x = two_chains()
    seg = {"from the topology": topo.segment_ids, "none (checkpoint topology)": None,
           "blank": np.full(topo.n_atoms, "")}[segments]
    backbone = select_nodes(topo, "backbone").atom_index
    rec = Reconstructor(topo.n_atoms, backbone, topo.bonds, topo.atomic_numbers,
                        topo.residue_ids, seg)
    a, b = np.arange(22), np.arange(22, 44)
    # chain A turns by 90 degrees about z and shifts; chain B stays where it is
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    moved = x.copy()
    moved[a] = x[a] @ rot.T + [1.0, 2.0, 3.0]
    out = rec(x, moved[backbone])
    np.testing.assert_allclose(out[b], x[b], atol=1e-9)  # chain B's CB, HB*, caps untouched
    np.testing.assert_allclose(out[a], moved[a], atol=1e-9)  # chain A's side chain rides along


def test_reconstructor_for_surrogate_reads_segment_ids_from_the_topology_dict():
    topo, x = two_chains()
    backbone = select_nodes(topo, "backbone").atom_index
    # both residues numbered 1 and adjacent: only the segment ids keep them apart
    res = np.ones(topo.n_atoms, dtype=np.int64)

    class Stub:
        n_atoms = topo.n_atoms
        model_atoms = backbone
        topology = {"bonds": topo.bonds.tolist(), "atomic_numbers": topo.atomic_numbers.tolist(),
                    "residue_ids": res.tolist(), "segment_ids": topo.segment_ids.tolist()}

    rec = Reconstructor.for_surrogate(Stub())
    moved = x.copy()
    moved[:22] += [5.0, 0.0, 0.0]
    out = rec(x, moved[backbone])
    np.testing.assert_allclose(out[22:], x[22:], atol=1e-9)
    np.testing.assert_allclose(out[:22], moved[:22], atol=1e-9)


def test_residue_nodes_per_chain_with_blank_segment_ids():
    topo, _ = two_chains()
    blank = Topology(topo.atomic_numbers, topo.masses, topo.atom_names, topo.residue_ids,
                     topo.residue_names, topo.bonds, np.full(topo.n_atoms, ""))
    nodes = select_nodes(blank, "residues")
    assert nodes.n_nodes == 2
    assert set(nodes.index[0]) < set(range(22)) and set(nodes.index[1]) < set(range(22, 44))


def _backbones(n_res: int, origin: np.ndarray) -> np.ndarray:
    """N, CA, C of ``n_res`` residues of an extended chain (CA-CA 3.8 Å) from ``origin``."""
    residue = np.array([[0.0, 0.0, 0.0], [1.45, 0.0, 0.0], [2.0, 1.4, 0.0]])
    return np.concatenate([residue + origin + [3.8 * i, 0.0, 0.0] for i in range(n_res)])


class _Stub:  # the attributes Guards reads
    validity = None

    def __init__(self, topology: dict) -> None:
        self.topology = topology
        self.n_atoms = len(topology["atom_names"])
        self.model_atoms = np.arange(self.n_atoms)


@pytest.mark.parametrize("numbering", ["restart, blank segments", "continuous, bonded, no segments",
                                       "continuous, segments, no bonds"])
def test_chain_break_guard_ignores_the_gap_between_chains(numbering):
    n = 3  # residues per chain; atoms N, CA, C
    res = {"restart, blank segments": [1, 2, 3] * 2}.get(numbering, [1, 2, 3, 4, 5, 6])
    topology = {"atom_names": ["N", "CA", "C"] * 2 * n, "residue_names": ["ALA"] * 6 * n,
                "residue_ids": np.repeat(res, 3).tolist(), "atomic_numbers": [7, 6, 6] * 2 * n}
    chain_bonds = [[3 * i, 3 * i + 1] for i in range(2 * n)] + \
        [[3 * i + 1, 3 * i + 2] for i in range(2 * n)] + \
        [[3 * i + 2, 3 * i + 3] for i in range(2 * n - 1) if i != n - 1]  # C(i)-N(i+1)
    if numbering != "continuous, segments, no bonds":
        topology["bonds"] = chain_bonds
    if numbering == "restart, blank segments":
        topology["segment_ids"] = [""] * 6 * n
    if numbering == "continuous, segments, no bonds":
        topology["segment_ids"] = ["A"] * 3 * n + ["B"] * 3 * n
    pairs = _consecutive_ca_pairs(topology)
    np.testing.assert_array_equal(pairs, [[1, 4], [4, 7], [10, 13], [13, 16]])
    x = np.concatenate([_backbones(n, np.zeros(3)), _backbones(n, np.array([0.0, 25.0, 0.0]))])
    guards = Guards(_Stub(topology), GuardConfig())
    assert guards.check(x) == []  # the 25 Å between the chains is no break
    x[12:] += [0.0, 0.0, 4.0]  # a real break inside chain B
    assert [e.check for e in guards.check(x)] == ["chain_break"]


@pytest.mark.parametrize("segments", ["distinct", "blank"])
def test_torsions_and_ca_pairs_stay_within_a_chain(segments):
    """Backbone torsions and CA pairs of the validity metrics: one phi and one psi per alanine
    (none bridging the chains, whose residue numbers both run 1, 2, 3), with distinct segment ids
    and with blank ones."""
    from surrogate_md.metrics import backbone_torsion_atoms, consecutive_ca_pairs

    topo, _ = two_chains()
    if segments == "blank":
        topo = dataclasses.replace(topo, segment_ids=np.full(topo.n_atoms, ""))
    quads = backbone_torsion_atoms(topo)
    assert quads["phi"].shape == (2, 4) and quads["psi"].shape == (2, 4)
    for q in (*quads["phi"], *quads["psi"]):
        assert len(set(topo.chain_index()[q])) == 1
    # ALA has the only CA of each chain: no CA pair at all, in particular none across the gap
    assert consecutive_ca_pairs(topo).shape == (0, 2)


def test_mdanalysis_selections_see_one_residue_per_chain_residue():
    from datagen.atoms import select_indices

    topo, _ = two_chains()
    picked = select_indices(topo, "resname ALA and name CA", "two chains")
    np.testing.assert_array_equal(picked, np.flatnonzero(topo.atom_names == "CA"))
    assert len(picked) == 2
    by_resid = select_indices(topo, "resid 2", "two chains")  # both chains' residue 2
    assert len(by_resid) == 20
    # six residues, not the three residue numbers: the fourth is chain B's ACE cap
    np.testing.assert_array_equal(select_indices(topo, "resindex 3", "two chains"),
                                  np.arange(22, 28))


def test_checkpoints_keep_segment_ids(tmp_path):
    """The topology a checkpoint carries keeps each chain's segment id, for reconstruction and
    the guards after loading."""
    from surrogate_md.checkpoint import build_payload, load_checkpoint, save_checkpoint
    from surrogate_md.data.windows import GraphBuilder, GraphSpec, Protocol
    from surrogate_md.models import build_model

    topo, x = two_chains()
    selection = select_nodes(topo, "backbone")
    graph = GraphBuilder.for_selection(GraphSpec(kind="radius", cutoff_A=8.0), selection,
                                       topo.bonds, selection.gather(x[None])[0])
    model = build_model("constant", {})
    model.set_normalisation(velocity_scale=1.0, displacement_scale=1.0, time_scale=1.0)
    payload = build_payload(model, protocol={**Protocol("s2t", 1, 1).to_dict(), "jump_ps": 1.0},
                            selection=selection, graph=graph, topology=topo)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "two-chains.pt", payload))["topology"]
    assert loaded["segment_ids"] == ["0"] * 22 + ["1"] * 22


def test_ca_pairs_of_two_adk_chains_numbered_on_with_a_calcium_ion():
    """The validity metrics and the guards share one CA-pair rule: on two copies of AdK (PSF with
    its bonds) numbered 1-214 and 215-428 with blank segment ids, then a calcium ion (atom and
    residue ``CA``) numbered 429, the pairs are the 2 x 213 peptide-bonded ones; neither the
    gap between the copies nor the ion is a pair (residue numbers alone would make both)."""
    mda = pytest.importorskip("MDAnalysis")
    datafiles = pytest.importorskip("MDAnalysisTests.datafiles")
    from datagen.ingest import _mda_topology
    from surrogate_md.metrics import ca_pairs_of, consecutive_ca_pairs

    u = mda.Universe(datafiles.PSF, datafiles.DCD)
    one = _mda_topology(u.atoms, Path(datafiles.PSF))
    n = one.n_atoms
    assert len(np.unique(one.residue_ids)) == 214 and len(one.bonds) > n  # bonds read from PSF
    names = [*one.atom_names, *one.atom_names, "CA"]
    res_ids = [*one.residue_ids, *(one.residue_ids + 214), 429]
    res_names = [*one.residue_names, *one.residue_names, "CA"]
    topo = Topology(np.r_[one.atomic_numbers, one.atomic_numbers, 20],
                    np.r_[one.masses, one.masses, 40.08], np.asarray(names),
                    np.asarray(res_ids), np.asarray(res_names),
                    np.concatenate([one.bonds, one.bonds + n]), np.full(2 * n + 1, ""))
    pairs = consecutive_ca_pairs(topo)
    ca = np.nonzero(np.asarray(names) == "CA")[0]
    assert len(ca) == 2 * 214 + 1
    expected = [(ca[k], ca[k + 1]) for k in range(427) if k != 213]
    np.testing.assert_array_equal(pairs, expected)
    guard_topology = {"atom_names": names, "residue_ids": res_ids, "residue_names": res_names,
                      "bonds": topo.bonds.tolist()}
    np.testing.assert_array_equal(_consecutive_ca_pairs(guard_topology), expected)
    # a CA-only model subset keeps the pairs the full topology's peptide bonds give
    sub = consecutive_ca_pairs(topo, ca)
    np.testing.assert_array_equal(sub, [(k, k + 1) for k in range(427) if k != 213])
    # without bonds (a coarse-grained topology) consecutive numbers decide; the ion still is none
    assert len(ca_pairs_of(names, res_ids, res_names)) == 427
