"""Settling in stages (``settle_iterations`` above 10): 10, 20, 40, ... iterations in all, stopping
at the first stage whose jump end passes the energy check, judged against the reference lowered by
that stage's quench."""

from __future__ import annotations

import numpy as np
import pytest
from _integration_fixtures import (
    PDB,
    alanine_system,
    cached_md,
    reference_platform,
    thermal_start,
    train_tiny_surrogate,
)
from ase.calculators.emt import EMT
from ase.io import read
from openmm import unit

from integrations.ase_dynamics import SurrogateDynamics
from integrations.guards import GuardConfig, Guards
from integrations.openmm_simulation import Relaxation, SurrogateSimulation
from integrations.propagator import settle_in_stages, settle_stages, stage_quenches
from integrations.reconstruct import Reconstructor
from integrations.writers import PS_IN_ASE_TIME
from surrogate_md import Surrogate

A = unit.angstrom
A_PER_PS = unit.angstrom / unit.picosecond
KJ_PER_MOL = unit.kilojoule_per_mole


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """A heavy-atom egnn trained here: 10 heavy atoms predicted, 12 hydrogens rebuilt."""
    return Surrogate.load(train_tiny_surrogate(tmp_path_factory, "heavy"))


@pytest.fixture(scope="module")
def relax(heavy):
    _, system, _ = alanine_system(constraints=None)
    return Relaxation(system, reference_platform(), restrained_atoms=heavy.model_atoms)


def test_settle_stages_schedule():
    assert settle_stages(0) == []
    assert settle_stages(5) == [5]
    assert settle_stages(10) == [10]
    assert settle_stages(11) == [10, 11]
    assert settle_stages(50) == [10, 20, 40, 50]
    assert settle_stages(80) == [10, 20, 40, 80]


def _rebuilt(heavy) -> np.ndarray:
    """Hydrogens carried rigidly from frame 0 onto the heavy atoms of frame 40."""
    md = cached_md()
    return Reconstructor.for_surrogate(heavy)(md["frames"][0],
                                              md["frames"][40][heavy.model_atoms])


def test_settle_in_stages_stops_at_the_first_passing_stage(heavy, relax):
    rebuilt = _rebuilt(heavy)

    def settle(x, n):
        return relax.settle(x, None, n)

    asked = []

    def passes_at_20(x, k):
        asked.append(k)
        return k >= 20

    state, stage = settle_in_stages(settle, rebuilt, [10, 20, 40], passes_at_20)
    assert stage == 20 and asked == [10, 20]
    by_hand = relax.settle(relax.settle(rebuilt, None, 10), None, 10)
    np.testing.assert_array_equal(state, by_hand)
    asked.clear()
    state, stage = settle_in_stages(settle, rebuilt, [10, 20, 40], lambda x, k: asked.append(k))
    assert stage == 40 and asked == [10, 20]  # never asked after the last stage
    np.testing.assert_array_equal(state, relax.settle(by_hand, None, 20))
    assert np.array_equal(state[heavy.model_atoms], rebuilt[heavy.model_atoms])


def test_stage_quenches_by_hand(heavy, relax):
    start = thermal_start(3)[0]
    quenches = stage_quenches(lambda x, n: relax.settle(x, None, n),
                              lambda x: relax.energy(x), start, [10, 20, 40])
    assert list(quenches) == [10, 20, 40]
    x, e0 = start, relax.energy(start)
    for k, n in ((10, 10), (20, 10), (40, 20)):
        x = relax.settle(x, None, n)
        assert quenches[k] == pytest.approx(e0 - relax.energy(x), rel=1e-9)
    assert 0 < quenches[10] <= quenches[20] + 1e-6 <= quenches[40] + 2e-6
    # one stage is the single-count quench of Relaxation.settle_quench
    assert stage_quenches(lambda x, n: relax.settle(x, None, n), lambda x: relax.energy(x),
                          start, [10])[10] == pytest.approx(relax.settle_quench(start, None, 10))


