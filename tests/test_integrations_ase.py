"""SurrogateDynamics in ASE: with and without a calculator, observers, trajectories, guards."""

from __future__ import annotations

import json

import MDAnalysis as mda
import mdtraj
import numpy as np
import pytest
from _integration_fixtures import PDB, cached_md, make_checkpoint
from ase import Atoms, units
from ase.calculators.emt import EMT
from ase.io import Trajectory, read
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from integrations.ase_dynamics import SurrogateDynamics
from integrations.guards import GuardConfig
from integrations.writers import PS_IN_ASE_TIME, TrajectoryObserver
from surrogate_md import Surrogate
from surrogate_md.errors import EngineError, GuardError


def cold_atoms(temperature_K=0.05, seed=0):
    atoms = read(str(PDB))
    atoms.set_positions(cached_md()["frames"][0])
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    return atoms


@pytest.fixture
def surrogate(tmp_path):
    return Surrogate.load(make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy"))


def test_no_calculator_jumps_observers_and_trajectory(tmp_path, surrogate):
    atoms = cold_atoms()
    x0 = atoms.get_positions()
    dyn = SurrogateDynamics(atoms, surrogate, trajectory=str(tmp_path / "a.traj"))
    assert dyn.dt == pytest.approx(surrogate.jump_ps * 1000 * units.fs)
    seen = []
    dyn.attach(lambda: seen.append((dyn.nsteps, dyn.get_time() / PS_IN_ASE_TIME)), interval=4)
    xtc = TrajectoryObserver(dyn, tmp_path / "a.xtc")
    dcd = TrajectoryObserver(dyn, tmp_path / "a.dcd", interval=2)
    dyn.attach(xtc, interval=1)
    dyn.attach(dcd, interval=2)
    dyn.run(20)
    xtc.close()
    dcd.close()
    jump = surrogate.jump_ps
    assert [s for s, _ in seen] == [0, 4, 8, 12, 16, 20]
    np.testing.assert_allclose([t for _, t in seen], np.arange(0, 21, 4) * jump, atol=1e-12)
    assert dyn.n_jumps == 20
    assert np.abs(atoms.get_positions() - x0).max() > 0.01
    frames = read(str(tmp_path / "a.traj"), index=":")
    assert len(frames) == 21
    assert all(np.isfinite(f.positions).all() for f in frames)
    np.testing.assert_allclose(frames[-1].positions, atoms.get_positions())
    for reader_times in ([ts.time for ts in mda.Universe(str(PDB), str(tmp_path / "a.xtc"))
                          .trajectory],
                         mdtraj.load(str(tmp_path / "a.xtc"), top=str(PDB)).time):
        np.testing.assert_allclose(reader_times, np.arange(21) * jump, atol=1e-4)
    u = mda.Universe(str(PDB), str(tmp_path / "a.dcd"))
    np.testing.assert_allclose([ts.time for ts in u.trajectory], np.arange(0, 21, 2) * jump,
                               atol=1e-4)
    assert mdtraj.load(str(tmp_path / "a.dcd"), top=str(PDB)).n_frames == 11
    d = dyn.todict()
    json.dumps(d)
    assert d["surrogate"] == "linear" and d["checkpoint_hash"] == surrogate.checkpoint_hash


def test_intermediate_frames_and_calculator_energies(tmp_path, surrogate):
    atoms = cold_atoms()
    atoms.calc = EMT()
    log = tmp_path / "md.log"
    dyn = SurrogateDynamics(atoms, surrogate, trajectory=str(tmp_path / "b.traj"),
                            logfile=str(log), write_intermediate=True, guards="warn")
    dyn.run(20)
    p = len(surrogate.times_ps)
    with Trajectory(str(tmp_path / "b.traj")) as traj:
        energies = [f.get_potential_energy() for f in traj]
        assert len(traj) == 1 + 20 * p
    assert np.isfinite(energies).all()
    assert dyn.last_jump.shape == (p, len(atoms), 3)
    np.testing.assert_allclose(dyn.last_jump_times_ps, 19 * surrogate.jump_ps
                               + surrogate.times_ps)
    lines = log.read_text().splitlines()
    assert len(lines) == 22  # header + 21 rows
    assert float(lines[-1].split()[0]) == pytest.approx(20 * surrogate.jump_ps, abs=1e-3)
    # every jump's intermediate frames but only every 5th end state: uneven times, refused
    with pytest.raises(EngineError, match="loginterval=5"):
        SurrogateDynamics(atoms, surrogate, trajectory=str(tmp_path / "c.traj"), loginterval=5,
                          write_intermediate=True, guards="warn")


def test_wrong_timestep_and_missing_calculator_are_errors(surrogate):
    atoms = cold_atoms()
    with pytest.raises(EngineError, match="timestep"):
        SurrogateDynamics(atoms, surrogate, timestep=1.0 * units.fs)
    with pytest.raises(EngineError, match="calculator"):
        SurrogateDynamics(atoms, surrogate, logfile="-")
    # relax minimises with the calculator: refused up front, not at the first failed jump
    with pytest.raises(EngineError, match="'relax'.*calculator"):
        SurrogateDynamics(atoms, surrogate, guards="relax")


def test_hybrid_mode_time_bookkeeping(surrogate):
    atoms = cold_atoms()
    atoms.calc = EMT()
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    # every state of real MD may anchor the energy guard, however short the MD, and from
    # however cold a state (these atoms start at 0.05 K)
    dyn = SurrogateDynamics(atoms, surrogate, md_dynamics=md, md_steps=4,
                            guards=GuardConfig(action="warn", anchor_md_ps=0.0,
                                               cold_md_fraction=0.0))
    times = []
    dyn.attach(lambda: times.append(dyn.get_time() / PS_IN_ASE_TIME))
    dyn.run(5)
    cycle_ps = surrogate.jump_ps + 4 * 0.5e-3
    np.testing.assert_allclose(times, np.arange(6) * cycle_ps, atol=1e-12)
    assert md.nsteps == 20 and dyn.n_jumps == 5
    # the states the MD segments produced anchor the energy guard
    assert dyn.guards.summary()["energy_anchor_from"] == "md"
    assert len(dyn.guards._md_energies) == 5
    # 2 fs of MD after each jump are less than the default anchor_md_ps (1 ps): those states
    # still carry the jump's energy and leave the anchor at the start
    atoms = cold_atoms()
    atoms.calc = EMT()
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn = SurrogateDynamics(atoms, surrogate, md_dynamics=md, md_steps=4, guards="warn")
    dyn.run(5)
    assert dyn.guards.summary()["energy_anchor_from"] == "start"
    assert len(dyn.guards._md_energies) == 0 and len(dyn.guards._energies) == 5


def test_md_from_a_cold_jump_end_does_not_move_the_anchor(tmp_path):
    """Hybrid mode with the ``constant`` model, whose kept ends carry zero difference
    velocities (a deterministic model's are nearly as cold on a protein): the MD segment after
    each jump heats a 0 K state, so it counts as no MD time and its end as the surrogate's; only
    the first segment, from the thermal start, moves the anchor (before, all five did). With
    cold_md_fraction 0 every segment counts."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "c.pt", model="constant"))
    counted = {}
    for fraction in (0.5, 0.0):
        atoms = cold_atoms(temperature_K=300.0, seed=2)
        atoms.calc = EMT()
        md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        dyn = SurrogateDynamics(atoms, sur, md_dynamics=md, md_steps=4, guards=GuardConfig(
            action="warn", anchor_md_ps=0.0, cold_md_fraction=fraction))
        dyn.run(5)
        assert dyn.n_jumps == 5 and len(dyn.guards._energies) == 5
        assert np.abs(atoms.get_velocities()).max() == 0.0  # the last jump's end: 0 K
        counted[fraction] = len(dyn.guards._md_energies)
    assert counted == {0.5: 1, 0.0: 5}


def test_guard_actions(surrogate):
    hot = cold_atoms(temperature_K=20000, seed=1)
    x0 = hot.get_positions()
    dyn = SurrogateDynamics(hot, surrogate)
    with pytest.raises(GuardError, match="bond"):
        dyn.run(1)
    np.testing.assert_allclose(hot.get_positions(), x0)
    warned = cold_atoms(temperature_K=20000, seed=1)
    dyn = SurrogateDynamics(warned, surrogate, guards="warn")
    dyn.run(2)
    assert dyn.n_jumps == 2 and dyn.guards.counts["bond"] == 2
    fb_atoms = cold_atoms(temperature_K=20000, seed=1)
    fb_atoms.calc = EMT()
    fallback = VelocityVerlet(fb_atoms, timestep=0.5 * units.fs)
    dyn = SurrogateDynamics(fb_atoms, surrogate, guards="fallback", fallback_dynamics=fallback)
    dyn.run(2)
    assert dyn.n_fallbacks >= 1 and fallback.nsteps == 40 * dyn.n_fallbacks
    assert np.isfinite(fb_atoms.get_positions()).all()
    # 'fallback' without an MD to fall back on is refused before anything moves
    with pytest.raises(EngineError, match="fallback_dynamics"):
        SurrogateDynamics(cold_atoms(temperature_K=20000, seed=1), surrogate, guards="fallback")


def test_relax_action_stops_at_its_energy_target(surrogate):
    """relax in ASE: FIRE with the attached calculator (a harmonic force field around an MD
    frame) stops at the first state that passes every guard within the energy target."""
    from ase.calculators.harmonic import HarmonicCalculator, HarmonicForceField

    results = {}
    for target in (0.0, 50.0):
        atoms = cold_atoms(temperature_K=20000, seed=1)
        atoms.set_positions(cached_md()["frames"][0])
        field = HarmonicForceField(atoms.copy(), 5.0 * np.eye(3 * len(atoms)))
        atoms.calc = HarmonicCalculator(field)
        dyn = SurrogateDynamics(atoms, surrogate, guards=GuardConfig(
            action="relax", relax_iterations=500, relax_energy_target_kJ_per_mol=target))
        dyn.run(1)
        summary = dyn.guards.summary()
        assert dyn.n_jumps == 1 and dyn.n_fallbacks == 0
        assert summary["failures"].get("bond") == 1  # the raw jump broke bonds
        assert summary["relaxations"] == 1
        results[target] = (summary["relax_iterations_used"], dyn._energy_kJ_per_mol())
    (n_full, e_full), (n_early, e_early) = results[0.0], results[50.0]
    assert 0 < n_early < n_full < 500
    assert e_full < e_early <= 50.0


def test_a_compacted_jump_falls_back_without_a_relaxation(surrogate):
    """relax in ASE: a jump end smaller than the size check allows goes to fallback MD at once
    (a minimiser does not expand a compacted molecule)."""
    atoms = cold_atoms()
    atoms.calc = EMT()
    fallback = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    hi = surrogate.validity.gyration_range_A[1]
    dyn = SurrogateDynamics(atoms, surrogate, fallback_dynamics=fallback, guards=GuardConfig(
        action="relax", gyration_range_A=(2.0 * hi, 2.1 * hi)))
    dyn.run(2)
    summary = dyn.guards.summary()
    assert dyn.n_fallbacks == 2 and dyn.n_jumps == 0 and fallback.nsteps == 80
    assert summary["failures"]["size"] == 2 and summary["actions"] == {"fallback": 2}
    assert summary["relaxations"] == 0


def test_history_model_builds_its_history_by_md_then_jumps(tmp_path):
    # ESTAG, 3 input frames 0.02 ps apart, 0.04 ps jumps with frames at 0.02 and 0.04 ps: the
    # first step is MD (observed at 0.02 and 0.04 ps), every later step a jump fed by the
    # previous jump's own frames
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag",
                                         selection="heavy", jump_frames=4, n_out=2, history=3,
                                         history_stride=2))
    atoms = cold_atoms()
    atoms.calc = EMT()
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    with pytest.raises(EngineError, match="fallback_dynamics"):
        SurrogateDynamics(atoms, sur, guards="warn")
    with pytest.raises(EngineError, match="md_steps=0"):
        SurrogateDynamics(atoms, sur, guards="warn", md_dynamics=md, md_steps=4)
    dyn = SurrogateDynamics(atoms, sur, guards="warn", fallback_dynamics=md)
    times = []
    dyn.attach(lambda: times.append(dyn.get_time() / PS_IN_ASE_TIME))
    dyn.run(4)
    assert (dyn.n_history_md, dyn.n_jumps, dyn.n_fallbacks) == (1, 3, 0)
    assert md.nsteps == 80  # one jump's length of MD, 0.04 ps in 0.5 fs steps
    np.testing.assert_allclose(times, np.arange(5) * 0.04, atol=1e-12)
    hist = dyn.propagator.history(0.16)  # (3, heavy atoms, 3): frames at 0.12, 0.14, 0.16 ps
    np.testing.assert_allclose(hist[-1], atoms.get_positions()[sur.model_atoms], atol=1e-12)
    np.testing.assert_allclose(hist[1], dyn.last_jump[0][sur.model_atoms], atol=1e-12)


@pytest.mark.parametrize("split", [False, True])
def test_history_model_on_a_molecule_split_by_the_cell_face(tmp_path, split):
    """Periodic cell, the molecule wrapped atom by atom across a face (atoms.wrap()): the model,
    the guards and the history's remembered frames all see it whole, so the history built by
    the first step's MD feeds the jumps after it (remembered frames in the split form made
    every later state look like another one: history MD at every step, no jump ever)."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag",
                                         selection="heavy", jump_frames=4, n_out=2, history=3,
                                         history_stride=2))
    atoms = cold_atoms()
    atoms.cell, atoms.pbc = [25.0, 25.0, 25.0], True
    x = atoms.positions
    atoms.positions = x + ((25.0 if split else 12.5), 12.5, 12.5) - x.mean(axis=0)
    atoms.wrap()
    assert (np.ptp(atoms.positions[:, 0]) > 12.0) == split
    atoms.calc = EMT()
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn = SurrogateDynamics(atoms, sur, guards="warn", fallback_dynamics=md)
    dyn.run(4)
    assert (dyn.n_history_md, dyn.n_jumps) == (1, 3)


