"""The Surrogate inference API on a checkpoint trained here from real MD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md import Surrogate
from surrogate_md.data import open_trajectory
from surrogate_md.errors import CheckpointError, ConfigError, DataError
from surrogate_md.testing import random_orthogonal
from surrogate_md.train import train


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def checkpoint(ala, tmp_path_factory):
    out = tmp_path_factory.mktemp("surrogate") / "run"
    return train(tiny_config(ala, "egno", train={"epochs": 1, "max_steps_per_epoch": 3}), out)


@pytest.fixture(scope="module")
def state(ala):
    f = open_trajectory(ala)
    frames = np.array([120, 260])
    x, v = f.read(frames), f.read(frames, "velocities")
    f.close()
    return x, v


def test_best_pt_is_weights_only_and_loads(checkpoint):
    raw = torch.load(checkpoint, weights_only=True)
    assert raw["format"] == "surrogate-md-checkpoint"
    sur = Surrogate.load(checkpoint)
    assert sur.name == "egno" and sur.jump_ps == pytest.approx(0.2)
    assert sur.times_ps == pytest.approx([0.1, 0.2])
    assert sur.n_atoms == 22 and sur.n_model_atoms == 22
    assert sur.validity is not None and sur.validity.bond_tolerance_A > 0
    assert len(sur.checkpoint_hash) == 16


def test_predict_single_and_batched_agree(checkpoint, state):
    sur = Surrogate.load(checkpoint, dtype=torch.float64)
    x, v = state
    single = [sur.predict(x[b], v[b]) for b in range(2)]
    batched = sur.predict(x, v)
    assert batched.shape == (2, 2, 22, 3)
    assert np.all(np.isfinite(batched))
    np.testing.assert_allclose(batched, np.stack(single), atol=1e-10)
    # the model moves atoms (it is not the identity)
    assert np.abs(batched[:, -1] - x).max() > 1e-3


def test_rollout_shapes_and_continuity(checkpoint, state):
    sur = Surrogate.load(checkpoint, dtype=torch.float64)
    x, v = state
    frames, times = sur.rollout(x[0], v[0], n_jumps=3)
    assert frames.shape == (6, 22, 3) and np.all(np.isfinite(frames))
    np.testing.assert_allclose(times, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # the first jump is exactly predict; the second starts from its end state
    np.testing.assert_allclose(frames[:2], sur.predict(x[0], v[0]), atol=1e-10)
    v1 = (frames[1] - frames[0]) / 0.1
    np.testing.assert_allclose(frames[2:4], sur.predict(frames[1], v1), atol=1e-10)
    batched, _ = sur.rollout(x, v, n_jumps=3)
    assert batched.shape == (2, 6, 22, 3)
    np.testing.assert_allclose(batched[0], frames, atol=1e-10)


def test_thermal_rollout_feeds_maxwell_boltzmann_draws(checkpoint, state):
    """``end_velocities="thermal"``: each next jump starts from the jump's end positions with
    the seeded draw of :func:`thermal_velocities`; the draws have zero net momentum and, over
    many draws, the kinetic temperature asked for (by hand: KE = m v^2 / 2 with amu Å^2/ps^2 =
    0.01 kJ/mol, T = 2 KE / (R dof), R = 8.314462618e-3 kJ/mol/K, dof = 3n - 3)."""
    from surrogate_md.surrogate import thermal_velocities

    sur = Surrogate.load(checkpoint, dtype=torch.float64)
    x, v = state
    frames, _ = sur.rollout(x[0], v[0], n_jumps=2, end_velocities="thermal", temperature_K=300.0,
                            velocity_seed=7)
    masses = np.asarray(sur.topology["masses"])
    v1 = thermal_velocities(masses, 300.0, np.random.default_rng(7))
    np.testing.assert_allclose(frames[2:4], sur.predict(frames[1], v1), atol=1e-10)
    difference, _ = sur.rollout(x[0], v[0], n_jumps=2)
    assert np.abs(difference[2:] - frames[2:]).max() > 1e-3  # the draw is what the jump saw
    np.testing.assert_allclose(frames[:2], difference[:2], atol=1e-10)
    draws = thermal_velocities(masses, 300.0, np.random.default_rng(1), batch=(4000,))
    np.testing.assert_allclose((masses[:, None] * draws).sum(axis=1), 0.0, atol=1e-9)
    ke = 0.5 * 0.01 * (masses[:, None] * draws ** 2).sum(axis=(1, 2))
    temperature = 2.0 * ke.mean() / (8.314462618e-3 * (3 * len(masses) - 3))
    assert temperature == pytest.approx(300.0, rel=0.02)
    with pytest.raises(ConfigError, match="temperature_K"):
        sur.rollout(x[0], v[0], n_jumps=1, end_velocities="thermal")
    with pytest.raises(ConfigError, match="'difference' or 'thermal'"):
        sur.rollout(x[0], v[0], n_jumps=1, end_velocities="maxwell")


@pytest.mark.parametrize("reflect", [False, True])
def test_predict_is_equivariant(checkpoint, state, reflect):
    sur = Surrogate.load(checkpoint, dtype=torch.float64)
    x, v = state[0][0], state[1][0]
    ref = sur.predict(x, v)
    rot = random_orthogonal(seed=3, reflect=reflect).numpy()
    np.testing.assert_allclose(sur.predict(x @ rot.T, v @ rot.T), ref @ rot.T, atol=1e-8)
    shift = np.array([3.0, -7.5, 12.0])
    np.testing.assert_allclose(sur.predict(x + shift, v), ref + shift, atol=1e-8)


def test_clear_errors(checkpoint, state, tmp_path):
    sur = Surrogate.load(checkpoint)
    x, v = state[0][0], state[1][0]
    with pytest.raises(DataError, match="22 atoms"):
        sur.predict(x[:10], v[:10])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        sur.predict(bad, v)
    with pytest.raises(DataError, match="velocities"):
        sur.predict(x)
    with pytest.raises(DataError, match="shape"):
        sur.predict(x, v[:, :2])
    with pytest.raises(DataError, match="times_ps"):
        sur.predict(x, v, times_ps=[])
    with pytest.raises(DataError, match="n_jumps"):
        sur.rollout(x, v, n_jumps=0)
    with pytest.raises(DataError, match="whole number"):
        sur.rollout(x, v, n_jumps=2.7)
    with pytest.raises(DataError, match="whole number"):
        sur.rollout(x, v, n_jumps=None)
    with pytest.raises(DataError, match="increasing"):
        sur.predict(x, v, times_ps=[0.2, 0.1])
    with pytest.raises(DataError, match="differ"):
        sur.check_atomic_numbers(np.ones(22, dtype=int))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.pt"):
        Surrogate.load(broken)
    with pytest.raises(CheckpointError, match="no such"):
        Surrogate.load(tmp_path / "missing.pt")


def test_positions_in_nm_are_refused(checkpoint, state):
    """OpenMM's positions in nm (bonds a tenth of the trained lengths) are an error that says
    so, in predict and rollout; a state whose bonds are off by a little is a prediction."""
    sur = Surrogate.load(checkpoint)
    x, v = state[0][0], state[1][0]
    for call in (lambda: sur.predict(x / 10, v / 10), lambda: sur.rollout(x / 10, v / 10, n_jumps=2)):
        with pytest.raises(DataError, match="look like nm"):
            call()
    # a poor state, or one blown apart (bonds 3x), is the guards' business, not a unit error
    rng = np.random.default_rng(0)
    assert np.isfinite(sur.predict(x + 0.3 * rng.standard_normal(x.shape), v)).all()
    assert np.isfinite(sur.predict(3 * x, v)).all()


def test_history_must_end_at_the_positions(tmp_path):
    """ESTAG reads its history: a history given newest first, or not ending at the positions,
    is refused instead of predicting from the oldest frame."""
    from _integration_fixtures import cached_md, make_checkpoint

    md = cached_md()
    sur = Surrogate.load(make_checkpoint(md, tmp_path / "estag.pt", model="estag",
                                         jump_frames=4, n_out=2, history=3, history_stride=2))
    hist = md["frames"][40:45:2]
    assert np.isfinite(sur.predict(hist[-1], history=hist)).all()
    with pytest.raises(DataError, match="oldest first"):
        sur.predict(hist[-1], history=hist[::-1])
    with pytest.raises(DataError, match="oldest first"):
        sur.predict(md["frames"][100], history=hist)
    with pytest.raises(DataError, match="one history per state"):
        sur.predict(np.stack([hist[-1]] * 2), history=hist[None])


def test_times_beyond_the_trained_jump_warn(checkpoint, state, caplog):
    import logging

    sur = Surrogate.load(checkpoint)
    x, v = state[0][0], state[1][0]
    with caplog.at_level(logging.WARNING):
        sur.predict(x, v, times_ps=sur.times_ps)
        assert "extrapolates" not in caplog.text
        sur.predict(x, v, times_ps=[10 * sur.jump_ps])
    assert "extrapolates" in caplog.text


def test_a_surrogate_built_in_float64_predicts(checkpoint, state):
    x, v = state[0][0], state[1][0]
    expected = Surrogate.load(checkpoint).predict(x, v)
    base = Surrogate.load(checkpoint)  # its model is converted in place
    sur = Surrogate(base.model, base.meta, dtype=torch.float64)
    assert next(sur.model.parameters()).dtype == torch.float64
    np.testing.assert_allclose(sur.predict(x, v), expected, atol=1e-4)


def test_bad_shapes_are_data_errors(checkpoint, state):
    sur = Surrogate.load(checkpoint)
    x, v = state[0], state[1]
    with pytest.raises(DataError, match=r"\(atoms, 3\) or \(B, atoms, 3\)"):
        sur.predict(x[None], v[None])  # (1, B, atoms, 3)
    with pytest.raises(DataError, match="empty"):
        sur.predict(x[:0], v[:0])


@pytest.mark.parametrize("stride", [1, 2])
def test_history_rollouts_need_a_stride_on_the_output_grid(stride, tmp_path):
    """An ESTAG predicting frames 2 saved frames apart takes history frames ``stride`` saved
    frames apart: with stride 2 a rollout feeds its predictions back as history; with stride 1
    (half the output spacing) the next history is not among the predictions and the rollout
    refuses, naming the fix, instead of building it from the wrong frames."""
    from _integration_fixtures import cached_md, make_checkpoint

    md = cached_md()
    ckpt = make_checkpoint(md, tmp_path / "estag.pt", model="estag", jump_frames=4, n_out=2,
                           history=3, history_stride=stride)
    sur = Surrogate.load(ckpt)
    hist = md["frames"][40:40 + 2 * stride + 1:stride]
    assert sur.history_fits_grid() == (stride == 2)
    if stride == 2:
        frames, times = sur.rollout(hist[-1], history=hist, n_jumps=3)
        assert frames.shape == (6, 22, 3) and np.all(np.isfinite(frames))
        return
    with pytest.raises(DataError, match="history_stride_ps"):
        sur.rollout(hist[-1], history=hist, n_jumps=3)


def test_format_1_egno_checkpoints_load_with_real_vector_weights(checkpoint, state, tmp_path):
    # format 1 had real weights in EGNO's vector convolution; migrated with a zero imaginary
    # part it predicts exactly as a current model with that part set to zero
    from surrogate_md.train import train as run_training

    raw = torch.load(checkpoint, weights_only=True)
    im_keys = [k for k in raw["state_dict"] if k.startswith("conv_x.") and k.endswith("weight_im")]
    assert im_keys
    for k in im_keys:
        raw["state_dict"][k] = torch.zeros_like(raw["state_dict"][k])
    torch.save(raw, tmp_path / "zero_im.pt")
    for k in im_keys:
        del raw["state_dict"][k]
    raw["format_version"] = 1
    torch.save(raw, tmp_path / "v1.pt")
    x, v = state
    expected = Surrogate.load(tmp_path / "zero_im.pt", dtype=torch.float64).predict(x, v)
    migrated = Surrogate.load(tmp_path / "v1.pt", dtype=torch.float64)
    np.testing.assert_allclose(migrated.predict(x, v), expected, atol=1e-12)
    # on this P = 2 grid every sine of the convolution vanishes, so the predictions cannot see
    # the imaginary part: check the migrated weights themselves
    weights = migrated.model.state_dict()
    assert all(torch.count_nonzero(weights[k]) == 0 for k in im_keys)
    # a format-1 last.pt has no optimiser moments for the new weights: resuming is refused
    run = checkpoint.parent
    last = torch.load(run / "last.pt", weights_only=True)
    for k in im_keys:
        del last["state_dict"][k]
    last["format_version"] = 1
    torch.save(last, run / "last.pt")
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="format 1"):
        run_training(cfg, run, resume=True)


def test_painet_answers_on_its_trained_grid_only(ala, state, tmp_path):
    ckpt = train(tiny_config(ala, "painet", train={"epochs": 1, "max_steps_per_epoch": 1}),
                 tmp_path / "painet")
    sur = Surrogate.load(ckpt, dtype=torch.float64)
    x, v = state
    full = sur.predict(x, v)
    # the first entries of the grid are the same recurrent steps: the same answers
    np.testing.assert_allclose(sur.predict(x, v, times_ps=sur.times_ps[:1]), full[:, :1],
                               atol=1e-12)
    for times in ([sur.times_ps[-1]], [0.05, 0.1], [0.1, 0.15, 0.2]):
        with pytest.raises(DataError, match="trained grid"):
            sur.predict(x, v, times_ps=times)


def test_compiled_surrogate_predicts_as_the_eager_one(checkpoint, state):
    """compile= runs the model through torch.compile (Dynamo's eager backend here, for speed:
    the inductor path is timed by bench_surrogate_vs_md.py --compile): the same positions, one
    state and a batch of two, and the weights are the eager model's."""
    from torch._dynamo.utils import counters

    x, v = state
    eager = Surrogate.load(checkpoint, dtype=torch.float64)
    counters.clear()
    compiled = Surrogate.load(checkpoint, dtype=torch.float64, compile={"backend": "eager"})
    assert compiled.compiled and not eager.compiled
    for xs, vs in ((x[0], v[0]), (x, v)):
        np.testing.assert_allclose(compiled.predict(xs, vs), eager.predict(xs, vs), atol=1e-10)
    assert counters["stats"]["unique_graphs"] >= 1  # it did go through Dynamo
    assert compiled.model is compiled._forward._orig_mod


