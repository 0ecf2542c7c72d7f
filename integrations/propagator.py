"""Engine-independent part of a learned jump: predict, rebuild missing atoms, derive velocities.

Both engines hand a full-system state (Å, Å/ps, ps) to :class:`SurrogatePropagator` and get back
the full-system frames of the jump. Velocities of the frames are backward differences of
consecutive frames: ``v_k = (x_k - x_{k-1}) / (t_k - t_{k-1})`` with ``x_{-1}`` the input state,
the same convention :meth:`surrogate_md.Surrogate.rollout` uses to feed a jump into the next one.
(For one output frame per jump this is the mean velocity over the jump, which is lower than the
instantaneous thermal velocity; the engine's kinetic energy reports it as such.)

With ``end_velocities="thermal"`` the end state of a jump gets velocities drawn from the
Maxwell-Boltzmann distribution at ``temperature_K`` instead, with the centre-of-mass velocity
taken out (zero net momentum, as OpenMM's default ``CMMotionRemover`` and ASE's ``Langevin(fixcm=
True)`` keep it: for Gaussian draws that is the exact distribution with zero momentum; otherwise
every jump would start the molecule drifting at ~sqrt(kT/M), 1.3 Å/ps for alanine dipeptide): in
the canonical ensemble velocities are independent of positions, so this samples them exactly, and a model trained on instantaneous
MD velocities (``velocity_source: file``) gets inputs like its training data at the next jump,
where differences over the output spacing are far slower (300 K alanine dipeptide: 275 K
heavy-atom kinetic temperature from MD velocities, 14 K from 0.5 ps differences). Intermediate
frames keep their differences.

With ``zero_momentum`` (what :class:`~integrations.openmm_simulation.SurrogateSimulation` and
``SurrogateJumpReporter`` ask for when the System has a ``CMMotionRemover``) the centre-of-mass
velocity of the moving atoms is taken out of every frame's difference velocities, as the
engine's MD keeps it at zero. ASE's MD does not zero it (``fixcm`` only keeps the thermostat from
changing it, and atoms under ``FixAtoms`` are pushed by the fixed ones), so ``SurrogateDynamics``
leaves it as the model makes it; a ``FixCom`` constraint on the atoms zeroes it there.

Fixed atoms (``fixed_atoms``: OpenMM's zero-mass particles that are not virtual sites, ASE's
``FixAtoms``) never move: every frame of a jump holds them where the jump started, whatever the
model predicts or the reconstruction rebuilds, so their velocities are zero, and thermal draws
leave them out (zero velocity; the zero net momentum is that of the moving atoms).

Stochastic jumps (``jump_noise``, a :class:`~surrogate_md.noise.JumpNoise` or the path of an
``.npz`` it saved): a model trained on the squared error predicts the mean end of a jump; the
noise model adds back the spread around it that it measured on reference MD. Every jump's
predicted frames (the model's atoms, Å) become ``predicted + (t / jump_ps) · ε`` with ε a draw
of a zero-mean Gaussian (correlated over the atoms, rotated onto the jump's end; RMS per atom
``noise_scale × JumpNoise.rms_A`` Å; a mean-reverting noise adds its pull back along each
component, ``evaluate --noise-revert``; one with a size model then scales each frame about its
centroid towards a drawn radius of gyration, ``evaluate --noise-size``) and ``t`` each frame's
time after the jump's start (ps), before fixed atoms are put back and the atoms the model does
not predict are rebuilt around the noisy frames. Velocities follow from the noisy frames as from
any others. A non-finite prediction gets no noise (it stays broken for the guards). The engines'
guards judge a noisy jump like any other (a draw that tears a bond or lifts the energy fails
them and is handled by the guard action), and history models remember the noisy frames as the
jump's own. A jump asked for again from the same state (time, positions, velocities, history:
an engine drawing a failed jump again) reuses the model's mean of the last call and draws only
the noise anew. ``noise_scale`` (>= 0) multiplies the standard deviations (0: the model's mean,
exactly the noiseless jump, where the noise is neither mean-reverting nor sized; a reverting
one still pulls, a sized one still scales to its mean size). The draws come from their own
generator, seeded by ``noise_seed`` (derived apart from the thermal velocity draws', so one seed
for both gives independent streams); its state is part of :meth:`SurrogatePropagator.memory`,
so a restart goes on with the same draws.

History models (ESTAG) need the positions of the last ``history_length`` states at
``history_stride_ps``; the propagator remembers every state the engine shows it
(:meth:`observe`) and says when history is missing so the engine can run real MD to fill it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from integrations.reconstruct import Reconstructor
from surrogate_md.errors import EngineError
from surrogate_md.noise import JumpNoise
from surrogate_md.surrogate import thermal_velocities

log = logging.getLogger(__name__)

_TIME_KEY_PER_PS = 1_000_000  # states are matched by time to 1e-6 ps
SAME_STATE_A = 1e-3  # a remembered state and a new one at the same time closer than this agree
#: minimiser iterations the engines give the atoms a partial model does not predict after every
#: jump, the predicted atoms held as predicted (``settle_iterations``)
DEFAULT_SETTLE_ITERATIONS = 10
#: iterations of the first stage of settling: a larger ``settle_iterations`` settles in stages of
#: 10, 20, 40, ... iterations in all (:func:`settle_stages`), stopping at the first stage whose
#: end passes the energy check
SETTLE_FIRST_STAGE = 10
# mixed into the noise draws' seed: the same integer seeds the thermal velocity draws (their
# generator is default_rng(seed)), and the two streams must not be the same numbers
_NOISE_STREAM = 0x6A756D70_6E6F6973  # "jumpnois"


def checked_settle_iterations(value: Any) -> int:
    """``settle_iterations`` of an engine as an int; an :class:`EngineError` unless it is a
    whole number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer))
            or not np.isfinite(value) or value < 0 or int(value) != value):
        raise EngineError(f"settle_iterations must be a whole number >= 0 (0 = the atoms the "
                          f"model does not predict stay where the rebuild puts them), got "
                          f"{value!r}")
    return int(value)


