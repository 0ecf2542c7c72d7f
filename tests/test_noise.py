"""Jump noise: the residual covariance it fits, its equivariance, its file and its fit in
``evaluate --noise-out``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md import Surrogate
from surrogate_md.errors import DataError
from surrogate_md.evaluate.__main__ import main as evaluate_main
from surrogate_md.noise import JumpNoise, orthogonal_fit
from surrogate_md.testing import random_orthogonal


def _windows(rng, n=6, w=3000, proper=True):
    """Predicted and target jump ends of ``w`` windows of one ``n``-atom structure, each in a
    random orientation and place, the residuals drawn from a known covariance in the
    structure's own frame. Returns (pred, target, base, residual covariance (3n, 3n))."""
    base = rng.normal(size=(n, 3)) * 2.0
    base -= base.mean(0)
    a = rng.normal(size=(3 * n, 3 * n)) * 0.1
    pred, target = [], []
    for _ in range(w):
        q = random_orthogonal(int(rng.integers(2 ** 31)),
                              reflect=False if proper else None).numpy()
        shift = rng.normal(size=3) * 5.0
        p = (base + 0.02 * rng.normal(size=(n, 3))) @ q + shift
        r = (a @ rng.normal(size=3 * n)).reshape(n, 3) @ q
        pred.append(p)
        target.append(p + r)
    return np.array(pred), np.array(target), base, a @ a.T


def _covariance(noise: JumpNoise) -> np.ndarray:
    c = noise.components.reshape(len(noise.std_A), -1)
    return np.einsum("k,ki,kj->ij", noise.std_A ** 2, c, c)


def test_fit_recovers_the_residual_covariance_in_the_structures_frame():
    rng = np.random.default_rng(0)
    pred, target, base, cov = _windows(rng, proper=False)
    noise = JumpNoise.fit(pred, target, jump_ps=2.0)
    assert noise.n_atoms == 6 and noise.jump_ps == 2.0
    assert noise.meta["windows"] == 3000 and noise.meta["captured_variance"] == pytest.approx(1)
    # the reference is the structure, up to an orthogonal map; the covariance too
    rot = orthogonal_fit(noise.reference_A, base)
    assert np.abs(noise.reference_A @ rot - base).max() < 0.05
    block = np.kron(np.eye(6), rot)  # per-atom rows x @ rot.T, flattened
    truth = block @ cov @ block.T
    err = np.abs(_covariance(noise) - truth).max()
    assert err < 0.1 * np.abs(truth).max()
    # pooled without the frames (as if every window had one orientation) it is not
    flat = (target - pred).reshape(len(pred), -1)
    assert np.abs(np.cov(flat.T) - truth).max() > 5 * err
    # the draws' RMS per atom is the residuals'
    assert noise.rms_A == pytest.approx(np.sqrt(np.trace(cov) / 6), rel=0.05)


def test_fewer_components_keep_the_leading_variance():
    rng = np.random.default_rng(1)
    pred, target, _, _ = _windows(rng, w=500)
    full = JumpNoise.fit(pred, target, 1.0)
    few = JumpNoise.fit(pred, target, 1.0, max_components=4)
    assert len(few.std_A) == 4 and np.allclose(few.std_A, full.std_A[:4])
    assert 0 < few.meta["captured_variance"] < full.meta["captured_variance"]
    c = few.components.reshape(4, -1)
    assert np.allclose(c @ c.T, np.eye(4), atol=1e-10)


@pytest.mark.parametrize("reflect", [False, True])
def test_a_draw_is_equivariant_under_rotations_reflections_and_translations(reflect):
    rng = np.random.default_rng(2)
    pred, target, _, _ = _windows(rng, w=200)
    noise = JumpNoise.fit(pred, target, 1.0)
    frames = pred[:3] + np.linspace(0, 0.3, 3)[:, None, None]  # a jump of P = 3 frames
    times = np.array([1 / 3, 2 / 3, 1.0])
    q = random_orthogonal(7, reflect=reflect).numpy()
    assert (np.linalg.det(q) < 0) == reflect
    shift = np.array([3.0, -7.0, 11.0])
    a = noise.sample(frames, times, np.random.default_rng(5))
    b = noise.sample(frames @ q + shift, times, np.random.default_rng(5))
    assert np.abs(b - (a @ q + shift)).max() < 1e-9
    assert np.abs(a - frames).max() > 0.05  # it did move them


