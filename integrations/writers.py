"""XTC/DCD files from ASE runs, written by MDAnalysis' writers with true time stamps (ps).

:class:`TrajectoryObserver` is attached to any ASE dynamics (``dyn.attach(obs, interval=k)``)
and writes one frame per call: positions in Å, time ``dyn.get_time()`` converted to ps with
``ase.units``. XTC stores each frame's time; DCD stores a start and a fixed interval in its
header, taken from ``dyn.dt x interval``. The file is written under a temporary name and appears
under its final name on :meth:`close` (a crashed run leaves no partial file behind).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase import units

from surrogate_md.errors import DataError

PS_IN_ASE_TIME = 1000.0 * units.fs  # one picosecond in ASE time units


class TrajectoryObserver:
    """Write the atoms of an ASE dynamics to ``path`` (.xtc or .dcd) at every call.

    Args:
        dyn: the dynamics (its ``atoms``, ``dt`` and ``get_time()`` are read).
        path: output file, ``.xtc`` or ``.dcd``.
        interval: the ``interval`` the observer is attached with (DCD header only).
        overwrite: replace an existing file.
    """

    def __init__(self, dyn, path: str | os.PathLike, interval: int = 1,
                 overwrite: bool = False) -> None:
        import MDAnalysis as mda

        self.dyn = dyn
        self.atoms = dyn.atoms
        self.path = Path(path)
        fmt = self.path.suffix.lower().lstrip(".")
        if fmt not in ("xtc", "dcd"):
            raise DataError(f"{self.path}: trajectory must end in .xtc or .dcd")
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path}: directory {self.path.parent} does not exist")
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: file exists; pass overwrite=True or choose another "
                            "name")
        self._tmp = self.path.with_name(f".{self.path.name}.partial.{fmt}")
        n = len(self.atoms)
        self._universe = mda.Universe.empty(n, trajectory=True)
        kwargs = {}
        if fmt == "dcd":
            frame_ps = dyn.dt * interval / PS_IN_ASE_TIME
            kwargs = {"dt": frame_ps, "nsavc": 1,
                      "istart": int(round(dyn.get_time() / (dyn.dt * interval)))}
        self._writer = mda.Writer(str(self._tmp), n_atoms=n, format=fmt.upper(), **kwargs)
        self.n_frames = 0
        self.closed = False

    def __call__(self) -> None:
        ts = self._universe.trajectory.ts
        ts.positions = np.asarray(self.atoms.get_positions(), dtype=np.float32)
        cell = self.atoms.cell
        ts.dimensions = (np.concatenate([cell.lengths(), cell.angles()]) if cell.rank == 3
                         else None)
        ts.time = self.dyn.get_time() / PS_IN_ASE_TIME
        ts.frame = self.n_frames
        ts.data["step"] = int(getattr(self.dyn, "nsteps", self.n_frames))
        self._writer.write(self._universe.atoms)
        self.n_frames += 1

    def close(self) -> Path:
        """Finish the file and move it to its final name."""
        if not self.closed:
            self._writer.close()
            os.replace(self._tmp, self.path)
            self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if not self.closed:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self.closed = True

    def __enter__(self) -> TrajectoryObserver:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = ["PS_IN_ASE_TIME", "TrajectoryObserver"]
