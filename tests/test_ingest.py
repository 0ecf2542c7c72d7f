"""Ingest: MD17 npz, MDAnalysis (AdK PSF/DCD, TPR/XTC), ASE trajectories, and bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from _datagen_fixtures import md17_npz

from datagen.cli import main
from datagen.ingest import MD17_INTERVAL_PS, ingest
from surrogate_md.data.h5md import open_trajectory
from surrogate_md.errors import DataError

mda = pytest.importorskip("MDAnalysis")
datafiles = pytest.importorskip("MDAnalysisTests.datafiles")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("flavour", ["md17", "rmd17"])
def test_md17_npz_units_time_bonds(tmp_path, flavour):
    # rMD17 frames carry their MD17 index: consecutive ones are a 0.5 fs time series
    src = md17_npz(tmp_path / f"{flavour}.npz", flavour=flavour,
                   old_indices=np.arange(40) if flavour == "rmd17" else None)
    out = ingest(src, tmp_path / "out.h5")
    with open_trajectory(src.with_suffix(".src.h5")) as ref, open_trajectory(out) as f:
        assert f.n_frames == 40 and f.n_atoms == 9
        assert f.interval_ps == MD17_INTERVAL_PS
        np.testing.assert_allclose(np.diff(f.time_ps), MD17_INTERVAL_PS)
        np.testing.assert_allclose(f.read(slice(None)), ref.read(slice(None)), atol=1e-4)
        # kcal/mol -> kJ/mol round trip recovers OpenMM's own kJ/mol values
        np.testing.assert_allclose(f.potential_energy[()], ref.potential_energy[()], rtol=1e-6)
        np.testing.assert_allclose(f.read(slice(None), "forces"), ref.read(slice(None), "forces"),
                                   rtol=1e-4, atol=1e-3)
        # ethanol CCO: 8 bonds (C-C, C-O, O-H, 5 C-H), same as the force field's
        assert len(f.topology.bonds) == 8 == len(ref.topology.bonds)
        assert f.metadata["engine"] == flavour


def test_rmd17_old_indices_restore_time_order_or_are_refused(tmp_path):
    """rMD17 frames carry their MD17 index: evenly spaced ones are put back in time order
    (spacing x 0.5 fs); a random sample of the trajectory, which is what rMD17 distributes, is
    refused as not a time series, and nothing is written."""
    src = md17_npz(tmp_path / "even.npz", flavour="rmd17", old_indices=1000 + 10 * np.arange(40))
    out = ingest(src, tmp_path / "even.h5")
    with open_trajectory(src.with_suffix(".src.h5")) as ref, open_trajectory(out) as f:
        assert f.interval_ps == pytest.approx(10 * MD17_INTERVAL_PS)
        np.testing.assert_allclose(f.read(slice(None)), ref.read(slice(None)), atol=1e-4)
    sample = np.sort(np.random.default_rng(1).choice(100_000, 40, replace=False))
    src = md17_npz(tmp_path / "sample.npz", flavour="rmd17", old_indices=sample)
    with pytest.raises(DataError, match="not a time series.*original MD17"):
        ingest(src, tmp_path / "sample.h5")
    assert not (tmp_path / "sample.h5").exists()


def test_md17_selection_heavy_atoms_and_dt(tmp_path):
    src = md17_npz(tmp_path / "e.npz")
    out = ingest([src], tmp_path / "heavy.h5", select="not element H", dt_ps=0.001)
    with open_trajectory(out) as f:
        assert list(f.topology.atomic_numbers) == [6, 6, 8]
        assert f.interval_ps == 0.001
        assert f.time_ps[-1] == pytest.approx(39 * 0.001)


def test_adk_psf_dcd_round_trip_and_h5md_reader(tmp_path):
    out = ingest([datafiles.PSF, datafiles.DCD], tmp_path / "adk.h5")
    u = mda.Universe(datafiles.PSF, datafiles.DCD)
    ref = np.stack([u.atoms.positions.copy() for _ in u.trajectory])
    with open_trajectory(out) as f:
        assert (f.n_frames, f.n_atoms) == (98, 3341)
        np.testing.assert_allclose(f.read(slice(None)), ref, atol=1e-4)
        assert len(f.topology.bonds) == len(u.atoms.bonds)
        assert set(np.unique(f.topology.atomic_numbers)) == {1, 6, 7, 8, 16}
        np.testing.assert_allclose(f.time_ps, [ts.time for ts in u.trajectory], atol=1e-5)
    # our file is H5MD that MDAnalysis reads with the same topology
    u2 = mda.Universe(datafiles.PSF, str(out), format="H5MD")
    assert len(u2.trajectory) == 98
    for i in (0, 50, 97):
        u2.trajectory[i]
        np.testing.assert_allclose(u2.atoms.positions, ref[i], atol=1e-4)


def test_adk_tpr_xtc_protein_unwrapped_cli(tmp_path):
    out = tmp_path / "opls.h5"
    assert main(["ingest", datafiles.TPR, datafiles.XTC, "-o", str(out), "--select", "protein",
                 "--no-progress"]) == 0
    with open_trajectory(out) as f:
        assert (f.n_frames, f.n_atoms) == (10, 3341)
        assert f.box is not None and f.box.shape == (10, 3, 3)
        x = f.read(slice(None))
        b = f.topology.bonds
        lengths = np.linalg.norm(x[:, b[:, 0]] - x[:, b[:, 1]], axis=-1)
        assert lengths.max() < 2.0  # whole molecule in every frame, no bond across the box
        assert f.metadata["made_whole"] is True
        np.testing.assert_allclose(np.diff(f.time_ps), 100.0, rtol=1e-6)


def test_mdanalysis_selection_backbone_concatenation(tmp_path):
    # the same file twice: its clock restarts, so the files' times alone are refused ...
    with pytest.raises(DataError, match=r"adk_dims.dcd: frame 0 is at t = 1 ps.*time order"):
        ingest([datafiles.PSF, datafiles.DCD, datafiles.DCD], tmp_path / "bb.h5",
               select="name CA")
    assert list(tmp_path.iterdir()) == []
    # ... and accepted when the user gives the interval (and so vouches for the order)
    out = ingest([datafiles.PSF, datafiles.DCD, datafiles.DCD], tmp_path / "bb.h5",
                 select="name CA", dt_ps=1.0)
    with open_trajectory(out) as f:
        assert (f.n_frames, f.n_atoms) == (196, 214)
        assert set(f.topology.atom_names) == {"CA"}
        t0 = mda.Universe(datafiles.PSF, datafiles.DCD).trajectory[0].time
        np.testing.assert_allclose(f.time_ps, t0 + np.arange(196) * 1.0)
        assert f.metadata["interval_source"] == "user"


def test_inferred_bonds_are_the_protein_topology_and_scale_to_solvated_systems():
    """The covalent-radii rule on AdK's first frame gives exactly the PSF's 3365 bonds; on the
    47 681-atom solvated AdK (GRO, no bonds) it runs on a k-d tree in bounded memory (a dense
    pair search would need tens of GiB)."""
    mda = pytest.importorskip("MDAnalysis")
    from ase.data import atomic_numbers
    from MDAnalysisTests.datafiles import DCD, GRO, PSF

    from datagen.atoms import infer_bonds

    u = mda.Universe(PSF, DCD)
    z = np.array([atomic_numbers[name[0]] for name in u.atoms.names])
    ref = np.sort(u.bonds.indices, axis=1)
    ref = ref[np.lexsort((ref[:, 1], ref[:, 0]))]
    np.testing.assert_array_equal(infer_bonds(z, u.atoms.positions.astype(float)), ref)
    solvated = mda.Universe(GRO)
    # TIP4P: OW, HW1, HW2 and the massless site MW (Z = 0)
    z = np.array([0 if name == "MW" else atomic_numbers[name[:2].capitalize()]
                  if name[:2] in ("CL", "NA") else atomic_numbers[name[0]]
                  for name in solvated.atoms.names])
    bonds = infer_bonds(z, solvated.atoms.positions.astype(float))
    water_o = solvated.select_atoms("resname SOL and name OW").indices
    real = bonds[(z[bonds] > 0).all(axis=1)]
    partners = np.bincount(real[np.isin(real, water_o)], minlength=solvated.atoms.n_atoms)
    # every water has its O-H, O-H (a few of the 11 084 also touch a close neighbour's H)
    assert len(water_o) > 10_000 and np.all(partners[water_o] >= 2)
    assert np.mean(partners[water_o] == 2) > 0.99


def test_npt_triclinic_water_stays_whole(tmp_path):
    # CHARMM TIP3P in a triclinic NPT box: NoJump after make-whole broke molecules from frame 5
    out = ingest([datafiles.PSF_TRICLINIC, datafiles.DCD_TRICLINIC], tmp_path / "w.h5")
    with open_trajectory(out) as f:
        assert f.n_frames == 10 and f.metadata["made_whole"] is True
        x = f.read(slice(None))
        b = f.topology.bonds
        lengths = np.linalg.norm(x[:, b[:, 0]] - x[:, b[:, 1]], axis=-1)
        assert lengths.max() < 2.0  # O-H 0.96 Å, TIP3P H-H 1.51 Å, in every frame


def test_trr_with_velocities_on_some_frames(tmp_path, caplog):
    # GROMACS with nstvout = 2 * nstxout: velocities on every second frame only
    u = mda.Universe(datafiles.PDB_multiframe)
    n = u.atoms.n_atoms
    rng = np.random.default_rng(0)
    forces = rng.normal(size=(4, n, 3)).astype(np.float32)
    trr = tmp_path / "mixed.trr"
    with mda.Writer(str(trr), n_atoms=n) as w:
        for i in range(4):
            ts = u.trajectory[i]
            ts.time = 0.1 * i
            ts.has_velocities = i % 2 == 0
            if ts.has_velocities:
                ts.velocities = rng.normal(size=(n, 3)).astype(np.float32)
            ts.has_forces = True
            ts.forces = forces[i]
            w.write(u.atoms)
    with caplog.at_level("WARNING", logger="datagen.ingest"):
        out = ingest([datafiles.PDB_multiframe, trr], tmp_path / "m.h5")
    assert re.search(r"velocities are missing on 2 of 4 frames \(\S*mixed.trr frame 1, "
                     r"\S*mixed.trr frame 3\)", caplog.text)
    with open_trajectory(out) as f:
        assert f.n_frames == 4 and f.velocities is None
        np.testing.assert_allclose(f.time_ps, 0.1 * np.arange(4), atol=1e-6)
        np.testing.assert_allclose(f.read(slice(None), "forces"), forces, rtol=1e-5, atol=1e-5)
        assert f.metadata["velocities_missing_frames"] == 2
    assert sorted(p.name for p in tmp_path.glob("m.h5*")) == ["m.h5"]


def test_topology_without_coordinates_needs_a_trajectory(tmp_path, capsys):
    out = tmp_path / "adk.h5"
    with pytest.raises(DataError, match=r"adk.psf: this topology holds no coordinates and no "
                                        r"trajectory was given; give the trajectory files"):
        ingest(datafiles.PSF, out)
    assert main(["ingest", datafiles.PSF, "-o", str(out)]) != 0
    assert "adk.psf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ase_traj_velocities_converted(tmp_path):
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.io import Trajectory
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from datagen.ingest import ase_velocity_to_A_per_ps

    rng = np.random.default_rng(0)
    atoms = molecule("CH4")
    atoms.calc = EMT()
    path = tmp_path / "m.traj"
    vel = []
    with Trajectory(str(path), "w") as traj:
        for _ in range(5):
            MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
            vel.append(atoms.get_velocities().copy())
            atoms.get_forces()  # computed results are what Trajectory stores
            traj.write(atoms)
    out = ingest(path, tmp_path / "m.h5", dt_ps=0.01)
    with open_trajectory(out) as f:
        assert f.n_frames == 5
        np.testing.assert_allclose(f.read(slice(None), "velocities"),
                                   np.array(vel) * ase_velocity_to_A_per_ps(), rtol=1e-5)
        # thermal C/H speeds at 300 K are a few Å/ps
        assert 1.0 < np.linalg.norm(f.read(slice(None), "velocities"), axis=-1).mean() < 50.0
        assert f.forces is not None


# MDAnalysis' DCDReader.__del__ trips over the garbage file it refused to open (not our code)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bad_inputs_raise_data_error_and_leave_nothing(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(DataError, match="no such file"):
        ingest(tmp_path / "missing.npz", out)
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    with pytest.raises(DataError, match="expected keys"):
        ingest(tmp_path / "bad.npz", out)
    garbage = tmp_path / "junk.dcd"
    garbage.write_bytes(b"not a trajectory at all")
    with pytest.raises(DataError, match="unreadable|mismatch"):
        ingest([datafiles.PSF, garbage], out)
    with pytest.raises(DataError, match="mismatch"):
        ingest([datafiles.PSF, datafiles.XTC], out)
    with pytest.raises(DataError, match="matches no atom"):
        ingest([datafiles.PSF, datafiles.DCD], out, select="name XYZ")
    with pytest.raises(DataError, match="positive"):
        ingest([datafiles.PSF, datafiles.DCD], out, dt_ps=0.0)
    nan = np.zeros((3, 2, 3))
    nan[1, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", R=nan, z=np.array([1, 1]))
    with pytest.raises(DataError, match="NaN"):
        ingest(tmp_path / "nan.npz", out)
    assert list(tmp_path.glob("x.h5*")) == []


def test_cli_error_is_one_line_nonzero(tmp_path, capsys):
    code = main(["ingest", str(tmp_path / "nope.npz"), "-o", str(tmp_path / "o.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "nope.npz" in err[0]


def test_python_m_datagen_help():
    proc = subprocess.run([sys.executable, "-m", "datagen", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for word in ("ingest", "openmm", "ase"):
        assert word in proc.stdout


def test_chained_ase_runs_and_frames_without_calculator_results(tmp_path, caplog):
    # a continued ASE run writes its start frame again: ingest keeps one of the two, so the
    # time axis stays true; frames that lack forces leave forces out instead of crashing
    import logging

    from ase import units
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.io import Trajectory, write
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    a = molecule("CH3CH2OH")
    a.calc = EMT()
    MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(0))
    paths = []
    for k in range(2):
        path = tmp_path / f"md{k}.traj"
        with Trajectory(str(path), "w", a) as traj:
            dyn = VelocityVerlet(a, timestep=0.5 * units.fs)
            dyn.attach(traj.write, interval=4)
            dyn.run(40)
        paths.append(path)
    out = ingest(paths, tmp_path / "chain.h5", dt_ps=0.002, progress=False)
    with open_trajectory(out) as f:
        x = f.read(slice(None))
        assert f.n_frames == 21 and f.metadata["dropped_duplicate_frames"] == 1
        assert np.abs(np.diff(x, axis=0)).reshape(20, -1).max(1).min() > 0
        assert f.forces is not None
    frames = [Trajectory(str(paths[0]))[i] for i in range(3)]
    frames[1].calc = None  # one frame written without calculator results
    write(str(tmp_path / "mixed.extxyz"), frames)
    with caplog.at_level(logging.WARNING):
        out = ingest([tmp_path / "mixed.extxyz"], tmp_path / "mixed.h5", dt_ps=0.002,
                     progress=False)
    assert "not every frame carries calculator forces" in caplog.text
    with open_trajectory(out) as f:
        assert f.n_frames == 3 and f.forces is None


def test_ase_ingest_streams_its_frames(tmp_path, monkeypatch):
    """ASE trajectories are read a block of frames at a time (two passes of ase.io.iread), not
    all at once: with 16-frame blocks the ingest of 1000 frames of 200 atoms (14.4 MB of
    positions, momenta and forces) allocates about 4 MB at most; reading every frame into a
    list, as before, held all of them (and their calculators' copies) at once: 32 MB."""
    import tracemalloc

    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import Trajectory

    import datagen.ingest as ingest_module

    rng = np.random.default_rng(0)
    n_atoms, n_frames = 200, 1000
    grid = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    base = 3.0 * grid[:n_atoms]  # argon 3 A apart: no bonds to infer
    path = tmp_path / "argon.traj"
    with Trajectory(str(path), "w") as traj:
        for i in range(n_frames):
            a = Atoms(f"Ar{n_atoms}", positions=base + 0.01 * rng.standard_normal((n_atoms, 3)))
            a.set_momenta(rng.standard_normal((n_atoms, 3)))
            a.calc = SinglePointCalculator(a, energy=float(i),
                                           forces=rng.standard_normal((n_atoms, 3)))
            traj.write(a)
    ingest([path], tmp_path / "warm.h5", dt_ps=0.001, progress=False)  # imports, caches
    monkeypatch.setattr(ingest_module, "BLOCK_FRAMES", 16)
    tracemalloc.start()
    try:
        out = ingest([path], tmp_path / "argon.h5", dt_ps=0.001, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    data_bytes = 3 * n_frames * n_atoms * 3 * 8
    assert peak < 0.5 * data_bytes, (peak, data_bytes)
    with open_trajectory(out) as f:
        assert f.n_frames == n_frames and f.forces is not None
        with Trajectory(str(path)) as traj:
            np.testing.assert_allclose(f.read(slice(n_frames - 1, None))[0],
                                       traj[n_frames - 1].positions, atol=1e-4)


def test_topologies_without_names_or_residues(tmp_path):
    # LAMMPS data files carry types, not names, and no residue names
    from MDAnalysisTests.datafiles import LAMMPSdata2, LAMMPSdcd2

    out = ingest([LAMMPSdata2, LAMMPSdcd2], tmp_path / "lammps.h5", progress=False)
    with open_trajectory(out) as f:
        assert f.n_frames == 5 and all(len(n) > 0 for n in f.topology.atom_names)
        assert set(f.topology.residue_names) == {"UNK"}


def test_ase_molecule_names_beyond_g2():
    from datagen.ase_md import load_atoms

    assert len(load_atoms("biphenyl")) == 22


def test_mass_repartitioned_topology_keeps_its_elements(tmp_path):
    # with hydrogen mass repartitioning (H 3 amu, heavy atoms lighter) masses no longer tell
    # elements apart; a PSF carries no element column, so names decide
    import MDAnalysis as mda
    from MDAnalysisTests.datafiles import DCD, PSF

    u = mda.Universe(PSF)
    masses = u.atoms.masses.copy()
    is_h = np.char.startswith(u.atoms.names.astype(str), "H")
    for a, b in u.bonds.indices:
        for h, x in ((a, b), (b, a)):
            if is_h[h] and not is_h[x]:
                masses[h] += 2.016
                masses[x] -= 2.016
    lines = open(PSF).read().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "!NATOM" in line) + 1
    for k, m in enumerate(masses):  # the mass column of each atom line, same width
        line = lines[start + k]
        old = line.split()[7]
        at = line.index(old, 50)
        lines[start + k] = line[:at] + f"{m:.4f}".rjust(len(old)) + line[at + len(old):]
    psf = tmp_path / "hmr.psf"
    psf.write_text("".join(lines))
    out = ingest([psf, DCD], tmp_path / "hmr.h5", progress=False)
    first = {"H": 1, "C": 6, "N": 7, "O": 8, "S": 16}
    expected = np.array([first[n[0]] for n in u.atoms.names.astype(str)])
    with open_trajectory(out) as f:
        np.testing.assert_array_equal(f.topology.atomic_numbers, expected)
        np.testing.assert_allclose(f.topology.masses, masses, rtol=1e-4)
