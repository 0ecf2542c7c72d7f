"""What the ``relax`` guard action costs per strained jump end, scheme against scheme.

For ``--starts`` MD frames of the data a checkpoint was trained on (spread over the last
``--from-fraction`` of the trajectory: with the benchmarks' blocked split, the test block), one
jump of the checkpoint (stochastic with ``--jump-noise``, seeded), its rebuilt atoms settled as
the engines settle them, is put into a Context of the dataset's own force field with its
constraints applied, as an engine holds a jump end. The ends that fail the guards
(``--every-end``: all) are relaxed by the engines'
:func:`~integrations.openmm_simulation.relax_until_accepted` (the guards' relaxation target:
back at the reference energy, every check passing; at most ``--relax-iterations`` L-BFGS
iterations in all) in three schemes, side by side on the same states and in the same process:

- the full force field alone (``first_iterations=0, round_iterations=0``);
- a solvent-free stage aimed at the excess, then the full force field (``round_iterations=0``
  with no cap on the first stage: the scheme before solvent-free rounds);
- the engines' default: a capped solvent-free stage, then solvent-free rounds each judged once in
  the full force field, then the full force field.

The reference energy is the median of the 10 MD frames up to the start (the guards' window), the
same for every scheme. Each scheme relaxes in its own :class:`Relaxation` (its drop-ratio
history its own, as in an engine run). Without implicit solvent the three schemes are the same.

Usage::

    python examples/benchmarks/bench_relaxation.py --checkpoint adk.pt --data adk.h5 \\
        --jump-noise noise.npz --starts 12 --json relaxation.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    clean_errors,
    command_line,
    fmt,
    machine,
    machine_table,
    markdown_table,
    relative_path,
    require_files,
    save_json,
    setup_logging,
)

from integrations.guards import GuardConfig
from integrations.propagator import DEFAULT_SETTLE_ITERATIONS

log = logging.getLogger("bench_relaxation")

WINDOW = 10  # MD frames up to the start whose median energy is the reference (as the guards)
#: (name, first_iterations, round_iterations); None: the engines' default, "budget": no cap
SCHEMES = (("full force field only", 0, 0),
           ("solvent-free stage, then full", "budget", 0),
           ("solvent-free rounds (default)", None, None))


def strained_ends(sur, traj, energy, starts: np.ndarray, settle_iterations: int,
                  jump_noise: str | None, noise_seed: int, progress: bool
                  ) -> tuple[list[np.ndarray], list[float]]:
    """Jump ends (n_atoms, 3) Å, one per start frame, with the rebuilt atoms settled, and the
    reference energies (kJ/mol, median of the MD window up to each start)."""
    from tqdm.auto import tqdm

    from integrations.openmm_simulation import Relaxation
    from integrations.propagator import SurrogatePropagator

    settler = None
    if settle_iterations and sur.n_model_atoms < traj.n_atoms:
        settler = Relaxation(energy.context.getSystem(), energy.context.getPlatform(),
                             restrained_atoms=sur.model_atoms)
    box = energy.context.getState().getPeriodicBoxVectors()
    prop = SurrogatePropagator(sur, jump_noise=jump_noise,
                               noise_seed=noise_seed if jump_noise else None)
    ends, references = [], []
    for s in tqdm(starts.tolist(), desc="jumps", disable=not progress, leave=False):
        window = traj.read(np.arange(s - WINDOW + 1, s + 1))
        references.append(float(np.median([energy(f) for f in window])))
        end = prop.jump(window[-1], traj.read(np.array([s]), "velocities")[0], 0.0)
        end = end.positions_A[-1]
        if settler is not None:
            end = settler.settle(end, box, settle_iterations)
        ends.append(end)
    return ends, references


def failing(sur, energy, ends: list[np.ndarray], references: list[float],
            temperature_K: float) -> list[int]:
    """Indices of the ends that fail the guards (with their constraints applied), as an engine
    would hand them to the relax action."""
    from openmm import unit

    from integrations.guards import GuardConfig, Guards
    from integrations.openmm_simulation import degrees_of_freedom

    context = energy.context
    n_dof = degrees_of_freedom(context.getSystem())
    out = []
    for k, (end, ref) in enumerate(zip(ends, references)):
        guards = Guards(sur, GuardConfig(action="relax"), n_dof=n_dof,
                        temperature_K=temperature_K)
        guards.record_energy(ref)
        context.setPositions(np.asarray(end, dtype=np.float64) * 0.1)
        context.applyConstraints(1e-5)
        state = context.getState(getPositions=True, getEnergy=True)
        x = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        if guards.check(np.asarray(x), energy_kJ_per_mol=e, count=False):
            out.append(k)
    return out


def relax_all(sur, energy, ends: list[np.ndarray], references: list[float],
              relax_iterations: int, temperature_K: float, progress: bool
              ) -> list[dict[str, Any]]:
    """Every end relaxed in every scheme: per scheme, per end, the rise before, the seconds,
    iterations, rise after (kJ/mol over the reference) and whether the guards accept it."""
    from openmm import unit
    from tqdm.auto import tqdm

    from integrations.guards import GuardConfig, Guards
    from integrations.openmm_simulation import (
        Relaxation,
        degrees_of_freedom,
        relax_until_accepted,
    )

    context = energy.context
    system, platform = context.getSystem(), context.getPlatform()
    n_dof = degrees_of_freedom(system)
    config = GuardConfig(action="relax", relax_iterations=relax_iterations)
    out = []
    for name, first, rounds in SCHEMES:
        relaxation = Relaxation(system, platform)
        first = relax_iterations if first == "budget" else first
        runs = []
        for k, (end, ref) in enumerate(tqdm(list(zip(ends, references)), desc=name,
                                            disable=not progress, leave=False)):
            guards = Guards(sur, config, n_dof=n_dof, temperature_K=temperature_K)
            guards.record_energy(ref)
            context.setPositions(np.asarray(end, dtype=np.float64) * 0.1)
            context.applyConstraints(1e-5)
            before = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
                unit.kilojoule_per_mole)
            t0 = time.perf_counter()
            _, after, events = relax_until_accepted(relaxation, context, guards, k, 0.0, before,
                                                    first_iterations=first,
                                                    round_iterations=rounds)
            seconds = time.perf_counter() - t0
            runs.append({"rise_before": before - ref, "seconds": seconds,
                         "iterations": guards.relax_iterations_used,
                         "rise_after": after - ref, "accepted": not events,
                         "failed_checks": sorted({e.check for e in events})})
        out.append({"scheme": name, "first_iterations": first, "round_iterations": rounds,
                     "runs": runs,
                     "accepted": int(sum(r["accepted"] for r in runs)),
                     "seconds": float(np.mean([r["seconds"] for r in runs])),
                     "iterations": float(np.mean([r["iterations"] for r in runs])),
                     "rise_after_median": float(np.median([r["rise_after"] for r in runs]))})
    base = out[0]["seconds"]
    for row in out:
        row["speedup_vs_full"] = base / row["seconds"] if row["seconds"] > 0 else None
    return out


@clean_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny alanine-dipeptide MD in implicit solvent and a briefly "
                             "trained EGNO made here (seconds, for CI)")
    parser.add_argument("--checkpoint", default=None,
                        help="a trained surrogate (with --data: the datagen MD it learned)")
    parser.add_argument("--data", default=None, help="datagen MD of a built-in system")
    parser.add_argument("--jump-noise", default=None, metavar="NOISE.npz",
                        help="stochastic jumps: the checkpoint's JumpNoise (python -m "
                             "surrogate_md.evaluate ... --noise-out)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--starts", type=int, default=12, help="start frames")
    parser.add_argument("--from-fraction", type=float, default=0.2,
                        help="starts spread over this last fraction of the trajectory")
    parser.add_argument("--relax-iterations", type=int,
                        default=GuardConfig.relax_iterations,
                        help="most L-BFGS iterations per relaxation, all stages together "
                             "(default %(default)s, the guards')")
    parser.add_argument("--settle-iterations", type=int, default=DEFAULT_SETTLE_ITERATIONS,
                        help="the engines' settling of the rebuilt atoms after the jump "
                             "(default %(default)s, the engines')")
    parser.add_argument("--every-end", action="store_true",
                        help="relax every jump end, also those that pass the guards (default: "
                             "the failing ones, as an engine; --quick relaxes every end)")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K, for the energy guard's threshold")
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--data-dir", default="bench_data")
    parser.add_argument("--out-dir", default="bench_runs/relaxation")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if not args.quick and not (args.checkpoint and args.data):
        parser.error("give --checkpoint and --data (or --quick)")
    if not 0 < args.from_fraction <= 1 or args.starts < 1 or args.relax_iterations < 1:
        parser.error("--from-fraction must be in (0, 1], --starts and --relax-iterations >= 1")
    require_files(checkpoint=args.checkpoint, data=args.data, jump_noise=args.jump_noise)
    setup_logging()
    from bench_chained_jumps import quick_checkpoint
    from bench_validity import ReferenceEnergy, alanine_data

    from integrations.openmm_simulation import IMPLICIT_SOLVENT_FORCES
    from surrogate_md import Surrogate
    from surrogate_md.data.h5md import open_trajectory

    info = machine("cpu")
    command = command_line(__file__, argv)
    start = time.perf_counter()
    if args.quick:
        args.solvent, args.frames, args.every_end = "implicit", 60, True
        data = alanine_data(args)
        checkpoint = quick_checkpoint(data, Path(args.out_dir))
    else:
        data, checkpoint = Path(args.data), Path(args.checkpoint)
    sur = Surrogate.load(checkpoint)
    with open_trajectory(data) as traj:
        energy, why = ReferenceEnergy.from_trajectory(traj, args.platform)
        if energy is None:
            parser.error(f"{data}: {why}; give datagen MD of a built-in system")
        if sur.needs_history:
            parser.error(f"{checkpoint}: needs a state-to-trajectory model (no history)")
        first = max(WINDOW - 1, int((1 - args.from_fraction) * traj.n_frames))
        last = traj.n_frames - 1
        starts = np.unique(np.linspace(first, last, args.starts).round().astype(int))
        log.info("%d jumps of %s from %s", len(starts), checkpoint, data)
        ends, references = strained_ends(sur, traj, energy, starts, args.settle_iterations,
                                         args.jump_noise, args.noise_seed, args.progress)
        failed = failing(sur, energy, ends, references, args.temperature)
        log.info("%d of %d ends fail the guards", len(failed), len(ends))
        relaxed = list(range(len(ends))) if args.every_end else failed
        if not relaxed:
            parser.error(f"no jump end of {checkpoint} fails the guards: nothing to relax "
                         f"(--every-end relaxes them all)")
        ends, references = [ends[k] for k in relaxed], [references[k] for k in relaxed]
        solvent_free = any(type(f).__name__ in IMPLICIT_SOLVENT_FORCES
                           for f in energy.context.getSystem().getForces())
        rows = relax_all(sur, energy, ends, references, args.relax_iterations,
                         args.temperature, args.progress)
        info["platform"] = energy.context.getPlatform().getName()
        label = energy.label
    results = {"machine": info, "command": command, "quick": args.quick,
               "checkpoint": relative_path(checkpoint), "data": relative_path(data),
               "jump_noise": relative_path(args.jump_noise) if args.jump_noise else None,
               "system": label, "starts": starts.tolist(), "jump_ps": sur.jump_ps,
               "failing_starts": starts[failed].tolist(),
               "relaxed_starts": starts[relaxed].tolist(),
               "model_atoms": int(sur.n_model_atoms), "relax_iterations": args.relax_iterations,
               "settle_iterations": args.settle_iterations, "implicit_solvent": solvent_free,
               "rows": rows, "wall_seconds": time.perf_counter() - start}
    rises = [r["rise_before"] for r in rows[0]["runs"]]
    print("# Relaxing strained jump ends: the relax guard action's schemes\n")
    print(machine_table(info, command))
    print(f"\nsystem: {label}; platform {info['platform']}; {len(starts)} "
          f"{'stochastic ' if args.jump_noise else ''}{fmt(sur.jump_ps)} ps jumps of "
          f"{sur.n_model_atoms} model atoms, {len(failed)} failing the guards, {len(relaxed)} "
          f"relaxed; rise before relaxing (kJ/mol over the MD median) "
          f"{fmt(float(np.median(rises)))} ({fmt(min(rises))} – {fmt(max(rises))}); at most "
          f"{args.relax_iterations} iterations"
          + ("" if solvent_free else "; no implicit solvent: the schemes are the same") + "\n")
    header = ["scheme", "accepted", "iterations per end", "seconds per end",
              "rise after (kJ/mol, median)", "speed-up vs full force field only"]
    body = [[r["scheme"], f"{r['accepted']}/{len(r['runs'])}", fmt(r["iterations"]),
             fmt(r["seconds"]), fmt(r["rise_after_median"]), fmt(r["speedup_vs_full"])]
            for r in rows]
    print(markdown_table(header, body))
    print(f"\nwall time {results['wall_seconds']:.1f} s")
    if args.json_path:
        save_json(args.json_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
