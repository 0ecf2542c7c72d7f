"""The surrogate inside OpenMM: a ``Simulation`` look-alike and a jump reporter.

:class:`SurrogateSimulation` owns a real :class:`openmm.Context` built from the user's ``System``,
so the stock reporters (``DCDReporter``, ``XTCReporter``, ``StateDataReporter``,
``CheckpointReporter``) work unchanged and report the real force-field energy of every surrogate
frame. ``step(n)`` advances ``n`` learned jumps.

Step and time bookkeeping (what the reporters see):

- jumps only (``md_steps=0``, the default): **one step = one learned jump**. While reporters
  report, the integrator's step size is ``jump_ps`` (at all other times it is the MD step, kept in
  ``md_step_ps`` and used for fallback MD and OpenMM's own kinetic energies), so
  ``XTCReporter(file, 1)`` writes every jump with time stamps ``k x jump_ps``. Reporters see jump
  ends; the intermediate output frames are not steps;
- hybrid mode (``md_steps=k > 0``): steps are MD steps. One jump counts as
  ``steps_per_jump = jump_ps / dt`` integrator steps, and the surrogate's P output frames fall on
  the steps ``steps_per_frame[k] = times_ps[k] / dt``; both must be whole numbers (the default
  integrator picks the largest ``dt <= 2 fs`` that divides every output time);
- after a jump the Context's time is the start time plus ``jump_ps`` and its step count the start
  count plus ``steps_per_jump``, so ``time = step count x dt`` stays true and DCD/XTC time stamps
  (which OpenMM derives from step numbers) equal simulated time;
- a reporter whose next report falls on an output frame gets that frame (positions, backward-
  difference velocities, real energy); a DCD/XTC reporter whose report falls between frames is an
  :class:`EngineError` (its file would carry wrong times: choose an interval that is a multiple of
  ``steps_per_frame[0]``); any other reporter due between frames reports at the next frame.

Settling the rebuilt atoms (``settle_iterations=n``, default :data:`DEFAULT_SETTLE_ITERATIONS`):
a model that predicts only some atoms (backbone, heavy atoms) leaves the others to
:mod:`integrations.reconstruct`, which carries them rigidly; over a jump of picoseconds the
side chains of two residues whose backbones moved towards each other then overlap (AdK, the MD's
own backbone 4 ps on, side chains carried from the start: +3e5 kJ/mol, salt-bridge partners
0.3-0.7 Å apart). After every jump, before anything else looks at its end state, at most ``n``
L-BFGS iterations move the rebuilt atoms only, the predicted atoms held exactly as predicted, in
a copy of the System without implicit solvent (:meth:`Relaxation.settle`; on AdK 10 iterations
take 0.07-0.11 s, about as long as a model call, and clear the hydrogens' strain entirely, most
of the side chains' but not the worst overlaps). The guards then judge the model's prediction
rather than the rigid rebuild, against the reference lowered by what settling takes off the
run's start state (``Guards.set_settle_quench``). Above 10 iterations settling runs in stages
(10, 20, 40, ... iterations in all, :func:`~integrations.propagator.settle_stages`) and stops at
the first stage whose end passes the energy check, each stage judged against the quench of the
same stages on the start state: a backbone model's side chains need them (AdK, the MD's own
backbone 4 ps on: all starts over the threshold after 10 iterations, none after 80), its
hydrogens alone do not. A jump's intermediate frames (reported in hybrid mode) get as many
iterations when a reporter is due on them, without an energy check. 0 turns it off; a model of
every atom, or one whose other atoms cannot move (massless), has nothing to settle.

Restrained relaxation (``relax_iterations=n > 0``): after every accepted jump, before the guards
check it and before any reporter sees it, the end state (predicted atoms as predicted, the others
rebuilt by :mod:`integrations.reconstruct`) is minimised for at most ``n`` iterations with
harmonic restraints ``0.5 k |x - x_pred|^2`` (``k = relax_restraint_kJ_per_mol_nm2``) holding the
predicted atoms near their predicted positions, so mainly the rebuilt atoms (hydrogens, side
chains) settle into the force field. It runs in a separate relaxation Context (:class:`Relaxation`)
on a copy of the System with the restraint added and its constraints turned into stiff harmonic
bonds (OpenMM's minimiser is an order of magnitude slower with constraints; the relaxed positions
are constrained again in the main Context); the main Context never holds the restraint, so every
energy a reporter or guard reads is the plain force field. The ``relax`` guard action minimises in
the same Context with the restraint off. Velocities stay the predicted ones. In hybrid mode only
the jump's last frame is relaxed (intermediate output frames are reported as rebuilt).

Hybrid mode (``md_steps=k``): every jump is preceded by ``k`` real integrator steps in the same
Context (reporters run through them as in ``Simulation``), so one ``step()`` advances
``k + steps_per_jump`` steps and ``k dt + jump_ps`` ps. With a history model ``k`` must be a
multiple of the output spacing in MD steps: the segment's states on that grid join the predicted
frames the history is taken from. A fallback (guard) replaces a jump by MD
of the same length; in jump-step mode it counts as one step, like the jump it replaces.

History models (ESTAG) take their input frames from the states the simulation has seen: the
predicted frames inside accepted jumps, the end states kept, and in jump-step mode the states of
fallback MD at the surrogate's output times. Only where these do not cover the history (at the
start, or every jump when the history stride is not a multiple of the output spacing, which is
logged as a warning) does real MD run first to build it (logged; in jump-step mode that MD
advances the time but not the step count, so the stock DCD and XTC reporters, which stamp frame k
with k x interval x ``jump_ps``, lag the State's time by the warm-up's MD time: a warning says so;
:meth:`SurrogateSimulation.prepare_history` runs the warm-up before reporters are attached and
can restart the clock after it).

Restarts (:meth:`SurrogateSimulation.saveCheckpoint`/``saveState``, and so a
``CheckpointReporter``, also write ``<file>.surrogate.npz``): a checkpoint written inside a
hybrid cycle records where in the cycle it is, the MD steps of the segment (or of a history
model's warm-up, or of the MD standing in for a failed jump) already run or, on an intermediate
output frame, the rest of the jump (its later frames and end state); the first
``step()`` after loading it finishes that cycle, so the run keeps the jump schedule and the
trajectory it would have had (tested against an uninterrupted run).

In jump-step mode the step count counts jumps exactly: MD that is not a counted step (fallback
MD, which counts as the one step of the jump it replaces, and history warm-up MD) restores the
step count it started from, so reporters are asked for their next report from the jump's start
step and fire at the same steps with or without fallbacks.

Energy guard: the energies of states real MD produced (the end of a hybrid MD segment, of
fallback MD, of a history warm-up) are recorded with :meth:`Guards.record_md_energy`, with the MD
time since the surrogate's last state, and once that reaches ``GuardConfig.anchor_md_ps`` they may
move the guard's anchor (e.g. up from a minimised start to the thermal level); those of surrogate
states cannot lift it (see :mod:`integrations.guards`). An MD run that starts colder than
``GuardConfig.cold_md_fraction`` of the temperature (a kept jump end with the model's difference
velocities) counts as no MD time: it heats the structure before it samples.

Stochastic jumps (``jump_noise``, ``noise_scale``, ``noise_seed``): each jump's predicted frames
get a draw of a :class:`~surrogate_md.noise.JumpNoise` added (see :mod:`integrations.propagator`)
before the missing atoms are rebuilt, the end state relaxed and the guards judge it; the noise
generator's state goes into ``<file>.surrogate.npz`` with the thermal draws', so a restart takes
the same draws. ``summary()`` records the noise (``JumpNoise.describe()`` and its scale).

Fixed particles (zero mass, not virtual sites: :func:`fixed_particles`) stay where they are in
every frame of a jump with zero velocity, as OpenMM's integrators and minimiser keep them. The
energy guard's default threshold and ``"thermal"`` end velocities use the thermostat's
temperature (:func:`engine_temperature_K`) unless ``temperature_K`` is given.

:class:`SurrogateJumpReporter` is the zero-intrusion variant for an unchanged ``Simulation``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import openmm
from openmm import app, unit

from integrations.guards import GuardConfig, GuardEvent, Guards, guard_error_message
from integrations.propagator import (
    DEFAULT_SETTLE_ITERATIONS,
    JumpResult,
    SurrogatePropagator,
    checked_settle_iterations,
    settle_in_stages,
    settle_stages,
    settling_atoms,
    stage_quenches,
)
from surrogate_md.errors import DataError, EngineError, GuardError
from surrogate_md.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

ANGSTROM = unit.angstrom
PS = unit.picosecond
A_PER_PS = unit.angstrom / unit.picosecond
KJ_PER_MOL = unit.kilojoule_per_mole
NM = unit.nanometer
DEFAULT_RELAX_RESTRAINT_KJ_PER_MOL_NM2 = 1.0e5  # 1000 kJ/mol/Å²: ~0.1 Å per 1000 kJ/mol/nm
RELAX_TOLERANCE_KJ_PER_MOL_NM = 10.0  # as Simulation.minimizeEnergy
_RESTRAINT_K = "surrogate_relax_k"
FLEXIBLE_CONSTRAINT_K_KJ_PER_MOL_NM2 = 2.5e5  # constraints as bonds while minimising (~X-H)
DEFAULT_MAX_STEP_PS = 0.002
BAROSTATS = tuple(getattr(openmm, name) for name in (
    "MonteCarloBarostat", "MonteCarloAnisotropicBarostat", "MonteCarloMembraneBarostat",
    "MonteCarloFlexibleBarostat") if hasattr(openmm, name))
_STEP_TOLERANCE = 1e-6
VARIABLE_STEP_INTEGRATORS = tuple(getattr(openmm, name) for name in (
    "VariableLangevinIntegrator", "VariableVerletIntegrator") if hasattr(openmm, name))


# -- helpers shared by the simulation and the reporter ---------------------------------------------
def load_surrogate(surrogate: Any):
    """A :class:`~surrogate_md.Surrogate`, loading it when given a checkpoint path."""
    if isinstance(surrogate, (str, os.PathLike)):
        from surrogate_md.surrogate import Surrogate

        return Surrogate.load(surrogate)
    return surrogate


def check_system(system: openmm.System, topology: app.Topology | None, surrogate) -> None:
    """Refuse systems the surrogate cannot drive: barostats, another atom set.

    Raises:
        EngineError: the System has a barostat (a learned jump cannot move the box).
        DataError: the particle count or elements differ from the surrogate's training system.
    Custom forces only warn: the surrogate never saw them, but energies stay real.
    """
    for force in system.getForces():
        if isinstance(force, BAROSTATS):
            raise EngineError(f"the System has a {type(force).__name__}: surrogate jumps keep the "
                              "box fixed and cannot sample constant pressure; remove the barostat "
                              "(equilibrate the box with plain MD first) and run at constant volume")
        if type(force).__name__.startswith("Custom"):
            log.warning("the System has a %s: the surrogate was trained without it, so jumps "
                        "ignore its physics (energies reported still include it)",
                        type(force).__name__)
    n = system.getNumParticles()
    if n != surrogate.n_atoms:
        raise DataError(f"the System has {n} particles but the surrogate "
                        f"{surrogate.source or surrogate.name} was trained on {surrogate.n_atoms} "
                        "atoms; use a checkpoint trained on this system (virtual sites and "
                        "solvent count as particles)")
    if topology is not None:
        z = [a.element.atomic_number if a.element is not None else 0 for a in topology.atoms()]
        surrogate.check_atomic_numbers(np.asarray(z), [a.name for a in topology.atoms()])


def default_step_ps(times_ps: np.ndarray, max_step_ps: float = DEFAULT_MAX_STEP_PS) -> float:
    """The largest step <= ``max_step_ps`` that divides every output time of a jump."""
    first = float(times_ps[0])
    n = int(np.ceil(first / max_step_ps - _STEP_TOLERANCE))
    for k in range(n, n * 64 + 1):
        dt = first / k
        steps = np.asarray(times_ps) / dt
        if np.all(np.abs(steps - np.round(steps)) < _STEP_TOLERANCE * np.maximum(steps, 1)):
            return dt
    raise EngineError(f"cannot find an integrator step that divides the surrogate's output times "
                      f"{list(times_ps)} ps; pass an integrator whose step size divides them")


def frame_steps(times_ps: np.ndarray, step_ps: float) -> np.ndarray:
    """Integrator steps of each output time; raises if one is not a whole number of steps."""
    steps = np.asarray(times_ps, dtype=np.float64) / step_ps
    rounded = np.round(steps).astype(np.int64)
    if np.any(np.abs(steps - rounded) > _STEP_TOLERANCE * np.maximum(steps, 1)) or rounded[0] < 1:
        raise EngineError(f"the surrogate's output times {list(np.round(times_ps, 9))} ps are not "
                          f"whole multiples of the integrator step {step_ps} ps; use an "
                          f"integrator step that divides {times_ps[0]} ps "
                          f"(e.g. {default_step_ps(times_ps)} ps)")
    return rounded


def read_state(context: openmm.Context, energy: bool = False
               ) -> tuple[np.ndarray, np.ndarray, float, float | None]:
    """(positions Å, velocities Å/ps, time ps, potential energy kJ/mol or None)."""
    st = context.getState(positions=True, velocities=True, energy=energy)
    pos = st.getPositions(asNumpy=True).value_in_unit(ANGSTROM)
    vel = st.getVelocities(asNumpy=True).value_in_unit(A_PER_PS)
    e = st.getPotentialEnergy().value_in_unit(KJ_PER_MOL) if energy else None
    return np.asarray(pos), np.asarray(vel), st.getTime().value_in_unit(PS), e


def write_state(context: openmm.Context, positions_A: np.ndarray,
                velocities_A_per_ps: np.ndarray | None, constrained: bool,
                tolerance: float = 1e-5) -> None:
    """Set positions (Å) and velocities (Å/ps), then satisfy the System's constraints."""
    context.setPositions(unit.Quantity(np.asarray(positions_A, dtype=np.float64), ANGSTROM))
    if velocities_A_per_ps is not None:
        context.setVelocities(unit.Quantity(np.asarray(velocities_A_per_ps, dtype=np.float64),
                                            A_PER_PS))
    if constrained:  # (also places virtual sites)
        context.applyConstraints(tolerance)
        if velocities_A_per_ps is not None:
            context.applyVelocityConstraints(tolerance)
    else:  # setPositions leaves virtual sites (TIP4P's M) where they were
        context.computeVirtualSites()


