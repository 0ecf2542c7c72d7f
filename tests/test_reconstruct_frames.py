"""Which predicted atoms carry the unpredicted ones: the local frames of riding hydrogens and of
side chains."""

from __future__ import annotations

import numpy as np
import pytest
from _integration_fixtures import PDB, topology_from_openmm

from integrations.reconstruct import Reconstructor
from surrogate_md.data.selection import select_nodes

openmm = pytest.importorskip("openmm")


def alanine():
    from openmm import app, unit

    pdb = app.PDBFile(str(PDB))
    topo = topology_from_openmm(pdb.topology)
    return topo, np.asarray(pdb.positions.value_in_unit(unit.angstrom))


def index(topo, name, residue="ALA"):
    return int(np.nonzero((topo.atom_names == name) & (topo.residue_names == residue))[0][0])


def test_riding_hydrogens_follow_their_anchors_bonded_atoms_only():
    # the carbonyl O is two bonds from CA: it moves with psi, and must not tilt CA's hydrogen
    # (a two-bond fit did; on AdK that cost an exact heavy-atom prediction 3-7 MJ/mol)
    topo, x = alanine()
    heavy = select_nodes(topo, "heavy").atom_index
    rec = Reconstructor(topo.n_atoms, heavy, topo.bonds, topo.atomic_numbers, topo.residue_ids,
                        topo.segment_ids, topo.atom_names)
    pred = x[heavy].copy()
    o = int(np.nonzero(heavy == index(topo, "O"))[0][0])
    pred[o] += [0.4, -0.3, 0.2]
    out = rec(x, pred)
    ha = index(topo, "HA")
    np.testing.assert_allclose(out[ha], x[ha], atol=1e-9)
    # a methyl hydrogen has one bonded heavy atom: its frame reaches two bonds out
    hb = index(topo, "HB1")
    np.testing.assert_allclose(np.linalg.norm(out[hb] - out[index(topo, "CB")]),
                               np.linalg.norm(x[hb] - x[index(topo, "CB")]), atol=1e-9)


def test_side_chains_turn_with_n_ca_c_about_ca():
    # a backbone model: the side chain follows N, CA, C (not O, which moves with psi) and turns
    # about CA, so CA-CB keeps its length whatever the prediction
    topo, x = alanine()
    backbone = select_nodes(topo, "backbone").atom_index
    rec = Reconstructor(topo.n_atoms, backbone, topo.bonds, topo.atomic_numbers,
                        topo.residue_ids, topo.segment_ids, topo.atom_names)
    pred = x[backbone].copy()
    pos_in_pred = {int(a): i for i, a in enumerate(backbone)}
    pred[pos_in_pred[index(topo, "O")]] += [0.5, 0.2, -0.3]
    out = rec(x, pred)
    cb = index(topo, "CB")
    np.testing.assert_allclose(out[cb], x[cb], atol=1e-9)
    # a distorted N-CA-C triangle: CA-CB stays exact
    pred[pos_in_pred[index(topo, "N")]] += [0.2, 0.1, 0.0]
    out = rec(x, pred)
    ca = index(topo, "CA")
    np.testing.assert_allclose(np.linalg.norm(out[cb] - out[ca]),
                               np.linalg.norm(x[cb] - x[ca]), atol=1e-9)
