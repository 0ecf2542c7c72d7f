"""The README's first command, at tiny sizes: data -> training -> report -> OpenMM jumps -> XTC."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_quick_runs_the_whole_chain(tmp_path, monkeypatch):
    mda = pytest.importorskip("MDAnalysis")
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", [str(DEMO), "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(DEMO), run_name="__main__")
    assert done.value.code == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["jumps"] >= 100
    assert (out / "report" / "report.md").read_text().count("| constant |") >= 1
    assert (out / "runs" / "egno" / "best.pt").is_file()
    u = mda.Universe(str(out / "demo_topology.pdb"), str(out / "demo.xtc"))
    assert len(u.trajectory) == summary["jumps"]
    times = np.array([ts.time for ts in u.trajectory])
    np.testing.assert_allclose(np.diff(times), summary["jump_ps"], atol=1e-3)
    assert all(np.isfinite(ts.positions).all() for ts in u.trajectory)
    rows = (out / "demo_state.csv").read_text().strip().splitlines()
    assert len(rows) == summary["jumps"] + 1  # header + one line per jump
