"""Control of a long ``python -m integrations.predict`` run: signals that stop it only
between frames, and the checkpoints ``--resume`` continues it from.

A signal (SIGINT, SIGTERM) that arrives while a frame is being written is acted on once the
frame, its state-data line and its checkpoint are whole (:class:`StopSignals`,
:class:`FrameWriter`). :class:`RunCheckpoints` keeps ``.<OUT stem>.chk.json`` and two alternating
OpenMM checkpoints beside ``OUT``; the functions below check that a resumed command is the same
run, load its checkpoint and cut the outputs back to it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

from surrogate_md.errors import CheckpointError, ConfigError, DataError, EngineError
from surrogate_md.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: exit codes of an interrupted run, as a shell reports a process ended by the signal
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}

class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: raised where the run is, as SIGINT raises KeyboardInterrupt, so
    everything that cleans up after Ctrl-C (the Context put back to the jump's start, the
    frames written so far kept) does so after a SIGTERM too."""


class StopSignals:
    """While the block runs, SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated`
    where the run is, except inside a :meth:`deferred` section (a frame being written): a signal
    arriving there is raised when the section ends, so the files never end in a torn frame.
    After the first raise, or after :meth:`hold` (the outputs are being finished), signals are
    only logged. A raise Python swallowed (a signal handled while it ran a finaliser or a
    weakref callback prints "Exception ignored" and goes on) is raised again at the next
    deferred section unless :meth:`hold` came first: without that, the run went on with every
    later signal only logged; the "Exception ignored" traceback Python would print for it is
    left out (other unraisable exceptions are printed as before). The previous handlers come
    back at the end. Outside the main thread, where Python cannot install signal handlers,
    nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._raise = True
        self._depth = 0  # nesting of deferred sections
        self._pending: int | None = None  # the signal that arrived in one
        self._fired: int | None = None  # the signal raised, until hold() shows it was handled
        self._held = False
        self._previous: dict[int, object] = {}
        self._unraisable_hook = None

    @staticmethod
    def _exception(signum: int) -> KeyboardInterrupt:
        if signum == signal.SIGTERM:
            return Terminated(f"signal {signal.Signals(signum).name}")
        return KeyboardInterrupt()

    def _handle(self, signum, frame) -> None:
        if not self._raise:
            log.warning("%s: finishing the outputs first", signal.Signals(signum).name)
        elif self._depth:
            self._pending = self._pending or signum
        else:
            self._raise = False  # one exception: a second signal must not cut the clean-up
            self._fired = signum
            raise self._exception(signum)

    @contextlib.contextmanager
    def deferred(self, before_stop=None):
        """A section no signal interrupts; one that arrived in it is raised when it ends, after
        ``before_stop()`` (itself deferred) has run."""
        if self._fired is not None and not self._held and self._depth == 0:
            log.warning("%s: its KeyboardInterrupt was swallowed (raised inside a finaliser); "
                        "stopping now", signal.Signals(self._fired).name)
            raise self._exception(self._fired)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending is not None and self._raise:
            self._depth += 1
            try:
                if before_stop is not None:
                    before_stop()
            finally:
                self._depth -= 1
            signum, self._pending, self._raise = self._pending, None, False
            self._fired = signum
            raise self._exception(signum)

    def hold(self) -> None:
        self._raise, self._held = False, True

    def _unraisable(self, unraisable) -> None:
        """``sys.unraisablehook`` while the block runs: this block's own stop signal, swallowed
        in a finaliser, is raised again at the next frame, so its traceback is not printed."""
        if self._fired is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        self._unraisable_hook(unraisable)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._unraisable_hook is not None:
            sys.unraisablehook, self._unraisable_hook = self._unraisable_hook, None


class FrameWriter:
    """predict's reporters as one OpenMM reporter: a frame's trajectory model and state-data
    line, then (every ``checkpoint_every`` frames, and at a frame a stop signal arrived in) the
    resume checkpoint, all in one :meth:`StopSignals.deferred` section. One section per frame,
    rather than one per reporter, so that a signal never leaves a torn frame, a frame without
    its state-data line, or frames the last checkpoint does not know of when it could have.

    ``frames``: the frames already in the files (a resumed run's earlier parts)."""

    def __init__(self, reporters: list, interval: int, signals: StopSignals,
                 checkpoints: RunCheckpoints, checkpoint_every: int, frames: int = 0) -> None:
        self.reporters = reporters
        self.interval = interval
        self.signals = signals
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self.frames = frames
        self.checkpointed = frames

    def describeNextReport(self, simulation) -> dict:
        from integrations.openmm_simulation import _report_dict

        include = set()
        for reporter in self.reporters:
            include.update(_report_dict(reporter.describeNextReport(simulation))["include"])
        return {"steps": self.interval - simulation.currentStep % self.interval,
                "periodic": None, "include": sorted(include)}

    def report(self, simulation, state) -> None:
        with self.signals.deferred(before_stop=lambda: self.checkpoint(simulation)):
            for reporter in self.reporters:
                reporter.report(simulation, state)
            self.frames += 1
            if self.frames % self.checkpoint_every == 0:
                self.checkpoint(simulation)

    def checkpoint(self, simulation) -> None:
        if self.checkpointed == self.frames:
            return
        self.checkpoints.save(simulation, self.frames)
        self.checkpointed = self.frames


class RunCheckpoints:
    """What ``--resume`` continues from, hidden beside OUT: ``.<OUT stem>.chk.json``, the record
    (whose run it is, the frame, jumps, step and time of the last checkpoint, the byte sizes of
    the trajectory and state data then, and the run's parts so far), and two OpenMM checkpoints
    ``.<OUT stem>.0.chk`` and ``.<OUT stem>.1.chk`` (:meth:`SurrogateSimulation.saveCheckpoint`:
    each with its ``.surrogate.npz``) used in turn. A checkpoint goes into the slot the record
    does not name and the record is replaced (atomically) after it: a process killed at any
    moment leaves a record that names a whole checkpoint and its own surrogate state (one slot
    would lose both when killed between writing its two files)."""

    def __init__(self, out: Path, trajectory: Path, state_data: Path) -> None:
        self.record_path = out.with_name(f".{out.stem}.chk.json")
        self.slots = tuple(out.with_name(f".{out.stem}.{i}.chk") for i in (0, 1))
        self.trajectory, self.state_data = trajectory, state_data  # the files being written
        self.base: dict = {}  # identity, platform, report interval: set by the run
        self.parts: list[dict] = []  # the parts of the run before this one
        self.record: dict | None = None  # the last one written or read
        self.start_jumps = 0  # jumps done before this part
        self.clock = time.perf_counter()  # this part's start

    def read(self) -> dict | None:
        if not self.record_path.exists():
            return None
        try:
            record = json.loads(self.record_path.read_text())
            if record.get("format_version") != RESUME_FORMAT:
                raise ValueError(f"format_version {record.get('format_version')!r}, not "
                                 f"{RESUME_FORMAT}")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.record_path}: unreadable resume record ({exc}); start "
                                  "over without --resume (with --overwrite if the outputs "
                                  "exist)") from exc
        self.record = record
        return record

    def part(self, jumps_done: int, stopped_by: str | None = None) -> dict:
        """This part: the jumps it added (from, to), its wall time, what stopped it."""
        return {"jumps": [self.start_jumps, jumps_done],
                "wall_s": round(time.perf_counter() - self.clock, 3), "stopped_by": stopped_by}

    def save(self, simulation, frames: int) -> None:
        from openmm import unit

        slot = 0 if self.record is None else 1 - self.record["slot"]
        simulation.saveCheckpoint(str(self.slots[slot]))
        jumps = frames * self.base["report_interval"]
        self.write({**self.base, "slot": slot, "frames": frames, "jumps_done": jumps,
                    "step": simulation.currentStep,
                    "time_ps": simulation.context.getState().getTime().value_in_unit(
                        unit.picosecond),
                    "trajectory_bytes": self.trajectory.stat().st_size,
                    "state_data_bytes": self.state_data.stat().st_size,
                    "parts": [*self.parts, self.part(jumps)]})

    def write(self, record: dict) -> None:
        atomic_write_text(self.record_path, json.dumps(record, indent=1, default=str))
        self.record = record

    def mark_stopped(self, stopped_by: str) -> None:
        """Record what stopped the part that ends at the last checkpoint (a failure), so that
        ``--resume`` lists it so instead of as ``killed``. Best effort: on a full disk even this
        small write may fail, and the record as it was still resumes."""
        record = self.record
        if record is None or record["parts"][-1]["stopped_by"] is not None:
            return
        parts = [*record["parts"][:-1], {**record["parts"][-1], "stopped_by": stopped_by}]
        try:
            self.write({**record, "parts": parts})
        except OSError as exc:
            log.debug("%s: could not record what stopped the run (%s)", self.record_path, exc)

    def files(self) -> list[Path]:
        """The record, the checkpoints, their surrogate states and any temporary file of a
        writer killed on the way."""
        found = [self.record_path]
        for slot in self.slots:
            found += [slot, slot.with_name(slot.name + ".surrogate.npz")]
        return found + self.temporary_files()

    def temporary_files(self) -> list[Path]:
        """Temporary files of checkpoint and record writes that a killed process left."""
        found = []
        for slot in self.slots:
            found += slot.parent.glob(f"{glob.escape(slot.name)}*.tmp")
            found += slot.parent.glob(f".{glob.escape(slot.name)}*.tmp")
        found += self.record_path.parent.glob(f".{glob.escape(self.record_path.name)}*.tmp")
        return found

    def remove(self) -> None:
        for path in self.files():  # the record first: no record names a removed checkpoint
            path.unlink(missing_ok=True)