def test_guards_judge_each_stage_against_its_quench(heavy):
    guards = Guards(heavy, GuardConfig(energy_jump_kJ_per_mol=100.0), n_dof=66,
                    temperature_K=300.0)
    guards.record_energy(-1000.0)
    guards.set_settle_quenches({10: 30.0, 20: 50.0, 40: 55.0})
    assert not guards.needs_settle_quench([10, 20, 40])
    assert guards.needs_settle_quench([10, 20]) and guards.needs_settle_quench(10)
    for stage, quench in ((None, 30.0), (10, 30.0), (20, 50.0), (40, 55.0)):
        with guards.judging_settled(True, stage):
            assert guards.energy_reference_kJ_per_mol == pytest.approx(-1000.0 - quench)
            assert guards.settle_quench_kJ_per_mol == quench
    with guards.judging_settled(False, 20):
        assert guards.energy_reference_kJ_per_mol == pytest.approx(-1000.0)
    # a state 75 over the plain reference: 105 over after 10 iterations' quench, 125 after 20
    assert not guards.settled_passes(-925.0, 10) and not guards.settled_passes(-925.0, 20)
    assert guards.settled_passes(-960.0, 10) and not guards.settled_passes(-940.0, 20)
    assert not guards.settled_passes(float("nan"), 10)
    guards.record_settle(20)
    guards.record_settle(10)
    assert guards.summary()["settled"] == 2 and guards.summary()["settle_iterations_used"] == 30
    state = guards.energy_state()
    assert state["settle_quenches"] == [[10, 30.0], [20, 50.0], [40, 55.0]]
    other = Guards(heavy, n_dof=66, temperature_K=300.0)
    other.restore_energy_state(state)
    assert not other.needs_settle_quench([10, 20, 40])
    assert other.summary()["settle_iterations_used"] == 30
    with other.judging_settled(True, 40):
        assert other.settle_quench_kJ_per_mol == 55.0
    # an older release's state: one stage
    old = {k: v for k, v in state.items() if k not in ("settle_quenches", "n_settled",
                                                       "settle_iterations_used")}
    old.update(settle_quench=30.0, settle_quench_iterations=10)
    other.restore_energy_state(old)
    assert not other.needs_settle_quench(10) and other.settle_quench_kJ_per_mol == 30.0


def _openmm_end(heavy, settle: int, threshold: float) -> tuple[np.ndarray, SurrogateSimulation]:
    top, system, _ = alanine_system(None)
    sim = SurrogateSimulation(top, system, heavy, platform=reference_platform(),
                              guards=GuardConfig(action="warn",
                                                 energy_jump_kJ_per_mol=threshold),
                              settle_iterations=settle)
    pos, vel = thermal_start(3)
    sim.context.setPositions(unit.Quantity(pos, A))
    sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
    sim.step(1)
    return sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A), sim


def test_openmm_settles_until_the_energy_check_passes(heavy, relax):
    """A jump end that passes after the first stage stops there (10 iterations); one that never
    passes gets every stage (10 + 10 + 20), the same states as settling by hand; the quenches
    of all stages are measured on the start state."""
    raw, _ = _openmm_end(heavy, 0, 1e9)
    early, sim = _openmm_end(heavy, 40, 1e9)
    np.testing.assert_allclose(early, relax.settle(raw, None, 10), atol=1e-6)
    assert sim.guard_summary()["settle_iterations_used"] == 10
    assert not sim.guards.needs_settle_quench([10, 20, 40])
    start = thermal_start(3)[0]
    quenches = sim.guards.energy_state()["settle_quenches"]
    assert quenches[-1][1] == pytest.approx(
        stage_quenches(lambda x, n: relax.settle(x, None, n), lambda x: relax.energy(x),
                       start, [10, 20, 40])[40], rel=1e-6)
    late, sim = _openmm_end(heavy, 40, 1e-3)
    by_hand = relax.settle(relax.settle(relax.settle(raw, None, 10), None, 10), None, 20)
    np.testing.assert_allclose(late, by_hand, atol=1e-6)
    assert sim.guard_summary()["settle_iterations_used"] == 40
    assert sim.guard_summary()["failures"] == {"energy": 1}
    np.testing.assert_array_equal(late[heavy.model_atoms], raw[heavy.model_atoms])


def test_ase_settles_in_stages_too(heavy):
    used = {}
    for threshold in (1e9, 1e-3):
        atoms = read(str(PDB))
        pos, vel = thermal_start(3)
        atoms.set_positions(pos)
        atoms.set_velocities(vel / PS_IN_ASE_TIME)
        atoms.calc = EMT()
        dyn = SurrogateDynamics(atoms, heavy, settle_iterations=40,
                                guards=GuardConfig(action="warn",
                                                   energy_jump_kJ_per_mol=threshold))
        dyn.run(1)
        used[threshold] = dyn.guards.summary()["settle_iterations_used"]
        assert not dyn.guards.needs_settle_quench([10, 20, 40])
    assert used[1e9] == 10
    assert used[1e-3] == 40
