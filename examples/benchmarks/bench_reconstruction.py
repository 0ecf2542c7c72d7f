"""What rebuilding the unpredicted atoms costs in energy, and what relaxing it away costs in time.

A surrogate that predicts some atoms (backbone, heavy atoms) hands the engine full-system states
whose other atoms ``integrations.reconstruct.Reconstructor`` carried rigidly from the start of the
jump. This benchmark measures that step alone, with an **oracle** in place of the model: for MD
frames ``t`` (start) and ``t + lag`` (target) of a ``datagen`` run of a built-in system, the
selected atoms are put at their *true* target positions and the others rebuilt. Per selection and
lag it reports the potential-energy rise over the median of the 10 MD frames up to ``t`` (the
guards' reference) of the true target frame, of the rebuilt frame, and of the rebuilt frame with
the System's constraints applied, against the default energy guard ``8 kT sqrt(n_dof / 2)``; then
the cost of relaxing the rebuilt frame back to the median energy (L-BFGS stopped as soon as the
energy is there) with OpenMM's minimiser on the engine's System (constraints enforced by the
minimiser), on ``integrations.openmm_simulation.Relaxation`` (constraints as stiff bonds,
re-applied after), and, with implicit solvent, in two stages (the flexible copy without the
solvent force first, then the full one if needed: the ``relax`` guard action before its
solvent-free rounds; ``bench_relaxation.py`` times the action itself, scheme against
scheme). Beside them, what the engines do after every jump before the guards look
(``settle_iterations``): L-BFGS
iterations on the rebuilt atoms alone, the selected atoms held exactly (``Relaxation.settle``),
in the engines' stages (10, 20, 40, ... iterations in all), and after each stage the rise that is
left over the reference lowered by that stage's quench (what settling the start frame the same
way takes off its energy), as the guards judge a settled jump end.

Usage::

    python examples/benchmarks/bench_reconstruction.py --data adk.h5 \\
        --selections backbone heavy --lag-ps 1 4 --starts 10 --json reconstruction.json
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
    save_json,
    setup_logging,
)

from integrations.propagator import DEFAULT_SETTLE_ITERATIONS, settle_stages, stage_quenches

log = logging.getLogger("bench_reconstruction")

WINDOW = 10  # MD frames up to the start whose median energy is the reference (as the guards)


def _constrained_energy(context, positions_A: np.ndarray) -> float:
    """kJ/mol after ``applyConstraints`` (the state an engine would hold)."""
    from openmm import unit

    context.setPositions(np.asarray(positions_A, dtype=np.float64) * 0.1)
    context.applyConstraints(1e-5)
    return context.getState(energy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)


def _timed(work) -> float:
    """Seconds one call of ``work()`` takes."""
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def relax_costs(energy, relaxation, rebuilt: np.ndarray, target: float, iterations: int,
                threshold: float) -> dict[str, dict[str, float]]:
    """Iterations, seconds and final energy (kJ/mol) of relaxing ``rebuilt`` to ``target`` with
    the constrained minimiser (engine System) and with the flexible ``relaxation`` Context."""
    import openmm

    from integrations.openmm_simulation import (
        RELAX_TOLERANCE_KJ_PER_MOL_NM,
        SOLVENT_FREE_MARGIN,
        StopBelowEnergy,
    )

    # Every method is timed over the work it adds to a guarded jump: the energy of the rebuilt
    # state (the guard check that flagged the jump) and of the relaxed state (the check after
    # relaxing) are the same for all three and stay out of the timings.
    out = {}
    ctx = energy.context
    reporter = StopBelowEnergy(target)
    ctx.setPositions(np.asarray(rebuilt, dtype=np.float64) * 0.1)
    t0 = time.perf_counter()
    openmm.LocalEnergyMinimizer.minimize(ctx, RELAX_TOLERANCE_KJ_PER_MOL_NM, iterations, reporter)
    seconds = time.perf_counter() - t0
    out["constrained"] = {"iterations": reporter.iterations, "seconds": seconds,
                          "energy": energy(ctx.getState(getPositions=True).getPositions(
                              asNumpy=True)._value * 10.0)}
    reporter = StopBelowEnergy(target)
    box = ctx.getState().getPeriodicBoxVectors()
    t0 = time.perf_counter()
    relaxed = relaxation.minimise(rebuilt, box, iterations, 0.0, reporter)
    seconds = time.perf_counter() - t0
    out["flexible"] = {"iterations": reporter.iterations, "seconds": seconds,
                       "energy": _constrained_energy(ctx, relaxed)}
    if relaxation.solvent_free is not None:  # the relax action's two stages
        excess = _constrained_energy(ctx, rebuilt) - target  # known from the guard check
        t0 = time.perf_counter()
        stage_a = StopBelowEnergy(relaxation.solvent_free_energy(rebuilt, box) - excess
                                  - SOLVENT_FREE_MARGIN * threshold)
        relaxed = relaxation.minimise(rebuilt, box, iterations, reporter=stage_a,
                                      solvent_free=True)
        seconds = time.perf_counter() - t0
        e, n = _constrained_energy(ctx, relaxed), stage_a.iterations  # the check after it
        if e > target and n < iterations:
            t0 = time.perf_counter()
            stage_b = StopBelowEnergy(target)
            relaxed = relaxation.minimise(relaxed, box, iterations - n, 0.0, stage_b)
            seconds += time.perf_counter() - t0
            # the check between the stages is work the two stages add (the last one is common)
            seconds += _timed(lambda: _constrained_energy(ctx, relaxed))
            e, n = _constrained_energy(ctx, relaxed), n + stage_b.iterations
        out["two_stage"] = {"iterations": n, "seconds": seconds, "energy": e}
    return out


def measure(traj, selection: str, lag_frames: int, starts: np.ndarray, energy, relaxation,
            threshold: float, iterations: int, progress: bool = True,
            settle_iterations: int = 0) -> dict[str, Any]:
    """Energy rises (kJ/mol over the start's reference median) and relaxation costs of oracle
    jumps of ``lag_frames`` frames from each start frame; with ``settle_iterations`` also, after
    each stage of the engines' settling of the rebuilt atoms, the rise over the median lowered
    by the quench of that stage (measured on the start frame), and the seconds of all stages."""
    from tqdm.auto import tqdm

    from integrations.openmm_simulation import Relaxation
    from integrations.reconstruct import Reconstructor
    from surrogate_md.data.selection import select_nodes

    topo = traj.topology
    sel = select_nodes(topo, selection, source=str(traj.path))
    rebuild = Reconstructor(traj.n_atoms, sel.atom_index, topo.bonds, topo.atomic_numbers,
                            topo.residue_ids, topo.segment_ids, topo.atom_names)
    settler = (Relaxation(energy.context.getSystem(), energy.context.getPlatform(),
                          restrained_atoms=sel.atom_index) if settle_iterations else None)
    box = energy.context.getState().getPeriodicBoxVectors()
    settle_seconds: list[float] = []
    rises: dict[str, list[float]] = {"true": [], "rebuilt": [], "rebuilt_constrained": []}
    stages = settle_stages(settle_iterations)
    for k in stages:
        rises[f"settled_{k}"] = []

    def settle(x: np.ndarray, n: int) -> np.ndarray:
        return settler.settle(x, box, n)

    relax: dict[str, list[dict]] = {"constrained": [], "flexible": [], "two_stage": []}
    for t in tqdm(starts, desc=f"{selection} +{lag_frames}", disable=not progress, leave=False):
        window = traj.read(np.arange(t - WINDOW + 1, t + 1))
        median = float(np.median([energy(f) for f in window]))
        start, target = window[-1], traj.read(np.array([t + lag_frames]))[0]
        rebuilt = rebuild(start, target[sel.atom_index])
        rises["true"].append(energy(target) - median)
        rises["rebuilt"].append(energy(rebuilt) - median)
        rises["rebuilt_constrained"].append(_constrained_energy(energy.context, rebuilt) - median)
        if settler is not None:
            quenches = stage_quenches(settle, lambda x: settler.energy(x, box), start, stages)
            settled, done, seconds = rebuilt, 0, 0.0
            for k in stages:
                t0 = time.perf_counter()
                settled, done = settle(settled, k - done), k
                seconds += time.perf_counter() - t0
                rises[f"settled_{k}"].append(_constrained_energy(energy.context, settled)
                                             - (median - quenches[k]))
            settle_seconds.append(seconds)
        if rises["rebuilt_constrained"][-1] > 0 and iterations:
            for kind, r in relax_costs(energy, relaxation, rebuilt, median, iterations,
                                               threshold).items():
                r["energy"] -= median
                relax[kind].append(r)
    row: dict[str, Any] = {"selection": selection, "model_atoms": int(len(sel.atom_index)),
                           "rebuilt_atoms": int(traj.n_atoms - len(sel.atom_index)),
                           "lag_frames": lag_frames, "lag_ps": lag_frames * traj.interval_ps,
                           "starts": len(starts), "threshold_kJ_per_mol": threshold,
                           "settle_iterations": settle_iterations, "settle_stages": stages,
                           "settle_seconds": (float(np.mean(settle_seconds)) if settle_seconds
                                              else None)}
    for key, values in rises.items():
        v = np.asarray(values)
        row[f"rise_{key}"] = {"median": float(np.median(v)), "min": float(v.min()),
                              "max": float(v.max()),
                              "over_threshold": int((v > threshold).sum())}
    for kind, runs in relax.items():
        if runs:
            row[f"relax_{kind}"] = {
                "relaxed": len(runs),
                "reached": int(sum(r["energy"] <= 1e-6 for r in runs)),
                "iterations": float(np.mean([r["iterations"] for r in runs])),
                "seconds": float(np.mean([r["seconds"] for r in runs])),
                "final_rise_max": float(max(r["energy"] for r in runs))}
    return row


def _rise_cell(r: dict) -> str:
    return f"{fmt(r['median'])} ({fmt(r['min'])} – {fmt(r['max'])})"


def _relax_cell(r: dict | None) -> str:
    if not r:
        return "–"
    return (f"{fmt(r['iterations'])} it, {fmt(r['seconds'])} s "
            f"({r['reached']}/{r['relaxed']} at the median)")


@clean_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny alanine-dipeptide MD made here (seconds, for CI)")
    parser.add_argument("--data", default=None,
                        help="datagen MD of a built-in system (the force field is rebuilt from "
                             "its metadata); default: alanine dipeptide made here")
    parser.add_argument("--selections", nargs="+", default=["backbone", "heavy"])
    parser.add_argument("--lag-ps", type=float, nargs="+", default=[4.0],
                        help="jump lengths to test (whole numbers of frames)")
    parser.add_argument("--starts", type=int, default=10, help="start frames per row")
    parser.add_argument("--relax-iterations", type=int, default=200,
                        help="most L-BFGS iterations per relaxation (0: no relaxation)")
    parser.add_argument("--settle-iterations", type=int, default=DEFAULT_SETTLE_ITERATIONS,
                        help="the engines' settling of the rebuilt atoms after a jump, L-BFGS "
                             "iterations in all, measured after each of the engines' stages "
                             "(10, 20, 40, ...; 0: not measured; default %(default)s, the "
                             "engines')")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K, for the energy guard's threshold")
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--data-dir", default="bench_data")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    setup_logging()
    from bench_validity import ReferenceEnergy, alanine_data

    from integrations.guards import default_energy_threshold
    from integrations.openmm_simulation import Relaxation, degrees_of_freedom
    from surrogate_md.data.h5md import open_trajectory

    info = machine("cpu")
    command = command_line(__file__, argv)
    start = time.perf_counter()
    if args.data:
        data = Path(args.data)
    else:  # the alanine-dipeptide MD the validity benchmark caches
        args.solvent, args.frames = "vacuum", 60 if args.quick else 2000
        data = alanine_data(args)
    rows = []
    with open_trajectory(data) as traj:
        energy, why = ReferenceEnergy.from_trajectory(traj, args.platform)
        if energy is None:
            parser.error(f"{data}: {why}; give datagen MD of a built-in system")
        system = energy.context.getSystem()
        threshold = default_energy_threshold(degrees_of_freedom(system), args.temperature)
        relaxation = Relaxation(system, energy.context.getPlatform())
        info["platform"] = energy.context.getPlatform().getName()
        for lag_ps in args.lag_ps:
            lag = int(round(lag_ps / traj.interval_ps))
            if lag < 1 or abs(lag * traj.interval_ps - lag_ps) > 1e-6 * max(lag_ps, 1.0):
                parser.error(f"--lag-ps {lag_ps} is not a whole number of the data's "
                             f"{traj.interval_ps} ps frames")
            last = traj.n_frames - lag - 1
            if last < WINDOW - 1:
                parser.error(f"{data} has {traj.n_frames} frames, too few for {WINDOW} reference "
                             f"frames and a {lag_ps} ps jump")
            starts = np.unique(np.linspace(WINDOW - 1, last, args.starts).round().astype(int))
            for selection in args.selections:
                log.info("%s, %g ps: %d oracle jumps", selection, lag_ps, len(starts))
                rows.append(measure(traj, selection, lag, starts, energy, relaxation, threshold,
                                    args.relax_iterations, args.progress,
                                    args.settle_iterations))
        label = energy.label
    results = {"machine": info, "command": command, "quick": args.quick,
               "data": relative_path(data), "system": label, "rows": rows,
               "wall_seconds": time.perf_counter() - start}
    print("# Rebuilding unpredicted atoms: energy cost and relaxation cost (oracle jumps)\n")
    print(machine_table(info, command))
    print(f"\nsystem: {label}; platform {info['platform']}; energy rises in kJ/mol over the median "
          f"of the {WINDOW} MD frames up to each start, as median (min – max); guard threshold "
          f"{fmt(threshold)} kJ/mol\n")
    header = ["selection", "rebuilt atoms", "jump", "true frame", "rebuilt",
              "rebuilt + constraints", "over threshold", "relax: OpenMM minimiser",
              "relax: flexible copy", "relax: solvent-free first"]
    stages = settle_stages(args.settle_iterations)
    if stages:
        header += ([f"settled {k} it. + constraints, over the quenched median" for k in stages]
                   + ["settling (all stages)"])
    body = [[r["selection"], r["rebuilt_atoms"], f"{fmt(r['lag_ps'])} ps",
             _rise_cell(r["rise_true"]), _rise_cell(r["rise_rebuilt"]),
             _rise_cell(r["rise_rebuilt_constrained"]),
             f"{r['rise_rebuilt_constrained']['over_threshold']}/{r['starts']}",
             _relax_cell(r.get("relax_constrained")), _relax_cell(r.get("relax_flexible")),
             _relax_cell(r.get("relax_two_stage"))]
            + ([f"{_rise_cell(r[f'rise_settled_{k}'])}, "
                f"{r[f'rise_settled_{k}']['over_threshold']}/{r['starts']} over" for k in stages]
               + [f"{fmt(r['settle_seconds'])} s"] if stages else [])
            for r in rows]
    print(markdown_table(header, body))
    print(f"\nwall time {results['wall_seconds']:.1f} s")
    if args.json_path:
        save_json(args.json_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