@pytest.mark.parametrize("fmt", ["dcd", "xtc"])
def test_observer_without_frames_writes_no_file(tmp_path, fmt, caplog):
    """Closed before any frame: no unreadable empty DCD/XTC, a warning instead, and a file of
    that name from before is left alone."""
    import logging

    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[10, 10, 10], pbc=True)
    atoms.calc = EMT()
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    path = tmp_path / f"none.{fmt}"
    with caplog.at_level(logging.WARNING):
        TrajectoryObserver(dyn, path).close()
    assert not path.exists() and "no frame" in caplog.text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["dcd", "xtc"])
def test_observer_attached_mid_run_stamps_its_frames_with_their_times(tmp_path, fmt):
    # attached after 5 steps with interval 2: first called at step 6 (0.006 ps), then 8, 10
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[10, 10, 10], pbc=True)
    atoms.calc = EMT()
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(5)
    path = tmp_path / f"late.{fmt}"
    obs = TrajectoryObserver(dyn, path, interval=2)
    seen = []
    dyn.attach(lambda: seen.append((dyn.get_time() / PS_IN_ASE_TIME, atoms.get_positions())),
               interval=2)
    dyn.attach(obs, interval=2)
    dyn.run(6)
    obs.close()
    u = mda.Universe(mda.Universe.empty(2).atoms.universe._topology, str(path))
    np.testing.assert_allclose([t for t, _ in seen], [0.006, 0.008, 0.010], atol=1e-12)
    np.testing.assert_allclose([ts.time for ts in u.trajectory], [t for t, _ in seen], atol=1e-6)
    for ts, (_, x) in zip(u.trajectory, seen):
        np.testing.assert_allclose(ts.positions, x, atol=1e-3)


