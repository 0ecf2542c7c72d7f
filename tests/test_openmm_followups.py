"""Follow-ups of the OpenMM integration: what reporters and restarts see around learned jumps.

- ``SurrogateJumpReporter`` in a periodic ``Simulation``: a ``CheckpointReporter`` due at a jump
  step saves the state the run goes on from (the state after the jump);
- ``python -m integrations.predict``: SIGTERM ends a run as Ctrl-C does; a box narrower than
  twice the nonbonded cutoff is a clear error;
- hybrid ``SurrogateSimulation``: a restart from a checkpoint written inside a cycle (during the
  MD segment, or on an intermediate output frame of a jump) keeps the jump schedule and the
  trajectory of the run that was not interrupted.
"""

from __future__ import annotations

import json
import shutil

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
)
from openmm import Vec3, app, unit

from integrations.guards import GuardConfig
from integrations.openmm_simulation import SurrogateJumpReporter, SurrogateSimulation
from surrogate_md import Surrogate

A = unit.angstrom
PS = unit.picosecond
MD_STEP_PS = 0.002


def periodic_alanine(edge_nm: float = 3.0, cutoff_nm: float = 1.0):
    """(topology, System, positions) of alanine dipeptide alone in a cubic box of ``edge_nm``
    (amber14, CutoffPeriodic, HBonds): a periodic System of the fixture surrogates' 22 atoms."""
    pdb = app.PDBFile(str(PDB))
    top = pdb.topology
    top.setPeriodicBoxVectors([Vec3(edge_nm, 0, 0), Vec3(0, edge_nm, 0),
                               Vec3(0, 0, edge_nm)] * unit.nanometer)
    system = app.ForceField("amber14-all.xml").createSystem(
        top, nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=cutoff_nm * unit.nanometer,
        constraints=app.HBonds)
    return top, system, pdb.positions


def state_arrays(state: openmm.State) -> tuple[float, np.ndarray, np.ndarray]:
    """(time ps, positions Å, velocities Å/ps) of a State."""
    return (state.getTime().value_in_unit(PS),
            np.asarray(state.getPositions(asNumpy=True).value_in_unit(A)),
            np.asarray(state.getVelocities(asNumpy=True).value_in_unit(A / PS)))


def checkpoint_state(system: openmm.System, path) -> tuple[float, np.ndarray, np.ndarray]:
    """What a checkpoint file holds, read back in a Context of its own."""
    probe = openmm.Context(system, openmm.VerletIntegrator(MD_STEP_PS * PS), reference_platform())
    with open(path, "rb") as fh:
        probe.loadCheckpoint(fh.read())
    return state_arrays(probe.getState(positions=True, velocities=True))


def jump_reporter_run(top, system, positions):
    sim = app.Simulation(top, system, openmm.VerletIntegrator(MD_STEP_PS * PS),
                         reference_platform())
    cold_start(sim.context, positions)
    return sim