def potential_energy(context: openmm.Context) -> float:
    return context.getState(energy=True).getPotentialEnergy().value_in_unit(KJ_PER_MOL)


class _StopWhenAccepted(openmm.MinimizationReporter):
    """Minimiser reporter that stops L-BFGS at the first iteration whose state passes every guard
    with an energy at most ``relax_energy_target_kJ_per_mol`` above the guards' reference energy
    (energy first: the geometric checks run only on states whose energy is already there)."""

    def __init__(self, guards: Guards, jump: int, time_ps: float, margin_kJ_per_mol: float = 0.0
                 ) -> None:
        super().__init__()
        self.guards, self.jump, self.time_ps = guards, jump, time_ps
        self.margin = margin_kJ_per_mol  # stop this far below the target
        self.iterations = 0
        self.accepted = False
        self.energy = float("nan")

    def report(self, iteration, x, grad, args) -> bool:
        self.iterations += 1
        energy = self.energy = float(args["system energy"]) + self.margin
        if not self.guards.energy_at_relax_target(energy):
            return False  # cheap test first: no positions copied while the energy is too high
        pos = np.asarray(x, dtype=np.float64).reshape(-1, 3) * 10.0  # nm -> Å
        self.accepted = self.guards.relaxed_enough(pos, energy, jump=self.jump,
                                                   time_ps=self.time_ps)
        return self.accepted


def uses_pbc(system: openmm.System, topology: app.Topology | None = None) -> bool:
    """``system.usesPeriodicBoundaryConditions()``, or (where a force does not implement it)
    whether ``topology`` has a unit cell."""
    try:
        return bool(system.usesPeriodicBoundaryConditions())
    except Exception:  # OpenMM raises a bare Exception where it is not implemented
        return topology is not None and topology.getUnitCellDimensions() is not None


def flexible_system(system: openmm.System,
                    k_kJ_per_mol_nm2: float = FLEXIBLE_CONSTRAINT_K_KJ_PER_MOL_NM2
                    ) -> openmm.System:
    """A copy of ``system`` whose distance constraints are stiff harmonic bonds.

    ``LocalEnergyMinimizer`` enforces constraints by a sequence of restrained minimisations; on a
    3341-atom protein with HBonds constraints one short relaxation costs 3-5 s that way and
    0.2-0.3 s on this copy (examples/benchmarks/bench_surrogate_vs_md.py). Relaxed positions go
    back into the real Context with ``applyConstraints``, so the engine never sees the bonds.
    """
    copy = openmm.XmlSerializer.clone(system)
    n = copy.getNumConstraints()
    if n == 0:
        return copy
    bonds = openmm.HarmonicBondForce()
    for i in range(n):
        a, b, distance = copy.getConstraintParameters(i)
        bonds.addBond(a, b, distance, k_kJ_per_mol_nm2)
    for i in reversed(range(n)):
        copy.removeConstraint(i)
    bonds.setUsesPeriodicBoundaryConditions(uses_pbc(system))
    copy.addForce(bonds)
    return copy


#: implicit-solvent forces: the bulk of a force evaluation (OBC: 46 of 50 ms on 3341-atom AdK)
IMPLICIT_SOLVENT_FORCES = ("GBSAOBCForce", "GBVIForce", "CustomGBForce",
                           "AmoebaGeneralizedKirkwoodForce", "AmoebaWcaDispersionForce")


#: nm: the longest nonbonded cutoff of the solvent-free copies (relaxation and settling) of a
#: System with implicit solvent and a cutoff. They only bring a state near a minimum the full force
#: field judges, and a shorter cutoff makes each iteration cheaper (AdK, 2 cores: 3.2 against 4.7
#: ms per evaluation at 1.2 nm); 64 ps AdK stochastic runs: 652-675x with 0.8 nm, 445-578x with
#: the System's 1.2 nm, three and four runs of 40 jumps, the relaxations as long (108-118 against
#: 92-123 iterations); at 0.6 nm they needed more (149) and the run was no faster
SOLVENT_FREE_CUTOFF_NM = 0.8


def shorten_cutoff(system: openmm.System, cutoff_nm: float | None) -> None:
    """Bring the cutoff of ``system``'s cutoff (non-Ewald) ``NonbondedForce`` down to
    ``cutoff_nm`` where it is longer (None: unchanged); a switching distance beyond the new
    cutoff is switched off. In place."""
    if cutoff_nm is None:
        return
    for force in system.getForces():
        if not isinstance(force, openmm.NonbondedForce) or force.getNonbondedMethod() not in (
                openmm.NonbondedForce.CutoffNonPeriodic, openmm.NonbondedForce.CutoffPeriodic):
            continue
        if force.getCutoffDistance().value_in_unit(unit.nanometer) > cutoff_nm:
            force.setCutoffDistance(cutoff_nm * unit.nanometer)
            if (force.getUseSwitchingFunction() and force.getSwitchingDistance()
                    .value_in_unit(unit.nanometer) >= cutoff_nm):
                force.setUseSwitchingFunction(False)


def drop_implicit_solvent(system: openmm.System, cutoff_nm: float | None) -> bool:
    """Remove ``system``'s implicit-solvent forces (:data:`IMPLICIT_SOLVENT_FORCES`) and, where
    there were any, bring its cutoff down to ``cutoff_nm`` (:func:`shorten_cutoff`). In place;
    returns whether it had implicit solvent."""
    solvent = [i for i in range(system.getNumForces())
               if type(system.getForce(i)).__name__ in IMPLICIT_SOLVENT_FORCES]
    for i in reversed(solvent):
        system.removeForce(i)
    if solvent:
        shorten_cutoff(system, cutoff_nm)
    return bool(solvent)


#: the solvent-free stage sheds the excess energy plus this fraction of the energy threshold (the
#: solvation energy of the relaxed state differs; a full-force-field iteration costs as much as
#: several solvent-free ones)
SOLVENT_FREE_MARGIN = 0.3

#: iterations of the first solvent-free stage, at most (the drop it aims at is a guess: a
#: strained stochastic AdK jump could spend a whole 200-iteration budget there and end ~1 MJ/mol
#: below the target)
SOLVENT_FREE_FIRST = 50
#: iterations of one solvent-free round after the first solvent-free stage, each followed by one
#: evaluation of the full force field (a full-force-field iteration costs as much as ~9
#: solvent-free ones on implicit-solvent AdK at its 1.2 nm cutoff: 44 against 4.6 ms on 2 cores;
#: ~13 at SOLVENT_FREE_CUTOFF_NM)
SOLVENT_FREE_ROUND = 40
#: a solvent-free round that sheds less than this share of the full force field's remaining
#: excess over the target hands over to the full force field (the solvent-free minimum is not
#: the full one's: rounds near it shed less and less)
SOLVENT_FREE_ROUND_MIN_SHARE = 0.25


class StopBelowEnergy(openmm.MinimizationReporter):
    """Stops L-BFGS at the first iteration with the minimised energy at most ``target``.

    ``keep_path``: keep every iterate as ``path``, a list of (energy kJ/mol, positions (n, 3) Å).
    """

    def __init__(self, target_kJ_per_mol: float, keep_path: bool = False) -> None:
        super().__init__()
        self.target = target_kJ_per_mol
        self.iterations = 0
        self.energy = float("nan")  # the minimised energy at the last iteration
        self.path: list[tuple[float, np.ndarray]] | None = [] if keep_path else None

    def report(self, iteration, x, grad, args) -> bool:
        self.iterations += 1
        self.energy = float(args["system energy"])
        if self.path is not None:  # x: flat positions, nm
            self.path.append((self.energy, 10.0 * np.array(x, dtype=np.float64).reshape(-1, 3)))
        return self.energy <= self.target


#: recent solvent-free relaxations whose full-to-solvent-free energy drop ratio sets the next
#: solvent-free target
DROP_RATIO_WINDOW = 10