def test_frames_get_the_draw_in_proportion_to_their_time_and_scale_zero_is_the_prediction():
    rng = np.random.default_rng(3)
    pred, target, _, _ = _windows(rng, w=200)
    noise = JumpNoise.fit(pred, target, 2.0)
    frames = np.repeat(pred[:1], 4, axis=0)
    times = np.array([0.5, 1.0, 1.5, 2.0])
    out = noise.sample(frames, times, np.random.default_rng(0))
    eps = out[-1] - frames[-1]
    for k, t in enumerate(times):
        assert np.allclose(out[k] - frames[k], eps * t / 2.0, atol=1e-12)
    assert np.array_equal(noise.sample(frames, times, np.random.default_rng(0), scale=0.0),
                          frames)
    half = noise.sample(frames, times, np.random.default_rng(0), scale=0.5)
    assert np.allclose(half[-1] - frames[-1], 0.5 * eps, atol=1e-12)
    with pytest.raises(DataError, match="fitted for 6 atoms"):
        noise.sample(frames[:, :5], times, rng)


def test_fit_refuses_what_gives_no_covariance():
    rng = np.random.default_rng(4)
    pred, target, _, _ = _windows(rng, w=10)
    with pytest.raises(DataError, match="at least 2 windows"):
        JumpNoise.fit(pred[:1], target[:1], 1.0)
    with pytest.raises(DataError, match="must both be"):
        JumpNoise.fit(pred, target[:, :5], 1.0)
    bad = target.copy()
    bad[3, 2, 1] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        JumpNoise.fit(pred, bad, 1.0)


def test_file_round_trip_is_atomic_and_bad_files_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    pred, target, _, _ = _windows(rng, w=100)
    noise = JumpNoise.fit(pred, target, 1.5, meta={"model": "egno", "checkpoint_hash": "abc"})
    path = tmp_path / "noise.npz"
    noise.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.npz"]  # no temporary left
    back = JumpNoise.load(path)
    assert back.jump_ps == 1.5 and back.meta["model"] == "egno"
    for a, b in ((back.reference_A, noise.reference_A), (back.components, noise.components),
                 (back.std_A, noise.std_A)):
        assert np.array_equal(a, b)
    assert JumpNoise.coerce(str(path)).n_atoms == 6 and JumpNoise.coerce(noise) is noise
    with pytest.raises(DataError, match="no such jump-noise file.*--noise-out"):
        JumpNoise.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="text.npz: not a readable jump-noise file"):
        JumpNoise.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a jump-noise file"):
        JumpNoise.load(tmp_path / "other.npz")
    header = json.dumps({"format": "surrogate-md jump noise", "version": 99, "jump_ps": 1.0})
    np.savez(tmp_path / "future.npz", header=np.array(header))
    with pytest.raises(DataError, match="version 99"):
        JumpNoise.load(tmp_path / "future.npz")
    header = json.dumps({"format": "surrogate-md jump noise", "version": 1, "jump_ps": 1.0})
    np.savez(tmp_path / "torn.npz", header=np.array(header), reference_A=noise.reference_A,
             components=noise.components[:, :4], std_A=noise.std_A)
    with pytest.raises(DataError, match="inconsistent"):
        JumpNoise.load(tmp_path / "torn.npz")
    arrays = {"reference_A": noise.reference_A, "components": noise.components,
              "std_A": noise.std_A}
    good = {"format": "surrogate-md jump noise", "version": 1, "jump_ps": 1.0}
    bad_files = {  # every damage is a DataError naming the file and the fix
        "list": (["surrogate-md jump noise"], arrays, "not a jump-noise file"),
        "no_jump": ({k: v for k, v in good.items() if k != "jump_ps"}, arrays, "jump length"),
        "text_jump": ({**good, "jump_ps": "x"}, arrays, "jump length"),
        "meta_list": ({**good, "meta": [1, 2]}, arrays, "not a mapping"),
        "scalar_std": (good, {**arrays, "std_A": np.float64(1.0)}, "inconsistent"),
        "strings": (good, {**arrays, "std_A": np.array(["a", "b"])}, "not numbers"),
    }
    for name, (head, arrs, why) in bad_files.items():
        np.savez(tmp_path / f"{name}.npz", header=np.array(json.dumps(head)), **arrs)
        with pytest.raises(DataError, match=f"{name}.npz: .*{why}.*--noise-out"):
            JumpNoise.load(tmp_path / f"{name}.npz")


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def checkpoint(ala, tmp_path_factory):
    from surrogate_md.train import train

    out = tmp_path_factory.mktemp("noise") / "run"
    return train(tiny_config(ala, "egnn", train={"epochs": 1, "max_steps_per_epoch": 2}), out)


