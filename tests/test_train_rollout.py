"""Training on chained jumps (``train.rollout_jumps``): windows, the next jump's input, the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config, torchrun_train

from surrogate_md import Surrogate
from surrogate_md.checkpoint import load_checkpoint
from surrogate_md.data import keys as K
from surrogate_md.data.windows import batch_to, collate
from surrogate_md.errors import ConfigError, DataError
from surrogate_md.metrics import batch_amse
from surrogate_md.models import build_model
from surrogate_md.train import train
from surrogate_md.train.config import config_from_dict
from surrogate_md.train.data import prepare_data, rollout_windows
from surrogate_md.train.loop import next_jump_batch

RADIUS = {"graph": {"kind": "radius", "cutoff_A": 3.0}}  # 3 Å: edges that change as atoms move


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rollout_windows_hold_the_frames_of_every_chained_jump(ala):
    """Training items carry the MD frames of the later jumps (t0 + j·ΔT + out_frames); the
    blocked split keeps only windows whose chained jumps end within the frames the training
    block reads; validation and test are the one-jump windows of the plain split."""
    cfg = config_from_dict(tiny_config(ala, data={"counts": None})).data
    plain = prepare_data(cfg)
    chained = prepare_data(cfg, rollout_jumps=3)
    try:
        p = plain.protocol
        train0, train3 = plain.windows["train"], chained.windows["train"]
        assert 0 < len(train3) < len(train0)
        last_read = int(train0[:, 1].max()) + p.jump_frames
        assert int(train3[:, 1].max()) + 3 * p.jump_frames == last_read  # as far as allowed
        assert set(map(tuple, train3)) <= set(map(tuple, train0))
        for split in ("val", "test"):
            assert np.array_equal(chained.windows[split], plain.windows[split])
            assert K.ROLLOUT not in chained.datasets[split][0]
        ds = chained.datasets["train"]
        f = chained.files[0]
        for i in (0, len(ds) - 1):
            item = ds[i]
            t0 = int(ds.windows[i, 1])
            assert item[K.ROLLOUT].shape == (2, p.n_out, 22, 1, 3)
            for j in (1, 2):
                frames = f.read(t0 + j * p.jump_frames + p.out_frames)
                np.testing.assert_array_equal(item[K.ROLLOUT][j - 1],
                                              chained.selection.gather(frames))
            np.testing.assert_array_equal(item[K.TARGET],
                                          plain.datasets["train"][i][K.TARGET])
        batch = ds.collate([ds[0], ds[1]])
        assert batch[K.ROLLOUT].shape == (2, p.n_out, 44, 1, 3)
    finally:
        plain.close()
        chained.close()


def test_rollout_windows_paper_split_and_refusal(ala):
    cfg = config_from_dict(tiny_config(ala)).data
    prepared = prepare_data(cfg)
    try:
        files, p = prepared.files, prepared.protocol
        n = files[0].n_frames
        windows = np.array([[0, 10], [0, n - 1 - 2 * p.jump_frames], [0, n - 2 * p.jump_frames]])
        kept = rollout_windows(windows, files, p, 2, "paper")
        assert kept.tolist() == windows[:2].tolist()  # the last runs past the file's end
        with pytest.raises(DataError, match="train.rollout_jumps = 50.*lower"):
            rollout_windows(prepared.windows["train"], files, p, 50, "blocked")
    finally:
        prepared.close()


def test_rollout_on_the_history_protocol_is_refused(ala, tmp_path):
    cfg = tiny_config(ala, "estag", data={"protocol": "history", "history": 3},
                      train={"rollout_jumps": 2})
    with pytest.raises(ConfigError, match="rollout_jumps = 2.*s2t"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def rollout_run(ala, tmp_path_factory):
    """A radius-graph EGNO trained on 2 chained jumps, at a learning rate too small to move the
    weights: its recorded metrics are those of its (unchanged) initial model."""
    run = tmp_path_factory.mktemp("rollout") / "run"
    cfg = tiny_config(ala, data=RADIUS, train={"epochs": 1, "batch_size": 1, "lr": 1e-12,
                                               "rollout_jumps": 2})
    train(cfg, run)
    return cfg, run


def test_next_jump_batch_is_the_input_the_engines_chain(rollout_run):
    """The second jump trained on is what Surrogate.rollout predicts as its second jump from
    the same start: positions the last predicted frame, difference velocities, a radius graph
    rebuilt on the new positions (equal to the per-system graphs collated), no gradient through
    the start."""
    cfg, run = rollout_run
    sur = Surrogate.load(run / "best.pt")
    prepared = prepare_data(config_from_dict(cfg).data, rollout_jumps=2)
    try:
        ds = prepared.datasets["train"]
        items = [ds[0], ds[len(ds) // 2]]
        batch = batch_to(ds.collate(items), "cpu", torch.float32)
        model = sur.model
        pred = model(batch)
        nxt = next_jump_batch(batch, pred.requires_grad_(), 1, ds.graph)
        assert not nxt[K.POS].requires_grad and not nxt[K.VEL].requires_grad
        assert torch.equal(nxt[K.POS], pred[-1].detach())
        torch.testing.assert_close(nxt[K.VEL], (pred[-1] - pred[-2]).detach() / 0.1)
        assert torch.equal(nxt[K.TARGET], batch[K.ROLLOUT][0]) and K.ROLLOUT not in nxt
        def per_system(pos):
            return collate([{**it, K.POS: p.numpy(), **dict(zip(
                (K.EDGE_INDEX, K.EDGE_TYPE), ds.graph(p.numpy())))}
                for it, p in zip(items, pos.split(22))])[K.EDGE_INDEX]

        assert torch.equal(nxt[K.EDGE_INDEX], per_system(nxt[K.POS]))
        # The graph follows the new positions. An untrained model's small step may or may not
        # carry a pair across the cutoff, so also end the jump on a 1.3x stretched structure:
        # every pair between 2.3 and 3 Å leaves the graph.
        stretched = next_jump_batch(batch, pred * 1.3, 1, ds.graph)
        assert torch.equal(stretched[K.EDGE_INDEX], per_system(stretched[K.POS]))
        assert 0 < stretched[K.EDGE_INDEX].shape[1] < batch[K.EDGE_INDEX].shape[1]
        with torch.no_grad():
            second = model(nxt)
        for b, it in enumerate(items):
            frames, _ = sur.rollout(it[K.POS][:, 0], it[K.VEL][:, 0], n_jumps=2)
            np.testing.assert_allclose(second[:, 22 * b:22 * (b + 1), 0].numpy(), frames[2:],
                                       atol=2e-4)
    finally:
        prepared.close()


def test_rollout_loss_is_the_mean_of_the_jump_losses(rollout_run):
    """train_later_jumps_amse is the A-MSE of the second jumps (from the model's own ends,
    against the MD frames), train_loss the mean of the first and second jumps' losses."""
    cfg, run = rollout_run
    epoch = records(run)[0]
    best = load_checkpoint(run / "best.pt")
    model = build_model(best["model"]["name"], best["model"]["config"])
    model.load_state_dict(best["state_dict"])
    prepared = prepare_data(config_from_dict(cfg).data, rollout_jumps=2)
    try:
        ds = prepared.datasets["train"]
        first, second = [], []
        with torch.no_grad():
            for i in range(len(ds)):
                batch = batch_to(ds.collate([ds[i]]), "cpu", torch.float32)
                pred = model(batch)
                first.append(float(batch_amse(pred, batch[K.TARGET])))
                nxt = next_jump_batch(batch, pred, 1, ds.graph)
                second.append(float(batch_amse(model(nxt), nxt[K.TARGET])))
    finally:
        prepared.close()
    assert epoch["samples"] == len(first)
    assert epoch["train_amse"] == pytest.approx(np.mean(first), rel=1e-5)
    assert epoch["train_later_jumps_amse"] == pytest.approx(np.mean(second), rel=1e-5)
    assert epoch["train_loss"] == pytest.approx((np.mean(first) + np.mean(second)) / 2,
                                                rel=1e-5)
    assert np.mean(second) > np.mean(first)  # an untrained model's own ends are worse starts


