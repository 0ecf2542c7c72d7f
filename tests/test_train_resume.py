"""Resume after SIGKILL ends with the same metrics as an uninterrupted run; DDP over gloo.

Kill points are (completed epochs, extra delay in s) pairs: the run is killed that long after its
metrics.jsonl shows that many finished epochs. The default covers one point; the reliability
sweep sets e.g. ``SURROGATE_MD_RESUME_POINTS="0:0.3,1:0,1:0.15,2:0.05,3:0,4:0.1"``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config, torchrun_train

from surrogate_md.checkpoint import load_checkpoint
from surrogate_md.train import train
from surrogate_md.train.__main__ import main

COMPARED = ("epoch", "step", "lr", "train_loss", "train_fmse", "train_amse", "val_fmse",
            "val_amse", "test_fmse", "test_amse", "best_epoch")


def _points():
    text = os.environ.get("SURROGATE_MD_RESUME_POINTS", "1:0.05")
    return [tuple(float(v) for v in p.split(":")) for p in text.split(",") if p]


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


def _config(ala):
    return tiny_config(ala, "egnn", train={"epochs": 4, "batch_size": 4, "lr": 3e-3},
                       data={"counts": [16, 8, 8]})


@pytest.fixture(scope="module")
def reference(ala, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_config(ala), out)
    return out


def _lines(run):
    path = run / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _compare(run, reference):
    a = [json.loads(line) for line in _lines(run)]
    b = [json.loads(line) for line in _lines(reference)]
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in COMPARED:
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-9, abs=1e-12), key
    sa = load_checkpoint(run / "best.pt")["state_dict"]
    sb = load_checkpoint(reference / "best.pt")["state_dict"]
    for key in sb:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("epochs_done, delay_s", _points())
def test_resume_after_sigkill_matches_uninterrupted(ala, reference, tmp_path, epochs_done,
                                                    delay_s):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(ala)))
    run = tmp_path / "run"
    # the killed run uses the thread count of the reference (this process): matrix products
    # split their sums by thread, so runs at different thread counts differ in the last bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "surrogate_md.train", "--config",
                             str(cfg_file), "--out", str(run), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "config.yaml").exists() and len(_lines(run)) >= epochs_done:
                time.sleep(delay_s)
                break
            time.sleep(0.01)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    if not killed:
        pytest.fail(f"the run finished before the kill point ({proc.stderr.read().decode()})")
    for name in ("last.pt", "best.pt"):  # a kill may leave a temp file, never a torn one
        if (run / name).exists():
            load_checkpoint(run / name)
    done_before = len(_lines(run))
    assert done_before < 5  # the run had not finished (4 epochs + the test record)
    assert main(["--resume", str(run), "-q"]) == 0
    _compare(run, reference)


@pytest.mark.slow
def test_ddp_two_processes_gloo(ala, tmp_path):
    cfg = tiny_config(ala, "egnn", train={"epochs": 2, "batch_size": 4})
    run = tmp_path / "ddp"
    res = torchrun_train(cfg, run)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in _lines(run)]
    epochs = [r for r in recs if r["split"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    # each rank saw half of the 48 training windows per epoch: 6 optimiser steps of 4 per rank
    assert all(r["samples"] == 48 for r in epochs)
    assert epochs[-1]["step"] == 12
    log = (run / "train.log").read_text()
    assert "world size 2" in log and log.count("epoch 1/2:") == 1  # rank 0 logs alone
    # the all-reduced validation error equals a single-process evaluation of the exported model
    from surrogate_md.models import build_model
    from surrogate_md.train.config import config_from_dict
    from surrogate_md.train.data import prepare_data
    from surrogate_md.train.loop import evaluate_dataset

    best = load_checkpoint(run / "best.pt")
    model = build_model(best["model"]["name"], best["model"]["config"])
    model.load_state_dict(best["state_dict"])
    prepared = prepare_data(config_from_dict(cfg).data)
    sums = evaluate_dataset(model, prepared.datasets["val"], batch_size=8,
                            device=torch.device("cpu"))
    prepared.close()
    best_epoch = best["metrics"]["best_epoch"]
    assert sums.amse == pytest.approx(epochs[best_epoch - 1]["val_amse"], rel=1e-6)
    assert np.isfinite(recs[-1]["test_amse"])
