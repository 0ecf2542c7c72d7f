"""examples/openmm_surrogate_md.py: surrogate jumps and the same simulated time of plain MD."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _integration_fixtures import PDB, cached_md, make_checkpoint

mdtraj = pytest.importorskip("mdtraj")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "openmm_surrogate_md.py"


def test_reference_md_covers_the_same_time_in_md_steps(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("openmm_surrogate_md", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpt = make_checkpoint(cached_md(), tmp_path / "linear.pt")
    out = tmp_path / "out"
    assert script.main([str(ckpt), "--pdb", str(PDB), "--jumps", "4", "--guard", "warn",
                        "--platform", "Reference", "--out", str(out)]) == 0
    sur = mdtraj.load(str(out / "surrogate.xtc"), top=str(PDB))
    ref = mdtraj.load(str(out / "reference.xtc"), top=str(PDB))
    assert sur.n_frames == ref.n_frames == 4
    assert ref.time[-1] == pytest.approx(sur.time[-1], abs=1e-3)
    assert float(abs(ref.xyz).max()) < 5.0  # nm: the reference MD stayed together
    assert "reference" in capsys.readouterr().out