def test_rollout_gradient_skips_the_start_of_the_later_jump(ala, tmp_path, monkeypatch):
    """A step of rollout_jumps = 2 takes the gradient of (L1 + L2) / 2 with the second jump's
    input held fixed (pushforward), as computed here by hand; the gradient through that input
    differs."""
    import surrogate_md.train.loop as loop

    cfg = tiny_config(ala, data={**RADIUS, "counts": [12, 16, 16]},
                      train={"epochs": 1, "batch_size": 64, "rollout_jumps": 2,
                             "grad_clip": 1e9})
    seen = {}
    real_build, real_clip = loop.build_model, torch.nn.utils.clip_grad_norm_

    def keep_model(*args, **kwargs):
        seen["model"] = real_build(*args, **kwargs)
        return seen["model"]

    def record_gradient(params, max_norm):  # the one step's gradient, before the update
        seen["grad"] = [p.grad.clone() for p in params]
        seen["state"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
        return real_clip(params, max_norm)

    monkeypatch.setattr(loop, "build_model", keep_model)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_gradient)
    train(cfg, tmp_path / "run")
    monkeypatch.undo()

    prepared = prepare_data(config_from_dict(cfg).data, rollout_jumps=2)
    try:
        ds = prepared.datasets["train"]
        assert 0 < len(ds) < 12  # one step over the windows that hold two jumps
        model = seen["model"]
        model.load_state_dict(seen["state"])
        params = [p for p in model.parameters() if p.requires_grad]
        batch = batch_to(ds.collate([ds[i] for i in range(len(ds))]), "cpu", torch.float32)

        def gradient(through: bool) -> list[torch.Tensor]:
            model.zero_grad()
            pred = model(batch)
            nxt = next_jump_batch(batch, pred, 1, ds.graph)
            if through:
                nxt = dict(nxt, **{K.POS: pred[-1], K.VEL: (pred[-1] - pred[-2]) / 0.1})
            loss = (batch_amse(pred, batch[K.TARGET]) + batch_amse(model(nxt), nxt[K.TARGET]))
            (loss / 2).backward()
            return [p.grad.clone() for p in params]

        pushforward, unrolled = gradient(False), gradient(True)
    finally:
        prepared.close()
    assert len(seen["grad"]) == len(pushforward)
    for trained, by_hand in zip(seen["grad"], pushforward):
        torch.testing.assert_close(trained, by_hand, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6)
               for a, b in zip(pushforward, unrolled))


