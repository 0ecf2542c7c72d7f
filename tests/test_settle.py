"""Settling the atoms a partial model does not predict (``settle_iterations``), in OpenMM and ASE.

A heavy-atom surrogate leaves the hydrogens to the rigid rebuild of :mod:`integrations.reconstruct`;
after every jump both engines minimise those atoms alone for a few iterations, the predicted atoms
held exactly where the model put them, before the guards judge the jump.
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest
from _integration_fixtures import (
    PDB,
    alanine_system,
    cached_md,
    make_checkpoint,
    reference_platform,
    thermal_start,
    train_tiny_surrogate,
)
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read
from openmm import app, unit

from integrations.ase_dynamics import SurrogateDynamics
from integrations.openmm_simulation import (
    Relaxation,
    SurrogateJumpReporter,
    SurrogateSimulation,
)
from integrations.propagator import DEFAULT_SETTLE_ITERATIONS
from integrations.reconstruct import Reconstructor
from integrations.writers import PS_IN_ASE_TIME
from surrogate_md import Surrogate
from surrogate_md.errors import EngineError

A = unit.angstrom
A_PER_PS = unit.angstrom / unit.picosecond
KJ_PER_MOL = unit.kilojoule_per_mole


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """A heavy-atom egnn trained here: 10 heavy atoms predicted, 12 hydrogens rebuilt."""
    return Surrogate.load(train_tiny_surrogate(tmp_path_factory, "heavy"))


def energy_of(system: openmm.System, positions_A: np.ndarray) -> float:
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    context.setPositions(unit.Quantity(positions_A, A))
    return context.getState(energy=True).getPotentialEnergy().value_in_unit(KJ_PER_MOL)


def test_settle_moves_the_rebuilt_atoms_only_and_lowers_the_energy(heavy):
    """Hydrogens carried rigidly from frame 0 onto the heavy atoms of frame 40 (0.8 ps later)
    strain their bonds and angles; ten iterations of Relaxation.settle bring the energy down
    while the heavy atoms stay bit for bit where they were."""
    md = cached_md()
    _, system, _ = alanine_system(constraints=None)
    rebuild = Reconstructor.for_surrogate(heavy)
    ma = heavy.model_atoms
    rebuilt = rebuild(md["frames"][0], md["frames"][40][ma])
    relax = Relaxation(system, reference_platform(), restrained_atoms=ma)
    settled = relax.settle(rebuilt, None, 10)
    assert np.array_equal(settled[ma], rebuilt[ma])
    hydrogens = np.setdiff1d(np.arange(22), ma)
    assert np.linalg.norm(settled[hydrogens] - rebuilt[hydrogens], axis=1).max() > 0.01
    before, after = energy_of(system, rebuilt), energy_of(system, settled)
    assert after < before - 20.0, (before, after)
    assert relax.settle(rebuilt, None, 0) is not None  # 0: runs to convergence, still held
    assert system.getNumForces() == alanine_system(constraints=None)[1].getNumForces()


def run_openmm(surrogate, settle: int, constraints=None, n: int = 2):
    top, system, _ = alanine_system(constraints)
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                              guards="warn", settle_iterations=settle)
    pos, vel = thermal_start(3)
    sim.context.setPositions(unit.Quantity(pos, A))
    sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
    frames, energies = [], []
    for _ in range(n):
        sim.step(1)
        st = sim.context.getState(positions=True, energy=True)
        frames.append(st.getPositions(asNumpy=True).value_in_unit(A))
        energies.append(st.getPotentialEnergy().value_in_unit(KJ_PER_MOL))
    return sim, np.array(frames), np.array(energies)


def test_openmm_settles_after_every_jump_by_default(heavy):
    assert DEFAULT_SETTLE_ITERATIONS > 0
    _, raw, e_raw = run_openmm(heavy, 0, n=1)
    sim, settled, e_settled = run_openmm(heavy, DEFAULT_SETTLE_ITERATIONS, n=1)
    ma = heavy.model_atoms
    np.testing.assert_allclose(settled[0][ma], raw[0][ma], atol=1e-9)  # the model's atoms
    assert not np.allclose(settled[0], raw[0], atol=1e-3)  # the hydrogens settled
    assert e_settled[0] < e_raw[0] - 5.0
    assert sim.summary()["settle_iterations"] == DEFAULT_SETTLE_ITERATIONS
    # the defaults are those of a SurrogateSimulation built without the argument
    top, system, _ = alanine_system(None)
    assert SurrogateSimulation(top, system, heavy, platform=reference_platform(),
                               guards="warn").settle_iterations == DEFAULT_SETTLE_ITERATIONS


def test_openmm_settling_then_constraints(heavy):
    """With HBonds constraints the settled state is constrained again in the engine's Context:
    every X-H bond at its constrained length."""
    sim, frames, _ = run_openmm(heavy, 10, constraints=app.HBonds, n=1)
    system = sim.system
    for i in range(system.getNumConstraints()):
        a, b, d = system.getConstraintParameters(i)
        length = np.linalg.norm(frames[0][a] - frames[0][b]) / 10.0
        assert length == pytest.approx(d.value_in_unit(unit.nanometer), abs=1e-5)


def test_a_model_of_every_atom_has_nothing_to_settle(tmp_path):
    checkpoint = make_checkpoint(cached_md(), tmp_path / "all.pt", selection="all")
    surrogate = Surrogate.load(checkpoint)
    sim, _, _ = run_openmm(surrogate, 10, n=1)
    assert sim.n_jumps == 1 and sim._relax is None  # no minimisation Context was built


def test_jump_reporter_settles_too(heavy):
    ends = {}
    for settle in (0, 10):
        top, system, _ = alanine_system(None)
        integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                     0.001 * unit.picosecond)
        integrator.setRandomNumberSeed(7)  # the same MD before the jump in both runs
        sim = app.Simulation(top, system, integrator, reference_platform())
        pos, vel = thermal_start(3)
        sim.context.setPositions(unit.Quantity(pos, A))
        sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
        reporter = SurrogateJumpReporter(heavy, 5, guards="warn", settle_iterations=settle)
        sim.reporters.append(reporter)
        sim.step(5)
        assert reporter.n_jumps == 1
        st = sim.context.getState(positions=True, energy=True)
        ends[settle] = (st.getPositions(asNumpy=True).value_in_unit(A),
                        st.getPotentialEnergy().value_in_unit(KJ_PER_MOL))
    ma = heavy.model_atoms
    np.testing.assert_allclose(ends[10][0][ma], ends[0][0][ma], atol=1e-9)
    assert ends[10][1] < ends[0][1] - 5.0


def ase_run(surrogate, settle: int, constraints=()):
    atoms = read(str(PDB))
    pos, vel = thermal_start(3)
    atoms.set_positions(pos)
    atoms.set_velocities(vel / PS_IN_ASE_TIME)
    atoms.calc = EMT()
    atoms.set_constraint(list(constraints))
    dyn = SurrogateDynamics(atoms, surrogate, guards="warn", settle_iterations=settle)
    dyn.run(1)
    return atoms, dyn


def test_ase_settles_with_the_calculator_and_keeps_the_atoms_constraints(heavy):
    """EMT stands in for a force field: the hydrogens settle under it, the heavy atoms stay as
    predicted, and the atoms' own FixAtoms (on a hydrogen) holds through the settling and is
    the only constraint left afterwards."""
    fix = FixAtoms(indices=[1])  # a methyl hydrogen: the jump and the settling hold it
    raw, _ = ase_run(heavy, 0, [fix])
    settled, dyn = ase_run(heavy, 10, [fix])
    ma = heavy.model_atoms
    np.testing.assert_allclose(settled.get_positions()[ma], raw.get_positions()[ma], atol=1e-9)
    assert not np.allclose(settled.get_positions(), raw.get_positions(), atol=1e-3)
    assert settled.get_potential_energy() < raw.get_potential_energy()
    np.testing.assert_allclose(settled.get_positions()[1], thermal_start(3)[0][1], atol=1e-12)
    assert settled.constraints == [fix]
    assert dyn.todict()["settle_iterations"] == 10
    np.testing.assert_array_equal(dyn.last_jump[-1], settled.get_positions())  # observers


def test_ase_without_a_calculator_does_not_settle(heavy):
    atoms = read(str(PDB))
    pos, vel = thermal_start(3)
    atoms.set_positions(pos)
    atoms.set_velocities(vel / PS_IN_ASE_TIME)
    SurrogateDynamics(atoms, heavy, guards="warn").run(1)  # default settling: nothing to use
    assert atoms.calc is None and np.isfinite(atoms.get_positions()).all()


@pytest.mark.parametrize("bad", [-1, 1.5, float("nan"), True, "10"])
def test_bad_settle_iterations_are_refused(heavy, bad):
    top, system, _ = alanine_system(None)
    with pytest.raises(EngineError, match="settle_iterations must be a whole number"):
        SurrogateSimulation(top, system, heavy, platform=reference_platform(),
                            settle_iterations=bad)
    with pytest.raises(EngineError, match="settle_iterations"):
        SurrogateJumpReporter(heavy, 5, settle_iterations=bad)
    with pytest.raises(EngineError, match="settle_iterations"):
        SurrogateDynamics(read(str(PDB)), heavy, settle_iterations=bad)


def test_settled_states_stay_out_of_the_guards_reference(heavy):
    """Settled jump ends, minimised in part, do not feed the energy reference (it would sink
    below the MD's level): the window keeps the start's energy only; without settling every
    kept jump end joins it."""
    from integrations.guards import Guards

    windows = {}
    for settle in (0, 10):
        sim, _, _ = run_openmm(heavy, settle, n=3)
        sim.step(1)  # records the third jump's end at the start of the fourth
        windows[settle] = sim.guards.energy_state()["energies"]
    assert len(windows[10]) == 1 and len(windows[0]) == 4
    assert windows[10][0] == pytest.approx(windows[0][0])  # the start state's energy

    for settle in (0, 10):
        atoms, dyn = ase_run(heavy, settle)
        dyn.run(2)
        assert len(dyn.guards.energy_state()["energies"]) == (1 if settle else 3)

    guards = Guards(heavy, n_dof=66, temperature_K=300.0)
    guards.record_energy(-100.0)
    guards.record_settled(-900.0)
    guards.record_energy(-900.0)  # the settled state: left out
    guards.record_energy(-120.0)  # anything else: in
    assert guards.energy_state()["energies"] == [-100.0, -120.0]


def test_settled_jumps_are_checked_against_the_quenched_reference(heavy):
    """Settling lowers the energy of any state, a thermal one too: the engines measure that
    quench once, on the state the run starts from (its energy minus that of the same state
    settled), and check settled jump ends against the reference lowered by it. A restart
    carries it; a hand-moved state measures it again."""
    sim, _, _ = run_openmm(heavy, 10, n=1)
    quench = sim.guards.settle_quench_kJ_per_mol
    _, system, _ = alanine_system(None)
    relax = Relaxation(system, reference_platform(), restrained_atoms=heavy.model_atoms)
    start = thermal_start(3)[0]
    assert quench == pytest.approx(relax.settle_quench(start, None, 10), rel=1e-6)
    assert quench > 1.0  # hydrogens of a 300 K frame hold strain that settling takes out
    assert energy_of(system, start) - energy_of(system, relax.settle(start, None, 10)) == \
        pytest.approx(quench, rel=1e-3)  # the flexible copy's bonds are at rest there
    # the check: a settled state at the plain reference rises by the quench
    guards = sim.guards
    ref = guards.energy_reference_kJ_per_mol
    pos = sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)
    guards.energy_jump_kJ_per_mol = quench / 2
    assert guards.check(pos, energy_kJ_per_mol=ref, count=False) == []
    with guards.judging_settled():
        events = guards.check(pos, energy_kJ_per_mol=ref, count=False)
    assert [e.check for e in events] == ["energy"]
    assert events[0].value == pytest.approx(quench)
    # saved with the guards' energy state, forgotten by a reset
    state = guards.energy_state()
    assert state["settle_quench"] == quench
    guards.reset_energies()
    assert guards.settle_quench_kJ_per_mol is None
    guards.restore_energy_state(state)
    assert guards.settle_quench_kJ_per_mol == quench

    _, dyn = ase_run(heavy, 10)
    assert dyn.guards.settle_quench_kJ_per_mol > 0


def test_settle_guard_details(heavy, tmp_path):
    """The relax action aims at the quench-lowered reference too; a settling that ends in NaN
    hands back the unsettled state; atoms that cannot move leave nothing to settle; the quench
    is measured again when the settle iterations change; an older run's identity resumes as a
    run without settling."""
    from integrations.guards import GuardConfig, Guards
    from integrations.run_control import check_identity

    guards = Guards(heavy, GuardConfig(action="relax"), n_dof=66, temperature_K=300.0)
    guards.record_energy(-100.0)
    guards.set_settle_quench(50.0, 10)
    assert guards.energy_at_relax_target(-100.0)
    with guards.judging_settled():
        assert guards.energy_reference_kJ_per_mol == pytest.approx(-150.0)
        assert not guards.energy_at_relax_target(-100.0)  # the relax target moved down too
        assert guards.energy_at_relax_target(-150.0)
    with guards.judging_settled(False):
        assert guards.energy_reference_kJ_per_mol == pytest.approx(-100.0)
    assert not guards.needs_settle_quench(10) and guards.needs_settle_quench(5)
    guards.record_md_energy(-90.0)  # real MD moved the anchor: measure on its state
    assert guards.needs_settle_quench(10)
    guards.set_settle_quench(40.0, 10)
    guards.record_md_energy(-95.0)  # later MD states: not again (once per run)
    assert not guards.needs_settle_quench(10)

    _, system, _ = alanine_system(constraints=None)
    relax = Relaxation(system, reference_platform(), restrained_atoms=heavy.model_atoms)
    broken = thermal_start(3)[0]
    broken[heavy.model_atoms[1]] = broken[heavy.model_atoms[0]]  # two atoms on one spot
    out = relax.settle(broken, None, 10)
    assert np.isfinite(out).all() and np.array_equal(out, broken)

    # hydrogens made massless: nothing can move, nothing is settled or built
    top, system, _ = alanine_system(None)
    for i in np.setdiff1d(np.arange(22), heavy.model_atoms):
        system.setParticleMass(int(i), 0.0)
    sim = SurrogateSimulation(top, system, heavy, platform=reference_platform(), guards="warn")
    pos, vel = thermal_start(3)
    sim.context.setPositions(unit.Quantity(pos, A))
    sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
    sim.step(1)
    assert sim._relax is None and sim.guards.settle_quench_kJ_per_mol is None

    sim, _, _ = run_openmm(heavy, 10, n=1)
    first = sim.guards.settle_quench_kJ_per_mol
    sim.settle_iterations = 3
    sim.step(1)
    assert sim.guards.energy_state()["settle_quench_iterations"] == 3
    assert sim.guards.settle_quench_kJ_per_mol != first

    with pytest.raises(Exception, match="settle"):
        check_identity({"seed": 0}, {"seed": 0, "settle_iterations": 10}, tmp_path, "run")
    check_identity({"seed": 0}, {"seed": 0, "settle_iterations": 0}, tmp_path, "run")
