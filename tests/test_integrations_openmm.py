"""SurrogateSimulation and SurrogateJumpReporter driving real OpenMM Contexts and stock reporters."""

from __future__ import annotations

import csv
import logging

import MDAnalysis as mda
import mdtraj
import numpy as np
import openmm
import pytest
from _integration_fixtures import (
    MD_STEP_PS,
    PDB,
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
    thermal_start,
)
from openmm import app, unit

from integrations.guards import GuardConfig
from integrations.openmm_simulation import (
    SurrogateJumpReporter,
    SurrogateSimulation,
    default_step_ps,
    frame_steps,
)
from surrogate_md import Surrogate
from surrogate_md.errors import DataError, EngineError

A = unit.angstrom


def make_sim(tmp_path, selection="heavy", constraints=app.HBonds, model="linear", **kwargs):
    # The analytic linear model is ballistic: it pumps energy into bond vibrations faster than
    # MD can carry it away, so tests mixing jumps with MD use the constant model.
    ck = make_checkpoint(cached_md(), tmp_path / f"{selection}.pt", selection=selection,
                         model=model)
    top, system, positions = alanine_system(constraints)
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              **kwargs)
    cold_start(sim.context, positions)
    return sim


def positions_A(sim):
    return sim.context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(A)


class FrameRecorder:
    """A user reporter recording what every report sees."""

    def __init__(self, interval):
        self.interval = interval
        self.steps, self.times, self.positions = [], [], []

    def describeNextReport(self, simulation):
        return {"steps": self.interval - simulation.currentStep % self.interval,
                "periodic": False, "include": ["positions"]}

    def report(self, simulation, state):
        self.steps.append(simulation.currentStep)
        self.times.append(state.getTime().value_in_unit(unit.picosecond))
        self.positions.append(state.getPositions(asNumpy=True).value_in_unit(A))


def test_stock_reporters_read_back_with_true_times(tmp_path):
    sim = make_sim(tmp_path)
    spj = sim.steps_per_jump
    jump = sim.surrogate.jump_ps
    assert spj == 1 and sim.step_ps == pytest.approx(jump)  # one step = one jump
    assert sim.md_steps_per_jump * MD_STEP_PS == pytest.approx(jump)
    start = positions_A(sim)
    n = 24
    sim.reporters += [
        app.DCDReporter(str(tmp_path / "t.dcd"), spj),
        app.XTCReporter(str(tmp_path / "t.xtc"), 2 * spj),
        app.StateDataReporter(str(tmp_path / "s.csv"), spj, step=True, time=True,
                              potentialEnergy=True, temperature=True),
        app.CheckpointReporter(str(tmp_path / "c.chk"), 12 * spj),
    ]
    sim.step(n)
    del sim.reporters[:]  # closes nothing, but the files are flushed per frame
    assert sim.currentStep == n * spj
    state = sim.context.getState()
    assert state.getTime().value_in_unit(unit.picosecond) == pytest.approx(n * jump, abs=1e-9)
    assert sim.n_jumps == n and sim.n_fallbacks == 0
    assert np.abs(positions_A(sim) - start).max() > 0.01  # the molecule moved

    dcd_times = np.arange(1, n + 1) * jump
    xtc_times = np.arange(1, n // 2 + 1) * 2 * jump
    u = mda.Universe(str(PDB), str(tmp_path / "t.dcd"))
    assert len(u.trajectory) == n
    np.testing.assert_allclose([ts.time for ts in u.trajectory], dcd_times, atol=1e-4)
    u = mda.Universe(str(PDB), str(tmp_path / "t.xtc"))
    assert len(u.trajectory) == n // 2
    np.testing.assert_allclose([ts.time for ts in u.trajectory], xtc_times, atol=1e-4)
    u.trajectory[-1]
    np.testing.assert_allclose(u.atoms.positions, positions_A(sim), atol=0.01)
    t = mdtraj.load(str(tmp_path / "t.dcd"), top=str(PDB))
    assert t.n_frames == n
    t = mdtraj.load(str(tmp_path / "t.xtc"), top=str(PDB))
    np.testing.assert_allclose(t.time, xtc_times, atol=1e-4)

    with open(tmp_path / "s.csv") as fh:
        rows = list(csv.reader(fh))[1:]
    assert len(rows) == n
    steps = [int(r[0]) for r in rows]
    assert steps == list(range(spj, n * spj + 1, spj))
    np.testing.assert_allclose([float(r[1]) for r in rows], dcd_times, atol=1e-9)
    energies = np.array([float(r[2]) for r in rows])
    assert np.isfinite(energies).all()
    # the reported energy is the force field's energy of the surrogate frame
    assert energies[-1] == pytest.approx(
        sim.context.getState(energy=True).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole), rel=1e-6)
    assert (tmp_path / "c.chk").stat().st_size > 0