def test_a_failed_compilation_runs_the_model_eagerly(checkpoint, state, caplog):
    """torch.compile failing inside torch (here a backend that raises) costs a warning, not
    the run: the model runs eagerly from then on, with the same answers."""
    def broken_backend(graph, example_inputs):
        raise RuntimeError("code generation failed")

    x, v = state
    eager = Surrogate.load(checkpoint, dtype=torch.float64)
    torch._dynamo.reset()
    sur = Surrogate.load(checkpoint, dtype=torch.float64, compile={"backend": broken_backend})
    with caplog.at_level("WARNING", logger="surrogate_md.surrogate"):
        first = sur.predict(x[0], v[0])
    assert "torch.compile failed" in caplog.text and not sur.compiled
    np.testing.assert_allclose(first, eager.predict(x[0], v[0]), atol=1e-12)
    np.testing.assert_allclose(sur.predict(x, v), eager.predict(x, v), atol=1e-12)
    # eager means eager: the EGNN layers' edge chunks (compiled with the model) are not used,
    # so a large graph cannot reach the broken backend through them
    layers = [m for m in sur.model.modules() if hasattr(m, "compiled_chunk")]
    assert layers and all(m.compiled_chunk is None for m in layers)
    assert sur.describe()["compiled"] is False


def test_compile_options_and_where_compile_is_not_used(checkpoint, caplog):
    """An options dict, even empty, compiles; under CPU bf16 autocast (edge
    blocks padded to bucket sizes, each a new compilation) the model runs eagerly, with a
    warning. Nothing compiles until the first prediction."""
    assert Surrogate.load(checkpoint, compile={}).compiled
    assert Surrogate.load(checkpoint, compile=True).describe()["compiled"] is True
    assert not Surrogate.load(checkpoint, compile=False).compiled
    with caplog.at_level("WARNING", logger="surrogate_md.surrogate"):
        bf16 = Surrogate.load(checkpoint, dtype=torch.bfloat16, compile=True)
    assert not bf16.compiled and "not used with torch.bfloat16 autocast" in caplog.text


