"""Checks run after every learned jump, shared by the OpenMM and ASE integrations.

A jump fails a guard when its end state has

- ``non_finite``: NaN/inf positions or velocities;
- ``bond``: a predicted bond deviating from its training mean by more than the tolerance learned
  from the training data (``surrogate.validity.bond_tolerance_A``);
- ``clash``: two predicted atoms more than two bonds apart closer than
  ``surrogate.validity.min_distance_A``;
- ``chain_break``: CA atoms of consecutive residues of one protein chain further apart than
  ``chain_break_A`` (4.5 Å);
- ``size``: a radius of gyration of the predicted atoms outside the range learned from the
  training data (``surrogate.validity.gyration_range_A``; checkpoints of older releases have
  none): a model that compacts (or swells) the molecule a little each jump passes every local
  check (a deterministic AdK model took the backbone from 19 to 14.5 Å in 100 jumps, the MD
  staying at 18.3-20.5 Å); a minimiser does not expand a compacted molecule, so the ``relax``
  action falls back (or draws again) at once on one that came out too small;
- ``energy``: (when the engine gives energies) a potential energy more than
  ``energy_jump_kJ_per_mol`` above the reference energy: the median of the recent energies,
  capped at the median of the anchor energies plus ``energy_drift_kJ_per_mol`` (default 0). The
  anchor is the median of the recent energies of states real MD produced
  (:meth:`Guards.record_md_energy`: hybrid MD segments, fallback MD, history warm-up) that ran
  for at least ``anchor_md_ps`` (default 1 ps) since the last state a surrogate produced, and
  before any such energy, the energy of the state the run started from (the first energy
  recorded since the start or the last :meth:`Guards.reset_energies`). Shorter MD does not
  count: a state a few MD steps after a jump still carries the jump's excess energy (a
  thermostat sheds it over about 1/friction), and hybrid mode with short segments would
  otherwise let a surrogate that heats a little per jump lift its own ceiling without bound.
  Nor does MD that starts from a state colder than ``cold_md_fraction`` (default half) of the
  temperature (:meth:`Guards.md_starts_cold`; the engines check the kinetic temperature where
  each MD run begins): from a kept jump end carrying the small difference velocities of a
  deterministic model (AdK: 7-21 kJ/mol of kinetic energy against ~12.5 MJ/mol at 300 K) MD
  first heats the structure, and a guarded AdK run whose one 4 ps fallback did so lifted the cap
  1.05 MJ/mol above the MD's median energy; such a run counts as no MD time, so its end state
  counts as the surrogate's and the MD after it starts the clock.
  The default threshold is eight standard deviations of the canonical potential-energy
  fluctuation of a harmonic system, ``8 · kT · sqrt(n_dof / 2)``. The cap matters on long runs:
  each jump accepted a little above the recent median lifts that median, and without it a
  guarded 1000-jump AdK run ratcheted its potential energy up by 11 MJ/mol (70 standard
  deviations) while no single jump failed; at equilibrium the potential energy is stationary,
  so the start is the right ceiling, and states of real MD are samples of the right ensemble
  that may move it (up or down): the states a surrogate produced never lift it. A start far
  below the thermal mean (``minimizeEnergy()`` then ``setVelocitiesToTemperature``: the thermal
  rise of ``~n_dof/2 kT`` exceeds the threshold beyond a few hundred degrees of freedom) would
  otherwise hold the ceiling at the cold structure's energy for the whole run, and with
  ``fallback`` turn it into pure MD. Give ``energy_drift_kJ_per_mol=None`` where the energy is
  meant to change (heating, a reaction). Only the start counts before real MD has run: the
  states after it are the surrogate's. When the anchor was the median of the first
  ``energy_window`` energies, a deterministic alanine-dipeptide model whose first jumps were
  each accepted up to one threshold above the last lifted it 190 kJ/mol (15 standard
  deviations) above the MD's median within ten jumps, and its kept states stayed there for
  1000 jumps.

What happens on failure is the engine's ``action``: ``raise`` (:class:`GuardError`), ``warn``
(log and keep the jump), ``fallback`` (discard the jump and run real MD of the same length),
``relax`` (keep the jump and minimise its energy, at most ``relax_iterations`` minimiser
iterations, stopping at the first iteration whose state passes every check with an energy back at
the reference energy (``relax_energy_target_kJ_per_mol`` above it, default 0), so relaxed states
do not keep the jump's strain; relaxed states stay out of the median's window, which thus holds
only states the dynamics reached unaided and cannot drift with the relaxations; if the guard still
fails, fall back to MD). So do the jump ends whose rebuilt atoms the engine settled
(:meth:`Guards.record_settled`): a minimiser moved them too.
Every event is counted; :meth:`Guards.summary` gives the totals for logs and provenance, including
the minimiser iterations the relaxations took.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

import numpy as np

from surrogate_md.errors import ConfigError
from surrogate_md.metrics import ca_pairs_of
from surrogate_md.validity import radius_of_gyration

#: guard events logged as warnings by one :class:`Guards`; later ones go to DEBUG level
WARNED_EVENTS = 20
#: the most recent events a :class:`Guards` keeps in ``events``
KEPT_EVENTS = 1000

log = logging.getLogger(__name__)

ACTIONS = ("raise", "warn", "fallback", "relax")


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds and the action on failure.

    Attributes:
        action: one of :data:`ACTIONS`.
        bond_tolerance_A: override of the learned bond tolerance (None = from the checkpoint).
        min_distance_A: override of the learned clash distance (None = from the checkpoint).
        gyration_range_A: override of the learned (smallest, largest) radius of gyration of the
            predicted atoms, Å (None = from the checkpoint; ``(0, inf)``: no check, e.g. where
            the model atoms are several molecules that drift apart).
        chain_break_A: largest allowed CA(i)-CA(i+1) distance.
        energy_jump_kJ_per_mol: largest allowed rise over the reference energy
            (None = ``8 kT sqrt(n_dof/2)``).
        energy_window: how many recent energies form the reference (and how many recent
            energies of real MD form the anchor that caps it).
        energy_drift_kJ_per_mol: how far the reference may rise above the anchor: the median
            of the last ``energy_window`` energies of real-MD states
            (:meth:`Guards.record_md_energy`), or where none has been recorded, the energy of
            the state the run started from (the first recorded since the start or the last
            :meth:`Guards.reset_energies`); None: no cap, the reference follows the recent
            energies wherever they go.
        temperature_K: temperature for the default energy threshold (None: the engine's, or
            300 K).
        relax_iterations: most minimiser iterations of one ``relax`` action, all its stages
            together (it stops earlier, at the first iteration whose state passes every check
            with an energy at most ``relax_energy_target_kJ_per_mol`` above the reference
            energy). In implicit solvent most are iterations without the solvent force, ~10x
            cheaper on a protein (OpenMM engine): there 500 costs less than the fallback MD a
            relaxation that ran out would cost.
        relax_energy_target_kJ_per_mol: where a relaxation may stop, relative to the reference
            energy (must not exceed the energy threshold).
        anchor_md_ps: the least real MD (ps) since the last state a surrogate produced for a
            state to count as a sample of the ensemble, whose energy may move the anchor
            (:meth:`Guards.record_md_energy`); states after shorter MD (hybrid mode with a few
            MD steps per jump, fallback MD of a short jump) count as the surrogate's. The
            default, 1 ps, is the relaxation time of a Langevin thermostat with a friction of
            1/ps; use about 1/friction of yours (0: every MD state counts).
        cold_md_fraction: an MD run (a fallback, a hybrid segment, a history warm-up) that
            starts from a state whose kinetic temperature is below this fraction of the
            temperature heats the structure before it samples: its time does not count towards
            ``anchor_md_ps`` (:meth:`Guards.md_starts_cold`; 0: every run counts).
    """

    action: str = "raise"
    bond_tolerance_A: float | None = None
    min_distance_A: float | None = None
    gyration_range_A: tuple[float, float] | None = None
    chain_break_A: float = 4.5
    energy_jump_kJ_per_mol: float | None = None
    energy_window: int = 10
    energy_drift_kJ_per_mol: float | None = 0.0
    temperature_K: float | None = None
    relax_iterations: int = 200
    relax_energy_target_kJ_per_mol: float = 0.0
    anchor_md_ps: float = 1.0
    cold_md_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown guard action {self.action!r}; choose one of {ACTIONS}")
        if self.energy_drift_kJ_per_mol is not None and not (
                np.isfinite(self.energy_drift_kJ_per_mol) and self.energy_drift_kJ_per_mol >= 0):
            raise ConfigError("energy_drift_kJ_per_mol must be a finite number >= 0 of kJ/mol "
                              "(0 = never above the start's energies) or None (no cap), got "
                              f"{self.energy_drift_kJ_per_mol}")
        if int(self.energy_window) != self.energy_window or self.energy_window < 1:
            raise ConfigError(f"energy_window must be a whole number >= 1 of recent energies, got "
                              f"{self.energy_window}")
        for name in ("energy_jump_kJ_per_mol", "temperature_K", "bond_tolerance_A",
                     "min_distance_A"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0 or None (the default), "
                                  f"got {value}")
        if self.gyration_range_A is not None:
            lo, hi = (float(v) for v in self.gyration_range_A)
            if not (np.isfinite(lo) and lo >= 0 and hi > lo):
                raise ConfigError(f"gyration_range_A must be (smallest, largest) radius of "
                                  f"gyration in Å with 0 <= smallest < largest ((0, inf): no "
                                  f"check), got {self.gyration_range_A}")
        if not (np.isfinite(self.chain_break_A) and self.chain_break_A > 0):
            raise ConfigError(f"chain_break_A must be a finite distance > 0 Å, got "
                              f"{self.chain_break_A}")
        if int(self.relax_iterations) != self.relax_iterations or self.relax_iterations < 0:
            raise ConfigError(f"relax_iterations must be a whole number >= 0, got "
                              f"{self.relax_iterations}")
        if not (np.isfinite(self.anchor_md_ps) and self.anchor_md_ps >= 0):
            raise ConfigError(f"anchor_md_ps must be a finite time >= 0 ps (0: every state of "
                              f"real MD may move the energy anchor), got {self.anchor_md_ps}")
        if not (np.isfinite(self.cold_md_fraction) and 0 <= self.cold_md_fraction <= 1):
            raise ConfigError(f"cold_md_fraction must be a fraction of the temperature in "
                              f"[0, 1] (0: MD from any state counts towards anchor_md_ps), got "
                              f"{self.cold_md_fraction}")
        if not np.isfinite(self.relax_energy_target_kJ_per_mol):
            raise ConfigError("relax_energy_target_kJ_per_mol must be a finite number of kJ/mol "
                              f"(0 = back to the reference energy), got "
                              f"{self.relax_energy_target_kJ_per_mol}")