@pytest.mark.parametrize("md_steps", [0, 10])
def test_output_frames_are_the_predicted_frames(tmp_path, md_steps):
    # all atoms predicted, no constraints: every frame must equal x0 + v0 t_k exactly (v0 with
    # zero net momentum, which the System's CMMotionRemover keeps in the jumps too)
    sim = make_sim(tmp_path, selection="all", constraints=None, md_steps=md_steps)
    st = sim.context.getState(positions=True, velocities=True)
    x0 = st.getPositions(asNumpy=True).value_in_unit(A)
    v0 = st.getVelocities(asNumpy=True).value_in_unit(A / unit.picosecond)
    m = np.array([sim.system.getParticleMass(i).value_in_unit(unit.dalton)
                  for i in range(sim.system.getNumParticles())])
    v0 = v0 - (m[:, None] * v0).sum(0) / m.sum()
    sim.context.setVelocities(v0 * (A / unit.picosecond))
    rec = FrameRecorder(int(sim.steps_per_frame[0]))
    sim.reporters.append(rec)
    if md_steps:  # hybrid: steps are MD steps and every output frame is a step
        sim.md_steps = 0  # take the jumps without the MD segments to compare with x0 + v0 t
    sim.step(3)
    times = np.asarray(rec.times)
    grid = sim.surrogate.times_ps if md_steps else sim.surrogate.times_ps[-1:]
    expected_t = np.concatenate([j * sim.surrogate.jump_ps + grid for j in range(3)])
    np.testing.assert_allclose(times, expected_t, atol=1e-9)
    assert rec.steps == [int(round(t / sim.step_ps)) for t in expected_t]
    for t, x in zip(times, rec.positions):
        np.testing.assert_allclose(x, x0 + v0 * t, atol=1e-5)


def test_checkpoint_saved_mid_run_reloads_and_continues(tmp_path):
    # the ballistic linear model heats the cold start by ~10 kJ/mol a jump: past 11 jumps it
    # is a threshold above the start's energy, the guard's cap; this test is about checkpoints,
    # so the reference follows the recent energies (no cap)
    sim = make_sim(tmp_path, selection="all", constraints=None,
                   guards=GuardConfig(energy_drift_kJ_per_mol=None))  # as `uncapped` below
    sim.step(6)
    sim.saveCheckpoint(str(tmp_path / "mid.chk"))
    sim.saveState(str(tmp_path / "mid.xml"))
    sim.step(6)
    reference = positions_A(sim)
    step, time = sim.currentStep, sim.context.getState().getTime()

    top, system, _ = alanine_system(None)
    uncapped = GuardConfig(energy_drift_kJ_per_mol=None)
    again = SurrogateSimulation(top, system, sim.surrogate, platform=reference_platform(),
                                guards=uncapped)
    again.loadCheckpoint(str(tmp_path / "mid.chk"))
    assert again.currentStep == 6 * sim.steps_per_jump
    again.step(6)
    np.testing.assert_allclose(positions_A(again), reference, atol=1e-6)
    assert again.currentStep == step
    assert again.context.getState().getTime() == time
    from_state = SurrogateSimulation(top, system, sim.surrogate, platform=reference_platform(),
                                     state=str(tmp_path / "mid.xml"), guards=uncapped)
    from_state.step(6)
    np.testing.assert_allclose(positions_A(from_state), reference, atol=1e-6)


