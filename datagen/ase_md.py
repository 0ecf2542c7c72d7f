"""Produce MD datasets with ASE: any ASE calculator, Langevin / velocity Verlet / Bussi dynamics.

Frames hold positions (Å), velocities (Å/ps, converted from ASE's time unit with ``ase.units``),
forces (kJ/mol/Å) and potential energies (kJ/mol, from eV with ``ase.units``). Non-periodic systems
start with zero total linear and angular momentum; ``bussi`` (the default, a stochastic velocity
rescaling thermostat) and ``verlet`` keep them zero, ``langevin`` does not. The thermostat and the
initial velocities count the kinetic degrees of freedom that remain (3N - 6 in vacuum, 3N - 3
periodic, 3N with Langevin; ``metadata["kinetic_dof"]``), so the molecule's temperature is T.

Long runs checkpoint every ``checkpoint_frames`` frames: the ``.partial`` dataset is flushed and
the dynamics state (positions, momenta, cell, the thermostat's random-number state and the step
count) goes to a small ``out.chk.npz`` sidecar, so that a killed run resumes with ``resume=True``
where it stopped, on the same trajectory and a continuous time axis.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datagen.ingest import ase_velocity_to_A_per_ps, ev_to_kj_per_mol
from datagen.interrupts import raise_if_interrupted
from datagen.runs import frame_steps, plan_run
from surrogate_md.data.h5md import Topology, TrajectoryWriter
from surrogate_md.errors import CheckpointError, ConfigError, DataError, EngineError

log = logging.getLogger(__name__)

INTEGRATORS = ("langevin", "verlet", "bussi")
CALCULATORS = ("emt", "lj", "xtb")
#: Lennard-Jones parameters of argon (sigma Å, epsilon eV), for ``calculator="lj"``.
LJ_ARGON = {"sigma": 3.405, "epsilon": 0.0103, "rc": 10.0}
#: Atoms closer than this (Å, periodic images included) make a structure unusable.
MIN_DISTANCE_A = 0.5
#: Metadata entries that must agree between an interrupted run and its resumption.
RESUME_KEYS = ("method", "formula", "source_files", "temperature_K", "step_fs", "interval_ps",
               "seed", "integrator", "friction_per_ps", "solvent")


def ase_ps() -> float:
    """One picosecond in ASE's time unit."""
    # Å per ASE time unit -> Å/ps multiplies by the number of ASE time units in a ps.
    return ase_velocity_to_A_per_ps()


def make_calculator(name: str):
    """An ASE calculator by name: ``emt``, ``lj`` (argon parameters) or ``xtb`` (GFN2-xTB)."""
    key = name.lower()
    if key == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if key == "lj":
        from ase.calculators.lj import LennardJones

        return LennardJones(**LJ_ARGON)
    if key in ("xtb", "gfn2", "gfn2-xtb"):
        try:
            from tblite.ase import TBLite
        except ImportError as exc:
            raise EngineError("calculator 'xtb' needs tblite: pip install 'surrogate-md[xtb]'") \
                from exc
        return TBLite(method="GFN2-xTB", verbosity=0)
    raise ConfigError(f"calculator={name!r} is not one of {CALCULATORS}; or pass an ASE "
                      "Calculator instance to run_ase")


def load_atoms(atoms_or_name):
    """An ``ase.Atoms`` from an Atoms object, an ``ase.build.molecule`` name or a structure file."""
    from ase import Atoms

    if isinstance(atoms_or_name, Atoms):
        return atoms_or_name.copy()
    text = str(atoms_or_name)
    path = Path(text)
    if path.is_file():
        import ase.io

        try:
            return ase.io.read(text)
        except Exception as exc:  # ASE raises many types for unreadable files
            raise DataError(f"{path}: unreadable by ase.io ({exc}); give an xyz/extxyz/traj/pdb "
                            "file") from exc
    from ase.build import molecule
    from ase.build.molecule import extra
    from ase.collections import g2

    if text in g2.names or text in extra:
        return molecule(text)
    raise DataError(f"{text}: neither a file nor an ase.build.molecule name (e.g. H2O, CH3CH2OH, "
                    "C6H6); check the path or name")