@dataclass
class GuardEvent:
    """One failed check of one jump."""

    check: str
    value: float
    threshold: float
    jump: int
    time_ps: float
    action: str = ""

    def describe(self) -> str:
        return (f"jump {self.jump} (t = {self.time_ps:.4f} ps): {self.check} {self.value:.4g} "
                f"beyond {self.threshold:.4g}")


@dataclass
class Guards:
    """Run the checks on full-system states and count what happened.

    Args:
        surrogate: the :class:`~surrogate_md.Surrogate` (tolerances, model atoms, topology).
        config: :class:`GuardConfig` (or an action name).
        n_dof: degrees of freedom for the default energy threshold (3 N when not given).
        temperature_K: the engine's temperature, for the default energy threshold where the
            config names none.
    """

    surrogate: object
    config: GuardConfig = field(default_factory=GuardConfig)
    n_dof: int | None = None
    temperature_K: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.config, str):
            self.config = GuardConfig(action=self.config)
        s = self.surrogate
        val = s.validity
        self.bond_tolerance_A = (self.config.bond_tolerance_A if self.config.bond_tolerance_A
                                 is not None else (val.bond_tolerance_A if val else np.inf))
        self.min_distance_A = (self.config.min_distance_A if self.config.min_distance_A
                               is not None else (val.min_distance_A if val else 0.0))
        gyration = (self.config.gyration_range_A if self.config.gyration_range_A is not None
                    else getattr(val, "gyration_range_A", None))
        # (0, inf): no check, as a checkpoint without a range
        self.gyration_range_A = (None if gyration is None
                                 or (gyration[0] <= 0 and gyration[1] == np.inf)
                                 else (float(gyration[0]), float(gyration[1])))
        self._validity = val
        self._model_atoms = np.asarray(s.model_atoms)
        self._ca_pairs = _consecutive_ca_pairs(s.topology)
        n_dof = self._n_dof = self.n_dof if self.n_dof is not None else 3 * s.n_atoms
        self.energy_jump_kJ_per_mol = (self.config.energy_jump_kJ_per_mol
                                       if self.config.energy_jump_kJ_per_mol is not None
                                       else default_energy_threshold(n_dof, self.temperature))
        self._energies: deque[float] = deque(maxlen=self.config.energy_window)
        # the first energy since a reset: the state the run started from
        self._anchor: list[float] = []
        # the last energy_window energies of states real MD produced (they replace the anchor)
        self._md_energies: deque[float] = deque(maxlen=self.config.energy_window)
        self.counts: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        # the most recent events (a long run's tallies are in counts/actions; keeping every
        # event would grow without bound)
        self.events: deque[GuardEvent] = deque(maxlen=KEPT_EVENTS)
        self._logged = 0  # events logged at WARNING level so far (see handle)
        self.n_checked = 0
        self.n_failed = 0  # checked jumps that failed at least one check
        self.n_relaxations = 0
        self.relax_iterations_used = 0
        self._relaxed_energy: float | None = None
        #: the engine's settling quenches of a reference-level state by settle stage
        #: (cumulative iterations -> kJ/mol; :meth:`set_settle_quenches`, empty until
        #: measured), whether a state of real MD has moved the anchor since (the engine then
        #: measures them again), and the stage of the jump end being judged
        self._quenches: dict[int, float] = {}
        self._quench_stale = False
        self._judging_settled = False
        self._judged_stage: int | None = None
        self.n_settled = 0  # jump ends settled
        self.settle_iterations_used = 0  # the stages they reached, in iterations (budgets)

    @property
    def action(self) -> str:
        return self.config.action

    def record_energy(self, energy_kJ_per_mol: float) -> None:
        """Add an accepted state's potential energy to the reference window (a state the
        surrogate produced, or of unknown origin: only the first since a reset, the state the
        run started from, is the anchor; see :meth:`record_md_energy` for states of real MD).

        The state a relaxation just produced is left out (recognised by its energy, recorded by
        :meth:`record_relaxation`; any MD since changes it): relaxations aim at the window's
        median, and feeding their results back would drag the reference down jump after jump.
        """
        e = float(energy_kJ_per_mol)
        relaxed, self._relaxed_energy = self._relaxed_energy, None
        if relaxed is not None and abs(e - relaxed) <= 1e-9 * max(1.0, abs(e)):
            return
        self._append(e)

    def record_md_energy(self, energy_kJ_per_mol: float, md_ps: float = float("inf")) -> None:
        """Add the potential energy of a state real MD produced (a hybrid MD segment, fallback
        MD, a history warm-up) to the reference window and to the real-MD energies, whose median
        is the anchor that caps the reference (see the module doc): unlike a surrogate's states,
        these are samples of the ensemble the guard measures against, so they may move the cap,
        e.g. lift it from the energy of a minimised start to the thermal level.

        ``md_ps``: how long real MD ran since the last state a surrogate produced (or since
        the state was set by hand). Below ``config.anchor_md_ps`` the state still carries that
        state's excess energy and is recorded as one of the surrogate's (:meth:`record_energy`:
        it never moves the anchor)."""
        e = float(energy_kJ_per_mol)
        self._relaxed_energy = None  # MD since the relaxation: not the relaxed state
        if not md_ps >= self.config.anchor_md_ps * (1.0 - 1e-9):  # steps x dt: rounding
            self._append(e)
            return
        if np.isfinite(e):
            # the anchor moves from the start's energy to real MD's for the first time: the
            # quench is measured again on this sample of the ensemble (once, not every hybrid
            # segment: it costs a settling and two energies)
            self._quench_stale = self._quench_stale or not self._md_energies
            self._md_energies.append(e)
        self._append(e)

    def md_starts_cold(self, kinetic_energy_kJ_per_mol: float) -> bool:
        """Whether MD from a state with this kinetic energy (kJ/mol, over the engine's
        ``n_dof``) heats it rather than samples: a kinetic temperature below
        ``config.cold_md_fraction`` of :attr:`temperature`. The engines then count that MD run
        as no MD time towards ``anchor_md_ps`` (see the module doc)."""
        t_kin = kinetic_temperature_K(kinetic_energy_kJ_per_mol, self._n_dof)
        return bool(t_kin < self.config.cold_md_fraction * self.temperature)

    def _append(self, e: float) -> None:
        if np.isfinite(e):
            self._energies.append(e)
            if not self._anchor:
                self._anchor.append(e)

    @property
    def temperature(self) -> float:
        """K: the config's temperature, else the engine's."""
        t = self.config.temperature_K
        return float(self.temperature_K if t is None else t)

    def reset_energies(self) -> None:
        """Forget the recorded energies, the anchor and the settling quench included (the state
        was changed by hand)."""
        self._relaxed_energy = None
        self._quenches = {}
        self._quench_stale = False
        self._energies.clear()
        self._anchor.clear()
        self._md_energies.clear()

    def energy_state(self) -> dict:
        """What a restart needs to judge the next jumps and count the run as it would have,
        JSON-safe: the recorded energies (reference window, start anchor, real-MD energies), the
        energy of a just-accepted relaxation (:meth:`record_energy` leaves that state out of the
        window) and the tallies :meth:`summary` reports (events themselves are not kept)."""
        return {"energies": list(self._energies), "anchor": list(self._anchor),
                "md_energies": list(self._md_energies), "relaxed_energy": self._relaxed_energy,
                "n_checked": self.n_checked, "n_failed": self.n_failed,
                "counts": dict(self.counts), "actions": dict(self.actions),
                "n_relaxations": self.n_relaxations,
                "relax_iterations_used": self.relax_iterations_used,
                "settle_quench": self.settle_quench_kJ_per_mol,
                "settle_quench_iterations": self._quench_iterations,
                "settle_quenches": [[k, q] for k, q in sorted(self._quenches.items())],
                "settle_quench_stale": self._quench_stale,
                "n_settled": self.n_settled,
                "settle_iterations_used": self.settle_iterations_used}

    def restore_energy_state(self, state: dict) -> None:
        """Take back an :meth:`energy_state` (a state of an older release without the
        tallies restores the energies only)."""
        self.reset_energies()
        self._energies.extend(float(e) for e in state.get("energies", []))
        # a state of an earlier release holds the first energy_window energies: the first is
        # the start's, the rest the surrogate's that would lift the cap (see the module doc)
        self._anchor.extend(float(e) for e in state.get("anchor", [])[:1])
        self._md_energies.extend(float(e) for e in state.get("md_energies", []))
        relaxed = state.get("relaxed_energy")
        self._relaxed_energy = None if relaxed is None else float(relaxed)
        quenches = state.get("settle_quenches")
        if quenches is None:  # an older release: one stage
            quench, iterations = state.get("settle_quench"), state.get("settle_quench_iterations")
            quenches = [] if quench is None or iterations is None else [[iterations, quench]]
        self._quenches = {int(k): float(q) for k, q in quenches}
        self._quench_stale = bool(state.get("settle_quench_stale", False))
        self.n_settled = int(state.get("n_settled", 0))
        self.settle_iterations_used = int(state.get("settle_iterations_used", 0))
        if "n_checked" in state:
            self.n_checked, self.n_failed = int(state["n_checked"]), int(state["n_failed"])
            self.counts, self.actions = Counter(state["counts"]), Counter(state["actions"])
            self.n_relaxations = int(state["n_relaxations"])
            self.relax_iterations_used = int(state["relax_iterations_used"])

    @property
    def energy_anchor_kJ_per_mol(self) -> float:
        """The median of the recent real-MD energies, or before any, the energy of the state the
        run started from (NaN before any energy is recorded)."""
        anchor = self._md_energies or self._anchor
        return float(np.median(anchor)) if anchor else float("nan")

    @property
    def energy_reference_kJ_per_mol(self) -> float:
        """The energy the check measures rises from: the median of the recent energies, at most
        ``energy_drift_kJ_per_mol`` above the anchor (NaN before any energy is recorded), and
        within :meth:`judging_settled` lowered by the settling quench."""
        if not self._energies:
            return float("nan")
        ref = float(np.median(self._energies))
        if self.config.energy_drift_kJ_per_mol is not None:
            ref = min(ref, self.energy_anchor_kJ_per_mol + self.config.energy_drift_kJ_per_mol)
        if self._judging_settled and self.settle_quench_kJ_per_mol is not None:
            ref -= self.settle_quench_kJ_per_mol
        return ref

    @property
    def settle_quench_kJ_per_mol(self) -> float | None:
        """The settling quench (kJ/mol) of the stage being judged (:meth:`judging_settled`),
        outside of that of the first stage; None before the engine measured it."""
        if not self._quenches:
            return None
        stage = self._judged_stage
        return self._quenches[stage if stage in self._quenches else min(self._quenches)]

    @property
    def _quench_iterations(self) -> int | None:
        return min(self._quenches) if self._quenches else None

    def energy_rise(self, energy_kJ_per_mol: float) -> float:
        """kJ/mol above :attr:`energy_reference_kJ_per_mol` (-inf before any is recorded)."""
        if not self._energies:
            return float("-inf")
        return float(energy_kJ_per_mol) - self.energy_reference_kJ_per_mol

    @property
    def relax_target_kJ_per_mol(self) -> float:
        """Where a relaxation may stop, kJ/mol above the reference energy:
        ``relax_energy_target_kJ_per_mol`` capped at the energy threshold."""
        return min(self.config.relax_energy_target_kJ_per_mol, self.energy_jump_kJ_per_mol)

    def energy_at_relax_target(self, energy_kJ_per_mol: float) -> bool:
        """Finite and at most :attr:`relax_target_kJ_per_mol` above the reference energy."""
        return bool(np.isfinite(energy_kJ_per_mol)
                    and self.energy_rise(energy_kJ_per_mol) <= self.relax_target_kJ_per_mol)

    def relaxed_enough(self, positions_A: np.ndarray, energy_kJ_per_mol: float | None, *,
                       jump: int = 0, time_ps: float = 0.0) -> bool:
        """Whether a relaxation may stop at this state: its energy at most
        ``relax_energy_target_kJ_per_mol`` above the reference energy (never beyond the threshold;
        no energy: not tested) and every check passing. Not counted as a checked jump."""
        if energy_kJ_per_mol is not None and not self.energy_at_relax_target(energy_kJ_per_mol):
            return False
        return not self.check(positions_A, energy_kJ_per_mol=energy_kJ_per_mol, jump=jump,
                              time_ps=time_ps, count=False)

    def record_relaxation(self, iterations: int, accepted_energy_kJ_per_mol: float | None = None
                          ) -> None:
        """Count one ``relax`` action that took ``iterations`` minimiser iterations; give the
        energy of the relaxed state when it was accepted (it is then kept out of the reference
        window, see :meth:`record_energy`)."""
        self.n_relaxations += 1
        self.relax_iterations_used += int(iterations)
        self._relaxed_energy = (None if accepted_energy_kJ_per_mol is None
                                else float(accepted_energy_kJ_per_mol))

    def set_settle_quenches(self, quenches: dict[int, float]) -> None:
        """The settling quench after each stage of a staged settling (cumulative iterations ->
        kJ/mol, measured by settling the same state stage after stage, as the engine settles a
        jump end): see :meth:`set_settle_quench`. Replaces those measured before."""
        # a quench from a start state without a finite energy lowers nothing (NaN would make
        # the reference NaN: check() would pass every settled end, settled_passes none)
        self._quenches = {int(k): max(float(q), 0.0) if np.isfinite(q) else 0.0
                          for k, q in quenches.items()}
        self._quench_stale = False

    def set_settle_quench(self, quench_kJ_per_mol: float, iterations: int) -> None:
        """How far the engine's settling (``iterations`` minimiser iterations) lowers the energy
        of a state at the reference level (kJ/mol, >= 0): the engine measures it on the state a
        jump starts from (its energy minus that of the same state settled), first the state the
        run starts from, again on the first state of real MD that moves the anchor and when the
        settle iterations change (:meth:`needs_settle_quench`). Settled jump ends are judged against the
        reference lowered by it (:meth:`judging_settled`): settling quenches the rebuilt atoms
        (AdK, 10 iterations: 5.7-6.1 MJ/mol on MD frames with the backbone held, 3.9-4.3 with
        the heavy atoms held), and measured against the plain reference a settled state would
        hide that much strain of the predicted atoms. A minimised start has little to quench:
        until real MD moves the anchor, the reference is that cold state's energy anyway."""
        self.set_settle_quenches({int(iterations): quench_kJ_per_mol})

    def needs_settle_quench(self, stages) -> bool:
        """Whether the engine should measure the settling quenches on the state a jump now
        starts from: none yet, other stages (``stages``: an iteration count, or the cumulative
        counts of a staged settling), or the anchor moved to real MD's states since."""
        wanted = {int(stages)} if np.ndim(stages) == 0 else {int(k) for k in stages}
        return not self._quenches or self._quench_stale or set(self._quenches) != wanted

    @contextlib.contextmanager
    def judging_settled(self, settled: bool = True, stage: int | None = None):
        """Within: the reference energy (the checks, the ``relax`` action's targets) is lowered
        by :attr:`settle_quench_kJ_per_mol`, the quench of settle ``stage`` (its cumulative
        iterations; None: the first), for a jump end whose rebuilt atoms the engine settled
        that far (``settled`` False: unchanged)."""
        before = self._judging_settled, self._judged_stage
        self._judging_settled, self._judged_stage = bool(settled), stage
        try:
            yield self
        finally:
            self._judging_settled, self._judged_stage = before

    def settled_passes(self, energy_kJ_per_mol: float, stage: int) -> bool:
        """Whether a jump end settled to ``stage`` (cumulative iterations) passes the energy
        check against the reference lowered by that stage's quench: the engine's cue to stop
        settling (the other checks look at the predicted atoms, which settling does not
        move)."""
        with self.judging_settled(True, stage):
            return bool(np.isfinite(energy_kJ_per_mol)
                        and self.energy_rise(energy_kJ_per_mol) <= self.energy_jump_kJ_per_mol)

    def record_settle(self, iterations: int) -> None:
        """Count one settled jump end and the stage it reached (cumulative iterations: the
        stages' budgets; the minimiser may stop a stage earlier at its tolerance)."""
        self.n_settled += 1
        self.settle_iterations_used += int(iterations)

    def record_settled(self, accepted_energy_kJ_per_mol: float | None) -> None:
        """An accepted jump end whose rebuilt atoms the engine settled (``settle_iterations``:
        a minimiser moved them): like a relaxed state it is kept out of the reference window
        when it is recorded next (:meth:`record_energy`). Settling quenches the rebuilt atoms
        (AdK backbone jumps: 4-6 MJ/mol below the MD's median), and such states in the window
        would sink the reference below the MD's level, where the next settled state, a little
        less quenched, fails the check (half the jumps of a 4 ps AdK run did)."""
        self._relaxed_energy = (None if accepted_energy_kJ_per_mol is None
                                else float(accepted_energy_kJ_per_mol))

    def check(self, positions_A: np.ndarray, velocities_A_per_ps: np.ndarray | None = None, *,
              energy_kJ_per_mol: float | None = None, jump: int = 0, time_ps: float = 0.0,
              count: bool = True) -> list[GuardEvent]:
        """Failed checks of one full-system state (empty list = all passed).

        Args:
            positions_A: (n_atoms, 3) Å.
            velocities_A_per_ps: (n_atoms, 3) Å/ps or None.
            energy_kJ_per_mol: potential energy of the state, if the engine has one.
            count: count the state as a checked jump (False for re-checks of the same jump
                while it is relaxed).
        """
        self.n_checked += int(count)
        events = []

        def fail(check: str, value: float, threshold: float) -> None:
            events.append(GuardEvent(check, float(value), float(threshold), jump, time_ps))

        pos = np.asarray(positions_A, dtype=np.float64)
        finite = np.isfinite(pos).all() and (velocities_A_per_ps is None
                                             or np.isfinite(velocities_A_per_ps).all())
        if not finite:
            fail("non_finite", np.nan, 0.0)
            self.n_failed += int(count)
            return events
        model = pos[self._model_atoms]
        if self._validity is not None and len(self._validity.bonds):
            dev = self._validity.bond_deviation(model)
            if dev > self.bond_tolerance_A:
                fail("bond", dev, self.bond_tolerance_A)
        if self.min_distance_A > 0 and self._validity is not None:
            dmin = self._validity.min_distance(model, cutoff_A=max(4.0, 2 * self.min_distance_A))
            if dmin < self.min_distance_A:
                fail("clash", dmin, self.min_distance_A)
        if self.gyration_range_A is not None:
            lo, hi = self.gyration_range_A
            rg = float(radius_of_gyration(model))
            if rg < lo:
                fail("size", rg, lo)
            elif rg > hi:
                fail("size", rg, hi)
        if len(self._ca_pairs):
            d = np.linalg.norm(pos[self._ca_pairs[:, 0]] - pos[self._ca_pairs[:, 1]], axis=1)
            if d.max() > self.config.chain_break_A:
                fail("chain_break", d.max(), self.config.chain_break_A)
        if energy_kJ_per_mol is not None:
            if not np.isfinite(energy_kJ_per_mol):
                fail("non_finite", energy_kJ_per_mol, 0.0)
            elif self._energies:
                rise = self.energy_rise(energy_kJ_per_mol)
                if rise > self.energy_jump_kJ_per_mol:
                    fail("energy", rise, self.energy_jump_kJ_per_mol)
        self.n_failed += int(count and bool(events))
        return events

    def action_for(self, events: list[GuardEvent]) -> str:
        """The action on ``events``: the configured one, except ``relax`` becomes ``fallback``
        where the molecule came out smaller than the ``size`` check allows: a minimiser takes a
        state to the nearest minimum of its energy and does not expand a compacted molecule
        (a swollen one, e.g. with bonds torn, it may well pull back). The engines then draw a
        stochastic jump again where they may."""
        action = self.action
        if action == "relax" and any(ev.check == "size" and ev.value < ev.threshold
                                     for ev in events):
            return "fallback"
        return action

    def handle(self, events: list[GuardEvent], action: str | None = None) -> None:
        """Count and log ``events`` under ``action`` (default: the configured one).

        The first :data:`WARNED_EVENTS` events of this object are logged as warnings, the
        rest at DEBUG level (a long run whose every jump is relaxed would write a warning per
        jump); :meth:`summary` and :meth:`log_summary` count them all."""
        action = action or self.action
        for ev in events:
            ev.action = action
            self.counts[ev.check] += 1
            self.events.append(ev)
            if self._logged < WARNED_EVENTS:
                self._logged += 1
                log.warning("guard: %s -> %s", ev.describe(), action)
                if self._logged == WARNED_EVENTS:
                    log.warning("guard: %d events so far; further ones are logged at DEBUG "
                                "level (the guard summary at the end counts them all)",
                                WARNED_EVENTS)
            else:
                log.debug("guard: %s -> %s", ev.describe(), action)
        if events:
            self.actions[action] += 1

    def summary(self) -> dict:
        """JSON-safe totals: jumps checked, failures per check, actions taken, thresholds."""
        return {"jumps_checked": self.n_checked, "jumps_failed": self.n_failed,
                "failures": dict(self.counts),
                "actions": dict(self.actions), "relaxations": self.n_relaxations,
                "relax_iterations_used": self.relax_iterations_used,
                "settled": self.n_settled, "settle_iterations_used": self.settle_iterations_used,
                "energy_anchor_kJ_per_mol": (self.energy_anchor_kJ_per_mol if self._anchor
                                             else None),
                "energy_anchor_from": ("md" if self._md_energies else "start") if self._anchor
                                      else None,
                "energy_reference_kJ_per_mol": (self.energy_reference_kJ_per_mol
                                                if self._energies else None),
                "thresholds": {"bond_tolerance_A": float(self.bond_tolerance_A),
                               "min_distance_A": float(self.min_distance_A),
                               "chain_break_A": self.config.chain_break_A,
                               "gyration_range_A": (None if self.gyration_range_A is None
                                                    else list(self.gyration_range_A)),
                               "energy_jump_kJ_per_mol": float(self.energy_jump_kJ_per_mol)},
                "config": asdict(self.config)}

    def log_summary(self) -> None:
        s = self.summary()
        log.info("guards: %d jumps checked, failures %s, actions %s", s["jumps_checked"],
                 s["failures"] or "none", s["actions"] or "none")
        if s["relaxations"]:
            log.info("guards: %d relaxations, %.1f minimiser iterations each", s["relaxations"],
                     s["relax_iterations_used"] / s["relaxations"])
        if s["settled"]:
            log.info("guards: %d jump ends settled, to %.1f iterations each (stage budgets)",
                     s["settled"], s["settle_iterations_used"] / s["settled"])


