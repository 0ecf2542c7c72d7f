"""Resume under a changed config, runs that fail to start, and strict-JSON metrics.

- ``--resume`` refuses changed data settings and split/initial-weight seeds (they would mix two
  protocols in one run), and changed ``train.*`` schedule settings take effect from the resumed
  epoch (a finished cosine schedule extended by ``train.epochs`` does not train on at lr 0);
- a run that fails before its first checkpoint leaves nothing that blocks the corrected retry;
- metrics.jsonl stays strict JSON when a split is empty (its errors are ``null``).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md.checkpoint import load_checkpoint
from surrogate_md.errors import CheckpointError, ConfigError, DataError
from surrogate_md.train import train
from surrogate_md.train.__main__ import main
from surrogate_md.train.loop import lr_factor

QUICK = {"epochs": 1, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


def _strict(line: str) -> dict:
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds the non-JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def records(run):
    return [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(ala, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(ala, train=QUICK), out)
    return out


# -- resume under a changed config ----------------------------------------------------------------
@pytest.mark.parametrize("overrides, changed", [
    (["data.jump_ps=0.4"], ["data.jump_ps: 0.2 -> 0.4"]),
    (["data.counts=[40, 16, 16]"], ["data.counts: [48, 16, 16] -> [40, 16, 16]"]),
    (["data.graph.two_hop=false"], ["data.graph.two_hop: True -> False"]),
    (["train.data_seed=7", "train.model_seed=3"],
     ["train.data_seed: 0 -> 7", "train.model_seed: 0 -> 3"]),
])
def test_resume_refuses_changed_data_settings_and_seeds(finished_run, overrides, changed):
    before = {n: (finished_run / n).read_bytes() for n in
              ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")}
    with pytest.raises(CheckpointError) as info:
        train({}, finished_run, resume=True, overrides=["train.epochs=2", *overrides])
    message = str(info.value)
    assert "last.pt" in message and "--out" in message
    for item in changed:
        assert item in message
    # the refused attempt changed nothing: the run still resumes with its own settings
    assert {n: (finished_run / n).read_bytes() for n in before} == before


def test_resume_refusal_on_the_cli_is_one_line(finished_run, capsys):
    assert main(["--resume", str(finished_run), "-q", "--set", "data.selection=heavy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.selection: 'all' -> 'heavy'" in err


def test_extending_a_finished_run_follows_the_new_schedule(ala, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny_config(ala, train={"epochs": 2, "max_steps_per_epoch": 1}), out)
    with caplog.at_level(logging.INFO, logger="surrogate_md.train.loop"):
        train({}, out, resume=True, overrides=["train.epochs=4", "train.lr=1e-3",
                                               "train.weight_decay=0.01"])
    epochs = [r for r in records(out) if r["split"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    # the first two epochs ran on the old 2-epoch schedule at lr 2e-3, the resumed ones on the
    # new 4-epoch schedule at lr 1e-3 (not on the finished schedule's lr of 0)
    assert epochs[1]["lr"] == pytest.approx(2e-3 * lr_factor(1, 2, 0, "cosine"))
    for r in epochs[2:]:
        assert r["lr"] > 0
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["epoch"] - 1, 4, 0, "cosine"),
                                        rel=1e-12)
    state = load_checkpoint(out / "last.pt")["training"]
    groups = state["optimiser"]["param_groups"]
    assert all(g["weight_decay"] == 0.01 and g["initial_lr"] == 1e-3 for g in groups)
    assert state["scheduler"]["base_lrs"] == [1e-3] * len(groups)
    assert state["config"]["train"]["epochs"] == 4
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "train.epochs: 2 -> 4" in logged and "train.lr: 0.002 -> 0.001" in logged


def test_extended_run_matches_a_run_planned_that_long(ala, tmp_path):
    """1 epoch (its lr set by the warmup alone), then extended to 3 on resume: the same lrs and
    errors as a run started with 3 epochs."""
    cfg = tiny_config(ala, train={"epochs": 3, "max_steps_per_epoch": 1, "warmup_epochs": 1})
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    train(cfg, whole)
    train(cfg, extended, overrides=["train.epochs=1"])
    train({}, extended, resume=True, overrides=["train.epochs=3"])
    keys = ("epoch", "lr", "train_amse", "val_amse")
    a = [r for r in records(whole) if r["split"] == "epoch"]
    b = [r for r in records(extended) if r["split"] == "epoch"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert all(r["lr"] > 0 for r in b)


# -- runs that fail to start ----------------------------------------------------------------------
def test_bad_data_path_then_corrected_retry_to_the_same_out(ala, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tiny_config(tmp_path / "missing.h5", train=QUICK)
    with pytest.raises(DataError, match="missing.h5"):
        train(bad, out)
    assert not out.exists()  # this attempt created the directory: it is gone again
    good = tiny_config(ala, train=QUICK)
    assert train(good, out) == out / "best.pt"  # no --overwrite needed
    assert [r["split"] for r in records(out)] == ["epoch", "test"]


def test_failed_start_keeps_a_users_own_directory(ala, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    # fails after the data are read: O (Z = 8) does not fit an embedding of 6 node types
    cfg = tiny_config(ala, train=QUICK)
    cfg["model"]["n_node_types"] = 6
    with pytest.raises(ConfigError, match=r"model\.n_node_types = 6 .* at least 9"):
        train(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    train(tiny_config(ala, train=QUICK), out)
    assert (out / "best.pt").is_file() and (out / "notes.txt").is_file()


def test_failed_resume_keeps_the_run(ala, tmp_path):
    data = tmp_path / "data.h5"
    data.write_bytes(ala.read_bytes())
    out = tmp_path / "run"
    train(tiny_config(data, train=QUICK), out)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.log"}
    data.unlink()
    with pytest.raises(DataError, match="data.h5"):
        train({}, out, resume=True, overrides=["train.epochs=2"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.log"} == files


def test_resume_compares_model_options_with_their_defaults(finished_run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for p in finished_run.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    # egno's default of modes, written out, is the same model
    train({}, copy, resume=True, overrides=["model.modes=2", "train.epochs=1"])
    with pytest.raises(CheckpointError, match="model.modes: 2 -> 3"):
        train({}, copy, resume=True, overrides=["model.modes=3"])


def test_a_run_recorded_before_the_velocities_setting_resumes(finished_run, tmp_path):
    """A run whose last.pt and config.yaml hold no ``data.velocities`` (written before the
    setting existed) ran with its default and resumes (it would be refused as a changed data
    setting, '(unset)' -> 'auto'); asking for another kind of velocities is still refused."""
    import torch
    import yaml

    copy = tmp_path / "run"
    copy.mkdir()
    for p in finished_run.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    last = torch.load(copy / "last.pt", map_location="cpu", weights_only=True)
    last["training"]["config"]["data"].pop("velocities")
    torch.save(last, copy / "last.pt")
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["data"].pop("velocities")
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    train({}, copy, resume=True, overrides=["train.epochs=2"])
    assert [r["epoch"] for r in records(copy) if r.get("split") == "epoch"] == [1, 2]
    with pytest.raises(CheckpointError, match="data.velocities: 'auto' -> 'difference'"):
        train({}, copy, resume=True, overrides=["train.epochs=3", "data.velocities=difference"])


# -- empty splits ---------------------------------------------------------------------------------
def test_empty_val_and_test_splits_write_strict_json(ala, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(ala, train=QUICK, data={"fractions": [1.0, 0.0, 0.0], "counts": None})
    train(cfg, out)
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    epoch, test = records(out)
    assert epoch["val_fmse"] is None and epoch["val_amse"] is None
    assert math.isfinite(epoch["train_amse"])
    assert test["test_fmse"] is None and test["test_amse"] is None
    # per-time errors of no windows are undefined too, not zeros
    assert test["test_mse_per_time"] == [None, None]
    metrics = load_checkpoint(out / "best.pt")["metrics"]
    assert all(math.isnan(v) for v in metrics["test_mse_per_time"])
