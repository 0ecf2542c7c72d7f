"""Training: configs, the loop, run directories, checkpoints and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md import Surrogate
from surrogate_md.checkpoint import load_checkpoint
from surrogate_md.data import open_trajectory
from surrogate_md.errors import ConfigError
from surrogate_md.train import load_config, train
from surrogate_md.train.__main__ import main
from surrogate_md.train.config import config_from_dict


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_yaml(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- configs --------------------------------------------------------------------------------------
def test_config_overrides_and_types(ala, tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", tiny_config("placeholder.h5"))
    cfg = load_config(cfg_file, [f"data.path={ala}", "train.epochs=7", "data.graph.cutoff_A=5",
                                 "model.hidden=24", "runtime.compile=true"])
    assert cfg.data.path == str(ala)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.data.graph.cutoff_A == 5.0 and isinstance(cfg.data.graph.cutoff_A, float)
    assert cfg.model.options["hidden"] == 24 and cfg.model.typed().hidden == 24
    assert cfg.runtime.compile is True
    assert cfg.data.fractions == (0.6, 0.2, 0.2)
    # the resolved dict round-trips
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, key", [
    ("train.epochz=3", "train.epochz"),
    ("data.graph.radius=3", "data.graph.radius"),
    ("model.hiden=3", "hiden"),
    ("optim.lr=3", "optim"),
    ("train.batch_size=-4", "train.batch_size"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("train.epochs=ten", "train.epochs"),
    ("runtime.precision=fp8", "runtime.precision"),
    ("data.n_out=0", "data.n_out"),
    ("runtime.compile=3", "runtime.compile"),
    ("model.name=transformer", "transformer"),
    ("train.input_noise_A=-0.1", "train.input_noise_A"),
    ("train.input_noise_A=.nan", "train.input_noise_A"),
])
def test_bad_config_values_name_the_key(ala, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override], base=tiny_config(ala))


def test_config_errors_on_cli_are_one_line_exit_2(ala, tmp_path, capsys):
    cfg = tiny_config(ala)
    cfg["train"]["learning_rate"] = 1.0
    code = main(["--config", str(write_yaml(tmp_path / "c.yaml", cfg)), "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "train.learning_rate" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "best.pt").exists()


def test_jump_not_multiple_of_interval(ala, tmp_path):
    # the fixture saves every 0.02 ps
    with pytest.raises(ConfigError, match="jump_ps"):
        train(tiny_config(ala, data={"jump_ps": 0.21}), tmp_path / "run")
    with pytest.raises(ConfigError, match="history"):
        train(tiny_config(ala, "estag", data={"protocol": "s2t"}), tmp_path / "run2")


# -- the loop -------------------------------------------------------------------------------------
def test_tiny_training_run(ala, tmp_path):
    out = tmp_path / "run"
    best = train(tiny_config(ala, train={"epochs": 3}), out)
    assert best == out / "best.pt"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "loss.png", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    recs = records(out)
    epochs = [r for r in recs if r["split"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all(r["samples"] == 48 for r in epochs)
    # learning happens: the training error goes down (three epochs of 48 windows are too few
    # for the validation error to fall reliably on data from another CPU's OpenMM run)
    assert epochs[-1]["train_amse"] < epochs[0]["train_amse"]
    assert all(np.isfinite(r["val_amse"]) for r in epochs)
    assert all(r["train_fmse"] > 0 and r["samples_per_s"] > 0 for r in epochs)
    final = recs[-1]
    assert final["split"] == "test" and np.isfinite(final["test_amse"])
    assert len(final["test_mse_per_time"]) == 2
    # resolved config has absolute data paths and the filled-in model options
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["path"] == [str(ala)]
    assert resolved["model"]["n_channels"] == 1
    # best.pt: weights-only, with normalisation, protocol and validity tolerances
    raw = torch.load(best, weights_only=True)
    assert raw["model"]["name"] == "egno"
    assert raw["protocol"]["jump_ps"] == pytest.approx(0.2)
    assert raw["protocol"]["times_ps"] == pytest.approx([0.1, 0.2])
    assert raw["normalisation"]["time_scale"] == pytest.approx(0.2)
    assert raw["validity"]["bond_tolerance_A"] > 0
    assert "training" not in raw
    assert "training" in load_checkpoint(out / "last.pt")
    # the normalisation is the training split's RMS velocity component
    f = open_trajectory(ala)
    v_rms = np.sqrt(np.mean(f.read(slice(None), "velocities") ** 2))
    assert raw["normalisation"]["velocity_scale"] == pytest.approx(v_rms, rel=0.2)
    sur = Surrogate.load(best)
    x = f.read(np.array([200]))[0]
    v = f.read(np.array([200]), "velocities")[0]
    out_pos = sur.predict(x, v)
    assert out_pos.shape == (2, 22, 3) and np.all(np.isfinite(out_pos))
    # the best model reproduces its recorded validation error
    recorded = raw["metrics"]
    assert recorded["epoch"] == recorded["best_epoch"]
    assert recorded["val_amse"] == min(r["val_amse"] for r in epochs)


def test_input_noise_displaces_the_inputs_only():
    """with_input_noise: Gaussian noise of the given size on POS (s2t) or on every HIST frame
    with POS its last (history); velocities, graph and targets untouched, the batch given not
    changed."""
    from surrogate_md.data import keys as K
    from surrogate_md.train.loop import with_input_noise

    torch.manual_seed(0)
    pos = torch.randn(500, 1, 3)
    batch = {K.POS: pos.clone(), K.VEL: torch.randn(500, 1, 3),
             K.TARGET: torch.randn(2, 500, 1, 3), K.EDGE_INDEX: torch.zeros(2, 7, dtype=torch.long)}
    noisy = with_input_noise(batch, 0.2)
    d = noisy[K.POS] - pos
    assert float(d.std()) == pytest.approx(0.2, rel=0.1) and abs(float(d.mean())) < 0.02
    assert torch.equal(batch[K.POS], pos)  # the batch given is left alone
    for key in (K.VEL, K.TARGET, K.EDGE_INDEX):
        assert noisy[key] is batch[key]
    hist = torch.randn(3, 500, 1, 3)
    noisy = with_input_noise({K.POS: hist[-1].clone(), K.HIST: hist.clone()}, 0.1)
    d = noisy[K.HIST] - hist
    assert float(d.std()) == pytest.approx(0.1, rel=0.1)
    assert not torch.allclose(d[0], d[1])  # each frame its own draw
    assert torch.equal(noisy[K.POS], noisy[K.HIST][-1])


def test_input_noise_reaches_every_training_step_and_no_evaluation(ala, tmp_path, monkeypatch):
    import surrogate_md.train.loop as loop

    calls = []
    real = loop.with_input_noise
    monkeypatch.setattr(loop, "with_input_noise",
                        lambda batch, sigma: calls.append(sigma) or real(batch, sigma))
    for sigma, expected in ((0.0, []), (0.05, [0.05] * 6)):
        calls.clear()
        train(tiny_config(ala, train={"epochs": 2, "max_steps_per_epoch": 3,
                                      "input_noise_A": sigma}), tmp_path / f"run{sigma}")
        assert calls == expected  # 2 epochs x 3 steps; validation and test: none


@pytest.mark.parametrize("model", ["egno", "egnn", "painet"])
def test_bf16_autocast_on_cpu_trains_close_to_fp32(ala, tmp_path, model):
    # bf16 runs the matrix products in bfloat16 (the loss differs from fp32 in the 3rd digit) and
    # keeps positions and weights fp32; training still lowers the validation error
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train(tiny_config(ala, model, train={"epochs": 3},
                          runtime={"precision": precision}), out)
        runs[precision] = [r for r in records(out) if r["split"] == "epoch"]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    keys = ("train_fmse", "val_fmse", "val_amse")
    pairs = [(b[k], f[k]) for b, f in zip(bf16, fp32) for k in keys]
    assert any(b != f for b, f in pairs)  # autocast did run in bf16
    assert all(b == pytest.approx(f, rel=0.05) for b, f in pairs)
    assert bf16[-1]["train_amse"] < bf16[0]["train_amse"]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(ala, tmp_path, caplog, monkeypatch, native):
    import surrogate_md.train.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="surrogate_md.train.loop"):
        train(tiny_config(ala, train={"epochs": 1, "max_steps_per_epoch": 1},
                          runtime={"precision": "bf16"}), tmp_path / "run")
    warned = [r.getMessage() for r in caplog.records if "AVX512-BF16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    if warned:
        assert "runtime.precision: fp32" in warned[0]


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False),
                                                    ((8, 0), True), ((9, 0), True)])
def test_gpu_native_bf16_starts_with_ampere(monkeypatch, capability, native):
    """Volta/Turing (7.x) emulate bf16, Ampere (8.0) and newer run it natively (the device's
    capability stood in for: no GPU here)."""
    import torch

    import surrogate_md.train.loop as loop

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert loop.gpu_has_native_bf16(torch.device("cuda", 0)) is native


def test_existing_run_dir_is_refused(ala, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(ala, train={"epochs": 1, "max_steps_per_epoch": 1})
    train(cfg, out)
    with pytest.raises(ConfigError, match="--overwrite"):
        train(cfg, out)
    cfg_file = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["--config", str(cfg_file), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--config", str(cfg_file), "--out", str(out), "--overwrite", "-q",
                 "--set", "train.epochs=2"]) == 0
    assert [r["epoch"] for r in records(out) if r["split"] == "epoch"] == [1, 2]


@pytest.mark.parametrize("name", ["constant", "linear"])
def test_parameter_free_models_export_without_training(ala, tmp_path, name):
    out = tmp_path / name
    best = train(tiny_config(ala, name), out)
    recs = records(out)
    assert recs[0]["epoch"] == 0 and recs[0]["step"] == 0
    assert not (out / "last.pt").exists()
    # the recorded errors are the real errors of the floor on the validation windows
    ckpt = load_checkpoint(best)
    f = open_trajectory(ala)
    windows = ckpt["provenance"]["n_windows"]
    assert windows["val"] == 16
    sur = Surrogate.load(best)
    assert sur.name == name
    x = f.read(np.array([50]))[0]
    v = f.read(np.array([50]), "velocities")[0]
    pred = sur.predict(x, v)
    expect = x if name == "constant" else x + 0.2 * v
    np.testing.assert_allclose(pred[-1], expect, atol=1e-4)
    assert recs[-1]["split"] == "test" and recs[-1]["test_fmse"] > recs[-1]["test_mse_per_time"][0]


def test_constant_floor_matches_mean_squared_displacement(ala, tmp_path):
    """F-MSE of the constant model == mean over test windows of |x(t0+ΔT) - x(t0)|², by hand."""
    out = tmp_path / "const"
    train(tiny_config(ala, "constant"), out)
    final = records(out)[-1]
    from surrogate_md.train.config import config_from_dict as cfd
    from surrogate_md.train.data import prepare_data

    prepared = prepare_data(cfd(tiny_config(ala, "constant")).data)
    f = open_trajectory(ala)
    t0 = prepared.windows["test"][:, 1]
    x0 = f.read(t0)
    x1 = f.read(t0 + 10)
    by_hand = ((x1 - x0) ** 2).sum(-1).mean()
    prepared.close()
    assert final["test_fmse"] == pytest.approx(by_hand, rel=1e-5)


def test_help_runs_as_a_module():
    res = subprocess.run([sys.executable, "-m", "surrogate_md.train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "--resume" in res.stdout and "--set" in res.stdout