def _segment_starts(dyn_factory, surrogate):
    """Hybrid run of 2 steps (1 MD step + jump each): the end state of jump 1 and the first MD
    state of segment 2, plus a fresh integrator's first step from that end state."""
    atoms = cold_atoms(temperature_K=50, seed=3)
    atoms.calc = EMT()
    md = dyn_factory(atoms)
    dyn = SurrogateDynamics(atoms, surrogate, md_dynamics=md, md_steps=1, guards="warn")
    ends, md_states = {}, {}
    dyn.attach(lambda: ends.__setitem__(dyn.nsteps, (atoms.get_positions(),
                                                     atoms.get_momenta())))
    md.attach(lambda: md_states.__setitem__(md.nsteps, atoms.get_positions()))
    dyn.run(2)
    fresh = atoms.copy()
    fresh.calc = EMT()
    fresh.set_positions(ends[1][0])
    fresh.set_momenta(ends[1][1])
    dyn_factory(fresh).run(1)
    return ends, md_states[2], fresh.get_positions()


@pytest.mark.parametrize("integrator", ["NoseHooverChainNVT", "LangevinBAOAB"])
def test_md_segments_start_from_the_jump_with_stateful_integrators(surrogate, integrator):
    # NoseHooverChainNVT keeps its own positions/momenta and LangevinBAOAB its accelerations:
    # unsynchronised, segment 2 resumed from the MD state before jump 1 (NHC: every jump lost)
    if integrator == "NoseHooverChainNVT":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        def factory(a):
            # a long thermostat time: its variables barely move, so a fresh one steps alike
            return NoseHooverChainNVT(a, timestep=0.5 * units.fs, temperature_K=300,
                                      tdamp=1e9 * units.fs)
    else:
        from ase.md.langevinbaoab import LangevinBAOAB

        def factory(a):  # no friction, no noise: deterministic
            return LangevinBAOAB(a, timestep=0.5 * units.fs, temperature_K=0.0,
                                 T_tau=1e12 * units.fs, rng=np.random.default_rng(0))
    ends, first_md, fresh = _segment_starts(factory, surrogate)
    assert np.abs(ends[1][0] - ends[0][0]).max() > 0.05  # the jump moved atoms
    np.testing.assert_allclose(first_md, fresh, atol=1e-8)