# -- --resume: the helpers of a continued run ------------------------------------------------------
#: record format of :class:`RunCheckpoints`
RESUME_FORMAT = 1
#: what makes a run this command's, as the user wrote it: a resume must repeat these options and
#: the files' contents (-o, --platform, --device, --checkpoint-every and --overwrite may differ)
IDENTITY_LABELS = {
    "checkpoint": "the surrogate checkpoint (sha256)", "topology": "the --topology file (sha256)",
    "coordinates": "the --coordinates file (sha256)", "format": "the -o format",
    "jumps": "-n/--jumps", "report_interval": "--report-interval", "md_steps": "--md-steps",
    "guard": "--guard", "temperature_K": "--temperature-K",
    "end_velocities": "--end-velocities", "seed": "--seed", "minimize": "--minimize",
    "forcefield": "--forcefield", "cutoff_nm": "--cutoff-nm",
    "jump_noise": "the --jump-noise file (sha256)", "noise_scale": "--noise-scale",
    "settle_iterations": "--settle-iterations", "relax_iterations": "--relax-iterations",
    "redraws": "--redraws", "no_size_guard": "--no-size-guard"}


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files of a run: under their final names, and the hidden names written to until the
    run ends."""

    out: Path

    @property
    def csv(self) -> Path:
        return self.out.with_suffix(".csv")

    @property
    def json(self) -> Path:
        return self.out.with_suffix(".json")

    @property
    def tmp_traj(self) -> Path:
        return self.out.with_name(f".{self.out.name}.partial{self.out.suffix}")

    @property
    def tmp_csv(self) -> Path:
        return self.csv.with_name(f".{self.csv.name}.partial")


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on the run writing ``out`` for the whole block: ``fcntl.flock`` on
    the hidden ``.<OUT stem>.lock`` beside it (the stem: the state data, provenance and
    checkpoints of ``run.xtc`` and ``run.dcd`` share it). Two runs on the same ``OUT`` at once
    (two ``--resume``, a resume and a fresh run) would mix their frames; the second is refused at
    once. The file is removed when the block ends (while still held), so only a killed run
    leaves it, and a lock nobody holds is taken over.

    Raises:
        DataError: another run holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        yield None
        return
    path = out.with_name(f".{out.stem}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(f"{out}: another predict run is writing it (it holds the lock "
                            f"{path.name}); wait for that run to end (or stop it), or choose "
                            "another -o") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file may have been removed by the run that held it, as it ended
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # still held: no other run has this file
        os.close(fd)


def remove_leftovers(outputs: Outputs, checkpoints: RunCheckpoints) -> None:
    """Remove the temporary files of atomic writes of this ``OUT`` (the trajectory cut back by a
    resume, the provenance, a checkpoint) that a process killed in them left; only under
    :func:`run_lock`, when no other run can be writing them."""
    found = checkpoints.temporary_files()
    for target in (outputs.out, outputs.tmp_traj, outputs.csv, outputs.tmp_csv, outputs.json):
        found += target.parent.glob(f".{glob.escape(target.name)}.*.tmp")
    for path in found:
        log.debug("%s: removing the temporary file of a killed write", path)
        path.unlink(missing_ok=True)


def run_identity(args: argparse.Namespace, surrogate) -> dict:
    """JSON-safe identity of the run ``args`` describe (see :data:`IDENTITY_LABELS`)."""
    from surrogate_md.checkpoint import file_hash

    identity = {"checkpoint": surrogate.checkpoint_hash, "topology": file_hash(args.topology),
                "coordinates": file_hash(args.coordinates) if args.coordinates else None,
                "format": Path(args.output).suffix.lower()}
    noise = getattr(args, "jump_noise", None)
    # without noise both stay None, as in the identities of runs recorded before jump noise
    identity["jump_noise"] = file_hash(noise) if noise else None
    identity["noise_scale"] = float(args.noise_scale) if noise else None
    identity.update({key: getattr(args, key) for key in IDENTITY_LABELS if key not in identity})
    return json.loads(json.dumps(identity))


def check_identity(old: dict, new: dict, out: Path, what: str) -> None:
    # a run recorded before the engines settled rebuilt atoms ran without settling, and one
    # recorded before --relax-iterations relaxed for at most the default 200 iterations, and
    # one before --redraws fell back at once; one before --no-size-guard had the size check
    # where its checkpoint carried a range (checkpoints of that release carried none)
    old = {"settle_iterations": 0, "relax_iterations": 200, "redraws": 0,
           "no_size_guard": False, **old}
    diff = [f"{IDENTITY_LABELS[k]} was {old.get(k)!r}, now {new[k]!r}" for k in new
            if old.get(k) != new[k]]
    if diff:
        raise ConfigError(f"{out}: the {what} was made by another command ({'; '.join(diff)}); "
                          "--resume continues the same command only: repeat its options and "
                          "files, or start over with --overwrite (or another -o)")


def provenance_of(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan_resume(outputs: Outputs, checkpoints: RunCheckpoints, identity: dict) -> dict | None:
    """The record ``--resume`` continues from, checked against ``identity``; None when ``OUT``
    is this command's finished run (nothing to do; a checkpoint left by a process killed while
    it finished is removed).

    Raises:
        DataError: nothing to resume. ConfigError: the run is another command's.
    """
    record = checkpoints.read()
    prov = provenance_of(outputs.json)
    if (prov is not None and prov.get("interrupted") is False and outputs.out.exists()
            and not outputs.tmp_traj.exists()):
        check_identity(prov.get("resume_identity", identity), identity, outputs.out,
                       "finished run")
        log.info("%s: the run is complete (%d jumps); nothing to do", outputs.out,
                 prov.get("jumps", 0) + prov.get("fallbacks", 0))
        checkpoints.remove()
        return None
    if record is None:
        stopped = (prov is not None and prov.get("interrupted")) or outputs.tmp_traj.exists()
        if stopped:
            raise DataError(f"{outputs.out}: nothing to resume: no checkpoint "
                            f"{checkpoints.record_path.name} beside it (the run stopped before "
                            "its first checkpoint); rerun the command without --resume, with "
                            "--overwrite, to start over")
        raise DataError(f"{outputs.out}: nothing to resume: no checkpoint "
                        f"{checkpoints.record_path.name} beside it (no interrupted run of it "
                        "was found); run the command without --resume (with --overwrite to "
                        "replace existing outputs)")
    check_identity(record["identity"], identity, outputs.out, "interrupted run")
    return record


def resume_simulation(sim, record: dict, checkpoints: RunCheckpoints) -> None:
    """Load the checkpoint the record names into ``sim`` (Context and surrogate state) and check
    that it is the state the record describes."""
    slot = checkpoints.slots[record["slot"]]
    platform = sim.context.getPlatform().getName()
    if platform != record["platform"]:
        raise EngineError(f"{slot}: written on the OpenMM platform {record['platform']}, and "
                          f"this run uses {platform}; OpenMM checkpoints load only on the "
                          f"platform that wrote them: resume with --platform "
                          f"{record['platform']}")
    try:
        sim.loadCheckpoint(str(slot))
    except Exception as exc:  # OpenMM raises a bare Exception for a checkpoint it cannot load
        raise CheckpointError(f"{slot}: cannot be loaded ({type(exc).__name__}: {exc}); the run "
                              "cannot be resumed: start over with --overwrite") from exc
    done = sim.n_jumps + sim.n_fallbacks
    if (sim.currentStep, done) != (record["step"], record["jumps_done"]):
        raise CheckpointError(
            f"{slot}: holds step {sim.currentStep} after {done} jumps, but "
            f"{checkpoints.record_path.name} says step {record['step']} after "
            f"{record['jumps_done']} (the checkpoint or its .surrogate.npz was changed or "
            "removed); the run cannot go on as it would have: start over with --overwrite")


def reopen_outputs(record: dict, outputs: Outputs, checkpoints: RunCheckpoints, sim,
                   interval: int) -> None:
    """Put the interrupted run's trajectory and state data back under the names being written
    (a SIGTERM or Ctrl-C left them under their final names, a SIGKILL under the hidden ones),
    cut what was written after the checkpoint, and close the part that ended in the record
    with what stopped it."""
    prov = provenance_of(outputs.json)
    live = []
    for final, partial, key in ((outputs.out, outputs.tmp_traj, "trajectory_bytes"),
                                (outputs.csv, outputs.tmp_csv, "state_data_bytes")):
        path = partial if partial.exists() else final
        if not path.exists():
            raise DataError(f"{final}: missing (and no {partial.name}): the interrupted run's "
                            "frames are gone; start over with --overwrite")
        size, need = path.stat().st_size, record[key]
        if size < need:
            raise DataError(f"{path}: {size} bytes, fewer than the {need} it held at the last "
                            f"checkpoint ({record['frames']} frames): it was changed after the "
                            "run stopped; start over with --overwrite")
        live.append((path, partial))
    renamed = live[0][0] == outputs.out
    stopped_by = prov.get("signal") if renamed and prov and prov.get("interrupted") else "killed"
    parts = record["parts"]
    if parts[-1]["stopped_by"] is None:
        parts[-1]["stopped_by"] = stopped_by
    checkpoints.parts, checkpoints.start_jumps = parts, record["jumps_done"]
    checkpoints.write({**record, "parts": parts})  # before the interrupted provenance goes
    for path, partial in live:
        os.replace(path, partial)
    if renamed and prov and prov.get("interrupted"):
        outputs.json.unlink(missing_ok=True)  # it described the files moved back
    truncate_trajectory(outputs.tmp_traj, record["frames"], record["trajectory_bytes"], sim,
                        interval)
    if outputs.tmp_csv.stat().st_size > record["state_data_bytes"]:
        os.truncate(outputs.tmp_csv, record["state_data_bytes"])


def truncate_trajectory(path: Path, frames: int, size: int, sim, interval: int) -> None:
    """Keep the first ``frames`` frames of the trajectory ``path`` (``size`` bytes then): a
    longer file (frames after the checkpoint, a frame torn by a kill) is rewritten by OpenMM's
    own writer, with the header and time stamps the run's reporter gives them, from the frames
    MDTraj (XTC) or MDAnalysis (DCD) read back; a rewrite gives back the same bytes (but the
    box of a DCD, stored in double precision and read back by MDAnalysis in single precision:
    rounded to about 1e-7 relative). A DCD of the right size whose header counts another number
    of frames (killed inside a frame's write, after OpenMM's DCDFile had counted the frame) is
    rewritten too: OpenMM appends after the count the header gives."""
    from openmm import app, unit

    if path.stat().st_size == size and _dcd_frame_count(path, sim) in (None, frames):
        return
    log.info("%s: dropping what was written after the last checkpoint (frame %d)", path, frames)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".xtc":
            n = _copy_frames(path, frames, app.XTCFile(str(tmp), sim.topology, sim.step_ps,
                                                       interval, interval))
        else:
            with open(tmp, "wb") as fh:
                n = _copy_frames(path, frames, app.DCDFile(
                    fh, sim.topology, sim.step_ps * unit.picosecond, interval, interval))
        if n < frames:
            raise DataError(f"{path}: {n} whole frames, fewer than the {frames} of the last "
                            "checkpoint; the run cannot be resumed: start over with --overwrite")
        if tmp.stat().st_size != size:
            raise DataError(f"{path}: its first {frames} frames, written again, take "
                            f"{tmp.stat().st_size} bytes instead of the {size} they took: the "
                            "file was not written by this run; start over with --overwrite")
        frame = _first_difference(path, tmp, frames)
        if frame is not None:
            raise DataError(f"{path}: frame {frame + 1}, written again, reads back other "
                            "positions or another box than the file's: the rewrite would change "
                            "the run; start over with --overwrite")


def _first_difference(path: Path, copy: Path, frames: int) -> int | None:
    """The first of ``frames`` frames whose positions (exactly, as read back) or box (within
    1e-6 relative: a DCD's double-precision box comes back rounded to single precision) differ
    between ``path`` and its rewritten ``copy``; None when they agree."""
    from openmm import unit

    def box(b):
        return None if b is None else np.array([list(v) for v in b.value_in_unit(unit.nanometer)])

    for i, ((x0, b0), (x1, b1)) in enumerate(zip(_read_frames(path, frames),
                                                  _read_frames(copy, frames, path.suffix))):
        if not np.array_equal(x0.value_in_unit(unit.nanometer), x1.value_in_unit(unit.nanometer)):
            return i
        if (b0 is None) != (b1 is None) or (
                b0 is not None and not np.allclose(box(b0), box(b1), rtol=1e-6, atol=0)):
            return i
    return None


def _dcd_frame_count(path: Path, sim) -> int | None:
    """The frame count in a DCD file's header, as OpenMM's DCDFile reads it to append (None for
    an XTC file, which has none)."""
    from openmm import app

    if path.suffix.lower() != ".dcd":
        return None
    with open(path, "rb") as fh:
        try:
            return app.DCDFile(fh, sim.topology, sim.step_ps, append=True)._modelCount
        except (ValueError, struct.error) as exc:  # a header OpenMM cannot append to
            log.debug("%s: unreadable DCD header (%s)", path, exc)
            return -1


def _copy_frames(path: Path, frames: int, writer) -> int:
    """Write the first ``frames`` frames of ``path`` with ``writer`` (OpenMM's XTCFile or
    DCDFile); returns how many there were."""
    n = 0
    try:
        for positions, box in _read_frames(path, frames):
            writer.writeModel(positions, periodicBoxVectors=box)
            n += 1
    except (OSError, RuntimeError, ValueError) as exc:  # MDTraj raises RuntimeError on junk
        log.debug("%s: unreadable after %d frames (%s)", path, n, exc)
    return n


def _read_frames(path: Path, n: int, suffix: str | None = None):
    """The first ``n`` frames of an XTC/DCD file (``suffix``: its format, by default its own
    suffix's) as (positions, box vectors or None) OpenMM quantities; a torn frame after them is
    never read."""
    import openmm
    from openmm import unit

    def vectors(rows, length):
        if rows is None or not np.any(rows):
            return None
        return [openmm.Vec3(*map(float, row)) for row in rows] * length

    if (suffix or path.suffix).lower() == ".xtc":
        from mdtraj.formats import XTCTrajectoryFile

        with XTCTrajectoryFile(str(path)) as f:  # MDTraj leaves no offset cache beside it
            while n > 0:
                xyz, _, _, box = f.read(n_frames=min(n, 1000))
                if not len(xyz):
                    return
                for x, b in zip(xyz, box if box is not None else [None] * len(xyz)):
                    yield np.asarray(x, dtype=np.float64) * unit.nanometer, vectors(
                        b, unit.nanometer)
                n -= len(xyz)
    else:
        from MDAnalysis.coordinates.DCD import DCDReader
        from MDAnalysis.lib.mdamath import triclinic_vectors

        reader = DCDReader(str(path), format="DCD")
        try:
            for ts in reader[:n]:
                box = None if ts.dimensions is None else triclinic_vectors(ts.dimensions)
                yield np.asarray(ts.positions, dtype=np.float64) * unit.angstrom, vectors(
                    box, unit.angstrom)
        finally:
            reader.close()
