"""Step bookkeeping of SurrogateSimulation with MD that is not a counted step (fallback MD, history
warm-up), and the energy guard's anchor fed by real MD."""

from __future__ import annotations

import MDAnalysis as mda
import numpy as np
import openmm
import pytest
from _integration_fixtures import (
    PDB,
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
    small_egnn_config,
)
from openmm import app, unit

from integrations.guards import GuardConfig, Guards, default_energy_threshold
from integrations.openmm_simulation import (
    SurrogateSimulation,
    degrees_of_freedom,
    potential_energy,
)
from surrogate_md import Surrogate

A = unit.angstrom
PS = unit.picosecond


class StepRecorder:
    """A user reporter recording the step of every report."""

    def __init__(self, interval):
        self.interval = interval
        self.steps = []

    def describeNextReport(self, simulation):
        return {"steps": self.interval - simulation.currentStep % self.interval,
                "periodic": False, "include": []}

    def report(self, simulation, state):
        self.steps.append(simulation.currentStep)


def jump_sim(tmp_path, broken: bool, **kwargs) -> SurrogateSimulation:
    """Jump-step SurrogateSimulation of alanine dipeptide: a NaN-weight egnn whose every jump
    falls back to MD (``broken``), else the analytic linear model whose jumps are all kept."""
    md = cached_md()
    if broken:
        ck = make_checkpoint(md, tmp_path / "nan.pt", model="egnn",
                             model_config=small_egnn_config(), break_weights=True)
    else:
        ck = make_checkpoint(md, tmp_path / "linear.pt", selection="heavy")
    top, system, positions = alanine_system()
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              **kwargs)
    cold_start(sim.context, positions)
    return sim


def test_fallback_md_keeps_reporters_on_their_steps(tmp_path):
    runs = {}
    for broken in (False, True):
        sim = jump_sim(tmp_path, broken, guards="fallback" if broken else "warn")
        recorders = [StepRecorder(k) for k in (1, 2, 3, 4, 5)]
        xtc = tmp_path / f"run-{broken}.xtc"
        sim.reporters += recorders + [app.XTCReporter(str(xtc), 3)]
        after = []  # (step, time ps, positions Å) after every jump
        for _ in range(12):
            sim.step(1)
            st = sim.context.getState(positions=True)
            after.append((sim.currentStep, st.getTime().value_in_unit(PS),
                          st.getPositions(asNumpy=True).value_in_unit(A)))
        assert (sim.n_fallbacks, sim.n_jumps) == ((12, 0) if broken else (0, 12))
        assert sim.currentStep == 12
        runs[broken] = [r.steps for r in recorders]
        jump = sim.surrogate.jump_ps
        del sim  # closes the XTC file
        # every XTC frame holds the state at its stamped time (every 3rd jump end)
        u = mda.Universe(str(PDB), str(xtc))
        assert len(u.trajectory) == 4
        for ts, (step, time_ps, positions) in zip(u.trajectory, after[2::3]):
            assert step == ts.frame * 3 + 3
            assert ts.time == pytest.approx(time_ps, abs=1e-4)
            assert ts.time == pytest.approx(step * jump, abs=1e-4)
            np.testing.assert_allclose(ts.positions, positions, atol=0.01)
    assert runs[True] == runs[False] == [list(range(k, 13, k)) for k in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize(("stride", "guards"), [(2, "warn"), (2, "fallback"), (1, "warn")])
def test_history_warm_up_md_is_outside_the_step_count(tmp_path, stride, guards):
    # ESTAG: 4-frame jumps (0.04 ps), output frames 2 frames apart, 3 input frames ``stride``
    # frames apart; stride 1 rebuilds the history by MD before every jump
    ck = make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag", selection="heavy",
                         jump_frames=4, n_out=2, history=3, history_stride=stride,
                         break_weights=guards == "fallback")
    top, system, positions = alanine_system()
    # every state of real MD counts for the anchor here, however short the MD (0.04 ps) and
    # however cold the state it started from (cold_start: 0.05 K)
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              guards=GuardConfig(action=guards, anchor_md_ps=0.0,
                                                 cold_md_fraction=0.0))
    cold_start(sim.context, positions)
    rec = StepRecorder(1)
    sim.reporters.append(rec)
    sim.step(3)
    assert rec.steps == [1, 2, 3]
    assert sim.currentStep == 3 == sim.n_jumps + sim.n_fallbacks
    warm_ups = 1 if stride == 2 else 3
    time_ps = sim.context.getState().getTime().value_in_unit(PS)
    assert time_ps == pytest.approx(warm_ups * 2 * stride * 0.01 + 3 * 0.04, abs=1e-9)
    # the warm-up's end state (and a fallback's) is real MD: its energy may move the anchor
    assert len(sim.guards._md_energies) == (warm_ups if guards == "warn" else 3)


