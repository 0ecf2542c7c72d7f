"""Evaluation measures clashes and h(r) at every output time of the rollouts, scores files too
short for the training split with --split all, refuses an output location it cannot write before
any work, never leaves an earlier run's report beside an interrupted rewrite, and keeps backbone
torsions inside one chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _train_fixtures import cached, make_adk_backbone, make_alanine_dipeptide, tiny_config

from surrogate_md import metrics as M
from surrogate_md.data import Topology, open_trajectory, write_trajectory
from surrogate_md.errors import DataError
from surrogate_md.evaluate import evaluate
from surrogate_md.evaluate.__main__ import main
from surrogate_md.train import train
from surrogate_md.validity import excluded_pairs

QUIET = {"rollout_jumps": 0, "plots": False}


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def checkpoint(ala, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-review") / "run"
    return train(tiny_config(ala, "egnn", train={"epochs": 1, "max_steps_per_epoch": 2}), out)


@pytest.fixture(scope="module")
def validity_inputs(ala, checkpoint):
    from surrogate_md import Surrogate
    from surrogate_md.train.config import data_config_from_dict
    from surrogate_md.train.data import prepare_data

    sur = Surrogate.load(checkpoint)
    prepared = prepare_data(data_config_from_dict(dict(sur.meta["provenance"]["data_config"]),
                                                  "test"))
    frames = open_trajectory(ala).read(slice(None))[:, sur.model_atoms]
    yield sur, prepared, frames
    prepared.close()


def _first(source, n: int, path):
    """The first ``n`` frames of the dataset file ``source`` in a new file ``path``."""
    with open_trajectory(source) as f:
        return write_trajectory(path, f.topology, f.read(slice(0, n)), f.time_ps[:n],
                                f.metadata, velocities=f.read(slice(0, n), "velocities"))


def test_clashes_and_h_r_see_the_end_of_every_jump(validity_inputs):
    """Rollout frames come jump by jump (4 rollouts x 10 jumps x P = 5 here): clashes and h(r)
    must see every output time, the jump ends (fed back as the next input) included."""
    from surrogate_md.evaluate.core import _validity

    sur, prepared, frames = validity_inputs
    ref = frames[:200]
    ends = np.arange(4, 200, 5)  # the last output frame of each jump
    n = ref.shape[1]
    near = set(excluded_pairs(sur.validity.bonds, n).tolist())
    a, b = next((i, j) for i in range(n) for j in range(i + 1, n) if i * n + j not in near)
    pred = ref.copy()
    pred[ends, b] = pred[ends, a] + np.array([0.5, 0.0, 0.0])  # 0.5 Å apart, 3+ bonds away
    clash = _validity(sur, prepared, pred, ref)["min_nonbonded_distance_A"]
    assert clash["model_clash_fraction"] == pytest.approx(len(ends) / 200)
    assert clash["model_frames_checked"] == 200
    assert clash["model_min"] <= 0.5 + 1e-9 < clash["clash_threshold_A"]
    assert clash["reference_clash_fraction"] == 0.0
    blown = ref.copy()
    centre = ref[ends].mean(axis=1, keepdims=True)
    blown[ends] = (ref[ends] - centre) * 4 + centre  # only the jump ends blow apart
    h = _validity(sur, prepared, blown, ref)["distance_histogram"]
    assert h["model_fraction_beyond_max"] > 0 and h["reference_fraction_beyond_max"] == 0


def test_radius_of_gyration_counts_the_compacted_jump_ends(validity_inputs):
    """Jump ends shrunk about their centroid fall below the size check's range; the reference
    frames (the training data's) lie inside it."""
    from surrogate_md.evaluate.core import _validity

    sur, prepared, frames = validity_inputs
    ref = frames[:200]
    lo, hi = sur.validity.gyration_range_A
    ends = np.arange(4, 200, 5)
    shrunk = ref.copy()
    centre = ref[ends].mean(axis=1, keepdims=True)
    shrunk[ends] = (ref[ends] - centre) * 0.7 + centre
    g = _validity(sur, prepared, shrunk, ref)["radius_of_gyration_A"]
    assert g["allowed"] == pytest.approx([lo, hi])
    assert g["reference_outside_fraction"] == 0.0
    assert g["model_outside_fraction"] == pytest.approx(len(ends) / 200)
    assert g["model_min"] < lo <= g["reference_min"]
    # the frames left alone keep their sizes (the largest MD frame may be one of the ends: the
    # fixture's MD differs from run to run of the multi-threaded platform)
    from surrogate_md.validity import radius_of_gyration

    kept = np.setdiff1d(np.arange(200), ends)
    assert g["model_max"] == pytest.approx(float(radius_of_gyration(ref[kept]).max()))
    assert g["model_max"] <= g["reference_max"]


def test_split_all_scores_a_file_too_short_for_the_training_split(ala, checkpoint, tmp_path):
    """30 frames hold 20 windows of 0.2 ps (10 frames); the training run's blocked split needs
    two gaps of a window between its blocks and cannot cut them."""
    short = _first(ala, 30, tmp_path / "short.h5")
    assert main([str(checkpoint), "--data", str(short), "--out", str(tmp_path / "all"),
                 "--split", "all", "--rollout-jumps", "1", "-q"]) == 0
    res = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert res["n_windows"] == 20
    assert any("every window they hold (20)" in w for w in res["warnings"])
    x = open_trajectory(short).read(slice(None))
    by_hand = ((x[10:30] - x[0:20]) ** 2).sum(-1).mean()  # constant floor, t0 = 0..19
    assert res["errors"]["models"]["constant"]["fmse"] == pytest.approx(by_hand, rel=1e-5)
    assert "every window they hold" in (tmp_path / "all" / "report.md").read_text()
    with pytest.raises(DataError, match="too few for one window"):  # no window at all
        evaluate(checkpoint, _first(ala, 10, tmp_path / "tiny.h5"), tmp_path / "none",
                 split="all", **QUIET)


def test_interrupted_overwrite_leaves_no_report_of_the_earlier_run(ala, checkpoint, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "report"
    evaluate(checkpoint, ala, out, **QUIET)
    from surrogate_md.evaluate import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_plots", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, ala, out, protocol="s2s", rollout_jumps=0, overwrite=True)
    # the s2t report and metrics would pass for the s2s run's
    assert not (out / "report.md").exists() and not (out / "metrics.json").exists()
    monkeypatch.undo()
    evaluate(checkpoint, ala, out, protocol="s2s", **QUIET)  # no --overwrite needed
    assert json.loads((out / "metrics.json").read_text())["protocol"] == "s2s"
    assert "protocol `s2s`" in (out / "report.md").read_text()


def test_an_output_location_that_cannot_be_written_is_refused_before_any_work(ala, checkpoint,
                                                                             tmp_path, capsys):
    """A symbolic link to a directory that is gone (an unmounted scratch disk): the report
    could not be written after the whole evaluation."""
    (tmp_path / "results").symlink_to(tmp_path / "gone")
    out = tmp_path / "results" / "report"
    assert main([str(checkpoint), "--data", str(ala), "--out", str(out), "--rollout-jumps",
                 "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report there" in err and "symbolic link" in err
    assert (tmp_path / "results").is_symlink() and not (tmp_path / "gone").exists()
    # and a location that can be written is left as it was until the report is written
    fresh = tmp_path / "new" / "deeper"
    with pytest.raises(DataError):
        evaluate(checkpoint, tmp_path / "missing.h5", fresh, **QUIET)
    assert not (tmp_path / "new").exists()


def test_backbone_torsions_stay_inside_each_chain_when_numbering_runs_on(tmp_path_factory):
    """Two copies of the AdK backbone (residues 1-30) as one segment numbered 1-60, as an Amber
    prmtop of a dimer gives them: no phi or psi may take an atom of the other chain, and the
    CA-CA pairs of the chain-break measure agree."""
    adk = open_trajectory(cached(tmp_path_factory, "adk-backbone", make_adk_backbone))
    top, n = adk.topology, adk.topology.n_atoms
    dimer = Topology(np.tile(top.atomic_numbers, 2), np.tile(top.masses, 2),
                     np.tile(top.atom_names, 2),
                     np.concatenate([top.residue_ids, top.residue_ids + 30]),
                     np.tile(top.residue_names, 2), np.concatenate([top.bonds, top.bonds + n]),
                     segment_ids=np.full(2 * n, "SYSTEM"))
    one = M.backbone_torsion_atoms(top)
    two = M.backbone_torsion_atoms(dimer)
    for kind in ("phi", "psi"):
        assert len(one[kind]) == 29
        assert len(two[kind]) == 2 * len(one[kind])
        assert (((two[kind] < n).all(1)) | ((two[kind] >= n).all(1))).all(), kind
    ca = M.consecutive_ca_pairs(dimer)
    assert len(ca) == 58 and ((ca < n).all(1) | (ca >= n).all(1)).all()


def test_fewer_rollouts_than_asked_for_are_a_warning(ala, checkpoint, tmp_path, caplog):
    """21 frames hold 11 windows of 0.2 ps; only the first has reference frames for two jumps, so
    a default run (4 rollouts of 10 jumps) starts one rollout of two jumps: both shortfalls are
    warnings, in the log and in the report, and the report counts in the singular."""
    short = _first(ala, 21, tmp_path / "short.h5")
    with caplog.at_level("WARNING", logger="surrogate_md.evaluate.core"):
        res = evaluate(checkpoint, short, tmp_path / "out", split="all", plots=False)
    roll = res["rollout"]
    assert (roll["n_rollouts"], roll["n_jumps"]) == (1, 2)
    assert (roll["n_rollouts_requested"], roll["n_jumps_requested"]) == (4, 10)
    assert "warnings" not in roll
    count = [w for w in res["warnings"] if "only 1 of the 4 rollouts asked for" in w]
    jumps = [w for w in res["warnings"] if "limited to 2 of the 10 jumps" in w]
    assert len(count) == len(jumps) == 1
    assert count[0] in caplog.text and jumps[0] in caplog.text
    report = (tmp_path / "out" / "report.md").read_text()
    warned = report.split("## Warnings", 1)[1].split("##", 1)[0]
    assert count[0] in warned and jumps[0] in warned
    assert "1 rollout of 2 jumps (asked for: 4 of 10; see Warnings)" in report
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"] == \
        res["warnings"]


def test_report_states_the_collapse_threshold_the_count_used(ala, checkpoint, tmp_path,
                                                             monkeypatch):
    from surrogate_md.evaluate import core

    monkeypatch.setattr(core, "COLLAPSE_A", 0.02)
    res = evaluate(checkpoint, ala, tmp_path / "out", rollout_jumps=2, n_rollouts=1, plots=False)
    bonds = res["rollout"]["validity"]["bond_deviation_A"]
    assert bonds["collapse_threshold_A"] == 0.02
    report = (tmp_path / "out" / "report.md").read_text()
    assert "frames with a bond deviating > 0.02 Å (collapse)" in report
    assert "> 0.5 Å" not in report


def test_torsion_sampling_floor_needs_enough_reference_frames(validity_inputs, tmp_path):
    """The floor compares the first half of the reference frames with the second: with a frame
    or two in each half it is no floor at all, and the report says so instead of a number."""
    from surrogate_md.evaluate.core import TORSION_FLOOR_MIN_FRAMES, _validity
    from surrogate_md.evaluate.report import write_report

    sur, prepared, frames = validity_inputs
    for n in (1, 4, 2 * TORSION_FLOOR_MIN_FRAMES - 1):
        tors = _validity(sur, prepared, frames[100:100 + n], frames[:n])["torsions"]
        assert tors["reference_split_half"] is None and tors["reference_frames"] == n
    enough = 2 * TORSION_FLOOR_MIN_FRAMES
    floor = _validity(sur, prepared, frames[100:140], frames[:enough])["torsions"]
    assert set(floor["reference_split_half"]) == {"js_phi_psi", "js_phi", "js_psi"}

    def report(tors):
        roll = {"n_rollouts": 1, "n_jumps": 1, "times_ps": [0.1], "mse_vs_time": {},
                "validity": {"torsions": tors}}
        result = {"checkpoint": "best.pt", "model": "egnn", "checkpoint_hash": "0", "data": [],
                  "split": "test", "n_windows": 1, "protocol": "s2t", "jump_ps": 0.2,
                  "errors": {"models": {}, "times_ps": []}, "rollout": roll}
        return write_report(result, tmp_path / "report.md").read_text()

    few = _validity(sur, prepared, frames[100:104], frames[:4])["torsions"]
    text = report(few)
    assert "| n/a * |" in text and "n/a / n/a * |" in text
    assert "No sampling floor" in text and "the reference holds 4 frames" in text
    assert f"needs at least {2 * TORSION_FLOOR_MIN_FRAMES})" in text
    assert "is the sampling floor" not in text
    text = report(floor)
    assert "is the sampling floor" in text and "n/a" not in text