def test_jumps_keep_zero_net_momentum_where_the_system_removes_it(tmp_path):
    """A System with a CMMotionRemover keeps zero net momentum in MD; a jump's difference
    velocities carried the model's drift of the centre of mass into the next jump's input (an
    x + v t model carries the input's own drift on forever). With the remover the kept
    velocities have none; without it the drift is the model's and stays."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "l.pt", selection="all"))
    drift = np.array([0.5, -0.2, 0.1])  # Å/ps, added to every atom's velocity
    for remove in (True, False):
        top, system, positions = alanine_system(None)
        if not remove:
            for i in reversed(range(system.getNumForces())):
                if isinstance(system.getForce(i), openmm.CMMotionRemover):
                    system.removeForce(i)
        assert any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()) == remove
        sim = SurrogateSimulation(top, system, sur, platform=reference_platform())
        cold_start(sim.context, positions)
        m = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                      for i in range(system.getNumParticles())])
        v = sim.context.getState(velocities=True).getVelocities(asNumpy=True).value_in_unit(
            A / unit.picosecond) + drift
        sim.context.setVelocities(v * (A / unit.picosecond))
        sim.step(2)
        vel = sim.context.getState(velocities=True).getVelocities(asNumpy=True).value_in_unit(
            A / unit.picosecond)
        com = (m[:, None] * vel).sum(0) / m.sum()
        if remove:
            np.testing.assert_allclose(com, 0.0, atol=1e-9)
        else:  # the x + v t model in float32 keeps the input's drift
            np.testing.assert_allclose(com, (m[:, None] * v).sum(0) / m.sum(), atol=1e-4)
            assert np.abs(com).max() > 0.1


def test_jump_reporter_keeps_zero_net_momentum_where_the_system_removes_it(tmp_path):
    """The same for ``SurrogateJumpReporter`` on a stock Simulation: a model that moves the
    centre of mass (here 2 Å/ps along x on top of the linear model) leaves the state after the
    jump with no net momentum when the System has a CMMotionRemover (before: 2 Å/ps until the
    remover's next turn, which the guards and the next jump saw), and with it otherwise."""
    sur = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "l.pt", selection="all"))
    predict, drift = sur.predict, np.array([2.0, 0.0, 0.0])  # Å/ps

    def drifting(*args, **kwargs):
        return predict(*args, **kwargs) + drift * np.asarray(sur.times_ps)[:, None, None]

    sur.predict = drifting
    for remove in (True, False):
        top, system, positions = alanine_system(None)
        for i in reversed(range(system.getNumForces())):
            if isinstance(system.getForce(i), openmm.CMMotionRemover):
                system.removeForce(i)
        if remove:  # its turn comes after the jumps of this test
            system.addForce(openmm.CMMotionRemover(1000))
        sim = app.Simulation(top, system, openmm.VerletIntegrator(MD_STEP_PS * unit.picosecond),
                             reference_platform())
        cold_start(sim.context, positions)
        sim.step(1)  # the remover's turn at step 0 is past
        sim.reporters.append(SurrogateJumpReporter(sur, interval=4, guards="warn"))
        sim.step(4)
        m = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                      for i in range(system.getNumParticles())])
        v = sim.context.getState(velocities=True).getVelocities(asNumpy=True).value_in_unit(
            A / unit.picosecond)
        com = (m[:, None] * v).sum(0) / m.sum()
        if remove:
            np.testing.assert_allclose(com, 0.0, atol=1e-6)
        else:
            assert com[0] > 1.5


def test_checkpoint_and_state_files_need_no_openmm_internals(tmp_path, monkeypatch):
    """pyproject allows OpenMM 8.1: saving by path used ``openmm.app.internal.safesave``, a module
    OpenMM 8.3 does not have (ImportError at every checkpoint, every predict run with one). Saved
    files are written atomically by the package itself, replace an earlier file whole and leave no
    temporary file."""
    import sys

    import openmm.app.internal

    monkeypatch.setitem(sys.modules, "openmm.app.internal.safesave", None)  # as on OpenMM 8.3
    monkeypatch.delattr(openmm.app.internal, "safesave", raising=False)
    sim = make_sim(tmp_path, selection="all", constraints=None, model="constant")
    chk, xml = tmp_path / "a.chk", tmp_path / "a.xml"
    chk.write_bytes(b"an older checkpoint")
    sim.step(2)
    sim.saveCheckpoint(str(chk))
    sim.saveState(str(xml))
    assert chk.read_bytes() == sim.context.createCheckpoint()
    assert "<State" in xml.read_text()
    assert not list(tmp_path.glob(".*.tmp"))
    sim.step(2)
    sim.loadCheckpoint(str(chk))
    assert sim.currentStep == 2 * sim.steps_per_jump