def test_md_dynamics_must_share_the_atoms_and_keep_the_cell(surrogate):
    atoms = cold_atoms()
    other = VelocityVerlet(cold_atoms(), timestep=0.5 * units.fs)
    with pytest.raises(EngineError, match="another Atoms object"):
        SurrogateDynamics(atoms, surrogate, guards="fallback", fallback_dynamics=other)
    from ase.md.nptberendsen import NPTBerendsen

    atoms.set_cell([30.0, 30.0, 30.0])
    atoms.pbc = True
    npt = NPTBerendsen(atoms, timestep=0.5 * units.fs, temperature_K=300, pressure_au=1e-6,
                       compressibility_au=4.57e-5 / units.bar)
    with pytest.raises(EngineError, match="changes the cell"):
        SurrogateDynamics(atoms, surrogate, md_dynamics=npt, md_steps=2)
    atoms = cold_atoms()
    with pytest.raises(EngineError, match="does not divide"):
        SurrogateDynamics(atoms, surrogate, guards="fallback",
                          fallback_dynamics=VelocityVerlet(atoms, timestep=0.3 * units.fs))


def test_fallback_md_moves_the_anchor_and_writes_even_frames(tmp_path, surrogate):
    # a hot start: every jump fails and is replaced by MD, whose states are samples of real MD
    # (the energy anchor follows them) and whose output times go to the trajectory like a
    # jump's intermediate frames
    atoms = cold_atoms(temperature_K=20000, seed=1)
    atoms.calc = EMT()
    fb = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    path = tmp_path / "fb.traj"
    # the MD counts for the anchor from two fallbacks on (anchor_md_ps between one and two
    # jumps' length)
    dyn = SurrogateDynamics(atoms, surrogate, trajectory=str(path), write_intermediate=True,
                            guards=GuardConfig(action="fallback",
                                               anchor_md_ps=1.5 * surrogate.jump_ps),
                            fallback_dynamics=fb)
    dyn.run(4)
    assert dyn.n_fallbacks == 4
    summary = dyn.guards.summary()
    assert summary["energy_anchor_from"] == "md"
    assert len(dyn.guards._md_energies) == 2  # jumps 3 and 4 start after two and three
    p = len(surrogate.times_ps)
    with Trajectory(str(path)) as traj:
        frames = list(traj)
    assert len(frames) == 1 + 4 * p
    # every frame is an MD state on the output grid: consecutive frames one grid step apart
    # along their own velocities, and each frame carries its own momenta
    step_ase = surrogate.times_ps[0] * PS_IN_ASE_TIME
    for a, b in zip(frames[1:-1], frames[2:]):
        assert not np.allclose(a.get_momenta(), b.get_momenta())
        moved = np.abs(b.positions - a.positions).max()
        assert moved < 3 * np.abs(a.get_velocities() * step_ase).max() + 0.05