@pytest.mark.parametrize("mode", ["jumps", "fallback", "hybrid"])
def test_engine_records_real_md_energies_for_the_guard_anchor(tmp_path, mode):
    # every state of real MD counts here, however short the MD (0.01-0.02 ps) and however cold
    # the state it started from (cold_start: 0.05 K)
    warn = GuardConfig(action="warn", anchor_md_ps=0.0, cold_md_fraction=0.0)
    if mode == "jumps":  # no real MD at all: the guard's anchor is the start's, as ever
        # (unsettled hydrogens: settled jump ends would stay out of the window)
        sim = jump_sim(tmp_path, broken=False, guards=warn, settle_iterations=0)
    elif mode == "fallback":
        sim = jump_sim(tmp_path, broken=True,
                       guards=GuardConfig(action="fallback", anchor_md_ps=0.0,
                                          cold_md_fraction=0.0))
    else:
        sim = jump_sim(tmp_path, broken=False, guards=warn, md_steps=5)
    sim.step(4)
    md_energies = list(sim.guards._md_energies)
    summary = sim.guards.summary()
    if mode == "jumps":
        assert md_energies == [] and summary["energy_anchor_from"] == "start"
        assert len(sim.guards._energies) == 4
        return
    # hybrid: every jump starts from the end of an MD segment; fallback: from the end of the
    # previous jump's fallback MD (the first jump starts from the user's state)
    assert len(md_energies) == (4 if mode == "hybrid" else 3)
    assert summary["energy_anchor_from"] == "md"
    assert summary["energy_anchor_kJ_per_mol"] == pytest.approx(float(np.median(md_energies)))
    # moving atoms by hand after fallback MD: the state is no longer real MD's
    if mode == "fallback":
        x = sim.context.getState(positions=True).getPositions(asNumpy=True)
        x[0] += 0.001 * unit.nanometer
        sim.context.setPositions(x)
        sim.step(1)
        assert len(sim.guards._md_energies) == 3 and len(sim.guards._energies) == 5


def test_only_long_enough_md_moves_the_anchor(tmp_path):
    """A state a few MD steps after a jump still carries the jump's energy: it counts for the
    anchor only after ``anchor_md_ps`` of MD since the surrogate's last state. Hybrid segments
    of 5 steps (0.01 ps) count only where that is enough; fallback MD adds up over consecutive
    fallbacks (0.02 ps each: the third jump starts from 0.04 ps of MD). MD from cold_start's
    0.05 K states counts here (cold_md_fraction 0): the time rule is under test."""
    step_ps = 0.002
    for anchor_ps, counted in ((5 * step_ps, 4), (6 * step_ps, 0), (1.0, 0)):
        sim = jump_sim(tmp_path, broken=False, md_steps=5,
                       guards=GuardConfig(action="warn", anchor_md_ps=anchor_ps,
                                          cold_md_fraction=0.0))
        assert sim.md_step_ps == pytest.approx(step_ps)
        sim.step(4)
        assert len(sim.guards._md_energies) == counted, anchor_ps
        assert len(sim.guards._energies) == 4
        assert sim.guards.summary()["energy_anchor_from"] == ("md" if counted else "start")
    sim = jump_sim(tmp_path, broken=True,
                   guards=GuardConfig(action="fallback", anchor_md_ps=0.035,
                                      cold_md_fraction=0.0))
    jump_ps = sim.surrogate.jump_ps
    assert 0.035 / 2 < jump_ps < 0.035  # the second fallback's end is the first to count
    sim.step(5)
    assert sim.n_fallbacks == 5
    assert len(sim.guards._md_energies) == 3  # jumps 3, 4, 5 start from >= 2 fallbacks of MD


