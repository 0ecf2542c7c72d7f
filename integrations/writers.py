"""XTC/DCD files from ASE runs, written by MDAnalysis' writers with true time stamps (ps).

:class:`TrajectoryObserver` is attached to any ASE dynamics (``dyn.attach(obs, interval=k)``)
and writes one frame per call: positions in Å, time ``dyn.get_time()`` converted to ps with
``ase.units``. XTC stores each frame's time; DCD stores a first step, the step size and the steps
between frames in its header: the file is opened at the second call (an observer attached
part-way through a run starts then), with first step ``dyn.get_time() / dyn.dt`` at the first
call, step size ``dyn.dt`` and the steps between the first two calls between frames (``interval``
only for a file of one frame); calls at uneven times, which a DCD cannot stamp, are an error. The file is
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
        interval: the ``interval`` the observer is attached with (DCD only; the file takes the
            steps between its first two frames and warns if they differ from this).
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
        self._writer = None  # XTC: opened at the first frame; DCD: at the second
        self._pending: tuple | None = None  # DCD: the first frame until the spacing is known
        self._first_time: float | None = None  # DCD: ASE times of the first and last frames
        self._last_time: float | None = None
        self._written = 0
        self.n_frames = 0
        self.closed = False

    def _open(self) -> None:
        """Open the writer; a DCD header gets the first frame's step as its first step."""
        import MDAnalysis as mda

        kwargs = {}
        if self._fmt == "dcd":
            start = self.dyn.get_time() if self._first_time is None else self._first_time
            steps = start / self.dyn.dt
            first = int(round(steps))
            if abs(steps - first) > 1e-6 * max(1.0, abs(steps)):
                log.warning("%s: the first frame's time (%g ps) is not a whole number of steps "
                            "of %g ps; the DCD header stamps it at step %d", self.path,
                            start / PS_IN_ASE_TIME,
                            self.dyn.dt / PS_IN_ASE_TIME, first)
            kwargs = {"dt": self.dyn.dt * self.interval / PS_IN_ASE_TIME,
                      "nsavc": self.interval, "istart": first}
        self._writer = mda.Writer(str(self._tmp), n_atoms=len(self.atoms),
                                  format=self._fmt.upper(), **kwargs)

    def __call__(self) -> None:
        if self.closed:
            raise DataError(f"{self.path}: the observer is closed")
        now = self.dyn.get_time()
        if self._fmt == "dcd":
            self._check_dcd_spacing(now)
        cell = self.atoms.cell
        frame = (np.asarray(self.atoms.get_positions(), dtype=np.float32),
                 np.concatenate([cell.lengths(), cell.angles()]) if cell.rank == 3 else None,
                 now, int(getattr(self.dyn, "nsteps", self.n_frames)))
        if self._fmt == "dcd" and self.n_frames == 0:
            self._pending = frame  # written once the second frame fixes the spacing
        else:
            self._write(frame)
        self.n_frames += 1

    def _write(self, frame: tuple) -> None:
        """Write ``frame`` (positions Å, dimensions, ASE time, step), the pending first one
        before it."""
        if self._writer is None:
            self._open()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._write(pending)
        positions, dimensions, now, step = frame
        ts = self._universe.trajectory.ts
        ts.positions = positions
        ts.dimensions = dimensions
        ts.time = now / PS_IN_ASE_TIME
        ts.frame = self._written
        ts.data["step"] = step
        self._writer.write(self._universe.atoms)
        self._written += 1

    def _check_dcd_spacing(self, now: float) -> None:
        """A DCD stamps frame k at first + k * interval steps: take the interval from the first
        two frames and refuse frames off that grid."""
        if self.n_frames == 0:
            self._first_time = self._last_time = now
            return
        steps = (now - self._last_time) / self.dyn.dt
        k = int(round(steps))
        if self.n_frames == 1:
            if k < 1 or abs(steps - k) > 1e-6 * max(1.0, steps):
                raise DataError(f"{self.path}: the second frame comes {steps:g} steps after the "
                                "first; a DCD needs frames a whole number of steps apart (write "
                                "XTC, which stores each frame's time)")
            if k != self.interval:
                log.warning("%s: frames come every %d steps, not every %d (the interval given "
                            "to TrajectoryObserver); the DCD is stamped with %d", self.path, k,
                            self.interval, k)
                self.interval = k
        elif abs(steps - self.interval) > 1e-6 * max(1.0, steps):
            raise DataError(f"{self.path}: frame {self.n_frames} comes {steps:g} steps after the "
                            f"previous one, the file's other frames every {self.interval}; a "
                            "DCD cannot stamp uneven frames (write XTC, which stores each "
                            "frame's time, or attach the observer at one interval)")
        self._last_time = now

    def close(self) -> Path:
        """Finish the file and move it to its final name. Without a frame no file is written
        (a DCD or XTC of no frames is unreadable by MDAnalysis and MDTraj): a warning says so and
        ``path`` is left as it was."""
        if not self.closed:
            if self._pending is not None:  # a DCD of one frame
                pending, self._pending = self._pending, None
                self._write(pending)
            self.closed = True
            if self._writer is None:
                log.warning("%s: the observer saw no frame; no file written", self.path)
                return self.path
            self._writer.close()
            os.replace(self._tmp, self.path)
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
