"""OpenMM data generation: built-in systems, units, thermostats, resume, CLI, replicas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datagen.cli import main
from datagen.openmm_md import prepare_system, run_openmm, temperature_K
from datagen.systems import BUILTIN_SYSTEMS, MD17_MOLECULES
from surrogate_md.data.h5md import open_trajectory
from surrogate_md.errors import ConfigError, DataError

openmm = pytest.importorskip("openmm")


def _momenta(f):
    x, v, m = f.read(slice(None)), f.read(slice(None), "velocities"), f.topology.masses
    p = (m[None, :, None] * v).sum(axis=1)
    com = (m[None, :, None] * x).sum(axis=1, keepdims=True) / m.sum()
    angular = (m[None, :, None] * np.cross(x - com, v)).sum(axis=1)
    return p, angular


def test_alanine_dipeptide_2000_frames(tmp_path):
    out = run_openmm("alanine-dipeptide", tmp_path / "ala2.h5", frames=2000, equilibrate_ps=2.0,
                     seed=1, progress=False)
    with open_trajectory(out) as f:
        assert (f.n_frames, f.n_atoms) == (2000, 22)
        assert f.interval_ps == 0.1
        np.testing.assert_allclose(f.time_ps, np.arange(2000) * 0.1, rtol=0, atol=1e-9)
        m = f.metadata
        assert (m["engine"], m["integrator"], m["solvent"]) == ("openmm", "nose-hoover", "vacuum")
        assert m["force_field"] == "amber14-all.xml" and m["step_fs"] == 2.0
        temps = temperature_K(f.read(slice(None), "velocities"), f.topology.masses,
                              m["kinetic_dof"])
        assert abs(temps.mean() - 300.0) < 20.0
        p, angular = _momenta(f)
        assert np.abs(p).max() < 1e-2  # amu Å/ps; thermal momenta are ~100
        # positions in Å: C-H bonds (constrained) at 1.09 Å
        x = f.read([0])[0]
        names = list(f.topology.atom_names)
        d = np.linalg.norm(x[names.index("CA")] - x[names.index("HA")])
        assert d == pytest.approx(1.09, abs=0.02)
        # forces stored (their kJ/mol/Å values against OpenMM's own: test_reference_values)
        assert np.isfinite(f.read([0], "forces")).all()
        assert f.topology.bonds.shape == (21, 2)


@pytest.mark.parametrize("name", ["aspirin"])
def test_md17_molecule_2000_frames_gas_phase(tmp_path, name):
    out = run_openmm(name, tmp_path / f"{name}.h5", frames=2000, seed=2, progress=False)
    with open_trajectory(out) as f:
        assert f.n_atoms == 21 and f.n_frames == 2000
        assert f.interval_ps == 0.0005 and f.metadata["step_fs"] == 0.5
        assert f.metadata["charge_method"] in ("AM1-BCC", "Gasteiger")
        assert f.metadata["temperature_K"] == 500.0
        temps = temperature_K(f.read(slice(None), "velocities"), f.topology.masses,
                              f.metadata["kinetic_dof"])
        assert 400.0 < temps.mean() < 600.0
        p, angular = _momenta(f)
        assert np.abs(p).max() < 1e-2 and np.abs(angular).max() < 1e-1


def test_every_builtin_md17_file_is_shipped():
    for name in MD17_MOLECULES:
        for path in BUILTIN_SYSTEMS[name].paths():
            assert path.is_file(), path


def test_implicit_solvent_uses_native_gbsaobc(tmp_path):
    prepared = prepare_system("alanine-dipeptide", solvent="implicit")
    kinds = {type(f).__name__ for f in prepared.system.getForces()}
    assert "GBSAOBCForce" in kinds and "CustomGBForce" not in kinds
    out = run_openmm("alanine-dipeptide", tmp_path / "imp.h5", solvent="implicit", frames=20,
                     equilibrate_ps=0.1, progress=False)
    with open_trajectory(out) as f:
        assert f.metadata["integrator"] == "langevin" and f.metadata["solvent"] == "implicit"
        vac = run_openmm("alanine-dipeptide", tmp_path / "vac.h5", frames=1, equilibrate_ps=0,
                         minimize=False, progress=False)
        with open_trajectory(vac) as g:
            # solvation lowers the energy of a polar peptide
            assert f.potential_energy[0] < g.potential_energy[0]


def test_cutoff_for_implicit_solvent(tmp_path):
    mm = openmm
    exact = prepare_system("alanine-dipeptide", solvent="implicit")
    cut = prepare_system("alanine-dipeptide", solvent="implicit", cutoff_nm=0.6)
    methods = {type(f).__name__: f.getNonbondedMethod() for f in cut.system.getForces()
               if isinstance(f, mm.NonbondedForce | mm.GBSAOBCForce)}
    assert methods == {"NonbondedForce": mm.NonbondedForce.CutoffNonPeriodic,
                       "GBSAOBCForce": mm.GBSAOBCForce.CutoffNonPeriodic}

    assert all(f.getReactionFieldDielectric() == 1.0 for f in cut.system.getForces()
               if isinstance(f, mm.NonbondedForce))

    def forces(prepared):
        ctx = mm.Context(prepared.system, mm.VerletIntegrator(0.001),
                         mm.Platform.getPlatformByName("Reference"))
        ctx.setPositions(exact.positions)
        return ctx.getState(getForces=True).getForces(asNumpy=True)._value

    # beyond 0.6 nm the reaction field (dielectric 1, GB does the screening) replaces the exact
    # sums: forces stay within ~1 kJ/mol/nm (a solvent dielectric of 78 there would be 37 off)
    f_exact, f_cut = forces(exact), forces(cut)
    rms = np.sqrt(((f_exact - f_cut) ** 2).sum(-1).mean())
    assert 0.01 < rms < 3.0
    # custom GB forces carry their cutoff in their energy expression: refused, with the fix named
    custom = prepare_system("alanine-dipeptide", solvent="implicit",
                            forcefield=["amber14-all.xml", "implicit/obc2.xml"])
    assert any(isinstance(f, mm.CustomGBForce) for f in custom.system.getForces())
    from datagen.openmm_md import apply_cutoff

    with pytest.raises(ConfigError, match="CustomGBForce.*createSystem"):
        apply_cutoff(custom.system, 1.0)
    kwargs = dict(solvent="implicit", frames=6, equilibrate_ps=0.0, checkpoint_frames=2,
                  progress=False)

    def stop(i):
        if i == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_openmm("alanine-dipeptide", tmp_path / "cut.h5", cutoff_nm=0.6, frame_callback=stop,
                   **kwargs)
    # resuming with another cutoff is refused (it is a different system); the same one resumes
    with pytest.raises(ConfigError, match="cutoff_nm"):
        run_openmm("alanine-dipeptide", tmp_path / "cut.h5", cutoff_nm=0.9, resume=True,
                   **kwargs)
    out = run_openmm("alanine-dipeptide", tmp_path / "cut.h5", cutoff_nm=0.6, resume=True,
                     **kwargs)
    with open_trajectory(out) as f:
        assert f.metadata["cutoff_nm"] == 0.6 and f.n_frames == 6
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="cutoff_nm"):
            prepare_system("alanine-dipeptide", solvent="implicit", cutoff_nm=bad)


def test_adk_builtin_runs_a_few_steps(tmp_path):
    out = run_openmm("adk", tmp_path / "adk.h5", frames=2, interval_ps=0.002, minimize=False,
                     equilibrate_ps=0.0, platform="CPU", progress=False)
    with open_trajectory(out) as f:
        assert f.n_atoms == 3341 and f.metadata["solvent"] == "implicit"
        assert np.isfinite(f.read(slice(None))).all()
        assert f.box is None  # adk.pdb's CRYST1 is no box of a non-periodic run
    with pytest.raises(ConfigError, match="holds no water"):  # a box alone is a periodic vacuum
        prepare_system("adk", solvent="explicit")


def test_a_crystal_cell_does_not_make_a_gas_phase_run_periodic(tmp_path):
    src = (BUILTIN_SYSTEMS["alanine-dipeptide"].paths()[0]).read_text()
    pdb = tmp_path / "cryst.pdb"
    pdb.write_text("CRYST1   30.000   30.000   30.000  90.00  90.00  90.00 P 1           1\n"
                   + src)
    out = {}
    for name, path in (("plain", BUILTIN_SYSTEMS["alanine-dipeptide"].paths()[0]),
                       ("cryst", pdb)):
        out[name] = run_openmm(str(path), tmp_path / f"{name}.h5", solvent="vacuum", frames=3,
                               interval_ps=0.01, equilibrate_ps=0.01, platform="Reference",
                               progress=False)
    with open_trajectory(out["plain"]) as a, open_trajectory(out["cryst"]) as b:
        for f in (a, b):
            assert f.box is None and f.metadata["integrator"] == "nose-hoover"
        assert a.metadata["kinetic_dof"] == b.metadata["kinetic_dof"]


def test_gas_phase_langevin_counts_rotation(tmp_path):
    # Nose-Hoover keeps a gas-phase molecule's zeroed angular momentum at zero; Langevin's
    # random forces do not, so its kinetic temperature counts the 3 rotational dof
    dof = {}
    for integrator in ("nose-hoover", "langevin"):
        out = run_openmm("alanine-dipeptide", tmp_path / f"{integrator}.h5", frames=2,
                         interval_ps=0.01, equilibrate_ps=0.0, integrator=integrator,
                         platform="Reference", progress=False)
        with open_trajectory(out) as f:
            dof[integrator] = f.metadata["kinetic_dof"]
    assert dof["langevin"] == dof["nose-hoover"] + 3


def test_force_field_files_with_their_own_solvent():
    import openmm as mm

    gb = (mm.GBSAOBCForce, mm.CustomGBForce)
    # implicit/obc2.xml already brings GB: implicit solvent adds no second one
    p = prepare_system("alanine-dipeptide", solvent="implicit",
                       forcefield=("amber14-all.xml", "implicit/obc2.xml"))
    assert sum(isinstance(f, gb) for f in p.system.getForces()) == 1
    assert p.force_field == "amber14-all.xml+implicit/obc2.xml"
    with pytest.raises(ConfigError, match="includes implicit solvent"):
        prepare_system("alanine-dipeptide", solvent="vacuum",
                       forcefield=("amber14-all.xml", "implicit/obc2.xml"))


def test_explicit_solvent_records_the_water_model(tmp_path):
    from openmm import app, unit

    src = BUILTIN_SYSTEMS["alanine-dipeptide"].paths()[0]
    pdb = app.PDBFile(str(src))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addSolvent(app.ForceField("amber14-all.xml", "amber14/tip3p.xml"),
                        boxSize=openmm.Vec3(2.0, 2.0, 2.0) * unit.nanometer)
    path = tmp_path / "solvated.pdb"
    with open(path, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    p = prepare_system(str(path), solvent="explicit")
    assert p.force_field == "amber14-all.xml+amber14/tip3p.xml"
    assert p.topology.getPeriodicBoxVectors() is not None


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    kwargs = dict(frames=300, equilibrate_ps=0.2, checkpoint_frames=100, seed=5, progress=False,
                  platform="Reference")
    ref = run_openmm("alanine-dipeptide", tmp_path / "ref.h5", **kwargs)

    class Killed(Exception):
        pass

    def kill_at_250(frame):
        if frame == 250:
            raise Killed

    out = tmp_path / "run.h5"
    with pytest.raises(Killed):
        run_openmm("alanine-dipeptide", out, frame_callback=kill_at_250, **kwargs)
    assert not out.exists() and (tmp_path / "run.h5.partial").exists()
    run_openmm("alanine-dipeptide", out, resume=True, **kwargs)
    assert not (tmp_path / "run.h5.partial").exists()
    assert not (tmp_path / "run.h5.chk.npz").exists()
    with open_trajectory(ref) as a, open_trajectory(out) as b:
        assert b.n_frames == 300
        np.testing.assert_allclose(np.diff(b.time_ps), 0.1, atol=1e-12)
        np.testing.assert_array_equal(b.read(slice(None)), a.read(slice(None)))


def test_resume_with_other_settings_is_refused(tmp_path):
    def stop(frame):
        if frame == 30:
            raise KeyboardInterrupt

    kwargs = dict(frames=50, equilibrate_ps=0.0, checkpoint_frames=10, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_openmm("alanine-dipeptide", tmp_path / "r.h5", frame_callback=stop, **kwargs)
    with pytest.raises(ConfigError, match="different settings"):
        run_openmm("alanine-dipeptide", tmp_path / "r.h5", resume=True, temperature_K=350,
                   **kwargs)
    # the same command again without --resume must not throw the 30 frames away unasked
    partial = tmp_path / "r.h5.partial"
    before = partial.read_bytes()
    with pytest.raises(DataError, match="unfinished run.*--resume.*--overwrite"):
        run_openmm("alanine-dipeptide", tmp_path / "r.h5", **kwargs)
    assert partial.read_bytes() == before and (tmp_path / "r.h5.chk.npz").exists()
    # fewer frames than the unfinished run holds cannot be resumed to
    with pytest.raises(ConfigError, match="already holds 30 frames"):
        run_openmm("alanine-dipeptide", tmp_path / "r.h5", resume=True,
                   **{**kwargs, "frames": 20})
    out = run_openmm("alanine-dipeptide", tmp_path / "r.h5", resume=True, **kwargs)
    # a complete file: resuming with its own settings is a no-op, with others an error
    assert run_openmm("alanine-dipeptide", out, resume=True, **kwargs) == out
    for change in ({"temperature_K": 350}, {"frames": 60}):
        with pytest.raises(ConfigError, match="complete with other settings"):
            run_openmm("alanine-dipeptide", out, resume=True, **{**kwargs, **change})
    with open_trajectory(out) as f:
        assert f.n_frames == 50


def test_overwrite_discards_an_unfinished_run(tmp_path):
    def stop(frame):
        if frame == 5:
            raise KeyboardInterrupt

    kwargs = dict(frames=10, equilibrate_ps=0.0, checkpoint_frames=2, progress=False, seed=3)
    with pytest.raises(KeyboardInterrupt):
        run_openmm("alanine-dipeptide", tmp_path / "r.h5", frame_callback=stop, **kwargs)
    assert (tmp_path / "r.h5.partial").exists()
    out = run_openmm("alanine-dipeptide", tmp_path / "r.h5", overwrite=True, **kwargs)
    ref = run_openmm("alanine-dipeptide", tmp_path / "ref.h5", **kwargs)
    with open_trajectory(out) as a, open_trajectory(ref) as b:  # started over from frame 0
        np.testing.assert_array_equal(a.read(slice(None)), b.read(slice(None)))
    assert not (tmp_path / "r.h5.partial").exists()


def test_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="multiple"):
        run_openmm("alanine-dipeptide", tmp_path / "a.h5", interval_ps=0.003, step_fs=2.0,
                   frames=2)
    with pytest.raises(ConfigError, match="built-in"):
        run_openmm("no-such-system", tmp_path / "a.h5", frames=2)
    run_openmm("alanine-dipeptide", tmp_path / "a.h5", frames=1, equilibrate_ps=0,
               progress=False)
    with pytest.raises(DataError, match="exists"):
        run_openmm("alanine-dipeptide", tmp_path / "a.h5", frames=1, equilibrate_ps=0)


def test_user_prmtop_and_system_xml(tmp_path):
    from openmm import XmlSerializer, app

    spec = BUILTIN_SYSTEMS["ethanol"]
    prmtop, inpcrd = spec.paths()
    out = run_openmm(prmtop, tmp_path / "eth.h5", coordinates=inpcrd, frames=5,
                     equilibrate_ps=0.0, progress=False)
    with open_trajectory(out) as f:
        assert f.n_atoms == 9 and f.metadata["integrator"] == "nose-hoover"
    prepared = prepare_system("alanine-dipeptide")
    xml = tmp_path / "sys.xml"
    xml.write_text(XmlSerializer.serialize(prepared.system))
    pdb = tmp_path / "ala.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(prepared.topology, prepared.positions, fh)
    out = run_openmm(xml, tmp_path / "xml.h5", coordinates=pdb, frames=3, equilibrate_ps=0.0,
                     progress=False)
    with open_trajectory(out) as f:
        assert f.n_atoms == 22
    with pytest.raises(ConfigError, match="needs a PDB"):
        run_openmm(xml, tmp_path / "x2.h5", frames=3)


def test_cli_openmm_and_replicas(tmp_path):
    out = tmp_path / "cli.h5"
    assert main(["openmm", "--system", "ethanol", "--frames", "50", "--equilibrate-ps", "0",
                 "--seed", "3", "-o", str(out), "--no-progress"]) == 0
    with open_trajectory(out) as f:
        assert f.n_frames == 50 and "python -m datagen openmm" in f.metadata["command"]
    base = tmp_path / "rep.h5"
    assert main(["openmm", "--system", "ethanol", "--frames", "20", "--equilibrate-ps", "0",
                 "--replicas", "2", "--workers", "2", "-o", str(base)]) == 0
    manifest = json.loads((tmp_path / "rep_manifest.json").read_text())
    assert [r["seed"] for r in manifest["replicas"]] == [0, 1]
    with open_trajectory(tmp_path / "rep_r000.h5") as a, \
            open_trajectory(tmp_path / "rep_r001.h5") as b:
        assert a.metadata["seed"] == 0 and b.metadata["seed"] == 1
        assert not np.allclose(a.read(slice(None), "velocities"),
                               b.read(slice(None), "velocities"))


def test_cli_bad_interval_exit_code(tmp_path, capsys):
    code = main(["openmm", "--system", "alanine-dipeptide", "--frames", "2", "--interval-ps",
                 "0.003", "-o", str(tmp_path / "o.h5")])
    assert code != 0 and "multiple" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _serialized(tmp_path, solvent="vacuum"):
    from openmm import XmlSerializer, app

    prepared = prepare_system("alanine-dipeptide", solvent=solvent)
    xml = tmp_path / f"{solvent}.xml"
    xml.write_text(XmlSerializer.serialize(prepared.system))
    pdb = tmp_path / "ala.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(prepared.topology, prepared.positions, fh)
    return xml, pdb, prepared.system


@pytest.mark.parametrize("setting", [{"hmr": True}, {"constraints": None},
                                     {"constraints": "AllBonds"}, {"solvent": "implicit"}])
def test_system_xml_refuses_settings_it_cannot_apply(tmp_path, setting):
    xml, pdb, _ = _serialized(tmp_path)
    with pytest.raises(ConfigError, match=r"vacuum\.xml: a serialized System already fixes"):
        run_openmm(xml, tmp_path / "x.h5", coordinates=pdb, frames=2, equilibrate_ps=0.0,
                   **setting)
    assert not list(tmp_path.glob("x.h5*"))


@pytest.mark.parametrize("case", ["xml forcefield", "pdb coordinates", "builtin coordinates",
                                  "md17 forcefield", "prmtop forcefield"])
def test_options_an_input_would_ignore_are_refused(tmp_path, case):
    """--forcefield and --coordinates where the input already fixes them: a clear error naming
    the input and the option, not a run that silently did something else."""
    import datagen

    xml, pdb, _ = _serialized(tmp_path)
    shipped = Path(datagen.__path__[0]) / "systems"
    prmtop = shipped / "md17" / "ethanol.prmtop"
    system, options, option = {
        "xml forcefield": (xml, {"coordinates": pdb, "forcefield": "amber14-all.xml"},
                           "--forcefield"),
        "pdb coordinates": (pdb, {"coordinates": pdb}, "--coordinates"),
        "builtin coordinates": ("alanine-dipeptide", {"coordinates": pdb}, "--coordinates"),
        "md17 forcefield": ("ethanol", {"forcefield": "amber14-all.xml"}, "--forcefield"),
        "prmtop forcefield": (prmtop, {"forcefield": "amber14-all.xml"}, "--forcefield"),
    }[case]
    with pytest.raises(ConfigError, match=f"{option} .*would be ignored"):
        run_openmm(system, tmp_path / "x.h5", frames=2, equilibrate_ps=0.0, **options)
    assert not list(tmp_path.glob("x.h5*"))


def test_cli_system_xml_with_hmr_is_a_user_error(tmp_path, capsys):
    xml, pdb, _ = _serialized(tmp_path)
    argv = ["openmm", "--system", str(xml), "--coordinates", str(pdb), "--frames", "2",
            "--equilibrate-ps", "0", "-o", str(tmp_path / "x.h5")]
    assert main([*argv, "--hmr"]) == 2
    err = capsys.readouterr().err
    assert str(xml) in err and "--hmr" in err and "re-create the System" in err


def test_system_xml_metadata_describes_the_system_as_serialized(tmp_path):
    xml, pdb, system = _serialized(tmp_path, "implicit")
    out = run_openmm(xml, tmp_path / "x.h5", coordinates=pdb, frames=2, equilibrate_ps=0.0,
                     progress=False)
    with open_trajectory(out) as f:
        m = f.metadata
        assert m["n_constraints"] == system.getNumConstraints() == 12  # the X-H bonds
        assert m["constraints"] == "as serialized" and m["hmr"] is False
        assert m["hydrogen_mass_amu"] == pytest.approx(1.008)
        assert m["step_fs"] == 2.0
        assert m["solvent"] == "implicit" and m["integrator"] == "langevin"
        h = f.topology.atomic_numbers == 1
        np.testing.assert_allclose(f.topology.masses[h], 1.008)


def test_hmr_metadata_records_the_simulated_hydrogen_mass(tmp_path):
    out = run_openmm("alanine-dipeptide", tmp_path / "h.h5", frames=1, equilibrate_ps=0.0,
                     hmr=True, progress=False)
    with open_trajectory(out) as f:
        m = f.metadata
        assert m["hmr"] is True and m["step_fs"] == 4.0
        assert m["hydrogen_mass_amu"] == pytest.approx(3.0) and m["n_constraints"] == 12
        np.testing.assert_allclose(f.topology.masses[f.topology.atomic_numbers == 1], 3.0)


def test_system_xml_with_unreadable_coordinates_names_the_file(tmp_path):
    xml, _, _ = _serialized(tmp_path)
    bad = tmp_path / "bad.pdb"
    bad.write_text("garbage\n")
    with pytest.raises(DataError, match=r"bad\.pdb: unreadable coordinates"):
        run_openmm(xml, tmp_path / "x.h5", coordinates=bad, frames=2, equilibrate_ps=0.0)


def test_chains_with_blank_or_repeated_ids_get_distinct_segment_ids():
    from openmm import app

    from datagen.openmm_md import chain_segment_ids

    top = app.Topology()
    for cid in (" ", " ", "A", "B", "B", "1"):
        top.addChain(cid)
    # "1" is a kept id and the index of a blank chain: every chain is numbered instead
    assert chain_segment_ids(top) == [str(k) for k in range(6)]
    top2 = app.Topology()
    for cid in (" ", "A", " "):
        top2.addChain(cid)
    assert chain_segment_ids(top2) == ["0", "A", "2"]


def test_openmm_help_states_each_systems_defaults(capsys):
    """``python -m datagen openmm --help`` lists the conditions a run gets without options,
    from the registry run_openmm reads them from."""
    with pytest.raises(SystemExit):
        main(["openmm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("alanine-dipeptide: 0.1 ps, 2 fs, 300 K, vacuum, nose-hoover, HBonds, 10 ps"
            in text)
    assert "adk: 1 ps, 2 fs, 300 K, implicit, langevin, HBonds, 10 ps" in text
    md17 = ", ".join(MD17_MOLECULES)
    assert f"{md17}: 0.0005 ps, 0.5 fs, 500 K, vacuum, nose-hoover, no constraints, 1 ps" in text
    assert "saved frames (default 1000)" in text


def test_gpu_runs_ask_for_mixed_precision_and_deterministic_forces():
    """The properties a CUDA/OpenCL data run gets (stood-in platforms: no GPU here) and none on
    CPU/Reference; only properties the platform lists are passed."""
    from datagen.openmm_md import _gpu_properties

    class Platform:
        def __init__(self, name, names):
            self.name, self.names = name, names

        def getName(self):
            return self.name

        def getPropertyNames(self):
            return self.names

    cuda = Platform("CUDA", ("DeviceIndex", "Precision", "DeterministicForces"))
    assert _gpu_properties(cuda) == {"Precision": "mixed", "DeterministicForces": "true"}
    assert _gpu_properties(Platform("OpenCL", ("DeviceIndex", "Precision"))) == {
        "Precision": "mixed"}
    for name in ("CPU", "Reference"):
        assert _gpu_properties(openmm.Platform.getPlatformByName(name)) == {}