def test_hybrid_mode_keeps_exact_time_and_reports_md_and_jump_frames(tmp_path):
    sim = make_sim(tmp_path, md_steps=10, model="constant")
    spj = sim.steps_per_jump
    sim.reporters.append(app.XTCReporter(str(tmp_path / "h.xtc"), 5))
    rec = FrameRecorder(5)
    sim.reporters.append(rec)
    n = 6
    sim.step(n)
    assert sim.currentStep == n * (10 + spj)
    t = sim.context.getState().getTime().value_in_unit(unit.picosecond)
    assert t == pytest.approx(n * (10 * sim.step_ps + sim.surrogate.jump_ps), abs=1e-9)
    np.testing.assert_allclose(rec.times, np.asarray(rec.steps) * sim.step_ps, atol=1e-9)
    assert rec.steps == list(range(5, n * (10 + spj) + 1, 5))
    u = mda.Universe(str(PDB), str(tmp_path / "h.xtc"))
    np.testing.assert_allclose([ts.time for ts in u.trajectory], rec.times, atol=1e-4)


def test_jump_reporter_on_an_unchanged_simulation(tmp_path):
    ck = make_checkpoint(cached_md(), tmp_path / "h.pt", selection="heavy", model="constant")
    top, system, positions = alanine_system()
    integ = openmm.VerletIntegrator(MD_STEP_PS * unit.picosecond)
    sim = app.Simulation(top, system, integ, reference_platform())
    cold_start(sim.context, positions)
    jumper = SurrogateJumpReporter(ck, interval=10)
    sim.reporters.append(jumper)
    rec = FrameRecorder(10)
    sim.reporters.append(rec)
    sim.step(50)
    jump = jumper.surrogate.jump_ps
    assert jumper.n_jumps == 5
    assert sim.currentStep == 50  # step count keeps counting integrator steps
    t = sim.context.getState().getTime().value_in_unit(unit.picosecond)
    assert t == pytest.approx(50 * MD_STEP_PS + 5 * jump, abs=1e-9)
    # reporters due together with the jump see the state before it
    np.testing.assert_allclose(rec.times, [k * 10 * MD_STEP_PS + (k - 1) * jump
                                           for k in range(1, 6)], atol=1e-9)
    e = sim.context.getState(energy=True).getPotentialEnergy()
    assert np.isfinite(e.value_in_unit(unit.kilojoule_per_mole))


