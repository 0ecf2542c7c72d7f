"""SurrogateDynamics restarts: ``save_state`` / ``load_state`` / ``restart=`` bring back what the
atoms do not hold (a history model's remembered frames, the thermal draws' generator, the guards'
energies and counts, the jump counts, the MD time since the last jump, the step count), so a run
restarted from the last frame of its ``.traj`` goes on as the uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _integration_fixtures import PDB, cached_md, make_checkpoint
from ase import units
from ase.calculators.emt import EMT
from ase.io import read
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from integrations.ase_dynamics import SurrogateDynamics
from integrations.guards import GuardConfig
from surrogate_md import Surrogate
from surrogate_md.errors import EngineError

N_STEPS = 6  # the first builds the history by MD, the others are jumps


def cold_atoms():
    atoms = read(str(PDB))
    atoms.set_positions(cached_md()["frames"][0])
    thermalize_momenta(atoms, temperature_K=0.05, rng=np.random.default_rng(0))
    return atoms


def saved_step(path) -> int:
    with np.load(path) as data:
        return json.loads(str(data["extra"]))["nsteps"]


@pytest.fixture(scope="module")
def estag(tmp_path_factory):
    # ESTAG, 3 input frames 0.02 ps apart, 0.04 ps jumps with frames at 0.02 and 0.04 ps
    path = tmp_path_factory.mktemp("estag") / "estag.pt"
    return Surrogate.load(make_checkpoint(cached_md(), path, model="estag", selection="heavy",
                                          jump_frames=4, n_out=2, history=3, history_stride=2))


def dynamics(atoms, sur, **kwargs):
    """A history model with thermal end velocities (the draws' generator matters), EMT energies
    (the guards record them) and VelocityVerlet to build the history."""
    atoms.calc = EMT()
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    # the atoms start cold: their history MD counts as MD here (cold_md_fraction 0)
    return SurrogateDynamics(atoms, sur, guards=GuardConfig(action="warn", cold_md_fraction=0.0),
                             fallback_dynamics=md,
                             end_velocities="thermal", velocity_seed=5, **kwargs)


def counters(dyn):
    s = dyn.guards.summary()
    return (dyn.nsteps, dyn.n_jumps, dyn.n_history_md, dyn.n_fallbacks, s["jumps_checked"],
            s["jumps_failed"], s["failures"])


@pytest.fixture(scope="module")
def uninterrupted(estag):
    dyn = dynamics(cold_atoms(), estag)
    dyn.run(N_STEPS)
    assert (dyn.n_history_md, dyn.n_jumps) == (1, N_STEPS - 1)
    return dyn


@pytest.mark.parametrize("save_after", [1, 3])
def test_restart_from_the_trajectory_goes_on_as_the_uninterrupted_run(tmp_path, estag,
                                                                      uninterrupted, save_after):
    """Run ``save_after`` steps with a trajectory and ``restart=``, then build a new dynamics on
    the trajectory's last frame with the same ``restart=``: the rest of the run takes the same
    jumps (no history MD again, the same velocity draws, energies and counts) and the trajectory
    gets no duplicate frame. Saved after 1 step the state is one of MD (``_md_ps`` > 0), after 3
    one of a jump. Without the state file the restart rebuilt the history by MD, restarted the
    draws, the guards' anchor and the counters (the last part of this test)."""
    traj, state = tmp_path / "run.traj", tmp_path / "run.state.npz"
    first = dynamics(cold_atoms(), estag, trajectory=str(traj), restart=str(state))
    first.run(save_after)
    md_ps = first._md_ps
    assert (md_ps > 0) == (save_after == 1)
    energies = first.guards.energy_state()
    del first

    atoms = read(str(traj), -1)
    again = dynamics(atoms, estag, trajectory=str(traj), restart=str(state),
                     append_trajectory=True)
    assert again.nsteps == save_after and again._md_ps == md_ps
    assert again.guards.energy_state() == energies
    assert again.propagator.has_history(save_after * estag.jump_ps)
    again.run(N_STEPS - save_after)

    a = uninterrupted
    assert counters(again) == counters(a)
    assert again.get_time() == pytest.approx(a.get_time(), abs=1e-12)
    np.testing.assert_allclose(atoms.get_positions(), a.atoms.get_positions(), atol=1e-6)
    np.testing.assert_allclose(atoms.get_velocities(), a.atoms.get_velocities(), atol=1e-6)
    np.testing.assert_allclose(again.guards.energy_state()["energies"],
                               a.guards.energy_state()["energies"], rtol=1e-9)
    assert again.guards.energy_anchor_kJ_per_mol == pytest.approx(
        a.guards.energy_anchor_kJ_per_mol, rel=1e-9)
    frames = read(str(traj), ":")
    assert len(frames) == N_STEPS + 1  # the restart wrote no second copy of its first frame
    np.testing.assert_allclose(frames[-1].positions, a.atoms.positions, atol=1e-6)
    # the file follows the trajectory: saved at the last step
    assert saved_step(state) == N_STEPS

    # the same frame without the state: the old behaviour, another run
    fresh = dynamics(read(str(traj), save_after), estag)
    fresh.run(N_STEPS - save_after)
    assert fresh.nsteps == N_STEPS - save_after and fresh.n_history_md == 1
    assert np.abs(fresh.atoms.get_positions() - a.atoms.get_positions()).max() > 1e-3


def test_explicit_save_and_load_state(tmp_path, estag, uninterrupted):
    """``save_state`` mid-run, ``load_state`` on a new dynamics on the same atoms."""
    first = dynamics(cold_atoms(), estag)
    first.run(3)
    first.save_state(tmp_path / "mid.npz")
    atoms = first.atoms.copy()
    again = dynamics(atoms, estag)
    again.load_state(tmp_path / "mid.npz")
    again.run(N_STEPS - 3)
    assert counters(again) == counters(uninterrupted)
    np.testing.assert_allclose(atoms.get_positions(), uninterrupted.atoms.get_positions(),
                               atol=1e-6)
    np.testing.assert_allclose(atoms.get_velocities(), uninterrupted.atoms.get_velocities(),
                               atol=1e-6)


def test_a_state_of_other_atoms_is_refused_and_changes_nothing(tmp_path, estag, caplog):
    traj = tmp_path / "run.traj"
    first = dynamics(cold_atoms(), estag, trajectory=str(traj))
    first.run(2)
    path = tmp_path / "state.npz"
    first.save_state(path)
    saved = first.atoms.copy()

    moved = saved.copy()
    moved.positions[3] += (0.05, 0.0, 0.0)
    for build in (lambda: dynamics(moved.copy(), estag, restart=path),
                  lambda: dynamics(moved.copy(), estag).load_state(path)):
        with pytest.raises(EngineError, match=r"not applied: the positions differ from the "
                                              r"saved ones by up to 0.05 Å \(atom 3"):
            build()
    # refused before ASE opens the trajectory: not emptied (append_trajectory=False)
    with pytest.raises(EngineError, match="not applied"):
        dynamics(moved.copy(), estag, trajectory=str(traj), restart=path)
    assert len(read(str(traj), ":")) == 3
    dyn = dynamics(moved.copy(), estag)
    with pytest.raises(EngineError, match="saved at step 2"):
        dyn.load_state(path)
    assert (dyn.nsteps, dyn.n_jumps, dyn.n_history_md) == (0, 0, 0)
    assert not dyn.propagator.has_history(0.0) and dyn.guards.energy_state()["energies"] == []

    boxed = saved.copy()
    boxed.cell, boxed.pbc = [30.0, 30.0, 30.0], True
    with pytest.raises(EngineError, match="the cell differs"):
        dynamics(boxed, estag).load_state(path)

    other_jump = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "lin.pt",
                                                selection="heavy", jump_frames=2))
    with pytest.raises(EngineError, match="stepped by .*another jump"):
        SurrogateDynamics(saved.copy(), other_jump, guards="warn", restart=path)

    openmm_side = tmp_path / "run.chk.surrogate.npz"
    with open(openmm_side, "wb") as fh:
        np.savez(fh, keys=np.zeros(0, np.int64), frames=np.zeros((0, 10, 3)),
                 extra=np.array(json.dumps({"time_ps": 0.0})))
    with pytest.raises(EngineError, match="not a SurrogateDynamics state file"):
        dynamics(saved.copy(), estag).load_state(openmm_side)
    (tmp_path / "junk.npz").write_text("not a state")
    with pytest.raises(EngineError, match="not a SurrogateDynamics state file"):
        dynamics(saved.copy(), estag, restart=tmp_path / "junk.npz")

    # the same positions with other velocities: applied, with a warning
    kicked = saved.copy()
    kicked.set_velocities(kicked.get_velocities() + 1e-3)
    dyn = dynamics(kicked, estag)
    with caplog.at_level("WARNING", logger="integrations.ase_dynamics"):
        dyn.load_state(path)
    assert "velocities differ" in caplog.text and dyn.nsteps == 2


