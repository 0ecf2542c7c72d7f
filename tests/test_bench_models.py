"""The model benchmark runs at tiny sizes and prints a well-formed Markdown table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from surrogate_md.models import MODELS

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "bench_models.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _check_table(rows: list[list[str]], n_rows: int, numeric: list[int]) -> None:
    header, sep, body = rows[0], rows[1], rows[2:]
    assert all(set(cell) <= set("-:") and cell for cell in sep)
    assert len(sep) == len(header) and len(body) == n_rows
    for row in body:
        assert len(row) == len(header)
        for col in numeric:
            assert float(row[col]) >= 0.0


def test_quick_benchmark_table_and_json(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--in-process", "--device", "cpu", "--threads", "1",
                       "--json", str(out)]) == 0
    tables = _tables(capsys.readouterr().out)
    assert len(tables) == 2
    models_table, scaling_table = tables
    assert "fwd+bwd (ms)" in models_table[0] and "MiB" in models_table[0][-1]
    _check_table(models_table, 2 * len(MODELS), numeric=[2, 3, 4, 5, 6])
    assert {row[0] for row in models_table[2:]} == set(MODELS)
    _check_table(scaling_table, len(bench.SIZES["quick"]["scaling"]), numeric=[0, 1, 2, 3])
    data = json.loads(out.read_text())
    assert len(data["cases"]) == 2 * len(MODELS) and "scaling_exponent" in data
    trained = [c for c in data["cases"] if MODELS[c["model"]].has_parameters]
    assert all(c["seconds"] > 0 for c in trained)
    assert not list(tmp_path.glob("*.tmp*"))


def test_isolated_cpu_measurement_reports_fresh_process_memory(capsys):
    bench = _load()
    assert bench.main(["--quick", "--device", "cpu", "--threads", "1", "--models", "egnn",
                       "--no-scaling"]) == 0
    table = _tables(capsys.readouterr().out)[0]
    assert "fresh process" in table[0][-1]
    _check_table(table, 2, numeric=[2, 3, 4, 5, 6])
    # the step allocates tens of MiB: a fresh process sees its high-water mark grow
    assert max(float(row[-1]) for row in table[2:]) > 0.0


def test_synthetic_adk_graph_is_protein_like():
    bench = _load()
    batch = bench.make_batch("adk", 855, 1, 4)
    per_atom = batch["edge_index"].shape[1] / 855
    assert 25 < per_atom < 60  # the AdK backbone at 8 Å has ~40 neighbours per atom


@pytest.mark.parametrize("n", [5, 9])
def test_bond_graph_counts(n):
    bench = _load()
    edges, etype = bench.bond_graph(n)
    assert edges.shape[1] == 2 * (n - 1) + 2 * (n - 2)
    assert int(etype.sum()) == 2 * (n - 2)
