"""end_velocities="thermal": each kept jump's end state gets Maxwell-Boltzmann velocities at the
engine's temperature (the next jump's input), instead of backward differences."""

from __future__ import annotations

import numpy as np
import pytest
from _integration_fixtures import (
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
)
from openmm import unit
from scipy.constants import R

from integrations.openmm_simulation import SurrogateSimulation, degrees_of_freedom
from integrations.propagator import SurrogatePropagator
from surrogate_md import Surrogate
from surrogate_md.errors import EngineError


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    return Surrogate.load(make_checkpoint(cached_md(), tmp_path_factory.mktemp("tv") / "l.pt",
                                          selection="heavy"))


def test_draws_are_maxwell_boltzmann_per_atom(linear):
    """<m v_x^2> = kT (1 - m / M) for every atom, whatever its mass (hydrogens 12x faster than
    carbons in v^2): Maxwell-Boltzmann with zero net momentum, which every draw has (drawn
    without that, every jump would set the molecule drifting); massless particles stay at
    rest; a seed repeats the draws."""
    masses = np.asarray(cached_md()["topology"].masses, dtype=np.float64).copy()
    masses[0] = 0.0
    prop = SurrogatePropagator(linear, end_velocities="thermal", masses_amu=masses,
                               temperature_K=300.0, seed=3)
    vel = np.zeros((2, linear.n_atoms, 3))
    draws = np.stack([prop._end_velocities(vel)[-1] for _ in range(4000)])  # Å/ps
    kt = R * 1e-3 * 300.0  # kJ/mol
    m_v2 = masses[1:, None] * (draws[:, 1:] / 10.0) ** 2  # amu (nm/ps)^2 = kJ/mol
    np.testing.assert_allclose(m_v2.mean(axis=(0, 2)), kt * (1 - masses[1:] / masses.sum()),
                               rtol=0.06)
    momentum = (masses[None, :, None] * draws).sum(axis=1)  # amu Å/ps
    assert np.abs(momentum).max() < 1e-9
    assert np.all(draws[:, 0] == 0.0)
    again = SurrogatePropagator(linear, end_velocities="thermal", masses_amu=masses,
                                temperature_K=300.0, seed=3)
    np.testing.assert_array_equal(again._end_velocities(vel)[-1], draws[0])
    with pytest.raises(EngineError, match="masses"):
        SurrogatePropagator(linear, end_velocities="thermal", masses_amu=masses[:5])
    with pytest.raises(EngineError, match="difference"):
        SurrogatePropagator(linear, end_velocities="maxwell")


def _kinetic_temperatures(linear, mode: str, jumps: int = 60) -> np.ndarray:
    top, system, positions = alanine_system()
    sim = SurrogateSimulation(top, system, linear, platform=reference_platform(), guards="warn",
                              temperature_K=300.0, end_velocities=mode, velocity_seed=1)
    cold_start(sim.context, positions)
    dof = degrees_of_freedom(system)  # 3 N - constraints - 3 (the CMMotionRemover)
    temps = []
    for _ in range(jumps):
        sim.step(1)
        ke = sim.context.getState(energy=True).getKineticEnergy()
        temps.append(2 * ke.value_in_unit(unit.kilojoule_per_mole) / (dof * R * 1e-3))
    return np.asarray(temps)


def test_engine_end_states_are_at_the_temperature(linear):
    """Inside OpenMM, the kinetic temperature after thermal jumps averages 300 K (60 jumps of
    22 atoms: about +- 15 K); the backward differences of the cold-started linear model are
    nowhere near it."""
    thermal = _kinetic_temperatures(linear, "thermal")
    assert 265.0 < thermal.mean() < 335.0 and thermal.std() > 20.0
    assert _kinetic_temperatures(linear, "difference").mean() < 100.0


def test_ase_end_states_are_at_the_temperature(linear):
    """The same in ASE: after thermal jumps the atoms' kinetic temperature averages 300 K (a
    no-calculator run: positions and velocities only)."""
    from _integration_fixtures import PDB
    from ase.io import read

    from integrations.ase_dynamics import SurrogateDynamics

    atoms = read(str(PDB))
    atoms.set_positions(cached_md()["frames"][0])
    dyn = SurrogateDynamics(atoms, linear, guards="warn", end_velocities="thermal",
                            velocity_seed=2)
    temps = []
    dyn.attach(lambda: temps.append(atoms.get_temperature()))
    dyn.run(60)
    assert 265.0 < np.mean(temps[1:]) < 335.0