def test_intermediate_frames_carry_their_own_velocities(tmp_path, surrogate):
    atoms = cold_atoms(temperature_K=50)
    path = tmp_path / "i.traj"
    dyn = SurrogateDynamics(atoms, surrogate, trajectory=str(path), write_intermediate=True,
                            guards="warn")
    dyn.run(1)
    with Trajectory(str(path)) as traj:
        frames = list(traj)
    assert len(frames) == 1 + len(surrogate.times_ps)
    result = dyn.propagator.jump(frames[0].positions,
                                 frames[0].get_velocities() * PS_IN_ASE_TIME, 0.0)
    for frame, v in zip(frames[1:], result.velocities_A_per_ps):
        np.testing.assert_allclose(frame.get_velocities() * PS_IN_ASE_TIME, v, atol=1e-6)
    np.testing.assert_allclose(atoms.get_velocities() * PS_IN_ASE_TIME,
                               result.velocities_A_per_ps[-1], atol=1e-6)


def test_guards_judge_the_constrained_state(surrogate):
    # a rigid drift is a valid jump; FixAtoms holding one predicted atom stretches its bonds,
    # which the guards must see in the state the atoms hold
    from ase.constraints import FixAtoms

    def drifting(constrained):
        atoms = cold_atoms()
        atoms.set_velocities(np.tile([0.2, 0.0, 0.0], (len(atoms), 1)))
        if constrained:
            atoms.set_constraint(FixAtoms(indices=[int(surrogate.model_atoms[3])]))
        return atoms

    free = SurrogateDynamics(drifting(False), surrogate)
    free.run(1)
    assert free.n_jumps == 1
    with pytest.raises(GuardError, match="bond"):
        SurrogateDynamics(drifting(True), surrogate).run(1)


