"""Ingest existing MD into the canonical dataset file.

Three kinds of input, detected from the file names:

- MD17 (``R``, ``z``, optional ``E``, ``F``) and rMD17 (``coords``, ``nuclear_charges``,
  ``energies``, ``forces``) ``.npz`` files: Å and kcal/mol, no time axis (frames 0.5 fs apart unless
  ``dt_ps`` says otherwise); bonds from the first frame by the covalent-radii rule.
- Anything MDAnalysis reads: a topology (PSF, PDB, GRO, TPR, prmtop...) followed by one or more
  trajectories (DCD, XTC, TRR...), concatenated in order. Frame times come from the files (a
  chained file's first frame that repeats the previous file's last is dropped; uneven or
  decreasing times are refused); formats without times (XYZ, multi-model PDB) need ``dt_ps``.
  Molecules are kept from jumping across periodic boundaries and made whole when the topology
  has bonds (a bond longer than half the box afterwards is an error); velocities, forces and
  the box are kept when present on every frame.
- ASE trajectories (``.traj``, ``.extxyz``/``.xyz``) read with ``ase.io``; periodic ones get
  their bonds under the minimum image and their molecules made whole and kept from jumping
  across the cell (unless bonds span the cell: crystals, polymers through the box).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datagen.atoms import (
    atomic_numbers_from_masses,
    atomic_numbers_from_names,
    atomic_numbers_from_symbols,
    infer_bonds,
    infer_bonds_periodic,
    make_whole,
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
    """An opened input: topology of the kept atoms, per-file facts and a frame-block iterator.

    ``n_frames`` counts the frames in the input; repeated frames that ``blocks`` drops can make
    the dataset shorter. ``report`` is filled while ``blocks`` runs (dropped frames, fields
    missing on some frames) and goes into the metadata at the end.
    """

    topology: Topology
    n_frames: int
    interval_ps: float
    blocks: Iterator[Block]
    fields: dict[str, bool]
    metadata: dict
    report: dict = field(default_factory=dict)


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
def _md17_frame_order(old_indices: np.ndarray, n_frames: int, path: Path
                      ) -> tuple[np.ndarray, int]:
    """Time order of frames that carry their index in the original MD17 trajectory
    (rMD17's ``old_indices``), and their spacing in MD17 frames.

    rMD17 recomputed a random sample of each MD17 trajectory: its frames are not a time series
    and cannot train a trajectory model. Refused unless the indices are evenly spaced.
    """
    old = np.asarray(old_indices).reshape(-1).astype(np.int64)
    if len(old) != n_frames:
        raise DataError(f"{path}: 'old_indices' has {len(old)} entries for {n_frames} frames")
    order = np.argsort(old, kind="stable")
    steps = np.diff(old[order])
    if len(steps) and (steps.min() < 1 or steps.min() != steps.max()):
        raise DataError(
            f"{path}: its frames are a sample of an MD17 trajectory ('old_indices' from "
            f"{old.min()} to {old.max()}, {steps.min()} to {steps.max()} frames apart), not a "
            "time series a trajectory model can learn from; ingest the original MD17 npz of this "
            "molecule (keys R, z, E, F), whose frames are consecutive 0.5 fs steps")
    return order, int(steps[0]) if len(steps) else 1


def _npz_numbers(data, key: str, path: Path) -> np.ndarray:
    """``data[key]`` as float64, or a :class:`DataError` naming the key when it is not numeric."""
    try:
        value = np.asarray(data[key])
    except ValueError as exc:  # object arrays (pickles) are not loaded
        raise DataError(f"{path}: '{key}' cannot be read ({exc}); give an MD17/rMD17 npz with "
                        "numeric arrays") from exc
    if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        raise DataError(f"{path}: '{key}' holds {value.dtype} values, not numbers; give an "
                        "MD17/rMD17 npz with numeric arrays")
    return value.astype(np.float64)


def _npz_atomic_numbers(data, key: str, path: Path) -> np.ndarray:
    """(N,) atomic numbers from ``data[key]``; each must be a whole number of a known element."""
    from ase.data import chemical_symbols

    z = _npz_numbers(data, key, path).reshape(-1)
    bad = ~np.isfinite(z) | (z != np.round(z)) | (z < 1) | (z >= len(chemical_symbols))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: '{key}' must hold atomic numbers (1 to "
                        f"{len(chemical_symbols) - 1}), but atom {i} has {z[i]:g}; give the "
                        "nuclear charges of the atoms")
    return z.astype(np.int64)


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
    positions = _npz_numbers(data, names["positions"], path)
    z = _npz_atomic_numbers(data, names["numbers"], path)
    if positions.ndim != 3 or positions.shape[1:] != (len(z), 3):
        raise DataError(f"{path}: positions of shape {positions.shape} do not match {len(z)} "
                        "atomic numbers; expected (frames, atoms, 3)")
    if len(positions) == 0:
        raise DataError(f"{path}: '{names['positions']}' holds no frame; give a file with at "
                        "least one frame")
    _check_finite("positions", positions, path, 0)
    if flavour == "rmd17" and "old_indices" not in keys and dt_ps is None:
        raise DataError(
            f"{path}: rMD17 keys ('coords', 'nuclear_charges') without 'old_indices': the time "
            "order of the frames is unknown, and rMD17's frames are a random sample of an MD17 "
            "trajectory, not a time series; ingest the original MD17 npz (keys R, z, E, F), or, "
            "if this file is consecutive MD frames in rMD17's key layout, pass their interval "
            "with --dt-ps (dt_ps=...), in ps")
    kj = _kcal_to_kj()
    energies = forces = None
    if names["energies"] in keys:
        energies = _npz_numbers(data, names["energies"], path).reshape(-1) * kj
        if len(energies) != len(positions):
            raise DataError(f"{path}: {len(energies)} energies for {len(positions)} frames")
        _check_finite("energies", energies, path, 0)
    if names["forces"] in keys:
        forces = _npz_numbers(data, names["forces"], path) * kj
        if forces.shape != positions.shape:
            raise DataError(f"{path}: forces of shape {forces.shape} but positions "
                            f"{positions.shape}")
        _check_finite("forces", forces, path, 0)
    stride = 1
    if "old_indices" in keys:  # rMD17: frames picked from an MD17 trajectory, in that order?
        order, stride = _md17_frame_order(data["old_indices"], len(positions), path)
        positions = positions[order]
        energies = None if energies is None else energies[order]
        forces = None if forces is None else forces[order]
    topology = Topology.from_elements(z, standard_masses(z), infer_bonds(z, positions[0]))
    index = select_indices(topology, select, path)
    topology = topology.subset(index)
    interval = stride * MD17_INTERVAL_PS if dt_ps is None else float(dt_ps)
    n = len(positions)

    def blocks() -> Iterator[Block]:
        for s in range(0, n, BLOCK_FRAMES):
            sl = slice(s, s + BLOCK_FRAMES)
            yield Block(positions[sl][:, index], np.arange(n)[sl] * interval,
                        forces=None if forces is None else forces[sl][:, index],
                        potential_energy=None if energies is None else energies[sl])

    meta = {"engine": flavour, "method": "ab initio (as distributed)",
            "interval_ps": interval,
            "interval_source": "user" if dt_ps is not None else "default (MD17: 0.5 fs)"
            if stride == 1 else f"MD17's 0.5 fs x {stride} (old_indices)"}
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
        # Drop the half-opened reader held by the traceback's frames now: its __del__ fails
        # (no file attribute) and, run later by the garbage collector inside compile(), trips
        # CPython 3.11's "AST constructor recursion depth mismatch" in unrelated code.
        traceback.clear_frames(exc.__traceback__)
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
        masses = np.asarray(atoms.masses, dtype=np.float64)
        from_mass = atomic_numbers_from_masses(masses)
        from_name = (atomic_numbers_from_names(atoms.names) if hasattr(atoms, "names")
                     else np.zeros(n, dtype=np.int64))
        heavy_h = (from_name == 1) & (masses > 1.5)
        if heavy_h.any():
            # hydrogen mass repartitioning: masses no longer tell elements apart (3 amu
            # hydrogens, heavy atoms 1-3 amu lighter), atom names still do
            log.info("%s: %d hydrogens weigh up to %.2f amu (mass repartitioning): elements "
                     "are taken from atom names", source, int(heavy_h.sum()),
                     float(masses[heavy_h].max()))
            guess = np.where(from_name > 0, from_name, from_mass)
        else:
            guess = np.where(from_mass > 0, from_mass, from_name)
        z = np.where(z == 0, guess, z)
    masses = np.asarray(atoms.masses, dtype=np.float64) if hasattr(atoms, "masses") else \
        standard_masses(z)
    bonds = np.zeros((0, 2), dtype=np.int64)
    if hasattr(atoms, "bonds"):
        bonds = np.asarray(atoms.bonds.indices, dtype=np.int64).reshape(-1, 2)
    segids = atoms.segids if hasattr(atoms, "segids") else None
    # formats without names (LAMMPS data, TXYZ residues): element symbols / types, one residue
    if hasattr(atoms, "names"):
        names = atoms.names
    elif hasattr(atoms, "types"):
        names = np.asarray(atoms.types, dtype=str)
    else:
        names = np.array([_symbol(int(k)) for k in z])
    resids = atoms.resids if hasattr(atoms, "resids") else np.ones(n, dtype=np.int64)
    resnames = atoms.resnames if hasattr(atoms, "resnames") else np.full(n, "UNK")
    return Topology(atomic_numbers=z, masses=masses, atom_names=names, residue_ids=resids,
                    residue_names=resnames, bonds=bonds, segment_ids=segids)


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else "X"


class _FieldMissing(Exception):
    """A frame lacks a field that earlier frames had (ingest retries without that field)."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"{name} missing at {where}")
        self.field, self.where = name, where


def _reader_has_times(reader) -> bool:
    """Whether an MDAnalysis reader has real frame times (not MDAnalysis' 1 ps default)."""
    import warnings

    if reader.n_frames == 1:
        return "time" in reader.ts.data
    # Timestep.dt falls back to 1 ps with this warning when the format stores no time (XYZ,
    # multi-model PDB, Amber ASCII TRJ, ...); a zero interval (NetCDF written without times)
    # is no information either.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt = reader.dt
    defaulted = any("no dt information" in str(w.message) for w in caught)
    return not defaulted and bool(np.isfinite(dt) and dt > 0)


def _bond_over_half_box(x: np.ndarray, bonds: np.ndarray, box: np.ndarray
                        ) -> tuple[int, float] | None:
    """The longest of ``bonds`` ((B, 2) into ``x``, (N, 3) Å) as (its row, its length in Å) when
    it is longer than half the ``box`` ((3, 3) Å, vectors as rows) is high, else None."""
    if not len(bonds):
        return None
    lengths = np.linalg.norm(x[bonds[:, 0]] - x[bonds[:, 1]], axis=-1)
    k = int(np.argmax(lengths))
    return (k, float(lengths[k])) if lengths[k] > _box_half_height(box) else None


def _box_half_height(box: np.ndarray) -> float:
    """Half the smallest distance between opposite faces of a (3, 3) box: the longest bond a
    molecule made whole can have under the minimum-image convention."""
    a, b, c = box
    volume = abs(float(np.dot(a, np.cross(b, c))))
    areas = [np.linalg.norm(np.cross(b, c)), np.linalg.norm(np.cross(c, a)),
             np.linalg.norm(np.cross(a, b))]
    return 0.5 * volume / max(areas)


def _snap_float32_interval(interval: float) -> float:
    """A frame interval (ps) read from single-precision time stamps (DCD, XTC, TRR), as the
    shortest decimal within 4 float32 steps of it: the AdK DCD's 0.99999991 ps is 1 ps, an XTC's
    100.0000076 ps is 100 ps (a 4 ps jump would otherwise be 3.9999996 ps, and asking for 4 ps
    beyond the trained jump). The result is within the file's own precision of its value."""
    tolerance = 4.0 * float(np.spacing(np.float32(interval)))
    for digits in range(1, 8):
        short = float(f"{interval:.{digits}g}")
        if abs(short - interval) <= tolerance:
            return short
    return interval


def _time_tolerance(interval: float, t: float) -> float:
    # times are often float32 in the files (XTC, TRR): allow their rounding, and 0.1 % jitter
    return 1e-3 * interval + 4.0 * float(np.spacing(np.float32(abs(t))))


def _open_mdanalysis(paths: list[Path], select: str | None, dt_ps: float | None,
                     drop_fields: frozenset[str] = frozenset()) -> Source:
    from MDAnalysis import transformations

    u = _universe(paths)
    source = paths[0]
    if not hasattr(u, "trajectory"):
        raise DataError(f"{source}: this topology holds no coordinates and no trajectory was "
                        "given; give the trajectory files after the topology (datagen ingest "
                        f"{source.name} run.dcd [run2.dcd ...]) or a topology with coordinates "
                        "(PDB/GRO)")
    # the files the frames come from: the trajectories, or the topology when it holds them
    files = [str(p) for p in paths[1:]] or [str(source)]
    readers = list(getattr(u.trajectory, "readers", [u.trajectory]))
    starts = np.cumsum([0] + [r.n_frames for r in readers])
    n = len(u.trajectory)

    def where(i: int) -> tuple[str, int]:
        """The file holding chained frame ``i`` and the frame's index in that file."""
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return files[k], i - int(starts[k])

    timed = [_reader_has_times(r) for r in readers]
    if n > 1 and not all(timed):
        bad = files[timed.index(False)]
        if dt_ps is None:
            raise DataError(f"{bad}: this file stores no frame times (MDAnalysis would assume "
                            "frames 1 ps apart); pass the saved-frame interval with --dt-ps "
                            "(dt_ps=...), in ps")
    timed_all = all(timed)
    multi = [r for r in readers if r.n_frames > 1]
    if dt_ps is not None:
        interval, interval_source = float(dt_ps), "user"
    elif n == 1:
        # a single frame has no interval; 1 ps keeps readers that divide by it finite
        interval, interval_source = 1.0, "none (a single frame)"
    elif multi:
        interval, interval_source = float(multi[0].dt), "trajectory"
    else:  # a chain of one-frame files with time stamps
        interval = float(readers[1].ts.time - readers[0].ts.time)
        interval_source = "trajectory"
    if not (np.isfinite(interval) and interval > 0):
        raise DataError(f"{files[0]}: the trajectory reports a frame interval of {interval} ps; "
                        "pass the real one with --dt-ps")
    raw_interval = interval
    if interval_source == "trajectory":
        interval = _snap_float32_interval(interval)
    t0 = float(u.trajectory[0].time) if timed_all else 0.0
    # the spacing of the files' own time stamps (differs from the interval when dt_ps overrides)
    file_interval = float(multi[0].dt) if timed_all and multi else interval

    index = np.arange(u.atoms.n_atoms) if select is None else \
        selection_indices(u.atoms, select, source)
    group = u.atoms[index]
    has_bonds = hasattr(u.atoms, "bonds") and len(u.atoms.bonds) > 0
    ts = u.trajectory.ts
    periodic = ts.dimensions is not None and np.all(np.asarray(ts.dimensions[:3]) > 0)
    has_v = bool(ts.has_velocities) and "velocities" not in drop_fields
    has_f = bool(ts.has_forces) and "forces" not in drop_fields
    made_whole = False
    if periodic and has_bonds:
        # NoJump first, on the coordinates as stored (wrapped): it keeps every atom from jumping
        # across the box between frames, working in box-fractional coordinates so that it
        # follows box changes (NPT). Then make the molecules holding the selection whole around
        # their first atom. In the other order NoJump undoes make_whole atom by atom when the box
        # changes (MDAnalysisTests' tip125_tric_C36: 31-56 Å "bonds" from frame 5 on).
        frags = group.fragments
        whole = u.atoms[np.unique(np.concatenate([f.indices for f in frags]))]
        u.trajectory.add_transformations(transformations.NoJump(check_continuity=False),
                                         transformations.unwrap(whole))
        made_whole = True
    elif periodic:
        log.warning("%s: periodic box but no bonds in the topology; molecules are left as stored "
                    "(possibly broken across the box). Use a topology with bonds to unwrap.",
                    source)
    topology = _mda_topology(u.atoms, source)
    if not len(topology.bonds):
        topology.bonds = infer_bonds(topology.atomic_numbers, u.trajectory[0].positions)
    topology = topology.subset(index)
    bonds = topology.bonds if made_whole else np.zeros((0, 2), dtype=np.int64)
    names = ", ".join(files)
    report: dict = {}

    def check_whole(x: np.ndarray, box: np.ndarray, i: int) -> None:
        broken = _bond_over_half_box(x, bonds, box)
        if broken is not None:
            k, length = broken
            file, local = where(i)
            a, b = (int(index[j]) for j in bonds[k])
            raise DataError(
                f"{file}: frame {local}: the bond between atoms {a} and {b} is "
                f"{length:.1f} Å long after making molecules whole (more than half the box): "
                "molecules are broken across the periodic box; make them whole first (e.g. gmx "
                "trjconv -pbc mol, cpptraj autoimage) or check that the topology's bonds belong "
                "to this trajectory")

    def blocks() -> Iterator[Block]:
        buf: dict[str, list] = {"x": [], "v": [], "f": [], "box": [], "t": []}
        read = 0
        kept = 0
        prev_t = prev_x = None
        dropped: list[int] = []
        lacking: dict[str, list[int]] = {"velocities": [], "forces": []}
        for i, frame in enumerate(u.trajectory):
            read += 1
            file, local = where(i)
            boundary = i > 0 and local == 0
            x = group.positions.astype(np.float64)
            _check_finite("positions", x[None], file, local)
            t = float(frame.time) if timed_all else None
            if t is not None and prev_t is not None:
                gap = t - prev_t
                tol = _time_tolerance(file_interval, t)
                if abs(gap) <= tol and boundary:
                    # a run continued from its last frame writes that frame again
                    log.info("%s: frame 0 (t = %.6g ps) repeats the last frame of the file "
                             "before it; dropped", file, t)
                    dropped.append(i)
                    continue
                if gap <= tol and not (boundary and dt_ps is not None):
                    # (with dt_ps the user vouches for the order of the files, whose clocks may
                    # restart: NAMD DCDs of continued runs)
                    raise DataError(
                        f"{file}: frame {local} is at t = {t:.6g} ps, not after the frame before "
                        f"it (t = {prev_t:.6g} ps); times must increase: give the files in "
                        "time order and remove repeated or overlapping frames (gmx trjcat "
                        "does both)")
                if dt_ps is None and abs(gap - interval) > tol:
                    raise DataError(
                        f"{file}: frame {local} (t = {t:.6g} ps) is {gap:.6g} ps after the frame "
                        f"before it, not {interval:.6g} ps like the frames before: the frames "
                        "are not evenly spaced; ingest the files with different intervals "
                        "separately, or resample them to one interval")
            elif t is None and boundary and prev_x is not None and np.array_equal(x, prev_x):
                log.info("%s: frame 0 repeats the last frame of the file before it; dropped",
                         file)
                dropped.append(i)
                continue
            prev_t, prev_x = t, x
            for name, present in (("velocities", frame.has_velocities),
                                  ("forces", frame.has_forces)):
                if not present:
                    lacking[name].append(i)
            if has_v and not frame.has_velocities:
                raise _FieldMissing("velocities", f"{file} frame {local}")
            if has_f and not frame.has_forces:
                raise _FieldMissing("forces", f"{file} frame {local}")
            if periodic:
                box = frame.triclinic_dimensions.astype(np.float64)
                if made_whole and len(bonds):
                    check_whole(x, box, i)
                buf["box"].append(box)
            buf["x"].append(x)
            buf["t"].append(t if dt_ps is None else t0 + kept * interval)
            kept += 1
            if has_v:
                buf["v"].append(group.velocities.astype(np.float64))
            if has_f:
                buf["f"].append(group.forces.astype(np.float64))
            if len(buf["x"]) == BLOCK_FRAMES:
                yield _mda_block(buf, has_v, has_f, periodic)
                buf = {k: [] for k in buf}
        if read != n:
            # MDAnalysis indexes a frame cut short by a killed writer but stops before it
            raise DataError(f"{names}: the trajectory lists {n} frames but only {read} can be "
                            "read; the file is truncated (a run killed while writing?): write its "
                            f"first {read} frames to a new file (MDAnalysis: "
                            f"u.trajectory[:{read}]) and ingest that")
        if buf["x"]:
            yield _mda_block(buf, has_v, has_f, periodic)
        if dropped:
            report["dropped_duplicate_frames"] = dropped
        kept_frames = read - len(dropped)
        for name, frames in lacking.items():
            if frames and len(frames) < kept_frames:
                shown = ", ".join(f"{f} frame {k}" for f, k in map(where, frames[:5]))
                log.warning("%s are missing on %d of %d frames (%s%s); the dataset has no %s "
                            "(positions are complete)", name, len(frames), kept_frames, shown,
                            ", ..." if len(frames) > 5 else "", name)
                report[f"{name}_missing_frames"] = len(frames)

    meta = {"engine": "MDAnalysis", "engine_version": _mda_version(),
            "interval_ps": interval, "interval_source": interval_source,
            "made_whole": made_whole}
    if interval != raw_interval:
        meta["interval_in_file_ps"] = raw_interval
    fields = {"velocities": has_v, "forces": has_f, "energies": False, "box": periodic}
    return Source(topology, n, interval, blocks(), fields, meta, report)


def _mda_block(buf: dict[str, list], has_v: bool, has_f: bool, periodic: bool) -> Block:
    return Block(np.stack(buf["x"]), np.asarray(buf["t"], dtype=np.float64),
                 velocities=np.stack(buf["v"]) if has_v else None,
                 forces=np.stack(buf["f"]) if has_f else None,
                 box=np.stack(buf["box"]) if periodic else None)


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
    """An ASE trajectory (.traj, extxyz) read twice with ``ase.io.iread``: a first pass checks
    the frames and which fields every frame has, the second yields blocks of
    :data:`BLOCK_FRAMES` frames, so only one block is ever in memory."""
    import ase.io

    if dt_ps is None:
        raise DataError(f"{paths[0]}: ASE trajectories carry no frame interval; pass it with "
                        "--dt-ps (dt_ps=...), in ps")

    def frames_of(p: Path) -> Iterator:
        try:
            yield from ase.io.iread(str(p), index=":")
        except Exception as exc:  # ASE raises many types for unreadable files
            raise DataError(f"{p}: unreadable by ase.io ({exc}); give an ASE .traj or extxyz "
                            "file") from exc

    def has_result(a, getter) -> bool:
        """Whether a frame carries a calculator result (a SinglePointCalculator may lack forces
        or energies, and frames written without a calculator have none)."""
        try:
            if a.calc is None:
                return False
            getter(a)
        except Exception:
            return False
        return True

    # first pass: the atom set, repeated boundary frames, the fields every frame has
    first = last = None
    n = 0
    skip_first: list[bool] = []  # per file: its first frame repeats the previous file's last
    has_v = has_f = has_e = True
    for p in paths:
        skip = False
        for k, a in enumerate(frames_of(p)):
            if (k == 0 and last is not None and len(a) == len(last)
                    and np.array_equal(a.positions, last)):
                # a continued run writes its start frame again: one frame, not two at two times
                skip = True
                continue
            if first is None:
                first = a
            elif len(a) != len(first) or not np.array_equal(a.numbers, first.numbers):
                raise DataError(f"{p}: frame {k} has a different atom set than frame 0 of "
                                f"{paths[0]}; every frame must hold the same atoms in the same "
                                "order")
            has_v = has_v and a.has("momenta")
            has_f = has_f and has_result(a, lambda b: b.get_forces())
            has_e = has_e and has_result(a, lambda b: b.get_potential_energy())
            last = a.positions
            n += 1
        skip_first.append(skip)
    if first is None:
        raise DataError(f"{paths[0]}: the trajectory holds no frame")
    dropped = sum(skip_first)
    if dropped:
        log.info("%s: dropped %d repeated boundary frame(s) between files", paths[0], dropped)
    z = np.asarray(first.numbers, dtype=np.int64)
    _check_finite("positions", first.positions[None], paths[0], 0)
    periodic = bool(first.pbc.any())
    made_whole = False
    bonds = infer_bonds(z, first.positions)
    if periodic and first.cell.rank == 3:
        # bonds under the minimum image (a molecule stored wrapped is split across the cell);
        # molecules are made whole in the first frame and kept from jumping in the next ones
        mic_bonds, vectors = infer_bonds_periodic(z, first.positions, first.cell[:], first.pbc)
        if make_whole(first.positions, mic_bonds, vectors) is not None:
            bonds, made_whole = mic_bonds, True
        else:
            log.warning("%s: bonds span the periodic cell (a crystal or a polymer through the "
                        "box): positions are left as stored", paths[0])
    topology = Topology.from_elements(z, np.asarray(first.get_masses(), dtype=np.float64), bonds)
    index = select_indices(topology, select, paths[0])
    kept_bonds = topology.subset(index).bonds
    topology = topology.subset(index)
    if first.calc is not None and not (has_f and has_e):
        log.warning("%s: not every frame carries calculator %s; they are left out of the "
                    "dataset", paths[0], " and ".join(
                        k for k, ok in (("forces", has_f), ("energies", has_e)) if not ok))
    v_fac, e_fac = ase_velocity_to_A_per_ps(), ev_to_kj_per_mol()

    def unwrapper() -> Callable:
        """Positions (N, 3) Å of frame ``a`` (file ``p``, index ``k``) with molecules whole and
        no atom jumping across the cell since the frame before (in fractional coordinates,
        which follow a changing cell)."""
        prev: list = []

        def positions(a, p: Path, k: int) -> np.ndarray:
            if not made_whole:
                return a.positions
            pbc = np.asarray(a.pbc, dtype=bool)
            if not prev:
                x = make_whole(a.positions, bonds, vectors)
                frac = a.cell.scaled_positions(x)
            else:
                frac = a.cell.scaled_positions(a.positions)
                jump = np.round(frac - prev[0])
                frac[:, pbc] -= jump[:, pbc]
                x = a.cell.cartesian_positions(frac)
            prev[:] = [frac]
            broken = _bond_over_half_box(x[index], kept_bonds, np.asarray(a.cell[:]))
            if broken is not None:
                j, length = broken
                i1, i2 = (int(index[m]) for m in kept_bonds[j])
                raise DataError(
                    f"{p}: frame {k}: the bond between atoms {i1} and {i2} is "
                    f"{length:.1f} Å long after making molecules whole (more than half "
                    "the cell): atoms moved more than half the cell between frames or the "
                    "molecules changed; save frames more often or ingest the frames in pieces")
            return x

        return positions

    def block(chunk: list, s: int) -> Block:
        x = np.stack([xa[index] for _, xa in chunk])
        chunk = [a for a, _ in chunk]
        _check_finite("positions", x, paths[0], s)
        energies = np.array([a.get_potential_energy() for a in chunk]) * e_fac if has_e \
            else None
        if energies is not None:
            _check_finite("energies", energies, paths[0], s)
        return Block(
            x, (s + np.arange(len(chunk))) * float(dt_ps),
            velocities=np.stack([a.get_velocities()[index] for a in chunk]) * v_fac
            if has_v else None,
            forces=np.stack([a.get_forces()[index] for a in chunk]) * e_fac if has_f else None,
            potential_energy=energies,
            box=np.stack([np.asarray(a.cell[:]) for a in chunk]) if periodic else None)

    def blocks() -> Iterator[Block]:
        chunk: list = []
        s = 0
        positions = unwrapper()
        for p, skip in zip(paths, skip_first):
            for k, a in enumerate(frames_of(p)):
                if k == 0 and skip:
                    continue
                chunk.append((a, positions(a, p, k)))
                if len(chunk) == BLOCK_FRAMES:
                    yield block(chunk, s)
                    s, chunk = s + len(chunk), []
        if chunk:
            yield block(chunk, s)
        if s + len(chunk) != n:
            raise DataError(f"{paths[0]}: the trajectory changed while it was read ({n} frames, "
                            f"then {s + len(chunk)}); ingest a finished trajectory")

    import ase

    meta = {"engine": "ase.io", "engine_version": ase.__version__, "interval_ps": float(dt_ps),
            "interval_source": "user", "made_whole": made_whole}
    if dropped:
        meta["dropped_duplicate_frames"] = dropped
    fields = {"velocities": has_v, "forces": has_f, "energies": has_e, "box": periodic}
    return Source(topology, n, float(dt_ps), blocks(), fields, meta)


# -- entry point ------------------------------------------------------------------------------------
def open_source(inputs: Sequence[str | os.PathLike], select: str | None = None,
                dt_ps: float | None = None, *,
                drop_fields: frozenset[str] = frozenset()) -> Source:
    """Open ``inputs`` as one :class:`Source` (auto-detecting MD17 npz, ASE or MDAnalysis).

    ``drop_fields`` (``"velocities"``, ``"forces"``): leave these out of an MDAnalysis source.
    """
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
    return _open_mdanalysis(paths, select, dt_ps, drop_fields)


def ingest(inputs: Sequence[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike,
           select: str | None = None, dt_ps: float | None = None, *, overwrite: bool = False,
           progress: bool | None = None, command: str | None = None) -> Path:
    """Convert existing MD into one canonical dataset file.

    Args:
        inputs: one MD17/rMD17 ``.npz``; or ASE trajectories; or a topology followed by one or more
            trajectories MDAnalysis reads (concatenated in order).
        out: output ``.h5`` path (written as ``out.partial`` and renamed when complete).
        select: MDAnalysis selection of the atoms to keep (``"backbone"``, ``"not name H*"``).
        dt_ps: saved-frame interval in ps; default: the trajectory's own time stamps (MD17:
            0.5 fs). Required for ASE trajectories and for formats without frame times (XYZ,
            multi-model PDB). With it, frames are ``dt_ps`` apart from the first one's time and
            the files' time stamps only serve to drop a repeated boundary frame and to refuse
            frames out of order within a file.
        overwrite: replace an existing ``out``.
        progress: show a tqdm bar (default: when attached to a terminal).
        command: the command line to record in the metadata (default: ``sys.argv``).

    Returns:
        The path of the written file. Positions Å, velocities Å/ps, forces kJ/mol/Å, energies
        kJ/mol, time ps.

    Chained trajectories: a first frame with the same time as the last frame of the file
    before it (a continued run) is dropped; velocities or forces missing on some frames
    (GROMACS nstvout != nstxout) are left out of the whole dataset, with a warning.

    Raises:
        DataError: missing/unreadable input, atom-count mismatch, NaN/inf coordinates, forces
            or energies, empty selection, npz without the expected keys or frames, atomic
            numbers that are no element, rMD17 keys without ``old_indices`` and no ``dt_ps``,
            non-positive ``dt_ps``, no frame times and no ``dt_ps``, frames unevenly spaced or
            out of order, a topology without coordinates and no trajectory, molecules broken
            across the periodic box.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out)
    dropped: frozenset[str] = frozenset()
    while True:
        try:
            return _ingest_once(inputs, out, select, dt_ps, dropped, overwrite=overwrite,
                                progress=progress, command=command)
        except _FieldMissing as exc:  # the writer removed its partial file
            if exc.field in dropped:  # cannot happen: a dropped field is never asked for
                raise
            log.warning("%s has no %s though the frames before it have; writing the dataset "
                        "again without %s", exc.where, exc.field, exc.field)
            dropped = dropped | {exc.field}


def _ingest_once(inputs: Sequence[str | os.PathLike], out: Path, select: str | None,
                 dt_ps: float | None, dropped: frozenset[str], *, overwrite: bool,
                 progress: bool | None, command: str | None) -> Path:
    from tqdm.auto import tqdm

    from datagen.runs import check_output_path

    check_output_path(out)
    src = open_source(inputs, select=select, dt_ps=dt_ps, drop_fields=dropped)
    metadata = {
        **src.metadata,
        "source_files": [str(p) for p in inputs],
        "selection": select,
        "command": command if command is not None else shlex.join(sys.argv),
    }
    written = 0
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
                written += len(block.positions)
                bar.update(len(block.positions))
        if src.report:
            writer.update_metadata(**src.report)
    log.info("wrote %s: %d frames x %d atoms, interval %.6g ps", out, written,
             src.topology.n_atoms, src.interval_ps)
    return out
