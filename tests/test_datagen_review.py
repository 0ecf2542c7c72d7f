"""datagen input checks and run bookkeeping: malformed MD17/rMD17 files, non-finite energies,
settings OpenMM and ASE would fail on, coordinates of other atoms, checkpoint cadence."""

from __future__ import annotations

import numpy as np
import pytest
from _datagen_fixtures import Killed, kill_at

from datagen.ase_md import run_ase
from datagen.cli import main
from datagen.ingest import MD17_INTERVAL_PS, ingest
from datagen.openmm_md import run_openmm
from surrogate_md.data.h5md import open_trajectory
from surrogate_md.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: ethanol (C, C, O, 6 H), one structure, in Å
ETHANOL_Z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
ETHANOL_A = np.array([[0.0, 0.0, 0.0], [1.52, 0.0, 0.0], [2.0, 1.35, 0.0], [-0.4, 1.0, 0.2],
                      [-0.4, -0.5, 0.9], [-0.4, -0.5, -0.9], [1.9, -0.5, 0.9],
                      [1.9, -0.5, -0.9], [2.95, 1.35, 0.0]])


def _frames(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"R": ETHANOL_A + 0.01 * rng.standard_normal((n, 9, 3)),
            "E": -97_000.0 + rng.standard_normal((n, 1)),  # kcal/mol, MD17's (F, 1)
            "F": rng.standard_normal((n, 9, 3))}


@pytest.mark.parametrize("case, match", [
    ("no frames", "holds no frame"),
    ("symbols for z", "'z' holds <U1 values, not numbers"),
    ("z = 0", "atomic numbers .* atom 3 has 0"),
    ("z beyond the table", "atomic numbers .* atom 3 has 200"),
    ("fractional z", "atomic numbers .* atom 0 has 6.5"),
    ("NaN energy", r"energies contain NaN or inf \(frame 2\)"),
    ("object array", "'R' cannot be read"),
])
def test_malformed_md17_arrays_are_refused_by_name(tmp_path, case, match):
    """Every malformed MD17 file is a DataError naming the file and the key (no traceback, no
    NaN energies or made-up elements in the dataset), and nothing is written."""
    d = {**_frames(), "z": ETHANOL_Z}
    if case == "no frames":
        d = {k: v[:0] if k != "z" else v for k, v in d.items()}
    elif case == "symbols for z":
        d["z"] = np.array(["C", "C", "O"] + ["H"] * 6)
    elif case == "z = 0":
        d["z"] = np.where(ETHANOL_Z == 1, 0, ETHANOL_Z)
    elif case == "z beyond the table":
        d["z"] = np.where(ETHANOL_Z == 1, 200, ETHANOL_Z)
    elif case == "fractional z":
        d["z"] = ETHANOL_Z + 0.5
    elif case == "NaN energy":
        d["E"][2, 0] = np.nan
    elif case == "object array":
        d["R"] = np.array(list(d["R"]), dtype=object)
    src = tmp_path / "bad.npz"
    np.savez(src, **d)
    with pytest.raises(DataError, match=match) as info:
        ingest(src, tmp_path / "out.h5")
    assert str(src) in str(info.value)
    assert list(tmp_path.glob("out.h5*")) == []


def test_rmd17_keys_without_old_indices_need_dt_ps(tmp_path):
    """rMD17-keyed frames without their MD17 indices have no known time order: refused unless
    the user gives their interval; with it, the frames are dt_ps apart in file order."""
    d = _frames(8)
    src = tmp_path / "rmd17.npz"
    np.savez(src, coords=d["R"], nuclear_charges=ETHANOL_Z, energies=d["E"][:, 0],
             forces=d["F"])
    with pytest.raises(DataError, match="without 'old_indices'.*--dt-ps"):
        ingest(src, tmp_path / "out.h5")
    assert list(tmp_path.glob("out.h5*")) == []
    out = ingest(src, tmp_path / "out.h5", dt_ps=2 * MD17_INTERVAL_PS)
    with open_trajectory(out) as f:
        np.testing.assert_allclose(f.time_ps, 2 * MD17_INTERVAL_PS * np.arange(8))
        np.testing.assert_allclose(f.read(slice(None)), d["R"], atol=1e-5)


