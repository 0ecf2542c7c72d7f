"""Replace OpenMM MD by learned jumps and compare with a short reference MD.

    python examples/openmm_surrogate_md.py RUN/best.pt --pdb datagen/systems/alanine-dipeptide.pdb

Runs the same start state twice: ``--jumps`` surrogate jumps in a SurrogateSimulation (XTC +
StateData CSV in ``--out``) and the same simulated time of plain Langevin MD, then prints the
mean potential energy and the heavy-atom RMSD drift of both runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mdtraj
import numpy as np
import openmm
from openmm import app, unit

from integrations.openmm_simulation import SurrogateSimulation
from surrogate_md import Surrogate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--pdb", default=str(Path(__file__).resolve().parents[1] / "datagen" /
                                        "systems" / "alanine-dipeptide.pdb"))
    p.add_argument("--jumps", type=int, default=20)
    p.add_argument("--temperature-K", type=float, default=300.0)
    p.add_argument("--guard", default="fallback")
    p.add_argument("--platform", default="CPU")
    p.add_argument("--out", default="openmm_surrogate_out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    pdb = app.PDBFile(args.pdb)
    ff = app.ForceField("amber14-all.xml", "amber14/tip3pfb.xml")
    platform = openmm.Platform.getPlatformByName(args.platform)

    def system():
        return ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                               constraints=app.HBonds)

    surrogate = Surrogate.load(args.checkpoint)
    sim = SurrogateSimulation(pdb.topology, system(), surrogate, platform=platform,
                              guards=args.guard, temperature_K=args.temperature_K,
                              progress=True)
    sim.context.setPositions(pdb.positions)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(args.temperature_K * unit.kelvin, 1)
    start = sim.context.getState(positions=True, velocities=True)
    sim.reporters.append(app.XTCReporter(str(out / "surrogate.xtc"), sim.steps_per_jump))
    sim.reporters.append(app.StateDataReporter(str(out / "surrogate.csv"), sim.steps_per_jump,
                                               time=True, potentialEnergy=True,
                                               temperature=True))
    sim.step(args.jumps)
    sim.guards.log_summary()

    # the reference: ordinary MD steps (sim.md_step_ps; a jump step is sim.step_ps), reported
    # once per jump's worth of them
    per_jump = sim.md_steps_per_jump
    integ = openmm.LangevinMiddleIntegrator(args.temperature_K * unit.kelvin, 1 / unit.picosecond,
                                            sim.md_step_ps * unit.picosecond)
    ref = app.Simulation(pdb.topology, system(), integ, platform)
    ref.context.setState(start)
    ref.reporters.append(app.XTCReporter(str(out / "reference.xtc"), per_jump))
    ref.reporters.append(app.StateDataReporter(str(out / "reference.csv"), per_jump,
                                               time=True, potentialEnergy=True,
                                               temperature=True))
    ref.step(args.jumps * per_jump)

    for name in ("surrogate", "reference"):
        traj = mdtraj.load(str(out / f"{name}.xtc"), top=args.pdb)
        heavy = traj.topology.select("not element H")
        rmsd_A = 10 * mdtraj.rmsd(traj, traj, 0, atom_indices=heavy)
        energy = np.loadtxt(out / f"{name}.csv", delimiter=",", skiprows=1)[:, 1]
        print(f"{name:9s}: {traj.n_frames} frames to {traj.time[-1]:.3f} ps, mean potential "
              f"energy {energy.mean():.1f} kJ/mol, heavy-atom RMSD to frame 1 "
              f"{rmsd_A[-1]:.2f} A")
    return 0


if __name__ == "__main__":
    sys.exit(main())