class Relaxation:
    """Minimisation Contexts beside the engine's: :func:`flexible_system` of the engine's System
    with harmonic position restraints ``0.5 k |x - x0|^2`` on ``restrained_atoms`` (``k`` set per
    call; 0 = the plain force field), and, for a System with implicit solvent, the same without
    its solvent forces (:data:`IMPLICIT_SOLVENT_FORCES`; ``solvent_free`` below), a force field
    several times cheaper to evaluate for the first, coarse stage of a relaxation. Positions in
    Å; the restraint's ``x0`` in nm.

    Args:
        system: the engine's System (copied, not changed).
        platform, properties: the engine Context's platform and its properties (None = defaults).
        restrained_atoms: (m,) atom indices the restraint can hold (may be empty).
        solvent_free_cutoff_nm: the longest nonbonded cutoff of the solvent-free copies
            (:func:`shorten_cutoff`; None: the System's), where the System has implicit solvent.
    """

    def __init__(self, system: openmm.System, platform: openmm.Platform,
                 properties: dict | None = None, restrained_atoms: np.ndarray = (),
                 solvent_free_cutoff_nm: float | None = SOLVENT_FREE_CUTOFF_NM) -> None:
        flexible = flexible_system(system)
        if uses_pbc(system):
            expr = f"0.5*{_RESTRAINT_K}*periodicdistance(x, y, z, x0, y0, z0)^2"
        else:
            expr = f"0.5*{_RESTRAINT_K}*((x - x0)^2 + (y - y0)^2 + (z - z0)^2)"
        self.atoms = np.asarray(restrained_atoms, dtype=np.int64).reshape(-1)
        self.restraint = openmm.CustomExternalForce(expr)
        self.restraint.addGlobalParameter(_RESTRAINT_K, 0.0)
        for name in ("x0", "y0", "z0"):
            self.restraint.addPerParticleParameter(name)
        for atom in self.atoms:
            self.restraint.addParticle(int(atom), [0.0, 0.0, 0.0])
        dry = openmm.XmlSerializer.clone(flexible)
        if not drop_implicit_solvent(dry, solvent_free_cutoff_nm):
            dry = None
        self._free_cutoff_nm = solvent_free_cutoff_nm
        flexible.addForce(self.restraint)

        self._platform, self._properties = platform, properties
        self.context = self._new_context(flexible)
        #: the flexible System without implicit solvent (None: the System has none)
        self.solvent_free = None if dry is None else self._new_context(dry)
        self._system = system  # the engine's, for the settling Context
        self._settling: openmm.Context | None = None  # built by the first settle()
        self._drop_ratios: collections.deque[float] = collections.deque(maxlen=DROP_RATIO_WINDOW)

    def _new_context(self, system: openmm.System) -> openmm.Context:
        integrator = openmm.VerletIntegrator(0.001 * PS)  # never stepped
        if self._properties is None:
            return openmm.Context(system, integrator, self._platform)
        return openmm.Context(system, integrator, self._platform, self._properties)

    def settle(self, positions_A: np.ndarray, box, iterations: int) -> np.ndarray:
        """L-BFGS on every atom but ``restrained_atoms``, which stay exactly where they are, for
        at most ``iterations`` iterations, in the flexible System without implicit solvent (its
        bulk and the least of the clashes; at the solvent-free cutoff; the Context is built on
        first use, the restrained atoms massless in it: OpenMM's minimiser does not move massless
        particles). Returns
        (n_atoms, 3) Å, not yet constrained; the positions given where the minimiser ends in
        non-finite ones."""
        if self._settling is None:
            system = flexible_system(self._system)
            drop_implicit_solvent(system, self._free_cutoff_nm)
            for atom in self.atoms:
                system.setParticleMass(int(atom), 0.0)
            self._settling = self._new_context(system)
        ctx = self._settling
        if box is not None:
            ctx.setPeriodicBoxVectors(*box)
        ctx.setPositions(unit.Quantity(np.asarray(positions_A, dtype=np.float64), ANGSTROM))
        try:
            openmm.LocalEnergyMinimizer.minimize(ctx, RELAX_TOLERANCE_KJ_PER_MOL_NM, iterations)
        except openmm.OpenMMException as exc:  # coordinates went NaN inside the minimiser
            log.debug("settling failed: %s", exc)
            return np.array(positions_A, dtype=np.float64)
        out = np.asarray(ctx.getState(positions=True).getPositions(asNumpy=True)
                         .value_in_unit(ANGSTROM))
        if not np.isfinite(out).all():  # e.g. predicted atoms on top of each other: the guards
            return np.array(positions_A, dtype=np.float64)  # judge the unsettled state
        out[self.atoms] = np.asarray(positions_A, dtype=np.float64)[self.atoms]  # bit for bit
        return out

    def settle_quench(self, positions_A: np.ndarray, box, iterations: int) -> float:
        """kJ/mol by which :meth:`settle` lowers the energy of ``positions_A`` (the full force
        field, constraints as the flexible copy's stiff bonds): what the guards take off the
        reference for settled states (``Guards.set_settle_quench``)."""
        settled = self.settle(positions_A, box, iterations)
        return self.energy(positions_A, box) - self.energy(settled, box)

    def energy(self, positions_A: np.ndarray, box=None) -> float:
        """kJ/mol of ``positions_A`` in the flexible copy of the System, without restraint."""
        if box is not None:
            self.context.setPeriodicBoxVectors(*box)
        self.context.setParameter(_RESTRAINT_K, 0.0)
        self.context.setPositions(unit.Quantity(np.asarray(positions_A, dtype=np.float64),
                                                ANGSTROM))
        return potential_energy(self.context)

    @property
    def drop_ratio(self) -> float:
        """How many kJ/mol of the full force field a solvent-free relaxation has shed per kJ/mol
        of its own: the median over the recent relaxations (1 before any), within [0.5, 4]."""
        if not self._drop_ratios:
            return 1.0
        return float(np.clip(np.median(self._drop_ratios), 0.5, 4.0))

    def record_drop(self, full_kJ_per_mol: float, solvent_free_kJ_per_mol: float) -> None:
        """Energy shed by one solvent-free relaxation: in the full force field (after the
        constraints) and in the solvent-free one; sets :attr:`drop_ratio`."""
        if (np.isfinite(full_kJ_per_mol) and np.isfinite(solvent_free_kJ_per_mol)
                and solvent_free_kJ_per_mol > 0 and full_kJ_per_mol > 0):
            self._drop_ratios.append(full_kJ_per_mol / solvent_free_kJ_per_mol)

    def minimise(self, positions_A: np.ndarray, box, iterations: int,
                 restraint_kJ_per_mol_nm2: float = 0.0,
                 reporter: openmm.MinimizationReporter | None = None, *,
                 solvent_free: bool = False) -> np.ndarray:
        """L-BFGS from ``positions_A`` (n_atoms, 3) Å for at most ``iterations`` iterations (or
        until ``reporter`` stops it); ``restraint_kJ_per_mol_nm2 > 0`` holds the restrained atoms
        near their positions in ``positions_A`` (not in the ``solvent_free`` Context, which has
        no restraint). Returns (n_atoms, 3) Å, not yet constrained."""
        ctx = self.solvent_free if solvent_free else self.context
        if ctx is None:
            raise EngineError("this System has no implicit solvent to leave out")
        if box is not None:
            ctx.setPeriodicBoxVectors(*box)
        pos = np.asarray(positions_A, dtype=np.float64)
        if not solvent_free:
            ctx.setParameter(_RESTRAINT_K, float(restraint_kJ_per_mol_nm2))
            if len(self.atoms) and restraint_kJ_per_mol_nm2 > 0:
                anchors = pos[self.atoms] * 0.1  # Å -> nm
                for i, atom in enumerate(self.atoms):
                    self.restraint.setParticleParameters(i, int(atom), anchors[i].tolist())
                self.restraint.updateParametersInContext(ctx)
        ctx.setPositions(unit.Quantity(pos, ANGSTROM))
        try:
            if reporter is None:
                openmm.LocalEnergyMinimizer.minimize(ctx, RELAX_TOLERANCE_KJ_PER_MOL_NM,
                                                     iterations)
            else:
                openmm.LocalEnergyMinimizer.minimize(ctx, RELAX_TOLERANCE_KJ_PER_MOL_NM,
                                                     iterations, reporter)
        except openmm.OpenMMException as exc:  # coordinates went NaN inside the minimiser
            log.debug("minimisation failed: %s", exc)
            return np.full_like(pos, np.nan)
        return np.asarray(ctx.getState(positions=True).getPositions(asNumpy=True)
                          .value_in_unit(ANGSTROM))

    def solvent_free_energy(self, positions_A: np.ndarray, box=None) -> float:
        """kJ/mol of ``positions_A`` in the solvent-free Context."""
        if box is not None:
            self.solvent_free.setPeriodicBoxVectors(*box)
        self.solvent_free.setPositions(unit.Quantity(np.asarray(positions_A, dtype=np.float64),
                                                     ANGSTROM))
        return potential_energy(self.solvent_free)


def system_masses_amu(system: openmm.System) -> np.ndarray:
    """(n,) particle masses of ``system``, amu (0 for fixed particles and virtual sites)."""
    return np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                     for i in range(system.getNumParticles())])


def can_settle(masses_amu: np.ndarray, model_atoms: np.ndarray) -> bool:
    """Whether settling has atoms to move: rebuilt ones (not in ``model_atoms``) with mass."""
    masses = np.asarray(masses_amu)
    return len(settling_atoms(len(masses), model_atoms, np.nonzero(masses == 0)[0])) > 0


def settle_jump_end(relaxation: Relaxation, guards: Guards, start_A: np.ndarray,
                    end_A: np.ndarray, box, iterations: int,
                    energy_of: Callable[[np.ndarray], float]) -> tuple[np.ndarray, int]:
    """A jump's end (n_atoms, 3) Å with its rebuilt atoms settled (:meth:`Relaxation.settle`)
    in the stages of :func:`~integrations.propagator.settle_stages` up to ``iterations``,
    stopping at the first whose state passes the energy check (``energy_of``: kJ/mol of a
    state as the engine holds it, constraints applied), and that stage (cumulative
    iterations, for :meth:`Guards.judging_settled`). The guards' settling quenches are
    measured on the jump's start state first where they need them
    (:meth:`Guards.needs_settle_quench`), stage after stage."""
    stages = settle_stages(iterations)

    def settle(x: np.ndarray, n: int) -> np.ndarray:
        return relaxation.settle(x, box, n)

    if guards.needs_settle_quench(stages):
        guards.set_settle_quenches(stage_quenches(settle, lambda x: relaxation.energy(x, box),
                                                  start_A, stages))
    state, stage = settle_in_stages(settle, end_A, stages,
                                    lambda x, k: guards.settled_passes(energy_of(x), k))
    guards.record_settle(stage)
    return state, stage


def kinetic_energy_kJ_per_mol(velocities_A_per_ps: np.ndarray, masses_amu: np.ndarray) -> float:
    """Kinetic energy (kJ/mol) of velocities (n, 3) Å/ps with masses (n,) amu."""
    v = unit.Quantity(np.asarray(velocities_A_per_ps, dtype=np.float64), A_PER_PS)
    v2 = (v.value_in_unit(unit.nanometer / unit.picosecond) ** 2).sum(axis=1)
    ke = unit.Quantity(0.5 * float(np.dot(np.asarray(masses_amu, dtype=np.float64), v2)),
                       unit.dalton * (unit.nanometer / unit.picosecond) ** 2)
    return ke.value_in_unit(KJ_PER_MOL)


def has_com_remover(system: openmm.System) -> bool:
    """Whether ``system`` holds a ``CMMotionRemover`` (its MD keeps zero net momentum)."""
    return any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())


def project_velocities_once(context: openmm.Context, velocities_A_per_ps: np.ndarray) -> None:
    """Set a jump's end velocities (n_atoms, 3) Å/ps on the relaxed state in ``context`` and
    project them onto its constraints: once, from the jump's own values (projecting the ones
    already fitted to the unrelaxed geometry a second time took 4-5 % of the kinetic energy of
    every relaxed jump)."""
    context.setVelocities(unit.Quantity(np.asarray(velocities_A_per_ps, dtype=np.float64),
                                        A_PER_PS))
    context.applyVelocityConstraints(1e-5)


def relax_until_accepted(relaxation: Relaxation, context: openmm.Context, guards: Guards,
                         jump: int, time_ps: float, energy_kJ_per_mol: float | None = None, *,
                         first_iterations: int | None = None,
                         round_iterations: int | None = None,
                         redraw_left: bool = False
                         ) -> tuple[np.ndarray, float, list[GuardEvent]]:
    """The ``relax`` guard action on the state in ``context`` (its potential energy
    ``energy_kJ_per_mol`` where already known): minimise it in ``relaxation`` (no restraints)
    for at most ``guards.config.relax_iterations`` iterations in all, stopping at the first state
    that passes every guard with its energy back at the relaxation target once written back into
    ``context`` with its constraints satisfied.

    Three stages. With implicit solvent, first the solvent-free copy (several times cheaper per
    iteration; at most ``first_iterations``, default :data:`SOLVENT_FREE_FIRST`, 0: no such
    stage) until its energy has fallen by the state's excess over the target plus
    :data:`SOLVENT_FREE_MARGIN` times the energy threshold (the strain of a jump is in bonds,
    angles and contacts), divided by ``relaxation.drop_ratio`` (how far the full force field
    fell per kJ/mol of the solvent-free one in recent relaxations), walked back to its earliest
    iterate still accepted when it ended below the target (:func:`back_off`); then, while the
    state is not accepted, rounds of ``round_iterations`` solvent-free iterations (default
    :data:`SOLVENT_FREE_ROUND`, 0: none), each judged once in the full force field (and walked
    back the same way), for as long as each sheds at least
    :data:`SOLVENT_FREE_ROUND_MIN_SHARE` of the remaining excess; then the full flexible copy
    with the guards' own stopping test, going on from the constrained state where
    re-constraining lifts the energy over the target again. ``redraw_left``: the engine will
    draw a stochastic jump again if this relaxation fails, so where the solvent-free stages ran
    and did not bring the state to the target there is no full-force-field stage: an iteration
    there costs ~10 solvent-free ones, and the draws that get that far mostly run out of budget
    (AdK, 64 ps: 3 of 5 in one run, 18-42 s each, against ~2 s for a fresh draw relaxed).
    Returns the relaxed positions (n_atoms, 3) Å and the failed checks of the relaxed state as
    ``context`` holds it (empty: accepted). A minimiser that ends in non-finite coordinates, or
    where the constraints cannot be met (a state strained far beyond what L-BFGS can take, e.g.
    a stochastic jump that tore bonds), ends the relaxation: the last finite state goes back
    into ``context`` and the checks name the ``non_finite`` failure, so the engine falls back
    to MD instead of failing."""
    state = context.getState(positions=True, energy=energy_kJ_per_mol is None)
    positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(ANGSTROM))
    energy = (state.getPotentialEnergy().value_in_unit(KJ_PER_MOL)
              if energy_kJ_per_mol is None else float(energy_kJ_per_mol))
    box = state.getPeriodicBoxVectors()
    constrained = context.getSystem().getNumConstraints() > 0
    budget, used, accepted = guards.config.relax_iterations, 0, False
    first_iterations = SOLVENT_FREE_FIRST if first_iterations is None else first_iterations
    round_iterations = SOLVENT_FREE_ROUND if round_iterations is None else round_iterations
    excess = guards.energy_rise(energy) - guards.relax_target_kJ_per_mol
    if (relaxation.solvent_free is not None and first_iterations > 0 and np.isfinite(excess)
            and excess > 0):
        # the full force field sheds more (or less) than the solvent-free one as a jump's strain
        # goes: aim the solvent-free stage at the full-force-field drop, scaled by the recent
        # ratio, so that relaxed states land near the target instead of far below it
        shed = excess + SOLVENT_FREE_MARGIN * guards.energy_jump_kJ_per_mol
        done, n = _solvent_free_pass(relaxation, context, guards, positions, energy, box,
                                     min(budget, first_iterations), shed / relaxation.drop_ratio,
                                     constrained, jump, time_ps, record_drop=True)
        used += n
        if done is None:
            return _relaxation_blew_up(context, guards, positions, energy, constrained, used,
                                       jump, time_ps)
        positions, energy, accepted = done
    while (relaxation.solvent_free is not None and round_iterations > 0 and not accepted
           and used < budget):
        # rounds of the cheap force field, each judged in the full one, while they lower it
        start_energy = energy
        done, n = _solvent_free_pass(relaxation, context, guards, positions, energy, box,
                                     min(round_iterations, budget - used), float("inf"),
                                     constrained, jump, time_ps)
        used += n
        if done is None:
            return _relaxation_blew_up(context, guards, positions, energy, constrained, used,
                                       jump, time_ps)
        positions, energy, accepted = done
        excess = guards.energy_rise(start_energy) - guards.relax_target_kJ_per_mol
        if accepted or (n < round_iterations
                        or not start_energy - energy >= SOLVENT_FREE_ROUND_MIN_SHARE
                        * max(excess, 0.0) or not energy < start_energy):
            break  # accepted; or at the solvent-free minimum, or it hardly lowers the full one
    if redraw_left and relaxation.solvent_free is not None and used:
        budget = used  # drawn again instead (see above)
    margin = 0.0
    while not accepted and used < budget:  # maxIterations 0 would mean "unlimited" to OpenMM
        reporter = _StopWhenAccepted(guards, jump, time_ps, margin)
        relaxed = relaxation.minimise(positions, box, budget - used, 0.0, reporter)
        used += reporter.iterations
        held = _write_finite(context, relaxed, constrained)
        if held is None:
            return _relaxation_blew_up(context, guards, positions, energy, constrained, used,
                                       jump, time_ps)
        positions, energy = held
        if not (constrained and reporter.accepted and reporter.iterations):
            break
        accepted = guards.relaxed_enough(positions, energy, jump=jump, time_ps=time_ps)
        # re-constraining lifted the energy: next time stop that much lower (no ping-pong)
        margin += max(energy - (reporter.energy - margin), 0.0)
    if constrained:
        context.applyVelocityConstraints(1e-5)
    events = guards.check(positions, energy_kJ_per_mol=energy, jump=jump, time_ps=time_ps,
                          count=False)
    guards.record_relaxation(used, None if events else energy)
    return positions, energy, events