def test_a_jump_that_cannot_be_kept_without_fallback_md_names_the_action(tmp_path):
    from _integration_fixtures import small_egnn_config

    broken = Surrogate.load(make_checkpoint(
        cached_md(), tmp_path / "nan.pt", selection="heavy", model="egnn",
        model_config=small_egnn_config(), break_weights=True))
    dyn = SurrogateDynamics(cold_atoms(), broken, guards="warn")
    with pytest.raises(GuardError, match="under action 'warn'.*fallback_dynamics"):
        dyn.run(1)


def test_dcd_takes_its_frame_spacing_from_the_frames(tmp_path, surrogate, caplog):
    import logging

    from surrogate_md.errors import DataError

    dyn = SurrogateDynamics(cold_atoms(), surrogate)
    obs = TrajectoryObserver(dyn, tmp_path / "five.dcd")  # interval left at 1
    dyn.attach(obs, interval=5)
    with caplog.at_level(logging.WARNING):
        dyn.run(15)
    obs.close()
    assert "every 5 steps, not every 1" in caplog.text
    times = [ts.time for ts in mda.Universe(str(PDB), str(tmp_path / "five.dcd")).trajectory]
    np.testing.assert_allclose(times, np.arange(0, 16, 5) * surrogate.jump_ps, atol=1e-4)
    # a file of one frame, and frames at uneven times (a DCD cannot stamp them)
    one = TrajectoryObserver(dyn, tmp_path / "one.dcd")
    one()
    one.close()
    u = mda.Universe(str(PDB), str(tmp_path / "one.dcd"))
    assert len(u.trajectory) == 1
    assert u.trajectory[0].time == pytest.approx(15 * surrogate.jump_ps, abs=1e-4)
    uneven = TrajectoryObserver(dyn, tmp_path / "uneven.dcd")
    uneven()
    dyn.run(1)
    uneven()
    dyn.run(2)
    with pytest.raises(DataError, match="uneven"):
        uneven()
    uneven.abort()
    assert not (tmp_path / "uneven.dcd").exists() and not list(tmp_path.glob(".*partial*"))


def test_wrapped_periodic_molecules_jump_as_whole_ones(surrogate):
    # atoms.wrap() splits a molecule across the cell's faces; the same physical state must take
    # the same jumps (up to lattice translations) instead of failing the bond guard
    from ase.geometry import find_mic

    def periodic(shift):
        atoms = cold_atoms(temperature_K=50, seed=2)
        atoms.set_cell([14.0, 14.0, 14.0])
        atoms.pbc = True
        atoms.center()
        atoms.translate([shift, 0.0, 0.0])
        atoms.wrap()
        return atoms

    whole, split = periodic(0.0), periodic(7.0)
    bonds = np.asarray(surrogate.topology["bonds"])
    assert max(split.get_distance(i, j) for i, j in bonds) > 5.0  # split across the cell
    for atoms in (whole, split):
        SurrogateDynamics(atoms, surrogate).run(3)
    diff = find_mic(split.get_positions() - whole.get_positions() - [7.0, 0.0, 0.0],
                    whole.cell, True)[0]
    np.testing.assert_allclose(diff, 0.0, atol=1e-4)  # float32 model
