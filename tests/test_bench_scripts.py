"""The accuracy, surrogate-vs-MD, scaling and validity benchmarks run at tiny sizes (``--quick``)
and print well-formed Markdown tables and JSON."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module (its folder first on sys.path, as when run)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        return importlib.import_module(name)

    return load


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


def _check(rows: list[list[str]]) -> list[list[str]]:
    """A well-formed table: separator row, equal widths; returns the body."""
    header, sep, body = rows[0], rows[1], rows[2:]
    assert all(cell and set(cell) <= set("-:") for cell in sep)
    assert len(sep) == len(header) and body
    assert all(len(row) == len(header) for row in body)
    return body


def _machine_and_command(tables: list, script: str) -> None:
    machine = dict((row[0], row[1]) for row in _check(tables[0]))
    assert {"CPU", "versions", "device", "command"} <= set(machine)
    assert "torch" in machine["versions"] and "openmm" in machine["versions"]
    assert f"examples/benchmarks/{script}" in machine["command"]


def test_common_helpers(bench, tmp_path):
    common = bench("common")
    assert common.loglog_slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    assert common.loglog_slope([1, 10, 100], [1, 100, 1e4]) == pytest.approx(2.0)
    assert math.isnan(common.loglog_slope([1], [1]))
    assert common.mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    with pytest.raises(ValueError):
        common.markdown_table(["a", "b"], [[1]])
    out = common.save_json(tmp_path / "x.json", {"nan": float("nan"), "p": tmp_path})
    assert json.loads(out.read_text()) == {"nan": None, "p": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _no_absolute_paths(path: Path, root: Path) -> None:
    """The JSON a benchmark saved names the files of a run under ``root`` (the working
    directory) relative to it."""
    text = path.read_text()
    assert str(root) not in text and str(root.resolve()) not in text


def test_scaling_quick(bench, tmp_path, capsys, monkeypatch):
    scaling = bench("bench_scaling")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scaling.json"
    assert scaling.main(["--quick", "--in-process", "--threads", "1", "--models", "painet",
                         "egno", "--json", str(out), "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_scaling.py")
    atoms, p_sweep, slopes = (_check(t) for t in tables[1:4])
    assert len(atoms) == 2 * len(scaling.QUICK["atoms"])
    assert len(p_sweep) == 2 * len(scaling.QUICK["p_values"])
    for row in atoms + p_sweep:
        assert float(row[4]) > 0 and int(row[3]) > 0  # time, edges
    assert {row[0] for row in slopes} == {"painet", "egno"}
    data = json.loads(out.read_text())
    assert set(data["slopes_atoms"]) == {"painet", "egno"}
    assert all(isinstance(v, float) for v in data["slopes_atoms"].values())
    # the large-system exponent: the fit over the two largest sizes, as its own column
    header = tables[3][0]
    assert header[2] == "slope vs atoms, two largest sizes"
    for row in slopes:
        pts = sorted((r["n_atoms"], r["seconds"]) for r in data["atoms"]
                     if r["model"] == row[0] and "seconds" in r)[-2:]
        top = math.log(pts[1][1] / pts[0][1]) / math.log(pts[1][0] / pts[0][0])
        assert data["slopes_atoms_largest_two"][row[0]] == pytest.approx(top)
        assert row[2] == f"{top:.2g}"
    assert data["plot"] == "scaling.png"
    _no_absolute_paths(out, tmp_path)
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scaling.json", "scaling.png"]


def test_scaling_synthetic_density_and_skip(bench):
    scaling = bench("bench_scaling")
    batch = scaling.make_batch(1000, 2, 5.0, 0.1)
    pos = batch["pos"][:, 0].double()
    volume = float((pos.max(0).values - pos.min(0).values).prod())
    assert 0.07 < 1000 / volume < 0.14  # ~0.1 atoms/Å³
    per_atom = batch["edge_index"].shape[1] / 1000
    assert 20 < per_atom < 60  # 4/3 pi 5^3 x 0.1 = 52 minus surface atoms
    assert int((pos[:, None] - pos[None]).norm(dim=-1).add(1e9 * scaling.torch.eye(
        1000, dtype=pos.dtype)).min()) >= 1  # no overlapping atoms
    done = [{"n_atoms": 100, "seconds": 1.0}, {"n_atoms": 1000, "seconds": 10.0}]
    assert scaling.predicted_seconds(done, 10_000, "n_atoms") == pytest.approx(100.0)


def test_accuracy_quick_md17(bench, tmp_path, capsys, monkeypatch):
    accuracy = bench("bench_accuracy")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "acc.json"
    assert accuracy.main(["--quick", "--system", "ethanol", "--models", "constant", "linear",
                          "egno", "estag", "--seeds", "1", "--data-dir", str(tmp_path / "d"),
                          "--out-dir", str(tmp_path / "r"), "--json", str(out),
                          "--rollout-jumps", "3", "--plot", str(tmp_path / "roll.png"),
                          "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_accuracy.py")
    body = _check(tables[1])
    assert [r[0] for r in body][:4] == ["constant", "linear", "egno", "estag"]
    assert any(r[0].startswith("constant (history") for r in body)
    for row in body:
        fmse, amse = (float(c.split("±")[0]) for c in row[2:4])
        assert fmse > 0 and amse > 0
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["estag"]["protocol"].startswith("history")
    assert rows["egno"]["protocol"].startswith("s2t")
    # the trained model and the floors are scored on the same windows by evaluate
    egno_run = next(r for r in data["runs"] if r["label"] == "egno")
    assert egno_run["floors"]["constant"]["fmse"] == pytest.approx(rows["constant"]["fmse_mean"])
    # rollout curves: every model, RMSD growing from the first jump, and a plot
    roll = data["rollout"]
    assert {"constant", "linear", "egno"} <= set(roll["rmsd_A"])
    assert len(roll["times_ps"]) == roll["n_jumps"] * 4  # P = 4 frames per jump (quick)
    assert all(len(c) == len(roll["times_ps"]) and min(c) > 0 for c in roll["rmsd_A"].values())
    assert (tmp_path / "roll.png").stat().st_size > 1000
    assert _check(tables[2])[0][0] in roll["rmsd_A"]
    assert data["data"] == "d/ethanol-vacuum-1200f-seed0.h5"
    _no_absolute_paths(out, tmp_path)


def test_accuracy_velocities_option_reaches_the_training_data(bench, tmp_path, monkeypatch):
    """``--velocities difference``: datagen data (which stores velocities) is trained and scored
    on finite differences, as real MD17 npz files are; the x + v t floor sees other inputs."""
    accuracy = bench("bench_accuracy")
    monkeypatch.chdir(tmp_path)
    fmse = {}
    for velocities in ("auto", "difference"):
        out = tmp_path / f"{velocities}.json"
        assert accuracy.main(["--quick", "--system", "ethanol", "--models", "linear", "egnn",
                              "--seeds", "1", "--epochs", "1", "--data-dir", str(tmp_path / "d"),
                              "--out-dir", str(tmp_path / velocities), "--json", str(out),
                              "--velocities", velocities, "--no-progress"]) == 0
        data = json.loads(out.read_text())
        assert data["velocities"] == velocities
        fmse[velocities] = {r["model"]: r["fmse_mean"] for r in data["rows"]}
        ckpt = next((tmp_path / velocities).rglob("best.pt"))
        from surrogate_md import Surrogate
        assert Surrogate.load(ckpt).velocity_source == (
            "file" if velocities == "auto" else "finite_difference")
    assert fmse["auto"]["linear"] != pytest.approx(fmse["difference"]["linear"], rel=1e-3)


def test_accuracy_quick_adk_residues_with_transfer(bench, tmp_path, capsys):
    # quick AdK: MDAnalysisTests' CHARMM AdK is both the data and the transfer target
    accuracy = bench("bench_accuracy")
    out = tmp_path / "adk.json"
    assert accuracy.main(["--quick", "--system", "adk", "--protocol", "residues", "--transfer",
                          "mdanalysistests", "--models", "constant", "estag", "--seeds", "1",
                          "--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"),
                          "--json", str(out), "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    header = tables[1][0]
    assert len(_check(tables[1])) == 4  # constant, estag and the floors on the history windows
    assert any(h.startswith("transfer F-MSE") for h in header)
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["estag"]["protocol"].startswith("history")
    # scoring the training file itself as a transfer target: the constant floor over all its
    # windows is a mean squared displacement like the test split's, the same order of size
    const = rows["constant"]
    assert 0.2 < const["transfer_fmse_mean"] / const["fmse_mean"] < 5
    run = next(r for r in data["runs"] if r["label"] == "estag")
    assert run["transfer"]["n_windows"] > 0 and run["transfer"]["estag"]["fmse"] > 0


@pytest.mark.slow
def test_surrogate_vs_md_quick(bench, tmp_path, capsys):
    vs_md = bench("bench_surrogate_vs_md")
    out = tmp_path / "vs.json"
    assert vs_md.main(["--quick", "--data-dir", str(tmp_path / "d"), "--out-dir",
                       str(tmp_path / "r"), "--json", str(out), "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_surrogate_vs_md.py")
    speed, acc = _check(tables[1]), _check(tables[2])
    assert len(speed) == 3 and "OpenMM MD" in speed[0][3]
    for row in speed:
        assert float(row[6]) > 0 and float(row[7]) > 0  # ns/s, ns/day
    assert "%" in speed[1][8]
    data = json.loads(out.read_text())
    sys_ = data["systems"][0]
    sur = sys_["surrogate"]
    assert sur["accepted"] + sur["fallbacks"] == 3
    # every jump is counted once: passing as predicted or after relaxing, kept failing, or
    # fallen back; the percentage is the passing share
    assert (sur["passed_as_predicted"] + sur["relaxed_kept"] + sur["kept_failing"]
            + sur["fallbacks"]) == 3
    assert sur["pass_fraction"] == pytest.approx(
        (sur["passed_as_predicted"] + sur["relaxed_kept"]) / 3)
    assert sys_["surrogate"]["simulated_ps"] == pytest.approx(3 * sys_["jump_ps"])
    assert sys_["md"]["ns_per_day"] == pytest.approx(sys_["md"]["ns_per_s"] * 86400)
    assert float(acc[0][2]) == pytest.approx(sys_["jump_ps"])
    assert float(acc[0][4]) > 0 and float(acc[0][5]) > 0  # model and constant F-MSE
    assert float(acc[0][5]) == pytest.approx(sys_["accuracy"]["fmse_constant_A2"], rel=1e-2)
    # hybrid mode: MD steps before every jump, their time simulated time too (the quick MD
    # step is 2 fs); the same checkpoint, the MD made above
    ckpt = next((tmp_path / "r").glob("**/best.pt"))
    assert vs_md.main(["--quick", "--checkpoint", str(ckpt), "--md-steps", "5", "--data-dir",
                       str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"), "--json",
                       str(out), "--no-progress"]) == 0
    speed = _check(_tables(capsys.readouterr().out)[1])
    assert "5 MD steps before each" in speed[1][3]
    hybrid = json.loads(out.read_text())["systems"][0]
    assert hybrid["surrogate"]["md_steps_per_jump"] == 5
    assert hybrid["surrogate"]["simulated_ps"] == pytest.approx(3 * (hybrid["jump_ps"] + 0.01))
    with pytest.raises(SystemExit):
        vs_md.main(["--quick", "--md-steps", "-1"])
    with pytest.raises(SystemExit):  # the noise of a trained AdK model, so its checkpoint too
        vs_md.main(["--quick", "--adk-jump-noise", str(ckpt)])


def test_surrogate_vs_md_measures_the_run_motion_and_stochastic_jumps(bench, tmp_path, capsys):
    """The speed table sets how far the model's atoms moved per jump in the timed run beside
    the MD's motion over a jump (its data); with a fitted jump noise the same jumps move the
    atoms further, each draw seeded."""
    from datagen.openmm_md import choose_platform, prepare_system
    from surrogate_md import Surrogate
    from surrogate_md.evaluate import evaluate

    vs_md = bench("bench_surrogate_vs_md")
    out = tmp_path / "vs.json"
    assert vs_md.main(["--quick", "--data-dir", str(tmp_path / "d"), "--out-dir",
                       str(tmp_path / "r"), "--json", str(out), "--no-progress"]) == 0
    speed = _check(_tables(capsys.readouterr().out)[1])
    data = json.loads(out.read_text())["systems"][0]
    moved = data["surrogate"]["run_moved_A2"]
    assert moved > 0 and float(speed[1][9]) == pytest.approx(moved, rel=1e-2)
    # the internal part of the motion (superposed) is part of it, for the run and the MD
    assert 0 < data["surrogate"]["run_moved_internal_A2"] <= moved * (1 + 1e-9)
    md = data["md_motion"]
    assert md["windows"] > 0 and 0 < md["internal_A2"] <= md["raw_A2"] * (1 + 1e-9)
    assert float(speed[0][9]) == pytest.approx(data["accuracy"]["fmsd_md_A2"], rel=1e-2)
    ckpt = next((tmp_path / "r").glob("**/best.pt"))
    md = next((tmp_path / "d").glob("*.h5"))
    noise = tmp_path / "noise.npz"
    evaluate(ckpt, md, tmp_path / "eval", split="val", rollout_jumps=0, plots=False,
             noise_out=noise)
    prepared = prepare_system("alanine-dipeptide")
    platform = choose_platform("Reference", 22, "vacuum")
    _, state = vs_md.md_timing(prepared, platform, 0.1)
    surrogate = Surrogate.load(ckpt)
    runs = {name: vs_md.surrogate_timing(prepared, platform, surrogate, state, 4, "warn",
                                         jump_noise=path)
            for name, path in (("deterministic", None), ("stochastic", str(noise)))}
    assert runs["stochastic"]["jump_noise"] is not None
    assert runs["deterministic"]["jump_noise"] is None
    assert runs["stochastic"]["run_moved_A2"] > 1.5 * runs["deterministic"]["run_moved_A2"]
    # per jump: its wall time, relaxation iterations, and how far the run has drifted
    for run in runs.values():
        per = run["per_jump"]
        assert len(per["wall_s"]) == len(per["relax_iterations"]) == 4
        assert sum(per["wall_s"]) == pytest.approx(run["wall_s"], rel=0.05)
        assert sum(per["relax_iterations"]) == run["relax_iterations_used"]
        assert len(per["rmsd_from_start_A"]) == 4 and min(per["rmsd_from_start_A"]) >= 0
        assert len(per["radius_of_gyration_A"]) == 5 and min(per["radius_of_gyration_A"]) > 0
        # one draw each (no redraws); the first draw's rise wherever the energy check failed
        assert per["draws"] == [1] * 4
        rises = np.asarray(per["first_draw_rise_kJ_per_mol"])
        assert np.isfinite(rises).sum() == run["guard_failures"].get("energy", 0)
    assert (runs["stochastic"]["per_jump"]["rmsd_from_start_A"][-1]
            > runs["deterministic"]["per_jump"]["rmsd_from_start_A"][-1])
    # redraws: every jump is accounted for once (as predicted, or fallen back), redraws apart
    fb = vs_md.surrogate_timing(prepared, platform, surrogate, state, 4, "fallback",
                                jump_noise=str(noise), redraws=2)
    assert fb["redraws_allowed"] == 2 and fb["redrawn"] >= 0 and fb["relaxed_kept"] == 0
    assert fb["passed_as_predicted"] + fb["fallbacks"] == fb["jumps"] == 4
    assert sum(fb["per_jump"]["draws"]) == 4 + fb["redrawn"]
    with pytest.raises(SystemExit):  # redraws draw stochastic jumps again
        vs_md.main(["--quick", "--adk-redraws", "2"])


def test_surrogate_vs_md_times_a_control_beside_the_model(bench, tmp_path, capsys):
    """--adk-control times a second checkpoint's jumps from the same MD state in the same run:
    its own row and speed-up, and the ratio of the two; a control that jumps other atoms or
    over another time is refused, and so is a deterministic control beside stochastic jumps."""
    import argparse
    import types

    from datagen.openmm_md import prepare_system
    from surrogate_md.errors import CheckpointError

    vs_md = bench("bench_surrogate_vs_md")
    prepared = prepare_system("adk", solvent="implicit", cutoff_nm=1.2, hmr=True)
    control = vs_md.adk_untrained_checkpoint(
        argparse.Namespace(adk_model="constant", hidden=None, layers=None), prepared,
        tmp_path / "constant.pt")
    out = tmp_path / "vs.json"
    assert vs_md.main(["--quick", "--systems", "adk", "--adk-control", str(control),
                       "--out-dir", str(tmp_path / "r"), "--json", str(out),
                       "--no-progress"]) == 0
    text = capsys.readouterr().out
    speed = _check(_tables(text)[1])
    assert len(speed) == 4 and "control" in speed[2][3] and "constant" in speed[2][3]
    row = json.loads(out.read_text())["systems"][0]
    c = row["control"]
    assert c["model"] == "constant" and c["checkpoint"].endswith("constant.pt")
    assert c["jumps"] == row["surrogate"]["jumps"] == 1
    assert c["simulated_ps"] == pytest.approx(row["surrogate"]["simulated_ps"])
    assert row["speedup_control"] == pytest.approx(c["ns_per_s"] / row["md"]["ns_per_s"])
    assert float(speed[2][10]) == pytest.approx(row["speedup_control"], rel=1e-2)
    ratio = row["speedup"] / row["speedup_control"]
    assert f"the learned model's jumps run at {vs_md.fmt(ratio)}×" in text
    # a constant copies its input: its jump moves the predicted atoms less than the model's
    assert c["run_moved_A2"] < row["surrogate"]["run_moved_A2"]

    def sur(jump_ps, atoms, n_atoms=3341):
        return types.SimpleNamespace(name="m", jump_ps=jump_ps, model_atoms=np.asarray(atoms),
                                     n_model_atoms=len(atoms), n_atoms=n_atoms)

    vs_md.check_control(sur(4.0, [0, 1]), sur(4.0, [0, 1]), "c.pt")
    for other in (sur(8.0, [0, 1]), sur(4.0, [0, 2]), sur(4.0, [0, 1], 22)):
        with pytest.raises(CheckpointError, match="does not jump what the model does"):
            vs_md.check_control(sur(4.0, [0, 1]), other, "c.pt")
    with pytest.raises(SystemExit):  # the control's noise without the control
        vs_md.main(["--quick", "--adk-control-noise", str(control)])
    with pytest.raises(SystemExit):  # stochastic model, deterministic control
        vs_md.main(["--quick", "--adk-checkpoint", str(control), "--adk-jump-noise",
                    str(control), "--adk-control", str(control)])


def test_surrogate_vs_md_finds_adk_training_data(bench, tmp_path):
    """The AdK accuracy row scores the checkpoint on the MD it was trained on, or --adk-data;
    without either there is no row (no error)."""
    import argparse
    import types

    vs_md = bench("bench_surrogate_vs_md")
    data = tmp_path / "adk.h5"
    data.write_bytes(b"")

    def sur(path):
        return types.SimpleNamespace(meta={"provenance": {"data_config": {"path": path}}})

    args = argparse.Namespace(adk_data=None)
    assert vs_md.adk_data(args, sur([str(data)]), tmp_path / "best.pt") == data
    assert vs_md.adk_data(args, sur(str(data)), tmp_path / "best.pt") == data
    assert vs_md.adk_data(args, sur([str(tmp_path / "gone.h5")]), tmp_path / "best.pt") is None
    assert vs_md.adk_data(args, types.SimpleNamespace(meta={}), tmp_path / "best.pt") is None
    other = tmp_path / "other.h5"
    args.adk_data = str(other)
    assert vs_md.adk_data(args, sur([str(data)]), tmp_path / "best.pt") == other


@pytest.mark.slow
def test_validity_quick(bench, tmp_path, capsys):
    validity = bench("bench_validity")
    out = tmp_path / "val.json"
    assert validity.main(["--quick", "--models", "egno", "--jumps", "4", "--data-dir",
                          str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"), "--json",
                          str(out), "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_validity.py")
    body = _check(tables[1])
    assert body[0][0] == "egno" and body[0][1].startswith("4 x")
    data = json.loads(out.read_text())
    row = data["models"][0]
    assert row["frames"] == 4 * 5  # 4 jumps x P = 5 (example config)
    assert row["guards"]["jumps_checked"] == 4
    # the energy guard ran with the force field rebuilt from the data's metadata, which
    # reproduces the energies stored by the MD run
    assert row["guards"]["energy_checked"]
    assert row["guards"]["force_field_check_kJ_per_mol"] < 0.1
    assert "energy_rise_kJ_per_mol" in row["guards"]
    assert 0.0 <= row["torsion_jsd"] <= math.log(2) + 1e-9
    assert row["h_r_mae"] >= 0.0
    size = body[0][tables[1][0].index("radius of gyration (Å)")]
    assert f"{row['radius_of_gyration_A']['model_min']:.3g}" in size and "(MD " in size


def test_bonded_forces_split_by_the_atoms_their_terms_touch(bench):
    """The basin split: every bond, angle and torsion lands in exactly one of three forces by
    whether its atoms are all predicted, all rebuilt or both, and the energy is unchanged."""
    import openmm

    from datagen.openmm_md import prepare_system

    validity = bench("bench_validity")
    prepared = prepare_system("alanine-dipeptide", solvent="implicit", constraints=None)
    topology_atoms = list(prepared.topology.atoms())
    backbone = np.array([a.index for a in topology_atoms if a.name in ("N", "CA", "C", "O")])
    split, names = validity.split_bonded_by_part(prepared.system, backbone)
    assert split.getNumForces() == prepared.system.getNumForces() + 6  # three in place of one
    by_name = dict(zip(names, split.getForces()))
    predicted = set(backbone.tolist())
    for kind, (count, get, _, n) in validity._BONDED.items():
        original = next(f for f in prepared.system.getForces() if type(f).__name__ == kind)
        parts = {part: by_name[f"{kind} ({part} atoms)"]
                 for part in ("model", "junction", "rebuilt")}
        assert sum(getattr(f, count)() for f in parts.values()) == getattr(original, count)()
        for part, force in parts.items():
            for i in range(getattr(force, count)()):
                inside = [a in predicted for a in getattr(force, get)(i)[:n]]
                assert {"model": all(inside), "rebuilt": not any(inside),
                        "junction": any(inside) and not all(inside)}[part]
        assert getattr(parts["model"], count)() > 0 and getattr(parts["junction"], count)() > 0
        if kind != "PeriodicTorsionForce":  # a dipeptide has no torsion off its backbone
            assert getattr(parts["rebuilt"], count)() > 0

    def energy(system) -> float:
        context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                                 openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(prepared.positions)
        return context.getState(energy=True).getPotentialEnergy().value_in_unit(
            openmm.unit.kilojoule_per_mole)

    assert energy(split) == pytest.approx(energy(prepared.system), rel=1e-9, abs=1e-6)


def test_validity_quick_inside_the_engine(bench, tmp_path, capsys):
    """--engine: the rollout runs through SurrogateSimulation on the dataset's force field; the
    jump ends it keeps are scored, and the guard record is the engine's."""
    validity = bench("bench_validity")
    out = tmp_path / "val.json"
    assert validity.main(["--quick", "--models", "egno", "estag", "--jumps", "3", "--engine",
                          "--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"),
                          "--json", str(out), "--no-progress", "--basin-states", "2"]) == 0
    printed = capsys.readouterr().out
    tables = _tables(printed)
    body = _check(tables[1])
    assert [r[0] for r in body[:2]] == ["egno", "estag"] and "MD fallbacks" in body[0][-1]
    assert "egno: energy basins" in printed
    assert "egno, by quarter of the run: s per jump" in printed and "draws per jump" in printed
    assert "egno: internal motion per jump" in printed
    data = json.loads(out.read_text())
    assert data["engine"]
    for row in data["models"]:
        # the start and the kept states at jumps 2 and 3 (of 3), two MD frames, each minimised
        basins = row["basins"]
        assert basins["iterations"] == [0, 10, 30, 100, 300]
        assert list(basins["kept"]) == ["jump 0", "jump 2", "jump 3"] and len(basins["md"]) == 2
        assert abs(np.mean([e[0] for e in basins["md"].values()])) < 1e-6 * abs(
            basins["md_mean_energy_kJ_per_mol"]) + 1e-6  # relative to the MD frames' mean
        for energies in [*basins["md"].values(), *basins["kept"].values()]:
            assert len(energies) == 5 and energies[-1] < energies[0]  # minimising lowers it
        # the floor split by the System's forces: the MD frames' rows average to zero, and the
        # forces add up to the floor (but for the flexible copy's stiff bonds in place of the
        # constraints, held within a few J/mol of their lengths)
        floors = basins["floor_by_force"]
        assert list(floors) == [*basins["md"], *basins["kept"]]
        assert any(name.startswith("NonbondedForce") for name in basins["forces"])
        assert any(name.startswith("PeriodicTorsionForce (junction atoms)")
                   for name in basins["forces"])
        np.testing.assert_allclose(np.mean([floors[k] for k in basins["md"]], axis=0), 0.0,
                                   atol=1e-6)
        md_floor = np.mean([e[-1] for e in basins["md"].values()])
        for name, energies in basins["kept"].items():
            assert sum(floors[name]) == pytest.approx(energies[-1] - md_floor, abs=0.05)
    with pytest.raises(SystemExit):  # minimising a run's states needs the run in OpenMM
        validity.main(["--quick", "--basin-states", "2"])
    for row in data["models"]:  # a history model too: its first history is the MD's
        guards = row["guards"]
        # the jump ends the engine kept, one per jump (fallback MD's states are not scored)
        assert row["frames"] == 3 - guards["fallbacks"] >= 1
        assert guards["engine"] and guards["jumps_checked"] == 3
        assert guards["accepted_as_predicted"] + guards["rejected"] == 3
        assert row["engine"]["guard_action"] == "relax" and row["engine"]["ns_per_day"] > 0
        # every kept state passed the engine's bond checks: none is collapsed
        assert row["collapsed_frames"] == 0 and row["nonfinite_frames"] == 0
        assert len(guards["kept_energy_above_md_kJ_per_mol"]["series"]) == 3
        # per jump: the wall time adds up to the run's, the iterations to the guards' count
        per = row["per_jump"]
        assert len(per["wall_s"]) == len(per["relax_iterations"]) == 3
        assert sum(per["wall_s"]) == pytest.approx(row["engine"]["wall_s"], rel=0.1, abs=0.05)
        assert sum(per["relax_iterations"]) == pytest.approx(
            guards["relax_iterations_per_relaxation"] * max(guards["relaxations"], 1))
        assert per["from_md"].count(True) == guards["fallbacks"]
        assert len(row["by_quarter"]["s_per_jump"]) == 3  # three jumps: one per "quarter"
        # why a run grows dearer: draws, the first draw's rise, the reference, the drop ratio
        assert all(d == 1 for d in per["draws"])  # deterministic: nothing drawn again
        rises = per["first_draw_rise_kJ_per_mol"]
        failed_energy = guards["failures"].get("energy", 0)
        assert sum(r is not None for r in rises) == failed_energy
        assert all(r > guards["energy_threshold_kJ_per_mol"] for r in rises if r is not None)
        assert len(per["energy_reference_kJ_per_mol"]) == len(per["energy_kJ_per_mol"]) == 3
        assert all(np.isfinite(per["energy_reference_kJ_per_mol"]))
        assert all(r is None or 0.5 <= r <= 4.0 for r in per["drop_ratio"])
        # motion: each jump's internal displacement, the MD's over a jump beside it, drift
        assert len(per["moved_internal_A2"]) == len(per["rmsd_from_start_A"]) == 3
        assert all(m >= 0 for m in per["moved_internal_A2"])
        assert per["rmsd_from_start_A"][0] == pytest.approx(np.sqrt(per["moved_internal_A2"][0]))
        motion = row["motion"]
        assert motion["md_internal_A2"] > 0
        assert motion["rmsd_from_start_A_end"] == per["rmsd_from_start_A"][-1]
    assert out.with_suffix(".energy.png").stat().st_size > 0  # the energy-vs-time plot
    floor = data["md_floor"]  # the MD's own two halves, the floor the rollouts are read against
    assert floor["frames"] > 0 and 0.0 <= floor["torsion_jsd"] <= math.log(2) + 1e-9
    assert body[-1][0].startswith("reference MD, first half vs second half")
    # stochastic jumps: a jump-noise file fitted on the validation windows, a row each
    from surrogate_md.evaluate import evaluate

    ckpt = next((tmp_path / "r").glob("**/train-egno/best.pt"))
    md = next((tmp_path / "d").glob("*.h5"))
    evaluate(ckpt, md, tmp_path / "ev", split="val", rollout_jumps=0, plots=False,
             noise_out=tmp_path / "noise.npz")
    noisy = tmp_path / "noisy.json"
    assert validity.main(["--checkpoints", str(ckpt), str(ckpt), "--jump-noise", "none",
                          str(tmp_path / "noise.npz"), "--data", str(md), "--engine", "--jumps",
                          "3", "--redraws", "2", "--json", str(noisy), "--no-progress"]) == 0
    rows = json.loads(noisy.read_text())["models"]
    assert [r["model"] for r in rows] == ["egno", "egno + jump noise"]
    assert "jump_noise" not in rows[0] and rows[1]["jump_noise"]["scale"] == 1.0
    assert rows[1]["jump_noise"]["rms_A"] > 0 and rows[1]["guards"]["jumps_checked"] == 3
    assert noisy.with_suffix(".rama.png").stat().st_size > 0  # MD, deterministic, noisy
    # redraws reach the engine of the stochastic row only
    assert [r["engine"]["redraws"] for r in rows] == [0, 2]
    assert rows[0]["guards"]["redrawn"] == 0 and rows[1]["guards"]["redrawn"] >= 0
    with pytest.raises(SystemExit):  # a redraw needs a stochastic jump
        validity.main(["--checkpoints", str(ckpt), "--data", str(md), "--engine", "--redraws",
                       "1"])
    with pytest.raises(SystemExit):  # noise files need the engine and one per checkpoint
        validity.main(["--checkpoints", str(ckpt), "--jump-noise", "none", "none", "--data",
                       str(md), "--engine"])


