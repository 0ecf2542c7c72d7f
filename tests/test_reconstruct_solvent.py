"""Reconstruction of an explicitly solvated system (real OpenMM: amber14 + TIP3P-FB, PME).

The "prediction" is the true MD future of the predicted atoms (a perfect surrogate): waters,
which have no bonded path to a predicted atom, must not be turned with the solute (a periodic
box is not symmetric under rotation), and the rebuilt frame must cost about what the true one
does. Riding hydrogens sit at their exact bond length from their predicted anchor.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from integrations.reconstruct import Reconstructor
from surrogate_md.data.selection import select_nodes

openmm = pytest.importorskip("openmm")

STEP_PS = 0.002
FRAME_PS = 0.02  # saved-frame interval
N_FRAMES = 26  # 0.5 ps
STARTS = range(0, 11, 2)  # six start frames
LAGS = (5, 15)  # frames: 0.1 and 0.3 ps


@functools.cache
def solvated_md():
    """Topology, waters, frames (N_FRAMES, n, 3) Å every FRAME_PS of solvated alanine dipeptide
    after 1 ps of equilibration, and its potential energy (kJ/mol) as a function."""
    from openmm import app, unit

    import datagen
    from datagen.openmm_md import topology_from_openmm

    pdb = app.PDBFile(str(datagen.__path__[0] + "/systems/alanine-dipeptide.pdb"))
    ff = app.ForceField("amber14-all.xml", "amber14/tip3pfb.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addSolvent(ff, model="tip3p", padding=0.7 * unit.nanometer)  # 117 waters
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME,
                             nonbondedCutoff=0.8 * unit.nanometer, constraints=app.HBonds)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                 STEP_PS * unit.picosecond)
    integrator.setRandomNumberSeed(7)
    # Reference: bit-reproducible (the CPU platform's sums are not, and these energies vary)
    platform = openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(system, integrator, platform)
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    integrator.step(500)
    frames = []
    for _ in range(N_FRAMES):
        integrator.step(round(FRAME_PS / STEP_PS))
        state = context.getState(positions=True)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
    water = np.array([a.index for a in modeller.topology.atoms() if a.residue.name == "HOH"])
    energy_ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
    energy_ctx.setPeriodicBoxVectors(*state.getPeriodicBoxVectors())

    def energy(x: np.ndarray) -> float:
        energy_ctx.setPositions(x * unit.angstrom)
        st = energy_ctx.getState(energy=True)
        return st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    return topology_from_openmm(modeller.topology, system), water, np.asarray(frames), energy


@pytest.mark.parametrize("selection", ["backbone", "solute heavy atoms"])
def test_waters_are_not_turned_and_a_perfect_prediction_costs_little(selection):
    """Backbone (4 atoms) or the dipeptide's heavy atoms predicted exactly 0.1 and 0.3 ps ahead:
    the waters are translated together, never turned, and the rebuilt frame costs a few tens of
    kJ/mol over the true one (turning them about the solute cost 1e3 to 1e12 kJ/mol)."""
    topo, water, frames, energy = solvated_md()
    if selection == "backbone":
        model = select_nodes(topo, "backbone").atom_index
    else:
        model = np.setdiff1d(np.flatnonzero(topo.atomic_numbers > 1), water)
    rec = Reconstructor(topo.n_atoms, model, topo.bonds, topo.atomic_numbers, topo.residue_ids,
                        topo.segment_ids)
    for lag in LAGS:
        rises = []
        for t0 in STARTS:
            start, true = frames[t0], frames[t0 + lag]
            out = rec(start, true[model])
            shift = out[water] - start[water]
            np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-9)
            np.testing.assert_allclose(shift[0], (true[model] - start[model]).mean(axis=0),
                                       atol=1e-9)
            rises.append(energy(out) - energy(true))
        message = f"{selection}, {lag * FRAME_PS} ps: rises {np.round(rises)} kJ/mol"
        assert np.median(rises) < 200.0 and max(rises) < 1000.0, message


def test_riding_hydrogens_keep_their_bond_length():
    """Heavy atoms (water oxygens too) predicted exactly: every hydrogen sits at its pre-jump
    bond length from its anchor, the predicted atoms are as given."""
    topo, _, frames, _ = solvated_md()
    z = topo.atomic_numbers
    heavy = np.flatnonzero(z > 1)
    rec = Reconstructor(topo.n_atoms, heavy, topo.bonds, z, topo.residue_ids, topo.segment_ids)
    out = rec(frames[0], frames[-1][heavy])
    bonds = np.asarray(topo.bonds)
    xh = bonds[(z[bonds[:, 0]] == 1) != (z[bonds[:, 1]] == 1)]
    before = np.linalg.norm(frames[0][xh[:, 0]] - frames[0][xh[:, 1]], axis=1)
    after = np.linalg.norm(out[xh[:, 0]] - out[xh[:, 1]], axis=1)
    np.testing.assert_allclose(after, before, atol=1e-9)
    np.testing.assert_allclose(out[heavy], frames[-1][heavy])
