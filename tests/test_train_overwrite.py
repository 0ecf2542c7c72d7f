"""``--overwrite`` replaces a run only once the new run has passed its start checks.

A new run that fails to start (a typo in data.path, a model that does not fit the data, Ctrl-C
while the data load) puts the previous run back as it was; one that starts leaves no copy of the
old run behind.
"""

from __future__ import annotations

import json

import pytest
import yaml
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

import surrogate_md.train.loop as loop
from surrogate_md.errors import ConfigError
from surrogate_md.train import train
from surrogate_md.train.__main__ import main

QUICK = {"epochs": 1, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


def snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir()}


@pytest.fixture
def previous_run(ala, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(ala, train=QUICK), out)
    return out


def test_overwrite_with_a_typo_in_the_data_path_keeps_the_previous_run(previous_run, tmp_path,
                                                                       capsys):
    before = snapshot(previous_run)
    assert sorted(before) == sorted(loop.RUN_FILES)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "typo.h5", train=QUICK)))
    code = main(["--config", str(cfg_file), "--out", str(previous_run), "--overwrite", "-q"])
    assert code == 2 and "typo.h5" in capsys.readouterr().err
    assert snapshot(previous_run) == before  # every file as it was, no copy left beside them


def test_overwrite_that_fails_after_opening_the_data_keeps_the_previous_run(ala, previous_run):
    before = snapshot(previous_run)
    cfg = tiny_config(ala, train=QUICK)
    cfg["model"]["n_node_types"] = 6  # O (Z = 8) does not fit
    with pytest.raises(ConfigError, match="n_node_types"):
        train(cfg, previous_run, overwrite=True)
    assert snapshot(previous_run) == before


def test_overwrite_interrupted_while_the_data_load_keeps_the_previous_run(ala, previous_run,
                                                                          monkeypatch):
    before = snapshot(previous_run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "prepare_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(ala, train=QUICK), previous_run, overwrite=True)
    assert snapshot(previous_run) == before


def test_overwrite_that_starts_replaces_the_run(ala, previous_run):
    train(tiny_config(ala, train={"epochs": 2, "max_steps_per_epoch": 1}), previous_run,
          overwrite=True)
    assert sorted(p.name for p in previous_run.iterdir()) == sorted(loop.RUN_FILES)
    lines = (previous_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("epoch") for x in lines] == [1, 2, None]


def test_overwrite_killed_during_its_start_checks_leaves_the_run_resumable(ala, previous_run):
    """A SIGKILL between moving the old run aside and the start checks' end leaves its files in
    a hidden folder beside the killed start's config.yaml and train.log (made here by the same
    steps: the run directory prepared for --overwrite, the new config written). The next
    command finds the previous run in place: --resume continues it from its last.pt."""
    before = snapshot(previous_run)
    _, replaced = loop._prepare_run_dir(previous_run, resume=False, overwrite=True)
    assert replaced is not None and sorted(p.name for p in replaced.iterdir()) == sorted(before)
    (previous_run / "config.yaml").write_text("killed start's config\n")
    (previous_run / "train.log").write_text("killed start's log\n")
    train({}, previous_run, resume=True,
          overrides=["train.epochs=2", "train.max_steps_per_epoch=1"])
    assert not replaced.exists()
    assert sorted(p.name for p in previous_run.iterdir()) == sorted(loop.RUN_FILES)
    lines = (previous_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("epoch") for x in lines] == [1, 2, None]  # the old run's epoch 1
    assert (previous_run / "train.log").read_bytes().startswith(before["train.log"])


def test_a_folder_left_by_an_overwrite_that_had_started_is_removed(ala, previous_run):
    leftover = previous_run / ".replaced-run-abc"
    leftover.mkdir()
    (leftover / "last.pt").write_bytes(b"old")
    train(tiny_config(ala, train={"epochs": 2, "max_steps_per_epoch": 1}), previous_run,
          resume=True)
    assert not leftover.exists()


def test_a_deletion_of_the_replaced_run_cut_short_is_finished_not_restored(ala, previous_run,
                                                                           monkeypatch):
    """The replaced run's folder is renamed before it is deleted: what a kill during the
    deletion leaves is removed by the next command, not moved back over the new run's files."""
    before = snapshot(previous_run)
    _, replaced = loop._prepare_run_dir(previous_run, resume=False, overwrite=True)
    (previous_run / "config.yaml").write_text("the new run's config\n")
    with monkeypatch.context() as m:  # the kill: the folder renamed, only best.pt deleted
        m.setattr(loop.shutil, "rmtree", lambda path, **kw: (path / "best.pt").unlink())
        loop._discard_replaced(replaced)
    left = list(previous_run.glob(".discarded-run-*"))
    assert len(left) == 1 and not replaced.exists()
    loop._recover_replaced(previous_run)
    assert not left[0].exists()
    assert (previous_run / "config.yaml").read_text() == "the new run's config\n"
    assert set(before) - {p.name for p in previous_run.iterdir()} >= {"last.pt", "best.pt"}
