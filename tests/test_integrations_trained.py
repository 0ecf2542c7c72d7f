"""A surrogate trained here drives both engines: ASE ``SurrogateDynamics`` and OpenMM
``SurrogateSimulation`` with stock reporters.

One tiny heavy-atom egnn is trained per module with ``surrogate_md.train.train`` (a few seconds on
real alanine-dipeptide MD); its hydrogens are rebuilt by :mod:`integrations.reconstruct` after
every jump. ASE has no amber force field: the with-calculator run uses EMT (which has H, C, N, O
parameters, crude for a peptide) only to check that energies are computed and logged for every
frame, as the other ASE tests do.
"""

from __future__ import annotations

import csv

import MDAnalysis as mda
import mdtraj
import numpy as np
import openmm
import pytest
import torch
from _integration_fixtures import (
    PDB,
    alanine_system,
    reference_platform,
    thermal_start,
    train_tiny_surrogate,
)
from ase.calculators.emt import EMT
from ase.io import Trajectory, read
from openmm import app, unit

from integrations.ase_dynamics import SurrogateDynamics
from integrations.openmm_simulation import SurrogateSimulation
from integrations.writers import PS_IN_ASE_TIME
from surrogate_md import Surrogate

N_JUMPS = 20
A = unit.angstrom
A_PER_PS = unit.angstrom / unit.picosecond
KJ_PER_MOL = unit.kilojoule_per_mole


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, loaded Surrogate) of the heavy-atom egnn trained for this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 22-atom model: intra-op threads only contend on shared cores
    try:
        ck = train_tiny_surrogate(tmp_path_factory, "heavy")
        yield ck, Surrogate.load(ck)
    finally:
        torch.set_num_threads(before)


def hydrogen_bonds(topology: app.Topology) -> np.ndarray:
    """(B, 2) atom pairs of the X-H bonds."""
    return np.array([(a.index, b.index) for a, b in topology.bonds()
                     if "H" in (a.element.symbol, b.element.symbol)])


def bond_lengths(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1)


def ase_atoms():
    atoms = read(str(PDB))
    pos, vel = thermal_start()
    atoms.set_positions(pos)
    atoms.set_velocities(vel / PS_IN_ASE_TIME)
    return atoms


def openmm_sim(surrogate, remove_com: bool = True, **kwargs) -> SurrogateSimulation:
    top, system, _ = alanine_system(constraints=None)  # X-H bonds kept by reconstruction only
    if not remove_com:
        for i in reversed(range(system.getNumForces())):
            if isinstance(system.getForce(i), openmm.CMMotionRemover):
                system.removeForce(i)
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(), **kwargs)
    pos, vel = thermal_start()
    sim.context.setPositions(unit.Quantity(pos, A))
    sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
    return sim


def test_model_is_partial_and_trained(trained):
    ck, surrogate = trained
    assert ck.name == "best.pt" and ck.exists()
    z = np.asarray(surrogate.topology["atomic_numbers"])
    np.testing.assert_array_equal(np.sort(surrogate.model_atoms), np.nonzero(z != 1)[0])
    assert surrogate.n_atoms == 22 and surrogate.jump_ps == pytest.approx(0.2)


def test_ase_without_calculator(trained, tmp_path):
    ck, surrogate = trained
    atoms = ase_atoms()
    x0 = atoms.get_positions()
    dyn = SurrogateDynamics(atoms, ck, trajectory=str(tmp_path / "free.traj"), guards="warn")
    times = []
    dyn.attach(lambda: times.append(dyn.get_time() / PS_IN_ASE_TIME))
    dyn.run(N_JUMPS)
    assert dyn.n_jumps == N_JUMPS and dyn.n_fallbacks == 0
    jump = surrogate.jump_ps
    np.testing.assert_allclose(times, np.arange(N_JUMPS + 1) * jump, atol=1e-12)
    with Trajectory(str(tmp_path / "free.traj")) as traj:
        frames = [f.get_positions() for f in traj]
        desc = traj.description
    assert len(frames) == N_JUMPS + 1
    # frame k of the .traj lies at k x interval x timestep (ASE stores both in its header)
    assert desc["interval"] == 1
    assert desc["timestep"] / PS_IN_ASE_TIME == pytest.approx(jump, rel=1e-12)
    assert desc["jump_ps"] == pytest.approx(jump)
    frames = np.asarray(frames)
    assert np.isfinite(frames).all()
    np.testing.assert_allclose(frames[0], x0)
    np.testing.assert_allclose(frames[-1], atoms.get_positions())
    assert (np.abs(np.diff(frames, axis=0)).max(axis=(1, 2)) > 1e-3).all()  # every jump moved
    top = app.PDBFile(str(PDB)).topology
    pairs = hydrogen_bonds(top)
    for x in frames[1:]:  # hydrogens rebuilt on their heavy atoms after every jump
        assert np.abs(bond_lengths(x, pairs) - bond_lengths(x0, pairs)).max() < 0.1