def test_heavy_atom_model_carries_hydrogens(tmp_path):
    sim = make_sim(tmp_path, selection="heavy", constraints=None)
    top = sim.topology
    pairs = [(b[0].index, b[1].index) for b in top.bonds()
             if "H" in (b[0].element.symbol, b[1].element.symbol)]
    pairs = np.array([(a, b) if top._chains else (a, b) for a, b in pairs])
    x0 = positions_A(sim)
    d0 = np.linalg.norm(x0[pairs[:, 0]] - x0[pairs[:, 1]], axis=1)
    sim.step(20)
    x = positions_A(sim)
    d = np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1)
    # rigid local superposition keeps X-H bonds close to their length (only the heavy
    # neighbourhood's own deformation leaks in)
    assert np.abs(d - d0).max() < 0.05
    z = np.array([a.element.atomic_number for a in top.atoms()])
    heavy = np.nonzero(z != 1)[0]
    hyd = np.nonzero(z == 1)[0]
    assert np.abs(x[heavy] - x0[heavy]).max() > 0.01
    assert np.abs(x[hyd] - x0[hyd]).max() > 0.01  # hydrogens moved along
    e = sim.context.getState(energy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    assert np.isfinite(e)


def test_jump_end_only_equals_the_last_frame_of_the_full_jump(tmp_path):
    # jump-step mode rebuilds the unpredicted atoms of the last two frames only; the end state
    # and its backward-difference velocity must be those of the full jump
    from integrations.propagator import SurrogatePropagator

    ck = make_checkpoint(cached_md(), tmp_path / "heavy4.pt", selection="heavy",
                         jump_frames=4, n_out=4)
    prop = SurrogatePropagator(Surrogate.load(ck))
    assert len(prop.offsets_ps) == 4
    pos, vel = thermal_start(3)
    full = prop.jump(pos, vel, 0.0)
    end = prop.jump(pos, vel, 0.0, last_only=True)
    assert end.positions_A.shape == (1, *pos.shape) and end.offsets_ps.tolist() == [
        full.offsets_ps[-1]]
    np.testing.assert_allclose(end.positions_A[0], full.positions_A[-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(end.velocities_A_per_ps[0], full.velocities_A_per_ps[-1],
                               rtol=0, atol=1e-9)
    assert np.abs(end.positions_A[0] - pos).max() > 0.01  # the jump moved the atoms


def test_unsupported_physics_is_refused(tmp_path, caplog):
    ck = make_checkpoint(cached_md(), tmp_path / "a.pt")
    surrogate = Surrogate.load(ck)
    top, system, _ = alanine_system()
    system.addForce(openmm.MonteCarloBarostat(1 * unit.bar, 300 * unit.kelvin))
    with pytest.raises(EngineError, match="MonteCarloBarostat"):
        SurrogateSimulation(top, system, surrogate, platform=reference_platform())
    top, system, _ = alanine_system()
    extra = openmm.CustomExternalForce("0.1*x^2")
    extra.addParticle(0, [])
    system.addForce(extra)
    with caplog.at_level(logging.WARNING):
        SurrogateSimulation(top, system, surrogate, platform=reference_platform())
    assert "CustomExternalForce" in caplog.text
    top, system, _ = alanine_system()
    system.addParticle(1.0)
    with pytest.raises(DataError, match="23 particles"):
        SurrogateSimulation(top, system, surrogate, platform=reference_platform())


def test_reordered_atoms_of_one_element_are_refused(tmp_path, caplog):
    # elements alone cannot see two hydrogens (or CA and CB) written in another order; the
    # training system's names in another order can
    surrogate = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "a.pt"))
    top, system, _ = alanine_system()
    atoms = list(top.atoms())
    methyl = [a for a in atoms if a.element.symbol == "H" and a.residue.index == 0][:2]
    assert methyl[0].name != methyl[1].name
    methyl[0].name, methyl[1].name = methyl[1].name, methyl[0].name
    with pytest.raises(DataError, match="another order"):
        SurrogateSimulation(top, system, surrogate, platform=reference_platform())
    # another naming convention for the same atoms is a warning, not an error
    top, system, _ = alanine_system()
    next(a for a in top.atoms() if a.name == "H").name = "HN"
    with caplog.at_level(logging.WARNING):
        SurrogateSimulation(top, system, surrogate, platform=reference_platform())
    assert "1 atom names differ" in caplog.text and "HN (trained: H)" in caplog.text
    caplog.clear()
    top, system, _ = alanine_system()
    with caplog.at_level(logging.WARNING):
        SurrogateSimulation(top, system, surrogate, platform=reference_platform())
    assert "names differ" not in caplog.text


def test_misaligned_file_reporter_is_an_error_before_anything_moves(tmp_path):
    sim = make_sim(tmp_path, md_steps=10, model="constant")
    sim.md_steps = 0  # MD steps as the step unit, jumps only
    sim.reporters.append(app.XTCReporter(str(tmp_path / "bad.xtc"), 3))
    before = positions_A(sim)
    with pytest.raises(EngineError, match="multiple of 5"):
        sim.step(1)
    np.testing.assert_array_equal(positions_A(sim), before)
    assert sim.currentStep == 0


def test_relaxation_restraint_strength_and_bad_settings(tmp_path):
    # a ballistic (linear) heavy-atom jump from a 300 K state stretches bonds; the restrained
    # minimisation after it holds the predicted atoms closer the stiffer the restraint
    md = cached_md()
    ck = make_checkpoint(md, tmp_path / "heavy.pt", selection="heavy")
    surrogate = Surrogate.load(ck)
    ends = {}
    for k in (None, 0.0, 1e4, 1e6):
        top, system, _ = alanine_system()
        relax = {} if k is None else {"relax_iterations": 100,
                                      "relax_restraint_kJ_per_mol_nm2": k}
        sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                                  guards="warn", **relax)
        sim.context.setPositions(unit.Quantity(md["frames"][3], A))
        sim.context.setVelocities(unit.Quantity(md["velocities"][3], A / unit.picosecond))
        sim.step(1)
        st = sim.context.getState(positions=True, energy=True)
        ends[k] = (st.getPositions(asNumpy=True).value_in_unit(A),
                   st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    heavy = surrogate.model_atoms
    x_raw, e_raw = ends[None]
    shifts = {k: np.linalg.norm(ends[k][0] - x_raw, axis=1)[heavy].max() for k in (0.0, 1e4, 1e6)}
    assert shifts[0.0] > shifts[1e4] > shifts[1e6] and shifts[1e6] < 0.1
    assert e_raw > ends[1e6][1] > ends[1e4][1] > ends[0.0][1]
    top, system, _ = alanine_system()
    for bad in ({"relax_iterations": -1}, {"relax_iterations": 2.5},
                {"relax_restraint_kJ_per_mol_nm2": float("nan")},
                {"relax_restraint_kJ_per_mol_nm2": -1.0}):
        with pytest.raises(EngineError, match="relax_"):
            SurrogateSimulation(top, system, surrogate, platform=reference_platform(), **bad)


def test_step_bookkeeping_helpers():
    assert default_step_ps(np.array([0.01, 0.02])) == pytest.approx(0.002)
    dt = default_step_ps(np.array([0.1875, 0.375]))
    assert dt <= 0.002 and (0.1875 / dt) == pytest.approx(round(0.1875 / dt))
    np.testing.assert_array_equal(frame_steps(np.array([0.01, 0.02]), 0.002), [5, 10])
    with pytest.raises(EngineError, match="not whole multiples"):
        frame_steps(np.array([0.01, 0.02]), 0.003)


class EnergyRecorder:
    """A user reporter recording the potential energy of every reported state (kJ/mol)."""

    def __init__(self, interval):
        self.interval = interval
        self.energies = []

    def describeNextReport(self, simulation):
        return {"steps": self.interval - simulation.currentStep % self.interval,
                "periodic": False, "include": ["energy"]}

    def report(self, simulation, state):
        self.energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))