def test_reconstruction_quick(bench, tmp_path, capsys):
    """Oracle jumps of a heavy-atom selection: riding hydrogens add energy over the true frame,
    and relaxing on the flexible copy gets the energy back to the reference median."""
    recon = bench("bench_reconstruction")
    out = tmp_path / "recon.json"
    # 32 starts: the rise of one frame spreads over ~20 kJ/mol either way, so the medians of 4
    # compared the wrong way round on another OpenMM version's trajectory (-2.8 against 2.9)
    assert recon.main(["--quick", "--selections", "heavy", "backbone", "--lag-ps", "0.3",
                       "--starts", "32", "--settle-iterations", "20", "--data-dir",
                       str(tmp_path / "d"), "--json", str(out), "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_reconstruction.py")
    body = _check(tables[1])
    assert [row[0] for row in body] == ["heavy", "backbone"]
    data = json.loads(out.read_text())
    heavy, backbone = data["rows"]
    assert heavy["rebuilt_atoms"] == 12 and backbone["rebuilt_atoms"] > heavy["rebuilt_atoms"]
    for row in data["rows"]:
        assert row["starts"] == 32 and row["lag_ps"] == pytest.approx(0.3)
        assert row["rise_rebuilt"]["median"] > row["rise_true"]["median"]
        # the engines' settling, in their stages, measured after each
        assert row["settle_stages"] == [10, 20] and row["settle_seconds"] > 0
        # judged as the guards judge it (over the median lowered by the stage's quench), the
        # settled frame is back near the true frame's level, the rebuilt one is not
        true = row["rise_true"]["median"]
        assert (abs(row["rise_settled_20"]["median"] - true)
                < abs(row["rise_rebuilt_constrained"]["median"] - true) / 2)
        assert row["rise_settled_10"]["over_threshold"] == 0
        relaxed = row.get("relax_flexible")
        if relaxed:
            assert relaxed["reached"] == relaxed["relaxed"] and relaxed["final_rise_max"] <= 1e-6


def _alanine_md(path, frames: int) -> dict:
    """Real alanine-dipeptide MD (datagen, OpenMM) as the dict the integration fixtures take."""
    from datagen.openmm_md import run_openmm
    from surrogate_md.data.h5md import open_trajectory

    run_openmm("alanine-dipeptide", path, frames=frames, seed=0, progress=False)
    with open_trajectory(path) as traj:
        every = slice(0, traj.n_frames)
        return {"topology": traj.topology, "frames": traj.read(every),
                "velocities": traj.read(every, "velocities"), "interval_ps": traj.interval_ps}


def test_chained_jumps_quick(bench, tmp_path, capsys):
    """A briefly trained EGNO on tiny alanine-dipeptide MD: the four cases (first jump, second
    jump two ways, a jump from the later MD frame) for every start, as a table and JSON."""
    chained = bench("bench_chained_jumps")
    out = tmp_path / "chained.json"
    assert chained.main(["--quick", "--starts", "3", "--data-dir", str(tmp_path / "d"),
                         "--out-dir", str(tmp_path / "r"), "--json", str(out),
                         "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_chained_jumps.py")
    body = _check(tables[1])
    assert [r[3] for r in body] == list(chained.CASES)
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert len(row["starts"]) == 3 and row["selection_atoms"] == 10  # heavy atoms
    for case in row["cases"].values():
        rises = case["rises_kJ_per_mol"]
        assert len(rises) == 3 and all(math.isfinite(e) for e in rises)
        assert case["min"] <= case["median"] <= case["max"]
    assert data["energy_threshold_kJ_per_mol"] > 0
    with pytest.raises(SystemExit):  # checkpoints need their data
        chained.main(["--checkpoints", str(tmp_path / "x.pt")])


def test_relaxation_quick(bench, tmp_path, capsys):
    """A briefly trained EGNO on tiny alanine-dipeptide MD in implicit solvent: every jump end
    relaxed in the three schemes on the same states, as a table and JSON."""
    relax = bench("bench_relaxation")
    out = tmp_path / "relax.json"
    assert relax.main(["--quick", "--starts", "3", "--data-dir", str(tmp_path / "d"),
                       "--out-dir", str(tmp_path / "r"), "--json", str(out),
                       "--no-progress"]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_relaxation.py")
    body = _check(tables[1])
    assert [r[0] for r in body] == [name for name, _, _ in relax.SCHEMES]
    data = json.loads(out.read_text())
    assert data["implicit_solvent"] and len(data["relaxed_starts"]) == 3
    full, staged, rounds = data["rows"]
    assert (full["first_iterations"], full["round_iterations"]) == (0, 0)
    assert staged["first_iterations"] == data["relax_iterations"]
    for row in data["rows"]:
        assert len(row["runs"]) == 3 and row["speedup_vs_full"] > 0
        for run in row["runs"]:  # the same states in every scheme
            assert 0 <= run["iterations"] <= data["relax_iterations"]
            assert math.isfinite(run["rise_after"]) and run["seconds"] > 0
    assert [r["rise_before"] for r in full["runs"]] == [r["rise_before"] for r in rounds["runs"]]
    with pytest.raises(SystemExit):  # a checkpoint needs its data
        relax.main(["--checkpoint", str(tmp_path / "x.pt")])


def test_validity_scores_broken_frames(bench, tmp_path):
    """Exploded frames count as collapsed and differ from MD; MD frames score as valid."""
    import numpy as np

    from surrogate_md.surrogate import Surrogate

    validity = bench("bench_validity")
    vs_md = bench("bench_surrogate_vs_md")
    md = _alanine_md(tmp_path / "ala.h5", 60)
    from _integration_fixtures import make_checkpoint  # a linear surrogate on this MD

    frames = md["frames"]
    sur = Surrogate.load(make_checkpoint(md, tmp_path / "lin.pt"))
    good = validity.score(sur, frames[30:], frames[:30], md["topology"])
    rng = np.random.default_rng(0)
    broken = frames[30:] + rng.normal(scale=2.0, size=frames[30:].shape)
    bad = validity.score(sur, broken, frames[:30], md["topology"])
    assert good["collapsed_frames"] == 0 and bad["collapsed_frames"] == len(broken)
    assert bad["h_r_mae"] > good["h_r_mae"]
    assert bad["torsion_jsd"] > good["torsion_jsd"]
    # the size column: MD frames inside the size check's range, a compacted copy outside
    lo, hi = sur.validity.gyration_range_A
    rg = good["radius_of_gyration_A"]
    assert rg["allowed"] == pytest.approx([lo, hi]) and rg["model_outside_fraction"] == 0.0
    assert lo <= rg["model_min"] <= rg["model_max"] <= hi
    centre = frames[30:].mean(axis=1, keepdims=True)
    shrunk = validity.score(sur, centre + 0.5 * (frames[30:] - centre), frames[:30],
                            md["topology"])["radius_of_gyration_A"]
    assert shrunk["model_outside_fraction"] == 1.0
    assert shrunk["model_mean"] == pytest.approx(0.5 * rg["model_mean"])
    assert shrunk["reference_outside_fraction"] == 0.0
    assert vs_md.ns_per_day(1000.0, 86400.0) == pytest.approx(1.0)


def test_validity_guards_rebuild_partial_models(bench, tmp_path):
    """A heavy-atom model's rollout is checked on the full system: hydrogens ride along from the
    start state, the energy comes from the data's force field. MD frames pass every guard with
    energies near MD's; the same frames stretched by 30 % fail the bond and energy checks."""
    import numpy as np

    from surrogate_md.data.h5md import open_trajectory
    from surrogate_md.surrogate import Surrogate

    validity = bench("bench_validity")
    data = tmp_path / "ala.h5"
    md = _alanine_md(data, 40)
    frames = md["frames"]
    from _integration_fixtures import make_checkpoint

    with open_trajectory(data) as traj:
        sur = Surrogate.load(make_checkpoint(md, tmp_path / "heavy.pt", selection="heavy",
                                             jump_frames=2, n_out=2))
        energy, why = validity.ReferenceEnergy.from_trajectory(traj)
        assert energy is not None, why
        md_e, check = validity.reference_energies(traj, 9, energy)
        heavy = sur.model_atoms
        rollout = frames[10:30][:, heavy]  # 10 "jumps" of P = 2 frames
        times = np.arange(1, 21) * traj.interval_ps
        good = validity.guard_events(sur, rollout, times, frames[9], energy, md_e)
        broken = rollout.copy()
        centre = rollout[1::2].mean(axis=1, keepdims=True)
        broken[1::2] = centre + 1.3 * (rollout[1::2] - centre)  # jump ends: bonds 30 % longer
        bad = validity.guard_events(sur, broken, times, frames[9], energy, md_e)
    assert check < 0.1 and len(md_e) == 10
    assert len(heavy) < sur.n_atoms
    assert good["reconstructed_atoms"] == sur.n_atoms - len(heavy)
    assert good["jumps_checked"] == bad["jumps_checked"] == 10
    assert good["rejected"] == 0, good["failures"]
    assert bad["rejected"] == 10
    assert bad["failures"].get("bond") == 10 and bad["failures"].get("energy") == 10
    assert bad["energy_rise_kJ_per_mol"]["median"] > good["energy_rise_kJ_per_mol"]["max"]


def test_benchmarks_report_bad_inputs_in_one_line(bench, tmp_path, capsys):
    """A missing data file, or a dataset passed where a checkpoint belongs: one ``error:`` line
    naming the file and exit status 2, as the package's command lines, not a traceback."""
    validity = bench("bench_validity")
    recon = bench("bench_reconstruction")
    accuracy = bench("bench_accuracy")
    data = tmp_path / "ala.h5"
    _alanine_md(data, 20)
    missing = tmp_path / "missing.h5"
    runs = [
        (validity, ["--checkpoints", str(data), "--data", str(data)],
         "not a readable surrogate-md checkpoint"),
        (validity, ["--checkpoints", str(tmp_path / "best.pt"), "--data", str(missing)],
         "no such dataset file"),
        (recon, ["--data", str(missing)], "no such dataset file"),
        # refused before any work (they trained, or ran MD, first)
        (accuracy, ["--system", "ethanol", "--data", str(missing), "--models", "constant",
                    "--seeds", "1", "--out-dir", str(tmp_path / "r")], "no such file (--data)"),
        (bench("bench_surrogate_vs_md"), ["--checkpoint", str(missing), "--quick", "--out-dir",
                                          str(tmp_path / "r")], "no such file (--checkpoint)"),
    ]
    for module, argv, message in runs:
        assert module.main([*argv, "--no-progress"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("error:")]
        assert len(err) == 1 and message in err[0]
        assert str(missing) in err[0] or str(data) in err[0]
    assert not (tmp_path / "r").exists()


def test_quick_threads_run_leaves_the_measured_result_alone(bench, tmp_path, monkeypatch,
                                                           capsys):
    """``--quick`` (a second's worth) without ``--json`` writes no JSON: before, it replaced
    results/threads.json, the measured result the README quotes."""
    mod = bench("bench_threads")
    monkeypatch.setattr(mod, "HERE", tmp_path)
    assert mod.main(["--quick", "--threads", "1"]) == 0
    assert "| 1 | 2 |" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()


def test_command_line_writes_paths_below_the_working_directory_relative(bench, tmp_path,
                                                                        monkeypatch):
    common = bench("common")
    monkeypatch.chdir(tmp_path)
    line = common.command_line("bench_x.py", ["--json", str(tmp_path / "r" / "x.json"),
                                              "--data", "/elsewhere/a b.h5", "--n", "3"])
    assert line == ("python examples/benchmarks/bench_x.py --json r/x.json "
                    "--data '/elsewhere/a b.h5' --n 3")


def test_threads_quick(bench, tmp_path, capsys):
    mod = bench("bench_threads")
    assert mod.main(["--quick", "--threads", "2", "--json", str(tmp_path / "t.json")]) == 0
    tables = _tables(capsys.readouterr().out)
    _machine_and_command(tables, "bench_threads.py")
    body = _check(tables[1])
    assert [(row[0], row[1]) for row in body] == [("2", "1"), ("2", "2"), ("1", "1"), ("1", "2")]
    data = json.loads((tmp_path / "t.json").read_text())
    assert [len(c["seconds"]) for c in data["cases"]] == [1, 2, 1, 2]
    assert all(s > 0 for c in data["cases"] for s in c["seconds"])


def test_engine_energy_plot_uses_the_kept_states_own_times(bench, tmp_path):
    """After a jump that fell back to MD (its state left out of the kept series), the later
    states were drawn one jump too early (their index times the jump); the engine's own times
    are kept now and the plot uses them."""
    import numpy as np

    validity = bench("bench_validity")
    guards = {"jumps_checked": 5, "jumps_failed": 1, "failures": {"energy": 1},
              "actions": {"fallback": 1}, "relaxations": 0, "relax_iterations_used": 0,
              "thresholds": {"energy_jump_kJ_per_mol": 100.0},
              "energy_reference_kJ_per_mol": 5.0}
    run = {"guards": guards, "fallbacks": 1, "times": np.array([4.0, 8.0, 16.0, 20.0]),
           "energies": np.array([1.0, 2.0, 3.0, 4.0])}
    row = {"model": "egno", "jump_ps": 4.0,
           "guards": validity.engine_guard_events(run, np.array([0.0, 1.0, 2.0]))}
    assert validity.kept_times_ns(row) == pytest.approx([0.004, 0.008, 0.016, 0.020])
    assert row["guards"]["kept_energy_above_md_kJ_per_mol"]["series"] == [0.0, 1.0, 2.0, 3.0]
    assert validity.plot_engine_energies([row], None, tmp_path / "e.png", "t").exists()


def test_gpu_script_quick_stages_run_and_write_their_results(tmp_path):
    """``run_gpu.sh OUT quick`` with ``DEVICE=cpu``: the benchmark stages the script chains run
    with the options it passes and write their JSON (the script names a CUDA device and OpenMM's
    CUDA platform by default; the trainer, compile and AdK stages take minutes on two cores, and
    their parts run in their own tests)."""
    import os
    import subprocess

    script = BENCH / "run_gpu.sh"
    import sys

    env = {**os.environ, "DEVICE": "cpu", "STAGES": "training scaling surrogate_ala2",
           "OPENMM_PLATFORM": "CPU", "PYTHON": sys.executable}
    # a stage name it does not know runs nothing and says which it knows
    typo = subprocess.run(["bash", str(script), str(tmp_path / "out"), "quick"],
                          env={**env, "STAGES": "training,scaling"}, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert typo.returncode == 2 and "unknown stage 'training,scaling'" in typo.stderr
    assert "===" not in typo.stdout
    # an output of an earlier call does not survive its stage, failed or not (adk_train fails
    # alone: its MD comes from adk_md in the same call)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "surrogate_vs_md_ala2.json").write_text("{}")
    (tmp_path / "out" / "adk_train.jsonl").write_text("{}")
    alone = subprocess.run(["bash", str(script), str(tmp_path / "out"), "quick"],
                           env={**env, "STAGES": "adk_train"}, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert alone.returncode == 0 and "=== adk_train: exit 2" in alone.stdout, alone.stdout
    assert "no metrics.jsonl to copy" in alone.stdout
    assert not (tmp_path / "out" / "adk_train.jsonl").exists()
    done = subprocess.run(["bash", str(script), str(tmp_path / "out"), "quick"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout
    assert "=== training: exit 0" in log and "=== scaling: exit 0" in log, log[-2000:]
    assert "=== surrogate_ala2: exit 0" in log, log[-2000:]
    assert "=== trainer" not in log and "=== compile" not in log and "=== adk_md" not in log
    training = json.loads((tmp_path / "out" / "training.json").read_text())
    names = [c["config"]["name"] for c in training["configs"]]
    assert "egno aspirin" in names and "egno aspirin bf16" in names
    assert all(c["config"]["repeats"] == 2 for c in training["configs"])
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    ala2 = json.loads((tmp_path / "out" / "surrogate_vs_md_ala2.json").read_text())
    (row,) = ala2["systems"]
    assert row["platform"] == "CPU" and row["surrogate"]["guard_action"] == "relax"
    assert row["surrogate"]["jumps"] >= 1 and row["md"]["ns_per_day"] > 0


def test_superposed_motion_leaves_out_rotation_and_translation(bench):
    """The internal part of a motion: nothing for a rigid rotation and translation (a
    reflection is not superposed away), the motion itself for a displacement without either."""
    from surrogate_md.testing import random_orthogonal

    vs_md = bench("bench_surrogate_vs_md")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)) * 5.0
    rot = random_orthogonal(1, reflect=False).numpy()
    assert vs_md.superposed_msd(x @ rot.T + [3.0, -1.0, 2.0], x) < 1e-20
    assert vs_md.superposed_msd(x * [1.0, 1.0, -1.0], x) > 1.0  # a mirror image is not a move
    shift = rng.normal(size=(30, 3)) * 0.01
    shift -= shift.mean(0)
    assert vs_md.superposed_msd(x + shift, x) == pytest.approx((shift ** 2).sum(-1).mean(),
                                                                 rel=0.05)
    # the radius of gyration: unchanged by a rigid motion, halved with the molecule
    rg = vs_md.radius_of_gyration_A(x)
    assert vs_md.radius_of_gyration_A(x @ rot.T + 7.0) == pytest.approx(rg)
    assert vs_md.radius_of_gyration_A(0.5 * x) == pytest.approx(0.5 * rg)
