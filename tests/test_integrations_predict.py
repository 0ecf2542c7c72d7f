"""``python -m integrations.predict`` in-process, plus one ``--help`` subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import MDAnalysis as mda
import mdtraj
import numpy as np
import pytest
from _integration_fixtures import PDB, cached_md, make_checkpoint

from integrations.predict import main


def test_predict_writes_a_readable_xtc_with_provenance(tmp_path):
    ck = make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy", model="constant")
    out = tmp_path / "pred.xtc"
    argv = [str(ck), "--topology", str(PDB), "-n", "20", "-o", str(out), "--platform",
            "Reference", "--minimize", "--report-interval", "2"]
    assert main(argv) == 0
    prov = json.loads((tmp_path / "pred.json").read_text())
    jump = prov["surrogate"]["jump_ps"]
    assert prov["jumps"] == 20 and prov["guards"]["failures"] == {}
    assert prov["settle_iterations"] == 10  # the rebuilt hydrogens settle by default
    assert prov["surrogate"]["checkpoint_hash"]
    u = mda.Universe(str(PDB), str(out))
    assert len(u.trajectory) == 10
    np.testing.assert_allclose([ts.time for ts in u.trajectory],
                               np.arange(1, 11) * 2 * jump, atol=1e-4)
    t = mdtraj.load(str(out), top=str(PDB))
    assert t.n_frames == 10
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert len(rows) == 11
    assert all(np.isfinite(float(r.split(",")[2])) for r in rows[1:])
    assert not list(tmp_path.glob(".*partial*"))
    # a second run refuses to overwrite; a failing run leaves no file under the final name
    assert main(argv) == 1
    bad = tmp_path / "bad.xtc"
    ck = make_checkpoint(cached_md(), tmp_path / "linear.pt", selection="heavy")
    argv_hot = [str(ck), "--topology", str(PDB), "-n", "3", "-o", str(bad), "--platform",
                "Reference", "--temperature-K", "20000"]
    assert main(argv_hot) == 1
    assert not bad.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("end_velocities", ["difference", "thermal"])
def test_predict_end_velocities(tmp_path, end_velocities):
    # the constant model never moves an atom: difference velocities are zero, thermal ones are
    # drawn at --temperature-K, which the state-data CSV shows
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    out = tmp_path / "v.dcd"
    assert main([str(ck), "--topology", str(PDB), "-n", "30", "-o", str(out), "--platform",
                 "Reference", "--end-velocities", end_velocities, "--seed", "4"]) == 0
    rows = (tmp_path / "v.csv").read_text().splitlines()[1:]
    temperature = np.array([float(r.split(",")[-1]) for r in rows])
    assert len(temperature) == 30
    if end_velocities == "difference":
        assert np.all(temperature == 0.0)
    else:
        assert 200.0 < temperature.mean() < 400.0 and temperature.std() > 1.0
    assert json.loads((tmp_path / "v.json").read_text())["argv"]["end_velocities"] == \
        end_velocities


def test_predict_rejects_bad_inputs(tmp_path, capsys):
    ck = make_checkpoint(cached_md(), tmp_path / "a.pt")
    assert main([str(ck), "--topology", str(tmp_path / "missing.pdb"), "-n", "1", "-o",
                 str(tmp_path / "x.xtc")]) == 1
    assert "no such topology file" in capsys.readouterr().err
    assert main([str(ck), "--topology", str(PDB), "-n", "1", "-o", str(tmp_path / "x.nc")]) == 1
    assert ".xtc or .dcd" in capsys.readouterr().err
    # more jumps between frames than jumps: no frame would be written (an unreadable empty file)
    assert main([str(ck), "--topology", str(PDB), "-n", "2", "--report-interval", "3", "-o",
                 str(tmp_path / "x.xtc")]) == 1
    assert "no frame would be written" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


@pytest.mark.parametrize("module", ["integrations.predict"])
def test_help_runs_as_a_module(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--topology" in res.stdout


def _periodic_alanine(tmp_path, edge_nm: float, name: str):
    """Alanine dipeptide PDB with a cubic box of ``edge_nm`` (CRYST1)."""
    from openmm import Vec3, app, unit

    pdb = app.PDBFile(str(PDB))
    pdb.topology.setPeriodicBoxVectors([Vec3(edge_nm, 0, 0), Vec3(0, edge_nm, 0),
                                        Vec3(0, 0, edge_nm)] * unit.nanometer)
    path = tmp_path / name
    with open(path, "w") as fh:
        app.PDBFile.writeFile(pdb.topology, pdb.positions, fh)
    return path


def test_predict_runs_in_the_box_of_the_coordinates(tmp_path):
    """Coordinates equilibrated at constant pressure bring their own box: the run uses it."""
    from integrations.predict import load_system

    top = _periodic_alanine(tmp_path, 3.0, "top.pdb")
    npt = _periodic_alanine(tmp_path, 2.8, "npt.pdb")
    _, system, _, box = load_system(str(top), str(npt), ["amber14-all.xml"])
    assert system.usesPeriodicBoundaryConditions()
    assert box[0][0].value_in_unit(box[0][0].unit) * 10 == pytest.approx(28.0)
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", model="constant")
    out = tmp_path / "box.dcd"
    assert main([str(ck), "--topology", str(top), "--coordinates", str(npt), "-n", "2", "-o",
                 str(out), "--platform", "Reference"]) == 0
    u = mda.Universe(str(top), str(out))
    for _ in u.trajectory:
        np.testing.assert_allclose(u.dimensions[:3], 28.0, atol=1e-3)


TIP3P_TOP = """\
[ defaults ]
; nbfunc  comb-rule  gen-pairs  fudgeLJ  fudgeQQ
1         2          yes        0.5      0.8333