def settle_stages(iterations: int) -> list[int]:
    """Cumulative minimiser iterations after which an engine's settling looks at the jump end's
    energy: 10, 20, 40, ... doubling from :data:`SETTLE_FIRST_STAGE`, ending at ``iterations``
    (``[iterations]`` up to 10 iterations; ``[]`` for 0). E.g. 80 -> [10, 20, 40, 80], 50 ->
    [10, 20, 40, 50]."""
    n = int(iterations)
    stages, k = [], SETTLE_FIRST_STAGE
    while k < n:
        stages.append(k)
        k *= 2
    return stages + [n] if n > 0 else []


def settle_in_stages(settle: Callable[[np.ndarray, int], np.ndarray], state: np.ndarray,
                     stages: list[int], passes: Callable[[np.ndarray, int], bool]
                     ) -> tuple[np.ndarray, int]:
    """Settle ``state`` stage after stage (``settle(state, n)``: ``n`` more iterations from
    ``state``), stopping after the first stage ``k`` where ``passes(settled, k)`` (not asked
    after the last stage: the guards judge that one). Returns the settled state and its stage
    (cumulative iterations)."""
    done = 0
    for k in stages:
        state, done = settle(state, k - done), k
        if k == stages[-1] or passes(state, k):
            break
    return state, done


def stage_quenches(settle: Callable[[np.ndarray, int], np.ndarray],
                   energy: Callable[[np.ndarray], float], state: np.ndarray,
                   stages: list[int]) -> dict[int, float]:
    """kJ/mol by which settling ``state`` lowers its ``energy`` after each stage, settled stage
    after stage as :func:`settle_in_stages` does (the guards' reference for jump ends settled
    that far: ``Guards.set_settle_quenches``)."""
    e0, done, out = energy(state), 0, {}
    for k in stages:
        state, done = settle(state, k - done), k
        out[k] = e0 - energy(state)
    return out