def test_guard_energy_window_holds_the_energies_of_the_states_jumped_from(tmp_path):
    """The guards' reference window gets the true energy of each state a jump starts from (the
    one its acceptance check computed, while the positions are unchanged), and a fresh one after
    the user moves atoms between steps. (Settled jump ends stay out of the window: the heavy-atom
    model's hydrogens are not settled here.)"""
    sim = make_sim(tmp_path, model="linear", guards="warn", settle_iterations=0)
    rec = EnergyRecorder(1)
    sim.reporters.append(rec)
    sim.step(3)
    window = list(sim.guards._energies)
    assert len(window) == 3 and len(rec.energies) == 3
    np.testing.assert_allclose(window[1:], rec.energies[:2], rtol=0, atol=1e-6)
    x = positions_A(sim)
    x[0] += 0.05
    sim.context.setPositions(x * A)
    moved = sim.context.getState(energy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    assert abs(moved - rec.energies[-1]) > 1e-3
    sim.step(1)
    assert sim.guards._energies[-1] == pytest.approx(moved, abs=1e-6)


def history_sim(tmp_path, stride: int, guards: str = "warn", break_weights: bool = False):
    """SurrogateSimulation of an ESTAG history checkpoint: 4-frame jumps (0.04 ps) with output
    frames 2 frames apart, 3 input frames ``stride`` frames apart."""
    ck = make_checkpoint(cached_md(), tmp_path / f"estag-{stride}.pt", model="estag",
                         selection="heavy", jump_frames=4, n_out=2, history=3,
                         history_stride=stride, break_weights=break_weights)
    top, system, positions = alanine_system()
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              guards=guards)
    cold_start(sim.context, positions)
    return sim


def sim_time_ps(sim):
    return sim.context.getState().getTime().value_in_unit(unit.picosecond)


@pytest.mark.parametrize("guards", ["warn", "fallback"])
def test_history_model_takes_its_history_from_its_own_jumps(tmp_path, caplog, guards):
    # stride 2 frames = the output spacing: after one MD warm-up (2 x 0.02 ps) the predicted
    # frames inside each jump (or, for a broken model, the states of the fallback MD at the
    # output times) supply the next input; before, only jump ends were kept and every jump ran
    # the warm-up again
    sim = history_sim(tmp_path, stride=2, guards=guards, break_weights=guards == "fallback")
    with caplog.at_level(logging.INFO, logger="integrations.openmm_simulation"):
        sim.step(5)
    warm_ups = [r for r in caplog.records if "to build its input history" in r.getMessage()]
    assert len(warm_ups) == 1
    np.testing.assert_allclose(sim_time_ps(sim), 2 * 0.02 + 5 * 0.04, atol=1e-9)
    assert (sim.n_jumps, sim.n_fallbacks) == ((5, 0) if guards == "warn" else (0, 5))
    if guards == "warn":  # the history handed to the model is the last jump's own output
        end = sim_time_ps(sim)
        hist = sim.propagator.history(end)
        np.testing.assert_allclose(hist[-1], positions_A(sim)[sim.surrogate.model_atoms],
                                   atol=1e-9)
        pred = sim.propagator.history(end - 0.02)[-1]
        assert np.abs(pred - hist[-1]).max() > 0  # the mid-jump frame, not the end state


