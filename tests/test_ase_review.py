"""SurrogateDynamics as an ASE user meets it: the step, time and observer conventions of ASE's
MolecularDynamics, constraints in every frame of a jump (periodic cells included), atoms wrapped
by an observer under a history model, MD that cannot run for want of a calculator, hybrid
segments on the trajectory's time grid, trajectories under MPI, and restarts at step 0."""

from __future__ import annotations

import numpy as np
import pytest
from _integration_fixtures import PDB, cached_md, make_checkpoint
from ase import units
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import Trajectory, read
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from integrations.ase_dynamics import SurrogateDynamics
from integrations.writers import PS_IN_ASE_TIME
from surrogate_md import Surrogate
from surrogate_md.errors import EngineError


def cold_atoms(temperature_K=0.05, seed=0):
    atoms = read(str(PDB))
    atoms.set_positions(cached_md()["frames"][0])
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    return atoms


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    path = tmp_path_factory.mktemp("linear") / "heavy.pt"
    return Surrogate.load(make_checkpoint(cached_md(), path, selection="heavy"))


@pytest.fixture(scope="module")
def estag(tmp_path_factory):
    # ESTAG, 3 input frames 0.02 ps apart, 0.04 ps jumps with frames at 0.02 and 0.04 ps
    path = tmp_path_factory.mktemp("estag") / "estag.pt"
    return Surrogate.load(make_checkpoint(cached_md(), path, model="estag", selection="heavy",
                                          jump_frames=4, n_out=2, history=3, history_stride=2))


def test_steps_time_observers_and_files_follow_ase_molecular_dynamics(tmp_path, linear):
    """Side by side with ASE's VelocityVerlet at the same time step: the same observer calls
    (every n steps, once at step n, once at the start), the same ``run``/``irun`` results,
    step counts, times (ASE units), trajectory frames and log lines over two ``run`` calls."""
    seen = {}
    for kind in ("VelocityVerlet", "SurrogateDynamics"):
        atoms = cold_atoms()
        atoms.calc = EMT()
        files = {"trajectory": str(tmp_path / f"{kind}.traj"),
                 "logfile": str(tmp_path / f"{kind}.log"), "loginterval": 3}
        if kind == "VelocityVerlet":
            dyn = VelocityVerlet(atoms, timestep=linear.jump_ps * PS_IN_ASE_TIME, **files)
        else:
            dyn = SurrogateDynamics(atoms, linear, guards="warn", **files)
        calls = {interval: [] for interval in (1, 4, -2, 0)}
        for interval, steps in calls.items():
            dyn.attach(lambda steps=steps, dyn=dyn: steps.append(dyn.nsteps), interval=interval)
        results = [dyn.run(5), dyn.run(4), list(dyn.irun(2)), dyn.run(0)]
        seen[kind] = (calls, results, dyn.nsteps, dyn.get_number_of_steps(), dyn.get_time(),
                      len(read(files["trajectory"], ":")),
                      len((tmp_path / f"{kind}.log").read_text().splitlines()))
    assert seen["SurrogateDynamics"] == seen["VelocityVerlet"]
    assert seen["VelocityVerlet"][0][4] == [0, 4, 8]


def test_fixed_atoms_stay_in_every_frame_of_a_jump(tmp_path, linear):
    """FixAtoms on atoms the model predicts: every frame of the jump, as ``last_jump`` hands it
    to observers and as the trajectory holds it, keeps them where they are (before, only the
    end state did: ``last_jump``'s intermediate frames moved them)."""
    atoms = cold_atoms(temperature_K=50)
    fixed = [int(i) for i in linear.model_atoms[:3]]
    atoms.set_constraint(FixAtoms(indices=fixed))
    x0 = atoms.get_positions()
    dyn = SurrogateDynamics(atoms, linear, guards="warn", trajectory=str(tmp_path / "f.traj"),
                            write_intermediate=True)
    jumps = []
    dyn.attach(lambda: jumps.append(None if dyn.last_jump is None else dyn.last_jump.copy()))
    dyn.run(2)
    frames = [f.positions for f in read(str(tmp_path / "f.traj"), ":")]
    assert len(frames) == 1 + 2 * len(linear.times_ps)
    for jump in jumps[1:]:
        assert np.abs(jump[:, fixed] - x0[fixed]).max() == 0.0
    np.testing.assert_array_equal(np.concatenate(jumps[1:]), frames[1:])
    for frame in frames:
        assert np.abs(frame[fixed] - x0[fixed]).max() == 0.0
    with Trajectory(str(tmp_path / "f.traj")) as traj:
        for frame in list(traj)[1:]:
            assert not frame.get_velocities()[fixed].any()
    free = [i for i in linear.model_atoms if i not in fixed]
    assert np.abs(frames[-1][free] - x0[free]).max() > 1e-3  # the others moved


