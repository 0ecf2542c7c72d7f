"""Command line of datagen: ``python -m datagen {ingest,openmm,ase} ...``.

Thin layer: parse, configure logging, call the library function, turn a user error into one line
on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from datagen.interrupts import catching_interrupts
from surrogate_md.errors import SurrogateMDError

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
#: 128 + SIGINT, as shells report a process stopped by Ctrl-C
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_run_options(p: argparse.ArgumentParser, interval: str, step: str,
                     temperature: str) -> None:
    """Options both MD runners take; the other arguments say their defaults."""
    p.add_argument("--frames", type=_positive_int, default=1000,
                   help="saved frames (default 1000)")
    p.add_argument("--interval-ps", type=float, default=None,
                   help=f"saved-frame interval, ps (default: {interval})")
    p.add_argument("--step-fs", type=float, default=None,
                   help=f"integrator step, fs (default: {step})")
    p.add_argument("--temperature-K", type=float, default=None,
                   help=f"thermostat target, K (default: {temperature})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--friction-per-ps", type=float, default=1.0,
                   help="Langevin friction, 1/ps (default 1)")
    p.add_argument("--replicas", type=_positive_int, default=1,
                   help="run R seeds (seed, seed+1, ...) in parallel: OUT_r000.h5 ... + manifest")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="parallel processes for --replicas (default: CPU count)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output dataset (.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _system_defaults(systems) -> str:
    """The conditions each built-in system runs at unless told otherwise, as a help epilog
    (systems with the same conditions share a line)."""
    rows: dict[tuple, list[str]] = {}
    for spec in systems.values():
        key = (f"{spec.interval_ps:g} ps", f"{spec.step_fs:g} fs", f"{spec.temperature_K:g} K",
               spec.solvent, spec.integrator, spec.constraints or "no constraints",
               f"{spec.equilibrate_ps:g} ps")
        rows.setdefault(key, []).append(spec.name)
    lines = ["defaults (saved interval, step, temperature, solvent, integrator, constraints, "
             "equilibration):"]
    rows[("1 ps", "2 fs (4 fs with --hmr)", "300 K", "vacuum",
          "nose-hoover for small vacuum molecules else langevin", "HBonds", "10 ps")] = [
        "your own files"]
    for key, names in rows.items():
        lines += textwrap.wrap(f"{', '.join(names)}: {', '.join(key)}", 88,
                               initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from datagen.systems import BUILTIN_SYSTEMS

    parser = argparse.ArgumentParser(
        prog="python -m datagen",
        description="Turn MD into surrogate-md datasets: ingest existing trajectories or run "
                    "OpenMM/ASE. Units in the files: Angstrom, ps, amu, kJ/mol.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="convert MD17 npz, MDAnalysis-readable or ASE trajectories",
                       description="INPUT: one MD17/rMD17 .npz; or ASE .traj/.extxyz files; or a "
                                   "topology (PSF/PDB/GRO/TPR/prmtop) then trajectories "
                                   "(DCD/XTC/TRR...), concatenated in order.")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--out", required=True, type=Path, help="output dataset (.h5)")
    p.add_argument("--select", default=None,
                   help="MDAnalysis selection of atoms to keep, e.g. 'backbone', 'not name H*'")
    p.add_argument("--dt-ps", type=float, default=None,
                   help="saved-frame interval in ps (default: the file's; MD17: 0.0005; "
                        "required for ASE trajectories, formats without times and rMD17 files "
                        "without old_indices)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    names = ", ".join(BUILTIN_SYSTEMS)
    p = sub.add_parser("openmm", help="run OpenMM MD of a built-in or user system",
                       description=f"Built-in systems: {names}. Or a PDB, an Amber prmtop "
                                   "(+ --coordinates inpcrd) or a System XML (+ --coordinates "
                                   "PDB).",
                       epilog=_system_defaults(BUILTIN_SYSTEMS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", required=True, help="built-in name or file")
    p.add_argument("--coordinates", default=None, help="inpcrd for a prmtop; PDB for a XML")
    p.add_argument("--solvent", choices=("vacuum", "implicit", "explicit"), default=None)
    p.add_argument("--forcefield", nargs="+", default=None,
                   help="OpenMM force-field XML files for PDB inputs (default amber14-all.xml)")
    p.add_argument("--integrator", choices=("langevin", "nose-hoover"), default=None,
                   help="default: nose-hoover for small vacuum molecules, else langevin")
    p.add_argument("--platform", choices=("auto", "Reference", "CPU", "CUDA", "OpenCL"),
                   default="auto", help="OpenMM platform (default auto: CUDA when present, else "
                        "Reference for small non-periodic systems, else CPU)")
    p.add_argument("--hmr", action="store_true", help="hydrogen mass repartitioning, 4 fs")
    p.add_argument("--cutoff-nm", type=float, default=None,
                   help="nonbonded/GB cutoff for vacuum or implicit solvent (default: none, "
                        "exact; 1.2 makes proteins in implicit solvent ~3x faster)")
    p.add_argument("--constraints", default="default",
                   help="none, HBonds, AllBonds, HAngles (default: the system's)")
    p.add_argument("--equilibrate-ps", type=float, default=None,
                   help="MD before the first saved frame (default per system)")
    p.add_argument("--checkpoint-frames", type=_positive_int, default=1000,
                   help="flush the dataset and save a checkpoint every N frames (default 1000)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    _add_run_options(p, "the system's, see below", "the system's; 4 with --hmr",
                     "the system's")

    p = sub.add_parser("ase", help="run ASE MD (EMT, Lennard-Jones, GFN2-xTB via tblite)")
    p.add_argument("--molecule", required=True,
                   help="an ase.build.molecule name (e.g. CH3CH2OH) or a structure file")
    p.add_argument("--calculator", required=True, help="emt, lj or xtb")
    p.add_argument("--integrator", choices=("langevin", "verlet", "bussi"), default="bussi")
    p.add_argument("--checkpoint-frames", type=_positive_int, default=1000,
                   help="flush the dataset and save the dynamics state every N frames")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    _add_run_options(p, "every step", "0.5", "300")
    return parser


def _command(args: argparse.Namespace, command: str, progress: bool | None) -> int:
    """Run the parsed subcommand; returns its exit code."""
    if args.command == "ingest":
        from datagen.ingest import ingest

        ingest(args.inputs, args.out, select=args.select, dt_ps=args.dt_ps,
               overwrite=args.overwrite, progress=progress, command=command)
        return 0
    if args.command == "openmm":
        from datagen.openmm_md import run_openmm

        kwargs = dict(frames=args.frames, interval_ps=args.interval_ps, step_fs=args.step_fs,
                      temperature_K=args.temperature_K, solvent=args.solvent,
                      forcefield=args.forcefield, friction_per_ps=args.friction_per_ps,
                      integrator=args.integrator, platform=args.platform, hmr=args.hmr,
                      constraints=None if str(args.constraints).lower() == "none"
                      else args.constraints,
                      coordinates=args.coordinates, cutoff_nm=args.cutoff_nm,
                      equilibrate_ps=args.equilibrate_ps,
                      checkpoint_frames=args.checkpoint_frames, resume=args.resume,
                      overwrite=args.overwrite, progress=progress, command=command)
        return _run(run_openmm, args.system, args, kwargs)
    if args.command == "ase":
        from datagen.ase_md import run_ase

        kwargs = dict(frames=args.frames, interval_ps=args.interval_ps, step_fs=args.step_fs,
                      temperature_K=args.temperature_K, integrator=args.integrator,
                      friction_per_ps=args.friction_per_ps,
                      checkpoint_frames=args.checkpoint_frames, resume=args.resume,
                      overwrite=args.overwrite, progress=progress, command=command)
        kwargs["calculator"] = args.calculator
        return _run(run_ase, args.molecule, args, kwargs)
    return EXIT_USER_ERROR  # pragma: no cover - argparse requires a command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "datagen", *argv])
    progress = False if args.no_progress else None
    try:
        with catching_interrupts():  # a Ctrl-C Python swallows is raised again
            return _command(args, command, progress)
    except SurrogateMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.command == "ingest":
            hint = "nothing was written"
        else:
            hint = ("the frames up to the last checkpoint (every --checkpoint-frames frames) are "
                    "kept: the same command with --resume continues from there")
        print(f"interrupted: {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(fn, target, args, kwargs) -> int:
    if args.replicas == 1:
        fn(target, out=args.out, seed=args.seed, **kwargs)
        return 0
    from datagen.replicas import run_replicas

    kwargs.pop("progress", None)
    run_replicas(fn, target, args.out, replicas=args.replicas, seed=args.seed,
                 workers=args.workers, **kwargs)
    return 0