def check_no_overlaps(atoms, source: Any) -> None:
    """Refuse a structure with two atoms (or an atom and a periodic image) closer than
    :data:`MIN_DISTANCE_A`: no chemistry puts nuclei that close, but a cell smaller than the
    structure does (the placeholder ``CRYST1 1.000 1.000 1.000`` that MDAnalysis and other tools
    write into PDB files without a box, which ``ase.io`` reads as a periodic 1 Å cell)."""
    from ase.neighborlist import neighbor_list

    if len(atoms) < 2 and not atoms.pbc.any():
        return
    i, j, d = neighbor_list("ijd", atoms, MIN_DISTANCE_A)
    if not len(d):
        return
    k = int(np.argmin(d))
    where = f"atoms {i[k]} and {j[k]}" if i[k] != j[k] else f"atom {i[k]} and its periodic image"
    name = _structure_label(source)
    if atoms.pbc.any():
        lengths = ", ".join(f"{x:.4g}" for x in atoms.cell.lengths())
        raise DataError(
            f"{name}: {where} are {d[k]:.3g} Å apart under periodic boundaries: the cell "
            f"(edges {lengths} Å) is smaller than the structure, e.g. a placeholder CRYST1 record "
            "of a file without a box; for a molecule in vacuum remove the CRYST1 line (or set "
            "atoms.pbc = False), else give the real cell")
    raise DataError(f"{name}: {where} are {d[k]:.3g} Å apart; the structure has overlapping "
                    "atoms: fix the coordinates")