def test_ase_with_calculator(trained, tmp_path):
    ck, surrogate = trained
    atoms = ase_atoms()
    atoms.calc = EMT()
    log = tmp_path / "md.log"
    dyn = SurrogateDynamics(atoms, surrogate, trajectory=str(tmp_path / "emt.traj"),
                            logfile=str(log), guards="warn")
    dyn.run(N_JUMPS)
    assert dyn.n_jumps == N_JUMPS
    with Trajectory(str(tmp_path / "emt.traj")) as traj:
        assert len(traj) == N_JUMPS + 1
        positions = np.asarray([f.get_positions() for f in traj])
        energies = np.array([f.get_potential_energy() for f in traj])
    assert np.isfinite(positions).all() and np.isfinite(energies).all()
    assert len(np.unique(energies)) == N_JUMPS + 1  # a real energy per frame
    assert energies[-1] == pytest.approx(atoms.get_potential_energy())
    rows = log.read_text().splitlines()[1:]
    assert len(rows) == N_JUMPS + 1
    np.testing.assert_allclose([float(r.split()[0]) for r in rows],
                               np.arange(N_JUMPS + 1) * surrogate.jump_ps, atol=1e-3)


def test_openmm_stock_reporters(trained, tmp_path):
    ck, surrogate = trained
    sim = openmm_sim(surrogate, guards="warn")
    x0 = sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)
    sim.reporters += [
        app.DCDReporter(str(tmp_path / "t.dcd"), 1),
        app.XTCReporter(str(tmp_path / "t.xtc"), 2),
        app.StateDataReporter(str(tmp_path / "s.csv"), 1, step=True, time=True,
                              potentialEnergy=True, kineticEnergy=True),
        app.CheckpointReporter(str(tmp_path / "c.chk"), 10),
    ]
    sim.step(N_JUMPS)
    del sim.reporters[:]
    assert sim.n_jumps == N_JUMPS and sim.n_fallbacks == 0 and sim.currentStep == N_JUMPS
    jump = surrogate.jump_ps
    final = sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)

    u = mda.Universe(str(PDB), str(tmp_path / "t.dcd"))
    dcd = np.asarray([ts.positions.copy() for ts in u.trajectory])
    assert dcd.shape == (N_JUMPS, 22, 3) and np.isfinite(dcd).all()
    np.testing.assert_allclose([ts.time for ts in u.trajectory],
                               np.arange(1, N_JUMPS + 1) * jump, atol=1e-4)
    np.testing.assert_allclose(dcd[-1], final, atol=1e-3)
    t = mdtraj.load(str(tmp_path / "t.xtc"), top=str(PDB))
    assert t.n_frames == N_JUMPS // 2 and np.isfinite(t.xyz).all()
    np.testing.assert_allclose(t.time, np.arange(2, N_JUMPS + 1, 2) * jump, atol=1e-4)
    np.testing.assert_allclose(t.xyz[-1] * 10, final, atol=0.01)  # XTC: nm, 3 decimals

    # hydrogens are carried along by the reconstruction, X-H bonds kept (no constraints here)
    pairs = hydrogen_bonds(sim.topology)
    h = np.array([a.index for a in sim.topology.atoms() if a.element.symbol == "H"])
    assert (np.abs(dcd[:, h] - x0[h]).max(axis=(1, 2)) > 1e-3).all()  # moved at every jump
    for x in dcd:
        assert np.abs(bond_lengths(x, pairs) - bond_lengths(x0, pairs)).max() < 0.1

    with open(tmp_path / "s.csv") as fh:
        rows = list(csv.reader(fh))[1:]
    assert [int(r[0]) for r in rows] == list(range(1, N_JUMPS + 1))
    np.testing.assert_allclose([float(r[1]) for r in rows], np.arange(1, N_JUMPS + 1) * jump,
                               atol=1e-9)
    energies = np.array([[float(r[2]), float(r[3])] for r in rows])
    assert np.isfinite(energies).all()
    # the reported potential is the force field's energy of the surrogate frame: recompute it
    # in a plain Context from the DCD frame
    _, system, _ = alanine_system(constraints=None)
    plain = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    plain.setPositions(unit.Quantity(dcd[-1].astype(np.float64), A))
    e = plain.getState(energy=True).getPotentialEnergy().value_in_unit(KJ_PER_MOL)
    assert energies[-1, 0] == pytest.approx(e, abs=0.5)  # DCD positions are float32

    top, system, _ = alanine_system(constraints=None)
    again = SurrogateSimulation(top, system, surrogate, platform=reference_platform())
    again.loadCheckpoint(str(tmp_path / "c.chk"))
    assert again.currentStep == N_JUMPS
    st = again.context.getState(positions=True)
    assert st.getTime().value_in_unit(unit.picosecond) == pytest.approx(N_JUMPS * jump)
    np.testing.assert_allclose(st.getPositions(asNumpy=True).value_in_unit(A), final, atol=1e-9)


