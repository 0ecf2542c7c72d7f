"""Guards trip on broken surrogates and each action does what it says; reconstruction geometry."""

from __future__ import annotations

import numpy as np
import openmm
import pytest
from _integration_fixtures import (
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
    small_egnn_config,
)
from openmm import unit

from integrations.guards import GuardConfig, Guards
from integrations.openmm_simulation import SurrogateSimulation
from integrations.reconstruct import Reconstructor, kabsch
from surrogate_md import Surrogate
from surrogate_md.errors import ConfigError, GuardError

A = unit.angstrom
KJ = unit.kilojoule_per_mole


def state_of(sim):
    st = sim.context.getState(positions=True, energy=True)
    return (st.getPositions(asNumpy=True).value_in_unit(A),
            st.getTime().value_in_unit(unit.picosecond),
            st.getPotentialEnergy().value_in_unit(KJ))


def broken_sim(tmp_path, action, kind="nan"):
    md = cached_md()
    if kind == "nan":  # corrupted weights: every prediction is NaN
        ck = make_checkpoint(md, tmp_path / "nan.pt", model="egnn",
                             model_config=small_egnn_config(), break_weights=True)
    else:  # a linear model fed a far too hot state: bonds fly apart within one jump
        ck = make_checkpoint(md, tmp_path / "hot.pt", model="linear", selection="heavy")
    top, system, positions = alanine_system()
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              guards=action)
    cold_start(sim.context, positions)
    if kind == "hot":
        sim.context.setVelocitiesToTemperature(20000 * unit.kelvin, 3)
    return sim


@pytest.mark.parametrize("kind", ["nan", "hot"])
def test_raise_restores_the_state_and_names_the_check(tmp_path, kind):
    sim = broken_sim(tmp_path, "raise", kind)
    x0, t0, _ = state_of(sim)
    with pytest.raises(GuardError, match="non_finite" if kind == "nan" else "bond"):
        sim.step(1)
    x1, t1, _ = state_of(sim)
    np.testing.assert_allclose(x1, x0, atol=1e-9)
    assert t1 == t0 and sim.currentStep == 0
    assert sim.guards.summary()["actions"] == {"raise": 1}


def test_fallback_replaces_broken_jumps_with_md(tmp_path):
    sim = broken_sim(tmp_path, "fallback", "nan")
    sim.step(3)
    x, t, e = state_of(sim)
    assert sim.n_fallbacks == 3 and sim.n_jumps == 0
    assert t == pytest.approx(3 * sim.surrogate.jump_ps, abs=1e-9)
    assert sim.currentStep == 3 * sim.steps_per_jump
    assert np.isfinite(x).all() and np.isfinite(e)
    assert sim.guards.counts["non_finite"] == 3


def test_warn_keeps_the_jump_and_counts_it(tmp_path):
    sim = broken_sim(tmp_path, "warn", "hot")
    x0, _, e0 = state_of(sim)
    sim.step(2)
    x, t, e = state_of(sim)
    assert sim.n_jumps == 2 and sim.n_fallbacks == 0
    assert sim.guards.counts["bond"] == 2
    assert e > e0 + 1000  # the unphysical state was kept, as asked
    # a NaN jump cannot be kept even under 'warn': it falls back to MD
    nan = broken_sim(tmp_path, "warn", "nan")
    nan.step(1)
    assert nan.n_fallbacks == 1 and np.isfinite(state_of(nan)[0]).all()


def test_guard_events_after_the_first_ones_go_to_debug(tmp_path, caplog, monkeypatch):
    """A run whose every jump fails a check wrote one warning per jump (1000 for a 1000-jump
    relaxed AdK run): the first WARNED_EVENTS are warnings, a line says the rest go to DEBUG,
    and the tallies still count every event; the events kept are the most recent ones."""
    import logging

    import integrations.guards as G

    monkeypatch.setattr(G, "WARNED_EVENTS", 3)
    sim = broken_sim(tmp_path, "warn", "hot")
    sim.guards.events = type(sim.guards.events)(maxlen=4)
    with caplog.at_level(logging.DEBUG, logger="integrations.guards"):
        sim.step(6)
    records = [r for r in caplog.records if r.name == "integrations.guards"]
    events = [r for r in records if " -> " in r.getMessage()]
    total = sum(sim.guards.counts.values())
    assert sim.guards.counts["bond"] == 6 and len(events) == total > 6
    assert [r.levelno for r in events] == [logging.WARNING] * 3 + [logging.DEBUG] * (total - 3)
    notice = [r for r in records if "further ones are logged at DEBUG" in r.getMessage()]
    assert len(notice) == 1 and notice[0].levelno == logging.WARNING
    assert [f"guard: {e.describe()} -> warn" for e in sim.guards.events] == [
        r.getMessage() for r in events[-4:]]