def _structure_label(source: Any) -> str:
    """How errors name a structure: its file or molecule name, or the formula of an Atoms."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    formula = getattr(source, "get_chemical_formula", None)
    return f"the {formula()} structure" if formula is not None else "the structure"


def run_ase(atoms_or_name: Any, calculator: Any = "emt",
            out: str | os.PathLike = "ase.h5", *,
            frames: int = 1000,
            interval_ps: float | None = None,
            step_fs: float | None = None,
            temperature_K: float | None = None,
            seed: int = 0,
            integrator: str = "bussi",
            friction_per_ps: float = 1.0,
            checkpoint_frames: int = 1000,
            resume: bool = False,
            overwrite: bool = False,
            progress: bool | None = None,
            frame_callback: Callable[[int], None] | None = None,
            command: str | None = None) -> Path:
    """Run ASE MD and save every ``interval_ps`` to a canonical dataset file.

    Args:
        atoms_or_name: ``ase.Atoms``, an ``ase.build.molecule`` name or a structure file
            (refused when atoms overlap, periodic images included: a placeholder cell; a
            periodic structure stored wrapped starts with its molecules made whole).
        calculator: ``"emt"``, ``"lj"``, ``"xtb"`` or an ASE Calculator instance.
        out: output ``.h5`` (written as ``out.partial``, renamed when complete).
        frames: saved frames (the first is the start, at t = 0).
        interval_ps: saved-frame interval (default: every step), a whole number of steps.
        step_fs: time step (default 0.5 fs).
        temperature_K: initial Maxwell-Boltzmann and thermostat temperature (default 300 K).
        seed: initial velocities and thermostat noise.
        integrator: ``bussi`` (CSVR, keeps zero momenta), ``langevin`` or ``verlet`` (NVE).
        friction_per_ps: Langevin friction; for Bussi the coupling time is ``1/friction_per_ps``.
        checkpoint_frames: flush the dataset and save the dynamics state every this many frames.
        resume: continue an interrupted run from ``out.partial`` and ``out.chk.npz`` (the same
            settings are required; a calculator instance must be an equivalent one).
        overwrite: replace an existing ``out``.
        progress: tqdm bar (default: when attached to a terminal).
        frame_callback: called with the index of each saved frame (for monitoring; raising stops
            the run and keeps what was checkpointed for ``resume``).
        command: the command to record in metadata (default ``sys.argv``).

    Returns:
        Path of the dataset: positions (F, N, 3) Å, velocities Å/ps, forces kJ/mol/Å, potential
        energy (F,) kJ/mol, time (F,) ps = frame * interval_ps.
    """
    import ase
    from ase.md import velocitydistribution as vd
    from tqdm.auto import tqdm

    if frames < 1:
        raise ConfigError(f"frames={frames} must be at least 1")
    if checkpoint_frames < 1:
        raise ConfigError(f"checkpoint_frames={checkpoint_frames} must be at least 1")
    step_fs = 0.5 if step_fs is None else float(step_fs)
    temperature_K = 300.0 if temperature_K is None else float(temperature_K)
    if not (temperature_K >= 0 and math.isfinite(temperature_K)):
        raise ConfigError(f"temperature_K={temperature_K} must be >= 0")
    if interval_ps is None:
        from openmm import unit

        interval_ps = (step_fs * unit.femtosecond).value_in_unit(unit.picosecond)
    steps_per_frame = frame_steps(interval_ps, step_fs)
    if integrator not in INTEGRATORS:
        raise ConfigError(f"integrator={integrator!r} is not one of {INTEGRATORS}")
    if not (friction_per_ps > 0 and math.isfinite(friction_per_ps)):
        raise ConfigError(f"friction_per_ps={friction_per_ps} must be a positive number of 1/ps; "
                          "pass e.g. friction_per_ps=1 (CLI: --friction-per-ps 1)")
    atoms = load_atoms(atoms_or_name)
    check_no_overlaps(atoms, atoms_or_name)
    calc_name = calculator if isinstance(calculator, str) else type(calculator).__name__
    atoms.calc = make_calculator(calculator) if isinstance(calculator, str) else calculator
    rng = np.random.default_rng(seed)
    periodic = bool(atoms.pbc.any())
    # from the starting structure, before a resumed run overwrites the positions
    dof = kinetic_dof(atoms, integrator)
    from datagen.atoms import infer_bonds, infer_bonds_periodic, make_whole

    z = atoms.numbers.astype(np.int64)
    bonds = infer_bonds(z, atoms.positions)
    if periodic and atoms.cell.rank == 3:
        # a structure stored wrapped has molecules split across the cell: bond them under the
        # minimum image and start from them whole (ASE's MD does not wrap, so they stay whole);
        # bonds spanning the cell (crystals) keep the structure as it is
        mic_bonds, vectors = infer_bonds_periodic(z, atoms.positions, atoms.cell[:], atoms.pbc)
        whole = make_whole(atoms.positions, mic_bonds, vectors)
        if whole is not None:
            atoms.set_positions(whole, apply_constraint=False)
            bonds = mic_bonds
    topology = Topology.from_elements(z, atoms.get_masses(), bonds)
    metadata = {
        "engine": "ase", "engine_version": ase.__version__, "method": calc_name,
        "temperature_K": temperature_K, "step_fs": step_fs, "interval_ps": float(interval_ps),
        "steps_per_frame": steps_per_frame, "seed": int(seed), "integrator": integrator,
        "friction_per_ps": friction_per_ps if integrator != "verlet" else None,
        "kinetic_dof": dof,
        "solvent": "vacuum" if not periodic else "periodic",
        "source_files": [str(atoms_or_name)] if isinstance(atoms_or_name, (str, os.PathLike))
        else [], "formula": atoms.get_chemical_formula(),
        "command": command if command is not None else shlex.join(sys.argv),
    }
    out = Path(out)
    state, partial, chk_path = plan_run(out, metadata, RESUME_KEYS, resume=resume,
                                        overwrite=overwrite, frames=frames)
    if state == "done":
        return out
    resuming = state == "resume"

    start_frame = 0
    if resuming:
        start_frame, dyn_state = _load_state(chk_path, atoms, steps_per_frame)
        if frames < start_frame:
            raise ConfigError(f"{partial}: the unfinished run already holds {start_frame} frames, "
                              f"more than the {frames} asked for; ask for at least {start_frame} "
                              "or delete the .partial and checkpoint files to start over")
        dyn = _make_dynamics(atoms, integrator, step_fs, temperature_K, friction_per_ps, rng,
                             dof)
        _restore_dynamics(chk_path, dyn, dyn_state)
        log.info("resuming %s at frame %d", out, start_frame)
    else:
        # ASE >= 3.28 renamed MaxwellBoltzmannDistribution to thermalize_momenta
        thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
        thermalize(atoms, temperature_K=temperature_K, rng=rng)
        _remove_rigid_motion(atoms, dof)
        dyn = _make_dynamics(atoms, integrator, step_fs, temperature_K, friction_per_ps, rng,
                             dof)

    v_fac, e_fac = ase_velocity_to_A_per_ps(), ev_to_kj_per_mol()
    writer = TrajectoryWriter(out, topology, metadata, velocities=True, forces=True,
                              energies=True, box=periodic, overwrite=overwrite, resume=resuming,
                              keep_partial=True)
    if resuming:
        writer.truncate(start_frame)
    bar = tqdm(total=frames, initial=start_frame, unit="frame",
               desc=f"ase {atoms.get_chemical_formula()}",
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    block = max(1, min(checkpoint_frames, 100))
    buf: dict[str, list] = {k: [] for k in ("x", "v", "f", "e", "t", "s", "box")}
    since_checkpoint = 0
    wall0 = time.perf_counter()
    with writer, bar:
        for frame in range(start_frame, frames):
            if frame > 0:
                dyn.run(steps_per_frame)
            try:
                forces = atoms.get_forces()
                energy = atoms.get_potential_energy()
            except Exception as exc:  # calculators raise their own types
                raise EngineError(f"{calc_name}: the calculator failed at frame {frame} ({exc});"
                                  " check that it supports these elements") from exc
            buf["x"].append(atoms.get_positions())
            buf["v"].append(atoms.get_velocities() * v_fac)
            buf["f"].append(forces * e_fac)
            buf["e"].append(energy * e_fac)
            buf["t"].append(frame * float(interval_ps))
            buf["s"].append(frame * steps_per_frame)
            buf["box"].append(np.asarray(atoms.cell[:]))
            since_checkpoint += 1
            raise_if_interrupted()  # a Ctrl-C Python swallowed
            if len(buf["x"]) == block or frame == frames - 1 or \
                    since_checkpoint >= checkpoint_frames:
                writer.append(np.asarray(buf["x"]), np.asarray(buf["t"]),
                              step=np.asarray(buf["s"]), velocities=np.asarray(buf["v"]),
                              forces=np.asarray(buf["f"]), potential_energy=np.asarray(buf["e"]),
                              box=np.asarray(buf["box"]) if periodic else None)
                buf = {k: [] for k in buf}
                if since_checkpoint >= checkpoint_frames and frame < frames - 1:
                    writer.flush()
                    _save_state(chk_path, atoms, dyn, frame + 1, frame * steps_per_frame)
                    since_checkpoint = 0
            bar.update(1)
            if frame_callback is not None:
                frame_callback(frame)
    chk_path.unlink(missing_ok=True)
    wall = time.perf_counter() - wall0
    log.info("wrote %s: %d frames x %d atoms in %.1f s (%.3g frames/s)", out, frames, len(atoms),
             wall, (frames - start_frame) / max(wall, 1e-9))
    return out


# -- checkpoints ------------------------------------------------------------------------------------
def _rng_state(rng) -> str:
    """JSON of a numpy ``Generator``'s or ``RandomState``'s state ("" when there is none)."""
    if isinstance(rng, np.random.Generator):
        state = rng.bit_generator.state
    elif isinstance(rng, np.random.RandomState):
        state = rng.get_state(legacy=False)
    else:
        return ""

    def encode(obj):
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(type(obj).__name__)

    return json.dumps(state, default=encode)


def _set_rng_state(rng, text: str, path: Path) -> None:
    def decode(obj):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        return obj

    state = json.loads(text, object_hook=decode) if text else None
    kind = "Generator" if isinstance(rng, np.random.Generator) else \
        "RandomState" if isinstance(rng, np.random.RandomState) else None
    if (state is None) != (kind is None):
        raise CheckpointError(f"{path}: the saved random-number state does not fit this "
                              "integrator; resume with the original settings or start over")
    if kind == "Generator":
        rng.bit_generator.state = state
    elif kind == "RandomState":
        rng.set_state(state)


def _save_state(path: Path, atoms, dyn, frames: int, step: int) -> None:
    """Write the dynamics state after ``frames`` saved frames to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, positions=atoms.get_positions(), momenta=atoms.get_momenta(),
                 cell=np.asarray(atoms.cell[:]), frames=np.int64(frames), step=np.int64(step),
                 nsteps=np.int64(dyn.nsteps), rng=np.str_(_rng_state(getattr(dyn, "rng", None))),
                 transferred_energy=np.float64(getattr(dyn, "transferred_energy", 0.0)))
    os.replace(tmp, path)


