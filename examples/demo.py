"""The whole chain in one command: MD data -> trained surrogate -> OpenMM jumps -> XTC + report.

    python examples/demo.py --out demo_out

1. OpenMM runs alanine dipeptide (amber14, vacuum, 300 K Nosé–Hoover, 2 fs, a frame every 0.1 ps).
2. EGNO is trained briefly on CPU to jump 1 ps ahead (P = 5 frames per jump), next to the
   ``constant`` and ``linear`` baselines.
3. ``python -m surrogate_md.evaluate``-style report: F-MSE/A-MSE on the held-out block, rollout
   error, physical validity, plots.
4. ``SurrogateSimulation`` advances the molecule by >= 100 learned jumps inside OpenMM with a
   stock ``XTCReporter`` and ``StateDataReporter`` (real force-field energies of every frame).
   The model predicts the heavy atoms; hydrogens ride on them, and a jump whose energy rises
   too far above the recent MD energies is relaxed by 20 minimiser iterations (guard ``relax``;
   if that does not fix it, real MD replaces the jump).

Outputs in ``--out``: ``data/ala2.h5``, ``runs/<model>/`` (config, log, metrics, loss.png, best.pt),
``report/`` (report.md, metrics.json, PNGs), ``demo.xtc``, ``demo_topology.pdb``,
``demo_state.csv``, ``demo_summary.json``. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("demo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--frames", type=int, default=20000,
                   help="saved MD frames, 0.1 ps apart (default: 20000 = 2 ns)")
    p.add_argument("--epochs", type=int, default=12, help="EGNO training epochs (default: 12)")
    p.add_argument("--steps-per-epoch", type=int, default=150,
                   help="optimiser steps per epoch (default: 150)")
    p.add_argument("--jumps", type=int, default=200,
                   help="learned jumps in the OpenMM run (default: 200 = 200 ps)")
    p.add_argument("--model", default="egno", help="model to train (default: egno)")
    p.add_argument("--selection", default="heavy", choices=("heavy", "all"),
                   help="atoms the model predicts; with 'heavy' the hydrogens ride on their "
                        "heavy atoms inside OpenMM (default: heavy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, for the test suite (seconds, numbers meaningless)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.frames, args.epochs, args.steps_per_epoch, args.jumps = 1500, 1, 5, 100
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict = {"args": vars(args)}

    # 1. data ------------------------------------------------------------------------------------
    from datagen.openmm_md import run_openmm

    data = out / "data" / "ala2.h5"
    t = time.perf_counter()
    log.info("1/4 OpenMM MD of alanine dipeptide: %d frames (%.1f ns)", args.frames,
             args.frames * 0.1 / 1000)
    run_openmm("alanine-dipeptide", data, frames=args.frames, interval_ps=0.1, step_fs=2.0,
               temperature_K=300.0, solvent="vacuum", seed=args.seed, overwrite=True,
               progress=True)
    summary["md_seconds"] = time.perf_counter() - t

    # 2. training --------------------------------------------------------------------------------
    from surrogate_md.train import train

    runs = {}
    for name in ("constant", "linear", args.model):
        cfg = {
            "data": {"path": str(data), "protocol": "s2t", "selection": args.selection, "jump_ps": 1.0,
                     "n_out": 5, "split": "blocked", "stride": 2,
                     "graph": {"kind": "bonds", "two_hop": True}},
            "model": {"name": name},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-3,
                      "max_steps_per_epoch": args.steps_per_epoch, "eval_batch_size": 256,
                      "data_seed": args.seed, "model_seed": args.seed, "train_seed": args.seed},
            "runtime": {"device": "auto", "progress": True},
        }
        t = time.perf_counter()
        log.info("2/4 training %s", name)
        runs[name] = train(cfg, out / "runs" / name, overwrite=True)
        summary[f"train_seconds_{name}"] = time.perf_counter() - t

    # 3. evaluation report ----------------------------------------------------------------------
    from surrogate_md.evaluate import evaluate

    log.info("3/4 evaluating against the held-out MD block")
    t = time.perf_counter()
    report = out / "report"
    metrics = evaluate(runs[args.model], data, report, rollout_jumps=min(100, args.jumps),
                       overwrite=True)
    summary["evaluate_seconds"] = time.perf_counter() - t
    summary["report"] = str(report / "report.md")
    summary["metrics"] = metrics

    # 4. learned jumps inside OpenMM --------------------------------------------------------------
    import openmm
    from openmm import app, unit

    from datagen.openmm_md import prepare_system
    from integrations.guards import GuardConfig
    from integrations.openmm_simulation import SurrogateSimulation
    from surrogate_md import Surrogate
    from surrogate_md.data import open_trajectory

    log.info("4/4 %d learned jumps of %s inside OpenMM", args.jumps, args.model)
    surrogate = Surrogate.load(runs[args.model], device="auto")
    prepared = prepare_system("alanine-dipeptide", solvent="vacuum")
    with open_trajectory(data) as f:
        start = f.read([f.n_frames - 1])[0]
        start_v = f.read([f.n_frames - 1], "velocities")[0]
    sim = SurrogateSimulation(prepared.topology, prepared.system, surrogate,
                              platform=openmm.Platform.getPlatformByName("Reference"),
                              guards=GuardConfig(action="relax", relax_iterations=20),
                              progress=True)
    sim.context.setPositions(start * unit.angstrom)
    sim.context.setVelocities(start_v * unit.angstrom / unit.picosecond)
    xtc = out / "demo.xtc"
    csv = out / "demo_state.csv"
    with open(out / "demo_topology.pdb", "w") as fh:
        app.PDBFile.writeFile(prepared.topology, start * unit.angstrom, fh)
    sim.reporters.append(app.XTCReporter(str(xtc), 1))
    sim.reporters.append(app.StateDataReporter(str(csv), 1, time=True, potentialEnergy=True,
                                               temperature=True, speed=True))
    t = time.perf_counter()
    sim.step(args.jumps)
    wall = time.perf_counter() - t
    for r in sim.reporters:  # XTC/DCD reporters flush on close
        if hasattr(r, "close"):
            r.close()
    simulated_ns = args.jumps * surrogate.jump_ps / 1000
    summary.update({
        "jumps": args.jumps, "jump_ps": surrogate.jump_ps, "simulated_ns": simulated_ns,
        "surrogate_seconds": wall, "surrogate_ns_per_day": simulated_ns / wall * 86400,
        "guards": sim.guard_summary() if hasattr(sim, "guard_summary") else None,
        "xtc": str(xtc), "total_seconds": time.perf_counter() - started,
    })
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("done in %.0f s: %s (%d frames, %.2f ns), report %s", summary["total_seconds"], xtc,
             args.jumps, simulated_ns, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
