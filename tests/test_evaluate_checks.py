"""Evaluation refuses or flags what would make its numbers wrong: a re-cut split on other files,
a made-up split, velocities of another kind, data at another interval, a diverging rollout,
plot values from one corner of the rollouts, a blown-apart structure the h(r) MAE cannot see,
and stale plots of an earlier run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md import metrics as M
from surrogate_md.checkpoint import load_checkpoint, save_checkpoint
from surrogate_md.data import open_trajectory, write_trajectory
from surrogate_md.errors import ConfigError, DataError
from surrogate_md.evaluate import evaluate
from surrogate_md.evaluate.__main__ import main
from surrogate_md.train import train

QUIET = {"rollout_jumps": 0, "plots": False}
PLOT_NAMES = ("error_per_offset.png", "rollout_error.png", "bond_deviation.png", "torsions.png")


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def ala_other(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide, seed=1)


@pytest.fixture(scope="module")
def checkpoint(ala, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-checks") / "run"
    return train(tiny_config(ala, "egnn", train={"epochs": 1, "max_steps_per_epoch": 2}), out)


@pytest.fixture(scope="module")
def paper_checkpoint(ala, ala_other, tmp_path_factory):
    """Trained on [ala, ala_other] with the paper split (random start frames in both files)."""
    data = {"path": [str(ala), str(ala_other)], "split": "paper", "margin_frames": 0,
            "counts": [300, 60, 60]}
    out = tmp_path_factory.mktemp("eval-checks-paper") / "run"
    return train(tiny_config(ala, "egnn", data=data,
                             train={"epochs": 1, "max_steps_per_epoch": 2}), out)


def _edited(src, dst, edit):
    """``dst`` = checkpoint ``src`` after ``edit(payload)`` changed it in place."""
    data = load_checkpoint(src)
    edit(data)
    return save_checkpoint(dst, data)


def _copy(src, dst, *, interval_ps=None, velocities=True):
    """The frames of ``src`` in a new file, optionally without velocities or at another
    saved-frame interval (the same positions, only the time axis relabelled)."""
    f = open_trajectory(src)
    iv = interval_ps or f.interval_ps
    return write_trajectory(dst, f.topology, f.read(slice(None)),
                            np.arange(1, f.n_frames + 1) * iv, {**f.metadata, "interval_ps": iv},
                            velocities=f.read(slice(None), "velocities") if velocities else None)


# -- D1: a re-cut split needs the training files in the training order ------------------------
def test_recut_split_refuses_other_files_another_order_or_a_subset(ala, ala_other,
                                                                   paper_checkpoint, tmp_path):
    # the paper split draws its windows from the files in their order: [b, a] puts 23 of the
    # 60 "test" windows among the training ones (measured), so it must be refused
    for given in ([ala_other, ala], [ala], [ala_other]):
        with pytest.raises(ConfigError) as err:
            evaluate(paper_checkpoint, given, tmp_path / "x", **QUIET)
        msg = str(err.value)
        assert "same files in the same order" in msg and "--split all" in msg
        assert str(ala) in msg and str(ala_other) in msg  # both lists are named
    # the training files in the training order are the held-out test split, without warning
    res = evaluate(paper_checkpoint, [ala, ala_other], tmp_path / "test", **QUIET)
    assert res["n_windows"] == 60 and res["warnings"] == []
    # --split all over training files scores training windows: said in the report
    res = evaluate(paper_checkpoint, [ala_other, ala], tmp_path / "all", split="all", **QUIET)
    assert any("trained on" in w and "not held-out" in w for w in res["warnings"])
    assert "not held-out" in (tmp_path / "all" / "report.md").read_text()


def test_recut_split_refuses_a_file_rewritten_at_the_training_path(ala, ala_other, tmp_path):
    import shutil

    data = tmp_path / "md.h5"
    shutil.copy(ala, data)
    ckpt = train(tiny_config(data, "egnn", train={"epochs": 1, "max_steps_per_epoch": 1}),
                 tmp_path / "run")
    moved = tmp_path / "moved" / "md.h5"  # the same file elsewhere is still the training file
    moved.parent.mkdir()
    shutil.copy(data, moved)
    assert evaluate(ckpt, moved, tmp_path / "moved-report", **QUIET)["n_windows"] > 0
    shutil.copy(ala_other, data)  # regenerated MD (another seed) at the training path
    with pytest.raises(ConfigError, match=r"md\.h5: the training file's path, but not its "
                                          r"content \(metadata seed: 0 at training, 1 now"):
        evaluate(ckpt, data, tmp_path / "x", **QUIET)


# -- D2: no recorded data config, no re-cut split -----------------------------------------------
def test_checkpoint_without_data_config_refuses_a_made_up_split(ala, checkpoint, tmp_path,
                                                                caplog):
    def strip(data):
        data["provenance"] = {}

    ckpt = _edited(checkpoint, tmp_path / "noprov.pt", strip)
    with pytest.raises(ConfigError, match=r"noprov\.pt: its provenance records no data_config"
                                          r".*--split all"):
        evaluate(ckpt, ala, tmp_path / "x", **QUIET)
    assert main([str(ckpt), "--data", str(ala), "--out", str(tmp_path / "cli"), "--split", "val",
                 "--rollout-jumps", "0", "-q"]) == 2
    with caplog.at_level(logging.WARNING):
        res = evaluate(ckpt, ala, tmp_path / "all", split="all", **QUIET)
    assert res["n_windows"] > 0 and "records no training data files" in caplog.text


# -- D3: velocities of another kind than the model's are flagged, also without --transfer -------
def test_velocity_source_mismatch_is_warned_and_reported(ala, checkpoint, tmp_path, caplog):
    no_v = _copy(ala, tmp_path / "no-velocities.h5", velocities=False)
    with caplog.at_level(logging.WARNING):
        res = evaluate(checkpoint, no_v, tmp_path / "fd", split="all", **QUIET)
    assert "finite differences" in caplog.text and "trained on velocities stored" in caplog.text
    saved = json.loads((tmp_path / "fd" / "metrics.json").read_text())
    assert saved["velocity_source"] == "finite_difference"
    assert saved["model_velocity_source"] == "file"
    assert any("velocities" in w for w in saved["warnings"])
    report = (tmp_path / "fd" / "report.md").read_text()
    assert ("input velocities: finite differences of positions one frame apart (frames every "
            "0.02 ps); the model's training velocities: stored in the file" in report)
    assert res["warnings"] == saved["warnings"]

    # a model of finite-difference velocities over 0.01 ps frames, fed differences over 0.02 ps
    def fd_model(data):
        data["protocol"].update(velocity_source="finite_difference", interval_ps=0.01)

    fd = _edited(checkpoint, tmp_path / "fd.pt", fd_model)
    res = evaluate(fd, no_v, tmp_path / "interval", split="all", **QUIET)
    assert any("0.02 ps, the model's were over 0.01 ps" in w for w in res["warnings"])
    # an interval that differs in the 8th digit (a DCD's single-precision time stamps against
    # a --dt-ps ingest of the same frames) is the same interval
    def stamped(data):
        data["protocol"].update(velocity_source="finite_difference", interval_ps=0.019999998)

    res = evaluate(_edited(checkpoint, tmp_path / "stamped.pt", stamped), no_v,
                   tmp_path / "stamped", split="all", **QUIET)
    assert not any("velocit" in w for w in res["warnings"])
    # same kind and interval: nothing to say about velocities
    res = evaluate(checkpoint, ala, tmp_path / "same", **QUIET)
    assert not any("velocit" in w for w in res["warnings"])


def test_a_finite_difference_model_is_scored_on_differences_where_files_store_velocities(
        ala, checkpoint, tmp_path):
    """A model trained on finite differences (MD17 positions, or data.velocities: difference)
    scored on data made with velocities gets the inputs it was trained on: differences over one
    saved frame, and no warning (before: the stored velocities, and a warning that the inputs
    differ from training)."""
    def fd_model(data):
        data["protocol"].update(velocity_source="finite_difference")

    fd = _edited(checkpoint, tmp_path / "fd.pt", fd_model)
    res = evaluate(fd, ala, tmp_path / "fd", **QUIET)
    assert res["velocity_source"] == res["model_velocity_source"] == "finite_difference"
    assert not any("velocit" in w for w in res["warnings"])
    # the same windows with the stored velocities give other errors: the inputs did change
    stored = evaluate(checkpoint, ala, tmp_path / "stored", **QUIET)
    assert stored["velocity_source"] == "file"
    assert res["errors"] != stored["errors"]


# -- D4: a diverging rollout is cut and recorded, the evaluation goes on ------------------------
def _diverging_predict(monkeypatch, refuse: bool):
    """Surrogate.predict that moves the molecule 500 Å away in the first jump; the next jump
    (input far away) gives NaN (``refuse=False``) or is refused with a DataError."""
    from surrogate_md import Surrogate

    real = Surrogate.predict

    def predict(self, positions, velocities=None, history=None, times_ps=None):
        if np.abs(positions).max() > 100:
            if refuse:
                raise DataError("positions look like nm, not Å")
            return real(self, positions - 500, velocities, history, times_ps) * np.nan
        return real(self, positions, velocities, history, times_ps) + 500.0

    monkeypatch.setattr(Surrogate, "predict", predict)


@pytest.mark.parametrize("jumps", [2, 3])  # 3: the NaN state is refused as the third input
def test_non_finite_rollout_is_cut_at_its_first_bad_jump(ala, checkpoint, tmp_path,
                                                         monkeypatch, jumps):
    _diverging_predict(monkeypatch, refuse=False)
    res = evaluate(checkpoint, ala, tmp_path / "r", rollout_jumps=jumps, n_rollouts=2)
    roll = json.loads((tmp_path / "r" / "metrics.json").read_text())["rollout"]
    assert [r["diverged_at_jump"] for r in roll["rollouts"]] == [2, 2]
    assert [r["diverged_at_ps"] for r in roll["rollouts"]] == [pytest.approx(0.4)] * 2
    assert "diverged at jump 2 (0.4 ps): non-finite positions" in roll["rollouts"][0]["divergence"]
    curve = roll["mse_vs_time"]["egnn"]
    assert all(v is not None for v in curve[:2]) and all(v is None for v in curve[2:])
    assert all(v is not None for v in roll["mse_vs_time"]["constant"])
    assert roll["validity"]["bond_deviation_A"]["model_max"] < 1.0  # the good jump only
    assert res["errors"]["models"]["egnn"]["fmse"] > 0  # one-jump errors are still there
    report = (tmp_path / "r" / "report.md").read_text()
    assert "2 of 2 rollouts diverged" in report and "diverged at jump 2 (0.4 ps)" in report


def test_refused_rollout_state_is_a_divergence_but_a_refused_reference_is_an_error(
        ala, checkpoint, tmp_path, monkeypatch):
    _diverging_predict(monkeypatch, refuse=True)
    res = evaluate(checkpoint, ala, tmp_path / "r", rollout_jumps=3, n_rollouts=2)
    roll = res["rollout"]
    assert [r["diverged_at_jump"] for r in roll["rollouts"]] == [1, 1]
    assert "refused its end state as the next input (positions look like nm" in \
        roll["rollouts"][0]["divergence"]
    assert np.isnan(roll["mse_vs_time"]["egnn"]).all()
    assert "skipped" in roll["validity"]
    assert (tmp_path / "r" / "report.md").is_file()

    from surrogate_md import Surrogate

    def refuse_all(self, *args, **kwargs):
        raise DataError("the reference frame is refused")

    monkeypatch.setattr(Surrogate, "predict", refuse_all)
    with pytest.raises(DataError, match="the reference frame is refused"):
        evaluate(checkpoint, ala, tmp_path / "ref", rollout_jumps=2, n_rollouts=2)


# -- D5, D6 and the torsion floor: what _validity keeps and measures -----------------------------
@pytest.fixture(scope="module")
def validity_inputs(ala, checkpoint):
    from surrogate_md import Surrogate
    from surrogate_md.train.config import data_config_from_dict
    from surrogate_md.train.data import prepare_data

    sur = Surrogate.load(checkpoint)
    dc = dict(sur.meta["provenance"]["data_config"])
    prepared = prepare_data(data_config_from_dict(dc, "test"))
    frames = open_trajectory(ala).read(slice(None))[:, sur.model_atoms]
    yield sur, prepared, frames
    prepared.close()


def test_plot_values_are_spread_over_every_rollout_and_time(validity_inputs):
    from surrogate_md.evaluate.core import _validity

    sur, prepared, frames = validity_inputs
    ref = np.concatenate([frames] * 60)  # 24000 frames (rollout-major in evaluate)
    pred = ref.copy()
    a, b = sur.validity.bonds[0]
    pred[12000:, b] += pred[12000:, b] - pred[12000:, a]  # bond 0 doubled in the late half
    pred[21000:] *= -1  # the last frames mirrored: their torsions change sign
    out = _validity(sur, prepared, pred, ref)
    bonds = out["bond_deviation_A"]
    n_bonds = len(sur.validity.bonds)
    assert len(bonds["model_values"]) <= 20000
    assert len(bonds["model_values"]) % n_bonds == 0  # whole frames, every bond of each
    values = np.array(bonds["model_values"]).reshape(-1, n_bonds)
    assert max(bonds["model_values"]) == pytest.approx(bonds["model_max"], rel=0.05)
    assert np.mean(values[:, 0] > 0.5) == pytest.approx(0.5, abs=0.02)  # late frames kept too
    tors = out["torsions"]
    phi_m, phi_r = np.array(tors["model_phi"]), np.array(tors["reference_phi"])
    assert len(phi_m) == len(phi_r) <= 20000
    flipped = np.isclose(phi_m, -phi_r, atol=1e-6) & ~np.isclose(phi_r, 0, atol=1e-3)
    assert np.mean(flipped) == pytest.approx(3000 / 24000, abs=0.01)


def test_h_r_reports_the_pairs_beyond_its_range(validity_inputs, tmp_path):
    from surrogate_md.evaluate.core import _validity
    from surrogate_md.evaluate.report import write_report

    sur, prepared, frames = validity_inputs
    ref = frames[::10]  # 40 frames: _validity measures h(r) on at most 40
    bins = np.linspace(0.0, 20.0, 201)
    # inside the range, h(r) is the plain normalised histogram of every pair distance
    i, j = np.triu_indices(ref.shape[1], 1)
    d = np.linalg.norm(ref[:, i] - ref[:, j], axis=-1)
    by_hand = np.histogram(d.ravel(), bins)[0] / d.size
    assert np.allclose(M.distance_histogram(ref, bins), by_hand)
    assert M.fraction_pairs_beyond(ref, 20.0) == 0.0
    blown = (ref - ref.mean(1, keepdims=True)) * 3
    beyond = float(np.mean(np.linalg.norm(blown[:, i] - blown[:, j], axis=-1) > 20.0))
    assert 0 < beyond < 1 and M.fraction_pairs_beyond(blown, 20.0) == pytest.approx(beyond)
    out = _validity(sur, prepared, blown, ref)["distance_histogram"]
    assert out["model_fraction_beyond_max"] == pytest.approx(beyond)
    assert out["reference_fraction_beyond_max"] == 0.0
    assert out["fraction_beyond_max_difference"] == pytest.approx(beyond)
    same = _validity(sur, prepared, ref, ref)
    assert same["distance_histogram"]["mae"] == 0.0
    # the torsion JS floor: the reference's first half against its second half
    half = len(ref) // 2
    q = M.backbone_torsion_atoms(prepared.topology, sur.model_atoms)
    phi, psi = M.torsions(ref, q["phi"]), M.torsions(ref, q["psi"])
    floor = M.js_divergence(M.torsion_histogram(phi[:half], psi[:half]),
                            M.torsion_histogram(phi[half:], psi[half:]))
    assert same["torsions"]["reference_split_half"]["js_phi_psi"] == pytest.approx(floor)
    assert same["torsions"]["js_phi_psi"] == pytest.approx(0.0, abs=1e-9)
    result = {"checkpoint": "x.pt", "checkpoint_hash": "h", "model": "egnn", "data": ["a.h5"],
              "split": "test", "n_windows": 1, "protocol": "s2t", "jump_ps": 0.2,
              "errors": {"times_ps": [0.2], "models": {}},
              "rollout": {"n_rollouts": 1, "n_jumps": 1, "times_ps": [0.2],
                          "mse_vs_time": {}, "validity": {"distance_histogram": out,
                                                          "torsions": same["torsions"]}}}
    report = write_report(result, tmp_path / "report.md").read_text()
    assert "fraction of atom pairs beyond 20 Å" in report and "sampling floor" in report


# -- D7: output location, data interval, time grid -----------------------------------------------
def test_out_naming_a_file_is_refused_before_any_work(ala, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    # the checkpoint does not even exist: the output location is checked first
    with pytest.raises(ConfigError, match="not a directory"):
        evaluate(tmp_path / "missing.pt", ala, target)
    assert main([str(tmp_path / "missing.pt"), "--data", str(ala), "--out", str(target),
                 "-q"]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        evaluate(tmp_path / "missing.pt", ala, target / "report")


def test_data_at_an_interval_that_cannot_give_the_time_grid_names_file_and_grid(
        ala, checkpoint, tmp_path):
    other = _copy(ala, tmp_path / "every-0.03ps.h5", interval_ps=0.03)
    with pytest.raises(ConfigError) as err:
        evaluate(checkpoint, other, tmp_path / "x", split="all", **QUIET)
    msg = str(err.value)
    assert str(other) in msg and "every 0.03 ps" in msg
    assert "jumps 0.2 ps with outputs at [0.1, 0.2] ps" in msg and "0.02 ps" in msg


def test_windows_must_carry_the_trained_time_grid(ala, checkpoint, tmp_path):
    def one_output(data):  # a recorded data config that disagrees with the protocol
        data["provenance"]["data_config"]["n_out"] = 1

    ckpt = _edited(checkpoint, tmp_path / "disagree.pt", one_output)
    with pytest.raises(DataError, match=r"outputs at \[0.2\] ps, the model's trained grid is "
                                        r"\[0.1, 0.2\] ps"):
        evaluate(ckpt, ala, tmp_path / "x", **QUIET)


def test_history_stride_of_one_saved_frame_means_the_trained_stride_in_other_data(ala, tmp_path):
    # trained with history frames one saved frame (0.02 ps) apart; in data saved every 0.01 ps
    # the model's input must still be 0.02 ps apart (two frames), not one frame
    cfg = tiny_config(ala, "estag", data={"protocol": "history", "history": 3},
                      train={"epochs": 1, "max_steps_per_epoch": 1})
    ckpt = train(cfg, tmp_path / "run")
    finer = _copy(ala, tmp_path / "every-0.01ps.h5", interval_ps=0.01)
    res = evaluate(ckpt, finer, tmp_path / "r", split="all", **QUIET)
    assert res["history_stride_ps"] == pytest.approx(0.02)
    assert res["errors"]["times_ps"] == pytest.approx([0.1, 0.2])


# -- D8: --overwrite leaves no plot of the earlier run -------------------------------------------
def test_overwrite_removes_the_plots_this_run_does_not_make(ala, checkpoint, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    for name in (*PLOT_NAMES, "report.md", "mine.png"):
        (out / name).write_text("old")
    evaluate(checkpoint, ala, out, rollout_jumps=0, overwrite=True)
    assert (out / "error_per_offset.png").read_bytes() != b"old"
    for name in ("rollout_error.png", "bond_deviation.png", "torsions.png"):
        assert not (out / name).exists(), name
    assert (out / "mine.png").read_text() == "old"  # not one of the report's plots
    evaluate(checkpoint, ala, out, rollout_jumps=0, overwrite=True, plots=False)
    assert not any((out / name).exists() for name in PLOT_NAMES)