def drifting_in_a_box() -> object:
    """Atoms in a 25 Å box drifting along x, their first atom (the root of the molecule's bond
    tree) 0.06 Å inside the x face: it leaves the cell during the first step."""
    atoms = cold_atoms()
    atoms.set_velocities(atoms.get_velocities() + np.array([1.0, 0.0, 0.0]) / PS_IN_ASE_TIME)
    atoms.cell, atoms.pbc = [25.0, 25.0, 25.0], True
    centre = atoms.positions.mean(axis=0)
    atoms.positions += (25.0 - 0.06 - atoms.positions[0, 0], 12.5 - centre[1], 12.5 - centre[2])
    return atoms


def box_dynamics(atoms, sur):
    """A history model with VelocityVerlet to build its history, EMT energies."""
    atoms.calc = EMT()
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    return SurrogateDynamics(atoms, sur, guards="warn", fallback_dynamics=md)


def test_a_history_model_keeps_its_history_when_an_observer_wraps_the_atoms(tmp_path, estag):
    """``dyn.attach(atoms.wrap)`` puts an atom that left the cell back in it between steps: the
    molecule the model sees stays at its lattice image, so the history remembered from the MD
    and the jumps still fits and the run takes the same jumps as without the observer (before,
    the next step saw the whole molecule a box length away, dropped its history and ran MD
    again). A restart from the wrapped atoms keeps it too."""
    from ase.geometry import find_mic

    plain = box_dynamics(drifting_in_a_box(), estag)
    plain.run(5)
    wrapped = box_dynamics(drifting_in_a_box(), estag)
    outside = []
    wrapped.attach(lambda: outside.append(wrapped.atoms.positions[0, 0] > 25.0))
    wrapped.attach(wrapped.atoms.wrap)
    wrapped.run(2)
    assert (wrapped.n_history_md, wrapped.n_jumps) == (1, 1)
    assert outside == [False, True, True]  # the wrap observer had an atom to put back
    wrapped.save_state(tmp_path / "s.npz")
    saved = wrapped.atoms.copy()
    wrapped.run(3)
    for dyn in (plain, wrapped):
        assert (dyn.n_history_md, dyn.n_jumps) == (1, 4)
    diff = find_mic(wrapped.atoms.positions - plain.atoms.positions, plain.atoms.cell, True)[0]
    np.testing.assert_allclose(diff, 0.0, atol=1e-6)

    again = box_dynamics(saved, estag)
    again.attach(again.atoms.wrap)
    again.load_state(tmp_path / "s.npz")
    again.run(3)
    assert (again.n_history_md, again.n_jumps) == (1, 4)
    np.testing.assert_allclose(again.atoms.positions, wrapped.atoms.positions, atol=1e-9)


def test_md_without_a_calculator_is_refused_when_the_dynamics_is_built(linear, estag):
    """MD needs forces: hybrid segments, a history model's warm-up and fallback MD for a guard
    action that falls back are refused at construction on atoms without a calculator (before,
    the first MD failed with ASE's bare "no calculator", for fallbacks maybe hours into the
    run); MD that never runs (action 'raise', no history model) is not."""
    def bare():
        atoms = cold_atoms()
        return atoms, VelocityVerlet(atoms, timestep=0.5 * units.fs)

    atoms, md = bare()
    with pytest.raises(EngineError, match=r"md_dynamics \(VelocityVerlet\) runs 4 MD steps.*"
                                          r"no calculator"):
        SurrogateDynamics(atoms, linear, md_dynamics=md, md_steps=4, guards="warn")
    for action in ("fallback", "warn"):
        atoms, md = bare()
        with pytest.raises(EngineError, match=f"in place of the jumps that guard action "
                                              f"'{action}' cannot keep.*no calculator"):
            SurrogateDynamics(atoms, linear, guards=action, fallback_dynamics=md)
    atoms, md = bare()
    with pytest.raises(EngineError, match="input history.*no calculator"):
        SurrogateDynamics(atoms, estag, guards="raise", fallback_dynamics=md)
    atoms, md = bare()
    dyn = SurrogateDynamics(atoms, linear, guards="raise", fallback_dynamics=md)
    dyn.run(2)
    assert dyn.n_jumps == 2 and md.nsteps == 0


