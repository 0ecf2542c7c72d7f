"""OpenMM boundaries of the surrogate: fixed (zero-mass) particles, the thermostat's temperature.

Real OpenMM Contexts throughout (Reference platform), on the fixture's alanine dipeptide.
"""

from __future__ import annotations

import logging

import numpy as np
import openmm
import pytest
from _integration_fixtures import (
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
)
from openmm import app, unit

from integrations.guards import default_energy_threshold
from integrations.openmm_simulation import (
    SurrogateJumpReporter,
    SurrogateSimulation,
    degrees_of_freedom,
    fixed_particles,
)
from integrations.propagator import SurrogatePropagator
from surrogate_md import Surrogate

A = unit.angstrom
A_PER_PS = unit.angstrom / unit.picosecond
FIXED = [0, 1, 2, 3]  # the acetyl cap's methyl group: CH3 and its three hydrogens


def state_A(context):
    st = context.getState(positions=True, velocities=True)
    return (st.getPositions(asNumpy=True).value_in_unit(A),
            st.getVelocities(asNumpy=True).value_in_unit(A_PER_PS))


def masses_of(system):
    return np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                     for i in range(system.getNumParticles())])


def fixed_methyl_system():
    """Alanine dipeptide without constraints whose methyl group has zero mass (OpenMM's fixed
    atoms: no integrator or minimiser moves them)."""
    top, system, positions = alanine_system(constraints=None)
    for i in FIXED:
        system.setParticleMass(i, 0.0)
    return top, system, positions


class FixedRecorder:
    """Records the positions (Å) and velocities (Å/ps) of the fixed atoms at every report."""

    def __init__(self, interval):
        self.interval = interval
        self.positions, self.velocities = [], []

    def describeNextReport(self, simulation):
        return {"steps": self.interval - simulation.currentStep % self.interval,
                "periodic": False, "include": ["positions", "velocities"]}

    def report(self, simulation, state):
        self.positions.append(state.getPositions(asNumpy=True).value_in_unit(A)[FIXED])
        self.velocities.append(state.getVelocities(asNumpy=True).value_in_unit(A_PER_PS)[FIXED])


@pytest.mark.parametrize("end_velocities, md_steps",
                         [("difference", 0), ("thermal", 0), ("difference", 10)])
def test_fixed_particles_never_move_in_jumps(tmp_path, end_velocities, md_steps):
    """A heavy-atom model moves the methyl carbon's neighbours, and its riding hydrogens would
    turn with them: fixed particles must stay where they are with zero velocity in every
    reported frame (hybrid mode: the intermediate output frames too), and thermal draws give
    the moving atoms zero net momentum."""
    ck = make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy")
    top, system, positions = fixed_methyl_system()
    assert fixed_particles(system).tolist() == FIXED
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              guards="warn", end_velocities=end_velocities, velocity_seed=3,
                              md_steps=md_steps)
    cold_start(sim.context, positions, temperature_K=300.0)
    x0, _ = state_A(sim.context)
    recorder = FixedRecorder(int(sim.steps_per_frame[0]))
    sim.reporters.append(recorder)
    sim.step(3)
    assert len(recorder.positions) == 3 * (len(sim.steps_per_frame)
                                           + md_steps // int(sim.steps_per_frame[0]))
    np.testing.assert_allclose(np.array(recorder.positions), np.broadcast_to(
        x0[FIXED], (len(recorder.positions), len(FIXED), 3)), atol=1e-6)
    assert np.abs(np.array(recorder.velocities)).max() == 0.0
    x, v = state_A(sim.context)
    assert np.abs(x - x0).max() > 0.1  # the rest of the molecule moved
    np.testing.assert_allclose(x[FIXED], x0[FIXED], atol=1e-6)
    assert np.abs(v[FIXED]).max() == 0.0
    if end_velocities == "thermal":
        momentum = (masses_of(system)[:, None] * v).sum(axis=0)
        np.testing.assert_allclose(momentum, 0.0, atol=1e-9)


def test_jump_reporter_keeps_fixed_particles_of_a_stock_simulation(tmp_path):
    ck = make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy")
    top, system, positions = fixed_methyl_system()
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                 0.002 * unit.picosecond)
    sim = app.Simulation(top, system, integrator, reference_platform())
    cold_start(sim.context, positions, temperature_K=300.0)
    x0, _ = state_A(sim.context)
    reporter = SurrogateJumpReporter(Surrogate.load(ck), interval=2, guards="warn")
    sim.reporters.append(reporter)
    sim.step(6)
    x, v = state_A(sim.context)
    assert reporter.n_jumps == 3
    np.testing.assert_allclose(x[FIXED], x0[FIXED], atol=1e-6)
    assert np.abs(v[FIXED]).max() == 0.0


