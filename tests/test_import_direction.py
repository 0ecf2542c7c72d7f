"""Imports go one way (README "Layout"): ``datagen -> surrogate_md <- integrations``; the core
imports no MD engine and neither of the other two packages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.M)

#: package -> top-level modules its sources may not import
FORBIDDEN = {
    "surrogate_md": {"openmm", "ase", "MDAnalysis", "mdtraj", "datagen", "integrations"},
    "datagen": {"integrations"},
    "integrations": {"datagen"},
}


def _imports(path: Path) -> set[str]:
    return {(a or b).split(".")[0] for a, b in IMPORT.findall(path.read_text())}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources
    hits = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package]) for p in sources}
    assert not {k: v for k, v in hits.items() if v}


def test_the_pattern_sees_imports_inside_functions():
    text = "def f():\n    from openmm import unit\n    import ase.io\n"
    assert {(a or b).split(".")[0] for a, b in IMPORT.findall(text)} == {"openmm", "ase"}
