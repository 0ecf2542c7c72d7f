"""Stochastic jumps in the engines: a :class:`~surrogate_md.noise.JumpNoise` handed to
``SurrogatePropagator``, ``SurrogateSimulation``, ``SurrogateDynamics`` and ``python -m
integrations.predict --jump-noise``.

- a noisy jump moves the predicted atoms away from the model's mean by about the noise's RMS,
  as ``predicted + (t / jump) · ε``; the same seed gives the same run, another seed another;
- ``noise_scale=0`` is the deterministic run, bit for bit;
- a noise model fitted for another atom count or jump length is refused, naming the fix;
- a checkpoint (``<file>.surrogate.npz``) or an ASE state file carries the noise generator: a
  restarted run takes the draws of the uninterrupted one;
- ``predict --jump-noise`` records the noise in its provenance, and ``--resume`` refuses a run
  made with another noise file or scale.
- a history model (ESTAG) remembers the noisy frames of its jumps as its next input, and a
  restart continues with them.

The noise models are fitted (``JumpNoise.fit``) on synthetic windows: the fixture MD's frames of
the model's atoms as the "predictions" and Gaussian residuals of known size as the targets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _integration_fixtures import (
    PDB,
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
)
from ase.io import Trajectory, read
from ase.md.velocitydistribution import thermalize_momenta
from openmm import unit

from integrations.ase_dynamics import SurrogateDynamics
from integrations.openmm_simulation import SurrogateSimulation
from integrations.predict import main
from integrations.propagator import SurrogatePropagator
from integrations.writers import PS_IN_ASE_TIME
from surrogate_md import Surrogate
from surrogate_md.errors import DataError, EngineError
from surrogate_md.noise import JumpNoise

A = unit.angstrom
RESIDUAL_A = 0.02  # per coordinate: a draw moves an atom by ~0.035 Å, the guards keep it


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """The analytic ``linear`` surrogate on the heavy atoms (jump 0.02 ps, frames at 0.01 and
    0.02 ps; the hydrogens are rebuilt)."""
    path = tmp_path_factory.mktemp("noise") / "heavy.pt"
    return Surrogate.load(make_checkpoint(cached_md(), path, selection="heavy"))


def fit_noise(surrogate, *, residual_A=RESIDUAL_A, n_atoms=None, jump_ps=None, windows=60,
              seed=0) -> JumpNoise:
    """A JumpNoise fitted on ``windows`` synthetic jump ends of ``n_atoms`` atoms (default the
    surrogate's model atoms): MD frames as predictions, targets ``residual_A`` Å away per
    coordinate."""
    rng = np.random.default_rng(seed)
    frames = cached_md()["frames"][:windows]
    n = surrogate.n_model_atoms if n_atoms is None else n_atoms
    pred = frames[:, surrogate.model_atoms] if n == surrogate.n_model_atoms else frames[:, :n]
    target = pred + rng.normal(0.0, residual_A, pred.shape)
    return JumpNoise.fit(pred, target, surrogate.jump_ps if jump_ps is None else jump_ps,
                         meta={"model": surrogate.name})


@pytest.fixture(scope="module")
def noise(linear):
    return fit_noise(linear)


def make_sim(surrogate, **kwargs):
    top, system, positions = alanine_system()
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                              guards=kwargs.pop("guards", "warn"), **kwargs)
    cold_start(sim.context, positions)
    return sim


def positions_A(sim):
    return sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)


def run(surrogate, jumps, **kwargs):
    sim = make_sim(surrogate, **kwargs)
    sim.step(jumps)
    return sim, positions_A(sim)


# -- (a) the size and shape of a noisy jump, and its seed ------------------------------------------
def test_a_noisy_jump_adds_the_scaled_draw_to_the_predicted_frames(linear, noise):
    """The propagator's predicted frames are the model's plus ``(t / jump) · ε``, and the
    full-system frames carry them for the model's atoms."""
    md = cached_md()
    pos, vel = md["frames"][0], md["velocities"][0]
    plain = SurrogatePropagator(linear).jump(pos, vel, 0.0)
    noisy = SurrogatePropagator(linear, jump_noise=noise, noise_seed=1).jump(pos, vel, 0.0)
    eps = noisy.predicted_A - plain.predicted_A  # (P, n_model, 3)
    frac = linear.times_ps / linear.jump_ps
    np.testing.assert_allclose(eps, frac[:, None, None] * eps[-1][None], atol=1e-12)
    rms = float(np.sqrt(np.mean(np.sum(eps[-1] ** 2, -1))))
    assert 0.5 * noise.rms_A < rms < 1.5 * noise.rms_A
    np.testing.assert_allclose(noisy.positions_A[:, linear.model_atoms], noisy.predicted_A,
                               atol=1e-9)
    # the jump-end form (what jump-step engines ask for) holds the same draw
    end = SurrogatePropagator(linear, jump_noise=noise, noise_seed=1).jump(pos, vel, 0.0,
                                                                          last_only=True)
    np.testing.assert_array_equal(end.predicted_A, noisy.predicted_A)
    np.testing.assert_allclose(end.positions_A[-1], noisy.positions_A[-1], atol=1e-12)


def test_simulation_jumps_move_by_the_noise_and_repeat_with_their_seed(linear, noise):
    plain, x0 = run(linear, 1)
    one, x1 = run(linear, 1, jump_noise=noise, noise_seed=1)
    model = linear.model_atoms
    d = x1[model] - x0[model]
    rms = float(np.sqrt(np.mean(np.sum(d ** 2, -1))))
    assert 0.5 * noise.rms_A < rms < 1.5 * noise.rms_A, (rms, noise.rms_A)
    assert one.n_jumps == 1 and one.guards.summary()["jumps_failed"] == 0
    # over a few jumps: the same seed the same run, another seed another
    _, a = run(linear, 4, jump_noise=noise, noise_seed=3)
    _, b = run(linear, 4, jump_noise=noise, noise_seed=3)
    _, c = run(linear, 4, jump_noise=noise, noise_seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c)[model].max() > 0.2 * noise.rms_A
    # the summary records the noise and its scale
    s = one.summary()
    assert s["jump_noise"]["scale"] == 1.0
    assert s["jump_noise"]["rms_A"] == pytest.approx(noise.rms_A)
    assert s["jump_noise"]["atoms"] == linear.n_model_atoms
    json.dumps(s)
    assert plain.summary()["jump_noise"] is None


def test_noise_draws_leave_the_thermal_velocity_draws_alone(linear, noise):
    """One seed for both: the noise has a generator of its own, so the thermal end velocities
    are the noiseless run's draws."""
    md = cached_md()
    pos, vel = md["frames"][0], md["velocities"][0]
    masses = np.asarray(md["topology"].masses, dtype=np.float64)
    kwargs = {"end_velocities": "thermal", "masses_amu": masses, "seed": 7}
    plain = SurrogatePropagator(linear, **kwargs)
    noisy = SurrogatePropagator(linear, jump_noise=noise, noise_seed=7, **kwargs)
    # and not the same random numbers as the velocity draws of that seed
    assert noisy.memory()["noise_rng"] != noisy.memory()["rng"]
    for _ in range(3):
        v0 = plain.jump(pos, vel, 0.0).velocities_A_per_ps[-1]
        v1 = noisy.jump(pos, vel, 0.0).velocities_A_per_ps[-1]
        np.testing.assert_array_equal(v1, v0)


def test_jump_reporter_takes_noisy_jumps_repeatably(linear, noise):
    """``SurrogateJumpReporter`` in a plain ``Simulation``: the same seed the same run."""
    import openmm
    from openmm import app

    from integrations.openmm_simulation import SurrogateJumpReporter

    def reporter_run(**kwargs):
        top, system, positions = alanine_system()
        sim = app.Simulation(top, system, openmm.VerletIntegrator(0.0005 * unit.picosecond),
                             reference_platform())
        cold_start(sim.context, positions)
        jumps = SurrogateJumpReporter(linear, interval=4, guards="warn", **kwargs)
        sim.reporters.append(jumps)
        sim.step(12)
        assert jumps.n_jumps == 3
        return positions_A(sim)

    plain = reporter_run()
    a = reporter_run(jump_noise=noise, noise_seed=1)
    b = reporter_run(jump_noise=noise, noise_seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain)[linear.model_atoms].max() > 0.2 * noise.rms_A


# -- (b) scale 0 --------------------------------------------------------------------------------
def test_scale_zero_is_the_noiseless_run_exactly(linear, noise):
    _, x0 = run(linear, 3)
    _, xz = run(linear, 3, jump_noise=noise, noise_scale=0.0, noise_seed=1)
    np.testing.assert_array_equal(xz, x0)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(EngineError, match="noise_scale must be a finite number >= 0"):
            make_sim(linear, jump_noise=noise, noise_scale=bad)
    with pytest.raises(EngineError, match="noise_seed must be a whole number >= 0"):
        SurrogatePropagator(linear, jump_noise=noise, noise_seed=-1)


# -- (c) noise of another model is refused -------------------------------------------------------
def test_noise_for_another_atom_set_or_jump_is_refused_naming_the_fix(tmp_path, linear):
    n = linear.n_model_atoms
    atoms = fit_noise(linear, n_atoms=n + 2)
    with pytest.raises(DataError, match=rf"fitted for {n + 2} predicted atoms; this surrogate "
                                        rf"predicts {n}\. Fit one for it: .*--noise-out"):
        make_sim(linear, jump_noise=atoms)
    jump = fit_noise(linear, jump_ps=2 * linear.jump_ps)
    path = tmp_path / "long.npz"
    jump.save(path)
    # given as a file, the message names it
    with pytest.raises(DataError, match=rf"{path.name}: jump noise fitted for 0.04 ps jumps; "
                                        r"this surrogate jumps 0.02 ps\. .*--noise-out"):
        make_sim(linear, jump_noise=str(path))
    atoms_obj = read(str(PDB))
    with pytest.raises(DataError, match="--noise-out"):
        SurrogateDynamics(atoms_obj, linear, guards="warn", jump_noise=path)
    with pytest.raises(DataError, match="no such jump-noise file"):
        make_sim(linear, jump_noise=tmp_path / "missing.npz")


def test_a_saved_noise_file_is_the_same_noise(tmp_path, linear, noise):
    path = tmp_path / "noise.npz"
    noise.save(path)
    _, a = run(linear, 2, jump_noise=noise, noise_seed=5)
    _, b = run(linear, 2, jump_noise=str(path), noise_seed=5)
    np.testing.assert_array_equal(a, b)


# -- (d) restarts carry the noise generator --------------------------------------------------------
@pytest.mark.parametrize("save", ["checkpoint", "state"])
def test_checkpoint_restart_takes_the_uninterrupted_draws(tmp_path, linear, noise, save):
    """Saved after 3 of 6 noisy jumps (thermal end velocities too: both generators) and loaded
    into a new simulation, the last 3 jumps are those of the uninterrupted run; without the
    ``.surrogate.npz`` the draws start over and the run differs."""
    kwargs = {"jump_noise": noise, "noise_seed": 11, "end_velocities": "thermal",
              "velocity_seed": 2}
    whole, x_whole = run(linear, 6, **kwargs)
    first = make_sim(linear, **kwargs)
    first.step(3)
    path = tmp_path / f"run.{save}"
    (first.saveCheckpoint if save == "checkpoint" else first.saveState)(str(path))
    with np.load(f"{path}.surrogate.npz") as data:
        assert json.loads(str(data["extra"]))["noise_rng"] is not None
    again = make_sim(linear, **kwargs)
    (again.loadCheckpoint if save == "checkpoint" else again.loadState)(str(path))
    assert again.n_jumps == 3
    again.step(3)
    assert again.n_jumps == whole.n_jumps == 6 and again.currentStep == whole.currentStep
    np.testing.assert_allclose(positions_A(again), x_whole, atol=1e-9)
    v, v_whole = (s.context.getState(velocities=True).getVelocities(asNumpy=True)._value
                  for s in (again, whole))
    np.testing.assert_allclose(v, v_whole, atol=1e-9)
    # the same state without the surrogate's file: the draws start over, another run
    bare = tmp_path / f"bare.{save}"
    bare.write_bytes(path.read_bytes())
    fresh = make_sim(linear, **kwargs)
    (fresh.loadCheckpoint if save == "checkpoint" else fresh.loadState)(str(bare))
    fresh.step(3)
    assert np.abs(positions_A(fresh) - x_whole)[linear.model_atoms].max() > 0.2 * noise.rms_A


def interrupt_while_judged(guards, go) -> None:
    """Run ``go()`` with a Ctrl-C arriving while the guards judge its jump (after the draw)."""
    check = guards.check

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    guards.check = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            go()
    finally:
        guards.check = check


def test_an_interrupted_jump_gives_its_draws_back(tmp_path, linear, noise):
    """Ctrl-C while the 4th jump is judged (after its draw): the state goes back to the jump's
    start and so do the generators, so a checkpoint saved then restarts into the uninterrupted
    run (before, the noise generator stayed a draw ahead: 0.15 Å off after 3 more jumps)."""
    kwargs = {"jump_noise": noise, "noise_seed": 11, "end_velocities": "thermal",
              "velocity_seed": 2}
    _, x_whole = run(linear, 6, **kwargs)
    first = make_sim(linear, **kwargs)
    first.step(3)
    interrupt_while_judged(first.guards, lambda: first.step(1))
    assert first.n_jumps == 3
    first.saveCheckpoint(str(tmp_path / "c.chk"))
    again = make_sim(linear, **kwargs)
    again.loadCheckpoint(str(tmp_path / "c.chk"))
    again.step(3)
    np.testing.assert_allclose(positions_A(again), x_whole, atol=1e-9)


# -- (d2) redraws: a failed draw drawn again before the MD stands in ------------------------------
def fail_first_checks(guards, n: int) -> list:
    """Make the first ``n`` checks of ``guards`` fail (an energy event added to what the real
    check finds); returns the list of check verdicts as they happen."""
    from integrations.guards import GuardEvent

    check, verdicts = guards.check, []

    def failing(positions, *args, **kwargs):
        events = check(positions, *args, **kwargs)
        if len(verdicts) < n:
            events = [GuardEvent("energy", 1e9, 1.0, kwargs.get("jump", 0),
                                 kwargs.get("time_ps", 0.0)), *events]
        verdicts.append(not events)
        return events

    guards.check = failing
    return verdicts


def test_a_failed_draw_is_drawn_again_before_the_md_stands_in(linear, noise):
    """With ``redraws``, a stochastic jump whose draw would fall back to MD is drawn again from
    the same start: the kept end is the first draw that passes, the guards count the redraws,
    and only when every draw fails does the MD stand in."""
    from integrations.guards import GuardConfig

    sim = make_sim(linear, guards=GuardConfig(action="fallback"), jump_noise=noise,
                   noise_seed=5, redraws=3)
    start = positions_A(sim)
    vel = sim.context.getState(velocities=True).getVelocities(asNumpy=True).value_in_unit(
        A / unit.picosecond)
    verdicts = fail_first_checks(sim.guards, 2)
    sim.step(1)
    assert verdicts == [False, False, True]
    assert (sim.n_jumps, sim.n_fallbacks, sim.n_redraws) == (1, 0, 2)
    assert sim.guards.summary()["actions"] == {"redraw": 2}
    assert sim.summary()["n_redraws"] == 2 and sim.summary()["redraws"] == 3
    # the kept end is the third draw from the same start, not the first or second
    prop = SurrogatePropagator(linear, jump_noise=noise, noise_seed=5)
    ends = [prop.jump(start, vel, 0.0).predicted_A[-1] for _ in range(3)]
    kept = positions_A(sim)[linear.model_atoms]
    off = [float(np.abs(kept - e).max()) for e in ends]
    assert off[2] < 0.02 and min(off[:2]) > 5 * off[2], off

    # every draw fails: one redraw, then the MD
    sim = make_sim(linear, guards=GuardConfig(action="fallback"), jump_noise=noise,
                   noise_seed=5, redraws=1)
    verdicts = fail_first_checks(sim.guards, 10)
    sim.step(1)
    assert verdicts == [False, False]
    assert (sim.n_jumps, sim.n_fallbacks, sim.n_redraws) == (0, 1, 1)
    assert sim.guards.summary()["actions"] == {"redraw": 1, "fallback": 1}


def count_model_calls(surrogate, monkeypatch) -> list:
    """Record every ``surrogate.predict`` call (its positions) while it still predicts."""
    calls, predict = [], surrogate.predict

    def counted(pos, *args, **kwargs):
        calls.append(np.array(pos))
        return predict(pos, *args, **kwargs)

    monkeypatch.setattr(surrogate, "predict", counted)
    return calls


def test_a_redraw_reuses_the_models_mean_and_draws_only_the_noise_anew(linear, noise,
                                                                        monkeypatch):
    """The model is deterministic: drawing a jump again from the same state needs no second
    model call, only a fresh draw; a new state (or time, or velocities) calls the model."""
    from integrations.guards import GuardConfig

    calls = count_model_calls(linear, monkeypatch)
    prop = SurrogatePropagator(linear, jump_noise=noise, noise_seed=5)
    plain = SurrogatePropagator(linear)
    sim = make_sim(linear, guards=GuardConfig(action="fallback"))
    start = positions_A(sim)
    vel = sim.context.getState(velocities=True).getVelocities(asNumpy=True).value_in_unit(
        A / unit.picosecond)
    first, second = (prop.jump(start, vel, 0.0) for _ in range(2))
    assert len(calls) == 1  # one model call for both draws
    assert np.abs(first.predicted_A - second.predicted_A).max() > 1e-3  # two different draws
    # the mean both draws scatter around is the model's own, not a stale one
    mean = plain.jump(start, vel, 0.0).predicted_A
    assert len(calls) == 2
    fresh = SurrogatePropagator(linear, jump_noise=noise, noise_seed=5)
    np.testing.assert_allclose(fresh.jump(start, vel, 0.0).predicted_A - mean,
                               first.predicted_A - mean, atol=1e-12)
    assert len(calls) == 3
    moved = start + 0.01
    for args in ((moved, vel, 0.0), (moved, vel, 1.0), (moved, 1.1 * vel, 1.0)):
        prop.jump(*args)
    assert len(calls) == 6  # each a new state for the model
    result = prop.jump(moved, 1.1 * vel, 1.0)
    result.predicted_A[:] = np.nan  # a caller's changes do not reach the kept mean
    assert len(calls) == 6 and np.isfinite(prop.jump(moved, 1.1 * vel, 1.0).predicted_A).all()

    # inside the engine: two failed draws and the kept third cost one model call
    sim = make_sim(linear, guards=GuardConfig(action="fallback"), jump_noise=noise,
                   noise_seed=5, redraws=3)
    fail_first_checks(sim.guards, 2)
    calls.clear()
    sim.step(1)
    assert sim.n_redraws == 2 and len(calls) == 1


def test_a_relaxation_knows_whether_its_draw_can_be_drawn_again(linear, noise, monkeypatch):
    """Under the ``relax`` action the engine tells each relaxation whether a failure is drawn
    again (it may then stop early: ``relax_until_accepted(redraw_left=...)``), and the last
    draw's relaxation that it is not."""
    from integrations import openmm_simulation as oms
    from integrations.guards import GuardConfig, GuardEvent

    sim = make_sim(linear, guards=GuardConfig(action="relax"), jump_noise=noise, noise_seed=5,
                   redraws=2)
    fail_first_checks(sim.guards, 10)  # every draw fails as drawn: each is relaxed
    asked, relax = [], oms.relax_until_accepted

    def spy(relaxation, context, guards, jump, time_ps, energy=None, **kwargs):
        asked.append(kwargs["redraw_left"])
        if len(asked) < 3:  # the first two relaxations fail
            return (positions_A(sim), 0.0,
                    [GuardEvent("energy", 1e9, 1.0, jump, time_ps)])
        return relax(relaxation, context, guards, jump, time_ps, energy, **kwargs)

    monkeypatch.setattr(oms, "relax_until_accepted", spy)
    sim.step(1)
    assert asked == [True, True, False]
    assert sim.n_redraws == 2 and sim.guards.summary()["actions"]["redraw"] == 2


def test_an_interrupted_redraw_gives_its_count_and_draws_back(linear, noise):
    """Ctrl-C while a redraw is judged: the state, the draws and the redraw count go back to
    the jump's start, so the next step makes the jump an uninterrupted run makes."""
    from integrations.guards import GuardConfig, GuardEvent

    kwargs = {"guards": GuardConfig(action="fallback"), "jump_noise": noise, "noise_seed": 5,
              "redraws": 3}
    sim = make_sim(linear, **kwargs)
    start = positions_A(sim)
    check, calls = sim.guards.check, []

    def failing_then_interrupted(positions, *args, **kw):
        calls.append(1)
        if len(calls) == 1:
            return [GuardEvent("energy", 1e9, 1.0, 0, 0.0)]
        raise KeyboardInterrupt

    sim.guards.check = failing_then_interrupted
    with pytest.raises(KeyboardInterrupt):
        sim.step(1)
    assert len(calls) == 2 and (sim.n_jumps, sim.n_redraws) == (0, 0)
    np.testing.assert_allclose(positions_A(sim), start, atol=1e-12)  # through nm and back
    sim.guards.check = check
    sim.step(1)
    _, whole = run(linear, 1, **kwargs)
    np.testing.assert_allclose(positions_A(sim), whole, atol=1e-9)
    assert sim.n_redraws == 0


def test_redraws_are_refused_without_noise_or_as_a_bad_count(linear, noise):
    with pytest.raises(EngineError, match="need jump_noise"):
        make_sim(linear, redraws=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(EngineError, match="redraws must be a whole number"):
            make_sim(linear, jump_noise=noise, redraws=bad)
    assert make_sim(linear, redraws=0).redraws == 0  # the default, with or without noise


def test_a_checkpoint_keeps_the_redraw_count(tmp_path, linear, noise):
    from integrations.guards import GuardConfig

    sim = make_sim(linear, guards=GuardConfig(action="fallback"), jump_noise=noise,
                   noise_seed=5, redraws=2)
    fail_first_checks(sim.guards, 1)
    sim.step(2)
    assert sim.n_redraws == 1 and sim.n_jumps == 2
    sim.saveCheckpoint(str(tmp_path / "r.chk"))
    again = make_sim(linear, guards=GuardConfig(action="fallback"), jump_noise=noise,
                     noise_seed=5, redraws=2)
    again.loadCheckpoint(str(tmp_path / "r.chk"))
    assert (again.n_jumps, again.n_redraws) == (2, 1)


# -- (e) ASE --------------------------------------------------------------------------------------
def cold_atoms():
    atoms = read(str(PDB))
    atoms.set_positions(cached_md()["frames"][0])
    thermalize_momenta(atoms, temperature_K=0.05, rng=np.random.default_rng(0))
    return atoms


def ase_run(surrogate, steps, **kwargs):
    atoms = cold_atoms()
    dyn = SurrogateDynamics(atoms, surrogate, guards="warn", **kwargs)
    dyn.run(steps)
    return dyn, atoms.get_positions()


def test_ase_noisy_jumps_repeat_with_their_seed_and_restart(tmp_path, linear, noise):
    _, plain = ase_run(linear, 4)
    dyn, a = ase_run(linear, 4, jump_noise=noise, noise_seed=3)
    _, b = ase_run(linear, 4, jump_noise=noise, noise_seed=3)
    _, c = ase_run(linear, 4, jump_noise=noise, noise_seed=4)
    model = linear.model_atoms
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c)[model].max() > 0.2 * noise.rms_A
    assert np.abs(a - plain)[model].max() > 0.2 * noise.rms_A
    _, zero = ase_run(linear, 4, jump_noise=noise, noise_scale=0.0, noise_seed=3)
    np.testing.assert_array_equal(zero, plain)
    d = dyn.todict()
    json.dumps(d)
    assert d["jump_noise"]["scale"] == 1.0 and d["jump_noise"]["rms_A"] == pytest.approx(
        noise.rms_A)
    # a trajectory's description carries it; a state file carries the generator
    traj, state = tmp_path / "n.traj", tmp_path / "n.state.npz"
    atoms = cold_atoms()
    first = SurrogateDynamics(atoms, linear, guards="warn", jump_noise=noise, noise_seed=3,
                              trajectory=str(traj), restart=str(state))
    first.run(2)
    first.close()
    with Trajectory(str(traj)) as t:
        assert t.description["jump_noise"]["scale"] == 1.0
    again_atoms = read(str(traj), -1)
    again = SurrogateDynamics(again_atoms, linear, guards="warn", jump_noise=noise,
                              noise_seed=3, restart=str(state))
    assert again.nsteps == 2
    again.run(2)
    np.testing.assert_allclose(again_atoms.get_positions(), a, atol=1e-9)


def test_ase_redraws_a_failed_draw_before_the_md_stands_in(tmp_path, linear, noise):
    """SurrogateDynamics as the OpenMM engine: the kept end is the first draw that passes, the
    redraws are counted (guards and restart file), and only when every draw fails does
    ``fallback_dynamics`` stand in."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.verlet import VelocityVerlet

    from integrations.guards import GuardConfig

    def dynamics(redraws):
        atoms = cold_atoms()
        atoms.calc = EMT()
        md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        return atoms, SurrogateDynamics(atoms, linear, guards=GuardConfig(action="fallback"),
                                        fallback_dynamics=md, jump_noise=noise, noise_seed=5,
                                        redraws=redraws)

    atoms, dyn = dynamics(3)
    start, vel = atoms.get_positions(), atoms.get_velocities() * PS_IN_ASE_TIME
    verdicts = fail_first_checks(dyn.guards, 2)
    dyn.run(1)
    assert verdicts == [False, False, True]
    assert (dyn.n_jumps, dyn.n_fallbacks, dyn.n_redraws) == (1, 0, 2)
    assert dyn.guards.summary()["actions"] == {"redraw": 2}
    prop = SurrogatePropagator(linear, jump_noise=noise, noise_seed=5)
    ends = [prop.jump(start, vel, 0.0).predicted_A[-1] for _ in range(3)]
    kept = atoms.get_positions()[linear.model_atoms]
    off = [float(np.abs(kept - e).max()) for e in ends]
    assert off[2] < 0.02 and min(off[:2]) > 5 * off[2], off
    dyn.save_state(tmp_path / "r.npz")
    atoms2, again = dynamics(3)
    atoms2.set_positions(atoms.get_positions())
    atoms2.set_velocities(atoms.get_velocities())
    again.load_state(tmp_path / "r.npz")
    assert again.n_redraws == 2

    atoms, dyn = dynamics(1)
    verdicts = fail_first_checks(dyn.guards, 10)
    dyn.run(1)
    assert verdicts == [False, False]
    assert (dyn.n_jumps, dyn.n_fallbacks, dyn.n_redraws) == (0, 1, 1)
    assert dyn.guards.summary()["actions"] == {"redraw": 1, "fallback": 1}
    with pytest.raises(EngineError, match="need jump_noise"):
        SurrogateDynamics(cold_atoms(), linear, guards="warn", redraws=1)
    with pytest.raises(EngineError, match="redraws must be a whole number"):
        SurrogateDynamics(cold_atoms(), linear, guards="warn", jump_noise=noise, redraws=-2)


def test_ase_interrupted_jump_leaves_the_start_and_its_draws(linear, noise):
    """Ctrl-C while an ASE jump is judged: the atoms are back at the jump's start (never the
    unchecked state) and the next jump draws what the interrupted one drew."""
    atoms = cold_atoms()
    dyn = SurrogateDynamics(atoms, linear, guards="warn", jump_noise=noise, noise_seed=3)
    dyn.run(2)
    start = atoms.get_positions()
    interrupt_while_judged(dyn.guards, lambda: dyn.run(1))
    np.testing.assert_array_equal(atoms.get_positions(), start)
    dyn.run(2)
    _, whole = ase_run(linear, 4, jump_noise=noise, noise_seed=3)
    np.testing.assert_allclose(atoms.get_positions(), whole, atol=1e-9)


# -- (f) the predict command ----------------------------------------------------------------------
def predict_argv(ck, out, n, *extra):
    return [str(ck), "--topology", str(PDB), "-n", str(n), "-o", str(out), "--platform",
            "Reference", "--guard", "warn", *map(str, extra)]


def dcd_positions(path):
    import MDAnalysis as mda

    u = mda.Universe(str(PDB), str(path))
    return np.stack([ts.positions.copy() for ts in u.trajectory])


def test_predict_records_the_noise_and_resume_refuses_another(tmp_path, monkeypatch, capsys,
                                                              linear):
    # the constant model never moves an atom: every motion in the trajectory is the noise
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    constant = Surrogate.load(ck)
    noise_file = tmp_path / "noise.npz"
    fit_noise(constant, residual_A=0.05).save(noise_file)
    extra = ["--jump-noise", noise_file, "--noise-scale", 0.5, "--seed", 2]
    reference = tmp_path / "ref" / "run.dcd"
    reference.parent.mkdir()
    assert main(predict_argv(ck, reference, 6, *extra)) == 0
    prov = json.loads(reference.with_suffix(".json").read_text())
    assert prov["jump_noise"]["scale"] == 0.5 and prov["jump_noise"]["atoms"] == \
        constant.n_model_atoms
    assert prov["argv"]["jump_noise"] == str(noise_file) and prov["argv"]["noise_scale"] == 0.5
    assert prov["resume_identity"]["noise_scale"] == 0.5
    assert len(prov["resume_identity"]["jump_noise"]) == 16  # the file's sha256
    x = dcd_positions(reference)
    steps = np.sqrt(np.mean(np.sum(np.diff(x[:, constant.model_atoms], axis=0) ** 2, -1), -1))
    assert np.all(steps > 0.2 * 0.5 * 0.05)  # every jump moved by the (halved) noise

    # a run stopped after 3 jumps, then resumed with other noise settings: refused
    out = tmp_path / "run" / "cut.dcd"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 6, *extra)
    jump, calls = SurrogateSimulation._jump, []

    def stopped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        jump(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(SurrogateSimulation, "_jump", stopped)
        assert main(argv) == 130
    other = tmp_path / "other.npz"
    fit_noise(constant, residual_A=0.05, seed=1).save(other)
    capsys.readouterr()
    cases = {"--noise-scale was 0.5, now 0.7": [*argv, "--noise-scale", "0.7"],
             "the --jump-noise file (sha256) was": [*predict_argv(ck, out, 6, "--jump-noise",
                                                                  other, "--noise-scale", 0.5,
                                                                  "--seed", 2)],
             "--noise-scale was 0.5, now None": predict_argv(ck, out, 6, "--seed", 2)}
    for why, bad in cases.items():
        assert main([*bad, "--resume"]) == 1, why
        err = capsys.readouterr().err
        assert "the interrupted run was made by another command" in err and why in err, err
    # the same command goes on with the draws the uninterrupted run took
    assert main([*argv, "--resume"]) == 0
    np.testing.assert_allclose(dcd_positions(out), x, atol=1e-4)

    # --noise-scale without noise, or a negative one: refused before anything is written
    for bad, why in (([], "no --jump-noise FILE was given"),
                     (["--jump-noise", noise_file], "--noise-scale must be a finite number")):
        scale = "-1" if bad else "0.5"
        assert main(predict_argv(ck, tmp_path / "x.dcd", 2, *bad, "--noise-scale", scale)) == 1
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x.dcd").exists()


def test_predict_redraws_reach_the_engine_and_the_resume_identity(tmp_path, capsys):
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    noise_file = tmp_path / "noise.npz"
    fit_noise(Surrogate.load(ck), residual_A=0.05).save(noise_file)
    out = tmp_path / "r.dcd"
    assert main(predict_argv(ck, out, 2, "--jump-noise", noise_file, "--redraws", 3)) == 0
    prov = json.loads(out.with_suffix(".json").read_text())
    assert prov["redraws"] == 3 and prov["n_redraws"] == 0  # 'warn' never falls back
    assert prov["resume_identity"]["redraws"] == 3
    capsys.readouterr()
    for bad, why in ((["--redraws", 2], "no --jump-noise FILE was given"),
                     (["--jump-noise", noise_file, "--redraws", -1], "--redraws must be >= 0")):
        assert main(predict_argv(ck, tmp_path / "x.dcd", 2, *bad)) == 1
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x.dcd").exists()


def test_predict_no_size_guard_reaches_the_guards_and_the_resume_identity(tmp_path, capsys):
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    ranges = {}
    for flag in ([], ["--no-size-guard"]):
        out = tmp_path / f"r{len(flag)}.dcd"
        assert main(predict_argv(ck, out, 2, *flag)) == 0
        prov = json.loads(out.with_suffix(".json").read_text())
        ranges[bool(flag)] = prov["guards"]["thresholds"]["gyration_range_A"]
        assert prov["resume_identity"]["no_size_guard"] is bool(flag)
    assert ranges[False] == pytest.approx(list(Surrogate.load(ck).validity.gyration_range_A))
    assert ranges[True] is None  # the check is off
    # a resume must repeat the flag
    assert main(predict_argv(ck, tmp_path / "r1.dcd", 3, "--resume")) == 1
    assert "--no-size-guard was True, now False" in capsys.readouterr().err


def test_a_restart_with_or_without_noise_unlike_its_file_is_warned(tmp_path, linear, noise,
                                                                    caplog):
    noisy = make_sim(linear, jump_noise=noise, noise_seed=1)
    noisy.step(1)
    noisy.saveCheckpoint(str(tmp_path / "n.chk"))
    plain = make_sim(linear)
    plain.step(1)
    plain.saveCheckpoint(str(tmp_path / "p.chk"))
    for path, kwargs, saved, runs in ((tmp_path / "n.chk", {}, "with", "without"),
                                      (tmp_path / "p.chk", {"jump_noise": noise}, "without",
                                       "with")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="integrations.propagator"):
            make_sim(linear, **kwargs).loadCheckpoint(str(path))
        assert f"saved {saved} jump noise, this simulation runs {runs}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="integrations.propagator"):
        make_sim(linear, jump_noise=noise).loadCheckpoint(str(tmp_path / "n.chk"))
    assert "jump noise" not in caplog.text


# -- (e) history models feed on their noisy frames -------------------------------------------------
@pytest.fixture(scope="module")
def estag(tmp_path_factory):
    """ESTAG on the heavy atoms: 3 input frames 0.02 ps apart, a 0.04 ps jump with frames at
    0.02 and 0.04 ps, so its history comes from its own jumps."""
    path = tmp_path_factory.mktemp("noise") / "estag.pt"
    return Surrogate.load(make_checkpoint(cached_md(), path, model="estag", selection="heavy",
                                          jump_frames=4, n_out=2, history=3, history_stride=2))


def test_a_history_model_takes_its_noisy_frames_as_its_next_input(estag):
    """The frames a history model remembers from a noisy jump are the noisy ones the trajectory
    holds (its mean plus (t / jump) · ε), so its next input is that trajectory; the plain
    propagator remembers its means."""
    noise = fit_noise(estag, residual_A=0.05)
    md = cached_md()
    runs = {}
    for name, kwargs in (("plain", {}), ("noisy", {"jump_noise": noise, "noise_seed": 1})):
        prop = SurrogatePropagator(estag, **kwargs)
        for k in (0, 2):  # MD states at -0.04 and -0.02 ps: the first jump's history
            prop.observe((k - 4) * 0.01, md["frames"][k])
        result = prop.jump(md["frames"][4], md["velocities"][4], 0.0)
        prop.remember(0.0, result)
        prop.observe(estag.jump_ps, result.positions_A[-1])  # the engine keeps the end
        runs[name] = (result, prop.history(estag.jump_ps))
    (plain, plain_history), (noisy, noisy_history) = runs["plain"], runs["noisy"]
    eps = noisy.predicted_A[-1] - plain.predicted_A[-1]
    assert float(np.sqrt(np.mean(np.sum(eps ** 2, -1)))) > 0.5 * noise.rms_A
    np.testing.assert_allclose(noisy_history[0], md["frames"][4][estag.model_atoms])
    np.testing.assert_allclose(noisy_history[1:], noisy.predicted_A, atol=1e-9)
    np.testing.assert_allclose(noisy_history[1] - plain_history[1], 0.5 * eps, atol=1e-9)
    np.testing.assert_allclose(plain_history[1:], plain.predicted_A, atol=1e-9)


def test_a_history_model_restarts_with_its_noisy_history_and_draws(tmp_path, estag):
    """A noisy ESTAG run saved after 2 jumps (its history: noisy frames of its own jumps) and
    loaded into a new simulation continues as the saved run does."""
    noise = fit_noise(estag, residual_A=0.02)
    first = make_sim(estag, jump_noise=noise, noise_seed=5)
    first.step(2)
    path = tmp_path / "run.chk"
    first.saveCheckpoint(str(path))
    first.step(3)
    again = make_sim(estag, jump_noise=noise, noise_seed=5)
    again.loadCheckpoint(str(path))
    assert again.propagator.has_history(2 * estag.jump_ps)  # no MD to rebuild it
    again.step(3)
    assert again.n_jumps == first.n_jumps == 5
    np.testing.assert_allclose(positions_A(again), positions_A(first), atol=1e-9)
    # without the surrogate's file: MD rebuilds the history and the draws start over
    bare = tmp_path / "bare.chk"
    bare.write_bytes(path.read_bytes())
    fresh = make_sim(estag, jump_noise=noise, noise_seed=5)
    fresh.loadCheckpoint(str(bare))
    assert not fresh.propagator.has_history(2 * estag.jump_ps)
    fresh.step(3)
    assert np.abs(positions_A(fresh) - positions_A(first))[estag.model_atoms].max() > 0.01