def _load_state(path: Path, atoms, steps_per_frame: int) -> tuple[int, dict[str, Any]]:
    """Restore ``atoms`` from ``path``; returns the frames already saved and the integrator state."""
    try:
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
        positions, momenta, cell = state["positions"], state["momenta"], state["cell"]
        frames, step = int(state["frames"]), int(state["step"])
        dyn_state = {"nsteps": int(state["nsteps"]), "rng": str(state["rng"]),
                     "transferred_energy": float(state["transferred_energy"])}
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable run checkpoint ({exc}); delete it and the "
                              ".partial dataset to start over") from exc
    if positions.shape != (len(atoms), 3) or momenta.shape != (len(atoms), 3):
        raise CheckpointError(f"{path}: holds {positions.shape[0]} atoms, the run has "
                              f"{len(atoms)}; resume with the original structure or start over")
    if step != (frames - 1) * steps_per_frame:
        raise CheckpointError(f"{path}: step {step} does not match frame {frames - 1} at "
                              f"{steps_per_frame} steps per frame; resume with the original "
                              "settings or start over")
    atoms.set_cell(cell)
    atoms.set_positions(positions, apply_constraint=False)
    atoms.set_momenta(momenta, apply_constraint=False)
    return frames, dyn_state


def _restore_dynamics(path: Path, dyn, dyn_state: dict[str, Any]) -> None:
    """Put the step count, random-number state and Bussi's energy tally back into ``dyn``."""
    dyn.nsteps = dyn_state["nsteps"]
    if hasattr(dyn, "transferred_energy"):
        dyn.transferred_energy = dyn_state["transferred_energy"]
    _set_rng_state(getattr(dyn, "rng", None), dyn_state["rng"], path)


