"""Simulated time per wall-clock second: learned jumps (with guards) vs OpenMM MD, same machine.

For each system both runs use the same OpenMM ``System``, platform and machine:

- **MD**: ``openmm.app.Simulation`` with ``LangevinMiddleIntegrator`` (2 fs, 1/ps, HBonds), timed
  over ``--md-ps`` of simulated time after minimisation and a short warm-up; AdK runs the fastest
  MD this CPU allows, as its training data was made: HMR with 4 fs steps and a 1.2 nm cutoff
  (``--no-adk-hmr``, ``--adk-cutoff-nm 0`` for the exact 2 fs setting);
- **surrogate**: ``integrations.openmm_simulation.SurrogateSimulation`` (guards on, default action
  ``fallback``: a failed jump is replaced by real MD of the same length, which is counted in both
  the wall time and the simulated time), started from the MD's end state, timed over
  ``--jumps`` jumps after one warm-up jump. ``model only`` is ``Surrogate.predict`` alone.

Alanine dipeptide: a checkpoint from ``--checkpoint``, or a quick one trained here (the example
config ``examples/configs/MODEL_alanine_dipeptide.yaml`` with ``--train-epochs``) on MD generated
with ``datagen`` (cached in ``--data-dir``); the accuracy the speed holds at comes from
``surrogate_md.evaluate`` on the test split (one-jump F-MSE, rollout RMSD, validity).

AdK (``--systems adk``, amber14 + OBC2): a trained ``--adk-checkpoint`` is also scored on the test
split of its training MD (or ``--adk-data``), next to the constant and linear floors, so the speed
comes with the accuracy it holds at. Without ``--adk-checkpoint`` the jump machinery is timed
with an **untrained** ``--adk-model`` on the backbone atoms (8 Å radius graph; side chains and
hydrogens ride along), guards in ``warn`` mode so every jump stays a jump; the table says so and
the guard pass rate of an untrained model means nothing.

``--adk-control CHECKPOINT`` (with ``--adk-control-noise`` when the model draws stochastic jumps)
times a second checkpoint from the same MD state in the same run, with the same guards,
relaxation and redraws: a ``constant`` model trained on the same data and protocol, with a noise
fitted on its own residuals, shows what that machinery gives without a learned mean, and the
script prints the learned model's speed as a multiple of the control's.

Usage::

    python examples/benchmarks/bench_surrogate_vs_md.py --train-epochs 30 --jumps 200 \
        --json surrogate_vs_md.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from common import (
    clean_errors,
    command_line,
    first_draw_rise,
    fmt,
    machine,
    machine_table,
    markdown_table,
    motion_over_lag,
    relative_path,
    require_files,
    save_json,
    setup_logging,
    superposed_msd,
)

from integrations.propagator import DEFAULT_SETTLE_ITERATIONS

log = logging.getLogger("bench_surrogate_vs_md")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SECONDS_PER_DAY = 86400.0
MD_STEP_PS = 0.002
FRICTION_PER_PS = 1.0
TEMPERATURE_K = 300.0
TRAINABLE = ("egnn", "egno", "estag", "painet")


def ns_per_day(simulated_ps: float, wall_s: float) -> float:
    """Simulated ns per day of wall time."""
    return simulated_ps * 1e-3 / wall_s * SECONDS_PER_DAY if wall_s > 0 else float("nan")


def alanine_data(args: argparse.Namespace) -> Path:
    """Cached MD of alanine dipeptide (datagen defaults: 0.1 ps between frames)."""
    from datagen.openmm_md import run_openmm

    path = Path(args.data_dir) / f"alanine-dipeptide-{args.solvent}-{args.frames}f-seed0.h5"
    if not path.exists():
        log.info("generating %d frames of alanine dipeptide MD -> %s", args.frames, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        run_openmm("alanine-dipeptide", path, frames=args.frames, solvent=args.solvent, seed=0,
                   progress=args.progress)
    return path


def train_quick(args: argparse.Namespace, data: Path) -> tuple[Path, float]:
    """Train ``args.model`` from its example config; returns best.pt and the training seconds."""
    from surrogate_md.train import train

    config = yaml.safe_load((CONFIGS / f"{args.model}_alanine_dipeptide.yaml").read_text())
    config["data"]["path"] = str(data)
    config["train"].update({"epochs": args.train_epochs, "patience": 0,
                            "max_steps_per_epoch": args.max_steps_per_epoch})
    config["runtime"].update({"device": args.device, "progress": args.progress})
    if args.hidden:
        config["model"]["hidden"] = args.hidden
    out = Path(args.out_dir) / f"train-{args.model}-alanine-dipeptide-{args.solvent}"
    start = time.perf_counter()
    best = train(config, out, overwrite=True)
    return best, time.perf_counter() - start


def accuracy(args: argparse.Namespace, checkpoint: Path, data: Path,
             system: str = "alanine-dipeptide", rollout_jumps: int | None = None,
             max_windows: int | None = None) -> dict[str, Any]:
    """One-jump errors (with the constant and linear floors), rollout error and validity of
    ``checkpoint`` on the test split of ``data``."""
    from surrogate_md.evaluate import evaluate

    metrics = evaluate(checkpoint, data, Path(args.out_dir) / f"evaluate-{system}",
                       rollout_jumps=args.rollout_jumps if rollout_jumps is None else rollout_jumps,
                       n_rollouts=4, overwrite=True, device=args.device, plots=False,
                       max_windows=max_windows)
    name = metrics["model"]
    errors = metrics["errors"]["models"]
    out = {"model": name, "fmse_A2": errors[name]["fmse"], "amse_A2": errors[name]["amse"],
           "fmse_linear_A2": errors["linear"]["fmse"],
           "fmse_constant_A2": errors["constant"]["fmse"],
           # how far the jump ends move from their starts, the model's and the MD's (Å²/atom)
           "fmsd_A2": errors[name].get("fmsd"), "fmsd_md_A2": metrics["errors"].get("fmsd_md")}
    roll = metrics.get("rollout", {})
    if "mse_vs_time" in roll:
        out["rollout_ps"] = float(roll["times_ps"][-1])
        out["rollout_rmsd_A"] = float(np.sqrt(roll["mse_vs_time"][name][-1]))
        out["rollout_rmsd_linear_A"] = float(np.sqrt(roll["mse_vs_time"]["linear"][-1]))
        validity = roll.get("validity", {})
        out["collapsed_fraction"] = validity.get("bond_deviation_A", {}).get(
            "collapsed_fraction")
        out["clash_fraction"] = validity.get("min_nonbonded_distance_A", {}).get(
            "model_clash_fraction")
        out["h_r_mae"] = validity.get("distance_histogram", {}).get("mae")
    return out


def md_timing(prepared, platform, md_ps: float, step_ps: float = MD_STEP_PS
              ) -> tuple[dict[str, Any], Any]:
    """Time plain OpenMM MD; returns the timing and the final State (positions, velocities)."""
    import openmm
    from openmm import app, unit

    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * unit.kelvin,
                                                 FRICTION_PER_PS / unit.picosecond,
                                                 step_ps * unit.picosecond)
    integrator.setRandomNumberSeed(1)
    sim = app.Simulation(prepared.topology, prepared.system, integrator, platform)
    sim.context.setPositions(prepared.positions)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(TEMPERATURE_K * unit.kelvin, 1)
    sim.step(50)  # warm-up: kernels, neighbour lists
    n_steps = max(1, round(md_ps / step_ps))
    start = time.perf_counter()
    sim.step(n_steps)
    sim.context.getState(positions=True)  # wait for the platform to finish
    wall = time.perf_counter() - start
    simulated = n_steps * step_ps
    state = sim.context.getState(positions=True, velocities=True)
    return {"steps": n_steps, "step_fs": step_ps * 1000.0, "simulated_ps": simulated,
            "wall_s": wall,
            "ns_per_s": simulated * 1e-3 / wall, "ns_per_day": ns_per_day(simulated, wall)}, state


def radius_of_gyration_A(positions_A: np.ndarray) -> float:
    """Radius of gyration (Å, unweighted) of (n, 3) positions: whether a run compacts."""
    from surrogate_md.validity import radius_of_gyration

    return float(radius_of_gyration(positions_A))


def md_motion(data: Path, atoms: np.ndarray, jump_ps: float) -> dict[str, Any] | None:
    """How far the MD in ``data`` moves ``atoms`` over ``jump_ps``, over every window of the
    file (each frame a start): :func:`common.motion_over_lag`, to set beside a run's
    ``run_moved_A2`` and ``run_moved_internal_A2``. None where the file holds no such window."""
    from surrogate_md.data.h5md import open_trajectory

    with open_trajectory(data) as traj:
        lag = int(round(jump_ps / traj.interval_ps))
        if lag < 1 or lag >= traj.n_frames:
            return None
        x = np.asarray(traj.read(slice(None)), dtype=np.float64)[:, np.asarray(atoms)]
    return motion_over_lag(x, lag)


class KineticTemperature:
    """A reporter recording the kinetic temperature (K) of every reported state, from the
    System's degrees of freedom (OpenMM's count: massive particles, constraints, CMMotionRemover),
    and how far ``atoms`` moved since the report before (squared distance per atom, Å², as the
    evaluation's ``fmsd``: the run's own motion per jump, relaxations and noise included; and
    after superposition, its internal part, without the rigid rotation and translation), with
    the RMSD of ``atoms`` from where the run started (after superposition, Å: whether a run
    drifts), the wall-clock time of each report and the relaxation iterations since the one
    before (the engine's guards, where it has them), with the draws the last jump took and the
    energy rise (kJ/mol over the guards' reference) of its first draw where the energy check
    failed it (NaN where it passed): whether later jumps cost more because their draws start
    further up, or because the same rise takes longer to relax."""

    def __init__(self, system, every: int = 1, atoms: np.ndarray | None = None) -> None:
        from integrations.openmm_simulation import degrees_of_freedom, system_masses_amu

        self.every = int(every)  # steps between reports: one cycle (jump ends only)
        self._dof = degrees_of_freedom(system)  # as OpenMM's StateDataReporter counts
        self._masses = system_masses_amu(system)
        self._atoms = None if atoms is None else np.asarray(atoms)
        self._last: np.ndarray | None = None
        self._first: np.ndarray | None = None
        self._relaxed = 0
        self.temperatures_K: list[float] = []
        self.moved_A2: list[float] = []
        self.moved_internal_A2: list[float] = []
        self.rmsd_A: list[float] = []
        self.gyration_A: list[float] = []
        self.times_s: list[float] = []
        self.relax_iterations: list[int] = []
        self.draws: list[int] = []
        self.first_rise: list[float] = []
        self._redraws = 0

    def start(self, positions_A: np.ndarray, relax_iterations_used: int = 0,
              redraws: int = 0) -> None:
        """The state the timed run starts from (the first report's motion is measured from it),
        the guards' relaxation iterations and the engine's redraws so far."""
        if self._atoms is not None:
            self._last = self._first = np.asarray(positions_A)[self._atoms]
            self.gyration_A = [radius_of_gyration_A(self._first)]
        self._relaxed = int(relax_iterations_used)
        self._redraws = int(redraws)
        self.times_s = [time.perf_counter()]

    def describeNextReport(self, simulation) -> dict:
        # velocities (and positions) only: asking for energies would cost a force evaluation
        # per jump inside the timed loop
        include = ["velocities"] + (["positions"] if self._atoms is not None else [])
        return {"steps": self.every - simulation.currentStep % self.every, "periodic": False,
                "include": include}

    def report(self, simulation, state) -> None:
        from openmm import unit

        from integrations.guards import kinetic_temperature_K
        from integrations.openmm_simulation import kinetic_energy_kJ_per_mol

        v = state.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.picosecond)
        ke = kinetic_energy_kJ_per_mol(np.asarray(v), self._masses)
        self.temperatures_K.append(kinetic_temperature_K(ke, self._dof))
        if self._atoms is not None:
            x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
            x = x[self._atoms]
            if self._last is not None:
                self.moved_A2.append(float(((x - self._last) ** 2).sum(-1).mean()))
                self.moved_internal_A2.append(superposed_msd(x, self._last))
            if self._first is not None:
                self.rmsd_A.append(float(np.sqrt(superposed_msd(x, self._first))))
            self.gyration_A.append(radius_of_gyration_A(x))
            self._last = x
        guards = getattr(simulation, "guards", None)
        if guards is not None:
            self.relax_iterations.append(guards.relax_iterations_used - self._relaxed)
            self._relaxed = guards.relax_iterations_used
            self.draws.append(1 + simulation.n_redraws - self._redraws)
            self._redraws = simulation.n_redraws
            self.first_rise.append(first_draw_rise(simulation))
        self.times_s.append(time.perf_counter())


def surrogate_timing(prepared, platform, surrogate, state, n_jumps: int, guards: str,
                     step_ps: float = MD_STEP_PS, relax_iterations: int = 20,
                     end_velocities: str = "difference", md_steps: int = 0,
                     settle_iterations: int = DEFAULT_SETTLE_ITERATIONS,
                     jump_noise: str | None = None, redraws: int = 0) -> dict[str, Any]:
    """Time ``n_jumps`` jumps of ``SurrogateSimulation`` from ``state``; count guard results
    and the mean kinetic temperature of the kept end states. Fallback MD runs the MD
    baseline's integrator settings (``step_ps``); ``md_steps`` > 0: hybrid mode, that many MD
    steps before every jump (their time counts as simulated time); ``settle_iterations``: the
    engine's settling of the atoms the model does not predict after every jump, before the
    guards (the predicted atoms held as predicted; 0 = the rigid rebuild as it is);
    ``jump_noise``: a ``JumpNoise`` file for stochastic jumps (seeded: reproducible draws);
    ``redraws``: fresh draws a stochastic jump may take before it falls back to MD."""
    import openmm
    from openmm import unit

    from integrations.guards import GuardConfig
    from integrations.openmm_simulation import SurrogateSimulation

    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * unit.kelvin,
                                                 FRICTION_PER_PS / unit.picosecond,
                                                 step_ps * unit.picosecond)
    sim = SurrogateSimulation(prepared.topology, prepared.system, surrogate, platform=platform,
                              integrator=integrator,
                              guards=GuardConfig(action=guards,
                                                 relax_iterations=relax_iterations),
                              temperature_K=TEMPERATURE_K, end_velocities=end_velocities,
                              velocity_seed=0, md_steps=md_steps,
                              settle_iterations=settle_iterations, jump_noise=jump_noise,
                              noise_seed=0 if jump_noise else None, redraws=redraws)
    sim.context.setPositions(state.getPositions())
    sim.context.setVelocities(state.getVelocities())
    # warm-up: first graph, first energy; compiled, the second graph size compiles once more
    sim.step(2 if surrogate.compiled else 1)
    t0 = sim.context.getState().getTime().value_in_unit(unit.picosecond)
    jumps0, fallbacks0, redraws0 = sim.n_jumps, sim.n_fallbacks, sim.n_redraws
    before = sim.guard_summary()  # the warm-up jump's guard results are not timed
    # at the jump ends only (in hybrid mode a cycle is the MD segment and the jump's steps)
    kinetic = KineticTemperature(prepared.system,
                                 md_steps + sim.steps_per_jump if md_steps else 1,
                                 surrogate.model_atoms)
    kinetic.start(sim.context.getState(positions=True).getPositions(asNumpy=True)
                  .value_in_unit(unit.angstrom), sim.guards.relax_iterations_used,
                  sim.n_redraws)
    sim.reporters.append(kinetic)
    start = time.perf_counter()
    sim.step(n_jumps)
    wall = time.perf_counter() - start
    sim.reporters.remove(kinetic)
    simulated = sim.context.getState().getTime().value_in_unit(unit.picosecond) - t0
    accepted, fallbacks = sim.n_jumps - jumps0, sim.n_fallbacks - fallbacks0
    redrawn = sim.n_redraws - redraws0
    # model-only cost of one jump (no engine, no guards), on the final state
    pos = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    vel = state.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.picosecond)
    hist = None
    if surrogate.needs_history:
        hist = np.repeat(np.asarray(pos)[None], surrogate.history_length, axis=0)
    surrogate.predict(pos, vel, hist)
    repeats = max(3, min(20, n_jumps))
    t_model = time.perf_counter()
    for _ in range(repeats):
        surrogate.predict(pos, vel, hist)
    model_s = (time.perf_counter() - t_model) / repeats
    summary = sim.guard_summary()
    failures = {k: v - before["failures"].get(k, 0) for k, v in summary["failures"].items()}
    failed = summary["jumps_failed"] - before["jumps_failed"]
    # kept states that pass every guard: as predicted, or after the relax action (a failed
    # relaxation is drawn again or falls back to MD); 'warn' keeps failing jumps, which do not
    # count as passing. The guards check every draw: n_jumps + redrawn checks in all
    relaxed_kept = failed - fallbacks - redrawn if guards == "relax" else 0
    as_predicted = n_jumps + redrawn - failed
    passing = as_predicted + relaxed_kept
    return {"jumps": n_jumps, "accepted": accepted, "fallbacks": fallbacks,
            "redraws_allowed": redraws, "redrawn": redrawn,
            "passed_as_predicted": as_predicted, "relaxed_kept": relaxed_kept,
            "kept_failing": accepted - passing,
            "pass_fraction": passing / max(n_jumps, 1), "guard_action": guards,
            "end_velocities": end_velocities, "md_steps_per_jump": md_steps,
            "settle_iterations": settle_iterations,
            "mean_kinetic_temperature_K": float(np.mean(kinetic.temperatures_K)),
            # how far the model's atoms moved per jump in this run (Å² per atom, mean over the
            # jumps; hybrid mode: per cycle), to set beside the MD's fmsd of the accuracy table
            "run_moved_A2": float(np.mean(kinetic.moved_A2)) if kinetic.moved_A2 else None,
            # the same after superposing each jump's end onto its start: without the rigid
            # rotation (the protein's tumbling, much of a long jump's motion) and translation
            "run_moved_internal_A2": (float(np.mean(kinetic.moved_internal_A2))
                                      if kinetic.moved_internal_A2 else None),
            "jump_noise": relative_path(jump_noise) if jump_noise else None,
            # per jump (hybrid mode: per cycle): wall s, relaxation iterations, RMSD of the
            # model's atoms from the run's start after superposition (Å): a run that drifts
            # away from where it started, or whose jumps grow dearer as it goes, shows here
            "per_jump": {"wall_s": np.diff(kinetic.times_s).tolist(),
                         "relax_iterations": kinetic.relax_iterations,
                         "draws": kinetic.draws,
                         "first_draw_rise_kJ_per_mol": kinetic.first_rise,
                         "rmsd_from_start_A": kinetic.rmsd_A,
                         # the model's atoms' radius of gyration, at the start and after each
                         # jump (Å, unweighted): a run that compacts the molecule shows here
                         "radius_of_gyration_A": kinetic.gyration_A},
            "guard_failures": {k: v for k, v in failures.items() if v},
            "relaxations": summary["relaxations"] - before["relaxations"],
            "relax_iterations_used": (summary["relax_iterations_used"]
                                      - before["relax_iterations_used"]),
            # settled jump ends and the settle stages they reached, in iterations (staged: the
            # first stage that passes the energy check; budgets, a stage may stop earlier)
            "settled": summary["settled"] - before["settled"],
            "settle_iterations_used": (summary["settle_iterations_used"]
                                       - before["settle_iterations_used"]),
            "simulated_ps": simulated, "wall_s": wall,
            "ns_per_s": simulated * 1e-3 / wall, "ns_per_day": ns_per_day(simulated, wall),
            "model_only_s_per_jump": model_s,
            "model_only_ns_per_day": ns_per_day(surrogate.jump_ps, model_s)}


def adk_untrained_checkpoint(args: argparse.Namespace, prepared, out: Path) -> Path:
    """A checkpoint of an untrained ``args.adk_model`` on the AdK backbone (timing only)."""
    import openmm
    from openmm import unit

    from datagen.openmm_md import topology_from_openmm
    from surrogate_md.checkpoint import build_payload, save_checkpoint
    from surrogate_md.data.selection import select_nodes
    from surrogate_md.data.windows import GraphBuilder, GraphSpec, Protocol
    from surrogate_md.models import build_model
    from surrogate_md.validity import ValidityReference

    topo = topology_from_openmm(prepared.topology, prepared.system)
    sel = select_nodes(topo, "backbone")
    pos = np.asarray(prepared.positions.value_in_unit(unit.angstrom))
    nodes = sel.gather(pos[None])
    bonded = GraphBuilder.for_selection(GraphSpec(kind="bonds", two_hop=False), sel, topo.bonds,
                                        nodes[0])
    graph = GraphBuilder(GraphSpec(kind="radius", cutoff_A=8.0), bonded.bonds, sel.n_nodes)
    validity = ValidityReference.from_frames(pos[None, sel.atom_index], bonded.bonds)
    options = {"n_history": 10} if args.adk_model == "estag" else {}
    if args.hidden:
        options["hidden"] = args.hidden
    if args.layers and args.adk_model != "painet":
        options["n_layers"] = args.layers
    net = build_model(args.adk_model, options)
    jump_frames, n_out, interval_ps = 4, 4, 1.0  # EGNO AdK-like: P = 4 outputs over 4 ps
    net.set_normalisation(velocity_scale=3.0, displacement_scale=0.5,
                          time_scale=jump_frames * interval_ps)
    proto = Protocol("s2t", jump_frames, n_out)
    protocol = {**proto.to_dict(), "interval_ps": interval_ps,
                "jump_ps": jump_frames * interval_ps,
                "times_ps": (proto.out_frames * interval_ps).tolist(),
                "history_stride_ps": interval_ps, "velocity_source": "file"}
    payload = build_payload(net, protocol=protocol, selection=sel, graph=graph, topology=topo,
                            validity=validity,
                            provenance={"note": "untrained, timing only",
                                        "openmm": openmm.__version__})
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, payload)


def adk_data(args: argparse.Namespace, surrogate, checkpoint: Path) -> Path | None:
    """The AdK MD to score ``checkpoint`` on: ``--adk-data``, else the file it was trained on if
    it is still there (None: no accuracy row)."""
    if args.adk_data:
        return Path(args.adk_data)
    data_config = surrogate.meta.get("provenance", {}).get("data_config") or {}
    paths = data_config.get("path") or []
    paths = [paths] if isinstance(paths, str) else paths
    if len(paths) == 1 and Path(paths[0]).exists():
        return Path(paths[0])
    log.info("adk: the training data of %s is not here; pass --adk-data to score it", checkpoint)
    return None


def check_control(surrogate, control, path: str | Path) -> None:
    """Refuse a control checkpoint that does not jump the same atoms over the same time as the
    model it is set beside (its speed would compare different jumps)."""
    from surrogate_md.errors import CheckpointError

    if (control.jump_ps != surrogate.jump_ps
            or not np.array_equal(control.model_atoms, surrogate.model_atoms)
            or control.n_atoms != surrogate.n_atoms):
        raise CheckpointError(
            f"{path}: the control ({control.name}, {control.n_model_atoms} of {control.n_atoms} "
            f"atoms, {fmt(control.jump_ps)} ps jumps) does not jump what the model does "
            f"({surrogate.name}, {surrogate.n_model_atoms} of {surrogate.n_atoms} atoms, "
            f"{fmt(surrogate.jump_ps)} ps); train it on the model's data and protocol "
            "(python -m surrogate_md.train --config <the model's config.yaml> --set "
            "model.name=constant, with --set model.<option>=null for each of the model's "
            "other options)")


def passing_cell(s: dict[str, Any]) -> str:
    """'92.5% (37/40: 10 as predicted, 27 after relaxing, 12 iterations each; 3 fell back)'."""
    passing = round(s["pass_fraction"] * s["jumps"])
    parts = [f"{s['passed_as_predicted']} as predicted"]
    if s.get("relaxed_kept"):
        parts.append(f"{s['relaxed_kept']} after relaxing, {fmt(relax_each(s))} iterations each")
    tail = []
    if s.get("redrawn"):
        n = s["redrawn"]
        tail.append(f"{n} failed draw{'s' if n != 1 else ''} drawn again")
    if s["fallbacks"]:
        tail.append(f"{s['fallbacks']} fell back to MD")
    if s.get("kept_failing"):
        tail.append(f"{s['kept_failing']} kept although failing")
    if s.get("settled"):  # every settled jump end, whatever the guards made of it
        tail.append(f"rebuilt atoms settled to {fmt(s['settle_iterations_used'] / s['settled'])}"
                    " iterations on average")
    return (f"{100 * s['pass_fraction']:.1f}% ({passing}/{s['jumps']}: " + ", ".join(parts)
            + ("; " + ", ".join(tail) if tail else "") + ")")


def relax_each(timing: dict[str, Any]) -> float | None:
    """Mean minimiser iterations per relaxation of a surrogate timing (None without any)."""
    n = timing.get("relaxations") or 0
    return timing["relax_iterations_used"] / n if n else None


def run_system(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from datagen.openmm_md import choose_platform, prepare_system
    from surrogate_md import Surrogate

    row: dict[str, Any] = {"system": name}
    solvent = args.solvent if name == "alanine-dipeptide" else "implicit"
    adk = name == "adk"
    cutoff = args.adk_cutoff_nm if adk and args.adk_cutoff_nm > 0 else None
    hmr = adk and args.adk_hmr
    prepared = prepare_system(name, solvent=solvent, cutoff_nm=cutoff, hmr=hmr)
    step_ps = 0.004 if hmr else MD_STEP_PS
    n_atoms = prepared.system.getNumParticles()
    platform = choose_platform(args.platform, n_atoms, solvent)
    row.update({"atoms": n_atoms, "solvent": solvent, "platform": platform.getName(),
                "cutoff_nm": cutoff, "hmr": hmr})
    if name == "alanine-dipeptide":
        data = alanine_data(args)
        if args.checkpoint:
            checkpoint, row["train_s"] = Path(args.checkpoint), None
        else:
            checkpoint, row["train_s"] = train_quick(args, data)
        row["trained"] = True
        row["accuracy"] = accuracy(args, checkpoint, data)
        md_ps, n_jumps, guards = args.md_ps, args.jumps, args.guards
    else:
        if args.adk_checkpoint:
            checkpoint, row["trained"], guards = Path(args.adk_checkpoint), True, args.guards
        else:
            checkpoint = adk_untrained_checkpoint(
                args, prepared, Path(args.out_dir) / f"adk-untrained-{args.adk_model}.pt")
            row["trained"], guards = False, "warn"
        md_ps, n_jumps = args.adk_md_ps, args.adk_jumps
    surrogate = Surrogate.load(checkpoint, device=args.device)
    if adk:
        data = adk_data(args, surrogate, checkpoint) if row["trained"] else None
        if data is not None:
            row["accuracy"] = accuracy(args, checkpoint, data, "adk", rollout_jumps=0,
                                       max_windows=args.adk_eval_windows)
    if data is not None:  # the MD's own motion over a jump, as it is and superposed
        row["md_motion"] = md_motion(data, surrogate.model_atoms, surrogate.jump_ps)
    row["model"] = surrogate.name
    row["model_config"] = surrogate.meta["model"]["config"]
    row["jump_ps"] = surrogate.jump_ps
    row["model_atoms"] = surrogate.n_model_atoms
    log.info("%s: timing %.3g ps of MD on %s", name, md_ps, platform.getName())
    row["md"], state = md_timing(prepared, platform, md_ps, step_ps)
    log.info("%s: timing %d jumps of %s (%g ps each)", name, n_jumps, surrogate.name,
             surrogate.jump_ps)
    row["surrogate"] = surrogate_timing(prepared, platform, surrogate, state, n_jumps, guards,
                                        step_ps, args.relax_iterations, args.end_velocities,
                                        args.md_steps, args.settle_iterations,
                                        args.adk_jump_noise if adk else None,
                                        args.adk_redraws if adk else 0)
    row["speedup"] = row["surrogate"]["ns_per_s"] / row["md"]["ns_per_s"]
    if args.compile:  # the same jumps from the same state, the model through torch.compile
        compiled = Surrogate.load(checkpoint, device=args.device, compile=True)
        log.info("%s: timing %d jumps of %s compiled", name, n_jumps, surrogate.name)
        row["surrogate_compiled"] = surrogate_timing(
            prepared, platform, compiled, state, n_jumps, guards, step_ps,
            args.relax_iterations, args.end_velocities, args.md_steps, args.settle_iterations,
            args.adk_jump_noise if adk else None, args.adk_redraws if adk else 0)
        row["surrogate_compiled"]["compiled"] = compiled.compiled  # False: compiling failed
        row["speedup_compiled"] = row["surrogate_compiled"]["ns_per_s"] / row["md"]["ns_per_s"]
    if adk and args.adk_control:  # the same machinery and draws around a copy of the input
        control = Surrogate.load(Path(args.adk_control), device=args.device)
        check_control(surrogate, control, args.adk_control)
        log.info("%s: timing %d jumps of the control %s", name, n_jumps, control.name)
        row["control"] = surrogate_timing(
            prepared, platform, control, state, n_jumps, guards, step_ps,
            args.relax_iterations, args.end_velocities, args.md_steps, args.settle_iterations,
            args.adk_control_noise, args.adk_redraws if args.adk_control_noise else 0)
        row["control"].update(model=control.name, checkpoint=relative_path(args.adk_control))
        row["speedup_control"] = row["control"]["ns_per_s"] / row["md"]["ns_per_s"]
    return row


@clean_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI)")
    parser.add_argument("--systems", nargs="+", default=["alanine-dipeptide"],
                        choices=["alanine-dipeptide", "adk"])
    parser.add_argument("--solvent", default="vacuum", choices=["vacuum", "implicit"],
                        help="alanine dipeptide solvent (AdK always runs in implicit solvent)")
    parser.add_argument("--checkpoint", default=None, help="alanine dipeptide checkpoint")
    parser.add_argument("--model", default="egno", choices=TRAINABLE,
                        help="model trained when no --checkpoint is given")
    parser.add_argument("--train-epochs", type=int, default=30)
    parser.add_argument("--max-steps-per-epoch", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=None,
                        help="override the model width (trained here, or untrained AdK)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of an untrained AdK EGNN/EGNO/ESTAG (default: the model's)")
    parser.add_argument("--frames", type=int, default=5000,
                        help="alanine dipeptide MD frames (0.1 ps apart) for training")
    parser.add_argument("--rollout-jumps", type=int, default=20)
    parser.add_argument("--jumps", type=int, default=200, help="timed surrogate jumps")
    parser.add_argument("--md-ps", type=float, default=100.0, help="timed MD (ps)")
    parser.add_argument("--guards", default="fallback", choices=["fallback", "relax", "warn"])
    parser.add_argument("--relax-iterations", type=int, default=20,
                        help="most minimiser iterations of one --guards relax (it stops at the "
                             "first state that passes the guards back at the median energy; "
                             "each costs about one MD step's forces, more with line searches)")
    parser.add_argument("--end-velocities", default="difference",
                        choices=["difference", "thermal"],
                        help="velocities of each kept jump's end state (the next jump's input): "
                             "backward differences or Maxwell-Boltzmann draws")
    parser.add_argument("--md-steps", type=int, default=0,
                        help="hybrid mode: MD steps (of the MD row's integrator) before every "
                             "jump; their time counts as simulated time (default 0: jumps only)")
    parser.add_argument("--settle-iterations", type=int, default=DEFAULT_SETTLE_ITERATIONS,
                        help="minimiser iterations that settle the atoms the model does not "
                             "predict after every jump, the predicted atoms held, before the "
                             "guards (SurrogateSimulation's settle_iterations; 0: the rigid "
                             "rebuild as it is; default %(default)s)")
    parser.add_argument("--adk-checkpoint", default=None)
    parser.add_argument("--adk-jump-noise", default=None, metavar="NOISE.npz",
                        help="stochastic AdK jumps: the JumpNoise of --adk-checkpoint (python -m "
                             "surrogate_md.evaluate CKPT --data DATA --split val --noise-out "
                             "NOISE.npz), draws seeded with 0")
    parser.add_argument("--adk-redraws", type=int, default=0, metavar="N",
                        help="with --adk-jump-noise: a draw that would fall back to MD is drawn "
                             "again, up to N times per jump (default 0)")
    parser.add_argument("--adk-control", default=None, metavar="CHECKPOINT",
                        help="also time this checkpoint's jumps from the same MD state, in the "
                             "same run (a constant model on the same data: what the guards, "
                             "the relaxation and the drawn noise give without a learned mean)")
    parser.add_argument("--adk-control-noise", default=None, metavar="NOISE.npz",
                        help="the control's own jump noise (fitted on the same data as "
                             "--adk-jump-noise; needed when that is given)")
    parser.add_argument("--adk-model", default="egno", choices=TRAINABLE)
    parser.add_argument("--adk-jumps", type=int, default=5)
    parser.add_argument("--adk-md-ps", type=float, default=0.1)
    parser.add_argument("--adk-data", default=None,
                        help="AdK MD to score --adk-checkpoint on (default: its training data)")
    parser.add_argument("--adk-eval-windows", type=int, default=60,
                        help="test windows scored for the AdK accuracy row")
    parser.add_argument("--adk-cutoff-nm", type=float, default=1.2,
                        help="AdK nonbonded/GB cutoff (0: none, exact and ~3x slower)")
    parser.add_argument("--adk-hmr", action=argparse.BooleanOptionalAction, default=True,
                        help="AdK MD with hydrogen mass repartitioning and 4 fs steps")
    parser.add_argument("--platform", default="auto",
                        choices=["auto", "Reference", "CPU", "CUDA", "OpenCL"])
    parser.add_argument("--device", default="auto", help="torch device of the surrogate")
    parser.add_argument("--compile", action="store_true",
                        help="also time the surrogate with its model through torch.compile, "
                             "side by side from the same state (compiled before the timed "
                             "jumps)")
    parser.add_argument("--data-dir", default="bench_data")
    parser.add_argument("--out-dir", default="bench_runs/surrogate_vs_md")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.md_steps < 0:
        parser.error(f"--md-steps must be >= 0 (0: jumps only), got {args.md_steps}")
    if args.settle_iterations < 0:
        parser.error(f"--settle-iterations must be >= 0 (0: no settling), got "
                     f"{args.settle_iterations}")
    setup_logging()
    require_files(checkpoint=args.checkpoint, adk_checkpoint=args.adk_checkpoint,
                  adk_jump_noise=args.adk_jump_noise)
    if args.adk_redraws and not args.adk_jump_noise:
        parser.error("--adk-redraws draws stochastic jumps again: give --adk-jump-noise")
    require_files(adk_control=args.adk_control, adk_control_noise=args.adk_control_noise)
    if args.adk_control_noise and not args.adk_control:
        parser.error("--adk-control-noise is the control's noise: give --adk-control")
    if args.adk_control and args.adk_jump_noise and not args.adk_control_noise:
        parser.error("the model draws stochastic jumps (--adk-jump-noise): give the control its "
                     "own noise too (--adk-control-noise, from python -m surrogate_md.evaluate "
                     "CONTROL.pt --split train --noise-out NOISE.npz with the model's noise "
                     "options), else the two rows compare different machinery")
    if args.adk_jump_noise and not args.adk_checkpoint:
        parser.error("--adk-jump-noise is the noise of a trained model: give --adk-checkpoint")
    if args.quick:
        args.frames = min(args.frames, 400)
        args.train_epochs, args.max_steps_per_epoch = 1, 3
        args.hidden = args.hidden or 16
        args.rollout_jumps, args.jumps, args.md_ps = 2, 3, 0.2
        args.adk_jumps, args.adk_md_ps = 1, 0.004
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    args.device = device
    info = machine(device)
    command = command_line(__file__, argv)
    start = time.perf_counter()
    rows = [run_system(args, name) for name in args.systems]
    results = {"machine": info, "command": command, "quick": args.quick, "systems": rows,
               "wall_seconds": time.perf_counter() - start}

    body = []
    for r in rows:
        s, m = r["surrogate"], r["md"]
        label = r["model"] + ("" if r["trained"] else " (untrained: timing only)")
        md_label = f"OpenMM MD ({fmt(m['step_fs'])} fs Langevin" + (
            ", HMR" if r.get("hmr") else "") + (
            f", {fmt(r['cutoff_nm'])} nm cutoff" if r.get("cutoff_nm") else "") + ")"
        # the MD's own motion over one jump, from its data (the accuracy table's)
        md_moved = (r.get("accuracy") or {}).get("fmsd_md_A2")
        body.append([r["system"], r["atoms"], r["platform"], md_label,
                     fmt(m["simulated_ps"]), fmt(m["wall_s"]), fmt(m["ns_per_s"]),
                     fmt(m["ns_per_day"]), "-", fmt(md_moved) if md_moved else "-", "1"])
        body.append([r["system"], r["atoms"], r["platform"],
                     f"{label}, jump {fmt(r['jump_ps'])} ps, guards {s['guard_action']}"
                     + (f", {s['md_steps_per_jump']} MD steps before each"
                        if s.get("md_steps_per_jump") else "")
                     + (", stochastic jumps" if s.get("jump_noise") else ""),
                     fmt(s["simulated_ps"]), fmt(s["wall_s"]), fmt(s["ns_per_s"]),
                     fmt(s["ns_per_day"]),
                     passing_cell(s), fmt(s.get("run_moved_A2")),
                     fmt(r["speedup"])])
        if r.get("control"):
            c = r["control"]
            body.append([r["system"], r["atoms"], r["platform"],
                         f"{c['model']} (control: copies its input), jump "
                         f"{fmt(r['jump_ps'])} ps, guards {c['guard_action']}"
                         + (", stochastic jumps" if c.get("jump_noise") else ""),
                         fmt(c["simulated_ps"]), fmt(c["wall_s"]), fmt(c["ns_per_s"]),
                         fmt(c["ns_per_day"]), passing_cell(c), fmt(c.get("run_moved_A2")),
                         fmt(r["speedup_control"])])
        runs = [("", s, r["speedup"])]
        if r.get("surrogate_compiled"):
            c = r["surrogate_compiled"]
            runs.append((", compiled" if c.get("compiled") else ", compile failed: eager", c,
                         r["speedup_compiled"]))
        for i, (tag, t, speedup) in enumerate(runs):
            if i:
                body.append([r["system"], r["atoms"], r["platform"],
                             f"{label}{tag}, jump {fmt(r['jump_ps'])} ps, guards "
                             f"{t['guard_action']}", fmt(t["simulated_ps"]), fmt(t["wall_s"]),
                             fmt(t["ns_per_s"]), fmt(t["ns_per_day"]), passing_cell(t),
                             fmt(t.get("run_moved_A2")), fmt(speedup)])
            body.append([r["system"], r["atoms"], "-", f"{r['model']}{tag} model only (predict)",
                         fmt(r["jump_ps"]), fmt(t["model_only_s_per_jump"]),
                         fmt(r["jump_ps"] * 1e-3 / t["model_only_s_per_jump"]),
                         fmt(t["model_only_ns_per_day"]), "-", "-",
                         fmt(r["jump_ps"] * 1e-3 / t["model_only_s_per_jump"] / m["ns_per_s"])])
    speed = markdown_table(["system", "atoms", "platform", "engine", "simulated (ps)",
                            "wall (s)", "ns/s", "ns/day", "jumps passing guards",
                            "model atoms moved per jump (Å²)", "speed-up vs MD"], body)
    acc_rows = []
    for r in rows:
        a = r.get("accuracy")
        if a:
            acc_rows.append([r["system"], a["model"], fmt(r.get("jump_ps")), fmt(r.get("train_s")),
                             fmt(a["fmse_A2"]), fmt(a["fmse_constant_A2"]),
                             fmt(a["fmse_linear_A2"]),
                             f"{fmt(a.get('fmsd_A2'))} / {fmt(a.get('fmsd_md_A2'))}", fmt(a.get("rollout_ps")),
                             fmt(a.get("rollout_rmsd_A")), fmt(a.get("rollout_rmsd_linear_A")),
                             fmt(a.get("collapsed_fraction")), fmt(a.get("clash_fraction")),
                             fmt(a.get("h_r_mae"))])
    print("# Surrogate vs MD: simulated time per wall-clock second\n")
    print(machine_table(info, command) + "\n")
    print(speed + "\n")
    if acc_rows:
        print("## Accuracy the speed holds at (test split, `surrogate_md.evaluate`)\n")
        print(markdown_table(["system", "model", "jump (ps)", "train (s)", "one-jump F-MSE (Å²)",
                              "constant F-MSE (Å²)", "linear F-MSE (Å²)",
                              "moves atoms, model / MD (Å²)", "rollout (ps)",
                              "rollout RMSD (Å)", "linear rollout RMSD (Å)", "collapsed frames",
                              "clash frames", "h(r) MAE"], acc_rows) + "\n")
        print("Errors: Å² per atom, squared distance summed over xyz, averaged over atoms; "
              "RMSD = sqrt of that at the end of the rollout. Moves atoms: squared distance of "
              "the jump's end from its start, per atom, the model's and the MD's; a model far "
              "below the MD copies its input more than it propagates, and its jumps pass the "
              "guards for that reason.\n")
    for r in rows:
        if r.get("control"):
            print(f"{r['system']}: the learned model's jumps run at "
                  f"{fmt(r['speedup'] / r['speedup_control'])}× the control's simulated time "
                  f"per second ({fmt(relax_each(r['surrogate']))} against "
                  f"{fmt(relax_each(r['control']))} relaxation iterations per relaxed jump); "
                  "below 1 the learned mean costs more than copying the input.\n")
    if any(not r["trained"] for r in rows):
        print("Untrained models time the jump machinery only (model, reconstruction of the "
              "riding atoms, guards, energy); their guard pass rate means nothing.\n")
    print(f"wall time {results['wall_seconds']:.1f} s")
    if args.json_path:
        save_json(args.json_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