def test_without_a_state_file_the_run_is_unchanged(tmp_path, estag, uninterrupted):
    """No ``restart=``: nothing written, the run as before. ``restart=`` naming a file that does
    not exist yet: the same run, and the file written at the start and with every frame."""
    plain = dynamics(cold_atoms(), estag)
    plain.run(N_STEPS)
    assert list(tmp_path.iterdir()) == []
    state = tmp_path / "new.npz"
    fresh = dynamics(cold_atoms(), estag, restart=state, loginterval=2)
    seen = []
    fresh.attach(lambda: seen.append(saved_step(state)))
    fresh.run(N_STEPS)
    for dyn in (plain, fresh):
        assert counters(dyn) == counters(uninterrupted)
        np.testing.assert_array_equal(dyn.atoms.get_positions(),
                                      uninterrupted.atoms.get_positions())
    assert seen == [0, 0, 2, 2, 4, 4, 6]
    assert plain.todict()["restart"] is None and fresh.todict()["restart"] == str(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz"]  # no temporary left


@pytest.mark.parametrize("kind", ["generator", "randomstate"])
def test_hybrid_langevin_restart_draws_the_same_random_forces(tmp_path, kind):
    """Hybrid mode with Langevin MD between jumps: the state file carries the thermostat's
    random generator (a numpy Generator or RandomState), so the restarted MD segments draw the
    random forces of the uninterrupted run; restored into a Langevin seeded otherwise, the run
    still matches. Without it the segments after the restart differ by far more than 1e-6 Å."""
    from ase.md.langevin import Langevin

    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy"))

    def build(atoms, seed):
        atoms.calc = EMT()
        rng = np.random.default_rng(seed) if kind == "generator" else np.random.RandomState(seed)
        md = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=300, friction=0.02,
                      fixcm=False, rng=rng)
        return SurrogateDynamics(atoms, sur, md_dynamics=md, md_steps=4, guards="warn")

    whole = build(cold_atoms(), seed=1)
    whole.run(4)
    first = build(cold_atoms(), seed=1)
    first.run(2)
    first.save_state(tmp_path / "s.npz")
    atoms = cold_atoms()
    atoms.set_positions(first.atoms.get_positions())
    atoms.set_velocities(first.atoms.get_velocities())
    again = build(atoms, seed=99)  # another seed: only the restored state can make it match
    again.load_state(tmp_path / "s.npz")
    again.run(2)
    np.testing.assert_allclose(again.atoms.get_positions(), whole.atoms.get_positions(),
                               atol=1e-6)
    fresh = build(atoms.copy(), seed=99)
    fresh.atoms.set_velocities(first.atoms.get_velocities())
    fresh.run(2)
    assert np.abs(fresh.atoms.get_positions() - whole.atoms.get_positions()).max() > 1e-4