def default_energy_threshold(n_dof: int, temperature_K: float) -> float:
    """The default energy guard, kJ/mol: ``8 kT sqrt(n_dof / 2)``, eight standard deviations of
    the canonical potential-energy fluctuation of ``n_dof`` harmonic degrees of freedom."""
    return 8.0 * kt_kJ_per_mol(temperature_K) * float(np.sqrt(max(n_dof, 1) / 2.0))


def kt_kJ_per_mol(temperature_K: float) -> float:
    """kT in kJ/mol (the molar gas constant from OpenMM's unit module)."""
    from openmm import unit

    r = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    return r * temperature_K


def kinetic_temperature_K(kinetic_energy_kJ_per_mol: float, n_dof: int) -> float:
    """K: ``2 KE / (n_dof R)``, as OpenMM's ``StateDataReporter`` computes it."""
    return 2.0 * float(kinetic_energy_kJ_per_mol) / (max(n_dof, 1) * kt_kJ_per_mol(1.0))


def _consecutive_ca_pairs(topology: dict) -> np.ndarray:
    """(K, 2) atom pairs CA(i), CA(i+1) of a checkpoint's topology dict (see
    :func:`~surrogate_md.metrics.ca_pairs_of`)."""
    return ca_pairs_of(topology.get("atom_names", []), topology.get("residue_ids", []),
                       topology.get("residue_names", []), topology.get("segment_ids"),
                       topology.get("bonds"))


def guard_error_message(events: list[GuardEvent], source: str) -> str:
    """The one-line message of a :class:`GuardError` for ``events``."""
    what = "; ".join(ev.describe() for ev in events)
    return (f"{source}: the learned jump left physical ground ({what}); the surrogate is outside "
            "its training distribution here: use guard action 'fallback' or 'relax', a shorter "
            "jump, or more training data")


__all__ = ["ACTIONS", "GuardConfig", "GuardEvent", "Guards", "default_energy_threshold",
           "kinetic_temperature_K", "kt_kJ_per_mol", "guard_error_message"]