@pytest.mark.parametrize("checkpoint_before_jumper", [True, False])
def test_jump_reporter_checkpoint_at_a_jump_step_holds_the_state_after_the_jump(
        tmp_path, checkpoint_before_jumper):
    """Periodic System; a jump every 10 MD steps with a DCD, an XTC and a CheckpointReporter
    every 10 steps. The checkpoint written at a jump step is the state the run goes on from
    (before: grouped with the wrapped DCD/XTC reports ahead of the jump reporter, it held the
    state before the jump, 0.02 ps behind), so a restart from it goes on as the run does."""
    ck = make_checkpoint(cached_md(), tmp_path / "lin.pt", selection="heavy")
    top, system, positions = periodic_alanine()
    sim = jump_reporter_run(top, system, positions)
    start = sim.context.getState(positions=True, enforcePeriodicBox=True)
    unwrapped = sim.context.getState(positions=True)
    # the molecule lies outside the first box: a jump from wrapped positions would move it
    assert np.abs(start.getPositions(asNumpy=True).value_in_unit(A)
                  - unwrapped.getPositions(asNumpy=True).value_in_unit(A)).max() > 10.0
    jumper = SurrogateJumpReporter(ck, interval=10, guards="warn")
    chk = tmp_path / "run.chk"
    files = [app.DCDReporter(str(tmp_path / "t.dcd"), 10),
             app.XTCReporter(str(tmp_path / "t.xtc"), 10),
             app.CheckpointReporter(str(chk), 10)]
    sim.reporters += files + [jumper] if checkpoint_before_jumper else [jumper] + files
    x0 = unwrapped.getPositions(asNumpy=True).value_in_unit(A)
    sim.step(20)
    assert jumper.n_jumps == 2
    now = state_arrays(sim.context.getState(positions=True, velocities=True))
    assert now[0] == pytest.approx(20 * MD_STEP_PS + 2 * jumper.surrogate.jump_ps, abs=1e-9)
    # the jumps start from the Context's own (unwrapped) positions: no molecule moved by a box
    assert np.abs(now[1] - x0).max() < 2.0
    saved = checkpoint_state(system, chk)
    assert saved[0] == pytest.approx(now[0], abs=1e-9)
    np.testing.assert_array_equal(saved[1], now[1])
    np.testing.assert_array_equal(saved[2], now[2])

    # a restart from the checkpoint takes the next jump from the same state
    restart = jump_reporter_run(top, system, positions)
    restart.loadCheckpoint(str(chk))
    restart.reporters.append(SurrogateJumpReporter(ck, interval=10, guards="warn"))
    sim.reporters[:] = [jumper]
    sim.step(10)
    restart.step(10)
    a = state_arrays(sim.context.getState(positions=True, velocities=True))
    b = state_arrays(restart.context.getState(positions=True, velocities=True))
    assert b[0] == pytest.approx(a[0], abs=1e-9)
    np.testing.assert_allclose(b[1], a[1], atol=1e-6)


# -- python -m integrations.predict stopped by SIGTERM ---------------------------------------------
def test_predict_stopped_by_sigterm_keeps_the_frames_written_so_far(tmp_path, tmp_path_factory):
    """A batch scheduler's or ``kill``'s SIGTERM ends a run as Ctrl-C does: the frames written so
    far, their state data and the provenance (interrupted, by SIGTERM) under the names asked
    for, no hidden ``.partial`` file left, exit code 143 (before: the process died of the
    signal, -15, leaving only the hidden partial files)."""
    import json
    import sys

    import MDAnalysis as mda
    from _integration_fixtures import sigterm_after_rows, train_tiny_surrogate

    ck = train_tiny_surrogate(tmp_path_factory)
    out = tmp_path / "long.xtc"
    partial_csv = tmp_path / ".long.csv.partial"
    rc = sigterm_after_rows(
        [sys.executable, "-m", "integrations.predict", str(ck), "--topology", str(PDB),
         "-n", "1000000", "-o", str(out), "--platform", "Reference", "--guard", "warn"],
        partial_csv, 3, tmp_path / "stderr.txt", cwd=tmp_path)
    assert rc == 143, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert not list(tmp_path.glob(".*partial*"))
    prov = json.loads((tmp_path / "long.json").read_text())
    assert prov["interrupted"] is True and prov["signal"] == "SIGTERM"
    done = prov["jumps"] + prov["fallbacks"]
    # 3 state-data rows were written when the signal was sent; the third one's jump may not
    # have been counted yet (see below)
    assert 2 <= done < 1000000
    rows = (tmp_path / "long.csv").read_text().splitlines()[1:]
    frames = len(mda.Universe(str(PDB), str(out)).trajectory)
    # a signal between a jump's frame and its count leaves one frame more than jumps counted
    assert len(rows) >= 3 and frames - done in (0, 1) and len(rows) - done in (0, 1)


# -- python -m integrations.predict given a box narrower than twice the cutoff ---------------------
def boxed_alanine_pdb(path, edge_nm: float):
    """Alanine dipeptide written as a PDB with a cubic CRYST1 box of ``edge_nm``."""
    pdb = app.PDBFile(str(PDB))
    pdb.topology.setPeriodicBoxVectors([Vec3(edge_nm, 0, 0), Vec3(0, edge_nm, 0),
                                        Vec3(0, 0, edge_nm)] * unit.nanometer)
    with open(path, "w") as fh:
        app.PDBFile.writeFile(pdb.topology, pdb.positions, fh)
    return path


