"""ASE data generation: EMT, Lennard-Jones, GFN2-xTB (when tblite is installed)."""

from __future__ import annotations

import numpy as np
import pytest
from _datagen_fixtures import Killed, kill_at

from datagen.ase_md import ase_ps, run_ase
from datagen.cli import main
from datagen.openmm_md import temperature_K
from surrogate_md.data.h5md import open_trajectory
from surrogate_md.errors import ConfigError, DataError

ase = pytest.importorskip("ase")


def test_ase_ps_is_a_picosecond():
    from ase import units

    assert ase_ps() == pytest.approx(1000.0 * units.fs)


def test_lj_argon_cluster_langevin_temperature(tmp_path):
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", 2, latticeconstant=5.4)
    out = run_ase(atoms, "lj", tmp_path / "ar.h5", frames=400, step_fs=5.0, interval_ps=0.05,
                  temperature_K=40.0, integrator="langevin", friction_per_ps=5.0, seed=0,
                  progress=False)
    with open_trajectory(out) as f:
        assert f.n_atoms == 13 and f.n_frames == 400
        np.testing.assert_allclose(f.time_ps, np.arange(400) * 0.05, atol=1e-12)
        temps = temperature_K(f.read(slice(None), "velocities"), f.topology.masses, 3 * 13)
        assert abs(temps[100:].mean() - 40.0) < 8.0


def test_emt_copper_cluster_nve_conserves_energy(tmp_path):
    from ase.cluster import Octahedron
    from openmm import unit

    atoms = Octahedron("Cu", 3)
    out = run_ase(atoms, "emt", tmp_path / "cu.h5", frames=50, step_fs=2.0, interval_ps=0.01,
                  temperature_K=300.0, integrator="verlet", progress=False)
    with open_trajectory(out) as f:
        v = f.read(slice(None), "velocities")
        m = f.topology.masses
        to_kj = (1.0 * unit.amu * unit.angstrom**2 / unit.picosecond**2).value_in_unit(
            unit.kilojoule_per_mole)
        kinetic = 0.5 * (m[None, :, None] * v**2).sum(axis=(1, 2)) * to_kj
        total = kinetic + f.potential_energy[()]
        # velocities (Å/ps) and energies (kJ/mol) in consistent units conserve the total energy
        assert np.ptp(total) < 0.02 * np.ptp(kinetic) + 1e-3
        p = (m[None, :, None] * v).sum(axis=1)
        assert np.abs(p).max() < 1e-3  # float32 storage; thermal momenta ~ 100 amu Å/ps


def test_bussi_keeps_momenta_zero_and_cli(tmp_path):
    out = tmp_path / "h2o.h5"
    assert main(["ase", "--molecule", "CH4", "--calculator", "emt", "--frames", "30",
                 "--temperature-K", "100", "-o", str(out), "--no-progress"]) == 0
    with open_trajectory(out) as f:
        assert f.metadata["integrator"] == "bussi" and f.metadata["method"] == "emt"
        v = f.read(slice(None), "velocities")
        p = (f.topology.masses[None, :, None] * v).sum(axis=1)
        assert np.abs(p).max() < 1e-3  # float32 storage; thermal momenta ~ 100 amu Å/ps


def test_bussi_gas_phase_cluster_is_at_target_temperature(tmp_path):
    """Bussi thermostats the 3N - 6 degrees of freedom left with zero linear/angular momentum."""
    from ase.calculators.emt import EMT
    from ase.cluster import Icosahedron
    from ase.optimize import BFGS

    atoms = Icosahedron("Cu", 2)
    atoms.calc = EMT()
    BFGS(atoms, logfile=None).run(fmax=0.01)  # no potential energy left to turn into heat
    # taut = 1 fs: each step draws a fresh canonical kinetic energy, so the mean is sharp
    # (seeds 0-5 read 294-305 K; ASE's 3N-dof target read 348-358 K, 300 K x 39/33)
    out = run_ase(atoms, "emt", tmp_path / "cu13.h5", frames=300, step_fs=2.0,
                  interval_ps=0.004, temperature_K=300.0, friction_per_ps=1000.0, seed=0,
                  progress=False)
    with open_trajectory(out) as f:
        temps = temperature_K(f.read(slice(None), "velocities"), f.topology.masses, 3 * 13 - 6)
        assert abs(temps.mean() - 300.0) < 20.0
        assert f.metadata["kinetic_dof"] == 3 * 13 - 6


def test_kinetic_dof_and_initial_temperature():
    from ase import Atoms, units
    from ase.build import bulk, molecule
    from ase.md import velocitydistribution as vd

    from datagen.ase_md import _remove_rigid_motion, kinetic_dof

    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution

    cases = [(molecule("CH3CH2OH"), "bussi", 3 * 9 - 6), (molecule("CO"), "verlet", 1),
             (molecule("CO2"), "bussi", 3), (molecule("CH4"), "langevin", 15),
             (bulk("Cu", cubic=True), "bussi", 3 * 4 - 3)]
    for atoms, integrator, dof in cases:
        assert kinetic_dof(atoms, integrator) == dof
        temps = []
        for seed in range(400):
            thermalize(atoms, temperature_K=300.0, rng=np.random.default_rng(seed))
            _remove_rigid_motion(atoms, dof)
            temps.append(2 * atoms.get_kinetic_energy() / (dof * units.kB))
        # mean of 400 draws of chi2(dof)/dof x 300 K: standard error 300 * sqrt(2 / (400 dof))
        assert abs(np.mean(temps) - 300.0) < 4 * 300.0 * np.sqrt(2.0 / (400 * dof)), atoms
        assert np.abs(atoms.get_momenta().sum(axis=0)).max() < 1e-9
    with pytest.raises(ConfigError, match="single atom"):
        kinetic_dof(Atoms("Ar"), "bussi")