def test_relax_minimises_or_falls_back(tmp_path):
    warned = broken_sim(tmp_path, "warn", "hot")
    warned.step(1)
    e_raw = state_of(warned)[2]
    sim = broken_sim(tmp_path, "relax", "hot")
    sim.step(1)
    _, t, e = state_of(sim)
    assert t == pytest.approx(sim.surrogate.jump_ps, abs=1e-9)
    assert sim.guards.actions["relax"] == 1
    assert e < e_raw  # minimised (or replaced by MD when minimising was not enough)
    assert sim.n_jumps + sim.n_fallbacks == 1


def test_a_size_failure_falls_back_without_a_relaxation(tmp_path):
    """A jump end smaller than the radius-of-gyration range allows is not minimised (a
    minimiser does not expand a compacted molecule): action relax falls back to MD at once."""
    ck = make_checkpoint(cached_md(), tmp_path / "a.pt")
    surrogate = Surrogate.load(ck)
    rg = surrogate.validity.gyration_range_A
    assert rg is not None and 0 < rg[0] < rg[1]
    top, system, positions = alanine_system()
    tight = (2.0 * rg[1], 2.1 * rg[1])  # every state is smaller than this
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                              guards=GuardConfig(action="relax", gyration_range_A=tight))
    cold_start(sim.context, positions)
    sim.step(2)
    assert sim.n_fallbacks == 2 and sim.n_jumps == 0
    assert sim.guards.counts["size"] == 2 and sim.guards.actions == {"fallback": 2}
    assert sim.guards.summary()["relaxations"] == 0
    assert sim.guards.summary()["thresholds"]["gyration_range_A"] == list(tight)
    with pytest.raises(ConfigError, match="gyration_range_A"):
        GuardConfig(gyration_range_A=(2.0, 1.0))


def test_relax_stops_once_the_state_is_back_at_the_median(tmp_path):
    """The relax action minimises only as far as needed: it stops at the first minimiser
    iteration whose state passes every guard with its energy back at the recent median, well
    inside its iteration budget and above the energy a full minimisation reaches."""
    import openmm

    md = cached_md()
    ck = make_checkpoint(md, tmp_path / "warm.pt", model="linear", selection="heavy")
    top, system, positions = alanine_system()
    budget = 1000
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              guards=GuardConfig(action="relax", relax_iterations=budget))
    cold_start(sim.context, positions)
    sim.context.setVelocitiesToTemperature(3000 * unit.kelvin, 3)
    sim.step(1)
    summary = sim.guard_summary()
    assert sim.n_jumps == 1 and sim.n_fallbacks == 0
    assert summary["failures"].get("energy") == 1  # the raw jump was too hot
    assert summary["relaxations"] == 1 and summary["jumps_checked"] == 1
    assert 0 < summary["relax_iterations_used"] < budget
    median = float(np.median(sim.guards._energies))
    x_stop, _, e_stop = state_of(sim)
    assert e_stop <= median + 1e-6  # in the engine, with its constraints satisfied again
    assert constraint_error_A(system, x_stop) < 1e-3
    openmm.LocalEnergyMinimizer.minimize(sim.context, 1.0, 0)  # to convergence
    assert state_of(sim)[2] < e_stop - 0.1
    with pytest.raises(ConfigError, match="relax_energy_target"):
        GuardConfig(action="relax", relax_energy_target_kJ_per_mol=float("nan"))


def constraint_error_A(system, positions_A) -> float:
    """Largest |distance - constraint length| (Å) over the System's constraints."""
    worst = 0.0
    for i in range(system.getNumConstraints()):
        a, b, d = system.getConstraintParameters(i)
        r = np.linalg.norm(positions_A[a] - positions_A[b])
        worst = max(worst, abs(r - d.value_in_unit(A)))
    return worst


def test_flexible_copy_keeps_the_force_field_and_drops_the_constraints():
    """The relaxation System: constraints become stiff bonds at the constraint lengths, so at a
    constrained geometry both Systems give the same energy; the engine's System is untouched."""
    import openmm

    from integrations.openmm_simulation import flexible_system

    _, system, positions = alanine_system()
    n = system.getNumConstraints()
    assert n > 0
    flexible = flexible_system(system)
    assert flexible.getNumConstraints() == 0 and system.getNumConstraints() == n
    assert flexible.getNumForces() == system.getNumForces() + 1
    bonds = flexible.getForce(flexible.getNumForces() - 1)
    assert isinstance(bonds, openmm.HarmonicBondForce) and bonds.getNumBonds() == n
    energies = []
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    ctx.setPositions(positions)
    ctx.applyConstraints(1e-8)
    constrained = ctx.getState(positions=True).getPositions()
    for s in (system, flexible):
        c = openmm.Context(s, openmm.VerletIntegrator(0.001), reference_platform())
        c.setPositions(constrained)
        energies.append(c.getState(energy=True).getPotentialEnergy().value_in_unit(KJ))
    assert energies[1] == pytest.approx(energies[0], abs=1e-4)
    # stretched by 0.1 Å, a constrained bond costs energy only in the flexible copy
    a, b, _ = system.getConstraintParameters(0)
    x = np.array(constrained.value_in_unit(A))
    x[b] += 0.1 * (x[b] - x[a]) / np.linalg.norm(x[b] - x[a])
    c = openmm.Context(flexible, openmm.VerletIntegrator(0.001), reference_platform())
    c.setPositions(x * A)
    assert c.getState(energy=True).getPotentialEnergy().value_in_unit(KJ) > energies[0] + 10


