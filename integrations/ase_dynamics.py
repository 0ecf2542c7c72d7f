"""The surrogate as an ASE propagator: ``SurrogateDynamics(atoms, surrogate).run(n)``.

A :class:`ase.md.md.MolecularDynamics` whose time step is the learned jump
(``surrogate.jump_ps`` in ASE time units; in hybrid mode the jump plus the MD segment before it).
``step()`` predicts one jump and sets positions and momenta; velocities are the backward
difference of the jump's last two frames (see :mod:`integrations.propagator`). It needs no
calculator (the MD it may run between or instead of jumps does: without one it is refused at
construction); with one attached (EMT, LJ, xTB...) the standard ``MDLogger`` and
``ase.io.Trajectory`` report real energies, and observers (``attach``) work as with any ASE
dynamics. The frames of the last jump are in ``dyn.last_jump`` (times ``dyn.last_jump_times_ps``)
for observers; ``write_intermediate=True`` also writes them to the trajectory. The atoms'
constraints (FixAtoms...) apply to every frame, in time order from the jump's start.

Settling (``settle_iterations``, default 10, as in ``SurrogateSimulation``): with a calculator
attached, the atoms a partial model does not predict (rebuilt rigidly around the predicted ones)
get at most that many L-BFGS steps after every jump, the predicted atoms held by a ``FixAtoms``
added for those steps (the atoms' own constraints apply too), before the guards judge the jump;
above 10 steps in the stages of ``SurrogateSimulation`` (10, 20, 40, ... steps in all, stopping
at the first whose end passes the energy check). With ``write_intermediate`` the jump's other
frames are settled for as many steps before they are written.

Guard actions: ``raise``; ``warn`` (keep the jump unless it is NaN); ``fallback`` (discard the
jump and run ``fallback_dynamics`` - any ASE MD bound to the same atoms, e.g. VelocityVerlet -
for the jump's length); ``relax`` (FIRE with the attached calculator, stopping at the first state
that passes every guard with its energy back at the guards' reference energy, then fallback if the
guard still fails).

MD for hybrid segments and fallbacks is any constant-volume ASE MD bound to the same atoms
(variable-cell integrators and MD on another Atoms object are refused); integrators that keep
their own copy of the state (NoseHooverChainNVT's positions and momenta, LangevinBAOAB's
accelerations) are brought up to date with the atoms before each segment. Energies of states real
MD made (hybrid segments, fallbacks, history warm-up) may move the energy guard's anchor once that
MD has run for ``GuardConfig.anchor_md_ps`` since the last state the surrogate made; an MD run
that starts colder than ``GuardConfig.cold_md_fraction`` of the temperature counts as no MD
time (it heats a jump's cold end before it samples). With
``write_intermediate`` a fallback writes its MD states at the surrogate's output times, and a
hybrid segment its states at the output spacing (a segment that is not a whole number of
spacings is refused), so the trajectory stays on an even time grid.

Stochastic jumps (``jump_noise``, ``noise_scale``, ``noise_seed``): each jump's predicted frames
get a draw of a :class:`~surrogate_md.noise.JumpNoise` added before the missing atoms are rebuilt
and the guards judge the jump (see :mod:`integrations.propagator`); ``todict()`` (the trajectory's
description) records the noise and its scale, and a state file carries the noise generator.

History models (ESTAG) take their input frames from the states the dynamics has seen: the
predicted frames inside accepted jumps and the end states kept; until those cover the history
(at the start, after a fallback that did not), a step runs ``fallback_dynamics`` for one jump's
length instead (counted in ``n_history_md``).

Restarts: the atoms (from the last frame of a ``.traj``) hold positions and momenta, but not what
the dynamics itself keeps: a history model's remembered frames, the thermal velocity draws' and the
jump noise's generators, the guards' recorded energies (the anchor that caps them) and counts, the
jump counts, the MD time since the last jump, the step count (the clock), and what the MD it runs
between and instead of jumps keeps of its own: its step count, its random generator (Langevin,
Bussi, Andersen, LangevinBAOAB) and its thermostat variables (a Nosé-Hoover chain's positions and
momenta, Bussi's tally of the energy it moved).
:meth:`SurrogateDynamics.save_state` writes them to an ``.npz`` (the kind ``SurrogateSimulation``
writes beside its checkpoints, plus the atoms' state they belong to) and
:meth:`SurrogateDynamics.load_state` takes them back, only onto the atoms they were saved with
(same atoms, positions and cell) and MD with the same Nosé-Hoover chain. ``restart=PATH`` works
as for ASE's optimizers: an existing file is loaded at construction, and the file is rewritten
with every trajectory frame (every ``loginterval`` steps).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np
from ase import units
from ase.md.md import MolecularDynamics

from integrations.guards import GuardConfig, Guards, guard_error_message
from integrations.openmm_simulation import load_surrogate
from integrations.propagator import (
    DEFAULT_SETTLE_ITERATIONS,
    SAME_STATE_A,
    SurrogatePropagator,
    checked_settle_iterations,
    settle_in_stages,
    settle_stages,
    settling_atoms,
    stage_quenches,
)
from integrations.writers import PS_IN_ASE_TIME
from surrogate_md.errors import EngineError, GuardError
from surrogate_md.fileio import atomic_path

log = logging.getLogger(__name__)

KJ_PER_MOL_IN_EV = units.kJ / units.mol
#: settling stops at this largest force: 10 kJ/mol/nm, OpenMM's minimiser tolerance, in eV/Å
SETTLE_FMAX_EV_PER_A = 1.0 * KJ_PER_MOL_IN_EV

RESTART_FORMAT = "surrogate-md SurrogateDynamics state"
RESTART_VERSION = 1
# a restart file applies to atoms this close to the ones it was saved with: the tolerance at
# which the propagator takes a state for the one it remembered (a PDB's 1e-3 Å rounding passes)
RESTART_TOLERANCE_A = SAME_STATE_A


class SurrogateDynamics(MolecularDynamics):
    """ASE dynamics taking learned jumps.

    Args:
        atoms: the system (atomic numbers must match the surrogate's training system).
        surrogate: :class:`~surrogate_md.Surrogate` or checkpoint path.
        timestep: optional; must equal the learned jump (+ MD segment) in ASE time units.
        trajectory, logfile, loginterval, append_trajectory: as for any ASE MD (``logfile``
            needs a calculator: the logger prints energies).
        guards: action name, :class:`GuardConfig` or :class:`Guards`.
        write_intermediate: also write the jump's intermediate frames to ``trajectory`` (and
            in hybrid mode the MD segment's states at the same spacing).
        md_dynamics, md_steps: hybrid mode: ``md_steps`` steps of this ASE MD before each jump.
        fallback_dynamics: ASE MD used by the ``fallback`` action (default ``md_dynamics``).
        temperature_K: for the energy-guard threshold (and the thermal end velocities).
        end_velocities, velocity_seed: the end state's velocities, ``"difference"`` or
            ``"thermal"``, as in :class:`~integrations.openmm_simulation.SurrogateSimulation`.
        jump_noise: stochastic jumps: a :class:`~surrogate_md.noise.JumpNoise` fitted for this
            surrogate or the path of its ``.npz``; each jump's predicted frames get a Gaussian
            draw of the model's residuals (Å) scaled by ``t / jump_ps``. None (the default):
            deterministic jumps. One fitted for another atom set or jump is a ``DataError``.
        noise_scale: multiplies the noise's standard deviations (>= 0; 1 = as fitted, 0 = the
            deterministic jumps).
        noise_seed: seed of the noise draws (independent of the thermal draws even for the
            same seed); None: not reproducible.
        redraws: with ``jump_noise``: a draw that would not be kept (it fails the guards under
            ``fallback``, or its relaxation fails under ``relax``) is drawn again from the same
            start, up to this many times per jump, before the fallback MD stands in (counted
            in ``n_redraws`` and the guards' ``redraw`` action; the guards check every draw;
            default 0).
        settle_iterations: with a calculator, the atoms the model does not predict get at most
            this many L-BFGS steps after every jump, the predicted ones held (0 = off; above
            10 in stages that stop once the jump end passes the energy check).
        restart: path of a state file (:meth:`save_state`), as for ASE's optimizers: when it
            exists it is loaded (:meth:`load_state`; an error when it does not belong to
            ``atoms``), and it is rewritten with every trajectory frame (every ``loginterval``
            steps, the start included), so the last frame of the trajectory and the file go
            together.
    """

    def __init__(self, atoms, surrogate: Any, timestep: float | None = None,
                 trajectory=None, logfile=None, loginterval: int = 1, *,
                 guards: Guards | GuardConfig | str | None = "raise",
                 write_intermediate: bool = False, md_dynamics=None, md_steps: int = 0,
                 fallback_dynamics=None, temperature_K: float = 300.0,
                 end_velocities: str = "difference", velocity_seed: int | None = None,
                 append_trajectory: bool = False, restart: str | os.PathLike | None = None,
                 jump_noise=None, noise_scale: float = 1.0, noise_seed: int | None = None,
                 settle_iterations: int = DEFAULT_SETTLE_ITERATIONS, redraws: int = 0,
                 **kwargs) -> None:
        self.surrogate = load_surrogate(surrogate)
        self.settle_iterations = checked_settle_iterations(settle_iterations)
        if isinstance(redraws, bool) or int(redraws) != redraws or redraws < 0:
            raise EngineError(f"redraws must be a whole number >= 0, got {redraws!r}")
        self.redraws = int(redraws)
        self.surrogate.check_atomic_numbers(atoms.get_atomic_numbers())
        if md_steps and md_dynamics is None:
            raise EngineError("md_steps > 0 needs md_dynamics (an ASE MD bound to the same "
                              "atoms, e.g. VelocityVerlet(atoms, timestep=0.5 * units.fs))")
        self.md_dynamics = md_dynamics
        self.md_steps = int(md_steps)
        self.fallback_dynamics = fallback_dynamics or md_dynamics
        for role, dyn in (("md_dynamics", md_dynamics), ("fallback_dynamics", fallback_dynamics)):
            _check_md_dynamics(dyn, atoms, role)
        self.jump_ase = self.surrogate.jump_ps * PS_IN_ASE_TIME
        dt = self.jump_ase + (self.md_steps * md_dynamics.dt if self.md_steps else 0.0)
        if timestep is not None and not math.isclose(timestep, dt, rel_tol=1e-9):
            raise EngineError(f"SurrogateDynamics advances by the learned jump "
                              f"({self.surrogate.jump_ps} ps"
                              f"{' plus the MD segment' if self.md_steps else ''} = {dt} ASE "
                              f"time units); timestep={timestep} differs: leave it out")
        if logfile and atoms.calc is None:
            raise EngineError("logfile needs a calculator on the atoms (ASE's MDLogger prints "
                              "energies); attach one or leave logfile out")
        if isinstance(guards, Guards):
            self.guards = guards
        else:
            config = guards if isinstance(guards, GuardConfig) else GuardConfig(
                action=guards or "raise")
            self.guards = Guards(self.surrogate, config, n_dof=_degrees_of_freedom(atoms),
                                 temperature_K=temperature_K)
        if self.guards.action == "relax" and atoms.calc is None:
            raise EngineError("guard action 'relax' minimises a failed jump with the atoms' "
                              "calculator, and these atoms have none: attach one (atoms.calc = "
                              "...) before building the dynamics, or choose 'warn' or 'raise'")
        if self.guards.action == "fallback" and self.fallback_dynamics is None:
            raise EngineError("guard action 'fallback' replaces a failed jump by real MD: pass "
                              "fallback_dynamics (an ASE MD bound to the same atoms, with a "
                              "calculator), or choose another action")
        self.propagator = SurrogatePropagator(
            self.surrogate, end_velocities=end_velocities, temperature_K=temperature_K,
            masses_amu=atoms.get_masses(), seed=velocity_seed, jump_noise=jump_noise,
            noise_scale=noise_scale, noise_seed=noise_seed)
        if self.redraws and self.propagator.jump_noise is None:
            raise EngineError("redraws draw a stochastic jump again: they need jump_noise (a "
                              "deterministic model makes the same jump every time)")
        if self.propagator.needs_history:
            if self.md_steps:
                raise EngineError("hybrid mode (md_steps > 0) does not take a history model "
                                  f"({self.surrogate.name}); use md_steps=0")
            if self.fallback_dynamics is None:
                raise EngineError(f"a history model ({self.surrogate.name}: "
                                  f"{self.surrogate.history_length} frames "
                                  f"{self.surrogate.history_stride_ps} ps apart) builds its input "
                                  "history by real MD: pass fallback_dynamics (an ASE MD bound "
                                  "to the same atoms)")
            if not self.propagator.history_from_jumps:
                log.warning("history model %s: its history stride (%g ps) is not a multiple of "
                            "its output spacing, so every step runs MD instead of a jump",
                            self.surrogate.name, self.surrogate.history_stride_ps)
        if self.fallback_dynamics is not None and (self.guards.action != "raise"
                                                   or self.propagator.needs_history):
            # fallback MD stands in for whole jumps (and, writing intermediate frames, for
            # the jump's output times)
            grid = [*self.surrogate.times_ps] if write_intermediate else [self.surrogate.jump_ps]
            off = [t for t in grid if not _whole(t * PS_IN_ASE_TIME / self.fallback_dynamics.dt)]
            if off:
                raise EngineError(
                    f"the fallback MD step {self.fallback_dynamics.dt / units.fs:g} fs does not "
                    f"divide {'the output times ' if write_intermediate else 'the jump '}{off} "
                    "ps, so fallback MD cannot stand in for a jump; choose a step that does")
        if atoms.calc is None:  # refused now rather than at the first MD, maybe hours later
            fb = type(self.fallback_dynamics).__name__
            runs_md = ""
            if self.md_steps:
                runs_md = (f"md_dynamics ({type(md_dynamics).__name__}) runs {self.md_steps} "
                           "MD steps before every jump")
            elif self.fallback_dynamics is not None and self.propagator.needs_history:
                runs_md = f"fallback_dynamics ({fb}) runs MD to build the model's input history"
            elif self.fallback_dynamics is not None and self.guards.action != "raise":
                runs_md = (f"fallback_dynamics ({fb}) runs MD in place of the jumps that guard "
                           f"action {self.guards.action!r} cannot keep")
            if runs_md:
                raise EngineError(f"{runs_md}, and MD needs forces, but these atoms have no "
                                  "calculator: attach one (atoms.calc = ...) before building "
                                  "the dynamics")
        self.n_history_md = 0
        if write_intermediate and trajectory is not None and loginterval != 1:
            raise EngineError(f"write_intermediate=True writes every jump's intermediate frames, "
                              f"but loginterval={loginterval} writes only every "
                              f"{loginterval}th end state: the trajectory would have uneven "
                              "time steps; use loginterval=1 with write_intermediate=True, or "
                              "write_intermediate=False")
        # hybrid mode writing intermediate frames: the MD segment's states go to the trajectory
        # every this many MD steps (the jump's output spacing), so its frames stay evenly spaced
        self._md_write_every = 0
        if write_intermediate and trajectory is not None and self.md_steps:
            self._md_write_every = _segment_write_interval(self.surrogate.times_ps,
                                                           md_dynamics.dt, self.md_steps)
        self.write_intermediate = write_intermediate
        self.last_jump: np.ndarray | None = None
        self.last_jump_times_ps: np.ndarray | None = None
        self.n_jumps = 0
        self.n_fallbacks = 0
        self.n_redraws = 0
        # real MD (ps) since the last state the surrogate made (hybrid segments, fallback and
        # history MD): it decides whether a state's energy may move the guard's anchor
        self._md_ps = 0.0
        self._molecules = _BondTree(len(atoms), self.surrogate.topology.get("bonds", []))
        # (atoms, 3) Å: the last whole positions handed out under periodic boundaries; the next
        # ones keep each molecule at the same lattice image (see _whole_positions)
        self._whole_ref: np.ndarray | None = None
        self._resumed = False  # a state file was loaded (see irun)
        self.restart = None if restart is None else os.fspath(restart)
        state = None
        if self.restart is not None and os.path.exists(self.restart):
            # read and checked before ASE opens (and without append_trajectory empties) the
            # trajectory: a refused restart leaves the run's trajectory as it was
            state = self._read_state(self.restart, atoms, dt)
            if (state[1]["nsteps"] and trajectory is not None and not append_trajectory
                    and not hasattr(trajectory, "write")):
                log.warning("restarting at step %d with append_trajectory=False: %s is "
                            "overwritten and starts after that step; pass "
                            "append_trajectory=True to continue it", state[1]["nsteps"],
                            trajectory)
        super().__init__(atoms, dt, trajectory=trajectory, logfile=logfile,
                         loginterval=loginterval, append_trajectory=append_trajectory, **kwargs)
        if state is not None:
            self._apply_state(self.restart, *state)
        if self.restart is not None:
            # attached after the trajectory writer: the file follows the frame just written
            self.attach(self._write_restart, interval=loginterval)

    def todict(self) -> dict:
        d = super().todict()
        d.update({"surrogate": self.surrogate.name, "jump_ps": self.surrogate.jump_ps,
                  "checkpoint_hash": self.surrogate.checkpoint_hash, "md_steps": self.md_steps,
                  "guard_action": self.guards.action, "restart": self.restart,
                  "settle_iterations": self.settle_iterations, "redraws": self.redraws})
        noise = self.propagator.describe_noise()
        if noise is not None:  # JumpNoise.describe() and its scale
            d["jump_noise"] = noise
        return d

    # -- restarts ---------------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike) -> None:
        """Write what a restart needs beyond the atoms to ``path`` (``.npz``, atomically).

        Arrays: ``keys`` (K,) int64, the remembered states' times in units of 1e-6 ps, and
        ``frames`` (K, n_model_atoms, 3) Å (a history model's remembered frames, as
        ``SurrogateSimulation`` writes them); ``positions`` (n_atoms, 3) Å, ``velocities``
        (n_atoms, 3) Å/ps and ``numbers`` (n_atoms,) of the atoms now, which the file belongs
        to; ``whole`` (n_atoms, 3) Å, the same positions with every molecule whole at the
        lattice image the remembered frames have (periodic cells; (0, 3) otherwise); ``extra``, a
        JSON string: format, version, ``nsteps``, ``time_ps``, ``dt_ase``, ``cell`` (3, 3) Å,
        ``pbc``, the surrogate's name and checkpoint hash, ``rng`` (the thermal draws' generator
        state or null), ``noise_rng`` (the jump noise draws' generator state or null), ``guards``
        (``Guards.energy_state()``: energies and tallies), ``n_jumps``, ``n_fallbacks``,
        ``n_history_md``, ``md_ps``, ``md_rng`` (the random generators' states of
        ``md_dynamics``/``fallback_dynamics``: Langevin, Bussi, Andersen, LangevinBAOAB) and
        ``md_state`` (by the same roles, :func:`_md_state`: the MD's class, step ``dt_ase`` and step
        count ``nsteps``, a Nosé-Hoover chain's variables, Bussi's ``transferred_energy_eV``).
        """
        atoms = self.atoms
        mem = self.propagator.memory()
        extra = {"format": RESTART_FORMAT, "version": RESTART_VERSION,
                 "nsteps": int(self.nsteps), "time_ps": self.get_time() / PS_IN_ASE_TIME,
                 "dt_ase": float(self.dt), "cell": atoms.cell.array.tolist(),
                 "pbc": [bool(p) for p in atoms.pbc], "surrogate": self.surrogate.name,
                 "checkpoint_hash": self.surrogate.checkpoint_hash, "rng": mem["rng"],
                 "noise_rng": mem["noise_rng"], "guards": self.guards.energy_state(),
                 "n_jumps": self.n_jumps,
                 "n_fallbacks": self.n_fallbacks, "n_redraws": self.n_redraws,
                 "n_history_md": self.n_history_md,
                 "md_ps": self._md_ps, "md_rng": self._md_rng_states(),
                 "md_state": {role: _md_state(dyn)
                              for role, dyn in self._md_dynamics().items()}}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=mem["keys"], frames=mem["frames"],
                     positions=atoms.get_positions(),
                     velocities=atoms.get_velocities() * PS_IN_ASE_TIME,
                     numbers=atoms.get_atomic_numbers(),
                     whole=np.zeros((0, 3)) if self._whole_ref is None else self._whole_ref,
                     extra=np.array(json.dumps(extra)))

    def load_state(self, path: str | os.PathLike, *,
                   tolerance_A: float = RESTART_TOLERANCE_A) -> None:
        """Take back a :meth:`save_state` file: the run then goes on as it would have from
        the state saved (step count and time included).

        Applied only to the atoms it was saved with: the same atomic numbers, cell and
        periodicity, positions within ``tolerance_A`` (minimum image), a dynamics of the same
        time step, and MD that takes the Nosé-Hoover chain saved (the same chain length,
        temperature and thermostat time, in the same role); otherwise :class:`EngineError` says
        why, and nothing is changed. The velocities are the atoms' own (a warning when they
        differ from the saved ones).
        """
        path = os.fspath(path)
        self._apply_state(path, *self._read_state(path, self.atoms, self.dt, tolerance_A))

    def _read_state(self, path: str, atoms, dt: float,
                    tolerance_A: float = RESTART_TOLERANCE_A) -> tuple[dict, dict]:
        """The arrays and the ``extra`` dict of a state file, checked against ``atoms`` and the
        time step ``dt`` (ASE units); :class:`EngineError` when it does not apply."""
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in ("keys", "frames", "positions", "velocities",
                                               "numbers")}
                # written since periodic molecules keep their lattice image
                arrays["whole"] = data["whole"] if "whole" in data.files else np.zeros((0, 3))
                extra = json.loads(str(data["extra"]))
        except (OSError, ValueError, KeyError) as exc:
            raise EngineError(f"{path} is not a SurrogateDynamics state file (save_state / "
                              f"restart=): {exc}") from exc
        if extra.get("format") != RESTART_FORMAT:
            raise EngineError(f"{path} is not a SurrogateDynamics state file (format "
                              f"{extra.get('format')!r}; a SurrogateSimulation's "
                              "<file>.surrogate.npz goes with its OpenMM checkpoint)")
        if extra.get("version", 0) > RESTART_VERSION:
            raise EngineError(f"{path} has state file version {extra['version']}, newer than "
                              f"this surrogate-md reads ({RESTART_VERSION}): upgrade")
        why = self._state_mismatch(atoms, dt, arrays, extra, tolerance_A)
        if why:
            raise EngineError(f"{path} (saved at step {extra['nsteps']}, t = "
                              f"{extra['time_ps']:.6g} ps) does not fit these atoms and this "
                              f"dynamics, so it is not applied: {why}. Restart from the frame "
                              "it was saved with (the trajectory's frame at that step), or "
                              "leave it out to start afresh (a history model then rebuilds its "
                              "history by MD)")
        return arrays, extra

    def _apply_state(self, path: str, arrays: dict, extra: dict) -> None:
        """Take back a state :meth:`_read_state` accepted."""
        if extra["checkpoint_hash"] != self.surrogate.checkpoint_hash:
            log.warning("%s was saved with another surrogate checkpoint (%s, hash %s); its "
                        "remembered frames and energies are used with this one (%s)", path,
                        extra["surrogate"], extra["checkpoint_hash"], self.surrogate.name)
        if (extra["rng"] is None) != (self.propagator.end_velocities != "thermal"):
            log.warning("%s was saved with end_velocities=%r, this dynamics uses %r: the "
                        "thermal draws do not go on as they would have", path,
                        "difference" if extra["rng"] is None else "thermal",
                        self.propagator.end_velocities)
        noise_rng = extra.get("noise_rng")  # absent in files written before jump noise
        self.propagator.warn_if_noise_differs(noise_rng, path, "dynamics")
        vel = self.atoms.get_velocities() * PS_IN_ASE_TIME
        if not np.allclose(vel, arrays["velocities"], rtol=1e-6, atol=1e-6):
            log.warning("%s: the atoms' velocities differ from the saved ones (up to %.3g "
                        "Å/ps); the run goes on from the atoms' velocities", path,
                        float(np.abs(vel - arrays["velocities"]).max()))
        self.propagator.restore_memory({"keys": arrays["keys"], "frames": arrays["frames"],
                                        "rng": extra["rng"], "noise_rng": noise_rng})
        self.guards.restore_energy_state(extra["guards"])
        self.n_jumps, self.n_fallbacks = int(extra["n_jumps"]), int(extra["n_fallbacks"])
        self.n_redraws = int(extra.get("n_redraws", 0))  # absent before redraws
        self.n_history_md = int(extra["n_history_md"])
        self._md_ps = float(extra["md_ps"])
        self._restore_md_rng_states(extra.get("md_rng") or {}, path)
        self._restore_md_states(extra.get("md_state"), path)
        self.nsteps = int(extra["nsteps"])
        self._resumed = True
        self.last_jump = self.last_jump_times_ps = None
        whole = arrays["whole"]
        self._whole_ref = whole.copy() if whole.shape == (len(self.atoms), 3) else None

    def _md_dynamics(self) -> dict:
        """The ASE MD objects this dynamics runs, by role (one entry when they are the same)."""
        found = {}
        for role, dyn in (("md_dynamics", self.md_dynamics),
                          ("fallback_dynamics", self.fallback_dynamics)):
            if dyn is not None and all(dyn is not other for other in found.values()):
                found[role] = dyn
        return found

    def _md_rng_states(self) -> dict:
        """The random generators' states of the MD this dynamics runs (Langevin, Bussi,
        Andersen: their ``rng``), so that a restart's MD draws the same random forces."""
        return {role: _rng_state(dyn.rng) for role, dyn in self._md_dynamics().items()
                if getattr(dyn, "rng", None) is not None}

    def _restore_md_rng_states(self, states: dict, path: str) -> None:
        for role, dyn in self._md_dynamics().items():
            if role in states and getattr(dyn, "rng", None) is not None:
                _set_rng_state(dyn.rng, states[role])
            elif getattr(dyn, "rng", None) is not None:
                log.warning("%s holds no random state of the %s (%s): its random forces "
                            "restart from the generator as it is", path, role,
                            type(dyn).__name__)

    def _restore_md_states(self, states: dict | None, path: str) -> None:
        """Take back the MD's own state (:func:`_md_state`) by role; ``states`` is None in a
        file written before it was kept. :meth:`_md_state_mismatch` has checked that every
        saved Nosé-Hoover chain has its counterpart here."""
        for role, dyn in self._md_dynamics().items():
            name = type(dyn).__name__
            saved = (states or {}).get(role)
            if saved is None:
                if states is None and _nose_hoover_chain(dyn) is not None:
                    log.warning("%s was written without the MD's thermostat variables: the "
                                "Nosé-Hoover chain of the %s (%s) starts from rest", path,
                                role, name)
                continue
            dyn.nsteps = int(saved["nsteps"])
            chain, kept = _nose_hoover_chain(dyn), saved.get("nose_hoover_chain")
            if chain is not None and kept is not None:
                chain._eta[:] = kept["eta"]
                chain._p_eta[:] = kept["p_eta"]
            if hasattr(dyn, "transferred_energy") and "transferred_energy_eV" in saved:
                dyn.transferred_energy = float(saved["transferred_energy_eV"])
            if name not in _RESTART_CARRIES_ALL:
                log.warning("%s: the %s (%s) is not an integrator whose whole state a restart "
                            "is known to carry (%s): its step count, random generator and any "
                            "Nosé-Hoover chain are restored, anything else it keeps starts "
                            "afresh", path, role, name, ", ".join(_RESTART_CARRIES_ALL))
            elif not math.isclose(saved["dt_ase"], dyn.dt, rel_tol=1e-9):
                log.warning("%s: the %s (%s) was saved with a %.6g fs step, this one steps by "
                            "%.6g fs: the run goes on, but not as it would have", path, role,
                            name, saved["dt_ase"] / units.fs, dyn.dt / units.fs)
            elif chain is not None and kept is not None and kept["tloop"] != chain._tloop:
                log.warning("%s: the %s (%s) was saved integrating its chain in %d sub-steps "
                            "(tloop), this one in %d: the run goes on, but not as it would "
                            "have", path, role, name, kept["tloop"], chain._tloop)

    def _md_state_mismatch(self, states: dict | None) -> str:
        """Why the MD's saved state (``extra["md_state"]``) does not fit the MD of this dynamics
        ('' when it does): a saved Nosé-Hoover chain needs the same chain (length, temperature,
        thermostat time) in the same role here, and an MD with a chain here needs one saved (a
        file from before the chain was kept, ``states`` None, passes with a warning)."""
        if states is None:
            return ""
        here = self._md_dynamics()
        for role in [*states, *(r for r in here if r not in states)]:
            saved, dyn = states.get(role), here.get(role)
            kept = (saved or {}).get("nose_hoover_chain")
            chain = None if dyn is None else _nose_hoover_chain(dyn)
            if kept is None and chain is None:
                continue
            there = "none" if saved is None else saved["type"]
            name = "none" if dyn is None else type(dyn).__name__
            if kept is None:
                return (f"its {role} ({there}) kept no Nosé-Hoover chain, this {role} ({name}) "
                        f"has one, whose variables would start from rest: build the {role} as "
                        f"saved ({there})")
            if chain is None:
                return (f"its {role} ({there}) kept a Nosé-Hoover chain, which this {role} "
                        f"({name}) cannot take: build the same {there}")
            mine = _chain_state(chain)
            same = (kept["tchain"] == mine["tchain"]
                    and math.isclose(kept["temperature_K"], mine["temperature_K"],
                                     rel_tol=1e-9)
                    and math.isclose(kept["tdamp_ase"], mine["tdamp_ase"], rel_tol=1e-9))
            if not same:
                return (f"its {role} ({there}) ran {_describe_chain(kept)}, this {role} "
                        f"({name}) runs {_describe_chain(mine)}: build the {role} with the "
                        "saved chain")
        return ""

    def _state_mismatch(self, atoms, dt: float, arrays: dict, extra: dict,
                        tolerance_A: float) -> str:
        """Why a state file does not apply to ``atoms`` and a time step ``dt`` ('' when it
        does)."""
        numbers = atoms.get_atomic_numbers()
        if len(arrays["numbers"]) != len(numbers):
            return f"it has {len(arrays['numbers'])} atoms, these are {len(numbers)}"
        if not np.array_equal(arrays["numbers"], numbers):
            first = int(np.nonzero(arrays["numbers"] != numbers)[0][0])
            return (f"atom {first} is element {int(arrays['numbers'][first])} there, "
                    f"{int(numbers[first])} here")
        if [bool(p) for p in atoms.pbc] != extra["pbc"] or not np.allclose(
                atoms.cell.array, extra["cell"], atol=tolerance_A):
            return f"the cell differs ({extra['cell']}, pbc {extra['pbc']} there)"
        if not math.isclose(extra["dt_ase"], dt, rel_tol=1e-9):
            return (f"its dynamics stepped by {extra['dt_ase']:.6g} ASE time units, this one by "
                    f"{dt:.6g} (another jump or MD segment): its clock and remembered "
                    "times do not fit")
        frames = arrays["frames"]
        if len(frames) and frames.shape[1:] != (self.surrogate.n_model_atoms, 3):
            return (f"its remembered frames have {frames.shape[1]} model atoms, the surrogate "
                    f"{self.surrogate.name} models {self.surrogate.n_model_atoms}")
        diff = atoms.get_positions() - arrays["positions"]
        if atoms.pbc.any():
            from ase.geometry import find_mic

            diff = find_mic(diff, atoms.cell, atoms.pbc)[0]
        dist = np.linalg.norm(diff, axis=1)
        if not dist.max() <= tolerance_A:
            return (f"the positions differ from the saved ones by up to {dist.max():.3g} Å "
                    f"(atom {int(dist.argmax())}; tolerance {tolerance_A:g} Å)")
        return self._md_state_mismatch(extra.get("md_state"))

    def _write_restart(self) -> None:
        if getattr(self, "comm", None) is None or self.comm.rank == 0:
            self.save_state(self.restart)

    # -- the loop (no force call without a calculator) --------------------------------------------
    def _refresh_properties(self) -> None:
        if self.atoms.calc is not None:
            self.atoms.get_forces()

    def irun(self, steps: int = 50):
        """As ``MolecularDynamics.irun``, but only asks for forces when a calculator exists, and
        a run resumed from a state saved at step 0 into a trajectory that already holds frames
        does not call the observers for step 0 again (as ASE's optimizers do on restart: the
        frame is there, a second copy would shift every later frame's time)."""
        self.max_steps = self.nsteps + steps
        if self.nsteps == 0:
            self._refresh_properties()
            self.log()
            if not (self._resumed and self._trajectory_has_frames()):
                self.call_observers()
        yield self.nsteps == self.max_steps
        while self.nsteps < self.max_steps:
            self.step()
            self.nsteps += 1
            self._refresh_properties()
            self.log()
            self.call_observers()
            yield self.nsteps == self.max_steps

    def _trajectory_has_frames(self) -> bool:
        """Whether ``trajectory`` (a path or an open ASE trajectory) already holds a frame."""
        if self.trajectory is None:
            return False
        if hasattr(self, "_traj_is_empty"):
            return not self._traj_is_empty()
        path = os.fspath(self.trajectory) if not hasattr(self.trajectory, "write") else None
        return len(self.trajectory) > 0 if path is None else (
            os.path.exists(path) and os.path.getsize(path) > 0)

    def run(self, steps: int = 50) -> bool:
        results = list(self.irun(steps))
        return bool(results[-1])

    # -- one jump ---------------------------------------------------------------------------------
    def _energy_kJ_per_mol(self) -> float | None:
        if self.atoms.calc is None:
            return None
        return float(self.atoms.get_potential_energy()) / KJ_PER_MOL_IN_EV

    def _set(self, positions: np.ndarray, velocities_A_per_ps: np.ndarray) -> None:
        self.atoms.set_positions(positions)
        self.atoms.set_velocities(velocities_A_per_ps / PS_IN_ASE_TIME)

    def step(self) -> None:
        """MD segment (hybrid mode), then one learned jump."""
        if self.md_steps:
            self._md_segment()
        atoms = self.atoms
        pos = self._whole_positions()
        if atoms.constraints and not np.array_equal(pos, atoms.positions):
            # the same state with its molecules whole: constraints hold atoms where the atoms
            # have them, and an atom fixed at another lattice image than the rest of its
            # molecule would split the jump's end state
            atoms.set_positions(pos, apply_constraint=False)
        vel = atoms.get_velocities() * PS_IN_ASE_TIME  # Å/ps
        t0 = (self.nsteps * self.dt + self.md_steps * (self.md_dynamics.dt if self.md_steps
                                                         else 0.0)) / PS_IN_ASE_TIME
        self.propagator.observe(t0, pos)  # the state now is the last frame of any history
        if not self.propagator.has_history(t0):
            # a history model without its input frames: this step is real MD, observed at the
            # surrogate's output times (the states a jump would have supplied)
            log.info("history model: step at t = %.4f ps runs MD to build its input history", t0)
            self._md_jump(t0)
            self.n_history_md += 1
            self.last_jump = self.last_jump_times_ps = None
            return
        e0 = self._energy_kJ_per_mol()
        if e0 is not None and self._md_ps > 0:
            # a state of real MD (hybrid, fallback, history): after long enough MD it may move
            # the anchor
            self.guards.record_md_energy(e0, self._md_ps)
        elif e0 is not None:
            self.guards.record_energy(e0)
        # FixAtoms: held by the jump itself, so that the atoms riding on them stay put and
        # thermal draws give the moving atoms, not the fixed ones, the zero net momentum
        self.propagator.fixed_atoms = _fixed_atoms(atoms)
        draws, redraws = self.propagator.generator_states(), self.n_redraws
        end = t0 + self.surrogate.jump_ps
        for attempt in range(self.redraws + 1):
            # a stochastic draw that would fall back to MD is drawn again from the same start
            redraw_left = attempt < self.redraws
            try:
                result = self.propagator.jump(pos, vel, t0)
                final, fvel = result.positions_A[-1], result.velocities_A_per_ps[-1]
                finite = np.isfinite(final).all()
                energy, stage = None, None
                settled = (finite and self.settle_iterations > 0 and atoms.calc is not None
                           and len(settling_atoms(len(atoms), self.surrogate.model_atoms,
                                                  self.propagator.fixed_atoms)) > 0)
                if finite:
                    if atoms.constraints:
                        # the states the constraints make of every frame: the guards judge the
                        # last, observers (last_jump) and the trajectory get them all
                        self._constrain_frames(result)
                        final, fvel = result.positions_A[-1], result.velocities_A_per_ps[-1]
                    stages = settle_stages(self.settle_iterations)

                    def settle(_: np.ndarray, steps: int) -> np.ndarray:  # the atoms hold it
                        return self._settle(steps)

                    if settled and self.guards.needs_settle_quench(stages):
                        # on the jump's start state, stage after stage
                        self._set(pos, vel)
                        self.guards.set_settle_quenches(stage_quenches(
                            settle, lambda _: self._energy_kJ_per_mol(), pos, stages))
                        self._set(pos, vel)
                    self._set(final, fvel)
                    if settled:
                        final, stage = settle_in_stages(
                            settle, final, stages,
                            lambda _, k: self.guards.settled_passes(self._energy_kJ_per_mol(),
                                                                    k))
                        self.guards.record_settle(stage)
                        result.positions_A[-1] = final  # what observers (last_jump) see
                    energy = self._energy_kJ_per_mol()
                with self.guards.judging_settled(settled, stage):
                    events = self.guards.check(final, fvel, energy_kJ_per_mol=energy,
                                               jump=self.n_jumps + self.n_fallbacks, time_ps=end)
                    keep = True
                    if events:
                        action = self.guards.action_for(events)
                        self.guards.handle(events, "redraw" if action == "fallback"
                                           and redraw_left else action)
                        keep = action == "warn" and finite
                        if action == "relax" and finite and atoms.calc is not None:
                            again = self._relax(self.n_jumps + self.n_fallbacks, end)
                            keep = not again
                            if again:
                                self.guards.handle(again, "redraw" if redraw_left else "fallback")
            except BaseException:
                # Ctrl-C (or an error) before the jump was decided: the atoms go back to its
                # start, an unchecked state is never left in them, and its random draws (all
                # of its draws) go back too, so a restart file written now goes on with the
                # same draws
                self._set(pos, vel)
                self.propagator.restore_generators(draws)
                self.n_redraws = redraws  # the jump is drawn afresh, from its first draw
                raise
            if events and not keep and redraw_left and action != "raise":
                self._set(pos, vel)
                self.n_redraws += 1
                continue
            break
        if events:
            if not keep:
                self._set(pos, vel)
                if action == "raise" or self.fallback_dynamics is None:
                    self.propagator.restore_generators(draws)  # the jump is not taken
                if action == "raise":
                    raise GuardError(guard_error_message(events, "SurrogateDynamics"))
                if self.fallback_dynamics is None:
                    raise GuardError(guard_error_message(events, "SurrogateDynamics") + (
                        f"; the jump could not be kept under action {action!r} and there is no "
                        "fallback_dynamics (an ASE MD on the same atoms) to replace it"))
                self._fallback(t0)
                return
        if settled and (not events or action == "warn"):  # relaxed states are recorded so
            self.guards.record_settled(energy)
        self.propagator.remember(t0, result)  # a history model's next input
        self.propagator.observe(end, self._whole_positions())
        self.last_jump = result.positions_A
        self.last_jump_times_ps = t0 + result.offsets_ps
        if self.write_intermediate and self.trajectory is not None:
            self._write_intermediate(result.positions_A[:-1], result.velocities_A_per_ps[:-1],
                                     final, fvel, settle_steps=stage or 0)
        self.n_jumps += 1
        self._md_ps = 0.0  # the surrogate's state: MD after it starts counting again

    def _md_segment(self) -> None:
        """Hybrid mode: ``md_steps`` steps of ``md_dynamics``; writing intermediate frames, its
        states at the jump's output spacing go to the trajectory (the last one, the state the
        jump starts from, included)."""
        md = self.md_dynamics
        _sync_md_dynamics(md)
        self._begin_md_run(self.md_steps * md.dt / PS_IN_ASE_TIME)
        every = self._md_write_every
        if not every:
            md.run(self.md_steps)
        else:
            frames, velocities = [], []
            for _ in range(self.md_steps // every):
                md.run(every)
                frames.append(self.atoms.get_positions())
                velocities.append(self.atoms.get_velocities() * PS_IN_ASE_TIME)
            self._write_intermediate(np.array(frames), np.array(velocities), frames[-1],
                                     velocities[-1])
        self._md_ps += self.md_steps * md.dt / PS_IN_ASE_TIME

    def _constrain_frames(self, result) -> None:
        """Replace a jump's frames (``result.positions_A``, (P, atoms, 3) Å, and
        ``result.velocities_A_per_ps``) by the states the atoms' constraints make of them, frame
        after frame from the state now, as they would be set during MD; the atoms end in the
        last."""
        atoms = self.atoms
        for k, (frame, vel) in enumerate(zip(result.positions_A, result.velocities_A_per_ps)):
            self._set(frame, vel)
            result.positions_A[k] = atoms.get_positions()
            result.velocities_A_per_ps[k] = atoms.get_velocities() * PS_IN_ASE_TIME

    def _settle(self, steps: int) -> np.ndarray:
        """At most ``steps`` L-BFGS steps with the attached calculator on the atoms
        the model does not predict, the predicted ones held by a ``FixAtoms`` added for the
        steps (the atoms' own constraints are put back as they were). Returns the positions Å;
        the momenta are left as the jump set them."""
        from ase.constraints import FixAtoms
        from ase.optimize import LBFGS

        atoms = self.atoms
        own = list(atoms.constraints)
        before = atoms.get_positions()
        atoms.set_constraint([*own, FixAtoms(indices=self.surrogate.model_atoms)])
        try:
            LBFGS(atoms, logfile=None).run(fmax=SETTLE_FMAX_EV_PER_A, steps=int(steps))
        finally:
            atoms.set_constraint(own)
        if not np.isfinite(atoms.get_positions()).all():  # the guards judge the unsettled state
            atoms.set_positions(before, apply_constraint=False)
        return atoms.get_positions()

    def _relax(self, jump: int, time_ps: float) -> list:
        """The ``relax`` action: FIRE with the attached calculator for at most
        ``relax_iterations`` steps, stopping at the first state that passes every guard with an
        energy back at the relaxation target; returns the failed checks of the final state."""
        from ase.optimize import FIRE

        g = self.guards
        opt = FIRE(self.atoms, logfile=None)
        for _ in opt.irun(fmax=0.5, steps=g.config.relax_iterations):
            if g.relaxed_enough(self.atoms.get_positions(), self._energy_kJ_per_mol(),
                                jump=jump, time_ps=time_ps):
                break
        energy = self._energy_kJ_per_mol()
        events = g.check(self.atoms.get_positions(), energy_kJ_per_mol=energy, jump=jump,
                         time_ps=time_ps, count=False)
        g.record_relaxation(opt.nsteps, None if events or energy is None else energy)
        return events

    def _write_intermediate(self, frames: np.ndarray, velocities: np.ndarray,
                            final: np.ndarray, final_velocities: np.ndarray,
                            settle_steps: int = 0) -> None:
        """Write ``frames`` (K, atoms, 3) Å with their ``velocities`` (K, atoms, 3) Å/ps to the
        trajectory, then put the atoms back in the end state. ``settle_steps``: a jump's frames
        get their rebuilt atoms settled for that many steps first, as its end was."""
        from ase.io.trajectory import Trajectory

        def write_all(traj) -> None:
            for frame, vel in zip(frames, velocities):
                self._set(frame, vel)
                if settle_steps:
                    self._settle(settle_steps)
                self._refresh_properties()  # real energies of intermediate frames too
                traj.write(self.atoms)

        if len(frames) == 0:
            return
        if hasattr(self.trajectory, "write"):
            write_all(self.trajectory)
        else:
            # as ASE's own trajectory writer opens it: under MPI only the master rank writes
            with Trajectory(str(self.trajectory), mode="a", comm=self.comm,
                            master=getattr(self, "_master", None)) as traj:
                write_all(traj)
        self._set(final, final_velocities)

    def _whole_positions(self) -> np.ndarray:
        """(atoms, 3) Å with molecules split by wrapping made whole: what the model, the guards
        and a history model's remembered frames see (one convention for all three, or the
        history would see another state at the same time and be rebuilt at every jump). Each
        molecule stays at the lattice image it had in the previous call, so that atoms wrapped
        back into the cell between steps (an observer calling ``atoms.wrap()``) still match the
        frames a history model remembered."""
        atoms = self.atoms
        pos = atoms.get_positions()
        if atoms.pbc.any():
            pos = self._molecules.apply(pos, atoms.cell, atoms.pbc)
            if self._whole_ref is not None and self._whole_ref.shape == pos.shape:
                pos = self._molecules.follow(pos, self._whole_ref, atoms.cell, atoms.pbc)
            self._whole_ref = pos.copy()
        return pos

    def _begin_md_run(self, run_ps: float) -> None:
        """Before an MD run of ``run_ps`` (a hybrid segment, a fallback, history MD): from
        atoms colder than the guards' ``cold_md_fraction`` of the temperature (a kept jump end
        with the model's difference velocities) the MD heats the structure before it samples,
        so the run counts as no MD time towards ``GuardConfig.anchor_md_ps``: the clock owes
        its length, and its end state counts as the surrogate's."""
        kinetic = self.atoms.get_kinetic_energy() * units.mol / units.kJ  # eV -> kJ/mol
        if self.guards.md_starts_cold(kinetic):
            self._md_ps = -run_ps

    def _fallback(self, t0: float) -> None:
        self._md_jump(t0)
        self.n_fallbacks += 1
        self.last_jump = None
        self.last_jump_times_ps = None

    def _md_jump(self, t0: float) -> None:
        """One jump's length of ``fallback_dynamics`` from ``t0`` (ps); a history model observes
        the states at the surrogate's output times, and with ``write_intermediate`` they go to
        the trajectory as a jump's intermediate frames would (the end state is written by the
        observers after the step)."""
        fb = self.fallback_dynamics
        n = int(round(self.jump_ase / fb.dt))  # a whole number: checked at construction
        _sync_md_dynamics(fb)
        self._begin_md_run(self.surrogate.jump_ps)
        write = self.write_intermediate and self.trajectory is not None
        done = 0
        frames, velocities = [], []
        for offset in self.surrogate.times_ps:
            steps = int(round(offset * PS_IN_ASE_TIME / fb.dt))
            if steps > done and math.isclose(steps * fb.dt, offset * PS_IN_ASE_TIME,
                                             rel_tol=1e-6):
                fb.run(steps - done)
                done = steps
                self.propagator.observe(t0 + float(offset), self._whole_positions())
                if write and steps < n:
                    frames.append(self.atoms.get_positions())
                    velocities.append(self.atoms.get_velocities() * PS_IN_ASE_TIME)
        if done < n:
            fb.run(n - done)
        if frames:
            self._write_intermediate(np.array(frames), np.array(velocities),
                                     self.atoms.get_positions(),
                                     self.atoms.get_velocities() * PS_IN_ASE_TIME)
        self._md_ps += self.surrogate.jump_ps


class _BondTree:
    """Make bonded molecules whole under periodic boundaries: every atom is put at the minimum
    image of its bond to its parent in a breadth-first tree of each molecule, level by level
    (positions wrapped atom by atom, as ``atoms.wrap()`` does, split molecules across the cell's
    faces; the surrogate and the guards need them whole)."""

    def __init__(self, n_atoms: int, bonds) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import breadth_first_order, connected_components

        bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
        graph = coo_matrix((np.ones(len(bonds)), (bonds[:, 0], bonds[:, 1])),
                           shape=(n_atoms, n_atoms)).tocsr()
        _, labels = connected_components(graph, directed=False)
        parent = np.full(n_atoms, -1)
        depth = np.zeros(n_atoms, dtype=np.int64)
        for root in np.unique(labels, return_index=True)[1]:
            order, pred = breadth_first_order(graph, int(root), directed=False)
            for atom in order[1:]:  # breadth-first: a parent comes before its children
                parent[atom] = pred[atom]
                depth[atom] = depth[pred[atom]] + 1
        self.levels = [np.nonzero(depth == d)[0] for d in range(1, int(depth.max(initial=0)) + 1)]
        self.parent = parent
        self.labels = labels  # (atoms,) the molecule of each atom
        self.roots = np.unique(labels, return_index=True)[1]  # (molecules,) each one's root

    def apply(self, positions: np.ndarray, cell, pbc) -> np.ndarray:
        """(atoms, 3) Å -> the same atoms with every molecule whole."""
        from ase.geometry import find_mic

        out = np.array(positions, dtype=np.float64)
        for level in self.levels:
            parent = self.parent[level]
            out[level] = out[parent] + find_mic(out[level] - out[parent], cell, pbc)[0]
        return out

    def follow(self, positions: np.ndarray, reference: np.ndarray, cell, pbc) -> np.ndarray:
        """(atoms, 3) Å with every molecule whole -> the same with every molecule moved by the
        lattice vector that puts its root atom nearest to the root in ``reference`` (atoms, 3)
        Å: a state wrapped since ``reference`` (``atoms.wrap()`` in an observer) gets back the
        coordinates it had there."""
        from ase.geometry import find_mic

        d = reference[self.roots] - positions[self.roots]
        shift = d - find_mic(d, cell, pbc)[0]  # (molecules, 3) Å, lattice vectors
        return positions + shift[self.labels]


# constant-volume ASE integrators whose whole state beyond the atoms a restart carries (the
# variable-cell ones are refused as md_dynamics/fallback_dynamics): VelocityVerlet and
# NVTBerendsen keep none, Langevin and Andersen a random generator, Bussi one and the energy it
# moved, LangevinBAOAB one and the accelerations (recomputed before each segment),
# NoseHooverChainNVT the chain's positions and momenta (and its own copy of the atoms'
# positions and momenta, brought up to date before each segment); each with its step count
_RESTART_CARRIES_ALL = ("VelocityVerlet", "NVTBerendsen", "Langevin", "Andersen", "Bussi",
                        "LangevinBAOAB", "NoseHooverChainNVT")


def _nose_hoover_chain(dyn):
    """The ``NoseHooverChainThermostat`` of an ASE MD (NoseHooverChainNVT), or None."""
    try:
        from ase.md.nose_hoover_chain import NoseHooverChainThermostat
    except ImportError:  # an ASE without Nosé-Hoover chains
        return None
    chain = getattr(dyn, "_thermostat", None)
    return chain if isinstance(chain, NoseHooverChainThermostat) else None


def _chain_state(chain) -> dict:
    """JSON-safe state of a ``NoseHooverChainThermostat``: what makes it this chain
    (``tchain``, ``tloop``, ``temperature_K``, ``tdamp_ase`` in ASE time units) and its
    variables, ``eta`` (tchain,) dimensionless and ``p_eta`` (tchain,) eV * ASE time."""
    return {"tchain": int(chain._tchain), "tloop": int(chain._tloop),
            "temperature_K": float(chain._kT / units.kB), "tdamp_ase": float(chain._tdamp),
            "eta": chain._eta.tolist(), "p_eta": chain._p_eta.tolist()}


def _describe_chain(state: dict) -> str:
    return (f"a chain of {state['tchain']} thermostats at {state['temperature_K']:g} K with "
            f"tdamp {state['tdamp_ase'] / units.fs:g} fs")


def _md_state(dyn) -> dict:
    """JSON-safe state an ASE MD keeps of its own beyond the atoms and its random generator:
    ``type`` (class name), ``dt_ase`` (its step, ASE time units), ``nsteps``, and where it has
    them ``nose_hoover_chain`` (:func:`_chain_state`) and ``transferred_energy_eV`` (Bussi)."""
    state = {"type": type(dyn).__name__, "dt_ase": float(dyn.dt), "nsteps": int(dyn.nsteps)}
    chain = _nose_hoover_chain(dyn)
    if chain is not None:
        state["nose_hoover_chain"] = _chain_state(chain)
    if hasattr(dyn, "transferred_energy"):
        state["transferred_energy_eV"] = float(dyn.transferred_energy)
    return state


def _fixed_atoms(atoms) -> np.ndarray:
    """(k,) indices of the atoms an ASE ``FixAtoms`` constraint holds."""
    from ase.constraints import FixAtoms

    fixed = [c.get_indices() for c in atoms.constraints if isinstance(c, FixAtoms)]
    return np.concatenate(fixed) if fixed else np.zeros(0, dtype=np.int64)


def _rng_state(rng) -> dict:
    """JSON-safe state of a numpy ``Generator``, ``RandomState`` or the ``numpy.random``
    module (whose global generator ASE thermostats use by default)."""
    if isinstance(rng, np.random.Generator):
        return {"kind": "generator", "state": rng.bit_generator.state}
    state = rng.get_state(legacy=False)
    return {"kind": "randomstate", "state": {**state, "state": {
        "key": state["state"]["key"].tolist(), "pos": int(state["state"]["pos"])}}}


def _set_rng_state(rng, saved: dict) -> None:
    """Take back a :func:`_rng_state` into ``rng`` (of the same kind)."""
    if saved["kind"] == "generator" and isinstance(rng, np.random.Generator):
        rng.bit_generator.state = saved["state"]
    elif saved["kind"] == "randomstate" and not isinstance(rng, np.random.Generator):
        state = dict(saved["state"])
        state["state"] = {"key": np.asarray(state["state"]["key"], dtype=np.uint32),
                          "pos": int(state["state"]["pos"])}
        rng.set_state(state)
    else:
        log.warning("a saved random state of kind %r does not fit the generator %s; not "
                    "restored", saved["kind"], type(rng).__name__)


def _segment_write_interval(times_ps, md_dt: float, md_steps: int) -> int:
    """MD steps between the trajectory frames of a hybrid MD segment of ``md_steps`` steps of
    ``md_dt`` (ASE time units) before a jump with output times ``times_ps`` (P,) ps, so that
    the MD's frames and the jump's are one even grid; :class:`EngineError` when there is none
    (an uneven output grid, or a segment that is not a whole number of output spacings)."""
    times = np.asarray(times_ps, dtype=np.float64)
    spacing = float(times[0])
    per = spacing * PS_IN_ASE_TIME / md_dt
    even = np.allclose(times, spacing * np.arange(1, len(times) + 1), rtol=1e-6, atol=0.0)
    if not (even and _whole(per) and md_steps % round(per) == 0):
        raise EngineError(
            f"write_intermediate=True writes the jump's frames {spacing:g} ps apart, and the MD "
            f"segment before each jump ({md_steps} steps of {md_dt / units.fs:g} fs) is not a "
            "whole number of those spacings"
            + ("" if even else f" (nor are the output times {times.tolist()} ps evenly spaced)")
            + ": the trajectory would have uneven time steps; choose md_steps and the MD step "
            f"so that the segment is a multiple of {spacing:g} ps, or write_intermediate=False")
    return round(per)


def _degrees_of_freedom(atoms) -> int:
    """3 per atom with mass, minus what the atoms' constraints remove (ASE's own count)."""
    return int(atoms.get_number_of_degrees_of_freedom())


def _whole(x: float) -> bool:
    return round(x) >= 1 and math.isclose(round(x), x, rel_tol=1e-6)


# ASE integrators for a variable cell: the surrogate keeps the cell as it is
_VARIABLE_CELL = ("NPT", "MelchionnaNPT", "NPTBerendsen", "Inhomogeneous_NPTBerendsen",
                  "IsotropicMTKNPT", "MTKNPT", "MaskedMTKNPT")


def _check_md_dynamics(dyn, atoms, role: str) -> None:
    """Refuse an MD for hybrid/fallback use that cannot hand over to and from the surrogate."""
    if dyn is None:
        return
    if getattr(dyn, "atoms", None) is not atoms:
        raise EngineError(f"{role} ({type(dyn).__name__}) is bound to another Atoms object: "
                          "build it on the atoms given to SurrogateDynamics, or its MD moves "
                          "atoms the surrogate never sees")
    name = type(dyn).__name__
    if name in _VARIABLE_CELL or getattr(dyn, "externalstress", None) is not None:
        raise EngineError(f"{role} ({name}) changes the cell, which the surrogate keeps fixed "
                          "(it was trained at constant volume); use a constant-volume MD "
                          "(VelocityVerlet, Langevin, Bussi, NoseHooverChainNVT)")


def _sync_md_dynamics(dyn) -> None:
    """Bring an ASE integrator's own copy of the state up to date with its atoms before it runs
    from a state the surrogate made: NoseHooverChainNVT keeps positions and momenta (``_q``,
    ``_p``) from its construction or last step and would write them back (discarding every jump
    since), LangevinBAOAB the accelerations of its last step (``accel``)."""
    if hasattr(dyn, "_q") and hasattr(dyn, "_p"):
        dyn._q = dyn.atoms.get_positions()
        dyn._p = dyn.atoms.get_momenta()
    if hasattr(dyn, "_update_accel"):
        dyn._update_accel()


__all__ = ["SurrogateDynamics"]