def test_thermal_draws_leave_fixed_atoms_out_of_the_net_momentum(tmp_path):
    """Fixed atoms that keep their mass (ASE's FixAtoms): a draw that gave them velocities and
    took out the net momentum before they were zeroed would leave the rest drifting."""
    ck = make_checkpoint(cached_md(), tmp_path / "all.pt", selection="all", model="constant")
    surrogate = Surrogate.load(ck)
    masses = np.asarray(cached_md()["topology"].masses, dtype=np.float64)
    prop = SurrogatePropagator(surrogate, end_velocities="thermal", masses_amu=masses,
                               temperature_K=300.0, seed=0, fixed_atoms=FIXED)
    x0 = cached_md()["frames"][0]
    for _ in range(5):
        result = prop.jump(x0, np.zeros_like(x0), 0.0, last_only=True)
        v = result.velocities_A_per_ps[-1]
        assert np.abs(v[FIXED]).max() == 0.0 and np.abs(v).max() > 1.0
        np.testing.assert_allclose((masses[:, None] * v).sum(axis=0), 0.0, atol=1e-9)
        np.testing.assert_array_equal(result.positions_A[-1][FIXED], x0[FIXED])


def kinetic_temperature(v_A_per_ps, masses, n_dof):
    r = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    ke = 0.5 * (masses[:, None] * (0.1 * v_A_per_ps) ** 2).sum()  # kJ/mol
    return 2 * ke / (n_dof * r)


def test_guards_and_thermal_velocities_follow_the_integrators_temperature(tmp_path, caplog):
    """A user's integrator at 600 K: the energy threshold and the thermal end velocities are at
    600 K, not at the 300 K default; a temperature_K that contradicts it is said."""
    ck = make_checkpoint(cached_md(), tmp_path / "all.pt", selection="all", model="constant")
    top, system, positions = alanine_system(constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(600 * unit.kelvin, 1 / unit.picosecond,
                                                 0.002 * unit.picosecond)
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), integrator=integrator,
                              platform=reference_platform(), guards="warn",
                              end_velocities="thermal", velocity_seed=0)
    n_dof = degrees_of_freedom(system)
    assert sim.temperature_K == 600.0
    assert sim.guards.energy_jump_kJ_per_mol == pytest.approx(
        default_energy_threshold(n_dof, 600.0))
    cold_start(sim.context, positions, temperature_K=600.0)
    masses = masses_of(system)
    temps = []
    for _ in range(30):
        sim.step(1)
        temps.append(kinetic_temperature(state_A(sim.context)[1], masses, n_dof))
    assert 520.0 < np.mean(temps) < 680.0  # 300 K draws average 300 +- 15 K here

    # a stock Simulation's thermostat sets the jump reporter's threshold
    integrator = openmm.LangevinMiddleIntegrator(600 * unit.kelvin, 1 / unit.picosecond,
                                                 0.002 * unit.picosecond)
    stock = app.Simulation(top, system, integrator, reference_platform())
    cold_start(stock.context, positions, temperature_K=600.0)
    reporter = SurrogateJumpReporter(Surrogate.load(ck), interval=2, guards="warn")
    stock.reporters.append(reporter)
    stock.step(2)
    assert reporter.guards.temperature == 600.0

    with caplog.at_level(logging.WARNING, logger="integrations.openmm_simulation"):
        explicit = SurrogateSimulation(top, system, Surrogate.load(ck),
                                       integrator=openmm.XmlSerializer.clone(integrator),
                                       platform=reference_platform(), temperature_K=300.0)
    assert explicit.temperature_K == 300.0
    assert "thermostat holds the MD at 600 K" in caplog.text


def test_variable_step_integrators_are_refused_with_the_reason(tmp_path):
    """A jump counts as a whole number of MD steps of one size: an integrator whose steps vary
    (step size 0 ps before its first step) cannot keep time = steps x step size."""
    from surrogate_md.errors import EngineError

    ck = make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy")
    top, system, _ = alanine_system()
    for integrator in (openmm.VariableLangevinIntegrator(300, 1, 1e-4),
                       openmm.VariableVerletIntegrator(1e-4)):
        with pytest.raises(EngineError, match="steps of varying length.*fixed-step integrator"):
            SurrogateSimulation(top, system, Surrogate.load(ck), integrator=integrator,
                                platform=reference_platform())