def test_a_fixed_atom_at_another_lattice_image_than_its_molecule(linear):
    """Periodic cell, the molecule split across the x face by ``atoms.wrap()``, FixAtoms on an
    atom wrapped to the other side than the rest of it: the jumps start from the same state
    with the molecule whole, so the fixed atom stays put (up to a lattice vector) and the
    molecule takes the jumps of the unsplit one (before, the constraint held the atom a box
    length from its bonded neighbours: a 24 Å bond, and action 'raise' stopped the run)."""
    from ase.geometry import find_mic

    from integrations.ase_dynamics import _BondTree

    def in_box(shift):
        atoms = cold_atoms()
        atoms.cell, atoms.pbc = [25.0, 25.0, 25.0], True
        atoms.positions += (shift, 12.5, 12.5) - atoms.positions.mean(axis=0)
        atoms.wrap()
        return atoms

    split = in_box(25.0)
    whole = _BondTree(len(split), linear.topology["bonds"]).apply(split.positions, split.cell,
                                                                  split.pbc)
    other_side = [int(i) for i in linear.model_atoms
                  if abs(whole[i, 0] - split.positions[i, 0]) > 12.5]
    assert other_side  # the case: a predicted atom wrapped away from its molecule
    fixed = other_side[:1]
    runs = {}
    for name, atoms in (("split", split), ("whole", in_box(12.5))):
        atoms.set_constraint(FixAtoms(indices=fixed))
        x0 = atoms.get_positions()
        dyn = SurrogateDynamics(atoms, linear)  # action 'raise': any failed guard stops it
        dyn.run(2)
        assert dyn.n_jumps == 2
        moved = find_mic(atoms.positions[fixed] - x0[fixed], atoms.cell, True)[0]
        np.testing.assert_allclose(moved, 0.0, atol=1e-9)
        runs[name] = atoms.get_positions()
    diff = find_mic(runs["split"] - runs["whole"] - [12.5, 0.0, 0.0], split.cell, True)[0]
    np.testing.assert_allclose(diff, 0.0, atol=1e-4)  # float32 model


def test_intermediate_frames_are_written_by_the_master_rank_only(tmp_path, linear):
    """Under MPI every rank runs the dynamics and only the master writes the trajectory, as
    ASE's own writer does; the intermediate frames followed no such rule (every rank appended
    them to the same file). A rank other than the master here writes no file at all."""
    from ase.parallel import DummyMPI

    class SecondRank(DummyMPI):
        rank, size = 1, 2

    path = tmp_path / "rank1.traj"
    dyn = SurrogateDynamics(cold_atoms(), linear, trajectory=str(path), write_intermediate=True,
                            comm=SecondRank(), guards="warn")
    dyn.run(2)
    assert dyn.n_jumps == 2 and dyn.last_jump.shape[0] == len(linear.times_ps)
    assert not path.exists()


