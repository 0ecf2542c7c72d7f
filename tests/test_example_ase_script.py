"""examples/ase_surrogate_md.py runs end to end, with GFN2-xTB as the physical calculator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _integration_fixtures import cached_md, make_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ase_surrogate_md.py"


@pytest.mark.parametrize("calculator", ["emt", "xtb"])
def test_ase_example_runs(tmp_path, calculator, capsys):
    if calculator == "xtb":
        pytest.importorskip("tblite.ase")
    spec = importlib.util.spec_from_file_location("ase_surrogate_md", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    out = tmp_path / "out"
    assert module.main([str(ck), "--jumps", "2", "--calculator", calculator, "--guard", "warn",
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "surrogate: t = " in printed and "reference: t = " in printed
    assert (out / "surrogate.traj").is_file() and (out / "surrogate.xtc").is_file()