@pytest.mark.parametrize("source", ["pdb", "gro"])
def test_predict_refuses_a_box_narrower_than_twice_the_cutoff(tmp_path, capsys, source):
    """A 1.5 nm box with OpenMM's 1 nm cutoff: an error naming the file that brought the box,
    its width, the cutoff and the ways out (before: a bare OpenMMException from the Context);
    with --cutoff-nm 0.7 the same files run."""
    import MDAnalysis as mda

    from integrations.predict import main

    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", model="constant")
    small = boxed_alanine_pdb(tmp_path / "small.pdb", 1.5)
    if source == "pdb":
        inputs, named = ["--topology", str(small)], small
    else:
        named = tmp_path / "small.gro"
        mda.Universe(str(small)).atoms.write(str(named))
        inputs = ["--topology", str(PDB), "--coordinates", str(named)]
    argv = [str(ck), *inputs, "-n", "2", "--platform", "Reference"]
    assert main([*argv, "-o", str(tmp_path / "x.xtc")]) == 1
    err = capsys.readouterr().err
    assert f"error: {named}: the periodic box is 1.5 nm wide" in err
    assert "twice the nonbonded cutoff of 1 nm" in err and "--cutoff-nm (at most 0.75 nm)" in err
    assert "without a box" in err and "Traceback" not in err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".*partial*"))
    assert main([*argv, "-o", str(tmp_path / "y.xtc"), "--cutoff-nm", "0.7"]) == 0
    assert len(mda.Universe(str(PDB), str(tmp_path / "y.xtc")).trajectory) == 2


# -- hybrid SurrogateSimulation: restarts from checkpoints written inside a cycle -------------------
def hybrid_sim(surrogate, directory, guards="warn"):
    """Hybrid run (10 MD steps of 2 fs, then a 0.02 ps jump with output frames at steps 5 and 10
    of the jump: a cycle of 20 steps) with CheckpointReporters every 15, 35 and 45 steps."""
    top, system, _ = alanine_system()
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                              md_steps=10, guards=guards)
    sim.reporters += [app.CheckpointReporter(str(directory / f"every{k}.chk"), k)
                      for k in (15, 35, 45)]
    return sim


# every state of MD counting for the anchor (anchor_md_ps 0): the MD segments start from cold
# jump ends (cold_start's 0.05 K, kept by the linear model) and count as no MD time; a restart
# 5 steps into one must keep that (before, the segment's owed time was dropped on loading and
# its end moved the anchor)
@pytest.mark.parametrize("guards", ["warn", GuardConfig(action="warn", anchor_md_ps=0.0)],
                         ids=["default", "anchor0"])