def test_history_model_that_jumps_cannot_feed_warns_and_rebuilds_by_md(tmp_path, caplog):
    # stride 1 frame < output spacing 2 frames: the jumps never produce the input frames
    with caplog.at_level(logging.INFO, logger="integrations.openmm_simulation"):
        sim = history_sim(tmp_path, stride=1)
        sim.step(3)
    assert any("not a multiple of its output spacing" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    warm_ups = [r for r in caplog.records if "to build its input history" in r.getMessage()]
    assert len(warm_ups) == 3 and sim.n_jumps == 3
    np.testing.assert_allclose(sim_time_ps(sim), 3 * (2 * 0.01 + 0.04), atol=1e-9)


def test_jump_reporter_feeds_a_history_model_or_says_why_it_cannot(tmp_path, caplog):
    # history 3 frames 0.02 ps apart, jumps of 0.04 ps with a frame at 0.02 ps: reports every
    # 10 steps (0.02 ps) see the stride, so after two reports every report jumps; reports every
    # 3 steps never do, and the reporter says so once
    ck = make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag", selection="heavy",
                         jump_frames=4, n_out=2, history=3, history_stride=2)
    top, system, positions = alanine_system()
    runs = {}
    for interval in (10, 3):
        sim = app.Simulation(top, system, openmm.VerletIntegrator(MD_STEP_PS * unit.picosecond),
                             reference_platform())
        cold_start(sim.context, positions)
        jumper = SurrogateJumpReporter(ck, interval=interval, guards="warn")
        sim.reporters.append(jumper)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="integrations.openmm_simulation"):
            sim.step(10 * interval)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING
                  and "no input history" in r.getMessage()]
        runs[interval] = (jumper.n_skipped, jumper.n_jumps, len(warned))
    assert runs[10] == (2, 8, 0)
    assert runs[3] == (10, 0, 1)


def test_history_warm_up_before_reporters_keeps_file_times_true(tmp_path):
    # the stock XTC reporter stamps frame k with k x interval x step size: MD inside the first
    # jump would make it lag the State's time; prepare_history runs it first and restarts the
    # clock, so the file's times are the State's
    sim = history_sim(tmp_path, stride=2)
    warm = sim.prepare_history(reset_clock=True)
    assert warm == pytest.approx(2 * 0.02)
    assert sim.currentStep == 0 and sim_time_ps(sim) == pytest.approx(0.0)
    assert sim.propagator.has_history(0.0)
    xtc = tmp_path / "h.xtc"
    recorder = FrameRecorder(1)
    sim.reporters += [app.XTCReporter(str(xtc), 1), recorder]
    sim.step(3)
    del sim.reporters[:]
    times = [ts.time for ts in mda.Universe(str(PDB), str(xtc)).trajectory]
    np.testing.assert_allclose(times, recorder.times, atol=1e-4)
    np.testing.assert_allclose(times, [0.04, 0.08, 0.12], atol=1e-4)
    assert history_sim(tmp_path, stride=2).prepare_history() > 0
    # S2T models have nothing to prepare
    assert make_sim(tmp_path).prepare_history(reset_clock=True) == 0.0


def test_hybrid_history_model_takes_its_history_from_the_md_segments(tmp_path, caplog):
    ck = make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag", selection="heavy",
                         jump_frames=4, n_out=2, history=3, history_stride=2)
    top, system, positions = alanine_system()
    with pytest.raises(EngineError, match="multiple of the output spacing"):
        SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                            md_steps=5)
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              md_steps=20, guards="warn")
    cold_start(sim.context, positions)
    steps = []
    with caplog.at_level(logging.INFO, logger="integrations.openmm_simulation"):
        for _ in range(3):
            before = sim.currentStep
            sim.step(1)
            steps.append(sim.currentStep - before)
    # 20 MD steps cover the history (2 x 0.02 ps): no warm-up, every step 20 + 20 steps
    assert steps == [40, 40, 40]
    assert not [r for r in caplog.records if "to build its input history" in r.getMessage()]