def test_bad_ase_inputs(tmp_path):
    with pytest.raises(DataError, match="molecule name"):
        run_ase("NotAMolecule", "emt", tmp_path / "x.h5", frames=2)
    with pytest.raises(ConfigError, match="calculator"):
        run_ase("CH4", "nope", tmp_path / "x.h5", frames=2)
    with pytest.raises(ConfigError, match="multiple"):
        run_ase("CH4", "emt", tmp_path / "x.h5", frames=2, step_fs=1.0, interval_ps=0.0015)
    assert not list(tmp_path.iterdir())


def test_xtb_water(tmp_path):
    pytest.importorskip("tblite.ase")
    out = run_ase("H2O", "xtb", tmp_path / "w.h5", frames=20, temperature_K=300.0,
                  progress=False)
    with open_trajectory(out) as f:
        assert f.n_atoms == 3 and f.metadata["method"] == "xtb"
        x = f.read(slice(None))
        oh = np.linalg.norm(x[:, 1] - x[:, 0], axis=-1)
        assert 0.85 < oh.mean() < 1.1  # GFN2-xTB O-H bond length in Å


def _assert_same_frames(ref, out, frames, interval_ps):
    import h5py

    from surrogate_md.data.h5md import PARTICLE_GROUP

    with h5py.File(out, "r") as f:
        steps = f[f"particles/{PARTICLE_GROUP}/position/step"][()]
    with open_trajectory(ref) as a, open_trajectory(out) as b:
        assert b.n_frames == frames
        np.testing.assert_array_equal(b.time_ps, np.arange(frames) * interval_ps)
        np.testing.assert_array_equal(steps, np.arange(frames) * b.metadata["steps_per_frame"])
        for name in ("positions", "velocities", "forces"):
            np.testing.assert_array_equal(b.read(slice(None), name), a.read(slice(None), name))
        np.testing.assert_array_equal(b.potential_energy[()], a.potential_energy[()])


@pytest.mark.parametrize("integrator", ["verlet", "langevin", "bussi"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, integrator):
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", 2, latticeconstant=5.4)
    kwargs = dict(frames=60, step_fs=5.0, interval_ps=0.01, temperature_K=40.0, seed=3,
                  integrator=integrator, friction_per_ps=5.0, checkpoint_frames=20,
                  progress=False)
    ref = run_ase(atoms, "lj", tmp_path / "ref.h5", **kwargs)
    out = tmp_path / "run.h5"
    with pytest.raises(Killed):  # dies after the checkpoint at 40 frames, 5 frames later
        run_ase(atoms, "lj", out, frame_callback=kill_at(45), **kwargs)
    assert not out.exists() and (tmp_path / "run.h5.partial").exists()
    assert (tmp_path / "run.h5.chk.npz").exists()
    seen = []
    run_ase(atoms, "lj", out, resume=True, frame_callback=seen.append, **kwargs)
    assert seen == list(range(40, 60))  # continues after the last checkpoint, nothing redone
    assert not (tmp_path / "run.h5.partial").exists()
    assert not (tmp_path / "run.h5.chk.npz").exists()
    _assert_same_frames(ref, out, 60, 0.01)
    # resuming a finished run leaves it alone
    assert run_ase(atoms, "lj", out, resume=True, **kwargs) == out


def test_resume_with_other_settings_is_refused(tmp_path):
    kwargs = dict(frames=30, checkpoint_frames=10, progress=False, integrator="langevin")
    with pytest.raises(Killed):
        run_ase("CH4", "emt", tmp_path / "r.h5", frame_callback=kill_at(15), **kwargs)
    with pytest.raises(ConfigError, match="different settings"):
        run_ase("CH4", "emt", tmp_path / "r.h5", resume=True, temperature_K=350.0, **kwargs)
    with pytest.raises(ConfigError, match="different settings"):
        run_ase("CH4", "emt", tmp_path / "r.h5", resume=True, seed=1, **kwargs)
    assert (tmp_path / "r.h5.partial").exists() and (tmp_path / "r.h5.chk.npz").exists()


def test_cli_resume_after_sigkill(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["ase", "--molecule", "CH3CH2OH", "--calculator", "emt", "--integrator", "langevin",
            "--frames", "400", "--interval-ps", "0.001", "--step-fs", "0.5", "--seed", "7",
            "--checkpoint-frames", "20", "--no-progress"]
    out = tmp_path / "run.h5"
    chk = tmp_path / "run.h5.chk.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "datagen", *args, "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not chk.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chk.exists(), "the run wrote no checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert main([*args, "-o", str(out), "--resume"]) == 0
    assert not chk.exists()
    ref = tmp_path / "ref.h5"
    assert main([*args, "-o", str(ref)]) == 0
    _assert_same_frames(ref, out, 400, 0.001)