def test_relax_in_implicit_solvent_starts_without_the_solvent(tmp_path, monkeypatch):
    """With implicit solvent the relaxation first minimises a copy without the solvent force
    (cheaper per iteration); the state it accepts is checked with the full force field."""
    from datagen.openmm_md import prepare_system
    from integrations.openmm_simulation import Relaxation

    ck = make_checkpoint(cached_md(), tmp_path / "warm.pt", model="linear", selection="heavy")
    prepared = prepare_system("alanine-dipeptide", solvent="implicit")
    names = {type(f).__name__ for f in prepared.system.getForces()}
    assert "GBSAOBCForce" in names
    sim = SurrogateSimulation(prepared.topology, prepared.system, Surrogate.load(ck),
                              platform=reference_platform(),
                              guards=GuardConfig(action="relax", relax_iterations=1000))
    cold_start(sim.context, prepared.positions)
    sim.context.setVelocitiesToTemperature(3000 * unit.kelvin, 3)
    stages = []
    minimise = Relaxation.minimise

    def spy(self, *args, **kwargs):
        stages.append(kwargs.get("solvent_free", False))
        return minimise(self, *args, **kwargs)

    monkeypatch.setattr(Relaxation, "minimise", spy)
    sim.step(1)
    summary = sim.guard_summary()
    assert summary["failures"].get("energy") == 1 and summary["relaxations"] == 1
    assert sim.n_jumps == 1 and stages and stages[0] is True
    dry = {type(f).__name__ for f in sim._relaxation().solvent_free.getSystem().getForces()}
    assert "GBSAOBCForce" not in dry and "NonbondedForce" in dry
    # the solvent-free stage recorded how far the full force field fell per kJ/mol of its own
    assert len(sim._relaxation()._drop_ratios) == 1 and sim._relaxation().drop_ratio > 0
    x, _, e = state_of(sim)
    assert sim.guards.energy_rise(e) <= 1e-6  # full force field, as the engine holds it
    assert constraint_error_A(prepared.system, x) < 1e-3
    _, vacuum, _ = alanine_system()
    assert Relaxation(vacuum, reference_platform()).solvent_free is None


def test_solvent_free_copies_take_a_shorter_cutoff():
    """The solvent-free copies (relaxation and settling) of an implicit-solvent System run at
    most at SOLVENT_FREE_CUTOFF_NM; the copy that judges keeps the System's cutoff, and so does a
    System whose cutoff is shorter already or that has no implicit solvent (PME untouched)."""
    from datagen.openmm_md import prepare_system
    from integrations.openmm_simulation import SOLVENT_FREE_CUTOFF_NM, Relaxation, shorten_cutoff

    def cutoff(system):
        (force,) = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
        return force.getCutoffDistance().value_in_unit(unit.nanometer)

    prepared = prepare_system("alanine-dipeptide", solvent="implicit", cutoff_nm=1.2)
    x = np.asarray(prepared.positions.value_in_unit(unit.angstrom))
    relax = Relaxation(prepared.system, reference_platform(), restrained_atoms=[0])
    assert SOLVENT_FREE_CUTOFF_NM < 1.2
    assert cutoff(relax.solvent_free.getSystem()) == pytest.approx(SOLVENT_FREE_CUTOFF_NM)
    assert cutoff(relax.context.getSystem()) == pytest.approx(1.2)
    assert cutoff(prepared.system) == pytest.approx(1.2)  # the engine's System is not changed
    relax.settle(x, None, 1)
    assert cutoff(relax._settling.getSystem()) == pytest.approx(SOLVENT_FREE_CUTOFF_NM)
    # the solvent-free energy is that of the shorter cutoff (it differs from the System's)
    keep = Relaxation(prepared.system, reference_platform(), solvent_free_cutoff_nm=None)
    assert cutoff(keep.solvent_free.getSystem()) == pytest.approx(1.2)
    assert relax.solvent_free_energy(x) != pytest.approx(keep.solvent_free_energy(x), rel=1e-6)
    assert relax.energy(x) == pytest.approx(keep.energy(x), rel=1e-9)
    short = prepare_system("alanine-dipeptide", solvent="implicit", cutoff_nm=0.6)
    assert cutoff(Relaxation(short.system, reference_platform()).solvent_free.getSystem()) == \
        pytest.approx(0.6)
    pme = openmm.NonbondedForce()
    pme.setNonbondedMethod(openmm.NonbondedForce.PME)
    pme.setCutoffDistance(1.2)
    box = openmm.System()
    box.addForce(pme)
    shorten_cutoff(box, 0.8)
    assert cutoff(box) == pytest.approx(1.2)


