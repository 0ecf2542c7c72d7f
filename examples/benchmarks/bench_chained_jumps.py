"""Why raw jumps fail the energy guard: a jump from an MD frame against a jump from a jump's end.

For each checkpoint and each of ``--starts`` MD frames of the data it was trained on (spread over
the last ``--from-fraction`` of the trajectory: with the benchmarks' blocked 70/10/20 split, the
test block), the potential energy (the dataset's own force field) of the end of

- the first raw jump, from the MD frame and its velocities;
- a second raw jump from that end, with the first jump's difference velocities (what the engines
  hand the next jump) and with the MD's velocities at that time;
- one raw jump from the MD frame one jump later (the second jump as the MD would start it),

each measured as the guards measure it: the rise over the median energy of the 10 MD frames up to
the start (for the last case, up to the later frame), against the default energy threshold
(``8 kT sqrt(n_dof/2)``). Atoms the model does not predict are rebuilt as the engines rebuild
them and settled as they settle them (``--settle-iterations``, the rebuilt atoms alone, the
predicted ones held; 0: the rigid rebuild as it is), and then, as the guards check settled
states, the reference is lowered by what settling takes off the MD frame it belongs to; no
guard, relaxation or MD runs between jumps.

Usage::

    python examples/benchmarks/bench_chained_jumps.py --checkpoints backbone.pt heavy.pt \\
        --data adk.h5 --starts 6 --json chained.json
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

from integrations.propagator import DEFAULT_SETTLE_ITERATIONS

log = logging.getLogger("bench_chained_jumps")

WINDOW = 10  # MD frames up to the start whose median energy is the reference (as the guards)
CASES = ("first jump, from an MD frame", "second jump, from its end (difference velocities)",
         "second jump, from its end (the MD's velocities)",
         "a jump from the MD frame one jump later")


def measure(sur, traj, energy, starts: np.ndarray, threshold: float,
            settle_iterations: int = 0) -> dict[str, Any]:
    """Rises (kJ/mol) of the four cases at each start frame; every jump's end settled for
    ``settle_iterations`` as the engines settle it."""
    from integrations.openmm_simulation import Relaxation
    from integrations.propagator import SurrogatePropagator

    settler = None
    if settle_iterations and sur.n_model_atoms < traj.n_atoms:
        settler = Relaxation(energy.context.getSystem(), energy.context.getPlatform(),
                             restrained_atoms=sur.model_atoms)
    box = energy.context.getState().getPeriodicBoxVectors()

    def jump(x: np.ndarray, v: np.ndarray, t0: float) -> tuple[np.ndarray, np.ndarray]:
        """End positions (settled) and velocities of one raw jump."""
        result = prop.jump(x, v, t0)
        end = result.positions_A[-1]
        if settler is not None:
            end = settler.settle(end, box, settle_iterations)
        return end, result.velocities_A_per_ps[-1]

    lag = int(round(sur.jump_ps / traj.interval_ps))
    frames = np.unique(np.concatenate([np.arange(s - WINDOW + 1, s + 1)
                                       for s in np.concatenate([starts, starts + lag])]))
    x = dict(zip(frames.tolist(), traj.read(frames)))
    v = dict(zip(frames.tolist(), traj.read(frames, "velocities")))
    prop = SurrogatePropagator(sur)
    rises = {case: [] for case in CASES}
    def reference(frame: int) -> float:
        return float(np.median([energy(x[k]) for k in range(frame - WINDOW + 1, frame + 1)]))

    for s in starts.tolist():
        ref, ref_later = reference(s), reference(s + lag)
        if settler is not None:  # as the guards check settled states: the reference lowered
            ref -= settler.settle_quench(x[s], box, settle_iterations)  # by the quench
            ref_later -= settler.settle_quench(x[s + lag], box, settle_iterations)
        end, end_vel = jump(x[s], v[s], 0.0)
        ends = [end, jump(end, end_vel, sur.jump_ps)[0], jump(end, v[s + lag], sur.jump_ps)[0],
                jump(x[s + lag], v[s + lag], sur.jump_ps)[0]]
        for case, state, base in zip(CASES, ends, (ref, ref, ref, ref_later)):
            rises[case].append(energy(state) - base)
    return {case: {"rises_kJ_per_mol": r, "median": float(np.median(r)), "min": float(min(r)),
                   "max": float(max(r)), "over_threshold": int(sum(e > threshold for e in r))}
            for case, r in rises.items()}


def quick_checkpoint(data: Path, out_dir: Path) -> Path:
    """A briefly trained heavy-atom EGNO on the quick MD (seconds), as bench_validity makes it."""
    from bench_validity import train_model

    args = argparse.Namespace(system="alanine-dipeptide", layers=2, batch_size=8,
                              train_epochs=1, max_steps_per_epoch=2, device="cpu",
                              progress=False, precision="fp32", hidden=16, selection="heavy",
                              out_dir=str(out_dir))
    return train_model(args, "egno", data)


@clean_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny alanine-dipeptide MD and a briefly trained EGNO made here "
                             "(seconds, for CI)")
    parser.add_argument("--checkpoints", nargs="+", default=[],
                        help="trained surrogates (with --data: the datagen MD they learned)")
    parser.add_argument("--data", default=None, help="datagen MD of a built-in system")
    parser.add_argument("--starts", type=int, default=6, help="start frames per checkpoint")
    parser.add_argument("--from-fraction", type=float, default=0.2,
                        help="starts spread over this last fraction of the trajectory")
    parser.add_argument("--settle-iterations", type=int, default=DEFAULT_SETTLE_ITERATIONS,
                        help="the engines' settling of the rebuilt atoms after every jump, "
                             "L-BFGS iterations (0: the rigid rebuild as it is; default "
                             "%(default)s, the engines')")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K, for the energy guard's threshold")
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--data-dir", default="bench_data")
    parser.add_argument("--out-dir", default="bench_runs/chained_jumps")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if not args.quick and not (args.checkpoints and args.data):
        parser.error("give --checkpoints and --data (or --quick)")
    if not 0 < args.from_fraction <= 1 or args.starts < 1:
        parser.error("--from-fraction must be in (0, 1] and --starts >= 1")
    setup_logging()
    from bench_validity import ReferenceEnergy, alanine_data

    from integrations.guards import default_energy_threshold
    from integrations.openmm_simulation import degrees_of_freedom
    from surrogate_md import Surrogate
    from surrogate_md.data.h5md import open_trajectory

    info = machine("cpu")
    command = command_line(__file__, argv)
    start = time.perf_counter()
    if args.quick:
        args.solvent, args.frames = "vacuum", 200
        data = alanine_data(args)
        checkpoints = [quick_checkpoint(data, Path(args.out_dir))]
    else:
        data, checkpoints = Path(args.data), [Path(c) for c in args.checkpoints]
    rows = []
    with open_trajectory(data) as traj:
        energy, why = ReferenceEnergy.from_trajectory(traj, args.platform)
        if energy is None:
            parser.error(f"{data}: {why}; give datagen MD of a built-in system")
        threshold = default_energy_threshold(degrees_of_freedom(energy.context.getSystem()),
                                             args.temperature)
        for path in checkpoints:
            sur = Surrogate.load(path)
            lag = sur.jump_ps / traj.interval_ps
            if abs(lag - round(lag)) > 1e-6 or sur.needs_history:
                parser.error(f"{path}: needs a state-to-trajectory model whose jump is a whole "
                             f"number of the data's {traj.interval_ps} ps frames")
            lag = int(round(lag))
            first = max(WINDOW - 1, int((1 - args.from_fraction) * traj.n_frames))
            last = traj.n_frames - 2 * lag - 1
            if last < first:
                parser.error(f"{data}: too few frames after frame {first} for two "
                             f"{sur.jump_ps} ps jumps")
            starts = np.unique(np.linspace(first, last, args.starts).round().astype(int))
            log.info("%s: %d starts", path, len(starts))
            rows.append({"checkpoint": relative_path(path), "model": sur.name,
                         "selection_atoms": sur.n_model_atoms, "jump_ps": sur.jump_ps,
                         "starts": starts.tolist(),
                         "settle_iterations": args.settle_iterations,
                         "cases": measure(sur, traj, energy, starts, threshold,
                                          args.settle_iterations)})
        label = energy.label
    results = {"machine": info, "command": command, "quick": args.quick,
               "data": relative_path(data), "system": label,
               "energy_threshold_kJ_per_mol": threshold, "rows": rows,
               "wall_seconds": time.perf_counter() - start}
    print("# Raw jumps from MD frames and from jump ends: energy rise over the MD reference\n")
    print(machine_table(info, command))
    print(f"\nsystem: {label}; rises in kJ/mol over the median of the {WINDOW} MD frames up to "
          f"each start, median (min – max); energy guard threshold {fmt(threshold)} kJ/mol; "
          f"rebuilt atoms settled for {args.settle_iterations} iterations after every jump, "
          f"the reference lowered by the settling's quench of its MD frame\n")
    header = ["checkpoint", "model atoms", "jump", "case", "rise", "over threshold"]
    body = [[r["checkpoint"], r["selection_atoms"], f"{fmt(r['jump_ps'])} ps", case,
             f"{fmt(c['median'])} ({fmt(c['min'])} – {fmt(c['max'])})",
             f"{c['over_threshold']}/{len(r['starts'])}"]
            for r in rows for case, c in r["cases"].items()]
    print(markdown_table(header, body))
    print(f"\nwall time {results['wall_seconds']:.1f} s")
    if args.json_path:
        save_json(args.json_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