def _solvent_free_pass(relaxation: Relaxation, context: openmm.Context, guards: Guards,
                       positions: np.ndarray, energy: float, box, iterations: int,
                       shed_kJ_per_mol: float, constrained: bool, jump: int, time_ps: float, *,
                       record_drop: bool = False
                       ) -> tuple[tuple[np.ndarray, float, bool] | None, int]:
    """One solvent-free stage of :func:`relax_until_accepted` from ``positions`` (Å; ``energy``
    kJ/mol in the engine): at most ``iterations`` L-BFGS iterations, stopping once its own
    energy has fallen by ``shed_kJ_per_mol`` (inf: never), the result written into ``context``
    with its constraints and judged by the guards, and where accepted walked back along its
    iterates (:func:`back_off`); ``record_drop``: the drops go to ``relaxation.record_drop``.
    Returns ((positions, energy, accepted) now in ``context``, or None where the minimiser
    ended in non-finite coordinates, and the iterations used."""
    free_start = relaxation.solvent_free_energy(positions, box)
    reporter = StopBelowEnergy(free_start - shed_kJ_per_mol, keep_path=True)
    trial = relaxation.minimise(positions, box, iterations, reporter=reporter, solvent_free=True)
    held = _write_finite(context, trial, constrained)
    if held is None:
        return None, reporter.iterations
    new_positions, new_energy = held
    if record_drop:
        relaxation.record_drop(energy - new_energy, free_start - reporter.energy)
    accepted = guards.relaxed_enough(new_positions, new_energy, jump=jump, time_ps=time_ps)
    if accepted:
        new_positions, new_energy = back_off(context, guards, reporter.path, free_start, energy,
                                             new_positions, new_energy, constrained, jump=jump,
                                             time_ps=time_ps)
    return (new_positions, new_energy, accepted), reporter.iterations


def _write_finite(context: openmm.Context, positions_A: np.ndarray, constrained: bool
                  ) -> tuple[np.ndarray, float] | None:
    """Write a minimiser's result into ``context`` (its constraints applied) and read back the
    positions (Å) and energy (kJ/mol); None where either is not finite (the minimiser ended in
    NaN, or the constraints could not be met from where it ended)."""
    if not np.isfinite(positions_A).all():
        return None
    write_state(context, positions_A, None, constrained)
    try:
        positions, _, _, energy = read_state(context, energy=True)
    except openmm.OpenMMException:  # NaN coordinates after applying the constraints
        return None
    if not (np.isfinite(positions).all() and np.isfinite(energy)):
        return None
    return positions, energy


def _relaxation_blew_up(context: openmm.Context, guards: Guards, positions: np.ndarray,
                        energy: float, constrained: bool, used: int, jump: int, time_ps: float
                        ) -> tuple[np.ndarray, float, list[GuardEvent]]:
    """:func:`relax_until_accepted` when a minimiser ended in non-finite coordinates: the last
    finite state (``positions`` Å, ``energy`` kJ/mol) back in ``context``, the relaxation
    counted as failed, and its failed checks with a ``non_finite`` one first."""
    log.debug("relaxation of jump %d ended in non-finite coordinates after %d iterations",
              jump, used)
    write_state(context, positions, None, constrained)
    events = [GuardEvent("non_finite", float("nan"), 0.0, jump, time_ps)]
    events += guards.check(positions, energy_kJ_per_mol=energy, jump=jump, time_ps=time_ps,
                           count=False)
    guards.record_relaxation(used, None)
    return positions, energy, events


#: iterates of the solvent-free stage tried by :func:`back_off`, at most
BACK_OFF_TRIES = 2


def back_off(context: openmm.Context, guards: Guards, path: list[tuple[float, np.ndarray]],
             free_start: float, start_energy: float, positions: np.ndarray, energy: float,
             constrained: bool, *, jump: int, time_ps: float) -> tuple[np.ndarray, float]:
    """An accepted solvent-free stage that ended below the relaxation target: the earliest of its
    iterates (``path``: solvent-free energy, positions Å) still accepted, so that a relaxed state
    keeps the energy the guards allow instead of sinking below the MD's range.

    The stage's own drops (``start_energy`` to ``energy`` in the full force field, ``free_start``
    to the last iterate's solvent-free energy) give this jump's ratio of full to solvent-free
    drop; the iterate it predicts at the target is tried first in ``context``, then the next one
    (at most :data:`BACK_OFF_TRIES` evaluations of the full force field, no minimiser
    iterations). Returns the positions (Å) and energy (kJ/mol) now in ``context``: an accepted
    earlier iterate's, else the end state's, written back."""
    if len(path) < 2 or not np.isfinite(energy):
        return positions, energy
    free = np.array([e for e, _ in path])
    free_drop = free_start - free
    if not free_drop[-1] > 0:
        return positions, energy
    ratio = (start_energy - energy) / free_drop[-1]
    target = guards.energy_reference_kJ_per_mol + guards.relax_target_kJ_per_mol
    predicted = start_energy - ratio * free_drop  # full-force-field energy along the path
    if not (predicted <= target).any():
        return positions, energy
    first = int(np.argmax(predicted <= target))  # earliest predicted at the target
    for k in range(first, min(first + BACK_OFF_TRIES, len(path) - 1)):
        write_state(context, path[k][1], None, constrained)
        trial, _, _, trial_energy = read_state(context, energy=True)
        if guards.relaxed_enough(trial, trial_energy, jump=jump, time_ps=time_ps):
            return trial, trial_energy
    write_state(context, positions, None, False)  # the end state, constrained already
    return positions, energy


def make_guards(guards: Guards | GuardConfig | str | None, surrogate, system: openmm.System,
                temperature_K: float) -> Guards:
    if isinstance(guards, Guards):
        return guards
    config = guards if isinstance(guards, GuardConfig) else GuardConfig(action=guards or "raise")
    return Guards(surrogate, config, n_dof=degrees_of_freedom(system), temperature_K=temperature_K)


def _deserialize(path: str | os.PathLike, what: str):
    """An OpenMM object from its serialized XML file (as ``Simulation`` accepts)."""
    kind = openmm.System if what == "system" else openmm.Integrator
    try:
        with open(path) as f:
            obj = openmm.XmlSerializer.deserialize(f.read())
    except OSError as exc:
        raise EngineError(f"{path}: cannot read the {what} XML file ({exc})") from exc
    except Exception as exc:  # OpenMM raises a bare Exception for malformed XML
        raise EngineError(f"{path}: not a serialized OpenMM {what} ({exc})") from exc
    if not isinstance(obj, kind):
        raise EngineError(f"{path}: not a serialized OpenMM {what} (it holds a "
                          f"{type(obj).__name__}); give the {what}'s XML file")
    return obj


DEFAULT_TEMPERATURE_K = 300.0


def thermostat_temperature_K(integrator: openmm.Integrator, system: openmm.System
                             ) -> float | None:
    """K the MD is held at: the integrator's (Langevin, Brownian, Nosé-Hoover, ...), else an
    ``AndersenThermostat``'s in the System; None for constant-energy MD (``VerletIntegrator``)
    or an integrator that does not say (``CustomIntegrator``)."""
    get = getattr(integrator, "getTemperature", None)
    if get is not None:
        try:
            value = get()
        except Exception:  # a NoseHooverIntegrator without a chain: OpenMMException
            value = None
        if value is not None:
            return float(value.value_in_unit(unit.kelvin) if unit.is_quantity(value) else value)
    for force in system.getForces():
        if isinstance(force, openmm.AndersenThermostat):
            return float(force.getDefaultTemperature().value_in_unit(unit.kelvin))
    return None


def engine_temperature_K(temperature_K: float | None, integrator: openmm.Integrator,
                         system: openmm.System, owner: str) -> float:
    """The temperature (K) of the energy guard's threshold and of thermal velocity draws:
    ``temperature_K`` where given (a warning where the thermostat holds another), else the
    thermostat's (:func:`thermostat_temperature_K`), else :data:`DEFAULT_TEMPERATURE_K`."""
    held = thermostat_temperature_K(integrator, system)
    if temperature_K is None:
        if held is None:
            log.info("%s: the MD has no thermostat temperature; guards and thermal velocities "
                     "use %g K (pass temperature_K to choose)", owner, DEFAULT_TEMPERATURE_K)
            return DEFAULT_TEMPERATURE_K
        return held
    if not (np.isfinite(temperature_K) and temperature_K > 0):
        raise EngineError(f"{owner}: temperature_K must be a finite temperature > 0 K, got "
                          f"{temperature_K}")
    if held is not None and abs(held - temperature_K) > 1e-6 * held:
        log.warning("%s: temperature_K=%g K, but the thermostat holds the MD at %g K; the energy "
                    "guard and thermal velocities use %g K (leave temperature_K out to follow "
                    "the thermostat)", owner, temperature_K, held, temperature_K)
    return float(temperature_K)


def fixed_particles(system: openmm.System) -> np.ndarray:
    """(k,) indices of the System's fixed particles: zero mass and not a virtual site (OpenMM's
    integrators and minimiser never move them). Jumps hold them too."""
    return np.array([i for i in range(system.getNumParticles())
                     if system.getParticleMass(i).value_in_unit(unit.dalton) == 0
                     and not system.isVirtualSite(i)], dtype=np.int64)


def degrees_of_freedom(system: openmm.System) -> int:
    """OpenMM's own count (as ``StateDataReporter``): 3 per particle with mass (virtual sites
    and fixed particles have none), minus constraints between such particles, minus 3 with a
    CMMotionRemover."""
    massive = system_masses_amu(system) > 0
    n_dof = 3 * int(massive.sum())
    for i in range(system.getNumConstraints()):
        a, b, _ = system.getConstraintParameters(i)
        if massive[a] and massive[b]:
            n_dof -= 1
    n_dof -= 3 if has_com_remover(system) else 0
    return n_dof


def _report_dict(report) -> dict:
    """``describeNextReport`` result as the dict form (the legacy tuple form converted)."""
    if isinstance(report, tuple):
        out = {"steps": report[0]}
        if len(report) > 5:
            out["periodic"] = report[5]
        names = ["positions", "velocities", "forces", "energy"]
        out["include"] = [names[i] for i in range(4) if report[i + 1]]
        return out
    return report


@dataclasses.dataclass(frozen=True)
class _EmittedJump:
    """The output frames of a jump as :meth:`SurrogateSimulation._emit_frames` reports them.

    positions_A, velocities_A_per_ps: (m, n_atoms, 3) Å, Å/ps, the end state last (relaxed,
    if it was); offsets_ps: (m,) after ``t0_ps``; frame_steps: (m,) steps after ``s0``; kind:
    ``"jump"`` (counted as a jump once reported) or ``"fallback"`` (MD that replaced one);
    frame: the frame whose reports are running (-1: none yet); settle_iterations: the settling
    an intermediate frame gets when a reporter is due there (the iterations the jump's end
    took; 0: none), its rebuilt atoms otherwise as rigid as the rebuild left them."""

    positions_A: np.ndarray
    velocities_A_per_ps: np.ndarray
    offsets_ps: np.ndarray
    frame_steps: np.ndarray
    t0_ps: float
    s0: int
    kind: str
    frame: int = -1
    settle_iterations: int = 0