def test_ase_trajectory_with_nan_energy_is_refused(tmp_path):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import Trajectory

    path = tmp_path / "run.traj"
    with Trajectory(str(path), "w") as traj:
        for k in range(4):
            atoms = molecule("H2O")
            atoms.positions += 0.01 * k
            energy = np.nan if k == 3 else -14.0 + 0.1 * k
            atoms.calc = SinglePointCalculator(atoms, energy=energy,
                                               forces=np.zeros((3, 3)))
            traj.write(atoms)
    with pytest.raises(DataError, match=r"run.traj: energies contain NaN or inf \(frame 3\)"):
        ingest(path, tmp_path / "out.h5", dt_ps=0.001)
    assert list(tmp_path.glob("out.h5*")) == []


@pytest.mark.parametrize("argv, match", [
    (["openmm", "--system", "ethanol", "--integrator", "langevin", "--friction-per-ps", "-1"],
     "friction_per_ps=-1.0 must be a number of 1/ps >= 0"),
    (["openmm", "--system", "ethanol", "--integrator", "langevin", "--friction-per-ps", "nan"],
     "friction_per_ps=nan must be a number of 1/ps >= 0"),
    (["openmm", "--system", "ethanol", "--equilibrate-ps", "nan"],
     "equilibrate_ps=nan must be"),
    (["ase", "--molecule", "H2O", "--calculator", "emt", "--friction-per-ps", "nan"],
     "friction_per_ps=nan must be a positive"),
])
def test_settings_the_engines_fail_on_are_one_line_errors(tmp_path, capsys, argv, match):
    """OpenMM refuses negative friction with its own exception, NaN friction or equilibration
    crashed later (SVD, int(NaN)) and ASE's NaN friction blew the run up into NaN positions:
    each is now a one-line user error before anything runs, and nothing is written."""
    code = main([*argv, "--frames", "3", "-o", str(tmp_path / "o.h5"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0]
    assert list(tmp_path.iterdir()) == []


def test_prmtop_with_coordinates_of_other_atoms(tmp_path):
    from datagen.systems import BUILTIN_SYSTEMS

    prmtop = BUILTIN_SYSTEMS["ethanol"].paths()[0]
    inpcrd = BUILTIN_SYSTEMS["aspirin"].paths()[1]
    with pytest.raises(DataError, match=r"aspirin.inpcrd: holds 21 atoms but .*ethanol.prmtop "
                                        r"has 9; give the coordinates"):
        run_openmm(prmtop, tmp_path / "o.h5", coordinates=inpcrd, frames=2, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("engine", ["openmm", "ase"])
def test_checkpoints_come_every_checkpoint_frames(tmp_path, engine):
    """A checkpoint every 150 frames, not only at the next multiple of the 100-frame write block
    (at 200): a run killed at frame 180 resumes from frame 150 and ends as the uninterrupted
    run."""
    if engine == "openmm":
        def run(out, **kw):
            return run_openmm("ethanol", out, frames=260, checkpoint_frames=150,
                              equilibrate_ps=0.0, progress=False, **kw)
    else:
        from ase.cluster import Icosahedron

        atoms = Icosahedron("Ar", 2, latticeconstant=5.4)

        def run(out, **kw):
            return run_ase(atoms, "lj", out, frames=260, checkpoint_frames=150, step_fs=5.0,
                           interval_ps=0.005, temperature_K=40.0, progress=False, **kw)
    ref = run(tmp_path / "ref.h5")
    out = tmp_path / "run.h5"
    with pytest.raises(Killed):
        run(out, frame_callback=kill_at(180))
    with np.load(tmp_path / "run.h5.chk.npz") as chk:
        assert int(chk["frames"]) == 150
    seen: list[int] = []
    run(out, resume=True, frame_callback=seen.append)
    assert seen == list(range(150, 260))
    with open_trajectory(ref) as a, open_trajectory(out) as b:
        assert b.n_frames == 260
        np.testing.assert_array_equal(b.time_ps, a.time_ps)
        np.testing.assert_array_equal(b.read(slice(None)), a.read(slice(None)))



def _wrapped_water_box():
    """Three waters in an 8 Å periodic cell, the third split across the y boundary."""
    from ase import Atoms
    from ase.build import molecule

    water = Atoms(cell=[8.0, 8.0, 8.0], pbc=True)
    for offset in [(1.0, 1.0, 1.0), (4.0, 4.0, 4.0), (2.0, 7.6, 5.0)]:
        m = molecule("H2O")
        m.positions += offset
        water += m
    return water


WATER_BONDS = [[0, 1], [0, 2], [3, 4], [3, 5], [6, 7], [6, 8]]


def test_ase_run_of_a_wrapped_periodic_structure_has_whole_molecules(tmp_path):
    """A periodic start structure stored wrapped: the dataset has the O-H bond across the
    boundary and the molecule whole in every frame (the run starts from it made whole)."""
    box = _wrapped_water_box()
    box.wrap()
    out = run_ase(box, "emt", tmp_path / "box.h5", frames=3, progress=False)
    with open_trajectory(out) as f:
        bonds = f.topology.bonds
        assert bonds.tolist() == WATER_BONDS
        x = f.read(slice(None))
        assert np.linalg.norm(x[:, bonds[:, 0]] - x[:, bonds[:, 1]], axis=-1).max() < 1.2


def test_periodic_ase_trajectory_molecules_are_made_whole(tmp_path):
    """A wrapped periodic ASE trajectory (a water split across the cell in every frame, and its
    oxygen crossing the boundary between frames) gets the O-H bond across the boundary and its
    molecules whole and continuous, as the MDAnalysis path does; a crystal, whose bonds span
    the cell, is left as stored."""
    from ase.build import bulk
    from ase.io import Trajectory

    water = _wrapped_water_box()
    path = tmp_path / "water.traj"
    with Trajectory(str(path), "w") as traj:
        for k in range(3):
            a = water.copy()
            a.positions += [0.0, 0.3 * k, 0.0]
            a.wrap()  # the third water's H sits at y = 0.36 Å, its O at 7.6 Å and later 0.2 Å
            traj.write(a)
    out = ingest(path, tmp_path / "water.h5", dt_ps=0.01)
    with open_trajectory(out) as f:
        bonds = f.topology.bonds
        assert bonds.tolist() == WATER_BONDS
        x = f.read(slice(None))
        lengths = np.linalg.norm(x[:, bonds[:, 0]] - x[:, bonds[:, 1]], axis=-1)
        np.testing.assert_allclose(lengths, 0.9686, atol=1e-3)
        np.testing.assert_allclose(np.diff(x[:, 6, 1]), 0.3, atol=1e-5)  # no jump of 8 Å
        assert f.metadata["made_whole"] is True
    crystal = bulk("Cu", cubic=True).repeat(2)
    with Trajectory(str(tmp_path / "cu.traj"), "w") as traj:
        traj.write(crystal)
        traj.write(crystal)
    with open_trajectory(ingest(tmp_path / "cu.traj", tmp_path / "cu.h5", dt_ps=0.01)) as f:
        assert f.metadata["made_whole"] is False
        np.testing.assert_allclose(f.read(0), crystal.positions, atol=1e-5)


def test_ase_run_refuses_a_placeholder_cell(tmp_path):
    """A PDB written by MDAnalysis from coordinates without a box carries the placeholder
    CRYST1 of 1 Å, which ase.io reads as a periodic 1 Å cell: the run was periodic in that
    cell (GFN2-xTB hangs in it, EMT runs it silently); now it is refused with the cause."""
    import warnings

    import MDAnalysis as mda
    from ase.build import molecule

    eth = molecule("CH3CH2OH")
    u = mda.Universe.empty(len(eth), trajectory=True)
    u.add_TopologyAttr("names", eth.get_chemical_symbols())
    u.add_TopologyAttr("elements", eth.get_chemical_symbols())
    u.atoms.positions = eth.positions
    pdb = tmp_path / "ethanol.pdb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CRYST1 record set to unitary values", missing attrs
        u.atoms.write(str(pdb))
    with pytest.raises(DataError, match=r"ethanol.pdb: atoms \d+ and \d+ are .* Å apart under "
                                        r"periodic boundaries.*remove the CRYST1 line"):
        run_ase(pdb, "emt", tmp_path / "o.h5", frames=2, progress=False)
    assert not list(tmp_path.glob("o.h5*"))


@pytest.mark.parametrize("argv", [
    ["ingest", "{npz}"],
    ["openmm", "--system", "ethanol", "--frames", "2", "--overwrite"],
    ["ase", "--molecule", "H2O", "--calculator", "emt", "--frames", "2", "--overwrite"],
])
def test_output_path_that_is_a_directory(tmp_path, capsys, argv):
    """-o naming a directory: 'file exists, pass --overwrite', then, with --overwrite, an
    IsADirectoryError traceback and the finished dataset stranded as DIR.partial. Now one line
    that says to name the file, and nothing written."""
    src = tmp_path / "md17.npz"
    np.savez(src, **_frames(), z=ETHANOL_Z)
    out = tmp_path / "data"
    out.mkdir()
    argv = [a.format(npz=src) for a in argv]
    code = main([*argv, "-o", str(out), "--no-progress", *(["--overwrite"] if
                                                           argv[0] == "ingest" else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a directory" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "md17.npz"]
    assert list(out.iterdir()) == []


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path):
    """Ctrl-C during a run printed a KeyboardInterrupt traceback; now a line that says what was
    kept and how to continue (exit code 130), and the frames and checkpoint are there to resume."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "datagen", "openmm", "--system", "alanine-dipeptide",
         "--frames", "1000000", "--interval-ps", "0.002", "--checkpoint-frames", "200",
         "--equilibrate-ps", "0", "-o", str(out), "--no-progress"],
        stderr=subprocess.PIPE, text=True)
    chk = tmp_path / "run.h5.chk.npz"
    deadline = time.monotonic() + 300  # a busy machine may take long to get there
    while not chk.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not chk.exists():
        proc.kill()
        pytest.fail(f"no checkpoint within 300 s: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: ") and "--resume" in err
    assert chk.exists() and (tmp_path / "run.h5.partial").exists() and not out.exists()


def test_a_ctrl_c_python_swallowed_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """A SIGINT handled while Python runs a finaliser raises there, and Python prints
    "Exception ignored" and goes on: the Ctrl-C test above once waited 60 s for a run that went
    on. Emulated: the signal arrives, right after a checkpoint, inside a block that swallows the
    exception. The run stops at its next frame with the usual message, its checkpoint kept."""
    import os
    import signal
    import time

    import datagen.openmm_md as openmm_md
    from datagen.cli import main

    save = openmm_md._save_checkpoint

    def swallowing(*args, **kwargs):
        save(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here and raises into this block
        except KeyboardInterrupt:
            pass

    monkeypatch.setattr(openmm_md, "_save_checkpoint", swallowing)
    out = tmp_path / "run.h5"
    assert main(["openmm", "--system", "alanine-dipeptide", "--frames", "600", "--interval-ps",
                 "0.002", "--checkpoint-frames", "200", "--equilibrate-ps", "0", "-o", str(out),
                 "--no-progress"]) == 130
    assert "interrupted: " in capsys.readouterr().err
    assert (tmp_path / "run.h5.chk.npz").exists() and not out.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_swallowed_ctrl_c_prints_no_traceback_and_other_finaliser_errors_still_do(
        monkeypatch):
    """Python prints "Exception ignored ... Traceback" for a KeyboardInterrupt raised in a
    finaliser (the Ctrl-C test above once failed on that text); inside the CLI's block it is
    remembered and raised at the next frame instead, and other such errors reach the hook that
    was there before (Python's printer; here a recorder)."""
    import gc
    import sys

    from datagen.interrupts import catching_interrupts, raise_if_interrupted

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))
    hook = sys.unraisablehook
    with catching_interrupts():
        Raises(KeyboardInterrupt())  # dropped at once: its finaliser raises
        gc.collect()
        assert seen == []
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
        Raises(ValueError("kept"))
        gc.collect()
        assert seen == [ValueError]
    assert sys.unraisablehook is hook
    Raises(KeyboardInterrupt())  # outside the block: Python's handling, unchanged
    gc.collect()
    assert seen == [ValueError, KeyboardInterrupt]


@pytest.mark.parametrize("equilibrate_ps, when", [(None, "during the equilibration"),
                                                  (0.0, r"at frame \d+ \(t = ")])
def test_a_run_that_blows_up_says_the_time_step_is_too_long(tmp_path, equilibrate_ps, when):
    """Unconstrained ethanol at 5 fs (3 fs without equilibration) blows up: that was a
    LinAlgError traceback from removing the rotation of NaN velocities, or 'positions contain
    NaN: remove or repair those frames' about the output file. Now an EngineError that names
    the time step and the fixes."""
    from surrogate_md.errors import EngineError

    step_fs = 5.0 if equilibrate_ps is None else 3.0
    with pytest.raises(EngineError, match=f"ethanol: the simulation blew up {when}.*"
                                          f"{step_fs:g} fs time step is too long.*--step-fs.*"
                                          "--constraints HBonds"):
        run_openmm("ethanol", tmp_path / "o.h5", frames=300, step_fs=step_fs,
                   equilibrate_ps=equilibrate_ps, progress=False)
    assert not (tmp_path / "o.h5").exists()
