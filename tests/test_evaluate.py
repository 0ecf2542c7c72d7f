"""Evaluation: errors with baselines, rollouts, validity measures, report and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md import metrics as M
from surrogate_md.data import open_trajectory
from surrogate_md.errors import ConfigError
from surrogate_md.evaluate import evaluate
from surrogate_md.evaluate.__main__ import main
from surrogate_md.testing import random_orthogonal
from surrogate_md.train import train


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def checkpoint(ala, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    return train(tiny_config(ala, "egnn", train={"epochs": 1, "max_steps_per_epoch": 2}), out)


def test_evaluate_writes_report_with_baselines(ala, checkpoint, tmp_path):
    out = tmp_path / "report"
    assert main([str(checkpoint), "--data", str(ala), "--out", str(out), "--rollout-jumps", "3",
                 "--n-rollouts", "2", "-q"]) == 0
    for name in ("report.md", "metrics.json", "error_per_offset.png", "rollout_error.png",
                 "bond_deviation.png", "torsions.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "metrics.json").read_text())
    models = res["errors"]["models"]
    assert set(models) == {"egnn", "constant", "linear"}
    # the run's own test metrics and the evaluator's agree (same windows, same weights)
    assert models["egnn"]["amse"] == pytest.approx(res["training_metrics"]["test_amse"],
                                                   rel=1e-4)
    # the constant floor equals the mean squared displacement over the test windows, by hand
    f = open_trajectory(ala)
    from surrogate_md.train.config import config_from_dict
    from surrogate_md.train.data import prepare_data

    prepared = prepare_data(config_from_dict(tiny_config(ala)).data)
    t0 = prepared.windows["test"][:, 1]
    prepared.close()
    by_hand = ((f.read(t0 + 10) - f.read(t0)) ** 2).sum(-1).mean()
    assert models["constant"]["fmse"] == pytest.approx(by_hand, rel=1e-5)
    # how far the jump ends move from their starts: the MD's is that same displacement, the
    # constant model's nothing, the trained model's that of its predictions, by hand
    assert res["errors"]["fmsd_md"] == pytest.approx(by_hand, rel=1e-5)
    assert models["constant"]["fmsd"] == 0.0
    from surrogate_md import Surrogate

    sur = Surrogate.load(checkpoint)
    ends = np.stack([sur.predict(x, v)[-1]
                     for x, v in zip(f.read(t0), f.read(t0, "velocities"))])
    moved = ((ends - f.read(t0)) ** 2).sum(-1).mean()
    assert models["egnn"]["fmsd"] == pytest.approx(moved, rel=1e-3)
    assert 0 < models["egnn"]["fmsd"] < 10 * by_hand
    # size alone: each input scaled about its centroid to its MD end's radius of gyration
    x0, x1 = f.read(t0), f.read(t0 + 10)

    def rg(x):
        return np.sqrt(((x - x.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1))

    c0 = x0.mean(1, keepdims=True)
    sized = c0 + (x0 - c0) * (rg(x1) / rg(x0))[:, None, None]
    assert res["errors"]["sized_copy_fmse"] == pytest.approx(
        ((sized - x1) ** 2).sum(-1).mean(), rel=1e-5)
    roll = res["rollout"]
    assert roll["n_jumps"] == 3 and len(roll["times_ps"]) == 6
    assert set(roll["mse_vs_time"]) == {"egnn", "constant", "linear"}
    val = roll["validity"]
    # the reference MD itself is physically valid by every measure
    assert val["bond_deviation_A"]["reference_max"] < 0.3
    assert val["min_nonbonded_distance_A"]["reference_clash_fraction"] == 0
    assert val["torsions"]["n_residues"] == 1  # alanine dipeptide: one (phi, psi) pair
    report = (out / "report.md").read_text()
    assert "Å² per atom" in report and "| constant |" in report and "| linear |" in report
    assert "moves the atoms" in report and "| MD | – | – |" in report
    assert "Size alone: the input scaled" in report
    assert "Jensen-Shannon" in report and "radius of gyration" in report
    assert val["radius_of_gyration_A"]["reference_mean"] > 0
    # a second run into the same directory is refused
    assert main([str(checkpoint), "--data", str(ala), "--out", str(out), "-q"]) == 2


def test_evaluate_s2s_and_wrong_system(ala, checkpoint, tmp_path):
    res = evaluate(checkpoint, ala, tmp_path / "s2s", protocol="s2s", rollout_jumps=0,
                   plots=False)
    assert res["errors"]["times_ps"] == pytest.approx([0.2])
    assert "rollout" not in res
    from surrogate_md.data import Topology, write_trajectory
    from surrogate_md.errors import DataError

    f = open_trajectory(ala)
    top = f.topology
    other = Topology(top.atomic_numbers[::-1], top.masses[::-1], top.atom_names,
                     top.residue_ids, top.residue_names, top.bonds)
    bad = write_trajectory(tmp_path / "other.h5", other, f.read(slice(None)), f.time_ps,
                           f.metadata)
    with pytest.raises(DataError, match="differ"):
        evaluate(checkpoint, bad, tmp_path / "bad", rollout_jumps=0)


def test_s2s_scores_the_end_of_the_trained_grid(ala, tmp_path):
    # EGNO's temporal convolution mixes the output times: asked for the end time alone it
    # computes something else than its trained grid's last frame, which s2s must score
    ckpt = train(tiny_config(ala, "egno", train={"epochs": 1, "max_steps_per_epoch": 2}),
                 tmp_path / "egno")
    s2t = evaluate(ckpt, ala, tmp_path / "s2t", rollout_jumps=0, plots=False)["errors"]
    s2s = evaluate(ckpt, ala, tmp_path / "s2s", protocol="s2s", rollout_jumps=0,
                   plots=False)["errors"]
    assert s2s["times_ps"] == pytest.approx(s2t["times_ps"][-1:])
    for name in ("egno", "constant", "linear"):
        assert s2s["models"][name]["fmse"] == pytest.approx(
            s2t["models"][name]["mse_per_time"][-1], rel=1e-5), name
    # the end time alone is not the same computation (so the check above can fail)
    from surrogate_md import Surrogate

    sur = Surrogate.load(ckpt)
    f = open_trajectory(ala)
    pos, vel = f.read(slice(0, 1)), f.read(slice(0, 1), "velocities")
    grid = sur.predict(pos, vel)[:, -1]
    alone = sur.predict(pos, vel, times_ps=sur.times_ps[-1:])[:, -1]
    assert not np.allclose(grid, alone, atol=1e-5)


def test_transfer_to_permuted_atoms_scores_the_same(ala, checkpoint, tmp_path):
    # the same MD with the atoms in another order is "another system" atom by atom; transfer
    # selects the nodes afresh and, the models being permutation-equivariant, scores the same
    from surrogate_md.data import Topology, write_trajectory
    from surrogate_md.errors import DataError

    f = open_trajectory(ala)
    top = f.topology
    perm = np.random.default_rng(3).permutation(top.n_atoms)
    inverse = np.argsort(perm)
    other = Topology(top.atomic_numbers[perm], top.masses[perm], top.atom_names[perm],
                     top.residue_ids[perm], top.residue_names[perm], inverse[top.bonds])
    moved = write_trajectory(tmp_path / "perm.h5", other, f.read(slice(None))[:, perm],
                             f.time_ps, f.metadata,
                             velocities=f.read(slice(None), "velocities")[:, perm])
    with pytest.raises(DataError, match="differ"):
        evaluate(checkpoint, moved, tmp_path / "plain", split="all", rollout_jumps=0)
    base = evaluate(checkpoint, ala, tmp_path / "base", split="all", rollout_jumps=0,
                    plots=False)
    assert main([str(checkpoint), "--data", str(moved), "--out", str(tmp_path / "tr"),
                 "--split", "all", "--transfer", "-q"]) == 0
    res = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    assert res["transfer"] and res["n_nodes"] == 22 and "rollout" not in res
    for name, m in base["errors"]["models"].items():
        assert res["errors"]["models"][name]["fmse"] == pytest.approx(m["fmse"], rel=1e-4)
        assert res["errors"]["models"][name]["amse"] == pytest.approx(m["amse"], rel=1e-4)
    assert "transfer: 22 nodes" in (tmp_path / "tr" / "report.md").read_text()


def test_dihedral_against_known_geometry():
    # trans (180) and gauche (+60 / -60 by the IUPAC sign convention) quadruples
    p0, p1, p2 = np.array([1.0, 0, 0]), np.array([0.0, 0, 0]), np.array([0.0, 1.0, 0])
    assert M.dihedral(p0, p1, p2, np.array([-1.0, 1.0, 0])) == pytest.approx(180.0)
    c, s = np.cos(np.radians(60)), np.sin(np.radians(60))
    plus = M.dihedral(p0, p1, p2, np.array([c, 1.0, -s]))
    minus = M.dihedral(p0, p1, p2, np.array([c, 1.0, s]))
    assert abs(plus) == pytest.approx(60.0) and plus == pytest.approx(-minus)
    # rigid motions leave it unchanged; a reflection flips its sign
    pts = np.random.default_rng(0).normal(size=(4, 3))
    rot = random_orthogonal(1, reflect=False).numpy()
    ref = random_orthogonal(1, reflect=True).numpy()
    d = M.dihedral(*pts)
    assert M.dihedral(*(pts @ rot.T + 2.0)) == pytest.approx(d)
    assert M.dihedral(*(pts @ ref.T)) == pytest.approx(-d)


def test_js_divergence_bounds():
    p = np.array([1.0, 0.0, 0.0])
    assert M.js_divergence(p, p) == pytest.approx(0.0, abs=1e-9)
    assert M.js_divergence(p, np.array([0.0, 0.0, 1.0])) == pytest.approx(np.log(2), rel=1e-6)


def test_chain_breaks_and_error_sums():
    frames = np.zeros((2, 3, 3))
    frames[:, 1, 0] = 3.8
    frames[:, 2, 0] = 7.6
    frames[1, 2, 0] = 9.0  # second pair 5.2 Å apart in frame 1
    pairs = np.array([[0, 1], [1, 2]])
    assert M.chain_breaks(frames, pairs).tolist() == [0, 1]
    import torch

    sums = M.ErrorSums()
    pred = torch.zeros(2, 4, 1, 3)
    target = torch.ones(2, 4, 1, 3)
    target[1] *= 2
    sums.add(pred, target)
    assert sums.mse_per_time.tolist() == [3.0, 12.0]  # summed over xyz, mean over atoms
    assert sums.fmse == 12.0 and sums.amse == 7.5


def test_evaluate_skips_rollouts_a_history_model_cannot_feed(ala, tmp_path):
    """ESTAG with history frames 0.02 ps apart and outputs 0.1 ps apart: its one-jump errors are
    scored, its rollout is skipped with the reason (the next history is not predicted)."""
    cfg = tiny_config(ala, "estag", data={"protocol": "history", "history": 3,
                                          "history_stride_ps": 0.02},
                      train={"epochs": 1, "max_steps_per_epoch": 1})
    ckpt = train(cfg, tmp_path / "run")
    res = evaluate(ckpt, ala, tmp_path / "report", rollout_jumps=2, n_rollouts=1, plots=False)
    assert "history stride (0.02 ps)" in res["rollout"]["skipped"]
    assert np.isfinite(res["errors"]["models"]["estag"]["fmse"])
    assert "Rollout skipped" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(ConfigError, match="max-windows"):
        evaluate(ckpt, ala, tmp_path / "again", max_windows=0)