class SurrogateSimulation:
    """A ``Simulation`` whose ``step`` takes learned jumps.

    Args:
        topology: ``openmm.app.Topology`` of the system (atoms must match the surrogate).
        system: the ``openmm.System`` (no barostat).
        surrogate: a :class:`~surrogate_md.Surrogate` or a checkpoint path.
        integrator: used for hybrid/fallback MD and for step bookkeeping; default
            ``LangevinMiddleIntegrator(temperature_K, 1/ps, dt)`` with ``dt`` the largest step
            <= 2 fs dividing the surrogate's output times.
        platform, platformProperties, state: as in ``openmm.app.Simulation``.
        guards: action name (``raise``/``warn``/``fallback``/``relax``), a :class:`GuardConfig`
            or a :class:`Guards` object.
        md_steps: hybrid mode: real MD steps before every jump (0 = jumps only).
        temperature_K: temperature (K) of the default integrator, of the energy-guard threshold
            and of ``"thermal"`` end velocities; None (the default): the given integrator's
            thermostat temperature (:func:`thermostat_temperature_K`), or 300 K.
        progress: show a progress bar in ``step``.
        settle_iterations: after every jump, at most this many minimiser iterations that move
            only the atoms the model does not predict (0 = off; above 10 in stages that stop
            once the jump end passes the energy check); see the module doc.
        relax_iterations: restrained minimisation after every jump, at most this many minimiser
            iterations (0 = off, the default); see the module doc.
        relax_restraint_kJ_per_mol_nm2: force constant of the harmonic position restraints on
            the predicted atoms during that minimisation (kJ/mol/nm², OpenMM's units). A
            restrained atom settles about ``F / k`` from its prediction, ``F`` the force the
            force field puts on it (1000 kJ/mol/nm -> 0.1 Å at the default 1e5); raise it to
            hold the prediction tighter, 0 for an unrestrained minimisation.
        end_velocities: velocities of each kept jump's end state (and so the next jump's
            input): ``"difference"`` (backward difference over the last output spacing) or
            ``"thermal"`` (Maxwell-Boltzmann at ``temperature_K``, seeded by
            ``velocity_seed``; see :mod:`integrations.propagator`).
        jump_noise: stochastic jumps: a :class:`~surrogate_md.noise.JumpNoise` fitted for this
            surrogate, or the path of its ``.npz`` (``python -m surrogate_md.evaluate ...
            --noise-out FILE``); each jump's predicted frames get a Gaussian draw of the
            model's residuals (Å) scaled by ``t / jump_ps``. None (the default): the model's
            deterministic jumps. One fitted for another atom set or jump is a ``DataError``.
        noise_scale: multiplies the noise's standard deviations (>= 0; 1 = as fitted, 0 = the
            deterministic jumps).
        noise_seed: seed of the noise draws (a generator of its own, independent of the
            thermal draws even for the same seed); None: not reproducible.

    Attributes:
        context, topology, system, integrator, reporters, currentStep: as in ``Simulation``.
        steps_per_jump: steps one jump counts as (1 unless hybrid).
        steps_per_frame: steps of each reported output frame after the jump start
            (``[1]`` unless hybrid, then (P,)).
        md_step_ps: the integrator's MD step (fallback and hybrid MD).
        guards: the :class:`Guards` (``guards.summary()`` for the event counts).
        n_jumps, n_fallbacks: accepted jumps and jumps replaced by MD.
        redraws, n_redraws: stochastic jumps (``jump_noise``): how many fresh draws a jump may
            take where its draw would fall back to MD (it fails the guards with the action
            ``fallback``, or its relaxation fails with ``relax``), and how many were taken. A
            jump keeps its first draw that is accepted (as drawn or relaxed); the MD stands in
            only when every draw failed. A redraw costs a noise draw (the model's mean of the
            jump is kept), the rebuild and the guards, a fallback a jump's worth of MD; 0 (the
            default): fall back at once. The guards check, and count, every draw. In implicit
            solvent the relaxation of a draw that may still be drawn again ends with its
            solvent-free stages (``relax_until_accepted``'s ``redraw_left``): a fresh draw costs
            less than full-force-field iterations.
        settle_iterations, relax_iterations, relax_restraint_kJ_per_mol_nm2: the settling and
            relaxation settings (may be changed between ``step`` calls).
    """

    def __init__(self, topology: app.Topology, system: openmm.System, surrogate: Any,
                 integrator: openmm.Integrator | None = None,
                 platform: openmm.Platform | None = None,
                 platformProperties: dict | None = None, state: str | None = None, *,
                 guards: Guards | GuardConfig | str | None = "raise", md_steps: int = 0,
                 temperature_K: float | None = None, progress: bool = False,
                 settle_iterations: int = DEFAULT_SETTLE_ITERATIONS, relax_iterations: int = 0,
                 relax_restraint_kJ_per_mol_nm2: float = DEFAULT_RELAX_RESTRAINT_KJ_PER_MOL_NM2,
                 end_velocities: str = "difference", velocity_seed: int | None = None,
                 jump_noise=None, noise_scale: float = 1.0, noise_seed: int | None = None,
                 redraws: int = 0) -> None:
        self.surrogate = load_surrogate(surrogate)
        # as Simulation: the System and Integrator may be given as serialized XML files
        if isinstance(system, (str, os.PathLike)):
            system = _deserialize(system, "system")
        if isinstance(integrator, (str, os.PathLike)):
            integrator = _deserialize(integrator, "integrator")
        check_system(system, topology, self.surrogate)
        self.topology = topology
        self.system = system
        if integrator is None:
            integrator = openmm.LangevinMiddleIntegrator(
                (DEFAULT_TEMPERATURE_K if temperature_K is None else temperature_K) * unit.kelvin,
                1.0 / PS, default_step_ps(self.surrogate.times_ps) * PS)
        self.integrator = integrator
        #: K: the energy guard's default threshold and thermal end velocities use it
        self.temperature_K = engine_temperature_K(temperature_K, integrator, system,
                                                  "SurrogateSimulation")
        if md_steps < 0 or int(md_steps) != md_steps:
            raise EngineError(f"md_steps must be a whole number >= 0, got {md_steps}")
        self.md_steps = int(md_steps)
        if relax_iterations < 0 or int(relax_iterations) != relax_iterations:
            raise EngineError(f"relax_iterations must be a whole number >= 0 (0 = no "
                              f"relaxation after jumps), got {relax_iterations}")
        self.settle_iterations = checked_settle_iterations(settle_iterations)
        if not (np.isfinite(relax_restraint_kJ_per_mol_nm2)
                and relax_restraint_kJ_per_mol_nm2 >= 0):
            raise EngineError(f"relax_restraint_kJ_per_mol_nm2 must be a finite force constant "
                              f">= 0 kJ/mol/nm², got {relax_restraint_kJ_per_mol_nm2}")
        self.relax_iterations = int(relax_iterations)
        self.relax_restraint_kJ_per_mol_nm2 = float(relax_restraint_kJ_per_mol_nm2)
        self._platform_properties = platformProperties
        self._relax: Relaxation | None = None
        self._known_energy: tuple[np.ndarray, float | None] | None = None
        self._md_end: np.ndarray | None = None  # positions after the last real MD
        # real MD (ps) since the last state a surrogate produced: it decides whether a state's
        # energy may move the energy guard's anchor (GuardConfig.anchor_md_ps)
        self._md_ps = 0.0
        self._dcd_warned = False
        self.md_step_ps = integrator.getStepSize().value_in_unit(PS)
        if isinstance(integrator, VARIABLE_STEP_INTEGRATORS) or not self.md_step_ps > 0:
            raise EngineError(
                f"{type(integrator).__name__} takes steps of varying length (step size now "
                f"{self.md_step_ps:g} ps), but SurrogateSimulation counts a jump as a whole "
                "number of MD steps of one size (time = step count x step size, which DCD/XTC "
                "time stamps rely on); use a fixed-step integrator such as "
                "LangevinMiddleIntegrator")
        md_frame_steps = frame_steps(self.surrogate.times_ps, self.md_step_ps)
        self.jump_steps = self.md_steps == 0
        if self.jump_steps:
            # one step = one jump. Reporters see the jump as the integrator's step size (so
            # stock DCD/XTC time stamps, step x step size, are true); the Context keeps the MD
            # step at all other times, because OpenMM uses it for leapfrog kinetic energies and
            # velocity initialisation, and for fallback MD.
            self.steps_per_frame = np.array([1], dtype=np.int64)
            self.step_ps = self.surrogate.jump_ps
        else:
            self.steps_per_frame = md_frame_steps
            self.step_ps = self.md_step_ps
        self.md_steps_per_jump = int(md_frame_steps[-1])
        self._md_frame_steps = md_frame_steps
        self.steps_per_jump = int(self.steps_per_frame[-1])
        self.reporters: list = []
        if platform is None:
            if platformProperties is not None:
                raise EngineError("platformProperties need a platform; pass platform= too")
            self.context = openmm.Context(system, integrator)
        elif platformProperties is None:
            self.context = openmm.Context(system, integrator, platform)
        else:
            self.context = openmm.Context(system, integrator, platform, platformProperties)
        if state is not None:
            self.loadState(state)
        self._usesPBC = uses_pbc(system, topology)
        self._constrained = system.getNumConstraints() > 0
        self.guards = make_guards(guards, self.surrogate, system, self.temperature_K)
        self._masses_amu = system_masses_amu(system)
        self._can_settle = can_settle(self._masses_amu, self.surrogate.model_atoms)
        self.propagator = SurrogatePropagator(
            self.surrogate, end_velocities=end_velocities, temperature_K=self.temperature_K,
            masses_amu=self._masses_amu, seed=velocity_seed,
            fixed_atoms=fixed_particles(system), zero_momentum=has_com_remover(system),
            jump_noise=jump_noise, noise_scale=noise_scale, noise_seed=noise_seed)
        spacing = int(self._md_frame_steps[0])  # the output spacing in MD steps
        if self.propagator.needs_history and self.md_steps % spacing:
            raise EngineError(
                f"hybrid mode with a history model: md_steps ({self.md_steps}) must be a "
                f"multiple of the output spacing, {spacing} MD steps "
                f"({self.surrogate.times_ps[0]:g} ps), so that the MD segments' states fall on "
                "the grid of the predicted frames the model's history is taken from (otherwise "
                "every jump would first run MD to rebuild it)")
        if not self.propagator.history_from_jumps:
            log.warning("history model %s: its history stride (%g ps) is not a multiple of its "
                        "output spacing (frames at %s ps), so jumps cannot supply its input "
                        "history and every jump first runs %g ps of real MD to rebuild it",
                        self.surrogate.name, self.surrogate.history_stride_ps,
                        list(np.round(self.surrogate.times_ps, 6)),
                        (self.surrogate.history_length - 1) * self.surrogate.history_stride_ps)
        self.progress = progress
        self.n_jumps = 0
        self.n_fallbacks = 0
        if isinstance(redraws, bool) or int(redraws) != redraws or redraws < 0:
            raise EngineError(f"redraws must be a whole number >= 0, got {redraws!r}")
        if redraws and self.propagator.jump_noise is None:
            raise EngineError("redraws draw a stochastic jump again: they need jump_noise (a "
                              "deterministic model makes the same jump every time)")
        self.redraws = int(redraws)
        self.n_redraws = 0
        self._redraw_left = False  # the jump being judged may still be drawn again
        self._snap_warned: set[int] = set()
        # where in a cycle (MD segment, then jump) the state is, for a checkpoint written inside
        # one: the step the running MD segment started at, the step the MD standing in for a
        # failed jump started at (hybrid fallback), and the jump whose frames are being reported
        # (_EmittedJump); a loaded checkpoint's place goes to _resume for step()
        self._segment_start: int | None = None
        self._fallback_start: int | None = None
        self._warmup_start: int | None = None  # a history warm-up with reports (hybrid mode)
        self._in_jump: _EmittedJump | None = None
        self._end_settled = 0  # settle iterations of the last jump end (its frames get as many)
        self._resume: dict | None = None
        log.info("surrogate %s: one jump = %.6g ps = %d steps of %.6g ps", self.surrogate.name,
                 self.surrogate.jump_ps, self.steps_per_jump, self.step_ps)

    # -- the Simulation surface -------------------------------------------------------------------
    @property
    def currentStep(self) -> int:
        return self.context.getStepCount()

    @currentStep.setter
    def currentStep(self, step: int) -> None:
        self.context.setStepCount(step)

    def minimizeEnergy(self, tolerance=10 * unit.kilojoules_per_mole / unit.nanometer,
                       maxIterations: int = 0, reporter=None) -> None:
        """Local energy minimisation, as ``Simulation.minimizeEnergy``."""
        openmm.LocalEnergyMinimizer.minimize(self.context, tolerance, maxIterations, reporter)

    def saveCheckpoint(self, file) -> None:
        """Binary checkpoint of the Context (positions, velocities, time, step count, RNG).
        Given a path, the surrogate's own state goes beside it (:meth:`_save_memory`)."""
        if isinstance(file, (str, os.PathLike)):
            with atomic_path(file) as tmp:  # not openmm.app.internal.safesave: OpenMM 8.3 has none
                tmp.write_bytes(self.context.createCheckpoint())
            self._save_memory(file)
        else:
            file.write(self.context.createCheckpoint())

    def loadCheckpoint(self, file) -> None:
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as fh:
                self.context.loadCheckpoint(fh.read())
        else:
            self.context.loadCheckpoint(file.read())
        self._after_load(file)

    @staticmethod
    def _memory_path(file) -> str | None:
        return (os.fspath(file) + ".surrogate.npz" if isinstance(file, (str, os.PathLike))
                else None)

    def _save_memory(self, file) -> None:
        """``<file>.surrogate.npz``: what the Context does not hold and a restart needs to go on as
        the run would have: a history model's remembered frames, the thermal velocity draws' and the
        jump noise's generators, the guards' recorded energies (the anchor among them), the jump
        counts, the MD time behind the state and, inside a hybrid cycle, where in it the state is
        (``cycle``; with the rest of the jump when on an intermediate output frame); stamped with
        the Context's time."""
        import json

        mem = self.propagator.memory()
        n_jumps, md_ps, place, rest = self.n_jumps, self._md_ps, None, {}
        jump = self._in_jump
        if jump is not None and jump.frame == len(jump.offsets_ps) - 1:
            # the jump's end: saved as the state after it, with the bookkeeping that follows
            # its reports done (a restart from it starts a new cycle)
            if jump.kind == "jump":
                n_jumps, md_ps = n_jumps + 1, 0.0
        elif jump is not None:  # an intermediate output frame: the rest of the jump goes along
            k = jump.frame + 1
            place = {"in": "jump", "t0_ps": jump.t0_ps, "s0": jump.s0, "kind": jump.kind,
                     "settle_iterations": jump.settle_iterations,
                     "offsets_ps": [float(t) for t in jump.offsets_ps[k:]],
                     "frame_steps": [int(n) for n in jump.frame_steps[k:]]}
            rest = {"rest_positions": jump.positions_A[k:],
                    "rest_velocities": jump.velocities_A_per_ps[k:]}
        elif self._segment_start is not None:  # inside the MD segment before a jump
            place = {"in": "md", "md_steps": self.md_steps,
                     "md_done": min(self.currentStep - self._segment_start, self.md_steps)}
        elif self._warmup_start is not None:  # building a history model's first input
            place = {"in": "warmup", "md_done": self.currentStep - self._warmup_start}
        elif (self._fallback_start is not None
              and self.currentStep - self._fallback_start < self.steps_per_jump):
            # inside the MD that stands in for a failed jump (at its end: a cycle's end)
            place = {"in": "fallback", "md_done": self.currentStep - self._fallback_start,
                     "md_steps": self.steps_per_jump}
        elif self._resume is not None:  # loaded inside a cycle and not stepped since
            place = {k: v for k, v in self._resume.items() if not k.startswith("rest_")}
            rest = {k: v for k, v in self._resume.items() if k.startswith("rest_")}
        extra = {"time_ps": read_state(self.context)[2], "rng": mem["rng"],
                 "noise_rng": mem["noise_rng"], "guards": self.guards.energy_state(),
                 "n_jumps": n_jumps, "n_fallbacks": self.n_fallbacks,
                 "n_redraws": self.n_redraws, "md_ps": md_ps,
                 "cycle": place}
        with atomic_path(self._memory_path(file)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=mem["keys"], frames=mem["frames"],
                     extra=np.array(json.dumps(extra)), **rest)

    def saveState(self, file) -> None:
        """Portable XML state (positions, velocities, time, parameters)."""
        state = self.context.getState(positions=True, velocities=True, parameters=True,
                                      integratorParameters=True)
        xml = openmm.XmlSerializer.serialize(state)
        if isinstance(file, (str, os.PathLike)):
            atomic_write_text(file, xml)
            self._save_memory(file)
        else:
            file.write(xml)

    def loadState(self, file) -> None:
        if isinstance(file, (str, os.PathLike)):
            with open(file) as fh:
                xml = fh.read()
        else:
            xml = file.read()
        self.context.setState(openmm.XmlSerializer.deserialize(xml))
        if hasattr(self, "propagator"):
            self._after_load(file)

    def _after_load(self, file=None) -> None:
        """A loaded state: the surrogate's own state comes back from ``<file>.surrogate.npz``
        when that was saved at the loaded time; otherwise (another state, or none saved) the
        remembered history and the recorded energies are dropped."""
        import json

        self.propagator.forget()
        self.guards.reset_energies()
        self._md_ps, self._md_end = 0.0, None
        self._resume = self._in_jump = self._segment_start = self._fallback_start = None
        self._warmup_start = None
        path = self._memory_path(file)
        if path is None or not os.path.exists(path):
            return
        with np.load(path) as data:
            keys, frames, extra = data["keys"], data["frames"], json.loads(str(data["extra"]))
            rest = {k: np.array(data[k]) for k in ("rest_positions", "rest_velocities")
                    if k in data}
        now = read_state(self.context)[2]
        if abs(extra["time_ps"] - now) > 1e-6:
            log.info("%s was saved at t = %g ps, the state loaded is at %g ps: not used", path,
                     extra["time_ps"], now)
            return
        noise_rng = extra.get("noise_rng")  # absent in files written before jump noise
        self.propagator.warn_if_noise_differs(noise_rng, path, "simulation")
        self.propagator.restore_memory({"keys": keys, "frames": frames, "rng": extra["rng"],
                                        "noise_rng": noise_rng})
        self.guards.restore_energy_state(extra["guards"])
        self.n_jumps, self.n_fallbacks = int(extra["n_jumps"]), int(extra["n_fallbacks"])
        self.n_redraws = int(extra.get("n_redraws", 0))  # absent before redraws
        if extra["md_ps"] != 0:  # the state came from real MD (or is inside a run that owes
            # its time: a cold start, _begin_md_run): it still did
            self._md_ps, self._md_end = float(extra["md_ps"]), read_state(self.context)[0]
        self._resume = self._resume_place(extra.get("cycle"), rest, path)

    def _resume_place(self, place: dict | None, rest: dict, path: str) -> dict | None:
        """Where in a hybrid cycle a loaded state is (``_save_memory``'s ``cycle``), checked
        against this simulation; None: at a cycle's start."""
        if place is None:
            return None
        if place["in"] == "md" and place["md_steps"] != self.md_steps:
            log.warning("%s was saved %d MD steps into a segment of %d; this simulation runs "
                        "segments of %d steps: its next step() starts a new segment", path,
                        place["md_done"], place["md_steps"], self.md_steps)
            return None
        if (place["in"] == "fallback" and (not self.md_steps
                                           or place["md_steps"] != self.steps_per_jump)):
            log.warning("%s was saved %d steps into fallback MD of %d steps standing in for a "
                        "jump; this simulation's jumps take %d steps: its next step() starts a "
                        "new cycle", path, place["md_done"], place["md_steps"],
                        self.steps_per_jump)
            return None
        return {**place, **rest}

    # -- stepping ---------------------------------------------------------------------------------
    def step(self, steps: int) -> None:
        """Advance ``steps`` learned jumps (each preceded by ``md_steps`` MD steps in hybrid
        mode)."""
        if int(steps) != steps:
            raise TypeError(f"expected an integer number of jumps, got {type(steps)}")
        from tqdm.auto import tqdm

        for _ in tqdm(range(int(steps)), disable=not self.progress, desc="surrogate",
                      unit="jump"):
            # a loaded checkpoint written inside a cycle: this step finishes that cycle
            resume, self._resume = self._resume, None
            try:
                if resume is not None and resume["in"] == "jump":
                    self._finish_jump(resume)
                    continue
                if resume is not None and resume["in"] == "fallback":
                    self._fallback_md(resume["md_done"])  # counted as a fallback already
                    continue
                if resume is not None and resume["in"] == "warmup":
                    self._jump(warmup_done=resume["md_done"])  # the segment ran before it
                    continue
                self._md_segment_before_jump(resume["md_done"] if resume is not None else 0)
                self._jump()
            finally:
                self._segment_start = self._in_jump = self._fallback_start = None
                self._warmup_start = None

    def _fallback_md(self, done: int = 0) -> None:
        """Hybrid mode: the MD (with reports) that stands in for a failed jump, the first
        ``done`` steps of it already run (a restart inside it)."""
        self._fallback_start = self.currentStep - done
        if not done:
            self._begin_md_run(self.steps_per_jump)
        self._run_md(self.steps_per_jump - done)
        self._fallback_start = None

    def _md_segment_before_jump(self, done: int = 0) -> None:
        """Hybrid mode: the ``md_steps`` MD steps before a jump, the first ``done`` of them
        already run (a restart inside the segment), with reporters."""
        if not self.md_steps:
            return
        self._segment_start = self.currentStep - done
        if not done:
            self._begin_md_run(self.md_steps)
        if not self.propagator.needs_history:
            self._run_md(self.md_steps - done)
        else:
            # the segment's states on the output grid become history frames
            spacing = int(self._md_frame_steps[0])
            if done % spacing == 0:
                pos, _, t, _ = read_state(self.context)
                self.propagator.observe(t, pos)
            while done < self.md_steps:
                n = spacing - done % spacing
                self._run_md(n)
                done += n
                pos, _, t, _ = read_state(self.context)
                self.propagator.observe(t, pos)
        # the segment is over: a checkpoint from here on (reports of the jump's frames, or one
        # saved after the cycle, e.g. by a caller between frames) is not inside it
        self._segment_start = None

    def _finish_jump(self, rest: dict) -> None:
        """The rest of a jump a checkpoint was written inside (its later output frames and
        end state, reported as the uninterrupted run reported them), then its bookkeeping."""
        frames = _EmittedJump(rest["rest_positions"], rest["rest_velocities"],
                              np.asarray(rest["offsets_ps"]), np.asarray(rest["frame_steps"]),
                              float(rest["t0_ps"]), int(rest["s0"]), rest["kind"],
                              settle_iterations=int(rest.get("settle_iterations", 0)))
        self._emit_frames(frames, holds_end=False)
        if frames.kind == "jump":
            self.n_jumps += 1
            self._md_ps = 0.0

    def prepare_history(self, reset_clock: bool = False) -> float:
        """Run real MD now, without reports, until a history model has its input frames (a
        no-op for other models, or when they are there), instead of at the first jump.

        Call it before attaching reporters: the stock DCD/XTC reporters stamp frames by count,
        and MD inside the first jump would shift their times (jump-step mode) or their phase
        against the jumps (hybrid mode). ``reset_clock``: afterwards set the time and the step
        count to 0, so the warm-up is equilibration before the run. Returns the MD time run
        (ps)."""
        if not self.propagator.needs_history:
            return 0.0
        pos, _, t0, _ = read_state(self.context)
        self.propagator.observe(t0, pos)
        if not self.propagator.has_history(t0):
            reporters, self.reporters = self.reporters, []
            try:
                self._warm_up_history()
            finally:
                self.reporters = reporters
        _, _, t1, _ = read_state(self.context)
        if reset_clock:
            self.propagator.shift_times(-t1)
            self.context.setTime(0.0)
            self.context.setStepCount(0)
        return t1 - t0

    def runForClockTime(self, time, checkpointFile=None, stateFile=None,
                        checkpointInterval=None) -> None:
        """Take learned jumps until ``time`` of wall-clock time has passed, as
        ``Simulation.runForClockTime``: ``time`` and ``checkpointInterval`` are quantities or
        hours; ``checkpointFile``/``stateFile`` are written at the end (and at every interval),
        by :meth:`saveCheckpoint`/:meth:`saveState`."""
        import time as clock

        def hours(value) -> float:
            return value.value_in_unit(unit.hours) if unit.is_quantity(value) else float(value)

        end = clock.monotonic() + 3600.0 * hours(time)
        while clock.monotonic() < end:
            stop = end if checkpointInterval is None else min(
                end, clock.monotonic() + 3600.0 * hours(checkpointInterval))
            while clock.monotonic() < stop:
                self.step(1)
            if checkpointFile is not None:
                self.saveCheckpoint(checkpointFile)
            if stateFile is not None:
                self.saveState(stateFile)

    def run_md(self, steps: int) -> None:
        """``steps`` real integrator steps with reporters, exactly as ``Simulation.step``
        (from a state colder than the guards' ``cold_md_fraction`` of the temperature, such as a
        kept jump end, the MD counts as no MD time for the energy anchor: see
        :meth:`_begin_md_run`)."""
        self._begin_md_run(int(steps))
        self._run_md(steps)

    def _run_md(self, steps: int) -> None:
        """``run_md`` inside a run that began elsewhere (a fallback, a hybrid segment, a
        warm-up: :meth:`_begin_md_run` was called at its start)."""
        end = self.currentStep + int(steps)
        while self.currentStep < end:
            left = end - self.currentStep
            due = []
            for reporter in self.reporters:
                report = _report_dict(reporter.describeNextReport(self))
                if 0 < report["steps"] <= left:
                    due.append((reporter, report))
            n = min([left] + [r["steps"] for _, r in due])
            todo = n
            while todo > 10:  # as Simulation: give Python a chance to see Ctrl-C
                self.integrator.step(10)
                todo -= 10
            self.integrator.step(todo)
            # counted before the reports: a checkpoint written by one holds the MD time so far
            self._count_md(n)
            now = [(rep, r) for rep, r in due if r["steps"] == n]
            if now:
                self._generate_reports(now)
        self._md_end = read_state(self.context)[0]

    def _begin_md_run(self, steps: int) -> None:
        """Before an MD run of ``steps`` steps (a fallback, a hybrid segment, a history
        warm-up) from its first step: from a state colder than the guards'
        ``cold_md_fraction`` of the temperature (a kept jump end with the model's difference
        velocities) the MD heats the structure before it samples, so the run counts as no MD
        time towards ``GuardConfig.anchor_md_ps``: the clock owes its length, and its end state
        counts as the surrogate's (a checkpoint inside the run keeps the debt)."""
        vel = read_state(self.context)[1]
        if self.guards.md_starts_cold(kinetic_energy_kJ_per_mol(vel, self._masses_amu)):
            self._md_ps = -steps * self.md_step_ps

    def _count_md(self, steps: int) -> None:
        """Count ``steps`` of real MD towards the state's MD time since a surrogate's state."""
        self._md_ps += steps * self.md_step_ps
        if abs(self._md_ps) < 1e-9:  # a cold run's debt paid off (no rounding left over)
            self._md_ps = 0.0

    def _after_md(self, steps: int) -> None:
        """Count ``steps`` of real MD (:meth:`_count_md`) and remember where it ended (a jump
        from other positions, moved by hand since, starts from no MD: :meth:`_jump`)."""
        self._count_md(steps)
        self._md_end = read_state(self.context)[0]

    def _generate_reports(self, reports: list[tuple[Any, dict]]) -> None:
        """Group reports by periodic wrapping and hand each group one State (as Simulation)."""
        wrapped, unwrapped, either = [], [], []
        for reporter, report in reports:
            want = self._usesPBC if report.get("periodic") is None else report["periodic"]
            if "positions" not in report["include"]:
                either.append((reporter, report))
            elif want:
                wrapped.append((reporter, report))
            else:
                unwrapped.append((reporter, report))
        if len(wrapped) > len(unwrapped):
            wrapped += either
        else:
            unwrapped += either
        states = []
        for group, periodic in ((wrapped, True), (unwrapped, False)):
            if not group:
                continue
            include = set().union(*[set(r["include"]) for _, r in group])
            states.append((group, self.context.getState(
                groups=self.integrator.getIntegrationForceGroups(), enforcePeriodicBox=periodic,
                parameters=True, **{k: True for k in include})))
        if self.jump_steps:  # reporters read the step size when they open their files
            self.integrator.setStepSize(self.step_ps * PS)
        try:
            for group, state in states:
                for reporter, _ in group:
                    reporter.report(self, state)
        finally:
            if self.jump_steps:
                self.integrator.setStepSize(self.md_step_ps * PS)

    # -- restrained relaxation after a jump ---------------------------------------------------
    def _relaxation(self) -> Relaxation:
        """The relaxation Context (built on first use, same platform as the main Context): a
        flexible copy of the System with restraints on the predicted atoms, shared by the
        restrained relaxation after jumps and the ``relax`` guard action (restraints off)."""
        if self._relax is None:
            self._relax = Relaxation(self.system, self.context.getPlatform(),
                                     self._platform_properties, self.surrogate.model_atoms)
        return self._relax

    def _relax_jump_end(self, positions_A: np.ndarray) -> np.ndarray:
        """Positions (n_atoms, 3) Å after the restrained minimisation; restraints hold the
        predicted atoms at their positions in ``positions_A``."""
        box = self.context.getState().getPeriodicBoxVectors()
        return self._relaxation().minimise(positions_A, box, self.relax_iterations,
                                           self.relax_restraint_kJ_per_mol_nm2)

    def _md_segment(self, n: int) -> None:
        """``n`` MD steps without reports, advancing the time but not the step count: in
        jump-step mode the step count counts jumps only, so MD that is not a counted step
        (fallback MD, history warm-up) leaves it where it was (hybrid mode counts MD steps and
        runs its MD through :meth:`run_md`)."""
        step = self.context.getStepCount()
        try:
            self.integrator.step(n)
        finally:
            self.context.setStepCount(step)
        self._after_md(n)

    def _md_jump(self, t0: float) -> None:
        """One jump's length of MD without reports (the jump-step mode fallback), stopping at
        each time of the surrogate's output grid so a history model sees those states."""
        self._begin_md_run(self.md_steps_per_jump)
        if not self.propagator.needs_history:
            self._md_segment(self.md_steps_per_jump)
            return
        done = 0
        for steps, offset in zip(self._md_frame_steps, self.surrogate.times_ps):
            self._md_segment(int(steps) - done)
            done = int(steps)
            self.propagator.observe(t0 + float(offset), read_state(self.context)[0])

    def _warm_up_history(self, done: int = 0) -> None:
        """Run real MD until the history model has its input frames; ``done``: MD steps of it
        already run (a restart inside a reported warm-up, whose frames so far were restored)."""
        s = self.surrogate
        stride = frame_steps(np.array([s.history_stride_ps]), self.md_step_ps)[0]
        log.info("history model: running %d x %d MD steps to build its input history",
                 s.history_length - 1, stride)
        if self.jump_steps and not self._dcd_warned and any(
                isinstance(r, (app.DCDReporter, app.XTCReporter)) for r in self.reporters):
            self._dcd_warned = True
            log.warning("history warm-up: %g ps of MD outside the step count; DCD and XTC "
                        "reporters stamp their frames by count (step x jump_ps) and lag the "
                        "State's time by it; call prepare_history() before attaching them",
                        (s.history_length - 1) * stride * self.md_step_ps)
        pos, _, t, _ = read_state(self.context)
        if done % stride == 0:
            self.propagator.observe(t, pos)
        if not self.jump_steps:  # reported: a checkpoint in it records how far it got
            self._warmup_start = self.currentStep - done
        total = (s.history_length - 1) * stride
        if not done:
            self._begin_md_run(total)
        try:
            while done < total:
                n = stride - done % stride
                if self.jump_steps:  # MD time outside the step count: logged, not reported
                    self._md_segment(n)
                else:
                    self._run_md(n)
                done += n
                pos, _, t, _ = read_state(self.context)
                self.propagator.observe(t, pos)
        finally:
            self._warmup_start = None

    def _energy_of(self, positions_A: np.ndarray) -> float:
        """Potential energy (kJ/mol) of the Context's state, whose positions are
        ``positions_A``: the one the last guard check computed while the positions are still
        exactly those it checked (one force evaluation less per jump), else evaluated."""
        known, self._known_energy = self._known_energy, None
        if known is not None and known[1] is not None and np.array_equal(known[0], positions_A):
            return known[1]
        return potential_energy(self.context)

    def _jump(self, warmup_done: int | None = None) -> None:
        """One cycle's jump; ``warmup_done``: restarting inside the history warm-up that
        precedes it, that many MD steps into it."""
        pos, vel, t0, _ = read_state(self.context)
        # real MD produced the state jumped from if it ends where the last MD (a hybrid segment,
        # fallback MD, a history warm-up) left it: the user has not moved the atoms since
        if self._md_end is None or not np.array_equal(pos, self._md_end):
            self._md_ps, self._md_end = 0.0, None
        self.propagator.observe(t0, pos)  # the state now is the last frame of any history
        if warmup_done is not None or not self.propagator.has_history(t0):
            self._warm_up_history(warmup_done or 0)
            pos, vel, t0, _ = read_state(self.context)
        s0 = self.currentStep
        energy = self._energy_of(pos)
        if self._md_ps > 0:  # real MD's state: after long enough MD it may move the anchor
            self.guards.record_md_energy(energy, self._md_ps)
        else:
            self.guards.record_energy(energy)
        self._check_file_reporters(s0)
        draws, redraws = self.propagator.generator_states(), self.n_redraws
        try:
            result, final_pos = self._draw_jump(pos, vel, t0, s0)
        except BaseException:
            # Ctrl-C (or an error) between writing the predicted state and deciding on it:
            # the Context goes back to the jump's start, as an interrupted Simulation.step
            # leaves a state MD made, never an unchecked one; the random draws the jump took go
            # back with it, so a checkpoint saved now restarts with the same draws
            self._restore(pos, vel, t0, s0)
            self.propagator.restore_generators(draws)
            self.n_redraws = redraws  # the jump is drawn afresh, from its first draw
            raise
        if final_pos is None:
            self._restore(pos, vel, t0, s0)
            self.n_fallbacks += 1
            if not self.jump_steps:
                self._fallback_md()
                return
            self._md_jump(t0)
            end_pos, end_vel, _, _ = read_state(self.context)
            self._emit_frames(_EmittedJump(end_pos[None], end_vel[None], result.offsets_ps[-1:],
                                           self.steps_per_frame[-1:], t0, s0, "fallback"))
            return
        self.propagator.remember(t0, result)  # a history model's next input
        positions = np.concatenate([result.positions_A[:-1], final_pos[None]])
        self._emit_frames(_EmittedJump(positions, result.velocities_A_per_ps, result.offsets_ps,
                                       self.steps_per_frame, t0, s0, "jump",
                                       settle_iterations=self._end_settled))
        self.n_jumps += 1
        self._md_ps = 0.0  # the surrogate's state: MD after it starts counting again

    def _draw_jump(self, pos: np.ndarray, vel: np.ndarray, t0: float, s0: int
                   ) -> tuple[JumpResult, np.ndarray | None]:
        """The jump from the state (``pos``, ``vel``, ``t0``, ``s0``) in the Context and its
        guarded end (None: fall back); a failed stochastic draw is drawn again up to
        :attr:`redraws` times, the Context back at the start before each."""
        jump_index, attempt = self.n_jumps + self.n_fallbacks, 0
        while True:
            self._redraw_left = attempt < self.redraws
            # jump-step mode reports jump ends only: the frames between are never rebuilt
            result = self.propagator.jump(pos, vel, t0, last_only=bool(self.jump_steps))
            end_time = t0 + float(result.offsets_ps[-1])
            try:
                final_pos = self._accept_final(result, (pos, vel, t0, s0), jump_index,
                                               end_time)
            finally:
                self._redraw_left = False
            if final_pos is not None or attempt == self.redraws:
                return result, final_pos
            attempt += 1
            self.n_redraws += 1
            self._restore(pos, vel, t0, s0)

    def _accept_final(self, result: JumpResult, start: tuple, jump_index: int, end_time: float
                      ) -> np.ndarray | None:
        """Guard the end state; returns its (possibly relaxed) positions, or None = fall back."""
        final = result.positions_A[-1]
        finite = np.isfinite(final).all()
        energy, stage = None, None
        settled = finite and self.settle_iterations > 0 and self._can_settle
        self._end_settled = 0
        if finite:
            if settled:
                def energy_of(x: np.ndarray) -> float:
                    write_state(self.context, x, result.velocities_A_per_ps[-1],
                                self._constrained)
                    return potential_energy(self.context)

                final, stage = settle_jump_end(
                    self._relaxation(), self.guards, start[0], final,
                    self.context.getState().getPeriodicBoxVectors(), self.settle_iterations,
                    energy_of)
                self._end_settled = stage
            write_state(self.context, final, result.velocities_A_per_ps[-1], self._constrained)
            if self.relax_iterations:
                relaxed = self._relax_jump_end(read_state(self.context)[0])
                write_state(self.context, relaxed, result.velocities_A_per_ps[-1],
                            self._constrained)
            energy = potential_energy(self.context)
            final = read_state(self.context)[0]
        with self.guards.judging_settled(settled, stage):
            return self._judge_final(result, start, jump_index, end_time, final, energy,
                                     finite, settled)

    def _judge_final(self, result: JumpResult, start: tuple, jump_index: int, end_time: float,
                     final: np.ndarray, energy: float | None, finite: bool, settled: bool
                     ) -> np.ndarray | None:
        """The guards' verdict on the end state in the Context (``final``, its ``energy``) and
        the action on a failure (see :meth:`_accept_final`)."""
        events = self.guards.check(final, result.velocities_A_per_ps[-1],
                                   energy_kJ_per_mol=energy, jump=jump_index, time_ps=end_time)
        if not events:
            self._known_energy = (final, energy)
            if settled:
                self.guards.record_settled(energy)
            return final
        action = self.guards.action_for(events)
        self.guards.handle(events, "redraw" if action == "fallback" and self._redraw_left
                           else action)
        if action == "raise":
            self._restore(*start)
            raise GuardError(guard_error_message(events, f"SurrogateSimulation "
                                                 f"({self.surrogate.source or self.surrogate.name})"))
        if action == "warn":
            if settled:
                self.guards.record_settled(energy)
            return final if finite else None  # a NaN state cannot be kept
        if action == "relax" and finite:
            relaxed, energy, again = relax_until_accepted(self._relaxation(), self.context,
                                                          self.guards, jump_index, end_time,
                                                          energy, redraw_left=self._redraw_left)
            if not again:
                if self._constrained:
                    project_velocities_once(self.context, result.velocities_A_per_ps[-1])
                self._known_energy = (relaxed, energy)
                return relaxed
            self.guards.handle(again, "redraw" if self._redraw_left else "fallback")
        return None

    def _restore(self, pos: np.ndarray, vel: np.ndarray, time_ps: float, step: int) -> None:
        write_state(self.context, pos, vel, False)
        self.context.setTime(time_ps * PS)
        self.context.setStepCount(step)

    def _check_file_reporters(self, s0: int) -> None:
        """DCD/XTC reporters must fall on output frames (their times come from step numbers)."""
        frames = set((s0 + self.steps_per_frame).tolist())
        end = s0 + self.steps_per_jump
        for reporter in self.reporters:
            if not isinstance(reporter, (app.DCDReporter, app.XTCReporter)):
                continue
            interval = int(reporter._reportInterval)
            first = (s0 // interval + 1) * interval
            bad = [s for s in range(first, end + 1, interval) if s not in frames]
            if bad:
                raise EngineError(
                    f"{type(reporter).__name__} with reportInterval {interval} would report at "
                    f"step {bad[0]}, between the surrogate's output frames (one jump = "
                    f"{self.steps_per_jump} steps, frames every {self.steps_per_frame[0]} "
                    f"steps); its file would carry wrong times: use a reportInterval that is a "
                    f"multiple of {self.steps_per_frame[0]} (e.g. simulation.steps_per_jump)")

    def _emit_frames(self, jump: _EmittedJump, holds_end: bool = True) -> None:
        """Advance time/step to each output frame of ``jump`` and run the reporters due
        there. With ``holds_end`` the Context holds the end state on entry; it is written again
        only if an earlier frame was reported (a write round-trips positions through nm and the
        constraints, and the guards' known energy of the end state would no longer match it).
        While a frame's reports run, ``_in_jump`` says which frame it is (a checkpoint written
        there saves the rest of the jump)."""
        due = {}
        base = self.currentStep  # the jump's start, or the frame a restart resumes at
        t0, s0 = jump.t0_ps, jump.s0
        for i, reporter in enumerate(self.reporters):
            report = _report_dict(reporter.describeNextReport(self))
            if report["steps"] > 0:
                due[i] = (base + report["steps"], report)
        last = len(jump.offsets_ps) - 1
        for k, offset in enumerate(jump.offsets_ps):
            step_k = s0 + int(jump.frame_steps[k])
            now = [i for i, (d, _) in due.items() if d <= step_k]
            if not now and k < last:
                continue
            positions = jump.positions_A[k]
            if k < last and jump.settle_iterations and jump.kind == "jump":
                # an intermediate frame a reporter sees: its rebuilt atoms settled as the end's
                # were (as many iterations, no energy check), the predicted ones as predicted
                positions = self._relaxation().settle(
                    positions, self.context.getState().getPeriodicBoxVectors(),
                    jump.settle_iterations)
            if k < last or not holds_end:
                write_state(self.context, positions, jump.velocities_A_per_ps[k],
                            self._constrained)
                holds_end = False
            self.context.setTime((t0 + float(offset)) * PS)
            self.context.setStepCount(step_k)
            self.propagator.observe(t0 + float(offset), positions)
            for i in now:
                if due[i][0] < step_k and i not in self._snap_warned:
                    self._snap_warned.add(i)
                    log.warning("%s is due between surrogate frames; it reports at the next "
                                "frame (every %d steps)", type(self.reporters[i]).__name__,
                                self.steps_per_frame[0])
            if now:
                self._in_jump = dataclasses.replace(jump, frame=k)
                self._generate_reports([(self.reporters[i], due[i][1]) for i in now])
                self._in_jump = None
                for i in now:
                    report = _report_dict(self.reporters[i].describeNextReport(self))
                    if report["steps"] > 0:
                        due[i] = (step_k + report["steps"], report)
                    else:
                        del due[i]

    def guard_summary(self) -> dict:
        """JSON-safe guard totals (``guards.summary()``)."""
        return self.guards.summary()

    def summary(self) -> dict:
        """JSON-safe run summary: jumps, fallbacks, time, guard events, surrogate, and the
        jump noise (``jump_noise``: ``JumpNoise.describe()`` with its ``scale``, or None)."""
        return {"jumps": self.n_jumps, "fallbacks": self.n_fallbacks,
                "redraws": self.redraws, "n_redraws": self.n_redraws,
                "step": self.currentStep,
                "time_ps": self.context.getState().getTime().value_in_unit(PS),
                "steps_per_jump": self.steps_per_jump, "step_ps": self.step_ps,
                "md_step_ps": self.md_step_ps, "jump_steps": self.jump_steps,
                "md_steps": self.md_steps, "settle_iterations": self.settle_iterations,
                "relax_iterations": self.relax_iterations,
                "relax_restraint_kJ_per_mol_nm2": self.relax_restraint_kJ_per_mol_nm2,
                "guards": self.guards.summary(),
                "surrogate": self.surrogate.describe(),
                "jump_noise": self.propagator.describe_noise()}


class SurrogateJumpReporter:
    """Replace the state of an unchanged ``Simulation`` by a learned jump every ``interval`` steps.

    Append it to ``simulation.reporters``. At every report it predicts a jump from the current
    state, writes the jump's end state (positions and backward-difference velocities, constraints
    applied) into ``simulation.context`` and moves the Context's **time forward by** ``jump_ps``;
    the **step count is unchanged** (it keeps counting integrator steps). So after ``n`` MD steps
    with ``interval`` ``k`` the time is ``n dt + (n // k) jump_ps``. Time stamps of DCD/XTC files
    written by stock reporters count steps only and therefore omit the jumps; use
    :class:`SurrogateSimulation` when the file times must include them.

    Reporters due at a jump step: ``Simulation`` reports in two groups, those wanting wrapped
    positions, then those wanting them unwrapped (reporters that want no positions join the
    larger group, after its members), and hands each group one State taken before its first
    report. This reporter asks for the System's default wrapping (``periodic`` None), as the
    stock DCD, XTC and PDB reporters do: they share its State and show the state before the
    jump. A ``CheckpointReporter`` (no positions; it saves the Context) comes after it and
    saves the state after the jump, the one the run goes on from, as does every reporter of
    the later group (unless, in a non-periodic System, more reporters ask explicitly for
    wrapped positions than for the default). The jump starts from the positions the Context
    holds, read without wrapping, so molecules are whole and no molecule moves by a box vector.

    Guard actions: ``raise``; ``warn`` (keep the jump); ``fallback`` (skip the jump: the
    simulation simply continues with real MD); ``relax`` (minimise, skip if still failing).

    Args:
        surrogate: a :class:`~surrogate_md.Surrogate` or a checkpoint path.
        interval: MD steps between jumps.
        guards: as for :class:`SurrogateSimulation`.
        temperature_K: K for the default energy-guard threshold; None (the default): the
            simulation's thermostat temperature (:func:`thermostat_temperature_K`), or 300 K.
        jump_noise, noise_scale, noise_seed: stochastic jumps, as for
            :class:`SurrogateSimulation` (the noise generator's state is not part of a
            ``Simulation`` checkpoint: a reporter made afresh for a restarted run starts its
            draws over from ``noise_seed`` and would repeat the first run's; give it another
            seed, e.g. the restart's ``currentStep``).
        settle_iterations: as for :class:`SurrogateSimulation`: the atoms the model does not
            predict settle for at most this many minimiser iterations after every jump.
    """

    def __init__(self, surrogate: Any, interval: int,
                 guards: Guards | GuardConfig | str | None = "raise",
                 temperature_K: float | None = None, *, jump_noise=None,
                 noise_scale: float = 1.0, noise_seed: int | None = None,
                 settle_iterations: int = DEFAULT_SETTLE_ITERATIONS) -> None:
        if int(interval) != interval or interval < 1:
            raise EngineError(f"the jump interval must be a whole number of steps >= 1, got "
                              f"{interval}")
        self.settle_iterations = checked_settle_iterations(settle_iterations)
        self.surrogate = load_surrogate(surrogate)
        self.interval = int(interval)
        self._guards_spec = guards
        self._temperature_K = temperature_K
        self.guards: Guards | None = None
        self.propagator = SurrogatePropagator(self.surrogate, jump_noise=jump_noise,
                                              noise_scale=noise_scale, noise_seed=noise_seed)
        self.n_jumps = 0
        self.n_skipped = 0
        self._waiting = 0  # reports in a row without a history (history models)
        self._checked: int | None = None
        self._relax: Relaxation | None = None
        self._relax_for: int | None = None
        self._jump_step = 0  # the simulation's step count at the last kept jump

    def _relaxation(self, simulation) -> Relaxation:
        """The minimisation Contexts beside ``simulation``'s (built on first use, again for
        another simulation), on its platform with its Context's own properties (CUDA: its
        DeviceIndex and Precision); the model's atoms are the ones settling holds."""
        if self._relax is None or self._relax_for != id(simulation):
            context = simulation.context
            platform = context.getPlatform()
            self._relax = Relaxation(simulation.system, platform, {
                name: platform.getPropertyValue(context, name)
                for name in platform.getPropertyNames()}, self.surrogate.model_atoms)
            self._relax_for = id(simulation)
        return self._relax

    def describeNextReport(self, simulation) -> dict:
        steps = self.interval - simulation.currentStep % self.interval
        # periodic None: the group of the stock reporters, first in a periodic System (see the
        # class doc); "positions" keeps it out of the no-positions group, which goes last
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def report(self, simulation, state) -> None:
        if self._checked != id(simulation):
            check_system(simulation.system, simulation.topology, self.surrogate)
            temperature = engine_temperature_K(self._temperature_K, simulation.integrator,
                                               simulation.system, "SurrogateJumpReporter")
            self.guards = make_guards(self._guards_spec, self.surrogate, simulation.system,
                                      temperature)
            self._checked = id(simulation)
            self.propagator.fixed_atoms = fixed_particles(simulation.system)
            self._masses_amu = system_masses_amu(simulation.system)
            self._can_settle = can_settle(self._masses_amu, self.surrogate.model_atoms)
            self.propagator.zero_momentum_masses = (
                self._masses_amu if has_com_remover(simulation.system) else None)
            self._jump_step = 0
            dt = simulation.integrator.getStepSize().value_in_unit(PS)
            if abs(state.getTime().value_in_unit(PS) - simulation.currentStep * dt) > 1e-6:
                # the time is ahead of the steps: jumps were taken before (a restart from a
                # checkpoint of a run with jumps); the last one was at most one interval ago,
                # and may have left a cold state (see the end of this method): the MD since
                # the restart counts as none
                self._jump_step = simulation.currentStep
        context = simulation.context
        constrained = simulation.system.getNumConstraints() > 0
        # the Context's own positions, not the State's: in a periodic System that State is
        # wrapped, and a jump from it would move molecules by box vectors
        pos, vel, t0, _ = read_state(context)
        self.propagator.observe(t0, pos)  # the state now is the last frame of any history
        if not self.propagator.has_history(t0):
            self.n_skipped += 1
            self._waiting += 1
            log.info("history model: skipping the jump at t = %.4f ps until its history is "
                     "filled", t0)
            if self._waiting == self.surrogate.history_length + 1:
                log.warning("history model %s has had no input history for %d reports: it "
                            "needs states %g ps apart, and this reporter sees states every %d "
                            "MD steps plus the jumps' own frames; make the jump interval a "
                            "stride's worth of steps, or use SurrogateSimulation, which builds "
                            "the history itself", self.surrogate.name, self._waiting,
                            self.surrogate.history_stride_ps, self.interval)
            return
        self._waiting = 0
        # the Simulation's own MD produced this state: it may move the guard's anchor once it
        # has run long enough since the last kept jump (GuardConfig.anchor_md_ps)
        md_ps = ((simulation.currentStep - self._jump_step)
                 * simulation.integrator.getStepSize().value_in_unit(PS))
        if md_ps > 0:
            self.guards.record_md_energy(potential_energy(context), md_ps)
        else:  # MD from a cold jump end: heating, the surrogate's state (see below)
            self.guards.record_energy(potential_energy(context))
        result = self.propagator.jump(pos, vel, t0, last_only=True)
        end = t0 + self.surrogate.jump_ps
        final, fvel = result.positions_A[-1], result.velocities_A_per_ps[-1]
        energy, stage = None, None
        settled = (self.settle_iterations > 0 and np.isfinite(final).all()
                   and self._can_settle)
        if np.isfinite(final).all():
            if settled:
                def energy_of(x: np.ndarray) -> float:
                    write_state(context, x, fvel, constrained)
                    return potential_energy(context)

                final, stage = settle_jump_end(
                    self._relaxation(simulation), self.guards, pos, final,
                    context.getState().getPeriodicBoxVectors(), self.settle_iterations,
                    energy_of)
            write_state(context, final, fvel, constrained)
            energy = potential_energy(context)
            final = read_state(context)[0]
        with self.guards.judging_settled(settled, stage):
            self._judge(simulation, pos, vel, t0, result, final, fvel, energy, end)

    def _judge(self, simulation, pos: np.ndarray, vel: np.ndarray, t0: float, result,
               final: np.ndarray, fvel: np.ndarray, energy: float | None, end: float) -> None:
        """The guards' verdict on the jump's end state in ``simulation.context`` and what
        follows: the action on a failure, or the jump kept (clock, history, counts)."""
        context = simulation.context
        constrained = simulation.system.getNumConstraints() > 0
        events = self.guards.check(final, fvel, energy_kJ_per_mol=energy, jump=self.n_jumps,
                                   time_ps=end)
        if events:
            action = self.guards.action_for(events)
            self.guards.handle(events, action)
            keep = action == "warn" and energy is not None
            if action == "relax" and energy is not None:
                relaxed, _, again = relax_until_accepted(self._relaxation(simulation), context,
                                                         self.guards, self.n_jumps, end, energy)
                keep = not again
                if again:
                    self.guards.handle(again, "fallback")
                else:
                    final = relaxed
                    if constrained:
                        project_velocities_once(context, fvel)
            if not keep:
                write_state(context, pos, vel, False)
                if action == "raise":
                    raise GuardError(guard_error_message(events, "SurrogateJumpReporter"))
                self.n_skipped += 1
                return
        context.setTime(end * PS)
        self.propagator.remember(t0, result)
        self.propagator.observe(end, final)
        self.n_jumps += 1
        self._jump_step = simulation.currentStep
        if self.guards.md_starts_cold(kinetic_energy_kJ_per_mol(read_state(context)[1],
                                                                self._masses_amu)):
            # the Simulation's MD until the next jump heats the jump's cold end (the model's
            # difference velocities) before it samples: it counts as no MD time
            # (GuardConfig.cold_md_fraction)
            self._jump_step += self.interval


__all__ = ["Relaxation", "SOLVENT_FREE_CUTOFF_NM", "StopBelowEnergy", "SurrogateJumpReporter",
           "SurrogateSimulation", "check_system", "default_step_ps", "degrees_of_freedom",
           "engine_temperature_K", "fixed_particles", "flexible_system", "frame_steps",
           "kinetic_energy_kJ_per_mol", "load_surrogate", "shorten_cutoff",
           "thermostat_temperature_K"]