def test_short_hybrid_md_cannot_ratchet_the_anchor_up():
    """A surrogate that heats the system a little per jump (the rise over the recent median
    stays under the threshold), with a
    short MD segment before each jump that keeps the excess (hybrid mode with few md_steps):
    counted as real MD, its states would lift the anchor with them and every jump would pass
    for ever; counted as the surrogate's (the default anchor_md_ps), the start caps the
    reference and the guard fails the jumps once they are a threshold above it."""
    class Stub:  # what Guards reads from a Surrogate
        validity = None
        model_atoms = np.arange(3)
        topology = {}
        n_atoms = 3

    x = np.array([[0.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0]])
    runs = {}
    for anchor_ps in (0.0, 1.0):
        g = Guards(Stub(), GuardConfig(action="warn", energy_jump_kJ_per_mol=10.0,
                                       anchor_md_ps=anchor_ps))
        for e in (0.0, 1.0, -1.0):
            g.record_energy(e)  # the start
        energy, failed = 0.0, []
        for jump in range(200):
            g.record_md_energy(energy, md_ps=0.05)  # 0.05 ps of MD after the last jump
            energy += 1.5  # the jump heats by 1.5 kJ/mol: 8.25 over the median of the last 10
            failed.append(bool(g.check(x, energy_kJ_per_mol=energy, jump=jump)))
        runs[anchor_ps] = (failed, g.energy_anchor_kJ_per_mol)
    failed, anchor = runs[0.0]
    assert not any(failed) and anchor > 250.0  # the ratchet: 300 kJ/mol up, nothing failed
    failed, anchor = runs[1.0]
    # the anchor is the run's first energy, the start's
    assert anchor == 0.0 and not any(failed[:5]) and all(failed[12:])


def test_the_surrogates_first_states_cannot_lift_the_anchor():
    """Jumps accepted each up to a threshold above the last (relaxed ones leave the window, so
    a model's first accepted states can climb): only the start's energy anchors the cap, so the
    climb fails after one threshold. With the median of the first 10 energies as the anchor
    (the earlier rule) the climb lifted the cap by 5 thresholds and ran on unchecked."""
    class Stub:
        validity = None
        model_atoms = np.arange(3)
        topology = {}
        n_atoms = 3

    x = np.array([[0.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0]])
    g = Guards(Stub(), GuardConfig(action="warn", energy_jump_kJ_per_mol=10.0))
    g.record_energy(0.0)  # the start, a state of MD
    energy, failed = 0.0, []
    for jump in range(30):
        energy += 9.0  # under the threshold above the recent median while the window is short
        failed.append(bool(g.check(x, energy_kJ_per_mol=energy, jump=jump)))
        g.record_energy(energy)  # accepted (warn), the next jump's start
    assert g.energy_anchor_kJ_per_mol == 0.0
    assert g.energy_reference_kJ_per_mol <= 0.0
    assert not failed[0] and all(failed[1:])
    # a restart from a state an earlier release saved (its anchor: the first 10 energies, the
    # start's and nine of the climb) keeps the start's alone
    state = g.energy_state()
    state["anchor"] = [0.0] + [9.0 * k for k in range(1, 10)]
    again = Guards(Stub(), GuardConfig(action="warn", energy_jump_kJ_per_mol=10.0))
    again.restore_energy_state(state)
    assert again.energy_anchor_kJ_per_mol == 0.0


@pytest.mark.parametrize("end_velocities", ["difference", "thermal"])
def test_md_from_cold_jump_ends_does_not_move_the_anchor(tmp_path, end_velocities):
    """Hybrid mode, every state of MD counting however short the MD (anchor_md_ps 0), the
    ``constant`` model from cold_start (0.05 K): its kept ends carry zero difference
    velocities (a deterministic model's are nearly as cold on a protein), and the MD segment
    after each one heats the structure rather than samples it: no segment moves the anchor
    (before, all four did). With thermal end velocities (seeded) the segments after the first
    jump start at ~300 K and count."""
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", model="constant", selection="heavy")
    top, system, positions = alanine_system()
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              md_steps=5, end_velocities=end_velocities, velocity_seed=1,
                              guards=GuardConfig(action="warn", anchor_md_ps=0.0))
    cold_start(sim.context, positions)
    sim.step(4)
    assert sim.n_jumps == 4 and len(sim.guards._energies) == 4
    counted = len(sim.guards._md_energies)
    if end_velocities == "difference":
        assert counted == 0 and sim.guards.summary()["energy_anchor_from"] == "start"
    else:  # the first segment runs from cold_start's 0.05 K
        assert counted == 3 and sim.guards.summary()["energy_anchor_from"] == "md"


