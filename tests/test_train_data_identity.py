"""A resumed run checks that its dataset files still hold the frames it was trained on.

last.pt records :func:`surrogate_md.train.data.data_identity` of every file; a resume on a file
regenerated, extended or cut at the same path is refused, a copy of the same data (new mtime) is
not, and a last.pt from before the record resumes with a warning.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md.checkpoint import load_checkpoint, save_checkpoint
from surrogate_md.data import Topology, open_trajectory, write_trajectory
from surrogate_md.errors import CheckpointError
from surrogate_md.train import train
from surrogate_md.train.data import data_identity

QUICK = {"epochs": 1, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def ala_regenerated(tmp_path_factory):
    """The same system and length as ``ala``, run again with another seed."""
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide, seed=7)


def epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "epoch"]


def test_resume_refuses_a_dataset_regenerated_at_the_same_path(ala, ala_regenerated, tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(ala, data)
    out = tmp_path / "run"
    train(tiny_config(data, train=QUICK), out)
    recorded = load_checkpoint(out / "last.pt")["provenance"]["data_identity"]
    assert [r["path"] for r in recorded] == [str(data)] and recorded[0]["n_frames"] == 400
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.log"}

    shutil.copy(ala_regenerated, data)  # same size, same number of frames, other MD
    assert data.stat().st_size == ala.stat().st_size
    with pytest.raises(CheckpointError) as info:
        train({}, out, resume=True, overrides=["train.epochs=2"])
    message = str(info.value)
    assert f"the dataset file {data} changed" in message and "last.pt" in message
    assert "--out" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.log"} == files

    shutil.copy(ala, data)  # the original data again, in a new file (new mtime): resumes
    train({}, out, resume=True, overrides=["train.epochs=2"])
    assert epochs(out) == [1, 2]


def test_last_pt_without_the_record_resumes_with_a_warning(ala, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny_config(ala, train=QUICK), out)
    old = load_checkpoint(out / "last.pt")
    del old["provenance"]["data_identity"]  # as written before the record existed
    save_checkpoint(out / "last.pt", {k: v for k, v in old.items()
                                      if k not in ("format", "format_version")})
    with caplog.at_level(logging.WARNING, logger="surrogate_md.train.loop"):
        train({}, out, resume=True, overrides=["train.epochs=2"])
    warned = [r.getMessage() for r in caplog.records if "records no identity" in r.getMessage()]
    assert len(warned) == 1 and str(ala) in warned[0]
    assert epochs(out) == [1, 2]
    assert load_checkpoint(out / "last.pt")["provenance"]["data_identity"][0]["n_frames"] == 400


def _write(path, positions, *, seed=0, velocities=True):
    n_frames, n_atoms = positions.shape[:2]
    top = Topology(atomic_numbers=[6] * n_atoms, masses=[12.0] * n_atoms,
                   atom_names=[f"C{i}" for i in range(n_atoms)], residue_ids=[1] * n_atoms,
                   residue_names=["MOL"] * n_atoms, bonds=[[i, i + 1] for i in range(n_atoms - 1)],
                   segment_ids=["A"] * n_atoms)
    vel = np.zeros_like(positions) if velocities else None
    write_trajectory(path, top, positions, np.arange(n_frames) * 0.01 + 0.01,
                     {"interval_ps": 0.01, "seed": seed}, velocities=vel, overwrite=True)
    f = open_trajectory(path)
    try:
        return {k: v for k, v in data_identity(f).items() if k != "path"}
    finally:
        f.close()


def test_data_identity_tells_content_not_bytes(tmp_path):
    pos = np.random.default_rng(0).normal(size=(50, 5, 3))
    same = _write(tmp_path / "a.h5", pos)
    assert _write(tmp_path / "b.h5", pos) == same  # another file of the same data
    # extended by a frame, another seed in the metadata, a changed frame among the sampled ones,
    # velocities dropped: each is another dataset
    assert _write(tmp_path / "c.h5", np.concatenate([pos, pos[-1:]]))["n_frames"] == 51
    assert _write(tmp_path / "c.h5", pos, seed=1)["sha256"] != same["sha256"]
    moved = pos.copy()
    moved[-1, 2, 0] += 1e-3
    assert _write(tmp_path / "c.h5", moved)["sha256"] != same["sha256"]
    assert _write(tmp_path / "c.h5", pos, velocities=False)["fields"] == ["positions"]
