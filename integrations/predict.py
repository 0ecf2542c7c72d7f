"""``python -m integrations.predict``: advance a structure by learned jumps and write XTC/DCD.

Example::

    python -m integrations.predict RUN/best.pt --topology system.pdb -n 100 -o traj.xtc

Builds the OpenMM System (amber14 for PDB/PDBx files, or the Amber prmtop or GROMACS .top given
as ``--topology``, with ``--coordinates``, whose box is used), runs
:class:`~integrations.openmm_simulation.SurrogateSimulation` with a progress bar and writes,
beside ``OUT``: ``OUT`` itself (all outputs appear under their final names only when the run
succeeds), ``<OUT stem>.csv`` (StateDataReporter: step, time, energies, temperature) and
``<OUT stem>.json`` (provenance: surrogate, checkpoint hash, inputs, guard summary, timings).
A run stopped with Ctrl-C or SIGTERM (``kill``, a batch scheduler's stop at the end of a job's
time) keeps the frames written so far under those names (``"interrupted": true`` and the signal
in the provenance, exit code 130 or 143 = 128 + the signal number; one stopped before its first
frame leaves no file); a run that fails leaves none, but one that could not write (a full disk)
after its first checkpoint keeps its frames for ``--resume``. A run holds ``.<OUT stem>.lock``
beside ``OUT``: a second run on the same ``OUT`` is refused. A signal that arrives while a frame
is being written is acted on once the frame (and its state-data line) is whole.

Stochastic jumps: ``--jump-noise FILE`` (a :class:`~surrogate_md.noise.JumpNoise` saved by
``python -m surrogate_md.evaluate ... --noise-out FILE``) adds a Gaussian draw of the model's
residuals to every jump (see :mod:`integrations.propagator`), its standard deviations times
``--noise-scale`` (default 1), drawn from a generator seeded by ``--seed`` (its own stream: the
velocity draws are the same with or without noise). The provenance records the noise
(``jump_noise``: its description and scale), and ``--resume`` refuses a run made with another
noise file (by content) or scale.

Resuming: with every frame (or every ``--checkpoint-every`` jumps) the run writes a checkpoint
beside ``OUT`` (:class:`RunCheckpoints`: ``.<OUT stem>.chk.json`` and two alternating OpenMM
checkpoints ``.<OUT stem>.0.chk``/``.1.chk`` with their ``.surrogate.npz``, the surrogate's own
state). The same command with ``--resume`` continues a run stopped by a signal (outputs under
their final names) or killed (outputs still under the hidden ``.partial`` names) from it: the
trajectory and state data are cut back to the checkpoint's frame and appended to, and the run
ends with the files an uninterrupted run writes, its provenance listing the parts (each part's
jumps, wall time and what stopped it: ``SIGINT``, ``SIGTERM``, ``killed``, or ``error: <reason>``
for a failed write such as a full disk). The checkpoint files are removed when the run
completes.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from integrations.guards import GuardConfig
from integrations.propagator import DEFAULT_SETTLE_ITERATIONS
from integrations.run_control import (
    EXIT_CODES,
    RESUME_FORMAT,
    FrameWriter,
    Outputs,
    RunCheckpoints,
    StopSignals,
    Terminated,
    plan_resume,
    provenance_of,
    remove_leftovers,
    reopen_outputs,
    resume_simulation,
    run_identity,
    run_lock,
)
from surrogate_md.errors import (
    DataError,
    EngineError,
    SurrogateMDError,
)
from surrogate_md.fileio import atomic_write_text

log = logging.getLogger(__name__)

FORMATS = (".xtc", ".dcd")
DEFAULT_FORCEFIELDS = ("amber14-all.xml", "amber14/tip3pfb.xml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m integrations.predict",
                                description="Advance a structure by learned surrogate jumps in "
                                            "OpenMM and write an XTC or DCD trajectory.")
    p.add_argument("checkpoint", help="surrogate checkpoint (best.pt/last.pt)")
    p.add_argument("--topology", required=True,
                   help="PDB/PDBx file (force field from --forcefield), Amber .prmtop or GROMACS "
                        ".top")
    p.add_argument("--coordinates", help="starting coordinates and box: PDB/PDBx, GROMACS .gro "
                                         "or Amber inpcrd/rst7 (default: the topology file's "
                                         "own coordinates)")
    p.add_argument("-n", "--jumps", type=int, required=True, help="number of learned jumps")
    p.add_argument("-o", "--output", required=True, help="trajectory file, .xtc or .dcd")
    p.add_argument("--platform", help="OpenMM platform (Reference, CPU, CUDA, OpenCL); "
                                      "default: OpenMM's fastest")
    p.add_argument("--md-steps", type=int, default=0,
                   help="hybrid mode: real MD steps before every jump (default 0: jumps only)")
    p.add_argument("--report-interval", type=int, default=1,
                   help="write a frame every this many jumps (default 1)")
    p.add_argument("--forcefield", nargs="+", default=list(DEFAULT_FORCEFIELDS),
                   help="OpenMM force-field XML files for PDB topologies (default: "
                        f"{' '.join(DEFAULT_FORCEFIELDS)})")
    p.add_argument("--cutoff-nm", type=float,
                   help="nonbonded cutoff, nm: of PME in a box (default: OpenMM's, 1 nm; every "
                        "box edge must be at least twice it), or without a box a reaction-field "
                        "cutoff instead of exact electrostatics (default: none)")
    p.add_argument("--guard", default="raise", choices=("raise", "warn", "fallback", "relax"),
                   help="what to do when a jump fails a guard (default raise: stop)")
    p.add_argument("--relax-iterations", type=int, default=GuardConfig.relax_iterations,
                   metavar="N", help="--guard relax: at most N minimiser iterations per "
                   "relaxation, all stages together (default %(default)s; in implicit solvent "
                   "most are ~10x cheaper iterations without the solvent force: 500 costs a "
                   "protein less than the fallback MD of relaxations that run out)")
    p.add_argument("--no-size-guard", action="store_true",
                   help="leave out the guards' size check (the radius of gyration of the "
                   "predicted atoms within the range of the training frames, widened): for "
                   "model atoms that are several molecules free to drift apart, or a run meant "
                   "to leave the training data's shapes (folding, unfolding)")
    p.add_argument("--redraws", type=int, default=0, metavar="N",
                   help="with --jump-noise: a draw that would fall back to MD (it fails the "
                   "guards under --guard fallback, or its relaxation fails under --guard relax) "
                   "is drawn again, up to N times per jump, before the MD stands in (default 0; "
                   "in implicit solvent the relaxation of a draw that may be drawn again stops "
                   "after its solvent-free stages; only the last draw's goes on in the full "
                   "force field)")
    p.add_argument("--settle-iterations", type=int, default=DEFAULT_SETTLE_ITERATIONS,
                   metavar="N", help="after every jump, at most N minimiser iterations settle "
                   "the atoms the model does not predict, the predicted ones held as predicted "
                   "(0: off; default %(default)s; above 10 in stages of 10, 20, 40, ... that "
                   "stop once the jump end passes the energy check: e.g. 80 for a backbone "
                   "model's side chains)")
    p.add_argument("--temperature-K", type=float, default=300.0,
                   help="initial velocities and hybrid/fallback MD temperature (default 300)")
    p.add_argument("--end-velocities", default="difference", choices=("difference", "thermal"),
                   help="velocities of each kept jump's end state (the next jump's input): the "
                        "backward difference over the last output spacing, or Maxwell-Boltzmann "
                        "draws at --temperature-K (reporters then show a thermal kinetic energy); "
                        "default difference")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities, of "
                                                       "thermal end velocities, of the jump "
                                                       "noise and of the MD integrator's "
                                                       "random forces (default 0)")
    p.add_argument("--jump-noise", metavar="FILE",
                   help="stochastic jumps: a jump-noise .npz fitted for this checkpoint "
                        "(python -m surrogate_md.evaluate ... --noise-out FILE); every jump "
                        "adds a Gaussian draw of the model's residuals (default: deterministic "
                        "jumps)")
    p.add_argument("--noise-scale", type=float, default=1.0, metavar="X",
                   help="multiply the --jump-noise standard deviations by X >= 0 (default 1: "
                        "as fitted; 0: deterministic jumps)")
    p.add_argument("--minimize", action="store_true", help="minimise the energy first")
    p.add_argument("--device", default="auto",
                   help="torch device of the surrogate: cpu, cuda or auto (default: CUDA when "
                        "present, as for training and evaluation)")
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile: the first two jumps compile "
                        "(seconds to a minute; cached on disk for later runs), then model calls "
                        "are faster (1.7x for an AdK backbone EGNO on two CPU cores, its "
                        "guarded jumps 1.9x); for runs of hundreds of jumps")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--resume", action="store_true",
                   help="continue this command's run stopped by SIGTERM, Ctrl-C or a kill from "
                        "its last checkpoint, appending to its trajectory and state data (give "
                        "the same options and files); a finished run has nothing to do")
    p.add_argument("--checkpoint-every", type=int, metavar="JUMPS",
                   help="write the resume checkpoint every this many jumps, a multiple of "
                        "--report-interval (default: with every frame); a resume recomputes "
                        "the frames written after the last one")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def load_system(topology: str, coordinates: str | None, forcefields: list[str],
                cutoff_nm: float | None = None):
    """(openmm.app.Topology, System, positions, box) from a PDB/PDBx, an Amber prmtop or a
    GROMACS .top (+ coordinates).

    ``box`` is the periodic box of the coordinates (``--coordinates`` when given, else the
    topology file's own), or ``None``; the caller sets it on a periodic System's context, so
    coordinates equilibrated at constant pressure run in their own box. ``cutoff_nm``: the
    nonbonded cutoff (PME in a box, default OpenMM's; without a box, CutoffNonPeriodic instead
    of NoCutoff).

    Raises:
        DataError: unreadable files, atoms that do not match, or a box narrower than twice the
            nonbonded cutoff (OpenMM would refuse it with a bare exception).
    """
    from openmm import app, unit

    top_path = Path(topology)
    if not top_path.is_file():
        raise DataError(f"{top_path}: no such topology file; give a PDB/PDBx, an Amber prmtop or "
                        "a GROMACS .top")
    coord_path = Path(coordinates) if coordinates else None
    if coord_path is not None and not coord_path.is_file():
        raise DataError(f"{coord_path}: no such coordinate file")
    if cutoff_nm is not None and not (np.isfinite(cutoff_nm) and cutoff_nm > 0):
        raise DataError(f"--cutoff-nm must be a positive length in nm, got {cutoff_nm}")
    cutoff = {} if cutoff_nm is None else {"nonbondedCutoff": cutoff_nm * unit.nanometer}
    suffix = top_path.suffix.lower()
    amber = suffix in (".prmtop", ".parm7") or (suffix == ".top" and _is_amber_prmtop(top_path))
    box_path = coord_path
    try:
        if amber or suffix == ".top":
            kind = "an Amber prmtop" if amber else "a GROMACS topology"
            if coord_path is None:
                raise DataError(f"{top_path}: {kind} has no coordinates; pass --coordinates "
                                f"{'FILE.inpcrd' if amber else 'FILE.gro'}")
            positions, box, names = _coordinates(coord_path)
            if amber:
                top_file = app.AmberPrmtopFile(str(top_path))
            else:  # #include files resolve beside the .top, then in $GMXDATA/top (or the
                # share/gromacs/top of the gmx on PATH)
                top_file = app.GromacsTopFile(str(top_path), periodicBoxVectors=box)
            system = top_file.createSystem(nonbondedMethod=_method(box, cutoff_nm),
                                           constraints=app.HBonds, **cutoff)
            top = top_file.topology
        else:
            structure = (app.PDBxFile if suffix in (".cif", ".pdbx") else app.PDBFile)(
                str(top_path))
            positions, box = structure.positions, structure.topology.getPeriodicBoxVectors()
            names = None
            if coord_path is not None:
                positions, coord_box, names = _coordinates(coord_path)
                box = coord_box if coord_box is not None else box
                box_path = coord_path if coord_box is not None else top_path
            else:
                box_path = top_path
            top = structure.topology
            if box is not None:
                top.setPeriodicBoxVectors(box)
            ff = app.ForceField(*forcefields)
            system = ff.createSystem(top, nonbondedMethod=_method(box, cutoff_nm),
                                     constraints=app.HBonds, **cutoff)
    except SurrogateMDError:
        raise
    except Exception as exc:  # OpenMM's readers raise bare Exceptions, IndexError on junk
        raise DataError(f"{top_path}: cannot build an OpenMM System ({type(exc).__name__}: "
                        f"{exc}); check the file and --forcefield (PDB), or give an Amber prmtop "
                        "or a GROMACS .top whose #include files are beside it or under "
                        "$GMXDATA/top") from exc
    if len(positions) != system.getNumParticles():
        raise DataError(f"{coord_path or top_path}: {len(positions)} atoms but the System of "
                        f"{top_path} has {system.getNumParticles()}; give coordinates of the same "
                        "system")
    _check_atom_order(coord_path, names, [a.name for a in top.atoms()], top_path)
    _check_box(system, box, box_path)
    return top, system, positions, box


def _method(box, cutoff_nm: float | None):
    """Nonbonded method: PME in a box; without one, exact (no cutoff) unless ``--cutoff-nm``
    asks for a cutoff (as ``python -m datagen openmm --cutoff-nm`` does for vacuum systems)."""
    from openmm import app

    if box is not None:
        return app.PME
    return app.NoCutoff if cutoff_nm is None else app.CutoffNonPeriodic


def _check_box(system, box, box_path: Path | None) -> None:
    """A periodic System's box must be at least twice its nonbonded cutoff wide along every
    axis (OpenMM's own test: the diagonal of the reduced box vectors), or OpenMM refuses it
    with a bare exception when the Context is made or the box set."""
    from openmm import unit

    if box is None:
        return
    cutoffs = []
    for force in system.getForces():
        try:
            if force.usesPeriodicBoundaryConditions() and hasattr(force, "getCutoffDistance"):
                cutoffs.append(force.getCutoffDistance().value_in_unit(unit.nanometer))
        except Exception:  # OpenMM raises a bare Exception where a force does not implement it
            continue
    if not cutoffs:
        return
    cutoff = max(cutoffs)
    widths = [box[i][i].value_in_unit(unit.nanometer) for i in range(3)]
    axis = int(np.argmin(widths))
    if widths[axis] < 2 * cutoff:
        raise DataError(
            f"{box_path}: the periodic box is {widths[axis]:.4g} nm wide along "
            f"{'xyz'[axis]}, less than twice the nonbonded cutoff of {cutoff:.4g} nm "
            f"({2 * cutoff:.4g} nm), which OpenMM cannot run; solvate the system in a box at "
            f"least {2 * cutoff:.4g} nm wide, or pass a smaller --cutoff-nm (at most "
            f"{widths[axis] / 2:.4g} nm), or, for a solute in vacuum, give coordinates without "
            "a box (no CRYST1 record in a PDB, a 0 0 0 box line in a .gro) to run without "
            "periodic boundaries")


def _check_atom_order(coord_path: Path | None, names: list[str] | None, top_names: list[str],
                      top_path: Path) -> None:
    """Coordinates whose atom names are the topology's in another order hold the atoms in
    another order: every position would go to another atom."""
    if coord_path is None or names is None or len(names) != len(top_names):
        return
    a = [n.strip().upper() for n in names]
    b = [n.strip().upper() for n in top_names]
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if differ and sorted(a) == sorted(b):
        i = differ[0]
        raise DataError(f"{coord_path}: atoms in another order than in {top_path} ({len(differ)} "
                        f"differ; atom {i + 1} is {names[i].strip()}, the topology's "
                        f"{top_names[i].strip()}); write the coordinates in the topology's atom "
                        "order")


def _is_amber_prmtop(path: Path) -> bool:
    """Amber prmtops sometimes end in .top, like GROMACS topologies: tell them by content."""
    with open(path, errors="replace") as fh:
        return fh.read(512).lstrip().startswith(("%VERSION", "%FLAG"))


def _coordinates(path: Path):
    """(positions, box or None, atom names or None) from PDB/PDBx, GROMACS .gro or Amber
    inpcrd/rst7. A box with an edge under 2 Å (the 0 0 0 of a vacuum .gro, the 1 Å CRYST1
    placeholder of some writers) is no box."""
    from openmm import app, unit

    def real(box):
        if box is None:
            return None
        edges = [np.linalg.norm(v.value_in_unit(unit.nanometer)) for v in box]
        if min(edges) < 0.2:
            log.info("%s: box edges %s nm taken for no box (a placeholder)", path,
                     [round(float(e), 3) for e in edges])
            return None
        return box

    suffix = path.suffix.lower()
    try:
        if suffix in (".inpcrd", ".rst7", ".crd", ".rst"):
            crd = app.AmberInpcrdFile(str(path))
            return crd.positions, real(crd.boxVectors), None
        if suffix == ".gro":
            gro = app.GromacsGroFile(str(path))
            return gro.positions, real(gro.getPeriodicBoxVectors()), list(gro.atomNames)
        if suffix in (".cif", ".pdbx", ".pdb"):
            f = (app.PDBFile if suffix == ".pdb" else app.PDBxFile)(str(path))
            return (f.positions, real(f.topology.getPeriodicBoxVectors()),
                    [a.name for a in f.topology.atoms()])
    except Exception as exc:  # OpenMM's readers raise bare Exceptions
        raise DataError(f"{path}: unreadable coordinates ({type(exc).__name__}: {exc}); give a "
                        "valid PDB, PDBx, GROMACS .gro or Amber inpcrd/rst7 file") from exc
    raise DataError(f"{path}: unsupported coordinate format {suffix!r}; use PDB, PDBx, GROMACS "
                    ".gro or Amber inpcrd/rst7")


def start_simulation(sim, args: argparse.Namespace, positions, box) -> None:
    """A new run's starting state: the coordinates (in their box), minimised if asked,
    velocities at ``--temperature-K``, and a history model's input history, built by MD before
    the reporters are attached, after which the clock starts."""
    from openmm import unit

    if box is not None and sim.system.usesPeriodicBoundaryConditions():
        sim.context.setPeriodicBoxVectors(*box)
    sim.context.setPositions(positions)
    if args.minimize:
        sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(args.temperature_K * unit.kelvin, args.seed)
    warm = sim.prepare_history(reset_clock=True)  # before the reporters: frames on time
    if warm:
        log.info("history model: %g ps of MD built its input history; the run's clock starts "
                 "after it", warm)


def run(args: argparse.Namespace) -> dict:
    """Run the prediction described by parsed ``args``; returns the provenance dict."""
    outputs = Outputs(Path(args.output))
    out = outputs.out
    if out.suffix.lower() not in FORMATS:
        raise DataError(f"{out}: output must end in .xtc or .dcd")
    if not out.parent.is_dir():
        raise DataError(f"{out}: directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise DataError(f"{out}: directory {out.parent} is not writable; check its permissions "
                        "or choose another -o")
    if args.resume and args.overwrite:
        raise DataError(f"{out}: --resume continues the run written there and --overwrite "
                        "replaces it; pass one of them")
    with run_lock(out):  # one run at a time on OUT, from its checks to its last file
        return _run(args, outputs)


def _run(args: argparse.Namespace, outputs: Outputs) -> dict:
    """:func:`run` under the lock of ``OUT``."""
    import openmm
    from openmm import app, unit

    from integrations.openmm_simulation import SurrogateSimulation, default_step_ps
    from surrogate_md.surrogate import Surrogate

    out = outputs.out
    checkpoints = RunCheckpoints(out, outputs.tmp_traj, outputs.tmp_csv)
    if not args.resume:
        for path in (out, outputs.csv, outputs.json):
            if path.exists() and not args.overwrite:
                raise DataError(f"{path}: file exists; pass --overwrite or choose another -o "
                                "(or --resume to continue an interrupted run)")
        if (checkpoints.record_path.exists() and outputs.tmp_traj.exists()
                and not args.overwrite):  # a killed run's frames: never lost unasked
            raise DataError(f"{outputs.tmp_traj}: an unfinished run (killed) left its frames "
                            f"and checkpoint {checkpoints.record_path.name} here; pass --resume "
                            "to continue it, or --overwrite to start over")
    if args.jumps < 1 or args.report_interval < 1:
        raise DataError("-n/--jumps and --report-interval must be >= 1")
    if not (np.isfinite(args.noise_scale) and args.noise_scale >= 0):
        raise DataError(f"--noise-scale must be a finite number >= 0, got {args.noise_scale}")
    if args.noise_scale != 1.0 and not args.jump_noise:
        raise DataError(f"--noise-scale {args.noise_scale:g} scales the jump noise, and no "
                        "--jump-noise FILE was given; pass one, or leave --noise-scale out")
    if args.redraws < 0:
        raise DataError(f"--redraws must be >= 0 (0: fall back to MD at once), got "
                        f"{args.redraws}")
    if args.redraws and not args.jump_noise:
        raise DataError(f"--redraws {args.redraws} draws a stochastic jump again, and no "
                        "--jump-noise FILE was given; pass one, or leave --redraws out")
    if args.report_interval > args.jumps:
        raise DataError(f"--report-interval {args.report_interval} is more than the "
                        f"{args.jumps} jumps (-n): no frame would be written; use a "
                        "--report-interval of at most -n")
    every = args.checkpoint_every or args.report_interval
    if every < 1 or every % args.report_interval:
        raise DataError(f"--checkpoint-every {every} is not a positive multiple of "
                        f"--report-interval {args.report_interval}: checkpoints are written "
                        "with trajectory frames; use a multiple of it")
    surrogate = Surrogate.load(args.checkpoint, device=args.device, compile=args.compile)
    if surrogate.needs_history and not args.md_steps and not surrogate.history_fits_grid():
        raise DataError(
            f"{args.checkpoint}: this {surrogate.name} takes history frames "
            f"{surrogate.history_stride_ps:g} ps apart but predicts frames at "
            f"{surrogate.times_ps.tolist()} ps, so every jump would first run MD to rebuild its "
            "history, time that the XTC/DCD reporters (which stamp frames by count) cannot "
            "show: the files' times would be wrong. Use a model trained with a history stride "
            "that is a multiple of the output spacing, or run SurrogateSimulation from Python")
    topology, system, positions, box = load_system(args.topology, args.coordinates,
                                                   args.forcefield, args.cutoff_nm)
    jump_noise = None
    if args.jump_noise:
        from surrogate_md.noise import JumpNoise

        jump_noise = JumpNoise.load(args.jump_noise)  # checked against the model by the engine
    identity = run_identity(args, surrogate)
    record = plan_resume(outputs, checkpoints, identity) if args.resume else None
    if args.resume and record is None:
        return {**provenance_of(outputs.json), "signal": None}  # finished: nothing to do
    platform = None
    if args.platform:
        try:
            platform = openmm.Platform.getPlatformByName(args.platform)
        except Exception as exc:  # OpenMM raises a bare Exception for unknown platforms
            names = [openmm.Platform.getPlatform(i).getName()
                     for i in range(openmm.Platform.getNumPlatforms())]
            raise EngineError(f"OpenMM platform {args.platform!r} is not available here; "
                              f"choose one of {names}") from exc
    # SurrogateSimulation's default integrator, seeded: the same --seed gives the same run, MD
    # included (a history model's warm-up, hybrid segments, fallbacks). OpenMM reads the seed
    # when the Context is made, and takes 0 for "pick one"
    integrator = openmm.LangevinMiddleIntegrator(
        args.temperature_K * unit.kelvin, 1.0 / unit.picosecond,
        default_step_ps(surrogate.times_ps) * unit.picosecond)
    integrator.setRandomNumberSeed(args.seed + 1)
    sim = SurrogateSimulation(topology, system, surrogate, integrator, platform=platform,
                              guards=GuardConfig(action=args.guard,
                                                 relax_iterations=args.relax_iterations,
                                                 gyration_range_A=(0.0, float("inf"))
                                                 if args.no_size_guard else None),
                              md_steps=args.md_steps,
                              temperature_K=args.temperature_K,
                              end_velocities=args.end_velocities, velocity_seed=args.seed,
                              jump_noise=jump_noise, noise_scale=args.noise_scale,
                              noise_seed=args.seed, redraws=args.redraws,
                              settle_iterations=args.settle_iterations,
                              progress=True)
    if record is not None:
        resume_simulation(sim, record, checkpoints)
    else:
        start_simulation(sim, args, positions, box)
    interval = args.report_interval * (sim.steps_per_jump + args.md_steps)
    checkpoints.base = {"format_version": RESUME_FORMAT, "identity": identity,
                        "platform": sim.context.getPlatform().getName(),
                        "report_interval": args.report_interval}
    done = record["jumps_done"] if record else 0
    reporter_cls = app.XTCReporter if out.suffix.lower() == ".xtc" else app.DCDReporter
    frames_total = args.jumps // args.report_interval
    with StopSignals() as stop:  # from the first partial file on, SIGTERM acts as Ctrl-C
        traj = writer = None
        interrupted = None  # the signal that stopped the run, if one did
        start = time.perf_counter()
        try:
            remove_leftovers(outputs, checkpoints)
            if record is None:
                if checkpoints.record_path.exists():
                    log.warning("%s: discarding the checkpoint of an unfinished run",
                                checkpoints.record_path)
                checkpoints.remove()
            else:
                reopen_outputs(record, outputs, checkpoints, sim, interval)
            resumed = record is not None
            traj = reporter_cls(str(outputs.tmp_traj), interval, append=resumed)
            with open(outputs.tmp_csv, "a" if resumed else "w") as csv_file:
                writer = FrameWriter([traj, app.StateDataReporter(
                    csv_file, interval, step=True, time=True, potentialEnergy=True,
                    kineticEnergy=True, temperature=True, append=resumed)], interval, stop,
                    checkpoints, every // args.report_interval,
                    frames=record["frames"] if record else 0)
                sim.reporters.append(writer)
                start = time.perf_counter()
                checkpoints.clock = start
                try:
                    sim.step(args.jumps - done)
                finally:
                    stop.hold()
        except KeyboardInterrupt as exc:
            # a signal anywhere from the first partial file to the hold: as a Ctrl-C'd
            # Simulation leaves what its reporters wrote, the frames so far are kept (under the
            # names asked for) and the provenance says the run was cut short; the checkpoint
            # stays for --resume. Only one signal raises: this clean-up is not cut
            stop.hold()
            sim.reporters.clear()
            name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
            if writer is None or writer.frames == 0:  # no frame of this run's yet
                _close(traj)
                if record is None:  # nothing written: nothing left behind
                    for tmp in (outputs.tmp_traj, outputs.tmp_csv):
                        tmp.unlink(missing_ok=True)
                    checkpoints.remove()
                    log.warning("interrupted (%s) before the first frame: nothing was written; "
                                "rerun the command to start over", name)
                else:
                    log.warning("interrupted (%s) while the resumed run prepared its files; "
                                "the same command with --resume continues it", name)
                raise
            if sim.n_jumps + sim.n_fallbacks == args.jumps and writer.frames == frames_total:
                log.warning("%s arrived as the run ended: finishing its outputs", name)
            else:
                interrupted = name
                kept = checkpoints.record["frames"] if checkpoints.record else 0
                if kept:
                    how = ("the same command with --resume continues it from its checkpoint "
                           f"at frame {kept}")
                else:
                    how = (f"it stopped before its first checkpoint (--checkpoint-every {every}),"
                           " so --resume cannot continue it: rerun the command with "
                           "--overwrite to start over")
                log.warning("interrupted (%s) after %d of %d jumps: keeping the %d frames "
                            "written so far; %s", name, sim.n_jumps + sim.n_fallbacks,
                            args.jumps, writer.frames, how)
        except BaseException as exc:
            stop.hold()
            sim.reporters.clear()
            _close(traj)
            remove_leftovers(outputs, checkpoints)  # a write that failed may leave its own
            resumable = record is not None or checkpoints.record is not None
            if not resumable:  # a fresh run that fails before its first checkpoint leaves nothing
                for tmp in (outputs.tmp_traj, outputs.tmp_csv):
                    tmp.unlink(missing_ok=True)
                checkpoints.remove()
            elif record is not None or isinstance(exc, OSError):
                # the earlier parts' frames are not this run's to delete; those of a run that
                # could not write (disk full) go on once there is room
                checkpoints.mark_stopped(_failure_name(exc))
                log.error("the %s failed; its frames so far stay in %s and %s with the "
                          "checkpoint %s, for --resume once the cause is fixed",
                          "resumed run" if record is not None else "run", outputs.tmp_traj,
                          outputs.tmp_csv, checkpoints.record_path.name)
            else:  # another failure of a fresh run would come back: nothing to resume
                for tmp in (outputs.tmp_traj, outputs.tmp_csv):
                    tmp.unlink(missing_ok=True)
                checkpoints.remove()
                resumable = False
            if isinstance(exc, OSError):
                raise _write_error(exc, outputs, resumable) from exc
            raise
        wall = time.perf_counter() - start
        _close(traj)
        sim.guards.log_summary()
        if interrupted:  # the part goes as far as a resume keeps
            end = checkpoints.record["jumps_done"] if checkpoints.record else done
        else:
            end = args.jumps
        parts = [*checkpoints.parts, checkpoints.part(end, interrupted)]
        summary = sim.summary()
        if interrupted:
            # a signal that arrived while a jump's last frame was written stops the run before
            # the jump is counted: the files hold it, so the provenance counts it
            summary["jumps"] += max(0, writer.frames * args.report_interval
                                    - sim.n_jumps - sim.n_fallbacks)
        provenance = {"command": "python -m integrations.predict", "argv": vars(args),
                      "output": out.name, "state_data": outputs.csv.name,
                      "wall_s": sum(p["wall_s"] for p in parts),
                      "openmm": openmm.__version__, "interrupted": interrupted is not None,
                      "signal": interrupted, "frames": writer.frames, "parts": parts,
                      "resume_identity": identity, **summary}
        try:
            os.replace(outputs.tmp_traj, out)
            os.replace(outputs.tmp_csv, outputs.csv)
            atomic_write_text(outputs.json, json.dumps(provenance, indent=2, default=str))
        except OSError as exc:
            raise _write_error(exc, outputs, checkpoints.record is not None) from exc
        if not interrupted:
            checkpoints.remove()
            remove_leftovers(outputs, checkpoints)
    log.info("wrote %s (%d jumps, %.4g ps) in %.1f s", out, sim.n_jumps + sim.n_fallbacks,
             provenance["time_ps"], wall)
    return provenance


def _close(traj) -> None:
    """Close the file a DCDReporter keeps open (an XTCReporter opens it for each frame)."""
    out = getattr(traj, "_out", None)
    if out is not None:
        out.close()


def _failure_name(exc: BaseException) -> str:
    """What stopped a failed part, for the provenance's parts: ``error: <reason>``."""
    if isinstance(exc, OSError):
        return f"error: {exc.strerror or type(exc).__name__}"
    return f"error: {type(exc).__name__}"


def _write_error(exc: OSError, outputs: Outputs, resumable: bool) -> DataError:
    """The error of a run whose outputs could not be written (a full disk, a quota)."""
    where = exc.filename or outputs.out
    cause = ("free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
             else "fix the cause")
    if resumable:
        fix = (f"its frames up to the last checkpoint are kept: {cause} and rerun the command "
               "with --resume")
    else:
        fix = (f"it wrote no checkpoint, so its partial files were removed: {cause} and rerun "
               "the command")
    return DataError(f"{where}: writing the run's outputs failed ({exc.strerror or exc}); {fix}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        stopped_by = run(args).get("signal")
        if stopped_by:
            return EXIT_CODES[stopped_by]  # the shell's code for a process ended by it
    except Terminated:  # before the first jump, or while a resume prepared its files
        return EXIT_CODES["SIGTERM"]
    except KeyboardInterrupt:
        return EXIT_CODES["SIGINT"]
    except SurrogateMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # one the run did not name (reading an input, say)
        print(f"error: {exc.filename or args.output}: {exc.strerror or exc}; check the path, "
              "its permissions and the free space", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