def test_md_run_by_hand_from_a_cold_jump_end_counts_as_none(tmp_path):
    """SurrogateSimulation.run_md, called by the user after a jump whose end is at 0 K (the
    constant model): that MD heats, so the next jump's start does not move the anchor; run
    from a thermal state it does."""
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", model="constant", selection="heavy")
    top, system, positions = alanine_system()
    counted = []
    for thermal in (False, True):
        sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                                  guards=GuardConfig(action="warn", anchor_md_ps=0.0))
        cold_start(sim.context, positions)
        sim.step(1)
        if thermal:
            sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 4)
        sim.run_md(5)
        assert sim._md_ps == (pytest.approx(5 * sim.md_step_ps) if thermal else 0.0)
        sim.step(1)
        counted.append(len(sim.guards._md_energies))
    assert counted == [0, 1]


def reporter_anchor_counts(tmp_path, **guard_options) -> tuple[int, int]:
    """(real-MD energies, all energies) a SurrogateJumpReporter recorded in 12 MD steps of 0.5 fs
    of alanine dipeptide from cold_start (0.05 K), a linear-model jump every 4 steps."""
    from integrations.openmm_simulation import SurrogateJumpReporter

    ck = make_checkpoint(cached_md(), tmp_path / "lin.pt", selection="heavy")
    top, system, positions = alanine_system()
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * PS), reference_platform())
    cold_start(sim.context, positions)
    jumper = SurrogateJumpReporter(ck, interval=4,
                                   guards=GuardConfig(action="warn", **guard_options))
    sim.reporters.append(jumper)
    sim.step(12)
    assert jumper.n_jumps == 3
    return len(jumper.guards._md_energies), len(jumper.guards._energies)


def test_jump_reporter_does_not_count_md_from_cold_jump_ends(tmp_path):
    """SurrogateJumpReporter: the Simulation's MD from a cold kept jump end (the linear model
    keeps the 0.05 K) until the next jump counts as no MD time: only the first interval, from
    the user's state, moves the anchor (before, all three did, as with cold_md_fraction 0)."""
    assert reporter_anchor_counts(tmp_path, anchor_md_ps=0.002) == (1, 3)
    assert reporter_anchor_counts(tmp_path, anchor_md_ps=0.002, cold_md_fraction=0.0) == (3, 3)


def test_real_md_energies_lift_the_anchor_from_a_minimised_start(tmp_path):
    """A perfect surrogate (here: real MD itself) after a cold minimised start, fed to the guard
    as hybrid mode does (the energy of the state after each MD segment, then the check of the
    state one 'jump' later). Energies recorded as a surrogate's leave the anchor at the cold
    start and reject most thermal states; recorded as real MD they lift it, and every state is
    accepted. Alanine dipeptide's thermal rise (~n_dof/2 kT, five standard deviations) is below
    the default 8-sigma threshold, so a 3-sigma one stands in for a large system (beyond ~256
    degrees of freedom the rise exceeds 8 sigma)."""
    surrogate = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "a.pt"))
    top, system, positions = alanine_system()
    n_dof = degrees_of_freedom(system)
    config = GuardConfig(action="fallback",
                         energy_jump_kJ_per_mol=3 / 8 * default_energy_threshold(n_dof, 300.0))
    as_surrogate, as_md = Guards(surrogate, config, n_dof), Guards(surrogate, config, n_dof)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / PS, 0.002 * PS)
    integrator.setRandomNumberSeed(3)
    context = openmm.Context(system, integrator, reference_platform())
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 0)  # minimizeEnergy()
    context.setVelocitiesToTemperature(1 * unit.kelvin, 3)  # then heated by the thermostat
    for guards in (as_surrogate, as_md):
        guards.record_energy(potential_energy(context))  # the user's start state
    x = cached_md()["frames"][0]  # the geometric checks are not under test
    accepted = {id(as_surrogate): [], id(as_md): []}
    for _ in range(150):  # md_steps=20, then a 'jump' of 10 MD steps: 9 ps in all
        integrator.step(20)
        energy = potential_energy(context)
        as_surrogate.record_energy(energy)
        as_md.record_md_energy(energy)
        integrator.step(10)
        energy = potential_energy(context)
        for guards in (as_surrogate, as_md):
            accepted[id(guards)].append(not guards.check(x, energy_kJ_per_mol=energy))
    assert all(accepted[id(as_md)])
    assert sum(accepted[id(as_surrogate)][-50:]) < 40  # frozen at the cold start
    assert as_md.energy_anchor_kJ_per_mol > as_surrogate.energy_anchor_kJ_per_mol + 20.0