@pytest.mark.parametrize("rounds_lower_it,redraw_left", [(True, False), (False, False),
                                                          (False, True)])
def test_relax_goes_on_in_solvent_free_rounds_judged_in_the_full_force_field(
        tmp_path, monkeypatch, rounds_lower_it, redraw_left):
    """A first solvent-free stage that stops short of the target is followed by rounds of the
    solvent-free copy, each judged once in the full force field: they finish the relaxation
    without a single full-force-field iteration while they lower its energy, and hand over to
    the full force field as soon as a round does not, unless the jump can be drawn again: then
    the relaxation fails there."""
    from datagen.openmm_md import prepare_system
    from integrations import openmm_simulation as oms
    from integrations.openmm_simulation import Relaxation

    ck = make_checkpoint(cached_md(), tmp_path / "warm.pt", model="linear", selection="heavy")
    prepared = prepare_system("alanine-dipeptide", solvent="implicit")
    # a target the solvent-free minimum reaches in the full force field (on this peptide the
    # full minimum lies ~10 kJ/mol below the solvent-free one's)
    sim = SurrogateSimulation(prepared.topology, prepared.system, Surrogate.load(ck),
                              platform=reference_platform(),
                              guards=GuardConfig(action="relax", relax_iterations=1000,
                                                 relax_energy_target_kJ_per_mol=50.0))
    cold_start(sim.context, prepared.positions)
    sim.context.setVelocitiesToTemperature(3000 * unit.kelvin, 3)
    monkeypatch.setattr(oms, "SOLVENT_FREE_MARGIN", -1e9)  # the first stage stops at once
    monkeypatch.setattr(oms, "SOLVENT_FREE_ROUND", 5)
    calls = []
    minimise = Relaxation.minimise

    def spy(self, positions, box, iterations, *args, **kwargs):
        free = kwargs.get("solvent_free", False)
        calls.append((free, iterations))
        if free and len(calls) > 1 and not rounds_lower_it:
            kwargs["reporter"].report(0, np.asarray(positions).ravel() * 0.1, None,
                                      {"system energy": 0.0})
            return np.array(positions)  # a round that leaves the state as it is
        return minimise(self, positions, box, iterations, *args, **kwargs)

    monkeypatch.setattr(Relaxation, "minimise", spy)
    relax = oms.relax_until_accepted
    monkeypatch.setattr(oms, "relax_until_accepted",  # as the engine asks with a redraw left
                        lambda *a, **k: relax(*a, **{**k, "redraw_left": redraw_left}))
    sim.step(1)
    summary = sim.guard_summary()
    assert summary["relaxations"] == 1
    free = [f for f, _ in calls]
    assert free[0] is True and free[1] is True and calls[1][1] == 5
    if redraw_left:  # no full-force-field iteration: the relaxation failed (here MD follows)
        assert free == [True, True] and summary["relax_iterations_used"] < 1000
        assert sim.n_fallbacks == 1 and summary["actions"].get("fallback") == 1
        return
    assert summary["failures"].get("energy") == 1
    assert sim.n_jumps == 1 and "fallback" not in summary["actions"]
    if rounds_lower_it:
        assert len(calls) > 2 and all(free)  # no full-force-field iteration
    else:
        assert free[2:] == [False]  # one round that did not help, then the full force field
    x, _, e = state_of(sim)
    assert sim.guards.energy_rise(e) <= sim.guards.relax_target_kJ_per_mol + 1e-6
    assert not sim.guards.check(x, energy_kJ_per_mol=e, count=False)
    assert constraint_error_A(prepared.system, x) < 1e-3


def test_jump_reporter_relaxes_failed_jumps(tmp_path):
    """SurrogateJumpReporter with action relax on an unchanged Simulation: too hot raw jumps are
    minimised (in the flexible relaxation Context) and kept, constrained and within the guards."""
    import openmm
    from openmm import app

    from integrations.openmm_simulation import SurrogateJumpReporter

    ck = make_checkpoint(cached_md(), tmp_path / "warm.pt", model="linear", selection="heavy")
    top, system, positions = alanine_system()
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * unit.picosecond),
                         reference_platform())
    cold_start(sim.context, positions)
    sim.context.setVelocitiesToTemperature(3000 * unit.kelvin, 3)
    jumper = SurrogateJumpReporter(ck, interval=2,
                                   guards=GuardConfig(action="relax", relax_iterations=500))
    sim.reporters.append(jumper)
    sim.step(2)
    summary = jumper.guards.summary()
    assert summary["failures"].get("energy") == 1 and summary["relaxations"] == 1
    assert jumper.n_jumps == 1 and jumper.n_skipped == 0
    x, _, e = state_of(sim)
    assert jumper.guards.energy_rise(e) <= 1e-6
    assert constraint_error_A(system, x) < 1e-3


