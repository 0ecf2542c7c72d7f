"""Replace ASE MD by learned jumps and compare with a short reference MD.

    python examples/ase_surrogate_md.py RUN/best.pt --pdb datagen/systems/alanine-dipeptide.pdb
    python examples/ase_surrogate_md.py RUN/best.pt --calculator xtb --jumps 5   # physical

The surrogate run uses ``SurrogateDynamics`` (the calculator reports energies and drives the
VelocityVerlet fallback when a guard trips) and writes an ASE ``.traj`` and an XTC; the reference
run is VelocityVerlet with the same calculator for the same simulated time. Prints energies and
drift of both.

``--calculator emt`` (the default, fast) only shows the mechanics: EMT is no force field for an
organic molecule (the reference run heats up and the molecule comes apart, so the comparison
means nothing physically). ``--calculator xtb`` (GFN2-xTB, ``pip install tblite``) is a real
one, at about 10 ms per MD step for alanine dipeptide.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from ase import units
from ase.io import read
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from integrations.ase_dynamics import SurrogateDynamics
from integrations.writers import PS_IN_ASE_TIME, TrajectoryObserver
from surrogate_md import Surrogate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--pdb", default=str(Path(__file__).resolve().parents[1] / "datagen" /
                                        "systems" / "alanine-dipeptide.pdb"))
    p.add_argument("--jumps", type=int, default=20)
    p.add_argument("--temperature-K", type=float, default=300.0)
    p.add_argument("--md-step-fs", type=float, default=0.5)
    p.add_argument("--guard", default="fallback")
    p.add_argument("--calculator", default="emt", choices=("emt", "xtb"),
                   help="emt: fast, mechanics only; xtb: GFN2-xTB (tblite), physical")
    p.add_argument("--out", default="ase_surrogate_out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    surrogate = Surrogate.load(args.checkpoint)
    start = read(args.pdb)
    thermalize_momenta(start, temperature_K=args.temperature_K, rng=np.random.default_rng(0))

    from datagen.ase_md import make_calculator

    if args.calculator == "emt":
        logging.getLogger("ase_surrogate_md").warning(
            "EMT is no force field for organic molecules: this run shows the mechanics only "
            "(use --calculator xtb for a physical reference)")
    atoms = start.copy()
    atoms.calc = make_calculator(args.calculator)
    fallback = VelocityVerlet(atoms, timestep=args.md_step_fs * units.fs)
    dyn = SurrogateDynamics(atoms, surrogate, trajectory=str(out / "surrogate.traj"),
                            guards=args.guard, fallback_dynamics=fallback,
                            temperature_K=args.temperature_K)
    with TrajectoryObserver(dyn, out / "surrogate.xtc", overwrite=True) as xtc:
        dyn.attach(xtc)
        dyn.run(args.jumps)
    dyn.guards.log_summary()

    ref_atoms = start.copy()
    ref_atoms.calc = make_calculator(args.calculator)
    ref = VelocityVerlet(ref_atoms, timestep=args.md_step_fs * units.fs)
    energies = []
    n_md = int(round(surrogate.jump_ps * PS_IN_ASE_TIME / ref.dt))
    ref.attach(lambda: energies.append(ref_atoms.get_potential_energy()), interval=n_md)
    ref.run(args.jumps * n_md)

    for name, a in (("surrogate", atoms), ("reference", ref_atoms)):
        drift = np.sqrt(((a.positions - start.positions) ** 2).sum(axis=1).mean())
        print(f"{name:9s}: t = {args.jumps * surrogate.jump_ps:.3f} ps, final potential energy "
              f"{a.get_potential_energy():.3f} eV, RMS displacement {drift:.2f} A")
    print(f"reference mean potential energy {np.mean(energies):.3f} eV")
    return 0


if __name__ == "__main__":
    sys.exit(main())