def test_jump_reporter_resumed_counts_the_md_since_the_restart_as_none(tmp_path):
    """A SurrogateJumpReporter on a Simulation resumed from a checkpoint of a run with jumps
    cannot know whether the last jump left a cold state: the MD up to the first report after
    the restart is recorded as the surrogate's (before, as one interval of real MD since a
    jump, which moved the anchor); the reports after it count again."""
    from integrations.openmm_simulation import SurrogateJumpReporter

    ck = make_checkpoint(cached_md(), tmp_path / "lin.pt", selection="heavy")
    top, system, positions = alanine_system()
    guards = GuardConfig(action="warn", anchor_md_ps=0.002, cold_md_fraction=0.0)
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * PS), reference_platform())
    cold_start(sim.context, positions)
    sim.reporters.append(SurrogateJumpReporter(ck, interval=4, guards=guards))
    sim.step(8)
    chk = tmp_path / "run.chk"
    sim.saveCheckpoint(str(chk))
    again = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * PS),
                           reference_platform())
    again.loadCheckpoint(str(chk))
    jumper = SurrogateJumpReporter(ck, interval=4, guards=guards)
    again.reporters.append(jumper)
    again.step(4)
    assert jumper.n_jumps == 1
    assert (len(jumper.guards._md_energies), len(jumper.guards._energies)) == (0, 1)
    again.step(8)
    assert (len(jumper.guards._md_energies), len(jumper.guards._energies)) == (2, 3)


def test_jump_reporter_counts_the_simulations_md_since_the_last_jump(tmp_path):
    """SurrogateJumpReporter: the Simulation's own MD between jumps moves the anchor only when
    ``interval`` steps are at least ``anchor_md_ps`` (here 4 steps of 0.5 fs = 2 fs; MD from
    the 0.05 K states counts, cold_md_fraction 0)."""
    for anchor_ps, counted in ((0.002, (3, 3)), (0.0021, (0, 3))):
        assert reporter_anchor_counts(tmp_path, anchor_md_ps=anchor_ps,
                                      cold_md_fraction=0.0) == counted, anchor_ps


def test_propagator_without_history_says_what_is_missing(tmp_path):
    from integrations.propagator import SurrogatePropagator
    from surrogate_md.errors import EngineError

    md = cached_md()
    sur = Surrogate.load(make_checkpoint(md, tmp_path / "estag.pt", model="estag",
                                         selection="heavy", jump_frames=4, n_out=2, history=3,
                                         history_stride=2))
    prop = SurrogatePropagator(sur)
    x = md["frames"][40]
    with pytest.raises(EngineError, match=r"no state observed at t = -0\.0400, -0\.0200 ps"):
        prop.jump(x, np.zeros_like(x), 0.0)
    for k, t in enumerate((-0.04, -0.02)):
        prop.observe(t, md["frames"][36 + 2 * k])
    assert np.isfinite(prop.jump(x, np.zeros_like(x), 0.0).positions_A).all()