def test_hybrid_mode_writes_its_md_states_on_the_jumps_grid(tmp_path, linear):
    """Hybrid mode with ``write_intermediate``: the MD segment's states at the jump's output
    spacing go to the trajectory too, so its frames are one even time grid (before, the
    segment's time fell between a jump's end and the next jump's first frame: uneven steps,
    the very thing ``loginterval`` > 1 is refused for); a segment that is not a whole number
    of output spacings is refused. The run itself is the one without written frames."""
    spacing = linear.times_ps[0]  # 0.01 ps: 20 MD steps of 0.5 fs
    assert np.allclose(linear.times_ps, [spacing, 2 * spacing])

    def hybrid(md_steps, **kwargs):
        atoms = cold_atoms(temperature_K=20)
        atoms.calc = EMT()
        md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        return SurrogateDynamics(atoms, linear, md_dynamics=md, md_steps=md_steps,
                                 guards="warn", **kwargs)

    path = tmp_path / "hybrid.traj"
    dyn = hybrid(40, trajectory=str(path), write_intermediate=True)
    md_states = []
    dyn.md_dynamics.attach(lambda: md_states.append(dyn.atoms.get_positions()), interval=20)
    dyn.run(3)
    frames = [f.positions for f in read(str(path), ":")]
    per_step = 2 + len(linear.times_ps)  # two MD states, the jump's frames
    assert len(frames) == 1 + 3 * per_step
    md_frames = [frames[1 + k * per_step + m] for k in range(3) for m in range(2)]
    np.testing.assert_array_equal(md_frames, md_states[1:])  # md_states[0]: before any MD
    plain = hybrid(40)
    plain.run(3)
    np.testing.assert_allclose(dyn.atoms.get_positions(), plain.atoms.get_positions(),
                               rtol=0, atol=1e-9)
    with pytest.raises(EngineError, match=r"\(4 steps of 0.5 fs\) is not a whole number.*"
                                          r"multiple of 0.01 ps"):
        hybrid(4, trajectory=str(tmp_path / "uneven.traj"), write_intermediate=True)
    hybrid(4, write_intermediate=True)  # no trajectory to write: nothing to refuse


def test_a_restart_from_step_0_writes_no_second_first_frame(tmp_path, linear):
    """``restart=`` writes its file at the start: a run stopped during its first step resumes
    from step 0. With ``append_trajectory=True`` the trajectory already holds that frame, and
    the resumed run writes the frames of the uninterrupted one (before, a second copy of frame
    0 shifted every later frame by one step)."""
    whole_path = tmp_path / "whole.traj"
    SurrogateDynamics(cold_atoms(), linear, trajectory=str(whole_path)).run(3)
    traj, state = tmp_path / "run.traj", tmp_path / "run.state.npz"
    SurrogateDynamics(cold_atoms(), linear, trajectory=str(traj), restart=state).run(0)
    assert len(read(str(traj), ":")) == 1
    at_start = tmp_path / "start.state.npz"
    at_start.write_bytes(state.read_bytes())
    again = SurrogateDynamics(read(str(traj), -1), linear, trajectory=str(traj), restart=state,
                              append_trajectory=True)
    seen = []
    again.attach(lambda: seen.append(again.nsteps))
    again.run(3)
    frames, expected = read(str(traj), ":"), read(str(whole_path), ":")
    assert len(frames) == len(expected) == 4 and seen == [1, 2, 3]
    for frame, reference in zip(frames, expected):
        np.testing.assert_allclose(frame.positions, reference.positions, rtol=0, atol=1e-12)
    # without the earlier frame (a new trajectory) step 0 is written as in any run
    fresh = tmp_path / "fresh.traj"
    SurrogateDynamics(read(str(traj), 0), linear, trajectory=str(fresh),
                      restart=at_start).run(0)
    assert len(read(str(fresh), ":")) == 1


def test_thermal_end_velocities_give_the_moving_atoms_zero_net_momentum(linear):
    """FixAtoms with thermal end velocities: the draw's zero net momentum belongs to the moving
    atoms (before, the fixed atoms got a share of the draw and were zeroed after, leaving the
    others a net momentum), and the fixed atoms are at rest."""
    atoms = cold_atoms(temperature_K=50)
    fixed = [int(i) for i in linear.model_atoms[:3]]
    atoms.set_constraint(FixAtoms(indices=fixed))
    dyn = SurrogateDynamics(atoms, linear, guards="warn", end_velocities="thermal",
                            temperature_K=300.0, velocity_seed=4)
    for _ in range(3):
        dyn.run(1)
        momenta = atoms.get_momenta()
        assert not momenta[fixed].any()
        scale = np.abs(momenta).sum(axis=0).max()
        assert np.abs(momenta.sum(axis=0)).max() < 1e-9 * scale
