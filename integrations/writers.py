"""XTC/DCD files from ASE runs, written by MDAnalysis' writers with true time stamps (ps).

:class:`TrajectoryObserver` is attached to any ASE dynamics (``dyn.attach(obs, interval=k)``)
and writes one frame per call: positions in Å, time ``dyn.get_time()`` converted to ps with
``ase.units``. XTC stores each frame's time; DCD stores a first step, the step size and the steps
between frames in its header: the file is opened at the first call (an observer attached
part-way through a run writes its first frame then), with first step ``dyn.get_time() /
dyn.dt`` at that call, step size ``dyn.dt`` and ``interval`` steps between frames. The file is
written under a temporary name and appears under its final name on :meth:`close` (a crashed run
leaves no partial file behind).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from ase import units

from surrogate_md.errors import DataError

log = logging.getLogger(__name__)

PS_IN_ASE_TIME = 1000.0 * units.fs  # one picosecond in ASE time units


class TrajectoryObserver:
    """Write the atoms of an ASE dynamics to ``path`` (.xtc or .dcd) at every call.

    Args:
        dyn: the dynamics (its ``atoms``, ``dt`` and ``get_time()`` are read).
        path: output file, ``.xtc`` or ``.dcd``.
        interval: the ``interval`` the observer is attached with (DCD header only: the steps
            between frames).
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
        if int(interval) != interval or interval < 1:
            raise DataError(f"{self.path}: interval must be a whole number of steps >= 1, got "
                            f"{interval}")
        self.interval = int(interval)
        self._fmt = fmt
        self._tmp = self.path.with_name(f".{self.path.name}.partial.{fmt}")
        self._universe = mda.Universe.empty(len(self.atoms), trajectory=True)
        self._writer = None  # opened at the first frame (the DCD header needs its step)
        self.n_frames = 0
        self.closed = False

    def _open(self) -> None:
        """Open the writer; a DCD header gets the current step as its first step."""
        import MDAnalysis as mda

        kwargs = {}
        if self._fmt == "dcd":
            steps = self.dyn.get_time() / self.dyn.dt
            first = int(round(steps))
            if abs(steps - first) > 1e-6 * max(1.0, abs(steps)):
                log.warning("%s: the first frame's time (%g ps) is not a whole number of steps "
                            "of %g ps; the DCD header stamps it at step %d", self.path,
                            self.dyn.get_time() / PS_IN_ASE_TIME,
                            self.dyn.dt / PS_IN_ASE_TIME, first)
            kwargs = {"dt": self.dyn.dt * self.interval / PS_IN_ASE_TIME,
                      "nsavc": self.interval, "istart": first}
        self._writer = mda.Writer(str(self._tmp), n_atoms=len(self.atoms),
                                  format=self._fmt.upper(), **kwargs)

    def __call__(self) -> None:
        if self.closed:
            raise DataError(f"{self.path}: the observer is closed")
        if self._writer is None:
            self._open()
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
            if self._writer is None:  # no frame: an empty file starting now
                self._open()
            self._writer.close()
            os.replace(self._tmp, self.path)
            self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if not self.closed:
            if self._writer is not None:
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
