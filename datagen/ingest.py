"""Ingest existing MD into the canonical dataset file.

Three kinds of input, detected from the file names:

- MD17 (``R``, ``z``, optional ``E``, ``F``) and rMD17 (``coords``, ``nuclear_charges``,
  ``energies``, ``forces``) ``.npz`` files: Å and kcal/mol, no time axis (frames 0.5 fs apart unless
  ``dt_ps`` says otherwise); bonds from the first frame by the covalent-radii rule.
- Anything MDAnalysis reads: a topology (PSF, PDB, GRO, TPR, prmtop...) followed by one or more
  trajectories (DCD, XTC, TRR...), concatenated in order. Molecules are made whole and kept from
  jumping across periodic boundaries when the topology has bonds; velocities, forces and the box
  are kept when present.
- ASE trajectories (``.traj``, ``.extxyz``/``.xyz``) read with ``ase.io``.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datagen.atoms import (
    atomic_numbers_from_masses,
    atomic_numbers_from_symbols,
    infer_bonds,
    select_indices,
    selection_indices,
    standard_masses,
)
from surrogate_md.data.h5md import Topology, TrajectoryWriter
from surrogate_md.errors import DataError

log = logging.getLogger(__name__)

#: MD17 frames are written every 0.5 fs of the ab-initio MD (Chmiela et al.).
MD17_INTERVAL_PS = 0.0005
ASE_SUFFIXES = (".traj", ".extxyz", ".xyz")
BLOCK_FRAMES = 256

MD17_KEYS = {"positions": "R", "numbers": "z", "energies": "E", "forces": "F"}
RMD17_KEYS = {"positions": "coords", "numbers": "nuclear_charges", "energies": "energies",
              "forces": "forces"}


@dataclass
class Block:
    """A block of frames in our units: positions (k, N, 3) Å, time (k,) ps, optional fields."""

    positions: np.ndarray
    time_ps: np.ndarray
    velocities: np.ndarray | None = None
    forces: np.ndarray | None = None
    potential_energy: np.ndarray | None = None
    box: np.ndarray | None = None


@dataclass
class Source:
    """An opened input: topology of the kept atoms, per-file facts and a frame-block iterator."""

    topology: Topology
    n_frames: int
    interval_ps: float
    blocks: Iterator[Block]
    fields: dict[str, bool]
    metadata: dict


def _kcal_to_kj() -> float:
    from openmm import unit

    return (1.0 * unit.kilocalorie_per_mole).value_in_unit(unit.kilojoule_per_mole)


def _check_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    if not inputs:
        raise DataError("ingest: no input files given; pass a .npz, an ASE trajectory, or a "
                        "topology followed by trajectories")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file; check the path")
    return paths


def _check_dt(dt_ps: float | None, source: Path) -> None:
    if dt_ps is not None and not (np.isfinite(dt_ps) and dt_ps > 0):
        raise DataError(f"{source}: frame interval dt_ps={dt_ps} must be a positive number of ps; "
                        "pass e.g. --dt-ps 0.0005")


def _check_finite(name: str, array: np.ndarray, source: Path | str, first_frame: int) -> None:
    finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if not finite.all():
        bad = first_frame + int(np.argmin(finite))
        raise DataError(f"{source}: {name} contain NaN or inf (frame {bad}); remove or repair "
                        "those frames (e.g. slice the trajectory) before ingesting")


# -- MD17 -------------------------------------------------------------------------------------------
def _open_npz(path: Path, select: str | None, dt_ps: float | None) -> Source:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}); give an MD17/rMD17 npz") from exc
    keys = set(data.files)
    if {"R", "z"} <= keys:
        names, flavour = MD17_KEYS, "md17"
    elif {"coords", "nuclear_charges"} <= keys:
        names, flavour = RMD17_KEYS, "rmd17"
    else:
        raise DataError(f"{path}: npz without the expected keys (has {sorted(keys)}); MD17 files "
                        "need 'R' and 'z', rMD17 files 'coords' and 'nuclear_charges'")
    positions = np.asarray(data[names["positions"]], dtype=np.float64)
    z = np.asarray(data[names["numbers"]], dtype=np.int64).reshape(-1)
    if positions.ndim != 3 or positions.shape[1:] != (len(z), 3):
        raise DataError(f"{path}: positions of shape {positions.shape} do not match {len(z)} "
                        "atomic numbers; expected (frames, atoms, 3)")
    _check_finite("positions", positions, path, 0)
    kj = _kcal_to_kj()
    energies = forces = None
    if names["energies"] in keys:
        energies = np.asarray(data[names["energies"]], dtype=np.float64).reshape(-1) * kj
        if len(energies) != len(positions):
            raise DataError(f"{path}: {len(energies)} energies for {len(positions)} frames")
    if names["forces"] in keys:
        forces = np.asarray(data[names["forces"]], dtype=np.float64) * kj
        if forces.shape != positions.shape:
            raise DataError(f"{path}: forces of shape {forces.shape} but positions "
                            f"{positions.shape}")
        _check_finite("forces", forces, path, 0)
    topology = Topology.from_elements(z, standard_masses(z), infer_bonds(z, positions[0]))
    index = select_indices(topology, select, path)
    topology = topology.subset(index)
    interval = MD17_INTERVAL_PS if dt_ps is None else float(dt_ps)
    n = len(positions)

    def blocks() -> Iterator[Block]:
        for s in range(0, n, BLOCK_FRAMES):
            sl = slice(s, s + BLOCK_FRAMES)
            yield Block(positions[sl][:, index], np.arange(n)[sl] * interval,
                        forces=None if forces is None else forces[sl][:, index],
                        potential_energy=None if energies is None else energies[sl])

    meta = {"engine": flavour, "method": "ab initio (as distributed)",
            "interval_ps": interval, "interval_source": "default (MD17: 0.5 fs)"
            if dt_ps is None else "user"}
    fields = {"velocities": False, "forces": forces is not None,
              "energies": energies is not None, "box": False}
    return Source(topology, n, interval, blocks(), fields, meta)


# -- MDAnalysis -------------------------------------------------------------------------------------
def _universe(paths: list[Path]):
    import MDAnalysis as mda

    topology_file, trajectories = paths[0], paths[1:]
    try:
        return mda.Universe(str(topology_file), *[str(t) for t in trajectories])
    except Exception as exc:  # MDAnalysis raises many types for unreadable/mismatched files
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "number of atoms" in text or "atoms" in text and "match" in text:
            problem = "topology/trajectory atom-count mismatch"
            fix = "give the topology that belongs to these trajectories"
        else:
            problem = "unreadable by MDAnalysis"
            fix = ("check the format: give a topology (PSF/PDB/GRO/TPR/prmtop) first, then "
                   "trajectories (DCD/XTC/TRR...)")
        names = ", ".join(str(p) for p in paths)
        raise DataError(f"{names}: {problem} ({text}); {fix}") from exc


def _mda_topology(atoms, source: Path) -> Topology:
    n = atoms.n_atoms
    z = np.zeros(n, dtype=np.int64)
    if hasattr(atoms, "elements"):
        z = atomic_numbers_from_symbols(atoms.elements)
    if (z == 0).any() and hasattr(atoms, "masses"):
        from_mass = atomic_numbers_from_masses(atoms.masses)
        z = np.where(z == 0, from_mass, z)
    masses = np.asarray(atoms.masses, dtype=np.float64) if hasattr(atoms, "masses") else \
        standard_masses(z)
    bonds = np.zeros((0, 2), dtype=np.int64)
    if hasattr(atoms, "bonds"):
        bonds = np.asarray(atoms.bonds.indices, dtype=np.int64).reshape(-1, 2)
    segids = atoms.segids if hasattr(atoms, "segids") else None
    return Topology(atomic_numbers=z, masses=masses, atom_names=atoms.names,
                    residue_ids=atoms.resids, residue_names=atoms.resnames, bonds=bonds,
                    segment_ids=segids)


def _open_mdanalysis(paths: list[Path], select: str | None, dt_ps: float | None) -> Source:
    from MDAnalysis import transformations

    u = _universe(paths)
    source = paths[0]
    index = np.arange(u.atoms.n_atoms) if select is None else \
        selection_indices(u.atoms, select, source)
    group = u.atoms[index]
    has_bonds = hasattr(u.atoms, "bonds") and len(u.atoms.bonds) > 0
    ts = u.trajectory.ts
    periodic = ts.dimensions is not None and np.all(np.asarray(ts.dimensions[:3]) > 0)
    made_whole = False
    if periodic and has_bonds:
        # Make the molecules holding the selection whole in every frame, then stop whole atoms
        # from jumping across the box between frames, so displacements are physical.
        frags = group.fragments
        whole = u.atoms[np.unique(np.concatenate([f.indices for f in frags]))]
        u.trajectory.add_transformations(transformations.unwrap(whole),
                                         transformations.NoJump(check_continuity=False))
        made_whole = True
    elif periodic:
        log.warning("%s: periodic box but no bonds in the topology; molecules are left as stored "
                    "(possibly broken across the box). Use a topology with bonds to unwrap.",
                    source)
    topology = _mda_topology(u.atoms, source)
    if not len(topology.bonds):
        topology.bonds = infer_bonds(topology.atomic_numbers, u.trajectory[0].positions)
    topology = topology.subset(index)
    interval = float(dt_ps) if dt_ps is not None else float(u.trajectory.dt)
    if not (np.isfinite(interval) and interval > 0):
        raise DataError(f"{source}: the trajectory reports a frame interval of {interval} ps; "
                        "pass the real one with --dt-ps")
    t0 = float(u.trajectory[0].time)
    has_v = bool(u.trajectory.ts.has_velocities)
    has_f = bool(u.trajectory.ts.has_forces)
    n = len(u.trajectory)

    names = ", ".join(str(p) for p in paths[1:]) or str(source)  # the trajectory files

    def blocks() -> Iterator[Block]:
        buf: dict[str, list] = {"x": [], "v": [], "f": [], "box": [], "i": []}
        read = 0
        for i, frame in enumerate(u.trajectory):
            read += 1
            x = group.positions.astype(np.float64)
            _check_finite("positions", x[None], names, i)
            buf["x"].append(x)
            buf["i"].append(i)
            if has_v:
                buf["v"].append(group.velocities.astype(np.float64))
            if has_f:
                buf["f"].append(group.forces.astype(np.float64))
            if periodic:
                buf["box"].append(frame.triclinic_dimensions.astype(np.float64))
            if len(buf["x"]) == BLOCK_FRAMES or i == n - 1:
                frames = np.asarray(buf["i"])
                yield Block(np.stack(buf["x"]), t0 + frames * interval,
                            velocities=np.stack(buf["v"]) if has_v else None,
                            forces=np.stack(buf["f"]) if has_f else None,
                            box=np.stack(buf["box"]) if periodic else None)
                buf = {k: [] for k in buf}
        if read != n:
            # MDAnalysis indexes a frame cut short by a killed writer but stops before it
            raise DataError(f"{names}: the trajectory lists {n} frames but only {read} can be "
                            "read; the file is truncated (a run killed while writing?): write its "
                            f"first {read} frames to a new file (MDAnalysis: "
                            f"u.trajectory[:{read}]) and ingest that")

    meta = {"engine": "MDAnalysis", "engine_version": _mda_version(),
            "interval_ps": interval,
            "interval_source": "user" if dt_ps is not None else "trajectory",
            "made_whole": made_whole}
    fields = {"velocities": has_v, "forces": has_f, "energies": False, "box": periodic}
    return Source(topology, n, interval, blocks(), fields, meta)


def _mda_version() -> str:
    import MDAnalysis

    return MDAnalysis.__version__


# -- ASE --------------------------------------------------------------------------------------------
def ase_velocity_to_A_per_ps() -> float:
    """Factor from ASE's velocity unit (Å per ASE time unit) to Å/ps."""
    import ase.units
    from MDAnalysis import units

    return ase.units.fs * units.convert(1.0, "ps", "fs")


