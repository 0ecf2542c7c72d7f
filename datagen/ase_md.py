"""Produce MD datasets with ASE: any ASE calculator, Langevin / velocity Verlet / Bussi dynamics.

Frames hold positions (Å), velocities (Å/ps, converted from ASE's time unit with ``ase.units``),
forces (kJ/mol/Å) and potential energies (kJ/mol, from eV with ``ase.units``). Non-periodic systems
start with zero total linear and angular momentum; ``bussi`` (the default, a stochastic velocity
rescaling thermostat) and ``verlet`` keep them zero, ``langevin`` does not.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from datagen.ingest import ase_velocity_to_A_per_ps, ev_to_kj_per_mol
from datagen.openmm_md import _steps_per_frame
from surrogate_md.data.h5md import Topology, TrajectoryWriter
from surrogate_md.errors import ConfigError, DataError, EngineError

log = logging.getLogger(__name__)

INTEGRATORS = ("langevin", "verlet", "bussi")
CALCULATORS = ("emt", "lj", "xtb")
#: Lennard-Jones parameters of argon (sigma Å, epsilon eV), for ``calculator="lj"``.
LJ_ARGON = {"sigma": 3.405, "epsilon": 0.0103, "rc": 10.0}


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
    from ase.collections import g2

    if text in g2.names:
        return molecule(text)
    raise DataError(f"{text}: neither a file nor an ase.build.molecule name (e.g. H2O, CH3CH2OH, "
                    "C6H6); check the path or name")


def run_ase(atoms_or_name: Any, calculator: Any = "emt",
            out: str | os.PathLike = "ase.h5", *,
            frames: int = 1000,
            interval_ps: float | None = None,
            step_fs: float | None = None,
            temperature_K: float | None = None,
            seed: int = 0,
            integrator: str = "bussi",
            friction_per_ps: float = 1.0,
            overwrite: bool = False,
            progress: bool | None = None,
            command: str | None = None) -> Path:
    """Run ASE MD and save every ``interval_ps`` to a canonical dataset file.

    Args:
        atoms_or_name: ``ase.Atoms``, an ``ase.build.molecule`` name or a structure file.
        calculator: ``"emt"``, ``"lj"``, ``"xtb"`` or an ASE Calculator instance.
        out: output ``.h5``.
        frames: saved frames (the first is the start, at t = 0).
        interval_ps: saved-frame interval (default: every step), a whole number of steps.
        step_fs: time step (default 0.5 fs).
        temperature_K: initial Maxwell-Boltzmann and thermostat temperature (default 300 K).
        seed: initial velocities and thermostat noise.
        integrator: ``bussi`` (CSVR, keeps zero momenta), ``langevin`` or ``verlet`` (NVE).
        friction_per_ps: Langevin friction; for Bussi the coupling time is ``1/friction_per_ps``.

    Returns:
        Path of the dataset (positions Å, velocities Å/ps, forces kJ/mol/Å, energy kJ/mol).
    """
    import ase
    from ase.md import velocitydistribution as vd
    from tqdm.auto import tqdm

    if frames < 1:
        raise ConfigError(f"frames={frames} must be at least 1")
    step_fs = 0.5 if step_fs is None else float(step_fs)
    temperature_K = 300.0 if temperature_K is None else float(temperature_K)
    if not (temperature_K >= 0 and math.isfinite(temperature_K)):
        raise ConfigError(f"temperature_K={temperature_K} must be >= 0")
    if interval_ps is None:
        from openmm import unit

        interval_ps = (step_fs * unit.femtosecond).value_in_unit(unit.picosecond)
    steps_per_frame = _steps_per_frame(interval_ps, step_fs)
    if integrator not in INTEGRATORS:
        raise ConfigError(f"integrator={integrator!r} is not one of {INTEGRATORS}")
    if friction_per_ps <= 0:
        raise ConfigError(f"friction_per_ps={friction_per_ps} must be positive")
    atoms = load_atoms(atoms_or_name)
    calc_name = calculator if isinstance(calculator, str) else type(calculator).__name__
    atoms.calc = make_calculator(calculator) if isinstance(calculator, str) else calculator
    rng = np.random.default_rng(seed)
    periodic = bool(atoms.pbc.any())
    # ASE >= 3.28 renamed MaxwellBoltzmannDistribution to thermalize_momenta
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=temperature_K, rng=rng)
    vd.Stationary(atoms)
    if not periodic:
        vd.ZeroRotation(atoms)
    dyn = _make_dynamics(atoms, integrator, step_fs, temperature_K, friction_per_ps, rng)

    from datagen.atoms import infer_bonds

    z = atoms.numbers.astype(np.int64)
    topology = Topology.from_elements(z, atoms.get_masses(), infer_bonds(z, atoms.positions))
    metadata = {
        "engine": "ase", "engine_version": ase.__version__, "method": calc_name,
        "temperature_K": temperature_K, "step_fs": step_fs, "interval_ps": float(interval_ps),
        "steps_per_frame": steps_per_frame, "seed": int(seed), "integrator": integrator,
        "friction_per_ps": friction_per_ps if integrator != "verlet" else None,
        "solvent": "vacuum" if not periodic else "periodic",
        "source_files": [str(atoms_or_name)] if isinstance(atoms_or_name, (str, os.PathLike))
        else [], "formula": atoms.get_chemical_formula(),
        "command": command if command is not None else shlex.join(sys.argv),
    }
    v_fac, e_fac = ase_velocity_to_A_per_ps(), ev_to_kj_per_mol()
    out = Path(out)
    bar = tqdm(total=frames, unit="frame", desc=f"ase {atoms.get_chemical_formula()}",
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    block = 100
    buf: dict[str, list] = {k: [] for k in ("x", "v", "f", "e", "t", "s", "box")}
    wall0 = time.perf_counter()
    with TrajectoryWriter(out, topology, metadata, velocities=True, forces=True, energies=True,
                          box=periodic, overwrite=overwrite) as writer, bar:
        for frame in range(frames):
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
            if len(buf["x"]) == block or frame == frames - 1:
                writer.append(np.asarray(buf["x"]), np.asarray(buf["t"]),
                              step=np.asarray(buf["s"]), velocities=np.asarray(buf["v"]),
                              forces=np.asarray(buf["f"]), potential_energy=np.asarray(buf["e"]),
                              box=np.asarray(buf["box"]) if periodic else None)
                buf = {k: [] for k in buf}
            bar.update(1)
    log.info("wrote %s: %d frames x %d atoms in %.1f s", out, frames, len(atoms),
             time.perf_counter() - wall0)
    return out


def _make_dynamics(atoms, integrator: str, step_fs: float, temperature_K: float,
                   friction_per_ps: float, rng):
    from ase import units

    dt = step_fs * units.fs
    if integrator == "verlet":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if integrator == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, timestep=dt, temperature_K=temperature_K,
                        friction=friction_per_ps / ase_ps(), fixcm=False, rng=rng)
    from ase.md.bussi import Bussi

    return Bussi(atoms, timestep=dt, temperature_K=temperature_K,
                 taut=ase_ps() / friction_per_ps, rng=rng)