def test_evaluate_fits_the_noise_of_the_windows_it_scores(ala, checkpoint, tmp_path, caplog):
    noise_path = tmp_path / "noise.npz"
    assert evaluate_main([str(checkpoint), "--data", str(ala), "--out", str(tmp_path / "ev"),
                          "--split", "val", "--rollout-jumps", "0", "--noise-out",
                          str(noise_path), "-q"]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    noise = JumpNoise.load(noise_path)
    sur = Surrogate.load(checkpoint)
    noise.check(sur)
    assert noise.n_atoms == sur.n_model_atoms and noise.jump_ps == sur.jump_ps
    assert noise.meta["windows"] == res["n_windows"] and noise.meta["split"] == "val"
    assert noise.meta["checkpoint_hash"] == sur.checkpoint_hash
    # the residuals it fitted are the model's errors at the jump's end on those windows
    end_mse = res["errors"]["models"][sur.name]["mse_per_time"][-1]
    assert noise.meta["residual_rms_A"] == pytest.approx(np.sqrt(end_mse), rel=1e-4)
    assert res["jump_noise"]["components"] == len(noise.std_A)
    assert "## Jump noise" in (tmp_path / "ev" / "report.md").read_text()
    # a noise model of another surrogate's atoms or jump is refused; of another checkpoint
    # of the same shape, warned about
    other = JumpNoise(noise.reference_A[:-1], noise.components[:, :-1], noise.std_A, 1.0)
    with pytest.raises(DataError, match="predicted atoms.*--noise-out"):
        other.check(sur)
    longer = JumpNoise(noise.reference_A, noise.components, noise.std_A, 2 * sur.jump_ps)
    with pytest.raises(DataError, match="ps jumps"):
        longer.check(sur)
    noise.meta["checkpoint_hash"] = "0" * 12
    with caplog.at_level(logging.WARNING, logger="surrogate_md.noise"):
        noise.check(sur, "n.npz")
    assert "fitted to the residuals of checkpoint 000000000000" in caplog.text


def test_noise_out_is_checked_before_any_work(ala, checkpoint, tmp_path, capsys):
    base = [str(checkpoint), "--data", str(ala), "--rollout-jumps", "0", "-q"]
    assert evaluate_main(base + ["--out", str(tmp_path / "a"), "--noise-out",
                                 str(tmp_path / "no" / "n.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert evaluate_main(base + ["--out", str(tmp_path / "b"), "--noise-out",
                                 str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert evaluate_main(base + ["--out", str(tmp_path / "c"), "--transfer", "--noise-out",
                                 str(tmp_path / "n.npz")]) == 2
    assert "--transfer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "n.npz").exists()
    # an existing noise file is replaced only with --overwrite
    (tmp_path / "n.npz").write_bytes(b"kept")
    assert evaluate_main(base + ["--out", str(tmp_path / "d"), "--split", "val",
                                 "--noise-out", str(tmp_path / "n.npz")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "n.npz").read_bytes() == b"kept"
    assert evaluate_main(base + ["--out", str(tmp_path / "d"), "--split", "val", "--overwrite",
                                 "--noise-out", str(tmp_path / "n.npz")]) == 0
    assert JumpNoise.load(tmp_path / "n.npz").meta["split"] == "val"


def test_noise_on_the_test_split_is_warned_about(ala, checkpoint, tmp_path, caplog):
    from surrogate_md.evaluate import evaluate

    with caplog.at_level(logging.WARNING, logger="surrogate_md.evaluate.core"):
        evaluate(checkpoint, ala, tmp_path / "ev", rollout_jumps=0, plots=False,
                 noise_out=tmp_path / "n.npz")
    assert "not held out" in caplog.text and (tmp_path / "n.npz").is_file()


def test_noise_components_keeps_the_leading_components(ala, checkpoint, tmp_path, capsys):
    base = [str(checkpoint), "--data", str(ala), "--split", "val", "--rollout-jumps", "0", "-q"]
    assert evaluate_main(base + ["--out", str(tmp_path / "all"), "--noise-out",
                                 str(tmp_path / "all.npz")]) == 0
    assert evaluate_main(base + ["--out", str(tmp_path / "two"), "--noise-out",
                                 str(tmp_path / "two.npz"), "--noise-components", "2"]) == 0
    full, two = JumpNoise.load(tmp_path / "all.npz"), JumpNoise.load(tmp_path / "two.npz")
    assert len(full.std_A) > 2 and len(two.std_A) == two.meta["components"] == 2
    np.testing.assert_allclose(two.std_A, full.std_A[:2], rtol=1e-6)
    # the same leading directions (up to sign), the variance they hold recorded
    overlap = np.abs(np.einsum("kni,kni->k", two.components, full.components[:2]))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    held = np.sum(full.std_A[:2] ** 2) / np.sum(full.std_A ** 2)
    assert two.meta["captured_variance"] == pytest.approx(held * full.meta["captured_variance"])
    assert two.meta["captured_variance"] < 1 and two.rms_A < full.rms_A
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["jump_noise"]["components"] == 2
    # a count below 1, or one without a noise file to fit, is refused before any work
    assert evaluate_main(base + ["--out", str(tmp_path / "z"), "--noise-out",
                                 str(tmp_path / "z.npz"), "--noise-components", "0"]) == 2
    assert "--noise-components) must be >= 1" in capsys.readouterr().err
    assert evaluate_main(base + ["--out", str(tmp_path / "y"), "--noise-components", "4"]) == 2
    assert "no noise_out (--noise-out FILE)" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not (tmp_path / "y").exists()


def _ar_windows(rng, rho, eq, n=8, w=4000):
    """Windows of a copying model on a structure whose shape follows an AR(1) process along
    known orthonormal modes: the start's coordinates c along mode k, the end's ``rho[k] c +
    eq[k] sqrt(1 - rho[k]^2) z``, each window in a random orientation and place, the model's
    prediction the start itself. Returns (pred, target, base, modes (k, n, 3))."""
    base = rng.normal(size=(n, 3)) * 3.0
    base -= base.mean(0)
    # shape changes only: no net translation or rotation, which the fit's frames take out
    rigid = [np.tile(np.eye(3)[a], (n, 1)) for a in range(3)]
    rigid += [np.cross(np.eye(3)[a], base) for a in range(3)]
    rigid = np.linalg.qr(np.array([r.ravel() for r in rigid]).T)[0]  # (3n, 6)
    raw = rng.normal(size=(3 * n, len(rho)))
    modes = np.linalg.qr(raw - rigid @ (rigid.T @ raw))[0].T.reshape(len(rho), n, 3)
    pred, target = [], []
    for _ in range(w):
        c = rng.normal(size=len(rho)) * eq
        c_end = rho * c + eq * np.sqrt(1 - rho ** 2) * rng.normal(size=len(rho))
        q = random_orthogonal(int(rng.integers(2 ** 31))).numpy()
        shift = rng.normal(size=3) * 5.0
        start = base + np.tensordot(c, modes, axes=1)
        end = base + np.tensordot(c_end, modes, axes=1)
        pred.append(start @ q + shift)
        target.append(end @ q + shift)
    return np.array(pred), np.array(target), base, modes


def _mode_coordinates(x: np.ndarray, base: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """(k,) coordinates of the structure ``x`` (n, 3) along ``modes`` about ``base``, in the
    frame that fits it best onto ``base``."""
    c = x - x.mean(0)
    return np.einsum("kni,ni->k", modes, c @ orthogonal_fit(base, c).T - base)


def test_a_reverting_fit_recovers_the_autocorrelation_of_a_copying_models_runs():
    rng = np.random.default_rng(11)
    rho, eq = np.array([0.2, 0.6, 0.9]), np.array([0.6, 0.45, 0.3])
    pred, target, base, modes = _ar_windows(rng, rho, eq)
    plain = JumpNoise.fit(pred, target, 1.0, max_components=3)
    noise = JumpNoise.fit(pred, target, 1.0, max_components=3, revert=True)
    assert plain.reversion is None and noise.reversion.shape == (3,)
    # the components are the modes (up to sign and order); along each the slope is rho - 1
    # and the spread left after the pull the AR(1)'s own, eq sqrt(1 - rho^2)
    rot = orthogonal_fit(base, noise.reference_A)  # the modes in the reference frame
    overlap = np.abs(np.einsum("kni,mni->km", noise.components, modes @ rot))
    match = overlap.argmax(1)
    assert sorted(match) == [0, 1, 2] and overlap.max(1).min() > 0.95
    np.testing.assert_allclose(noise.reversion, rho[match] - 1, atol=0.06)
    np.testing.assert_allclose(noise.std_A, eq[match] * np.sqrt(1 - rho[match] ** 2), rtol=0.08)
    assert noise.meta["reversion"]["mean"] == pytest.approx(np.mean(noise.reversion))
    # without reversion the draws carry the whole residual spread, sqrt(2 (1 - rho)) eq
    np.testing.assert_allclose(np.sort(plain.std_A), np.sort(eq * np.sqrt(2 * (1 - rho))),
                               rtol=0.08)
    assert noise.rms_A < plain.rms_A


def test_reverting_draws_keep_a_copying_models_run_in_the_fitted_spread():
    rng = np.random.default_rng(12)
    rho, eq = np.array([0.3, 0.7]), np.array([0.5, 0.4])
    pred, target, base, modes = _ar_windows(rng, rho, eq, w=3000)
    runs = {}
    for revert in (False, True):
        noise = JumpNoise.fit(pred, target, 1.0, max_components=2, revert=revert)
        x = base + 6 * eq[0] * modes[0]  # far out along the first mode
        draws = np.random.default_rng(3)
        coords = []
        for _ in range(600):  # a copying model: each jump's prediction is its start
            x = noise.sample(x[None], np.array([1.0]), draws)[0]
            coords.append(_mode_coordinates(x, base, modes))
        runs[revert] = np.array(coords)
    # pulled back within a few jumps, then the fitted spread along each mode
    spread = np.sqrt(np.mean(runs[True][100:] ** 2, axis=0))
    np.testing.assert_allclose(spread, eq, rtol=0.25)
    assert abs(runs[True][10:, 0].mean()) < 0.3 * eq[0]
    # without reversion a random walk: far beyond that spread by the end
    assert np.sqrt(np.mean(runs[False][-100:] ** 2, axis=0)).min() > 2.5 * eq.max()


@pytest.mark.parametrize("reflect", [False, True])
def test_reverting_draws_are_equivariant_and_keep_the_time_profile(reflect):
    rng = np.random.default_rng(13)
    pred, target, _, _ = _ar_windows(rng, np.array([0.4, 0.8]), np.array([0.5, 0.5]), w=300)
    noise = JumpNoise.fit(pred, target, 2.0, max_components=2, revert=True)
    frames = pred[:3] + np.linspace(0, 0.2, 3)[:, None, None]
    times = np.array([2 / 3, 4 / 3, 2.0])
    q = random_orthogonal(8, reflect=reflect).numpy()
    shift = np.array([-4.0, 2.0, 9.0])
    a = noise.sample(frames, times, np.random.default_rng(5))
    b = noise.sample(frames @ q + shift, times, np.random.default_rng(5))
    assert np.abs(b - (a @ q + shift)).max() < 1e-9
    eps = a[-1] - frames[-1]
    for k, t in enumerate(times):
        assert np.allclose(a[k] - frames[k], eps * t / 2.0, atol=1e-12)
    # scale 0: no random part, only the pull, the same whatever the generator
    pulled = noise.sample(frames, times, np.random.default_rng(9), scale=0.0)
    assert np.array_equal(pulled, noise.sample(frames, times, np.random.default_rng(1),
                                               scale=0.0))
    assert np.abs(pulled - frames).max() > 1e-3


def test_reversion_survives_the_file_and_a_damaged_one_is_refused(tmp_path):
    rng = np.random.default_rng(14)
    pred, target, _, _ = _ar_windows(rng, np.array([0.5, 0.5]), np.array([0.4, 0.3]), w=200)
    noise = JumpNoise.fit(pred, target, 1.0, max_components=2, revert=True)
    noise.save(tmp_path / "r.npz")
    back = JumpNoise.load(tmp_path / "r.npz")
    assert np.array_equal(back.reversion, noise.reversion) and back.describe()["reverting"]
    JumpNoise.fit(pred, target, 1.0).save(tmp_path / "plain.npz")
    assert JumpNoise.load(tmp_path / "plain.npz").reversion is None
    header = json.dumps({"format": "surrogate-md jump noise", "version": 1, "jump_ps": 1.0})
    arrays = {"reference_A": noise.reference_A, "components": noise.components,
              "std_A": noise.std_A}
    for name, value in {"pushes": np.array([-0.5, 0.2]), "short": np.array([-0.5]),
                        "nan": np.array([-0.5, np.nan])}.items():
        np.savez(tmp_path / f"{name}.npz", header=np.array(header), reversion=value, **arrays)
        with pytest.raises(DataError, match=f"{name}.npz: .*reversion.*--noise-out"):
            JumpNoise.load(tmp_path / f"{name}.npz")
    with pytest.raises(DataError, match="at least 3 windows"):
        JumpNoise.fit(pred[:2], target[:2], 1.0, revert=True)


def test_noise_revert_fits_the_pull_and_needs_a_noise_file(ala, checkpoint, tmp_path, capsys):
    base = [str(checkpoint), "--data", str(ala), "--split", "val", "--rollout-jumps", "0", "-q"]
    assert evaluate_main(base + ["--out", str(tmp_path / "r"), "--noise-out",
                                 str(tmp_path / "r.npz"), "--noise-revert"]) == 0
    noise = JumpNoise.load(tmp_path / "r.npz")
    assert noise.reversion is not None and len(noise.reversion) == len(noise.std_A)
    assert np.all((noise.reversion >= -1) & (noise.reversion <= 0))
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["jump_noise"]["reverting"] is True
    assert metrics["jump_noise"]["reversion"]["mean"] == pytest.approx(noise.reversion.mean())
    assert "Mean-reverting draws" in (tmp_path / "r" / "report.md").read_text()
    assert evaluate_main(base + ["--out", str(tmp_path / "x"), "--noise-revert"]) == 2
    assert "--noise-revert" in capsys.readouterr().err and not (tmp_path / "x").exists()


# -- the size model -------------------------------------------------------------------------------
def _shrinking_windows(rng, n=40, w=400, bias=0.9):
    """A model whose jump ends are its targets shrunk about their centroid by ``bias``, the
    targets' radii of gyration scattering independently of where the window started."""
    base = rng.normal(size=(n, 3)) * 4.0
    base -= base.mean(0)
    pred, target = [], []
    for _ in range(w):
        q = random_orthogonal(int(rng.integers(2 ** 31))).numpy()
        shape = base + 0.3 * rng.normal(size=(n, 3))
        shape = (shape - shape.mean(0)) * (1.0 + 0.03 * rng.normal())
        end = shape @ q + rng.normal(size=3) * 5.0
        centre = end.mean(0)
        target.append(end)
        pred.append(centre + bias * (end - centre) + 0.05 * rng.normal(size=(n, 3)))
    return np.array(pred), np.array(target)


def test_the_size_model_undoes_a_shrinking_mean_and_keeps_the_mds_sizes():
    from surrogate_md.validity import radius_of_gyration

    rng = np.random.default_rng(21)
    pred, target = _shrinking_windows(rng)
    noise = JumpNoise.fit(pred, target, 4.0, max_components=5, size=True)
    plain = JumpNoise.fit(pred, target, 4.0, max_components=5)
    assert plain.size is None and noise.size.shape == (3,)
    r_pred, r_target = radius_of_gyration(pred), radius_of_gyration(target)
    a, b, spread = noise.size
    # the ends are the targets shrunk by 0.9 (plus a little noise): slope ~ 1 / 0.9, clipped
    # to 1, and the intercept carries the rest of the bias
    assert b == 1.0 and a == pytest.approx(np.mean(r_target - r_pred), rel=1e-9)
    assert spread == pytest.approx(np.std(r_target - r_pred, ddof=2), rel=1e-9)
    assert noise.meta["size"]["target_mean_A"] == pytest.approx(r_target.mean())
    # drawn ends have the targets' sizes: mean and spread, where plain draws keep the bias
    draws = np.random.default_rng(4)
    times = np.array([4.0])
    sized = np.array([radius_of_gyration(noise.sample(p[None], times, draws)[0])
                      for p in pred[:200]])
    unsized = np.array([radius_of_gyration(plain.sample(p[None], times, draws)[0])
                        for p in pred[:200]])
    left = sized - (a + b * r_pred[:200])  # the size model's own draws: mean 0, its spread
    assert abs(left.mean()) < 4 * spread / np.sqrt(200)
    assert left.std() == pytest.approx(spread, rel=0.2)
    assert abs(sized.mean() - r_target[:200].mean()) < 0.2 * r_target.std()
    assert r_target.mean() - unsized.mean() > 5 * r_target.std() / np.sqrt(200)
    # a slope of 0: every end drawn around the MD's mean size whatever the model's
    with_zero = JumpNoise(noise.reference_A, noise.components, noise.std_A, 4.0,
                          size=np.array([12.0, 0.0, 0.0]))
    for p in pred[:5]:
        assert radius_of_gyration(with_zero.sample(p[None], times, draws)[0]) == pytest.approx(
            12.0, rel=1e-12)


@pytest.mark.parametrize("reflect", [False, True])
def test_sized_draws_are_equivariant_and_scale_the_frames_in_proportion_to_time(reflect):
    from surrogate_md.validity import radius_of_gyration

    rng = np.random.default_rng(22)
    pred, target = _shrinking_windows(rng, w=60)
    noise = JumpNoise.fit(pred, target, 3.0, max_components=4, revert=True, size=True)
    frames = pred[:3] + np.linspace(0, 0.2, 3)[:, None, None]
    times = np.array([1.0, 2.0, 3.0])
    q = random_orthogonal(9, reflect=reflect).numpy()
    shift = np.array([3.0, -1.0, 7.0])
    perm = rng.permutation(frames.shape[1])
    a = noise.sample(frames, times, np.random.default_rng(5))
    b = noise.sample(frames @ q + shift, times, np.random.default_rng(5))
    assert np.abs(b - (a @ q + shift)).max() < 1e-9
    # permuting the atoms permutes the components with them: the same draw, permuted
    permuted = JumpNoise(noise.reference_A[perm], noise.components[:, perm], noise.std_A, 3.0,
                         reversion=noise.reversion, size=noise.size)
    c = permuted.sample(frames[:, perm], times, np.random.default_rng(5))
    assert np.abs(c - a[:, perm]).max() < 1e-9
    # the scale grows with time: the end at the drawn size, no scale at t = 0
    unsized = JumpNoise(noise.reference_A, noise.components, noise.std_A, 3.0,
                        reversion=noise.reversion)
    raw = unsized.sample(frames, times, np.random.default_rng(5))
    factors = radius_of_gyration(a) / radius_of_gyration(raw)
    np.testing.assert_allclose(factors - 1.0, (factors[-1] - 1.0) * times / 3.0, atol=1e-12)
    assert abs(factors[-1] - 1.0) > 1e-3
    # the centroids stay where the draws put them
    np.testing.assert_allclose(a.mean(1), raw.mean(1), atol=1e-12)


def test_the_size_model_survives_the_file_and_a_damaged_one_is_refused(tmp_path):
    rng = np.random.default_rng(23)
    pred, target = _shrinking_windows(rng, w=50)
    noise = JumpNoise.fit(pred, target, 1.0, max_components=2, size=True)
    noise.save(tmp_path / "s.npz")
    back = JumpNoise.load(tmp_path / "s.npz")
    assert np.array_equal(back.size, noise.size) and back.describe()["sized"]
    assert back.describe()["size"]["slope"] == pytest.approx(noise.size[1])
    assert not JumpNoise.fit(pred, target, 1.0).describe()["sized"]
    header = json.dumps({"format": "surrogate-md jump noise", "version": 1, "jump_ps": 1.0})
    arrays = {"reference_A": noise.reference_A, "components": noise.components,
              "std_A": noise.std_A}
    for name, value in {"steep": np.array([1.0, 1.5, 0.1]), "short": np.array([1.0, 0.5]),
                        "negative": np.array([1.0, 0.5, -0.1]),
                        "nan": np.array([1.0, np.nan, 0.1])}.items():
        np.savez(tmp_path / f"{name}.npz", header=np.array(header), size=value, **arrays)
        with pytest.raises(DataError, match=f"{name}.npz: .*size model.*--noise-out"):
            JumpNoise.load(tmp_path / f"{name}.npz")
    with pytest.raises(DataError, match="size model.*at least 3 windows"):
        JumpNoise.fit(pred[:2], target[:2], 1.0, size=True)


def test_noise_size_fits_the_size_model_and_needs_a_noise_file(ala, checkpoint, tmp_path,
                                                               capsys):
    base = [str(checkpoint), "--data", str(ala), "--split", "val", "--rollout-jumps", "0", "-q"]
    assert evaluate_main(base + ["--out", str(tmp_path / "s"), "--noise-out",
                                 str(tmp_path / "s.npz"), "--noise-size"]) == 0
    noise = JumpNoise.load(tmp_path / "s.npz")
    assert noise.size is not None and noise.reversion is None and 0 <= noise.size[1] <= 1
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["jump_noise"]["sized"] is True
    assert metrics["jump_noise"]["size"]["slope"] == pytest.approx(noise.size[1])
    assert "Size model" in (tmp_path / "s" / "report.md").read_text()
    assert evaluate_main(base + ["--out", str(tmp_path / "x"), "--noise-size"]) == 2
    assert "--noise-size" in capsys.readouterr().err and not (tmp_path / "x").exists()
