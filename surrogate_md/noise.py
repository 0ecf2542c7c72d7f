"""Stochastic jumps: a Gaussian model of what a deterministic surrogate cannot predict.

A model trained on the squared error predicts the conditional *mean* of where the atoms are one
jump later. For a molecule in thermal motion that mean lies close to the start, so chained jumps
barely move and the trajectory stays in one basin (README, "The demo"). :class:`JumpNoise` adds
back the spread the mean leaves out: the residuals ``target - prediction`` at the end of the
jump, measured on windows of reference MD, give a covariance over all predicted atoms, and a
jump draws its end from ``prediction + ε`` with ε ~ N(0, that covariance). The displacements
are correlated (a torsion moves several atoms together, a domain moves as a body), so the model
keeps the leading principal components of the residuals rather than one variance per atom, which
would tear bonds apart.

Frames: residuals are rotated into one reference frame before they are pooled (the orthogonal
Procrustes fit of each window's predicted end onto the reference, reflections allowed, so the
draw is E(3)-equivariant like the models: for a rotated, reflected or translated input the
same random numbers give the rotated, reflected or translated output). A draw is rotated back
onto the current prediction the same way. The frames of a jump get ``(t / jump) · ε``, so the
output stays continuous from the start of the jump to its end.

Mean reversion (``fit(..., revert=True)``, ``evaluate --noise-revert``): draws that are
independent of the state add up like a random walk, and a model that predicts nearly a copy of
its input (AdK trained on 80 ps of MD) has no restoring force to hold them: 300 jumps of 4 ps
took the backbone 10 Å RMSD from the fitted frame, far beyond the spread of the MD, and the
draws around such states needed four to five times the relaxation of those near it. A
reverting model regresses, per component k over the fitted windows, the residual's coordinate
on the predicted end's own coordinate about the reference (x_k: how far the prediction lies
from the reference along the component), ``r_k = γ_k x_k + e_k``, and draws
``ε_k = γ_k x_k + σ_k z`` with σ_k the spread of ``e_k``; γ_k is clipped to [-1, 0] (never
pushed further out). For a copying
model this is the MD's own AR(1) along each component: the lag-one-jump autocorrelation is
1 + γ_k and the stationary spread that of the fitted frames; a model that does predict along a
component keeps γ_k near 0 there. The spread such a run keeps is the fitted MD's along these
components: it does not leave the conformations those windows sample. The directions outside
the components are the model's, as without reversion, and so is any drift along them: keep
more components with reversion than without (an AdK backbone EGNO compacts the protein a
little every jump; with 20 reverting components that walked it to the bottom of the size
check's range, where one check in five failed, and 300 jumps needed 97 redraws and 14 MD
fallbacks; with 60 components 100 jumps needed none).

Size (``fit(..., size=True)``, ``evaluate --noise-size``): a model trained on the squared error
predicts the mean of the states a jump may reach, and an average of fluctuating structures is a
smaller structure. An AdK backbone EGNO's 64 ps ends have a radius of gyration 0.75 Å below their
inputs', with a spread of 0.02 Å between starts: a bias, not noise, and the zero-mean draws do
not undo it, so a run shrinks the protein jump after jump (to the bottom of the size check's
range), its states packed ever worse and ever dearer to relax. A size model regresses, over the
fitted windows, the radius of gyration of the reference MD's end on that of the model's end,
``R_target = a + b R_pred + e`` (b clipped to [0, 1]), and scales each drawn end about its
centroid so that its radius of gyration is ``a + b R_pred + σ z`` (σ the spread of e, z a draw
of its own): the size of the ends follows the MD's own statistics at the jump's lag (for a lag
longer than the size's memory, b ≈ 0: the MD's distribution of sizes; for a short one, b ≈ 1:
the bias taken out). The scale reaches the frames inside the jump in proportion to their time,
like ε. Scaling about the centroid is E(3)-equivariant and keeps every angle; bond lengths
change by the same fraction (a few per cent), which the engines' relaxation undoes first.

Fit one with ``python -m surrogate_md.evaluate CHECKPOINT --data FILE --split val --out DIR
--noise-out noise.npz`` (the residuals of the windows it scores; ``val`` or ``train``: windows
the model was tested on are better kept for the test) and hand it to an engine
(``SurrogateSimulation(..., jump_noise="noise.npz")``, ``SurrogateDynamics``, ``predict
--jump-noise``); the engines' guards then judge every noisy jump as any other.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from surrogate_md.errors import DataError
from surrogate_md.fileio import atomic_path
from surrogate_md.validity import radius_of_gyration

log = logging.getLogger(__name__)

FORMAT = "surrogate-md jump noise"
FORMAT_VERSION = 1
#: components kept at most by default: for a protein backbone (2 568 coordinates) the leading
#: 512 hold most of the variance (the fit reports the fraction) at 10 MB in the file
DEFAULT_MAX_COMPONENTS = 512
_NEGLIGIBLE = 1e-6  # components with a standard deviation below this fraction of the largest


def orthogonal_fit(reference_A: np.ndarray, current_A: np.ndarray) -> np.ndarray:
    """(3, 3) orthogonal R minimising ``|reference_c @ R - current_c|`` (both centred; a
    reflection is allowed, det R = ±1).

    Args:
        reference_A, current_A: (n, 3) Å; centred here.
    """
    ref = reference_A - reference_A.mean(0)
    cur = current_A - current_A.mean(0)
    u, _, vt = np.linalg.svd(ref.T @ cur)
    return u @ vt


def fit_size(predicted_rg_A: np.ndarray, target_rg_A: np.ndarray) -> np.ndarray:
    """The size model ``(a Å, b, σ Å)`` of ``R_target = a + b R_pred + e`` (module doc): least
    squares over windows, b clipped to [0, 1] (a pulled-back or bias-corrected size, never an
    exploding one), σ the spread of e.

    Args:
        predicted_rg_A, target_rg_A: (W,) Å, radii of gyration of the model's and the
            reference MD's jump ends, W >= 3.
    """
    x = np.asarray(predicted_rg_A, dtype=np.float64)
    y = np.asarray(target_rg_A, dtype=np.float64)
    dx = x - x.mean()
    sxx = float(np.sum(dx ** 2))
    slope = float(np.clip(np.sum(dx * (y - y.mean())) / sxx, 0.0, 1.0)) if sxx > 0 else 0.0
    intercept = float(y.mean() - slope * x.mean())
    spread = float(np.sqrt(np.sum((y - intercept - slope * x) ** 2) / (len(x) - 2)))
    return np.array([intercept, slope, spread])


@dataclass
class JumpNoise:
    """Gaussian residual model of one surrogate's jump ends (see the module doc).

    Attributes:
        reference_A: (n, 3) Å, centred: the frame the components live in (the Procrustes mean
            of the fitted windows' predicted ends).
        components: (k, n, 3), orthonormal as k vectors of length 3n.
        std_A: (k,) Å, standard deviation of the residuals along each component.
        jump_ps: the jump the residuals were measured at (the surrogate's).
        meta: what it was fitted from (model, checkpoint hash, windows, captured variance,
            residual RMS per atom, the residuals' mean, which is left out of the draws).
        reversion: (k,) γ_k in [-1, 0], or None: the draws' pull along each component towards
            the reference, per Å of the predicted end's coordinate along it (see the module
            doc; ``std_A`` is then the spread left after that pull).
        size: (3,) ``(a Å, b, σ Å)`` of the size model (module doc), or None: none.
    """

    reference_A: np.ndarray
    components: np.ndarray
    std_A: np.ndarray
    jump_ps: float
    meta: dict[str, Any] = field(default_factory=dict)
    reversion: np.ndarray | None = None
    size: np.ndarray | None = None

    @property
    def n_atoms(self) -> int:
        return int(self.reference_A.shape[0])

    @property
    def rms_A(self) -> float:
        """RMS displacement per atom of a draw (Å): sqrt(sum std² / n)."""
        return float(np.sqrt(np.sum(self.std_A ** 2) / self.n_atoms))

    @classmethod
    def fit(cls, predicted_A: np.ndarray, target_A: np.ndarray, jump_ps: float, *,
            max_components: int = DEFAULT_MAX_COMPONENTS, meta: dict[str, Any] | None = None,
            revert: bool = False, size: bool = False) -> JumpNoise:
        """Fit to the jump ends of W windows.

        Args:
            predicted_A: (W, n, 3) Å, the model's jump ends.
            target_A: (W, n, 3) Å, the reference MD's at the same times.
            jump_ps: the jump length (ps).
            max_components: keep at most this many principal components (the fraction of the
                residual variance they hold is in ``meta["captured_variance"]``).
            revert: also fit the mean reversion along each component (module doc; needs at
                least 3 windows).
            size: also fit the size model (module doc; needs at least 3 windows).
        """
        pred = np.asarray(predicted_A, dtype=np.float64)
        target = np.asarray(target_A, dtype=np.float64)
        if pred.ndim != 3 or pred.shape[-1] != 3 or pred.shape != target.shape:
            raise DataError(f"jump noise: predictions {pred.shape} and targets {target.shape} "
                            "must both be (windows, atoms, 3)")
        if len(pred) < 2:
            raise DataError(f"jump noise: {len(pred)} window(s) give no covariance; fit it on "
                            "a split with at least 2 windows (more than a few hundred for a "
                            "useful one)")
        if not (np.isfinite(pred).all() and np.isfinite(target).all()):
            raise DataError("jump noise: non-finite positions among the fitted windows; "
                            "evaluate a checkpoint whose predictions are finite")
        if max_components < 1:
            raise DataError(f"jump noise: max_components must be >= 1, got {max_components}")
        if (revert or size) and len(pred) < 3:
            raise DataError(f"jump noise: {len(pred)} windows fit no "
                            f"{'mean reversion' if revert else 'size model'} (a slope and a "
                            "spread); fit it on at least 3 windows")
        centred = pred - pred.mean(1, keepdims=True)
        reference = centred[0]
        for _ in range(3):  # Procrustes mean: align every end onto the reference, average
            rot = np.stack([orthogonal_fit(reference, c) for c in centred])  # ref @ R ~ cur
            reference = np.einsum("wnj,wij->ni", centred, rot) / len(pred)  # cur @ R.T
            reference -= reference.mean(0)
        rot = np.stack([orthogonal_fit(reference, c) for c in centred])
        residual = np.einsum("wnj,wij->wni", target - pred, rot)  # into the reference frame
        flat = residual.reshape(len(pred), -1)
        mean = flat.mean(0)
        _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
        std = s / np.sqrt(len(pred) - 1)
        keep = std > _NEGLIGIBLE * max(float(std[0]), 1e-300)
        keep[max_components:] = False
        total = float(np.sum(std ** 2))
        n = pred.shape[1]
        info = {"windows": int(len(pred)), "components": int(keep.sum()),
                "captured_variance": float(np.sum(std[keep] ** 2) / total) if total else 1.0,
                "residual_rms_A": float(np.sqrt(np.mean(np.sum(residual ** 2, -1)))),
                "residual_mean_rms_A": float(np.sqrt(np.sum(mean ** 2) / n)),
                **(meta or {})}
        comps, std, gamma = vt[keep], std[keep], None
        if revert:
            # each predicted end's coordinates about the reference, in the reference frame
            aligned = np.einsum("wnj,wij->wni", centred, rot)
            x = (aligned - reference).reshape(len(pred), -1) @ comps.T  # (W, k)
            y = (flat - mean) @ comps.T  # the residuals' coordinates, (W, k)
            xx = np.sum(x ** 2, 0)
            gamma = np.clip(np.divide(np.sum(x * y, 0), xx, out=np.zeros_like(xx),
                                      where=xx > 0), -1.0, 0.0)
            std = np.sqrt(np.sum((y - gamma * x) ** 2, 0) / (len(pred) - 2))
            info["reversion"] = {"mean": float(gamma.mean()), "min": float(gamma.min()),
                                 "max": float(gamma.max()),
                                 "draw_rms_A": float(np.sqrt(np.sum(std ** 2) / n))}
        size_model = None
        if size:
            size_model = fit_size(radius_of_gyration(pred), radius_of_gyration(target))
            info["size"] = {"intercept_A": float(size_model[0]), "slope": float(size_model[1]),
                            "spread_A": float(size_model[2]),
                            "predicted_mean_A": float(radius_of_gyration(pred).mean()),
                            "target_mean_A": float(radius_of_gyration(target).mean())}
        return cls(reference, comps.reshape(-1, n, 3), std, float(jump_ps), info, gamma,
                   size_model)

    def draw(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """(n, 3) Å, one ε in the reference frame (without the size model's scale)."""
        z = rng.standard_normal(len(self.std_A))
        return np.tensordot(z * self.std_A * scale, self.components, axes=1)

    def sample(self, predicted_A: np.ndarray, times_ps: np.ndarray, rng: np.random.Generator,
               scale: float = 1.0) -> np.ndarray:
        """A stochastic jump around the model's prediction.

        Args:
            predicted_A: (P, n, 3) Å, the model's frames of one jump (the last at ``jump_ps``).
            times_ps: (P,) ps after the start of the jump.
            rng: the random generator (its state is what a restart needs).
            scale: multiplies the standard deviations (0: the prediction itself, moved only by
                a reverting model's pull).
        Returns:
            (P, n, 3) Å: ``predicted + (t / jump_ps) · ε``, ε rotated onto the jump's end;
            with a size model, each frame then scaled about its centroid (module doc).
        """
        pred = np.asarray(predicted_A, dtype=np.float64)
        if pred.ndim != 3 or pred.shape[1:] != self.reference_A.shape:
            raise DataError(f"jump noise fitted for {self.n_atoms} atoms, got frames of shape "
                            f"{pred.shape}; use the noise fitted for this surrogate (evaluate "
                            "--noise-out)")
        rot = orthogonal_fit(self.reference_A, pred[-1])
        eps = self.draw(rng, scale)
        if self.reversion is not None:  # pull back along the components (module doc)
            end = pred[-1] - pred[-1].mean(0)
            flat = self.components.reshape(len(self.std_A), -1)
            x = flat @ (end @ rot.T - self.reference_A).ravel()
            eps = eps + np.tensordot(self.reversion * x, self.components, axes=1)
        eps = eps @ rot
        frac = np.asarray(times_ps, dtype=np.float64) / self.jump_ps
        out = pred + frac[:, None, None] * eps[None]
        if self.size is None:
            return out
        a, b, spread = self.size
        want = a + b * radius_of_gyration(pred[-1]) + spread * scale * rng.standard_normal()
        have = radius_of_gyration(out[-1])
        if not (have > 0 and want > 0):  # a degenerate draw: left as drawn, for the guards
            return out
        factor = 1.0 + frac * (want / have - 1.0)  # (P,): the end's scale, reached in time
        centre = out.mean(1, keepdims=True)
        return centre + factor[:, None, None] * (out - centre)

    def check(self, surrogate, source: str = "") -> None:
        """Refuse a noise model fitted for another atom set or jump; warn for another
        checkpoint of the same shape."""
        where = f"{source}: " if source else ""
        if surrogate.n_model_atoms != self.n_atoms:
            raise DataError(f"{where}jump noise fitted for {self.n_atoms} predicted atoms; this "
                            f"surrogate predicts {surrogate.n_model_atoms}. Fit one for it: "
                            "python -m surrogate_md.evaluate CHECKPOINT ... --noise-out FILE")
        if abs(float(surrogate.jump_ps) - self.jump_ps) > 1e-9 * max(1.0, self.jump_ps):
            raise DataError(f"{where}jump noise fitted for {self.jump_ps:g} ps jumps; this "
                            f"surrogate jumps {float(surrogate.jump_ps):g} ps. Fit one for it: "
                            "python -m surrogate_md.evaluate CHECKPOINT ... --noise-out FILE")
        fitted = self.meta.get("checkpoint_hash")
        own = getattr(surrogate, "checkpoint_hash", "")
        if fitted and own and fitted != own:
            log.warning("%sjump noise was fitted to the residuals of checkpoint %s (%s), not "
                        "of this one (%s); its spread is that model's", where, fitted,
                        self.meta.get("model", "?"), own)

    def describe(self) -> dict[str, Any]:
        """Provenance: what a run's JSON records of the noise it used."""
        return {"rms_A": self.rms_A, "jump_ps": self.jump_ps, "atoms": self.n_atoms,
                "reverting": self.reversion is not None, "sized": self.size is not None,
                **{k: v for k, v in self.meta.items() if k != "source"}}

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (atomically: a temporary file renamed when whole)."""
        header = {"format": FORMAT, "version": FORMAT_VERSION, "jump_ps": self.jump_ps,
                  "meta": self.meta}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            extra = {} if self.reversion is None else {"reversion": self.reversion}
            if self.size is not None:
                extra["size"] = self.size
            np.savez(fh, header=np.array(json.dumps(header)), reference_A=self.reference_A,
                     components=self.components, std_A=self.std_A, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> JumpNoise:
        """Read a file :meth:`save` wrote; anything else is refused with the reason."""
        fix = ("fit one with python -m surrogate_md.evaluate CHECKPOINT --data FILE --split val "
               "--out DIR --noise-out FILE")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise DataError(f"{path}: no such jump-noise file; {fix}") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{path}: not a readable jump-noise file ({exc}); {fix}") from None
        try:
            header = json.loads(str(arrays["header"]))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise KeyError("format")
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{path}: not a jump-noise file (no surrogate-md jump-noise header); "
                            f"{fix}") from None
        if header.get("version") != FORMAT_VERSION:
            raise DataError(f"{path}: jump-noise format version {header.get('version')}, this "
                            f"package reads {FORMAT_VERSION}; {fix}")
        try:
            jump_ps = float(header["jump_ps"])
        except (KeyError, TypeError, ValueError):
            jump_ps = float("nan")
        if not (np.isfinite(jump_ps) and jump_ps > 0):
            raise DataError(f"{path}: the jump-noise header lacks a jump length > 0 ps "
                            f"(jump_ps {header.get('jump_ps')!r}); {fix}")
        meta = header.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(f"{path}: the jump-noise header's meta is not a mapping; {fix}")
        meta = dict(meta)
        try:
            ref = np.asarray(arrays["reference_A"], dtype=np.float64)
            comps = np.asarray(arrays["components"], dtype=np.float64)
            std = np.asarray(arrays["std_A"], dtype=np.float64)
        except KeyError as exc:
            raise DataError(f"{path}: jump-noise file lacks {exc}; {fix}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: jump-noise arrays are not numbers ({exc}); {fix}") from None
        n = ref.shape[0] if ref.ndim == 2 else -1
        if (ref.ndim != 2 or ref.shape[1] != 3 or std.ndim != 1
                or comps.shape != (len(std), n, 3)
                or not all(np.isfinite(a).all() for a in (ref, comps, std))
                or np.any(std < 0)):
            raise DataError(f"{path}: jump-noise arrays are inconsistent or not finite "
                            f"(reference {ref.shape}, components {comps.shape}, std "
                            f"{std.shape}); {fix}")

        def optional(key: str, what: str) -> np.ndarray | None:
            if key not in arrays:
                return None
            try:
                return np.asarray(arrays[key], dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise DataError(f"{path}: the jump-noise {what} is not numbers ({exc}); "
                                f"{fix}") from None

        reversion = optional("reversion", "reversion")
        if reversion is not None and (reversion.shape != std.shape
                                      or not np.isfinite(reversion).all()
                                      or np.any(reversion < -1) or np.any(reversion > 0)):
            raise DataError(f"{path}: the jump-noise reversion {reversion.shape} must hold "
                            f"one value in [-1, 0] per component ({len(std)}); {fix}")
        size = optional("size", "size model")
        if size is not None and (size.shape != (3,) or not np.isfinite(size).all()
                                 or not 0 <= size[1] <= 1 or size[2] < 0):
            raise DataError(f"{path}: the jump-noise size model must be (intercept Å, slope in "
                            f"[0, 1], spread Å >= 0), got {size.tolist()}; {fix}")
        meta["source"] = str(path)
        return cls(ref, comps, std, jump_ps, meta, reversion, size)

    @classmethod
    def coerce(cls, noise: JumpNoise | str | os.PathLike | None) -> JumpNoise | None:
        """A :class:`JumpNoise`, or one loaded from a path; None stays None."""
        if noise is None or isinstance(noise, JumpNoise):
            return noise
        return cls.load(noise)


__all__ = ["JumpNoise", "fit_size", "orthogonal_fit"]