def test_both_engines_take_the_same_jumps(trained, tmp_path):
    """Same model, same start, no constraints: the OpenMM and ASE runs must coincide (OpenMM
    without a CMMotionRemover, whose MD zeroes the net momentum and so do its jumps; ASE's MD
    does not zero it and neither do ASE's jumps, with the thermostat's fixcm or not)."""
    from ase import units
    from ase.md.langevin import Langevin

    _, surrogate = trained
    atoms = ase_atoms()
    atoms.calc = EMT()  # the MD's forces (never run: guard action 'warn' keeps every jump)
    md = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01, fixcm=True)
    # the engines' own settling of the rebuilt hydrogens off: EMT is not amber14
    SurrogateDynamics(atoms, surrogate, guards="warn", fallback_dynamics=md,
                      settle_iterations=0).run(5)
    sim = openmm_sim(surrogate, guards="warn", remove_com=False, settle_iterations=0)
    sim.step(5)
    state = sim.context.getState(positions=True, velocities=True)
    np.testing.assert_allclose(state.getPositions(asNumpy=True).value_in_unit(A),
                               atoms.get_positions(), atol=1e-6)
    np.testing.assert_allclose(state.getVelocities(asNumpy=True).value_in_unit(A_PER_PS),
                               atoms.get_velocities() * PS_IN_ASE_TIME, atol=1e-5)


@pytest.mark.parametrize("constraints", [None, app.HBonds])
def test_restrained_relaxation_after_heavy_atom_jumps(trained, tmp_path, constraints):
    """relax_iterations: the rebuilt hydrogens settle, the predicted heavy atoms stay put, and
    reporters read the plain force field (no restraint energy)."""
    _, surrogate = trained
    heavy = surrogate.model_atoms
    runs = {}
    for iterations in (0, 50):
        top, system, _ = alanine_system(constraints)
        n_forces = system.getNumForces()
        sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                                  guards="warn", relax_iterations=iterations)
        pos, vel = thermal_start(3)
        sim.context.setPositions(unit.Quantity(pos, A))
        sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
        csv_path = tmp_path / f"relax{iterations}.csv"
        sim.reporters.append(app.StateDataReporter(str(csv_path), 1, step=True,
                                                   potentialEnergy=True))
        positions = []
        for _ in range(3):
            sim.step(1)
            positions.append(sim.context.getState(positions=True).getPositions(asNumpy=True)
                             .value_in_unit(A))
        del sim.reporters[:]
        with open(csv_path) as fh:
            reported = [float(r[1]) for r in list(csv.reader(fh))[1:]]
        runs[iterations] = (positions, reported)
        assert sim.n_jumps == 3 and sim.summary()["relax_iterations"] == iterations
        assert system.getNumForces() == n_forces  # the user's System is left alone
    (x_raw, e_raw), (x_rel, e_rel) = runs[0], runs[50]
    # the first jump starts from the same state in both runs
    assert e_rel[0] < e_raw[0] - 10.0
    shift = np.linalg.norm(x_rel[0] - x_raw[0], axis=1)
    assert shift[heavy].max() < 0.1  # predicted atoms held by the restraints
    assert shift.max() > 1.5 * shift[heavy].max()  # the rebuilt hydrogens settle
    # every reported energy is the force field's energy of the relaxed frame, no restraint term
    _, system, _ = alanine_system(constraints)
    plain = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    for x, e in zip(x_rel, e_rel):
        plain.setPositions(unit.Quantity(x, A))
        assert plain.getState(energy=True).getPotentialEnergy().value_in_unit(KJ_PER_MOL) == \
            pytest.approx(e, abs=1e-3)