def ev_to_kj_per_mol() -> float:
    """Factor from eV (per particle) to kJ/mol (ASE's unit table)."""
    import ase.units

    return ase.units.mol / ase.units.kJ


def _open_ase(paths: list[Path], select: str | None, dt_ps: float | None) -> Source:
    import ase.io

    frames = []
    for p in paths:
        try:
            frames.extend(ase.io.read(str(p), index=":"))
        except Exception as exc:  # ASE raises many types for unreadable files
            raise DataError(f"{p}: unreadable by ase.io ({exc}); give an ASE .traj or extxyz "
                            "file") from exc
    if not frames:
        raise DataError(f"{paths[0]}: the trajectory holds no frame")
    first = frames[0]
    for k, a in enumerate(frames):
        if len(a) != len(first) or not np.array_equal(a.numbers, first.numbers):
            raise DataError(f"{paths[0]}: frame {k} has a different atom set than frame 0; "
                            "every frame must hold the same atoms in the same order")
    if dt_ps is None:
        raise DataError(f"{paths[0]}: ASE trajectories carry no frame interval; pass it with "
                        "--dt-ps (dt_ps=...), in ps")
    z = np.asarray(first.numbers, dtype=np.int64)
    topology = Topology.from_elements(z, np.asarray(first.get_masses(), dtype=np.float64),
                                      infer_bonds(z, first.positions))
    index = select_indices(topology, select, paths[0])
    topology = topology.subset(index)
    has_v = first.has("momenta")
    calc_ok = first.calc is not None
    has_f = has_e = False
    if calc_ok:
        try:
            first.get_forces()
            has_f = True
        except Exception:  # a SinglePointCalculator without forces
            has_f = False
        try:
            first.get_potential_energy()
            has_e = True
        except Exception:
            has_e = False
    periodic = bool(first.pbc.any())
    v_fac, e_fac = ase_velocity_to_A_per_ps(), ev_to_kj_per_mol()
    n = len(frames)

    def blocks() -> Iterator[Block]:
        for s in range(0, n, BLOCK_FRAMES):
            chunk = frames[s:s + BLOCK_FRAMES]
            x = np.stack([a.positions[index] for a in chunk])
            _check_finite("positions", x, paths[0], s)
            yield Block(
                x, (s + np.arange(len(chunk))) * float(dt_ps),
                velocities=np.stack([a.get_velocities()[index] for a in chunk]) * v_fac
                if has_v else None,
                forces=np.stack([a.get_forces()[index] for a in chunk]) * e_fac if has_f else None,
                potential_energy=np.array([a.get_potential_energy() for a in chunk]) * e_fac
                if has_e else None,
                box=np.stack([np.asarray(a.cell[:]) for a in chunk]) if periodic else None)

    import ase

    meta = {"engine": "ase.io", "engine_version": ase.__version__, "interval_ps": float(dt_ps),
            "interval_source": "user"}
    fields = {"velocities": has_v, "forces": has_f, "energies": has_e, "box": periodic}
    return Source(topology, n, float(dt_ps), blocks(), fields, meta)