def test_jump_reporter_relaxes_with_the_engine_contexts_platform_properties(tmp_path):
    """The relaxation Context of a SurrogateJumpReporter takes the Simulation Context's
    platform properties (on CUDA its DeviceIndex and Precision; here the CPU platform's Threads),
    not the platform's defaults."""
    import openmm
    from openmm import app

    from integrations.openmm_simulation import SurrogateJumpReporter

    ck = make_checkpoint(cached_md(), tmp_path / "warm.pt", model="linear", selection="heavy")
    top, system, positions = alanine_system()
    cpu = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * unit.picosecond), cpu,
                         {"Threads": "1"})
    cold_start(sim.context, positions)
    sim.context.setVelocitiesToTemperature(3000 * unit.kelvin, 3)
    jumper = SurrogateJumpReporter(ck, interval=2,
                                   guards=GuardConfig(action="relax", relax_iterations=500))
    sim.reporters.append(jumper)
    sim.step(2)
    assert jumper.guards.summary()["relaxations"] == 1
    assert cpu.getPropertyValue(jumper._relax.context, "Threads") == "1"


def test_guard_checks_on_synthetic_states(tmp_path):
    surrogate = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "a.pt"))
    # the size check off ((0, inf)): doubling a bond also swells this small molecule
    guards = Guards(surrogate, GuardConfig(action="warn", energy_jump_kJ_per_mol=50.0,
                                           gyration_range_A=(0.0, float("inf"))))
    x = cached_md()["frames"][0].copy()
    assert guards.check(x) == []
    stretched = x.copy()
    a, b = surrogate.validity.bonds[0]
    stretched[b] += (x[b] - x[a]) * 1.0  # double one bond length
    assert [e.check for e in guards.check(stretched)] == ["bond"]
    guards.record_energy(-80.0)
    assert [e.check for e in guards.check(x, energy_kJ_per_mol=-20.0)] == ["energy"]
    assert guards.check(x, energy_kJ_per_mol=-60.0) == []
    clash = x.copy()
    far = [i for i in range(len(x)) if i not in (a, b)]
    i, j = far[0], far[-1]
    clash[j] = clash[i] + 0.3
    assert "clash" in [e.check for e in guards.check(clash)]
    nan = x.copy()
    nan[3, 1] = np.nan
    assert [e.check for e in guards.check(nan)] == ["non_finite"]
    guards.handle(guards.check(stretched))
    assert guards.summary()["failures"] == {"bond": 1}
    # a relaxed state stays out of the reference window; the next unaided state enters it
    guards.record_relaxation(12, -95.0)
    guards.record_energy(-95.0)
    assert list(guards._energies) == [-80.0]
    guards.record_energy(-95.0)
    assert list(guards._energies) == [-80.0, -95.0]
    assert guards.summary()["relaxations"] == 1 and guards.summary()["relax_iterations_used"] == 12
    with pytest.raises(ConfigError, match="unknown guard action"):
        GuardConfig(action="ignore")


def test_energy_reference_cannot_ratchet_above_the_start(tmp_path):
    """States accepted a little above the recent median lift that median; the reference is
    capped at the start's energies, so a slow climb is caught; with no cap it is not."""
    surrogate = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "a.pt"))
    x = cached_md()["frames"][0].copy()

    def climb(config: GuardConfig) -> tuple[Guards, list[bool]]:
        guards = Guards(surrogate, config)
        for e in (-100.0, -102.0, -98.0):  # the start: anchor median -100
            guards.record_energy(e)
        passed = []
        for k in range(1, 31):  # every state 20 kJ/mol above the last (threshold 50)
            e = -100.0 + 20.0 * k
            passed.append(not guards.check(x, energy_kJ_per_mol=e))
            guards.record_energy(e)
        return guards, passed

    capped, passed = climb(GuardConfig(action="warn", energy_jump_kJ_per_mol=50.0,
                                       energy_window=3))
    assert passed[:2] == [True, True] and not any(passed[2:])  # -40 is 60 above the anchor
    assert capped.energy_reference_kJ_per_mol == pytest.approx(-100.0)
    assert capped.energy_rise(-60.0) == pytest.approx(40.0)
    free, passed = climb(GuardConfig(action="warn", energy_jump_kJ_per_mol=50.0,
                                     energy_window=3, energy_drift_kJ_per_mol=None))
    assert all(passed)  # the ratchet: every step is small, the whole climb 600 kJ/mol
    assert free.energy_reference_kJ_per_mol > 400.0
    drift, _ = climb(GuardConfig(action="warn", energy_jump_kJ_per_mol=50.0, energy_window=3,
                                 energy_drift_kJ_per_mol=30.0))
    assert drift.energy_reference_kJ_per_mol == pytest.approx(-70.0)
    capped.reset_energies()  # the state was set by hand: a new start, a new anchor
    capped.record_energy(500.0)
    assert capped.energy_reference_kJ_per_mol == pytest.approx(500.0)
    with pytest.raises(ConfigError, match="energy_drift_kJ_per_mol"):
        GuardConfig(energy_drift_kJ_per_mol=-1.0)


