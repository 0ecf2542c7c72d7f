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


def test_predict_rejects_bad_inputs(tmp_path, capsys):
    ck = make_checkpoint(cached_md(), tmp_path / "a.pt")
    assert main([str(ck), "--topology", str(tmp_path / "missing.pdb"), "-n", "1", "-o",
                 str(tmp_path / "x.xtc")]) == 1
    assert "no such topology file" in capsys.readouterr().err
    assert main([str(ck), "--topology", str(PDB), "-n", "1", "-o", str(tmp_path / "x.nc")]) == 1
    assert ".xtc or .dcd" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["integrations.predict"])
def test_help_runs_as_a_module(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--topology" in res.stdout