def _painet_format_2(path: Path, out: Path) -> Path:
    """A copy of a PAINET checkpoint as format 2 wrote it: a ``log_s`` weight after
    ``type_psi`` and, in a last.pt, its AdamW moments at its place in the optimiser state."""
    from surrogate_md.models import build_model

    raw = torch.load(path, weights_only=True)
    weights = {}
    for key, value in raw["state_dict"].items():
        weights[key] = value
        if key == "type_psi":
            weights["log_s"] = torch.tensor(0.7)
    raw["state_dict"], raw["format_version"] = weights, 2
    if "training" in raw:
        names = [n for n, _ in build_model("painet", raw["model"]["config"]).named_parameters()]
        index = names.index("type_psi") + 1
        opt = raw["training"]["optimiser"]
        shifted = {(i + 1 if i >= index else i): v for i, v in opt["state"].items()}
        shifted[index] = {**opt["state"][0], "exp_avg": torch.tensor(0.3),
                          "exp_avg_sq": torch.tensor(0.2)}
        opt["state"] = shifted
        for group in opt["param_groups"]:
            group["params"] = list(range(len(group["params"]) + 1))
    torch.save(raw, out)
    return out


def test_format_2_painet_checkpoints_load_and_resume_without_the_common_scale(ala, state,
                                                                            tmp_path):
    """PAINET's log_s scaled Phi and Psi together, which cancels in the normalised attention:
    format-2 checkpoints load without it (the same predictions whatever its value) and a
    format-2 run resumes to exactly what the current format's run resumes to."""
    import shutil

    from surrogate_md.checkpoint import load_checkpoint
    from surrogate_md.train import train as run_training

    cfg = tiny_config(ala, "painet", train={"epochs": 2})
    run = tmp_path / "run"
    best = run_training(cfg, run)
    old_run = tmp_path / "old_run"
    shutil.copytree(run, old_run)
    _painet_format_2(run / "last.pt", old_run / "last.pt")
    old_best = _painet_format_2(best, tmp_path / "old_best.pt")
    rng = torch.get_rng_state()
    assert load_checkpoint(old_run / "last.pt")["training"].get("resumable", True) is True
    assert torch.equal(torch.get_rng_state(), rng)  # migrating builds a model, RNG untouched
    # an optimiser state that does not hold every parameter (say one was frozen) is not
    # renumbered by guesswork: such a run is refused, with the reason
    odd = torch.load(old_run / "last.pt", weights_only=True)
    odd["training"]["optimiser"]["param_groups"][0]["params"].pop()
    torch.save(odd, tmp_path / "odd.pt")
    assert "do not match" in load_checkpoint(tmp_path / "odd.pt")["training"]["resumable"]
    x, v = state
    np.testing.assert_allclose(Surrogate.load(old_best, dtype=torch.float64).predict(x, v),
                               Surrogate.load(best, dtype=torch.float64).predict(x, v),
                               atol=1e-12)
    longer = {**cfg, "train": {**cfg["train"], "epochs": 3}}
    for directory in (run, old_run):
        run_training(longer, directory, resume=True)
    records = [(d / "metrics.jsonl").read_text().splitlines() for d in (run, old_run)]
    assert len(records[0]) == len(records[1])
    for a, b in zip(*records):
        a, b = json.loads(a), json.loads(b)
        for key in ("train_loss", "val_fmse", "test_fmse"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-12), key
    weights = [load_checkpoint(d / "last.pt")["state_dict"] for d in (run, old_run)]
    assert "log_s" not in weights[1] and weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=0)


def test_a_cuda_index_beyond_the_machines_devices_is_a_device_error(monkeypatch):
    """On a one-GPU machine (what torch reports is stood in for here: there is no GPU) cuda:3 is
    a DeviceError naming the devices there are, not a raw 'invalid device ordinal' later."""
    from surrogate_md.errors import DeviceError
    from surrogate_md.surrogate import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match="1 CUDA device.*cuda:0 to cuda:0"):
        resolve_device("cuda:3")