def kinetic_dof(atoms, integrator: str) -> int:
    """Kinetic degrees of freedom of a run of ``atoms`` with ``integrator``.

    ``bussi`` and ``verlet`` keep the total momentum zero (and, without periodic boundaries, the
    angular momentum): 3N - 3 periodic, 3N - 6 in vacuum (3N - 5 = 1 for a diatomic, the only
    molecule that stays linear; a linear start bends, and with L = 0 it has 3N - 6). ``langevin``
    kicks every atom: 3N. Constraints (ASE's count) come off first; constrained systems keep it.
    """
    n_ase = int(atoms.get_number_of_degrees_of_freedom())
    if integrator == "langevin" or atoms.constraints:
        return n_ase
    if atoms.pbc.any():
        return n_ase - 3
    n = len(atoms)
    dof = n_ase - (3 if n == 1 else 5 if n == 2 else 6)
    if dof < 1:
        raise ConfigError(f"{atoms.get_chemical_formula()}: a single atom in vacuum has no "
                          f"internal motion to thermostat with integrator={integrator!r}; use "
                          "integrator='langevin' or a periodic cell")
    return dof


def _remove_rigid_motion(atoms, dof: int) -> None:
    """Zero the total (and, in vacuum, angular) momentum of Maxwell-Boltzmann velocities.

    The projections leave the remaining degrees of freedom at the sampled temperature (ASE's
    default would rescale them to the 3N-dof temperature: too hot by 3N/dof). When the run has
    another count ``dof`` (Langevin: 3N; a linear start: 3N - 5 left, 3N - 6 once it bends),
    rescale so that the kinetic temperature over ``dof`` is the sampled one.
    """
    from ase.md import velocitydistribution as vd

    vd.Stationary(atoms, preserve_temperature=False)
    kept = 3 * len(atoms) - 3
    if not atoms.pbc.any():
        with np.errstate(divide="ignore", invalid="ignore"):  # ASE divides by Ip = 0 (linear)
            vd.ZeroRotation(atoms, preserve_temperature=False)
        kept -= int((atoms.get_moments_of_inertia() > 0).sum())  # what ZeroRotation removed
    if kept > 0 and kept != dof:
        atoms.set_momenta(atoms.get_momenta() * math.sqrt(dof / kept))


def _make_dynamics(atoms, integrator: str, step_fs: float, temperature_K: float,
                   friction_per_ps: float, rng, dof: int):
    from ase import units

    dt = step_fs * units.fs
    if integrator == "verlet":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if integrator == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, timestep=dt, temperature_K=temperature_K,
                        friction=friction_per_ps / ase_ps(), fixcm=False, rng=rng)
    import ase
    from ase.md.bussi import Bussi

    dyn = Bussi(atoms, timestep=dt, temperature_K=temperature_K, taut=ase_ps() / friction_per_ps,
                rng=rng)
    # ASE's Bussi counts atoms.get_number_of_degrees_of_freedom() (3N less constraints) and aims
    # the kinetic energy at ndof kT/2 with chi-squared(ndof) noise. With the rigid-body motion
    # removed only `dof` of them carry energy, so that target would make the molecule hot by
    # 3N/dof (385 K instead of 300 K for ethanol). Thermostat the degrees of freedom that exist.
    if hasattr(dyn, "ndof") and hasattr(dyn, "target_kinetic_energy"):
        dyn.ndof = dof
        dyn.target_kinetic_energy = 0.5 * dyn.temp * dof
    else:  # another ASE layout: scale the target instead (same mean, 3N-dof fluctuations)
        n_ase = atoms.get_number_of_degrees_of_freedom()
        log.warning("ase %s: Bussi has no ndof/target_kinetic_energy; aiming it at %.4g K so "
                    "that %d degrees of freedom are at %.4g K", ase.__version__,
                    temperature_K * dof / n_ase, dof, temperature_K)
        dyn = Bussi(atoms, timestep=dt, temperature_K=temperature_K * dof / n_ase,
                    taut=ase_ps() / friction_per_ps, rng=rng)
    return dyn