def _assert_projected_once(context, scratch, raw_A_per_ps: np.ndarray) -> None:
    """The velocities in ``context`` are ``raw_A_per_ps`` projected once onto the constraints
    at its positions (``scratch``: a Context of the same System)."""
    state = context.getState(positions=True, velocities=True)
    scratch.setPositions(state.getPositions())
    scratch.setVelocities(unit.Quantity(raw_A_per_ps, unit.angstrom / unit.picosecond))
    scratch.applyVelocityConstraints(1e-5)
    want = scratch.getState(velocities=True).getVelocities(asNumpy=True)
    np.testing.assert_allclose(state.getVelocities(asNumpy=True)._value, want._value, atol=1e-6)


def test_relaxed_jumps_project_their_velocities_once(linear):
    """The relax action moves the atoms after the end velocities were fitted to the
    constraints: the kept state carries the jump's end velocities projected once, onto the
    relaxed geometry's constraints (projecting the already-fitted ones again lost 4-5 % of the
    kinetic energy of every relaxed jump: a trained alanine EGNO read 286 K for 300 K)."""
    import logging

    import openmm

    from integrations.guards import GuardConfig

    top, system, positions = alanine_system()  # HBonds constraints
    sim = SurrogateSimulation(top, system, linear, platform=reference_platform(),
                              guards=GuardConfig(action="relax", relax_iterations=20,
                                                 energy_jump_kJ_per_mol=5.0),
                              temperature_K=300.0, end_velocities="thermal", velocity_seed=4)
    cold_start(sim.context, positions)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                       for i in range(system.getNumParticles())])
    draws = SurrogatePropagator(linear, end_velocities="thermal", masses_amu=masses,
                                temperature_K=300.0, seed=4)  # the same draws, in order
    scratch = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    logging.disable(logging.WARNING)
    try:
        for _ in range(3):
            sim.step(1)
            raw = draws._end_velocities(np.zeros((1, system.getNumParticles(), 3)))[-1]
            _assert_projected_once(sim.context, scratch, raw)
    finally:
        logging.disable(logging.NOTSET)
    assert sim.guards.summary()["relaxations"] >= 2  # the others passed as predicted


def test_jump_reporter_projects_relaxed_velocities_once(linear):
    """The same for ``SurrogateJumpReporter`` on a stock Simulation: a relaxed jump keeps its end
    velocities projected once, onto the relaxed geometry's constraints (they were projected onto
    the unrelaxed geometry and then again after the relaxation)."""
    import logging

    import openmm
    from openmm import app

    from integrations.guards import GuardConfig
    from integrations.openmm_simulation import SurrogateJumpReporter

    top, system, positions = alanine_system()  # HBonds constraints
    sim = app.Simulation(top, system, openmm.LangevinMiddleIntegrator(
        300 * unit.kelvin, 1 / unit.picosecond, 0.0005 * unit.picosecond), reference_platform())
    cold_start(sim.context, positions)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 5)
    jumper = SurrogateJumpReporter(linear, interval=4, guards=GuardConfig(
        action="relax", relax_iterations=20, energy_jump_kJ_per_mol=5.0))
    sim.reporters.append(jumper)
    ends = []
    jump = jumper.propagator.jump

    def recording(*args, **kwargs):
        result = jump(*args, **kwargs)
        ends.append(np.asarray(result.velocities_A_per_ps[-1], dtype=np.float64))
        return result

    jumper.propagator.jump = recording
    scratch = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    logging.disable(logging.WARNING)
    try:
        checked, asserted = 0, 0
        for _ in range(4):
            skipped = jumper.n_skipped
            sim.step(4)  # the jump happens at the report after the fourth step
            relaxed = jumper.guards.summary()["relaxations"]
            if not relaxed or relaxed == checked:
                continue
            checked = relaxed
            if jumper.n_skipped > skipped:  # the relaxation failed: the MD state stays
                continue
            _assert_projected_once(sim.context, scratch, ends[-1])
            asserted += 1
    finally:
        logging.disable(logging.NOTSET)
    assert asserted >= 1 and jumper.n_jumps + jumper.n_skipped == 4