def nose_hoover_dynamics(atoms, sur, tchain=3, temperature_K=300.0, **kwargs):
    """Hybrid mode with a Nosé-Hoover chain between jumps: a 5 fs thermostat time, so that its
    chain variables move a cold start visibly within a few 2 fs segments."""
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    atoms.calc = EMT()
    md = NoseHooverChainNVT(atoms, timestep=0.5 * units.fs, temperature_K=temperature_K,
                            tdamp=5 * units.fs, tchain=tchain)
    return SurrogateDynamics(atoms, sur, md_dynamics=md, md_steps=4, guards="warn", **kwargs)


def test_hybrid_nose_hoover_chain_restart_goes_on_as_the_uninterrupted_run(tmp_path):
    """The state file carries the chain's positions and momenta (``eta``, ``p_eta``) and the
    MD's step count: restarted into a fresh dynamics and a fresh thermostat, the run ends where
    the uninterrupted one does, conserved energy included. Before, the thermostat restarted
    from rest (a warning), and the atoms after the restart moved by far more than 1e-6 Å."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy"))
    whole = nose_hoover_dynamics(cold_atoms(), sur)
    whole.run(4)
    first = nose_hoover_dynamics(cold_atoms(), sur, trajectory=str(tmp_path / "run.traj"),
                                 restart=tmp_path / "s.npz")
    first.run(2)
    chain = first.md_dynamics._thermostat
    assert np.abs(chain._p_eta).max() > 0  # the thermostat has moved
    mid = tmp_path / "mid.npz"
    mid.write_bytes((tmp_path / "s.npz").read_bytes())
    del first

    again = nose_hoover_dynamics(read(str(tmp_path / "run.traj"), -1), sur,
                                 restart=tmp_path / "s.npz")
    np.testing.assert_array_equal(again.md_dynamics._thermostat._eta, chain._eta)
    np.testing.assert_array_equal(again.md_dynamics._thermostat._p_eta, chain._p_eta)
    assert again.md_dynamics.nsteps == 8
    again.run(2)
    assert (again.nsteps, again.md_dynamics.nsteps) == (4, 16)
    np.testing.assert_allclose(again.atoms.get_positions(), whole.atoms.get_positions(),
                               rtol=0, atol=1e-10)
    np.testing.assert_allclose(again.atoms.get_velocities(), whole.atoms.get_velocities(),
                               rtol=0, atol=1e-10)
    assert again.md_dynamics.get_conserved_energy() == pytest.approx(
        whole.md_dynamics.get_conserved_energy(), rel=1e-12)

    # the same frame with a thermostat started afresh: another run
    fresh = nose_hoover_dynamics(read(str(tmp_path / "run.traj"), -1), sur)
    fresh.load_state(mid)
    fresh.md_dynamics._thermostat._eta[:] = 0.0
    fresh.md_dynamics._thermostat._p_eta[:] = 0.0
    fresh.run(2)
    assert np.abs(fresh.atoms.get_positions() - whole.atoms.get_positions()).max() > 1e-6


def test_a_state_of_another_thermostat_is_refused(tmp_path, caplog):
    """A file with a Nosé-Hoover chain's variables applies only to a dynamics running the same
    chain (length, temperature, thermostat time); another chain, another MD or none is refused
    with the reason before anything changes (with ``restart=``, before the trajectory opens)."""
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy"))
    first = nose_hoover_dynamics(cold_atoms(), sur)
    first.run(2)
    path = tmp_path / "s.npz"
    first.save_state(path)

    def at_saved_state():
        atoms = cold_atoms()
        atoms.set_positions(first.atoms.get_positions())
        atoms.set_velocities(first.atoms.get_velocities())
        return atoms

    for build, why in (
            (lambda: nose_hoover_dynamics(at_saved_state(), sur, tchain=2),
             r"md_dynamics \(NoseHooverChainNVT\).*chain of 3 .* 2"),
            (lambda: nose_hoover_dynamics(at_saved_state(), sur, temperature_K=200.0),
             r"md_dynamics \(NoseHooverChainNVT\).*300 K.* 200 K"),
            (lambda: nose_hoover_dynamics(at_saved_state(), sur), None)):
        dyn = build()
        if why is None:
            dyn.load_state(path)
            assert dyn.nsteps == 2
            continue
        with pytest.raises(EngineError, match=why):
            dyn.load_state(path)
        assert dyn.nsteps == 0 and not dyn.md_dynamics._thermostat._p_eta.any()

    atoms = at_saved_state()
    atoms.calc = EMT()
    verlet = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn = SurrogateDynamics(atoms, sur, md_dynamics=verlet, md_steps=4, guards="warn")
    with pytest.raises(EngineError, match=r"NoseHooverChainNVT.*VelocityVerlet"):
        dyn.load_state(path)
    with pytest.raises(EngineError, match="NoseHooverChainNVT"):
        SurrogateDynamics(atoms, sur, md_dynamics=verlet, md_steps=4, guards="warn",
                          restart=path)
    # and the other way round: a chain here, none in the file
    dyn.save_state(tmp_path / "verlet.npz")
    with pytest.raises(EngineError, match=r"md_dynamics \(VelocityVerlet\) kept no Nosé-Hoover"):
        nose_hoover_dynamics(at_saved_state(), sur).load_state(tmp_path / "verlet.npz")
    # the same chain integrated with a longer MD step (the same cycle length): applied, with
    # a warning that the run does not go on exactly
    atoms = at_saved_state()
    atoms.calc = EMT()
    long_md = NoseHooverChainNVT(atoms, timestep=1.0 * units.fs, temperature_K=300,
                                 tdamp=5 * units.fs)
    dyn = SurrogateDynamics(atoms, sur, md_dynamics=long_md, md_steps=2, guards="warn")
    with caplog.at_level("WARNING", logger="integrations.ase_dynamics"):
        dyn.load_state(path)
    assert "saved with a 0.5 fs step, this one steps by 1 fs" in caplog.text
    np.testing.assert_array_equal(long_md._thermostat._p_eta,
                                  first.md_dynamics._thermostat._p_eta)
    # a file written before the chain was kept: applied, the chain from rest, with a warning
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    extra = json.loads(str(arrays["extra"]))
    del extra["md_state"]
    arrays["extra"] = np.array(json.dumps(extra))
    with open(tmp_path / "older.npz", "wb") as fh:
        np.savez(fh, **arrays)
    dyn = nose_hoover_dynamics(at_saved_state(), sur)
    caplog.clear()
    with caplog.at_level("WARNING", logger="integrations.ase_dynamics"):
        dyn.load_state(tmp_path / "older.npz")
    assert "Nosé-Hoover chain of the md_dynamics (NoseHooverChainNVT) starts from rest" in (
        caplog.text)
    assert dyn.nsteps == 2 and not dyn.md_dynamics._thermostat._p_eta.any()


def test_fallback_nose_hoover_chain_restart_goes_on_as_the_uninterrupted_run(tmp_path):
    """The same for a Nosé-Hoover chain standing in for failed jumps (a hot start: every jump
    fails the bond guard and is replaced by a jump's length of MD)."""
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy"))

    def build(atoms):
        atoms.calc = EMT()
        md = NoseHooverChainNVT(atoms, timestep=0.5 * units.fs, temperature_K=300,
                                tdamp=5 * units.fs)
        return SurrogateDynamics(atoms, sur, guards="fallback", fallback_dynamics=md)

    def hot():
        atoms = read(str(PDB))
        atoms.set_positions(cached_md()["frames"][0])
        thermalize_momenta(atoms, temperature_K=20000, rng=np.random.default_rng(1))
        return atoms

    whole = build(hot())
    whole.run(4)
    first = build(hot())
    first.run(2)
    first.save_state(tmp_path / "s.npz")
    again = build(first.atoms.copy())
    again.load_state(tmp_path / "s.npz")
    again.run(2)
    assert again.n_fallbacks == whole.n_fallbacks == 4
    np.testing.assert_allclose(again.atoms.get_positions(), whole.atoms.get_positions(),
                               rtol=0, atol=1e-10)
    assert again.fallback_dynamics.nsteps == whole.fallback_dynamics.nsteps == 160