def test_chain_break_on_a_protein():
    topology = {"atom_names": ["N", "CA", "C", "N", "CA", "C"], "residue_ids": [1, 1, 1, 2, 2, 2],
                "residue_names": ["ALA"] * 6, "atomic_numbers": [7, 6, 6, 7, 6, 6],
                "bonds": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]}

    class Stub:  # the two attributes Guards reads besides the topology
        model_atoms = np.arange(6)
        n_atoms = 6
        validity = None

    Stub.topology = topology
    guards = Guards(Stub(), GuardConfig())
    x = np.array([[0, 0, 0], [1.45, 0, 0], [2.0, 1.4, 0], [3.3, 1.6, 0], [4.2, 2.7, 0],
                  [5.6, 2.5, 0]], dtype=float)
    assert guards.check(x) == []
    x[3:] += [4.0, 0, 0]
    assert [e.check for e in guards.check(x)] == ["chain_break"]


def test_kabsch_recovers_proper_rotations():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(4, 6, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    shift = rng.normal(size=3)
    rot, trans = kabsch(src, src @ q.T + shift)
    for r, t in zip(rot, trans):
        np.testing.assert_allclose(r, q, atol=1e-10)
        np.testing.assert_allclose(t, shift, atol=1e-10)
    mirrored = src * np.array([1, 1, -1])
    rot, _ = kabsch(src, mirrored)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0)  # never a reflection


def test_reconstruction_is_exact_for_rigid_motion():
    md = cached_md()
    topo = md["topology"]
    heavy = np.nonzero(topo.atomic_numbers != 1)[0]
    rec = Reconstructor(topo.n_atoms, heavy, topo.bonds, topo.atomic_numbers, topo.residue_ids)
    x = md["frames"][0]
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    moved = x @ q.T + [1.0, -2.0, 0.5]
    out = rec(x, moved[heavy][None])
    np.testing.assert_allclose(out[0], moved, atol=1e-9)
    full = Reconstructor(topo.n_atoms, np.arange(topo.n_atoms), topo.bonds, topo.atomic_numbers,
                         topo.residue_ids)
    assert full.is_identity
    np.testing.assert_allclose(full(x, moved), moved)


def test_relaxation_drop_ratio_aims_the_solvent_free_stage(tmp_path, monkeypatch):
    """The solvent-free stage's target is the energy to shed in the full force field divided by
    the recent ratio of full to solvent-free drops (median of the last ones, within [0.5, 4]):
    a force field that falls twice as far as its solvent-free copy is minimised half as far."""
    from datagen.openmm_md import prepare_system
    from integrations import openmm_simulation as oms
    from integrations.openmm_simulation import Relaxation

    _, vacuum, _ = alanine_system()
    relax = Relaxation(vacuum, reference_platform())
    assert relax.drop_ratio == 1.0
    relax.record_drop(300.0, 100.0)
    relax.record_drop(-5.0, 100.0)  # the full force field rose: no ratio
    relax.record_drop(100.0, 0.0)  # nothing shed: no ratio
    relax.record_drop(float("nan"), 1.0)
    assert relax.drop_ratio == 3.0
    relax.record_drop(100.0, 100.0)
    relax.record_drop(200.0, 100.0)
    assert relax.drop_ratio == 2.0  # median of 3, 1, 2
    for _ in range(oms.DROP_RATIO_WINDOW):
        relax.record_drop(100.0, 1.0)
    assert relax.drop_ratio == 4.0  # clipped; the window forgot the first ones
    assert len(relax._drop_ratios) == oms.DROP_RATIO_WINDOW
    stop = oms.StopBelowEnergy(-10.0)
    assert not stop.report(0, None, None, {"system energy": -5.0})
    assert stop.report(1, None, None, {"system energy": -12.0})
    assert stop.iterations == 2 and stop.energy == -12.0 and np.isfinite(stop.target)

    # the same failed jump relaxed twice, with no ratio yet (1) and after drops of twice the
    # solvent-free one: the solvent-free stage aims half as far below its start
    ck = make_checkpoint(cached_md(), tmp_path / "warm.pt", model="linear",
                         selection="heavy")
    prepared = prepare_system("alanine-dipeptide", solvent="implicit")
    aims = []

    class Spy(oms.StopBelowEnergy):
        def __init__(self, target_kJ_per_mol, **kwargs):
            super().__init__(target_kJ_per_mol, **kwargs)
            aims.append(target_kJ_per_mol)

    starts = []
    free_energy = Relaxation.solvent_free_energy

    def spy(self, *args, **kwargs):
        starts.append(free_energy(self, *args, **kwargs))
        return starts[-1]

    monkeypatch.setattr(oms, "StopBelowEnergy", Spy)
    monkeypatch.setattr(Relaxation, "solvent_free_energy", spy)
    first = []  # each relaxation's first solvent-free stage (later rounds aim at no energy)
    for ratio in (None, 2.0):
        first.append(len(starts))
        sim = SurrogateSimulation(prepared.topology, prepared.system, Surrogate.load(ck),
                                  platform=reference_platform(),
                                  guards=GuardConfig(action="relax", relax_iterations=1000))
        cold_start(sim.context, prepared.positions)
        sim.context.setVelocitiesToTemperature(3000 * unit.kelvin, 3)
        if ratio is not None:
            sim._relaxation().record_drop(ratio, 1.0)
        sim.step(1)
        assert sim.n_jumps == 1 and sim.guard_summary()["relaxations"] == 1
    aims = [a for a in aims if np.isfinite(a)]
    starts = [starts[i] for i in first]
    assert len(aims) == len(starts) == 2
    assert starts[0] == pytest.approx(starts[1])
    assert starts[1] - aims[1] == pytest.approx(0.5 * (starts[0] - aims[0]), rel=1e-6)