def test_virtual_sites_follow_their_atoms_after_a_jump(tmp_path):
    # a massless site at the midpoint of two atoms, in a System without constraints: OpenMM
    # places virtual sites only when asked (applyConstraints or computeVirtualSites)
    from integrations.openmm_simulation import degrees_of_freedom
    from surrogate_md.data import Topology

    md = dict(cached_md())
    top, system, positions = alanine_system(constraints=None)
    a, b = 4, 8
    site = system.addParticle(0.0)
    system.setVirtualSite(site, openmm.TwoParticleAverageSite(a, b, 0.5, 0.5))
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.addParticle(0.0, 0.1, 0.0)  # uncharged, no LJ
    residue = list(top.residues())[-1]
    top.addAtom("M", None, residue)
    t = md["topology"]
    md["topology"] = Topology(np.append(t.atomic_numbers, 0), np.append(t.masses, 0.0),
                              np.append(t.atom_names, "M"), np.append(t.residue_ids,
                                                                      t.residue_ids[-1]),
                              np.append(t.residue_names, t.residue_names[-1]), t.bonds)
    mid = 0.5 * (md["frames"][:, a] + md["frames"][:, b])
    md["frames"] = np.concatenate([md["frames"], mid[:, None]], axis=1)
    md["velocities"] = np.concatenate([md["velocities"], md["velocities"][:, :1] * 0], axis=1)
    ck = make_checkpoint(md, tmp_path / "vsite.pt", selection="heavy")
    sim = SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform(),
                              guards="warn")
    pos = np.concatenate([np.asarray(positions.value_in_unit(unit.nanometer)),
                          np.zeros((1, 3))]) * unit.nanometer
    cold_start(sim.context, pos)
    sim.step(2)
    x = positions_A(sim)
    np.testing.assert_allclose(x[site], 0.5 * (x[a] + x[b]), atol=1e-6)
    # the energy guard's degrees of freedom are OpenMM's: the massless site has none
    n_cm = 3 if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()) else 0
    assert degrees_of_freedom(system) == 3 * 22 - n_cm


def test_simulation_surface_xml_files_and_clock_time(tmp_path):
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    top, system, positions = alanine_system()
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                 MD_STEP_PS * unit.picosecond)
    for name, obj in (("system.xml", system), ("integrator.xml", integrator)):
        (tmp_path / name).write_text(openmm.XmlSerializer.serialize(obj))
    sim = SurrogateSimulation(top, str(tmp_path / "system.xml"), Surrogate.load(ck),
                              integrator=str(tmp_path / "integrator.xml"),
                              platform=reference_platform())
    assert sim.system.getNumParticles() == 22 and sim.md_step_ps == pytest.approx(MD_STEP_PS)
    cold_start(sim.context, positions)
    state = tmp_path / "end.xml"
    sim.runForClockTime(0.3 / 3600.0, stateFile=str(state))  # hours, as Simulation
    assert sim.currentStep > 0 and state.is_file()
    with pytest.raises(EngineError, match="not a serialized OpenMM system"):
        SurrogateSimulation(top, str(state), Surrogate.load(ck), platform=reference_platform())


def test_history_is_rebuilt_after_the_atoms_are_set_by_hand(tmp_path, caplog):
    # remembered frames belong to the trajectory that made them: positions set by hand between
    # steps start another one, whose history real MD has to build
    sim = history_sim(tmp_path, stride=2)
    with caplog.at_level(logging.INFO):
        sim.step(2)
        x = positions_A(sim)
        sim.context.setPositions((x + 0.05) * A)
        sim.step(2)
    warm_ups = [r for r in caplog.records if "to build its input history" in r.getMessage()]
    assert len(warm_ups) == 2
    assert any("not the one remembered" in r.getMessage() for r in caplog.records)


def test_a_finite_difference_model_is_warned_about_its_inputs_in_an_engine(tmp_path, caplog):
    """A model trained on finite-difference velocities (MD17 positions, data.velocities:
    difference) gets instantaneous MD velocities from an engine: said once, at construction."""
    from surrogate_md.checkpoint import load_checkpoint, save_checkpoint

    ck = make_checkpoint(cached_md(), tmp_path / "l.pt", selection="all")
    raw = load_checkpoint(ck)
    raw["protocol"]["velocity_source"] = "finite_difference"
    save_checkpoint(tmp_path / "fd.pt", raw)
    top, system, positions = alanine_system(None)
    with caplog.at_level(logging.WARNING):
        SurrogateSimulation(top, system, Surrogate.load(tmp_path / "fd.pt"),
                            platform=reference_platform())
    assert "trained on finite-difference input velocities" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        SurrogateSimulation(top, system, Surrogate.load(ck), platform=reference_platform())
    assert "finite-difference" not in caplog.text