@pytest.mark.slow
def test_ddp_rollout_trains_like_one_process(ala, tmp_path):
    """Two ranks (gloo) of one window each train 2 chained jumps a step (the first backward
    pass under no_sync, the second synchronising the summed gradients): the weights after an
    epoch are those of one process taking the same pairs of windows as batches of 2, and the
    recorded metrics match."""
    cfg = tiny_config(ala, "egnn", data=RADIUS, train={"epochs": 1, "batch_size": 1,
                                                        "rollout_jumps": 2})
    res = torchrun_train(cfg, tmp_path / "ddp", "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    one = dict(cfg, train={**cfg["train"], "batch_size": 2})
    train(one, tmp_path / "one")
    ddp_w = load_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]
    one_w = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    torch.manual_seed(0)  # train.model_seed: the initial weights of both runs
    initial = dict(build_model("egnn", load_checkpoint(tmp_path / "one" / "last.pt")["model"]
                               ["config"]).named_parameters())
    assert all(k in one_w for k in initial)
    assert any(not torch.allclose(one_w[k], p.detach()) for k, p in initial.items())  # trained
    for key, value in one_w.items():
        torch.testing.assert_close(ddp_w[key], value, rtol=1e-3, atol=1e-5)
    ddp, single = records(tmp_path / "ddp")[0], records(tmp_path / "one")[0]
    assert ddp["samples"] == single["samples"] and ddp["samples"] % 2 == 0
    for key in ("train_loss", "train_later_jumps_amse", "val_amse"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-3)