def test_interrupted_jump_leaves_the_state_it_started_from(tmp_path, monkeypatch):
    """Ctrl-C while a jump's end state is being checked: the Context goes back to the jump's
    start (step, time, positions), never keeps an unchecked prediction."""
    sim = jump_sim(tmp_path, broken=False, guards="warn")
    sim.step(2)
    before = sim.context.getState(positions=True, velocities=True)
    x0 = before.getPositions(asNumpy=True).value_in_unit(unit.angstrom)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim.guards, "check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sim.step(1)
    after = sim.context.getState(positions=True)
    assert sim.currentStep == 2
    assert after.getTime() == before.getTime()
    np.testing.assert_allclose(after.getPositions(asNumpy=True).value_in_unit(unit.angstrom),
                               x0, atol=1e-6)


def test_jump_reporter_after_a_restart_counts_one_interval_of_md(tmp_path):
    """A fresh SurrogateJumpReporter on a Simulation whose time is ahead of its steps (jumps
    were taken before, e.g. a checkpoint restart): the MD since the last jump is one interval,
    not every step since step 0."""
    from integrations.openmm_simulation import SurrogateJumpReporter

    ck = make_checkpoint(cached_md(), tmp_path / "lin.pt", selection="heavy")
    top, system, positions = alanine_system()
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * PS), reference_platform())
    cold_start(sim.context, positions)
    config = GuardConfig(action="warn", anchor_md_ps=0.0021)  # above 4 steps of 0.5 fs
    sim.reporters.append(SurrogateJumpReporter(ck, interval=4, guards=config))
    sim.step(12)
    sim.reporters.clear()
    restarted = SurrogateJumpReporter(ck, interval=4, guards=config)
    sim.reporters.append(restarted)
    sim.step(4)
    assert restarted.n_jumps == 1 and len(restarted.guards._md_energies) == 0


@pytest.mark.parametrize("save", ["checkpoint", "state"])
def test_restart_from_a_checkpoint_goes_on_as_the_run_would_have(tmp_path, save):
    """A history model (ESTAG) with thermal end velocities: saved after 4 of 8 jumps and
    loaded into a new SurrogateSimulation, the run takes the same 4 jumps as without the
    restart (the remembered history, the velocity draws' generator, the guards' energies and
    the jump count come back from <file>.surrogate.npz; before, the history was rebuilt by MD
    and the draws started over)."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag",
                                         selection="heavy", jump_frames=4, n_out=2, history=3,
                                         history_stride=2))
    top, system, positions = alanine_system()

    def new():
        return SurrogateSimulation(top, system, sur, platform=reference_platform(),
                                   guards="warn", end_velocities="thermal", velocity_seed=5,
                                   integrator=openmm.VerletIntegrator(0.002 * PS))

    a = new()
    cold_start(a.context, positions)
    a.prepare_history(reset_clock=True)
    a.step(8)
    b = new()
    cold_start(b.context, positions)
    b.prepare_history(reset_clock=True)
    b.step(4)
    path = tmp_path / f"run.{save}"
    (b.saveCheckpoint if save == "checkpoint" else b.saveState)(str(path))
    c = new()
    (c.loadCheckpoint if save == "checkpoint" else c.loadState)(str(path))
    assert c.n_jumps == 4 and c.propagator.has_history(4 * sur.jump_ps)
    assert c.guards.energy_state() == b.guards.energy_state()
    c.step(4)
    assert c.n_jumps == 8 and c.currentStep == a.currentStep == 8
    sa = a.context.getState(positions=True, velocities=True)
    sc = c.context.getState(positions=True, velocities=True)
    assert sc.getTime() == sa.getTime()
    np.testing.assert_allclose(sc.getPositions(asNumpy=True)._value,
                               sa.getPositions(asNumpy=True)._value, atol=1e-6)
    np.testing.assert_allclose(sc.getVelocities(asNumpy=True)._value,
                               sa.getVelocities(asNumpy=True)._value, atol=1e-6)
    # a memory file saved at another time than the state loaded is not used
    b.step(1)
    b.saveCheckpoint(str(tmp_path / "later.chk"))
    (tmp_path / "run.other.surrogate.npz").write_bytes(
        (tmp_path / "later.chk.surrogate.npz").read_bytes())
    (tmp_path / "run.other").write_bytes(path.read_bytes())
    if save == "checkpoint":
        d = new()
        d.loadCheckpoint(str(tmp_path / "run.other"))
        assert d.n_jumps == 0 and not d.propagator.has_history(4 * sur.jump_ps)