# -- entry point ------------------------------------------------------------------------------------
def open_source(inputs: Sequence[str | os.PathLike], select: str | None = None,
                dt_ps: float | None = None) -> Source:
    """Open ``inputs`` as one :class:`Source` (auto-detecting MD17 npz, ASE or MDAnalysis)."""
    paths = _check_inputs(inputs)
    _check_dt(dt_ps, paths[0])
    suffixes = {p.suffix.lower() for p in paths}
    if ".npz" in suffixes:
        if len(paths) != 1:
            raise DataError(f"{paths[0]}: give one MD17/rMD17 .npz file at a time (got "
                            f"{len(paths)} inputs)")
        return _open_npz(paths[0], select, dt_ps)
    if suffixes <= set(ASE_SUFFIXES) and not (len(paths) > 1 and paths[0].suffix == ".xyz"):
        return _open_ase(paths, select, dt_ps)
    return _open_mdanalysis(paths, select, dt_ps)


def ingest(inputs: Sequence[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike,
           select: str | None = None, dt_ps: float | None = None, *, overwrite: bool = False,
           progress: bool | None = None, command: str | None = None) -> Path:
    """Convert existing MD into one canonical dataset file.

    Args:
        inputs: one MD17/rMD17 ``.npz``; or ASE trajectories; or a topology followed by one or more
            trajectories MDAnalysis reads (concatenated in order).
        out: output ``.h5`` path (written as ``out.partial`` and renamed when complete).
        select: MDAnalysis selection of the atoms to keep (``"backbone"``, ``"not name H*"``).
        dt_ps: saved-frame interval in ps; default: the trajectory's own (MD17: 0.5 fs).
            Required for ASE trajectories.
        overwrite: replace an existing ``out``.
        progress: show a tqdm bar (default: when attached to a terminal).
        command: the command line to record in the metadata (default: ``sys.argv``).

    Returns:
        The path of the written file. Positions Å, velocities Å/ps, forces kJ/mol/Å, energies
        kJ/mol, time ps.

    Raises:
        DataError: missing/unreadable input, atom-count mismatch, NaN/inf coordinates, empty
            selection, npz without the expected keys, non-positive ``dt_ps``.
    """
    from tqdm.auto import tqdm

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    src = open_source(inputs, select=select, dt_ps=dt_ps)
    metadata = {
        **src.metadata,
        "source_files": [str(p) for p in inputs],
        "selection": select,
        "command": command if command is not None else shlex.join(sys.argv),
    }
    out = Path(out)
    with TrajectoryWriter(out, src.topology, metadata, velocities=src.fields["velocities"],
                          forces=src.fields["forces"], energies=src.fields["energies"],
                          box=src.fields["box"], overwrite=overwrite) as writer:
        bar = tqdm(total=src.n_frames, unit="frame", desc=f"ingest {out.name}",
                   disable=(not sys.stderr.isatty()) if progress is None else not progress)
        with bar:
            for block in src.blocks:
                writer.append(block.positions, block.time_ps, velocities=block.velocities,
                              forces=block.forces, potential_energy=block.potential_energy,
                              box=block.box)
                bar.update(len(block.positions))
    log.info("wrote %s: %d frames x %d atoms, interval %.6g ps", out, src.n_frames,
             src.topology.n_atoms, src.interval_ps)
    return out