[ atomtypes ]
; name  at.num  mass     charge  ptype  sigma     epsilon
OW      8       15.9994  0.0     A      0.315061  0.636386
HW      1       1.008    0.0     A      0.0       0.0

[ moleculetype ]
SOL  2

[ atoms ]
1  OW  1  SOL  OW   1  -0.834  15.9994
2  HW  1  SOL  HW1  1   0.417   1.008
3  HW  1  SOL  HW2  1   0.417   1.008

[ bonds ]
1  2  1  0.09572  502416.0
1  3  1  0.09572  502416.0

[ angles ]
2  1  3  1  104.52  628.02

[ system ]
two waters

[ molecules ]
SOL  2
"""

TWO_WATERS_GRO = """\
two waters
6
    1SOL     OW    1   0.100   0.100   0.100
    1SOL    HW1    2   0.196   0.100   0.100
    1SOL    HW2    3   0.076   0.193   0.100
    2SOL     OW    4   0.800   0.800   0.800
    2SOL    HW1    5   0.896   0.800   0.800
    2SOL    HW2    6   0.776   0.893   0.800
   2.50000   2.50000   2.50000
"""


def test_gromacs_top_and_amber_top_load(tmp_path):
    """``.top`` is a GROMACS topology (with a .gro) unless its content is an Amber prmtop."""
    import shutil

    from datagen.systems import BUILTIN_SYSTEMS
    from integrations.predict import load_system

    top, gro = tmp_path / "topol.top", tmp_path / "conf.gro"
    top.write_text(TIP3P_TOP)
    gro.write_text(TWO_WATERS_GRO)
    topology, system, positions, box = load_system(str(top), str(gro), [])
    assert system.getNumParticles() == 6 == len(positions) == topology.getNumAtoms()
    assert system.usesPeriodicBoundaryConditions()
    assert box[2][2].value_in_unit(box[2][2].unit) == pytest.approx(2.5)
    prmtop, inpcrd = BUILTIN_SYSTEMS["ethanol"].paths()
    amber_top = tmp_path / "ethanol.top"
    shutil.copy(prmtop, amber_top)
    topology, system, _, box = load_system(str(amber_top), str(inpcrd), [])
    assert system.getNumParticles() == 9 and box is None


@pytest.mark.parametrize("case", ["junk top", "missing include", "no coordinates", "bad gro"])
def test_bad_topologies_are_data_errors_naming_the_file(tmp_path, case, capsys):
    top, gro = tmp_path / "topol.top", tmp_path / "conf.gro"
    top.write_text({"junk top": "garbage\n[ nonsense\n",
                    "missing include": '#include "nowhere.ff/forcefield.itp"\n' + TIP3P_TOP
                    }.get(case, TIP3P_TOP))
    gro.write_text("garbage\n" if case == "bad gro" else TWO_WATERS_GRO)
    ck = make_checkpoint(cached_md(), tmp_path / "a.pt")
    argv = [str(ck), "--topology", str(top), "-n", "1", "-o", str(tmp_path / "x.xtc")]
    if case != "no coordinates":
        argv += ["--coordinates", str(gro)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    named = gro if case == "bad gro" else top
    assert f"error: {named}:" in err
    if case == "no coordinates":
        assert "--coordinates FILE.gro" in err


def test_predict_with_a_history_model_writes_true_times(tmp_path):
    # the history warm-up runs before the reporters and the clock restarts after it, so the
    # XTC's frame times (stamped by count) are the States' times
    ck = make_checkpoint(cached_md(), tmp_path / "estag.pt", model="estag", selection="heavy",
                         jump_frames=4, n_out=2, history=3, history_stride=2)
    out = tmp_path / "h.xtc"
    assert main([str(ck), "--topology", str(PDB), "-n", "3", "-o", str(out), "--platform",
                 "Reference", "--guard", "warn", "--temperature-K", "1"]) == 0
    times = [ts.time for ts in mda.Universe(str(PDB), str(out)).trajectory]
    rows = (tmp_path / "h.csv").read_text().splitlines()[1:]
    np.testing.assert_allclose(times, [float(r.split(",")[1]) for r in rows], atol=1e-4)
    np.testing.assert_allclose(times, [0.04, 0.08, 0.12], atol=1e-4)
    # history frames half an output step apart: every jump would rebuild its history by MD
    # the count-stamped XTC cannot show; refused before anything is written
    ck = make_checkpoint(cached_md(), tmp_path / "estag1.pt", model="estag", selection="heavy",
                         jump_frames=4, n_out=2, history=3, history_stride=1)
    out = tmp_path / "h1.xtc"
    assert main([str(ck), "--topology", str(PDB), "-n", "3", "-o", str(out), "--platform",
                 "Reference", "--guard", "warn"]) == 1
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_coordinates_in_another_atom_order_or_with_a_placeholder_box(tmp_path):
    """A .gro with two atoms swapped is refused, naming the atom; a vacuum .gro's 0 0 0 box is
    no box (the System stays non-periodic)."""
    import MDAnalysis as mda

    from integrations.predict import load_system
    from surrogate_md.errors import DataError

    u = mda.Universe(str(PDB))
    gro = tmp_path / "vacuum.gro"
    u.atoms.write(str(gro))  # MDAnalysis writes a 0 0 0 box for a structure without one
    _, system, _, box = load_system(str(PDB), str(gro), ["amber14-all.xml"])
    assert box is None and not system.usesPeriodicBoundaryConditions()
    order = np.arange(len(u.atoms))
    order[[1, 4]] = order[[4, 1]]  # two atoms of other names swapped
    assert u.atoms[1].name != u.atoms[4].name
    swapped = tmp_path / "swapped.gro"
    u.atoms[order].write(str(swapped))
    with pytest.raises(DataError, match=r"swapped.gro: atoms in another order.*atom 2 is"):
        load_system(str(PDB), str(swapped), ["amber14-all.xml"])


def test_ctrl_c_keeps_the_frames_written_so_far(tmp_path, monkeypatch):
    """Interrupted after 3 of 20 jumps: the trajectory, state data and provenance hold those
    3 jumps under the names asked for (as a Ctrl-C'd Simulation leaves its reporters' files),
    the provenance says so, and the exit code is 130."""
    from integrations.openmm_simulation import SurrogateSimulation

    jump = SurrogateSimulation._jump
    calls = []

    def counted(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        jump(self)

    monkeypatch.setattr(SurrogateSimulation, "_jump", counted)
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    out = tmp_path / "cut.xtc"
    assert main([str(ck), "--topology", str(PDB), "-n", "20", "-o", str(out), "--platform",
                 "Reference"]) == 130
    prov = json.loads((tmp_path / "cut.json").read_text())
    assert prov["interrupted"] is True and prov["jumps"] == 3
    assert len(mda.Universe(str(PDB), str(out)).trajectory) == 3
    assert len((tmp_path / "cut.csv").read_text().splitlines()) == 4
    assert not list(tmp_path.glob(".*partial*"))


def test_predict_compile_makes_the_eager_trajectory(tmp_path, monkeypatch):
    """--compile runs the model through torch.compile (Dynamo's eager backend here, for speed)
    and writes the trajectory the eager run writes."""
    import torch

    import surrogate_md.models as models

    compile_model = models.compile_model
    monkeypatch.setattr(models, "compile_model",
                        lambda model, **options: compile_model(model, backend="eager"))
    torch._dynamo.reset()
    ck = make_checkpoint(cached_md(), tmp_path / "egno.pt", model="egno")
    frames = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / f"{name}.dcd"
        assert main([str(ck), "--topology", str(PDB), "-n", "4", "-o", str(out), "--platform",
                     "Reference", "--guard", "warn", *extra]) == 0
        frames.append(mdtraj.load(str(out), top=str(PDB)).xyz)
        assert json.loads((tmp_path / f"{name}.json").read_text())["argv"]["compile"] == \
            bool(extra)
    assert frames[0].shape == (4, 22, 3)
    np.testing.assert_allclose(frames[1], frames[0], atol=1e-5)


def test_predict_settle_iterations_option_and_resume_identity(tmp_path, capsys):
    """--settle-iterations reaches the engine and is part of what --resume checks."""
    ck = make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy", model="constant")
    out = tmp_path / "raw.xtc"
    argv = [str(ck), "--topology", str(PDB), "-n", "2", "-o", str(out), "--platform",
            "Reference", "--minimize", "--settle-iterations", "0"]
    assert main(argv) == 0
    prov = json.loads((tmp_path / "raw.json").read_text())
    assert prov["settle_iterations"] == 0
    assert prov["resume_identity"]["settle_iterations"] == 0
    capsys.readouterr()
    assert main([*argv[:-1], "-3", "--overwrite"]) == 1
    assert "settle_iterations must be a whole number >= 0" in capsys.readouterr().err


def test_predict_relax_iterations_option_and_resume_identity(tmp_path, capsys):
    """--relax-iterations reaches the guards and is part of what --resume checks; a run recorded
    before the option counts as one with the default."""
    from integrations.run_control import check_identity
    from surrogate_md.errors import ConfigError

    ck = make_checkpoint(cached_md(), tmp_path / "heavy.pt", selection="heavy", model="constant")
    out = tmp_path / "relaxed.xtc"
    argv = [str(ck), "--topology", str(PDB), "-n", "2", "-o", str(out), "--platform",
            "Reference", "--minimize", "--guard", "relax", "--relax-iterations", "37"]
    assert main(argv) == 0
    prov = json.loads((tmp_path / "relaxed.json").read_text())
    assert prov["guards"]["config"]["relax_iterations"] == 37
    identity = prov["resume_identity"]
    assert identity["relax_iterations"] == 37
    old = {k: v for k, v in identity.items() if k != "relax_iterations"}
    with pytest.raises(ConfigError, match="--relax-iterations was 200, now 37"):
        check_identity(old, identity, out, "run")
    check_identity(old, {**identity, "relax_iterations": 200}, out, "run")
    capsys.readouterr()
    assert main([*argv[:-1], "-3", "--overwrite"]) == 1
    assert "relax_iterations must be a whole number >= 0" in capsys.readouterr().err