def test_hybrid_restart_from_a_checkpoint_inside_a_cycle_keeps_the_jump_schedule(tmp_path,
                                                                                 guards):
    """Four cycles (80 steps) uninterrupted, and restarts, in a new SurrogateSimulation, from
    checkpoints the CheckpointReporters wrote at step 15 (the first jump's intermediate output
    frame), 45 (5 steps into the third MD segment), 60 (the third jump's end) and 70 (the end of
    the fourth MD segment): each restart finishes the cycle it was saved in and ends where the
    uninterrupted run ends, at step 80 with the same state, jump count and guard energies.
    Before, a restart began a whole new cycle from the saved state (ending at steps 95, 85 and
    90, 1-2 Å away) and a checkpoint at a jump's end restored one jump too few."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "lin.pt", selection="heavy"))
    _, _, positions = alanine_system()
    run = tmp_path / "run"
    run.mkdir()
    sim = hybrid_sim(sur, run, guards)
    assert list(sim.steps_per_frame) == [5, 10] and sim.steps_per_jump == 10
    cold_start(sim.context, positions)
    sim.integrator.setRandomNumberSeed(3)
    saved = {}

    def keep(name: str, as_name: str) -> None:
        for suffix in ("", ".surrogate.npz"):
            shutil.copy(run / f"{name}{suffix}", tmp_path / f"{as_name}{suffix}")
        saved[as_name] = tmp_path / as_name

    sim.step(1)
    keep("every15.chk", "step15.chk")
    sim.step(2)
    keep("every15.chk", "step60.chk")
    sim.step(1)
    keep("every45.chk", "step45.chk")
    keep("every35.chk", "step70.chk")
    assert sim.currentStep == 80 and sim.n_jumps == 4
    # 5 steps into a 10-step MD segment from a cold jump end: the segment owes its 0.02 ps
    # (cold_md_fraction) and has paid back half when the checkpoint is written (before, the
    # clock was saved as it stood when the segment began)
    with np.load(f"{saved['step45.chk']}.surrogate.npz") as data:
        assert json.loads(str(data["extra"]))["md_ps"] == pytest.approx(-5 * 0.002)
    end = state_arrays(sim.context.getState(positions=True, velocities=True))
    cycles_done = {"step15.chk": 0, "step45.chk": 2, "step60.chk": 3, "step70.chk": 3}
    for name, done in cycles_done.items():
        directory = tmp_path / f"re-{name}"
        directory.mkdir()
        restart = hybrid_sim(sur, directory, guards)
        restart.loadCheckpoint(str(saved[name]))
        restart.step(4 - done)
        assert restart.currentStep == 80, name
        assert restart.n_jumps == 4, name
        again = state_arrays(restart.context.getState(positions=True, velocities=True))
        assert again[0] == pytest.approx(end[0], abs=1e-9), name
        np.testing.assert_allclose(again[1], end[1], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(again[2], end[2], atol=1e-6, err_msg=name)
        assert restart.guards.energy_state() == sim.guards.energy_state(), name


def estag_surrogate(directory):
    """ESTAG on heavy atoms: 3 input frames 0.02 ps (10 steps) apart, a 0.04 ps jump with
    frames at 0.02 and 0.04 ps."""
    return Surrogate.load(make_checkpoint(cached_md(), directory / "estag.pt", model="estag",
                                          selection="heavy", jump_frames=4, n_out=2, history=3,
                                          history_stride=2))


def test_hybrid_restart_of_a_history_model_inside_a_cycle(tmp_path):
    """ESTAG (3 input frames 0.02 ps apart, frames at 0.02 and 0.04 ps: 10 and 20 steps),
    20 MD steps before every jump (a 40-step cycle): restarts from the checkpoints written at
    step 30 (the first jump's intermediate frame) and 55 (15 steps into the second segment, off
    the output grid the segment's history frames are taken on) end where the uninterrupted run
    does (before: at steps 110 and 95)."""
    sur = estag_surrogate(tmp_path)
    top, system, positions = alanine_system()

    def history_run(directory):
        sim = SurrogateSimulation(top, system, sur, platform=reference_platform(), md_steps=20,
                                  guards="warn")
        sim.reporters += [app.CheckpointReporter(str(directory / "every15.chk"), 15),
                          app.CheckpointReporter(str(directory / "every55.chk"), 55)]
        return sim

    run = tmp_path / "run"
    run.mkdir()
    sim = history_run(run)
    cold_start(sim.context, positions)
    sim.integrator.setRandomNumberSeed(5)
    sim.prepare_history(reset_clock=True)
    sim.step(1)
    for suffix in ("", ".surrogate.npz"):  # every15.chk now holds step 30
        shutil.copy(run / f"every15.chk{suffix}", tmp_path / f"step30.chk{suffix}")
    sim.step(1)
    assert sim.currentStep == 80 and sim.n_jumps == 2
    end = state_arrays(sim.context.getState(positions=True, velocities=True))
    for saved, cycles_done in ((tmp_path / "step30.chk", 0), (run / "every55.chk", 1)):
        directory = tmp_path / f"re-{saved.stem}"
        directory.mkdir()
        restart = history_run(directory)
        restart.loadCheckpoint(str(saved))
        restart.step(2 - cycles_done)
        assert (restart.currentStep, restart.n_jumps) == (80, 2), saved.name
        again = state_arrays(restart.context.getState(positions=True, velocities=True))
        np.testing.assert_allclose(again[1], end[1], atol=1e-6, err_msg=saved.name)
        np.testing.assert_allclose(again[2], end[2], atol=1e-6, err_msg=saved.name)


def test_predict_cutoff_without_a_box_is_a_nonperiodic_cutoff(tmp_path):
    """``--cutoff-nm`` for a solute without a box switches exact electrostatics to a cutoff (as
    ``python -m datagen openmm --cutoff-nm`` does), instead of being ignored."""
    import datagen
    from integrations.predict import load_system

    pdb = tmp_path / "ala2.pdb"
    shutil.copy(f"{datagen.__path__[0]}/systems/alanine-dipeptide.pdb", pdb)

    def nonbonded(system):
        return next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))

    _, exact, _, box = load_system(str(pdb), None, ["amber14-all.xml"])
    assert box is None and nonbonded(exact).getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    _, cut, _, _ = load_system(str(pdb), None, ["amber14-all.xml"], cutoff_nm=0.9)
    force = nonbonded(cut)
    assert force.getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic
    assert force.getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(0.9)


def test_hybrid_restart_inside_the_md_standing_in_for_a_failed_jump(tmp_path):
    """Every jump fails the energy guard (a threshold of 1e-6 kJ/mol) and real MD stands in for
    it (hybrid fallback, reported). A checkpoint written 5 steps into that MD (step 15) restarts
    there: the rest of the fallback MD, then the next cycle, ending at step 40 as the
    uninterrupted run does. Before, the restart began a new cycle (MD segment, jump) from step
    15 and ended at step 55."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "lin.pt", selection="heavy"))
    top, system, positions = alanine_system()
    guards = GuardConfig(action="fallback", energy_jump_kJ_per_mol=1e-6)

    def build(directory):
        sim = SurrogateSimulation(top, system, sur, platform=reference_platform(), md_steps=10,
                                  guards=guards)
        sim.reporters.append(app.CheckpointReporter(str(directory / "every15.chk"), 15))
        return sim

    run = tmp_path / "run"
    run.mkdir()
    sim = build(run)
    cold_start(sim.context, positions)
    sim.integrator.setRandomNumberSeed(3)
    sim.step(1)
    assert sim.currentStep == 20 and sim.n_fallbacks == 1 and sim.n_jumps == 0
    for suffix in ("", ".surrogate.npz"):
        shutil.copy(run / f"every15.chk{suffix}", tmp_path / f"step15.chk{suffix}")
    sim.step(1)
    end = state_arrays(sim.context.getState(positions=True, velocities=True))
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    restart = build(again_dir)
    restart.loadCheckpoint(str(tmp_path / "step15.chk"))
    assert restart.currentStep == 15
    restart.step(2)
    assert restart.currentStep == 40 and restart.n_fallbacks == 2
    again = state_arrays(restart.context.getState(positions=True, velocities=True))
    np.testing.assert_allclose(again[1], end[1], atol=1e-6)
    np.testing.assert_allclose(again[2], end[2], atol=1e-6)


def test_hybrid_restart_inside_a_history_warm_up(tmp_path):
    """ESTAG (3 input frames 10 steps apart) with 10-step MD segments, too short to hold its
    history: the first jump is preceded by a reported 20-step warm-up (steps 10-30). Restarts
    from checkpoints 5 and 15 steps into it finish the warm-up where it was and end with the
    uninterrupted run at step 80 (before: they began a new cycle, an MD segment and a whole
    warm-up more)."""
    sur = estag_surrogate(tmp_path)
    top, system, positions = alanine_system()

    class SaveAt:  # a checkpoint at one step only, as a reporter writes it
        def __init__(self, step, path):
            self.step, self.path = step, path

        def describeNextReport(self, simulation):
            left = self.step - simulation.currentStep
            return {"steps": left if left > 0 else 10**9, "periodic": None, "include": []}

        def report(self, simulation, state):
            simulation.saveCheckpoint(str(self.path))

    def build(directory, save=()):
        sim = SurrogateSimulation(top, system, sur, platform=reference_platform(), md_steps=10,
                                  guards="warn")
        sim.reporters += [SaveAt(k, directory / f"step{k}.chk") for k in save]
        return sim

    sim = build(tmp_path, save=(15, 25))
    cold_start(sim.context, positions)
    sim.integrator.setRandomNumberSeed(5)
    sim.step(1)
    assert sim.currentStep == 50 and sim.n_jumps == 1  # 10 MD + 20 warm-up + 20 jump
    saved = {k: tmp_path / f"step{k}.chk" for k in (15, 25)}
    sim.step(1)
    assert sim.currentStep == 80 and sim.n_jumps == 2
    end = state_arrays(sim.context.getState(positions=True, velocities=True))
    for k, path in saved.items():
        directory = tmp_path / f"re{k}"
        directory.mkdir()
        restart = build(directory)
        restart.loadCheckpoint(str(path))
        assert restart.currentStep == k
        restart.step(2)
        assert (restart.currentStep, restart.n_jumps) == (80, 2), k
        again = state_arrays(restart.context.getState(positions=True, velocities=True))
        np.testing.assert_allclose(again[1], end[1], atol=1e-6, err_msg=str(k))
        np.testing.assert_allclose(again[2], end[2], atol=1e-6, err_msg=str(k))


def test_a_relaxation_that_blows_up_falls_back_to_md(tmp_path):
    """A jump end the minimiser cannot take (two atoms on one spot: NaN forces, NaN coordinates
    after the first L-BFGS step) under the ``relax`` action: the relaxation stops with a
    ``non_finite`` failure, the last finite state back in the Context, and the engine runs MD
    for the jump instead of raising OpenMM's NaN error."""
    from integrations.guards import Guards
    from integrations.openmm_simulation import Relaxation, relax_until_accepted, write_state

    surrogate = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "all.pt",
                                               selection="all"))
    top, system, pos = alanine_system(None)
    broken = np.array(pos.value_in_unit(A), dtype=np.float64)
    broken[1] = broken[0]
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), reference_platform())
    write_state(context, broken, None, False)
    guards = Guards(surrogate, GuardConfig(action="relax"), n_dof=60, temperature_K=300.0)
    guards.record_energy(-100.0)
    relaxation = Relaxation(system, reference_platform())
    out, _, events = relax_until_accepted(relaxation, context, guards, 0, 1.0)
    assert events and events[0].check == "non_finite"
    np.testing.assert_allclose(out, broken, atol=1e-9)  # the last finite state (nm round trip)
    held = context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)
    np.testing.assert_allclose(held, broken, atol=1e-9)
    assert guards.n_relaxations == 1

    # a finite minimiser result that the constraints cannot meet (an X-H pair on one spot):
    # NaN once constrained in the Context, the same failure
    _, constrained_system, _ = alanine_system(app.HBonds)
    a, b, _ = constrained_system.getConstraintParameters(0)
    start = np.array(pos.value_in_unit(A), dtype=np.float64)
    unmet = start.copy()
    unmet[b] = unmet[a]
    context = openmm.Context(constrained_system, openmm.VerletIntegrator(0.001),
                             reference_platform())
    write_state(context, start, None, True)
    relaxation = Relaxation(constrained_system, reference_platform())
    relaxation.minimise = lambda *args, **kwargs: unmet.copy()
    out, _, events = relax_until_accepted(relaxation, context, guards, 0, 1.0,
                                          energy_kJ_per_mol=1e6)
    assert events[0].check == "non_finite" and np.isfinite(out).all()
    held = context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)
    assert np.isfinite(held).all()

    real_predict = surrogate.predict

    def broken_predict(*args, **kwargs):  # a model whose jump puts two atoms on one spot
        frames = np.array(real_predict(*args, **kwargs))
        frames[:, 1] = frames[:, 0]
        return frames

    surrogate.predict = broken_predict
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                              guards=GuardConfig(action="relax"))
    sim.context.setPositions(pos)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    sim.step(1)
    assert sim.n_fallbacks == 1 and sim.n_jumps == 0
    end = sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)
    assert np.isfinite(end).all()
    assert sim.context.getState().getTime().value_in_unit(PS) == pytest.approx(
        surrogate.jump_ps)
