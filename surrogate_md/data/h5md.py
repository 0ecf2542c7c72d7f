"""The canonical dataset file: one MD trajectory in the H5MD layout, written and read with h5py.

Layout (units are stored as ``unit`` attributes, the way H5MD and MDAnalysis' H5MD reader expect)::

    /h5md                                  version, author, creator
    /particles/trajectory/position/value   (F, N, 3) float32, Angstrom   [step, time (ps)]
    /particles/trajectory/velocity/value   (F, N, 3) float32, Angstrom ps-1   (optional)
    /particles/trajectory/force/value      (F, N, 3) float32, kJ mol-1 Angstrom-1   (optional)
    /particles/trajectory/box              boundary none|periodic; edges/value (F, 3, 3) Angstrom
    /particles/trajectory/species          (N,) int: atomic numbers
    /particles/trajectory/mass             (N,) float: amu
    /observables/trajectory/potential_energy/value   (F,) float64, kJ mol-1   (optional)
    /connectivity/bonds                    (B, 2) int: atom index pairs
    /parameters/topology/...               atom names, residue ids/names, segment ids
    /parameters attrs: metadata            JSON string: provenance (engine, force field, T, dt, seed...)

Frames are chunked along time and read lazily, so files with millions of frames never need to fit
in memory. Files are written under ``<name>.partial`` and renamed when closed, so a crash never
leaves a half-written file under the final name; a ``.partial`` file can be reopened to append
(that is how interrupted data generation resumes).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from surrogate_md.errors import DataError

log = logging.getLogger(__name__)

FORMAT_NAME = "surrogate-md-trajectory"
FORMAT_VERSION = 1
PARTICLE_GROUP = "trajectory"
PARTIAL_SUFFIX = ".partial"

LENGTH_UNIT = "Angstrom"
TIME_UNIT = "ps"
VELOCITY_UNIT = "Angstrom ps-1"
FORCE_UNIT = "kJ mol-1 Angstrom-1"
ENERGY_UNIT = "kJ mol-1"

# Element symbols by atomic number, for atom names/elements when a source has none.
ELEMENTS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe"
).split()


def element_symbol(z: int) -> str:
    """Element symbol of atomic number ``z`` (``"X"`` for 0 or unknown)."""
    return ELEMENTS[z] if 0 < z < len(ELEMENTS) else "X"


def _residue_labels(residue_ids, segment_ids) -> tuple[np.ndarray, np.ndarray]:
    res = np.asarray(residue_ids, dtype=np.int64).reshape(-1)
    seg = (np.full(len(res), "", dtype=str) if segment_ids is None
           else np.asarray(segment_ids, dtype=str).reshape(-1))
    if len(seg) != len(res):
        raise DataError(f"{len(seg)} segment ids for {len(res)} residue ids; give one per atom")
    return res, seg


def residue_index_of(residue_ids, segment_ids=None) -> np.ndarray:
    """(N,) int64 residue numbers 0..R-1 of atoms listed residue by residue.

    A new residue starts wherever ``(segment_id, residue_id)`` changes from one atom to the next,
    so residues of different chains that share a number (PDB numbering restarts in every chain)
    stay apart even when chains have blank or equal segment ids. ``segment_ids`` may be ``None``.
    """
    res, seg = _residue_labels(residue_ids, segment_ids)
    new = np.ones(len(res), dtype=bool)
    new[1:] = (res[1:] != res[:-1]) | (seg[1:] != seg[:-1])
    return np.cumsum(new, dtype=np.int64) - 1


def chain_index_of(residue_ids, segment_ids=None) -> np.ndarray:
    """(N,) int64 chain numbers 0..C-1 of atoms listed chain by chain.

    A new chain starts wherever the segment id changes, or the residue number decreases within
    one segment id (numbering restarts in a new chain whose segment id is blank or repeated).
    """
    res, seg = _residue_labels(residue_ids, segment_ids)
    new = np.ones(len(res), dtype=bool)
    new[1:] = (res[1:] < res[:-1]) | (seg[1:] != seg[:-1])
    return np.cumsum(new, dtype=np.int64) - 1


@dataclass
class Topology:
    """What a model needs to know about the atoms of a trajectory, as plain numpy arrays.

    Attributes:
        atomic_numbers: (N,) int, 0 for virtual sites/unknown.
        masses: (N,) float, amu.
        atom_names: (N,) str, e.g. ``"CA"``.
        residue_ids: (N,) int, residue number as in the source.
        residue_names: (N,) str, e.g. ``"ALA"`` (``"MOL"`` for small molecules).
        bonds: (B, 2) int, atom index pairs (may be empty).
        segment_ids: (N,) str, chain/segment labels (may be all ``""``).
    """

    atomic_numbers: np.ndarray
    masses: np.ndarray
    atom_names: np.ndarray
    residue_ids: np.ndarray
    residue_names: np.ndarray
    bonds: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    segment_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.atomic_numbers = np.asarray(self.atomic_numbers, dtype=np.int64)
        n = len(self.atomic_numbers)
        self.masses = np.asarray(self.masses, dtype=np.float64)
        self.atom_names = np.asarray(self.atom_names, dtype=str)
        self.residue_ids = np.asarray(self.residue_ids, dtype=np.int64)
        self.residue_names = np.asarray(self.residue_names, dtype=str)
        self.bonds = np.asarray(self.bonds, dtype=np.int64).reshape(-1, 2)
        if self.segment_ids is None:
            self.segment_ids = np.full(n, "", dtype=str)
        self.segment_ids = np.asarray(self.segment_ids, dtype=str)
        for name in ("masses", "atom_names", "residue_ids", "residue_names", "segment_ids"):
            if len(getattr(self, name)) != n:
                raise DataError(
                    f"topology field {name!r} has {len(getattr(self, name))} entries but there are "
                    f"{n} atoms; every per-atom field needs one entry per atom"
                )
        if len(self.bonds) and (self.bonds.min() < 0 or self.bonds.max() >= n):
            raise DataError(f"topology bonds reference atoms outside 0..{n - 1}")

    @property
    def n_atoms(self) -> int:
        return len(self.atomic_numbers)

    @property
    def elements(self) -> list[str]:
        return [element_symbol(int(z)) for z in self.atomic_numbers]

    def residue_index(self) -> np.ndarray:
        """(N,) int64 residue numbers 0..R-1 (see :func:`residue_index_of`)."""
        return residue_index_of(self.residue_ids, self.segment_ids)

    def chain_index(self) -> np.ndarray:
        """(N,) int64 chain numbers 0..C-1 (see :func:`chain_index_of`)."""
        return chain_index_of(self.residue_ids, self.segment_ids)

    def subset(self, index: np.ndarray) -> Topology:
        """Topology of the atoms ``index`` (in that order); bonds inside the subset are kept."""
        index = np.asarray(index, dtype=np.int64)
        remap = np.full(self.n_atoms, -1, dtype=np.int64)
        remap[index] = np.arange(len(index))
        bonds = remap[self.bonds] if len(self.bonds) else self.bonds
        bonds = bonds[(bonds >= 0).all(axis=1)] if len(bonds) else bonds
        return Topology(
            atomic_numbers=self.atomic_numbers[index],
            masses=self.masses[index],
            atom_names=self.atom_names[index],
            residue_ids=self.residue_ids[index],
            residue_names=self.residue_names[index],
            bonds=bonds,
            segment_ids=self.segment_ids[index],
        )

    @classmethod
    def from_elements(cls, atomic_numbers: np.ndarray, masses: np.ndarray,
                      bonds: np.ndarray | None = None) -> Topology:
        """A one-residue topology (``MOL``) for a small molecule, atom names ``C1, H2, ...``."""
        z = np.asarray(atomic_numbers, dtype=np.int64)
        names = [f"{element_symbol(int(a))}{i + 1}" for i, a in enumerate(z)]
        return cls(z, masses, names, np.ones(len(z), dtype=np.int64), ["MOL"] * len(z),
                   np.zeros((0, 2), dtype=np.int64) if bonds is None else bonds)


def _check_finite(name: str, array: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(np.asarray(array).reshape(len(array), -1)))[0][0]
        raise DataError(
            f"{path}: {name} contain NaN or inf values (first at frame {bad} of this block); "
            "remove or repair those frames before writing the dataset"
        )


class TrajectoryWriter:
    """Append frames to a canonical dataset file; the file appears under its name on ``close()``.

    Use as a context manager. On an exception inside the ``with`` block the partial file is
    removed (unless ``keep_partial=True``, which datagen uses to resume interrupted runs).

    Args:
        path: final file name (``.h5``).
        topology: the atoms.
        metadata: provenance, JSON-serialisable (engine, force field, temperature_K, step_fs,
            interval_ps, seed, source files, command...).
        velocities, forces, energies, box: which optional per-frame fields will be given.
        chunk_frames: frames per HDF5 chunk.
        overwrite: replace an existing file at ``path``.
        resume: reopen ``<path>.partial`` and append to it.
        keep_partial: keep ``<path>.partial`` when the block raises (for resumable producers).
    """

    def __init__(self, path: str | os.PathLike, topology: Topology, metadata: dict[str, Any],
                 *, velocities: bool = False, forces: bool = False, energies: bool = False,
                 box: bool = False, chunk_frames: int = 64, overwrite: bool = False,
                 resume: bool = False, keep_partial: bool = False) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.keep_partial = keep_partial
        if not self.path.parent.is_dir():
            raise DataError(
                f"{self.path}: the output directory {self.path.parent} does not exist; create it "
                "or choose another output path"
            )
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: file exists; pass overwrite=True (CLI: --overwrite) "
                            "to replace it or choose another name")
        self._fields = {"velocity": velocities, "force": forces}
        self._energies = energies
        self._box = box
        if resume and self.partial.exists():
            self._file = h5py.File(self.partial, "a")
            self._check_resume(topology)
            log.info("resuming %s at frame %d", self.partial, self.n_frames)
        else:
            try:
                self._file = h5py.File(self.partial, "w")
            except OSError as exc:
                raise DataError(f"{self.path}: cannot write ({exc}); check the directory "
                                "permissions or choose another output path") from exc
            self._create(topology, metadata, chunk_frames)

    # -- creation ---------------------------------------------------------------------------------
    def _create(self, topology: Topology, metadata: dict[str, Any], chunk: int) -> None:
        from surrogate_md import __version__

        f = self._file
        h5 = f.create_group("h5md")
        h5.attrs["version"] = np.array([1, 1])
        h5.create_group("author").attrs["name"] = metadata.get("author", "surrogate-md")
        creator = h5.create_group("creator")
        creator.attrs["name"] = "surrogate-md"
        creator.attrs["version"] = __version__
        n = topology.n_atoms
        part = f.create_group(f"particles/{PARTICLE_GROUP}")
        step = part.create_dataset("position/step", shape=(0,), maxshape=(None,), dtype=np.int64,
                                   chunks=(max(chunk, 1024),))
        time = part.create_dataset("position/time", shape=(0,), maxshape=(None,),
                                   dtype=np.float64, chunks=(max(chunk, 1024),))
        time.attrs["unit"] = TIME_UNIT
        units = {"position": LENGTH_UNIT, "velocity": VELOCITY_UNIT, "force": FORCE_UNIT}
        for name, unit in units.items():
            if name != "position" and not self._fields[name]:
                continue
            value = part.create_dataset(f"{name}/value", shape=(0, n, 3), maxshape=(None, n, 3),
                                        dtype=np.float32, chunks=(chunk, n, 3))
            value.attrs["unit"] = unit
            if name != "position":  # H5MD lets elements share step/time through hard links
                part[f"{name}/step"] = step
                part[f"{name}/time"] = time
        box = part.create_group("box")
        box.attrs["dimension"] = 3
        if self._box:
            box.attrs["boundary"] = np.array([b"periodic"] * 3)
            edges = box.create_dataset("edges/value", shape=(0, 3, 3), maxshape=(None, 3, 3),
                                       dtype=np.float32, chunks=(chunk, 3, 3))
            edges.attrs["unit"] = LENGTH_UNIT
            box["edges/step"] = step
            box["edges/time"] = time
        else:
            box.attrs["boundary"] = np.array([b"none"] * 3)
        part.create_dataset("species", data=topology.atomic_numbers.astype(np.int32))
        part.create_dataset("mass", data=topology.masses).attrs["unit"] = "amu"
        if self._energies:
            obs = f.create_group(f"observables/{PARTICLE_GROUP}")
            e = obs.create_dataset("potential_energy/value", shape=(0,), maxshape=(None,),
                                   dtype=np.float64, chunks=(max(chunk, 1024),))
            e.attrs["unit"] = ENERGY_UNIT
            obs["potential_energy/step"] = step
            obs["potential_energy/time"] = time
        f.create_dataset("connectivity/bonds", data=topology.bonds.astype(np.int64))
        top = f.create_group("parameters/topology")
        str_dt = h5py.string_dtype()
        top.create_dataset("atom_names", data=topology.atom_names.astype(object), dtype=str_dt)
        top.create_dataset("residue_names", data=topology.residue_names.astype(object),
                           dtype=str_dt)
        top.create_dataset("segment_ids", data=topology.segment_ids.astype(object), dtype=str_dt)
        top.create_dataset("residue_ids", data=topology.residue_ids)
        params = f["parameters"]
        params.attrs["format"] = FORMAT_NAME
        params.attrs["format_version"] = FORMAT_VERSION
        meta = {"package_version": __version__, **metadata}
        try:
            params.attrs["metadata"] = json.dumps(meta)
        except TypeError as exc:
            raise DataError(f"{self.path}: metadata is not JSON-serialisable ({exc})") from exc

    def _check_resume(self, topology: Topology) -> None:
        have = self._file[f"particles/{PARTICLE_GROUP}/species"][()]
        if len(have) != topology.n_atoms or not np.array_equal(have, topology.atomic_numbers):
            raise DataError(f"{self.partial}: cannot resume, it holds a different atom set; "
                            "delete it to start over")

    # -- appending --------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return int(self._file[f"particles/{PARTICLE_GROUP}/position/value"].shape[0])

    def append(self, positions: np.ndarray, time_ps: np.ndarray, *, step: np.ndarray | None = None,
               velocities: np.ndarray | None = None, forces: np.ndarray | None = None,
               potential_energy: np.ndarray | None = None, box: np.ndarray | None = None) -> None:
        """Append k frames.

        Args:
            positions: (k, N, 3) Å.
            time_ps: (k,) ps.
            step: (k,) integrator step numbers (defaults to the frame index).
            velocities: (k, N, 3) Å/ps, required if the writer was opened with velocities.
            forces: (k, N, 3) kJ/mol/Å.
            potential_energy: (k,) kJ/mol.
            box: (k, 3, 3) Å box vectors (rows).
        """
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim == 2:
            positions = positions[None]
        k = len(positions)
        part = self._file[f"particles/{PARTICLE_GROUP}"]
        n = part["position/value"].shape[1]
        if positions.shape[1:] != (n, 3):
            raise DataError(f"{self.path}: frames of shape {positions.shape[1:]} given to a file "
                            f"of {n} atoms")
        _check_finite("positions", positions, self.path)
        time_ps = np.atleast_1d(np.asarray(time_ps, dtype=np.float64))
        if len(time_ps) != k:
            raise DataError(f"{self.path}: {k} frames but {len(time_ps)} time stamps")
        start = self.n_frames
        step = np.arange(start, start + k) if step is None else np.atleast_1d(step)
        values = {"position": positions, "velocity": velocities, "force": forces}
        given = {"velocities": velocities is not None and not self._fields["velocity"],
                 "forces": forces is not None and not self._fields["force"],
                 "box": box is not None and not self._box,
                 "potential_energy": potential_energy is not None and not self._energies}
        if any(given.values()):
            raise DataError(f"{self.path}: {', '.join(k for k, v in given.items() if v)} given "
                            "to a writer opened without them (they would be dropped); open it "
                            "with them, or leave them out")
        for name, arr in values.items():
            if name != "position" and not self._fields[name]:
                continue
            if arr is None:
                raise DataError(f"{self.path}: the file was opened with {name}s; give them")
            arr = np.asarray(arr, dtype=np.float64).reshape(k, n, 3)
            _check_finite(name + "s", arr, self.path)
            ds = part[f"{name}/value"]
            ds.resize(start + k, axis=0)
            ds[start:] = arr
        for name, arr in (("step", step), ("time", time_ps)):
            ds = part[f"position/{name}"]
            ds.resize(start + k, axis=0)
            ds[start:] = arr
        if self._box:
            if box is None:
                raise DataError(f"{self.path}: the file was opened with a box; give box vectors")
            ds = part["box/edges/value"]
            ds.resize(start + k, axis=0)
            ds[start:] = np.asarray(box).reshape(k, 3, 3)
        if self._energies:
            if potential_energy is None:
                raise DataError(f"{self.path}: the file was opened with energies; give them")
            ds = self._file[f"observables/{PARTICLE_GROUP}/potential_energy/value"]
            ds.resize(start + k, axis=0)
            ds[start:] = np.atleast_1d(potential_energy)

    def truncate(self, n_frames: int) -> None:
        """Drop every frame after the first ``n_frames`` (resuming from an earlier checkpoint)."""
        if not 0 <= n_frames <= self.n_frames:
            raise DataError(f"{self.partial}: cannot truncate {self.n_frames} frames to "
                            f"{n_frames}; delete it to start over")
        part = self._file[f"particles/{PARTICLE_GROUP}"]
        datasets = [part["position/value"], part["position/step"], part["position/time"]]
        datasets += [part[f"{name}/value"] for name, on in self._fields.items() if on]
        if self._box:
            datasets.append(part["box/edges/value"])
        if self._energies:
            datasets.append(self._file[f"observables/{PARTICLE_GROUP}/potential_energy/value"])
        for ds in datasets:
            ds.resize(n_frames, axis=0)

    def flush(self) -> None:
        self._file.flush()

    def update_metadata(self, **items: Any) -> None:
        params = self._file["parameters"]
        meta = json.loads(params.attrs["metadata"])
        meta.update(items)
        params.attrs["metadata"] = json.dumps(meta)

    def close(self) -> Path:
        """Finish the file and move it to its final name; returns that path."""
        if self._file.id.valid:
            n = self.n_frames
            self._file.close()
            if n == 0:
                self.partial.unlink(missing_ok=True)
                raise DataError(f"{self.path}: no frames were written; nothing saved")
            os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        if self._file.id.valid:
            self._file.close()
        if not self.keep_partial:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_trajectory(path: str | os.PathLike, topology: Topology, positions: np.ndarray,
                     time_ps: np.ndarray, metadata: dict[str, Any], *, overwrite: bool = False,
                     velocities: np.ndarray | None = None, forces: np.ndarray | None = None,
                     potential_energy: np.ndarray | None = None, box: np.ndarray | None = None,
                     chunk_frames: int = 64) -> Path:
    """Write a whole trajectory held in memory to a canonical dataset file (atomically).

    Shapes and units as in :meth:`TrajectoryWriter.append`.
    """
    with TrajectoryWriter(path, topology, metadata, velocities=velocities is not None,
                          forces=forces is not None, energies=potential_energy is not None,
                          box=box is not None, chunk_frames=chunk_frames,
                          overwrite=overwrite) as w:
        block = max(chunk_frames * 16, 1)
        for s in range(0, len(positions), block):
            sl = slice(s, s + block)
            w.append(positions[sl], time_ps[sl],
                     velocities=None if velocities is None else velocities[sl],
                     forces=None if forces is None else forces[sl],
                     potential_energy=None if potential_energy is None else potential_energy[sl],
                     box=None if box is None else box[sl])
    return Path(path)


class TrajectoryFile:
    """Lazy reader of a canonical dataset file.

    ``positions``, ``velocities`` and ``forces`` are h5py datasets (index them to read frames;
    nothing is loaded up front). ``load()`` reads everything into memory for fast training on
    small files.

    Attributes:
        path, topology, metadata (dict), n_frames, n_atoms,
        time_ps: (F,) ps, interval_ps: saved-frame interval in ps.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
            hint = (f" (an unfinished {partial.name} exists: the run that wrote it did not finish;"
                    " resume it)") if partial.exists() else ""
            raise DataError(f"{self.path}: no such dataset file{hint}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 file ({exc}); it may be truncated "
                            "or of another format: regenerate it with `python -m datagen`") from exc
        try:
            self._open()
        except DataError:
            self._file.close()
            raise
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            self._file.close()
            raise DataError(f"{self.path}: not a surrogate-md dataset file ({exc}); create one "
                            "with `python -m datagen ingest` or `python -m datagen openmm`") from exc

    def _open(self) -> None:
        f = self._file
        params = f["parameters"]
        if params.attrs.get("format") != FORMAT_NAME:
            raise ValueError("missing format marker")
        version = int(params.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise DataError(f"{self.path}: dataset format version {version} is newer than this "
                            f"package reads ({FORMAT_VERSION}); upgrade surrogate-md")
        self.metadata: dict[str, Any] = json.loads(params.attrs["metadata"])
        part = f[f"particles/{PARTICLE_GROUP}"]
        self.positions = part["position/value"]
        self.velocities = part["velocity/value"] if "velocity" in part else None
        self.forces = part["force/value"] if "force" in part else None
        self.box = part["box/edges/value"] if "edges" in part["box"] else None
        obs = f.get(f"observables/{PARTICLE_GROUP}/potential_energy/value")
        self.potential_energy = obs
        self.time_ps = part["position/time"][()]
        top = f["parameters/topology"]
        self.topology = Topology(
            atomic_numbers=part["species"][()],
            masses=part["mass"][()],
            atom_names=top["atom_names"].asstr()[()],
            residue_ids=top["residue_ids"][()],
            residue_names=top["residue_names"].asstr()[()],
            bonds=f["connectivity/bonds"][()],
            segment_ids=top["segment_ids"].asstr()[()],
        )
        if self.positions.shape[1] != self.topology.n_atoms:
            raise DataError(f"{self.path}: positions have {self.positions.shape[1]} atoms but the "
                            f"topology has {self.topology.n_atoms}")
        if self.n_frames >= 2:
            steps = np.diff(self.time_ps)
            interval = self.interval_ps
            bad = np.nonzero(~np.isclose(steps, interval, rtol=1e-3, atol=1e-9))[0]
            if not interval > 0 or len(bad):
                i = int(bad[0]) if len(bad) else 0
                raise DataError(
                    f"{self.path}: frames are not {interval:g} ps apart (the file's interval_ps) "
                    f"everywhere: frame {i} is at {self.time_ps[i]:g} ps, frame {i + 1} at "
                    f"{self.time_ps[i + 1]:g} ps; every time offset cut from it would be wrong. "
                    "Write frames evenly spaced with a matching interval_ps (python -m datagen "
                    "ingest checks and fixes this for files from other programs)")

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[1])

    @property
    def interval_ps(self) -> float:
        """Saved-frame interval in ps (from metadata, else from the time axis)."""
        if "interval_ps" in self.metadata:
            return float(self.metadata["interval_ps"])
        if self.n_frames < 2:
            raise DataError(f"{self.path}: one frame and no interval_ps in metadata")
        return float(self.time_ps[1] - self.time_ps[0])

    def read(self, frames: np.ndarray | slice, field: str = "positions") -> np.ndarray:
        """Read frames of ``field`` (``positions``/``velocities``/``forces``) as float64.

        ``frames`` may be unsorted and repeated; reads are done in sorted order (h5py's rule).
        """
        ds = getattr(self, field)
        if ds is None:
            raise DataError(f"{self.path}: the file has no {field}")
        if isinstance(frames, slice):
            return np.asarray(ds[frames], dtype=np.float64)
        frames = np.asarray(frames, dtype=np.int64)
        if isinstance(ds, np.ndarray):
            return np.asarray(ds[frames], dtype=np.float64)
        uniq, inverse = np.unique(frames, return_inverse=True)
        return np.asarray(ds[uniq], dtype=np.float64)[inverse.reshape(frames.shape)]

    def load(self, fields: tuple[str, ...] = ("positions", "velocities", "forces", "box",
                                              "potential_energy")) -> TrajectoryFile:
        """Replace the lazy datasets of ``fields`` by in-memory arrays (for files that fit in
        RAM); the others stay on disk."""
        for name in fields:
            ds = getattr(self, name)
            if ds is not None and not isinstance(ds, np.ndarray):
                setattr(self, name, ds[()])
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the positions and velocities in memory (what ``WindowDataset`` loads)."""
        return sum(int(ds.size) * ds.dtype.itemsize for ds in (self.positions, self.velocities)
                   if ds is not None)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> TrajectoryFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TrajectoryFile({str(self.path)!r}, frames={self.n_frames}, atoms={self.n_atoms},"
                f" interval_ps={self.metadata.get('interval_ps')})")


def open_trajectory(path: str | os.PathLike) -> TrajectoryFile:
    """Open a canonical dataset file for lazy reading (see :class:`TrajectoryFile`)."""
    return TrajectoryFile(path)
