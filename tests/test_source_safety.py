"""Untrusted files never execute code: no pickle/eval of user data, weights-only checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for pkg in ("surrogate_md", "datagen", "integrations", "examples")
                 for p in (ROOT / pkg).rglob("*.py"))

FORBIDDEN = {
    "pickle import": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", re.M),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "weights-only loading disabled": re.compile(r"weights_only\s*=\s*False"),
    "unsafe yaml": re.compile(r"yaml\.(load|unsafe_load|full_load)\s*\((?![^)]*SafeLoader)"),
    "allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
}


def test_sources_found():
    assert len(SOURCES) > 10


@pytest.mark.parametrize("rule", sorted(FORBIDDEN))
def test_no_unsafe_loading(rule):
    pattern = FORBIDDEN[rule]
    hits = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
            for p in SOURCES for text in [p.read_text()] for m in pattern.finditer(text)]
    assert not hits, f"{rule} found at {hits}"


def test_every_torch_load_is_weights_only():
    calls = [(p, m) for p in SOURCES for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text())]
    assert calls, "expected at least one torch.load (the checkpoint loader)"
    for path, match in calls:
        assert "weights_only=True" in match.group(1), f"{path.relative_to(ROOT)}: {match.group(0)}"
