"""Settling in stages (``settle_iterations`` above 10): 10, 20, 40, ... iterations in all, stopping
at the first stage whose jump end passes the energy check, judged against the reference lowered by
that stage's quench."""

from __future__ import annotations

import numpy as np
import openmm
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


def _openmm_end(heavy, settle: int, passes: bool = True
                ) -> tuple[np.ndarray, SurrogateSimulation]:
    """The end of one jump; ``passes`` False: no settle stage passes the energy check (told
    so: the tiny model's ends sit too close to any small threshold to fail it for sure)."""
    top, system, _ = alanine_system(None)
    sim = SurrogateSimulation(top, system, heavy, platform=reference_platform(),
                              guards=GuardConfig(action="warn", energy_jump_kJ_per_mol=1e9),
                              settle_iterations=settle)
    if not passes:
        sim.guards.settled_passes = lambda energy, stage: False
    pos, vel = thermal_start(3)
    sim.context.setPositions(unit.Quantity(pos, A))
    sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
    sim.step(1)
    return sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A), sim


def test_openmm_settles_until_the_energy_check_passes(heavy, relax):
    """A jump end that passes after the first stage stops there (10 iterations); one that never
    passes gets every stage (10 + 10 + 20), the same states as settling by hand; the quenches
    of all stages are measured on the start state."""
    raw, _ = _openmm_end(heavy, 0)
    early, sim = _openmm_end(heavy, 40)
    np.testing.assert_allclose(early, relax.settle(raw, None, 10), atol=1e-6)
    assert sim.guard_summary()["settle_iterations_used"] == 10
    assert not sim.guards.needs_settle_quench([10, 20, 40])
    start = thermal_start(3)[0]
    quenches = sim.guards.energy_state()["settle_quenches"]
    assert quenches[-1][1] == pytest.approx(
        stage_quenches(lambda x, n: relax.settle(x, None, n), lambda x: relax.energy(x),
                       start, [10, 20, 40])[40], rel=1e-6)
    late, sim = _openmm_end(heavy, 40, passes=False)
    by_hand = relax.settle(relax.settle(relax.settle(raw, None, 10), None, 10), None, 20)
    np.testing.assert_allclose(late, by_hand, atol=1e-6)
    assert sim.guard_summary()["settle_iterations_used"] == 40
    np.testing.assert_array_equal(late[heavy.model_atoms], raw[heavy.model_atoms])


def test_ase_settles_in_stages_too(heavy):
    """A jump end that passes after the first stage stops there; one that passes at no stage
    (the check told so: EMT's energies of this tiny model's ends are too close to any small
    threshold to fail it for sure) is settled through every stage."""
    used = {}
    for passes in (True, False):
        atoms = read(str(PDB))
        pos, vel = thermal_start(3)
        atoms.set_positions(pos)
        atoms.set_velocities(vel / PS_IN_ASE_TIME)
        atoms.calc = EMT()
        dyn = SurrogateDynamics(atoms, heavy, settle_iterations=40,
                                guards=GuardConfig(action="warn"))
        asked = []

        def settled_passes(energy, stage, answer=passes, asked=asked):
            asked.append(stage)
            return answer

        dyn.guards.settled_passes = settled_passes
        dyn.run(1)
        used[passes] = (dyn.guards.summary()["settle_iterations_used"], asked)
        assert not dyn.guards.needs_settle_quench([10, 20, 40])
    assert used[True] == (10, [10])
    assert used[False] == (40, [10, 20])


class _Frames:
    """A reporter keeping the positions (Å) and potential energy of every state it sees."""

    def __init__(self, every: int) -> None:
        self.every, self.positions, self.energies = every, [], []

    def describeNextReport(self, simulation):
        return (self.every - simulation.currentStep % self.every, True, False, False, True)

    def report(self, simulation, state):
        self.positions.append(state.getPositions(asNumpy=True).value_in_unit(A))
        self.energies.append(state.getPotentialEnergy().value_in_unit(KJ_PER_MOL))


def test_reported_intermediate_frames_are_settled_too(heavy, relax):
    """Hybrid mode reports a jump's intermediate frames: a reporter due on one sees it with its
    rebuilt atoms settled as the end's were (the predicted atoms as predicted, the energy lower
    than the rigid rebuild's); without settling it sees the rigid rebuild."""
    seen = {}
    for settle in (0, 10):
        top, system, _ = alanine_system(None)
        integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                     0.002 * unit.picosecond)
        integrator.setRandomNumberSeed(7)  # the same MD segment in both runs
        sim = SurrogateSimulation(top, system, heavy, integrator=integrator,
                                  platform=reference_platform(), guards="warn",
                                  settle_iterations=settle, md_steps=50)
        assert list(sim.steps_per_frame) == [50, 100]  # 0.1 and 0.2 ps of 2 fs steps
        pos, vel = thermal_start(3)
        sim.context.setPositions(unit.Quantity(pos, A))
        sim.context.setVelocities(unit.Quantity(vel, A_PER_PS))
        frames = _Frames(50)
        sim.reporters.append(frames)
        sim.step(1)  # one cycle: the MD segment (reported at its end), the jump's two frames
        assert len(frames.positions) == 3 and sim.n_jumps == 1
        seen[settle] = frames
    ma = heavy.model_atoms
    np.testing.assert_allclose(seen[10].positions[0], seen[0].positions[0], atol=1e-9)  # MD
    raw, settled = seen[0].positions[1], seen[10].positions[1]  # the intermediate frame
    np.testing.assert_allclose(settled[ma], raw[ma], atol=1e-6)
    np.testing.assert_allclose(settled, relax.settle(raw, None, 10), atol=1e-5)
    assert seen[10].energies[1] < seen[0].energies[1] - 1.0


def test_ase_written_intermediate_frames_are_settled_too(heavy, tmp_path):
    """``write_intermediate``: a jump's intermediate frames go to the trajectory with their
    rebuilt atoms settled as the end's were, the predicted atoms as predicted."""
    frames = {}
    for settle in (0, 10):
        atoms = read(str(PDB))
        pos, vel = thermal_start(3)
        atoms.set_positions(pos)
        atoms.set_velocities(vel / PS_IN_ASE_TIME)
        atoms.calc = EMT()
        path = tmp_path / f"settle{settle}.traj"
        dyn = SurrogateDynamics(atoms, heavy, trajectory=str(path), write_intermediate=True,
                                settle_iterations=settle, guards=GuardConfig(action="warn"))
        dyn.run(1)
        dyn.close()
        frames[settle] = read(str(path), ":")
        assert len(frames[settle]) == 1 + len(heavy.times_ps)  # the start, then the jump's
    ma = heavy.model_atoms
    raw, settled = frames[0][1], frames[10][1]  # the jump's intermediate frame
    np.testing.assert_allclose(settled.positions[ma], raw.positions[ma], atol=1e-9)
    assert np.abs(settled.positions - raw.positions).max() > 1e-3
    assert settled.get_potential_energy() < raw.get_potential_energy()


def test_the_guard_summary_log_counts_settling_and_relaxations(heavy, caplog):
    guards = Guards(heavy, n_dof=66, temperature_K=300.0)
    guards.record_settle(10)
    guards.record_settle(40)
    guards.record_relaxation(12)
    with caplog.at_level("INFO", logger="integrations.guards"):
        guards.log_summary()
    text = caplog.text
    assert "2 jump ends settled, to 25.0 iterations each" in text
    assert "1 relaxations, 12.0 minimiser iterations each" in text
