"""ASE data generation: EMT, Lennard-Jones, GFN2-xTB (when tblite is installed)."""

from __future__ import annotations

import numpy as np
import pytest

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