def test_relaxation_backs_off_to_an_earlier_iterate_at_the_target(tmp_path):
    """A solvent-free stage that ended far below the relaxation target is walked back along its
    iterates: the kept state is an earlier iterate, accepted by every guard in the full force
    field with its constraints satisfied, at most the target and well above the end state."""
    from datagen.openmm_md import prepare_system
    from integrations import openmm_simulation as oms

    ck = make_checkpoint(cached_md(), tmp_path / "warm.pt", model="linear", selection="heavy")
    prepared = prepare_system("alanine-dipeptide", solvent="implicit")
    sim = SurrogateSimulation(prepared.topology, prepared.system, Surrogate.load(ck),
                              platform=reference_platform(),
                              guards=GuardConfig(action="relax", relax_iterations=1000,
                                                 relax_energy_target_kJ_per_mol=50.0))
    cold_start(sim.context, prepared.positions)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 3)
    sim.step(1)  # the guards now hold a reference energy
    guards, relax = sim.guards, sim._relaxation()
    target = guards.energy_reference_kJ_per_mol + guards.relax_target_kJ_per_mol
    x_low, _, _ = state_of(sim)
    openmm.LocalEnergyMinimizer.minimize(sim.context, 1.0, 500)  # far below the target
    x_low, _, e_low = state_of(sim)
    assert e_low < target - 20.0
    rng = np.random.default_rng(0)
    x_high = x_low + rng.normal(0.0, 0.08, x_low.shape)  # strained: above the target
    oms.write_state(sim.context, x_high, None, True)
    x_high, _, e_high = state_of(sim)
    assert e_high > target
    # a straight "minimiser path" from the strained to the minimised state, with the solvent-free
    # energies a real one would report
    points = [x_high + f * (x_low - x_high) for f in np.linspace(0.1, 1.0, 10)]
    path = [(relax.solvent_free_energy(p), p) for p in points]
    oms.write_state(sim.context, x_low, None, True)
    x, e = oms.back_off(sim.context, guards, path, relax.solvent_free_energy(x_high), e_high,
                        x_low, e_low, True, jump=1, time_ps=1.0)
    held_x, _, held_e = state_of(sim)
    assert e == pytest.approx(held_e) and np.allclose(x, held_x)  # the engine holds it
    assert e_low + 5.0 < e <= target + 1e-6
    assert not guards.check(x, energy_kJ_per_mol=e, count=False)
    assert constraint_error_A(prepared.system, x) < 1e-3
    # nothing to walk back along: the end state stays
    x, e = oms.back_off(sim.context, guards, path[-1:], relax.solvent_free_energy(x_high),
                        e_high, x_low, e_low, True, jump=1, time_ps=1.0)
    assert e == e_low and np.array_equal(x, x_low)


class _BareSurrogate:  # what Guards reads of a surrogate, for a 3-atom system
    model_atoms = np.arange(3)
    n_atoms = 3
    validity = None
    topology = {"atom_names": ["C", "C", "C"], "residue_ids": [1, 1, 1],
                "residue_names": ["MOL"] * 3, "atomic_numbers": [6, 6, 6], "bonds": []}