def settling_atoms(n_atoms: int, model_atoms: np.ndarray, held: np.ndarray) -> np.ndarray:
    """(k,) indices of the atoms an engine's settling moves: those the model does not predict,
    less ``held`` (OpenMM's massless particles, virtual sites included; ASE's ``FixAtoms``)."""
    free = np.ones(int(n_atoms), dtype=bool)
    free[np.asarray(model_atoms, dtype=np.int64)] = False
    free[np.asarray(held, dtype=np.int64)] = False
    return np.nonzero(free)[0]


@dataclass
class JumpResult:
    """Full-system frames of one jump.

    Attributes:
        positions_A: (P, n_atoms, 3) Å at ``offsets_ps`` after the start.
        velocities_A_per_ps: (P, n_atoms, 3) Å/ps, backward differences (see module doc).
        offsets_ps: (P,) ps, the surrogate's output grid (last = ``jump_ps``), or its last
            entry only for a jump-end result.
        predicted_A: (P_grid, n_model_atoms, 3) Å, the model's own output at every time of the
            surrogate's grid (also for a jump-end result), with the jump noise added when the
            propagator has one (what a history model remembers); None for MD segments.
    """

    positions_A: np.ndarray
    velocities_A_per_ps: np.ndarray
    offsets_ps: np.ndarray
    predicted_A: np.ndarray | None = None


