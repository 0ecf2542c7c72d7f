"""Bookkeeping shared by the resumable MD producers (OpenMM and ASE runs).

A run writes ``OUT.h5.partial`` (the dataset so far) and ``OUT.h5`` + :data:`CHECKPOINT_SUFFIX`
(the engine state at the last checkpointed frame); both disappear when the run completes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from surrogate_md.data.h5md import PARTIAL_SUFFIX
from surrogate_md.errors import CheckpointError, ConfigError, DataError

CHECKPOINT_SUFFIX = ".chk.npz"

log = logging.getLogger(__name__)


def frame_steps(interval_ps: float, step_fs: float) -> int:
    """Integrator steps per saved frame; errors name the CLI option to fix."""
    from openmm import unit

    if not (step_fs > 0 and math.isfinite(step_fs)):
        raise ConfigError(f"step_fs={step_fs} must be a positive number of femtoseconds; pass "
                          "e.g. step_fs=2 (CLI: --step-fs 2)")
    if not (interval_ps > 0 and math.isfinite(interval_ps)):
        raise ConfigError(f"interval_ps={interval_ps} must be a positive number of picoseconds; "
                          "pass e.g. interval_ps=1 (CLI: --interval-ps 1)")
    step_ps = (step_fs * unit.femtosecond).value_in_unit(unit.picosecond)
    ratio = interval_ps / step_ps
    n = round(ratio)
    if n < 1 or abs(ratio - n) > 1e-6 * max(1.0, ratio):
        raise ConfigError(f"interval_ps={interval_ps} is not a multiple of step_fs={step_fs} "
                          f"({ratio:.6g} steps); choose an interval that is a whole number of "
                          "steps")
    return int(n)


def check_output_path(out: Path) -> None:
    """Refuse an output path that names a directory (the finished file could not take its name,
    and ``--overwrite`` cannot replace a directory)."""
    if out.is_dir():
        raise DataError(f"{out}: is a directory; give the dataset file's name, e.g. -o "
                        f"{out / 'data.h5'}")


def read_partial_metadata(partial: Path) -> dict[str, Any]:
    """Metadata of an unfinished ``.partial`` dataset (to check a resume uses the same settings)."""
    import h5py

    try:
        with h5py.File(partial, "r") as f:
            return json.loads(f["parameters"].attrs["metadata"])
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{partial}: the unfinished dataset cannot be read ({exc}); delete "
                              "it and its checkpoint to start over") from exc


def plan_run(out: Path, metadata: dict[str, Any], resume_keys: tuple[str, ...], *,
             resume: bool, overwrite: bool, frames: int | None = None) -> tuple[str, Path, Path]:
    """Decide how a producer run starts: ``("done" | "resume" | "fresh", partial, checkpoint)``.

    ``done``: ``out`` is complete, with the same settings and ``frames`` frames, and ``resume``
    was asked (nothing to do). ``resume``: a partial dataset and a checkpoint exist and their
    settings (``resume_keys`` of the metadata) match.
    ``fresh``: leftovers of an older run are removed. An existing ``out`` or an unfinished run's
    partial dataset and checkpoint without ``overwrite`` (and, for the latter, ``resume``), and a
    resume with other settings are errors.
    """
    check_output_path(out)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    chk_path = out.with_name(out.name + CHECKPOINT_SUFFIX)
    if out.exists() and resume and not overwrite:
        from surrogate_md.data.h5md import open_trajectory

        with open_trajectory(out) as done:
            old, n_done = done.metadata, done.n_frames
        diff = {k: (old.get(k), metadata.get(k)) for k in resume_keys
                if old.get(k) != metadata.get(k)}
        if frames is not None and n_done != frames:
            diff["frames"] = (n_done, frames)
        if diff:
            raise ConfigError(f"{out}: is complete with other settings {diff}; resuming cannot "
                              "change them: pass --overwrite to make it anew, or another -o")
        log.info("%s is complete; nothing to resume", out)
        return "done", partial, chk_path
    if out.exists() and not overwrite:
        raise DataError(f"{out}: file exists; pass overwrite=True (CLI: --overwrite) to replace "
                        "it or choose another name")
    if resume and partial.exists() and chk_path.exists():
        old = read_partial_metadata(partial)
        diff = {k: (old.get(k), metadata.get(k)) for k in resume_keys
                if old.get(k) != metadata.get(k)}
        if diff:
            raise ConfigError(f"{partial}: cannot resume with different settings {diff}; use the "
                              "original settings or delete the .partial and checkpoint files")
        return "resume", partial, chk_path
    if resume:
        log.info("%s: no checkpoint to resume from; starting a fresh run", out)
    elif partial.exists() and chk_path.exists():  # a killed run's frames: never lost unasked
        if not overwrite:
            raise DataError(f"{partial}: an unfinished run (killed or stopped) left its frames "
                            f"and checkpoint {chk_path.name} here; pass --resume (resume=True) to "
                            "continue it, or --overwrite (overwrite=True) to start over")
        log.warning("%s: discarding the unfinished run's frames and checkpoint (--overwrite)",
                    partial)
    partial.unlink(missing_ok=True)
    chk_path.unlink(missing_ok=True)
    return "fresh", partial, chk_path