@pytest.mark.parametrize("bad", [{"energy_window": 0}, {"energy_jump_kJ_per_mol": float("nan")},
                                 {"energy_jump_kJ_per_mol": -1.0}, {"relax_iterations": -5},
                                 {"temperature_K": 0.0}, {"chain_break_A": float("inf")},
                                 {"cold_md_fraction": -0.1}, {"cold_md_fraction": 1.5},
                                 {"cold_md_fraction": float("nan")}])
def test_guard_config_refuses_numbers_that_would_switch_checks_off(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        GuardConfig(**bad)


def test_md_starts_cold_below_the_fraction_of_the_temperature():
    """Kinetic temperature 2 KE / (n_dof R) against cold_md_fraction x the temperature: 6 degrees
    of freedom at 400 K hold 3 R x 400 K = 9.98 kJ/mol at equilibrium."""
    r = 8.314462618e-3  # kJ/mol/K
    for fraction, n_dof, temperature in ((0.5, 6, 400.0), (0.25, 6, 400.0), (0.5, 9, 250.0)):
        g = Guards(_BareSurrogate(), GuardConfig(cold_md_fraction=fraction), n_dof=n_dof,
                   temperature_K=temperature)
        at_fraction = 0.5 * n_dof * r * fraction * temperature  # kJ/mol
        assert g.md_starts_cold(0.99 * at_fraction) and g.md_starts_cold(0.0)
        assert not g.md_starts_cold(1.01 * at_fraction)
    # the config's temperature wins over the engine's; 0 switches the rule off
    g = Guards(_BareSurrogate(), GuardConfig(temperature_K=100.0), n_dof=6, temperature_K=400.0)
    assert not g.md_starts_cold(0.5 * 6 * r * 60.0)
    assert g.md_starts_cold(0.5 * 6 * r * 40.0)
    assert not Guards(_BareSurrogate(), GuardConfig(cold_md_fraction=0.0)).md_starts_cold(0.0)


def test_reset_forgets_a_pending_relaxed_energy():
    # a relaxed state accepted, then the same state loaded by hand: its energy is a new start
    g = Guards(_BareSurrogate(), GuardConfig(action="relax", energy_jump_kJ_per_mol=100.0))
    g.record_energy(-1000.0)
    g.record_relaxation(12, accepted_energy_kJ_per_mol=-1000.0)
    g.reset_energies()
    g.record_energy(-1000.0)
    x = np.eye(3) * 1.5
    assert [e.check for e in g.check(x, energy_kJ_per_mol=1e6)] == ["energy"]


def test_a_guard_config_without_temperature_takes_the_engines():
    from integrations.guards import default_energy_threshold

    at = {t: Guards(_BareSurrogate(), GuardConfig(action="relax"), n_dof=100, temperature_K=t)
          for t in (300.0, 600.0)}
    assert at[600.0].energy_jump_kJ_per_mol == pytest.approx(
        default_energy_threshold(100, 600.0))
    assert at[600.0].energy_jump_kJ_per_mol == pytest.approx(
        2 * at[300.0].energy_jump_kJ_per_mol)
    fixed = Guards(_BareSurrogate(), GuardConfig(temperature_K=300.0), n_dof=100,
                   temperature_K=600.0)
    assert fixed.energy_jump_kJ_per_mol == pytest.approx(default_energy_threshold(100, 300.0))


def test_energy_state_carries_the_tallies_and_a_pending_relaxed_energy():
    """A restart (OpenMM's .surrogate.npz, ASE's restart file) takes back the whole summary and
    keeps a just-relaxed state out of the window; an older state without tallies restores the
    energies only."""
    import json

    g = Guards(_BareSurrogate(), GuardConfig(action="relax", energy_jump_kJ_per_mol=100.0))
    for e in (-1000.0, -1001.0, -999.0):
        g.record_energy(e)
    x = np.eye(3) * 1.5
    assert [e.check for e in g.check(x, energy_kJ_per_mol=1e6)] == ["energy"]  # counted
    g.record_relaxation(12, accepted_energy_kJ_per_mol=-1100.0)
    state = json.loads(json.dumps(g.energy_state()))  # it travels as JSON
    fresh = Guards(_BareSurrogate(), GuardConfig(action="relax", energy_jump_kJ_per_mol=100.0))
    fresh.restore_energy_state(state)
    assert fresh.summary() == g.summary()
    assert fresh.summary()["jumps_failed"] == 1 and fresh.summary()["relax_iterations_used"] == 12
    fresh.record_energy(-1100.0)  # the relaxed state: left out of the window, as in g
    g.record_energy(-1100.0)
    assert fresh.energy_state() == g.energy_state() and len(g.energy_state()["energies"]) == 3
    old = Guards(_BareSurrogate(), GuardConfig(action="relax", energy_jump_kJ_per_mol=100.0))
    old.restore_energy_state({k: state[k] for k in ("energies", "anchor", "md_energies")})
    assert old.summary()["jumps_checked"] == 0
    assert old.energy_reference_kJ_per_mol == g.energy_reference_kJ_per_mol