class SurrogatePropagator:
    """Advances a full system by one learned jump.

    Args:
        surrogate: a loaded :class:`~surrogate_md.Surrogate`.
        end_velocities: ``"difference"`` (backward difference, the default) or ``"thermal"``
            (Maxwell-Boltzmann draws for the jump's end state; see the module doc).
        masses_amu: (n_atoms,) masses for ``"thermal"`` (massless particles get zero velocity).
        temperature_K: temperature of the ``"thermal"`` draws.
        seed: random seed of those draws.
        fixed_atoms: (k,) indices of atoms that never move (see the module doc); may be
            reassigned (:attr:`fixed_atoms`) when the engine's constraints change.
        zero_momentum: take the centre-of-mass velocity of the moving atoms out of every
            frame's difference velocities (needs ``masses_amu``; see the module doc).
        jump_noise: a :class:`~surrogate_md.noise.JumpNoise` fitted for this surrogate (its
            atoms and jump), or the path of one saved with ``JumpNoise.save``; None (the
            default): deterministic jumps. See the module doc.
        noise_scale: multiplies the noise's standard deviations (>= 0; 1 = as fitted, 0 = no
            noise).
        noise_seed: seed of the noise draws (None: fresh entropy, not reproducible).

    Raises:
        EngineError: a bad ``end_velocities``, masses or ``noise_scale``.
        DataError: a ``jump_noise`` file that cannot be read, or one fitted for another atom
            set or jump length.
    """

    def __init__(self, surrogate, *, end_velocities: str = "difference",
                 masses_amu: np.ndarray | None = None, temperature_K: float = 300.0,
                 seed: int | None = None, fixed_atoms: np.ndarray | None = None,
                 zero_momentum: bool = False, jump_noise=None, noise_scale: float = 1.0,
                 noise_seed: int | None = None) -> None:
        if end_velocities not in ("difference", "thermal"):
            raise EngineError(f"end_velocities must be 'difference' or 'thermal', got "
                              f"{end_velocities!r}")
        self.end_velocities = end_velocities
        self._masses = None
        self.surrogate = surrogate
        self.zero_momentum_masses = masses_amu if zero_momentum else None
        if end_velocities == "thermal":
            m = np.asarray(masses_amu, dtype=np.float64) if masses_amu is not None else None
            if (m is None or m.shape != (surrogate.n_atoms,) or not np.all(np.isfinite(m))
                    or not temperature_K > 0):
                raise EngineError(f"end_velocities='thermal' needs the {surrogate.n_atoms} "
                                  f"atoms' masses (amu) and a temperature > 0 K")
            self._masses = m
            self._temperature_K = float(temperature_K)
            self._rng = np.random.default_rng(seed)
        if getattr(surrogate, "velocity_source", "file") == "finite_difference":
            interval = (getattr(surrogate, "meta", {}) or {}).get("protocol", {}).get(
                "interval_ps")
            log.warning(
                "%s was trained on finite-difference input velocities (positions %s apart); "
                "an engine hands the first jump, and any jump after MD, instantaneous "
                "velocities, and later jumps differences over the output spacing (%g ps): "
                "inputs unlike its training, so expect errors above its test figures",
                getattr(surrogate, "name", "the model"),
                f"{interval:g} ps" if interval else "one saved frame",
                float(np.diff(np.concatenate([[0.0], surrogate.times_ps]))[-1]))
        try:
            scale = float(noise_scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not (np.isfinite(scale) and scale >= 0):
            raise EngineError(f"noise_scale must be a finite number >= 0 (1 = the jump noise "
                              f"as fitted, 0 = none), got {noise_scale!r}")
        self.noise_scale = scale
        #: the :class:`~surrogate_md.noise.JumpNoise` of stochastic jumps, or None
        self.jump_noise: JumpNoise | None = JumpNoise.coerce(jump_noise)
        self._noise_rng: np.random.Generator | None = None
        if self.jump_noise is not None:
            if noise_seed is not None and (isinstance(noise_seed, bool)
                                           or not isinstance(noise_seed, (int, np.integer))
                                           or noise_seed < 0):
                raise EngineError(f"noise_seed must be a whole number >= 0 (or None for fresh "
                                  f"entropy), got {noise_seed!r}")
            # named by the file it was loaded from (JumpNoise.load keeps it in meta)
            self.jump_noise.check(surrogate, str(self.jump_noise.meta.get("source")
                                                 or "jump_noise"))
            self._noise_rng = np.random.default_rng(
                None if noise_seed is None else [_NOISE_STREAM, int(noise_seed)])
        self.reconstruct = Reconstructor.for_surrogate(surrogate)
        self.offsets_ps = np.asarray(surrogate.times_ps, dtype=np.float64)
        self.jump_ps = float(surrogate.jump_ps)
        self._known: dict[int, np.ndarray] = {}
        # time, (positions, velocities, history) of the last model call, and its frames
        self._last_mean: tuple[float, tuple, np.ndarray] | None = None
        self.fixed_atoms = fixed_atoms

    @property
    def zero_momentum_masses(self) -> np.ndarray | None:
        """(n,) amu of the atoms whose centre-of-mass velocity every frame's difference
        velocities lose (``None``: kept as the model makes it)."""
        return self._momentum_masses

    @zero_momentum_masses.setter
    def zero_momentum_masses(self, masses_amu: np.ndarray | None) -> None:
        if masses_amu is None:
            self._momentum_masses = None
            return
        m = np.asarray(masses_amu, dtype=np.float64)
        n = self.surrogate.n_atoms
        if m.shape != (n,) or not np.all(np.isfinite(m)) or np.any(m < 0):
            raise EngineError(f"zero net momentum needs the {n} atoms' masses (amu, >= 0)")
        self._momentum_masses = m

    @property
    def fixed_atoms(self) -> np.ndarray:
        """(k,) indices of the atoms every jump holds where it started (empty: none)."""
        return self._fixed

    @fixed_atoms.setter
    def fixed_atoms(self, atoms: np.ndarray | None) -> None:
        fixed = np.unique(np.asarray([] if atoms is None else atoms, dtype=np.int64).reshape(-1))
        n = self.surrogate.n_atoms
        if len(fixed) and (fixed[0] < 0 or fixed[-1] >= n):
            raise EngineError(f"fixed atoms must be indices of the {n} atoms, got "
                              f"{fixed[0] if fixed[0] < 0 else fixed[-1]}")
        self._fixed = fixed
        # where the fixed atoms are among the model's atoms
        self._fixed_model = np.flatnonzero(np.isin(self.surrogate.model_atoms, fixed))

    # -- history ----------------------------------------------------------------------------------
    @property
    def needs_history(self) -> bool:
        return bool(self.surrogate.needs_history)

    def _history_keys(self, time_ps: float) -> list[int]:
        s = self.surrogate
        return [round((time_ps - k * s.history_stride_ps) * _TIME_KEY_PER_PS)
                for k in range(s.history_length - 1, -1, -1)]

    def observe(self, time_ps: float, positions_A: np.ndarray) -> None:
        """Remember a full-system state (only kept for history models). A state that differs
        from the one remembered for the same time (the atoms were set by hand, a state loaded)
        means the remembered frames are another trajectory's: they are dropped."""
        if not self.needs_history:
            return
        model = np.asarray(positions_A, dtype=np.float64)[self.surrogate.model_atoms]
        known = self._known.get(round(time_ps * _TIME_KEY_PER_PS))
        if known is not None and np.abs(known - model).max() > SAME_STATE_A:
            log.info("history model: the state at t = %.4f ps is not the one remembered (set "
                     "by hand?); its input history is rebuilt", time_ps)
            self._known.clear()
        self._store(time_ps, model)

    def remember(self, time_ps: float, result: JumpResult) -> None:
        """Remember the predicted frames inside an accepted jump that started at ``time_ps``
        (history models take their next history from them, as ``Surrogate.rollout`` does); the
        engine observes the end state it keeps itself (it may have been relaxed)."""
        if not self.needs_history or result.predicted_A is None:
            return
        for offset, frame in zip(self.offsets_ps[:-1], result.predicted_A[:-1]):
            self._store(time_ps + float(offset), frame)

    @property
    def history_from_jumps(self) -> bool:
        """Whether jumps alone keep a history model's input (its history stride is a multiple
        of the output spacing); otherwise every jump needs real MD to rebuild its history."""
        return self.surrogate.history_fits_grid(self.offsets_ps)

    def _store(self, time_ps: float, model_positions_A: np.ndarray) -> None:
        key = round(time_ps * _TIME_KEY_PER_PS)
        self._known[key] = np.array(model_positions_A, dtype=np.float64)
        horizon = (self.surrogate.history_length + 1) * self.surrogate.history_stride_ps
        oldest = key - round(horizon * _TIME_KEY_PER_PS)
        for k in [k for k in self._known if k < oldest]:
            del self._known[k]

    def shift_times(self, by_ps: float) -> None:
        """Move every remembered state by ``by_ps`` in time (the engine's clock was reset)."""
        by = round(by_ps * _TIME_KEY_PER_PS)
        self._known = {k + by: v for k, v in self._known.items()}

    def memory(self) -> dict:
        """What a restart needs: the remembered states by time key (history models), the
        state of the thermal velocity draws' random generator (``rng``) and that of the jump
        noise's (``noise_rng``; each a JSON-safe dict, None when not used)."""
        keys = sorted(self._known)
        return {"keys": np.asarray(keys, dtype=np.int64),
                "frames": (np.stack([self._known[k] for k in keys]) if keys
                           else np.zeros((0, self.surrogate.n_model_atoms, 3))),
                **self.generator_states()}

    def restore_memory(self, memory: dict) -> None:
        """Take back a :meth:`memory` (a generator state it lacks, or one this propagator does
        not use, leaves the generator as it is)."""
        self._known = {int(k): np.array(f, dtype=np.float64)
                       for k, f in zip(memory["keys"], memory["frames"])}
        self.restore_generators(memory)

    def generator_states(self) -> dict:
        """The states of the thermal velocity and jump-noise generators (None where unused),
        taken before a jump so that an interrupted one can give its draws back
        (:meth:`restore_generators`): a state restored to the jump's start must come with the
        generators as they were there, or a restart from it would draw other numbers."""
        return {"rng": self._rng.bit_generator.state if self._masses is not None else None,
                "noise_rng": (self._noise_rng.bit_generator.state
                              if self._noise_rng is not None else None)}

    def restore_generators(self, states: dict) -> None:
        """Take back :meth:`generator_states` (a state it lacks, or one this propagator does
        not use, leaves that generator as it is)."""
        if states.get("rng") is not None and self._masses is not None:
            self._rng.bit_generator.state = states["rng"]
        if states.get("noise_rng") is not None and self._noise_rng is not None:
            self._noise_rng.bit_generator.state = states["noise_rng"]

    def warn_if_noise_differs(self, saved_noise_rng: dict | None, path, runner: str) -> None:
        """Log a warning when a restart file was saved with jump noise and this run has none,
        or the other way round (``runner``: "simulation", "dynamics"): the draws cannot go on
        as they would have."""
        if (saved_noise_rng is None) != (self.jump_noise is None):
            log.warning("%s was saved %s jump noise, this %s runs %s: the noise draws do not go "
                        "on as they would have", path,
                        "without" if saved_noise_rng is None else "with", runner,
                        "without" if self.jump_noise is None else "with")

    def describe_noise(self) -> dict | None:
        """JSON-safe provenance of the jump noise: ``JumpNoise.describe()`` (RMS per atom Å,
        jump ps, atoms, what it was fitted from) with ``scale``, the ``noise_scale``; None
        without noise."""
        if self.jump_noise is None:
            return None
        return {**self.jump_noise.describe(), "scale": self.noise_scale}

    def forget(self) -> None:
        """Drop remembered states (after a state was loaded from a file)."""
        self._known.clear()

    def has_history(self, time_ps: float) -> bool:
        return not self.needs_history or all(k in self._known
                                             for k in self._history_keys(time_ps))

    def history(self, time_ps: float) -> np.ndarray | None:
        """(T, n_model_atoms, 3) Å ending at ``time_ps``, or None for S2T models."""
        if not self.needs_history:
            return None
        keys = self._history_keys(time_ps)
        missing = [k / _TIME_KEY_PER_PS for k in keys if k not in self._known]
        if missing:
            raise EngineError(
                f"history model {self.surrogate.name}: no state observed at t = "
                f"{', '.join(f'{t:.4f}' for t in missing)} ps for the jump at t = {time_ps:.4f} "
                f"ps; observe() the states {self.surrogate.history_stride_ps:g} ps apart before "
                "it (has_history() tells), or let SurrogateSimulation / SurrogateDynamics build "
                "the history with MD")
        return np.stack([self._known[k] for k in keys])

    # -- the jump ---------------------------------------------------------------------------------
    def jump(self, positions_A: np.ndarray, velocities_A_per_ps: np.ndarray, time_ps: float,
             *, last_only: bool = False) -> JumpResult:
        """Predict one jump from the full state at ``time_ps``.

        Args:
            positions_A: (n_atoms, 3) Å.
            velocities_A_per_ps: (n_atoms, 3) Å/ps.
            last_only: return the end of the jump only (P = 1: the frame at ``jump_ps`` with
                its backward-difference velocity); the atoms the model does not predict are
                then rebuilt for the last two frames instead of all P.

        With a ``jump_noise`` the model's frames get one draw of it added first (all P
        frames, scaled by their time; one draw per jump, also with ``last_only``).
        """
        pos = np.asarray(positions_A, dtype=np.float64)
        self.observe(time_ps, pos)
        vel = velocities_A_per_ps
        if len(self._fixed) and vel is not None:
            # a fixed atom is at rest whatever velocity the engine holds for it (OpenMM ignores
            # the velocity of a massless particle)
            vel = np.array(vel, dtype=np.float64)
            vel[self._fixed] = 0.0
        pred = self._mean_prediction(pos, vel, time_ps)
        if self.jump_noise is not None and np.isfinite(pred).all():
            # a stochastic jump: the model's mean plus a draw of its residuals (module doc)
            pred = self.jump_noise.sample(pred, self.offsets_ps, self._noise_rng,
                                          self.noise_scale)
        if len(self._fixed_model):  # before the rebuild: atoms riding on fixed ones stay put
            pred = np.array(pred, dtype=np.float64)
            pred[:, self._fixed_model] = pos[self.surrogate.model_atoms[self._fixed_model]]
        predicted, offsets = pred, self.offsets_ps
        if last_only:
            pred, offsets = pred[-2:], offsets[-2:]
        if np.isfinite(pred).all():
            frames = self.reconstruct(pos, pred)  # (P, n, 3)
        else:  # a broken jump: leave it broken for the guards to see, no SVD of NaNs
            frames = np.repeat(pos[None], len(pred), axis=0)
            frames[:, self.surrogate.model_atoms] = pred
        if len(self._fixed):  # fixed atoms stay where they are: zero difference velocities
            frames[:, self._fixed] = pos[self._fixed]
        if last_only and len(frames) == 2:
            vel = (frames[1:] - frames[:1]) / (offsets[1] - offsets[0])
            return JumpResult(frames[1:], self._end_velocities(vel), offsets[1:].copy(),
                              predicted)
        prev = np.concatenate([pos[None], frames[:-1]])
        dt = np.diff(np.concatenate([[0.0], offsets]))
        vel = (frames - prev) / dt[:, None, None]
        return JumpResult(frames, self._end_velocities(vel), offsets.copy(), predicted)

    def _mean_prediction(self, pos: np.ndarray, vel: np.ndarray | None, time_ps: float
                         ) -> np.ndarray:
        """The model's frames (P, n_model_atoms, 3) Å from this state. With jump noise the
        last call's result is kept: an engine that draws a failed stochastic jump again asks
        for the same state's mean (the model is deterministic), and only the draw is new."""
        hist = self.history(time_ps)
        if self.jump_noise is None:
            return self.surrogate.predict(pos, vel, history=hist)
        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            return a is None if b is None else a is not None and np.array_equal(a, b)

        state = (pos, vel, hist)
        last = self._last_mean
        if (last is not None and last[0] == float(time_ps)
                and all(same(a, b) for a, b in zip(last[1], state))):
            return last[2].copy()
        pred = self.surrogate.predict(pos, vel, history=hist)
        self._last_mean = (float(time_ps), tuple(None if a is None else np.array(a)
                                                 for a in state), pred)
        return pred

    def _end_velocities(self, vel: np.ndarray) -> np.ndarray:
        """(P, n, 3) Å/ps with the last frame's replaced by thermal draws if so configured, and
        with ``zero_momentum`` every frame's centre-of-mass velocity taken out of the moving
        atoms (a model moves the centre of mass a little in every jump; an engine that keeps
        zero net momentum, as OpenMM's ``CMMotionRemover``, would otherwise hand the next jump
        a drifting molecule, an input its MD never showed)."""
        if self._momentum_masses is not None:
            m = self._momentum_masses.copy()
            m[self._fixed] = 0.0
            total = m.sum()
            if total > 0:
                vel = np.array(vel, dtype=np.float64)
                moving = m > 0
                com = np.einsum("n,pnx->px", m, vel) / total  # (P, 3) Å/ps
                vel[:, moving] -= com[:, None, :]
        if self._masses is None:
            return vel
        vel = vel.copy()
        masses = self._masses
        if len(self._fixed):  # no draw for fixed atoms, no share of the net momentum either
            masses = masses.copy()
            masses[self._fixed] = 0.0
        vel[-1] = thermal_velocities(masses, self._temperature_K, self._rng)
        return vel


__all__ = ["DEFAULT_SETTLE_ITERATIONS", "JumpResult", "SurrogatePropagator",
           "checked_settle_iterations", "settling_atoms"]
