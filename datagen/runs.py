"""Bookkeeping shared by the resumable MD producers (OpenMM and ASE runs).

A run writes ``OUT.h5.partial`` (the dataset so far) and ``OUT.h5`` + :data:`CHECKPOINT_SUFFIX`
(the engine state at the last checkpointed frame); both disappear when the run completes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from surrogate_md.errors import CheckpointError, ConfigError

CHECKPOINT_SUFFIX = ".chk.npz"


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


def read_partial_metadata(partial: Path) -> dict[str, Any]:
    """Metadata of an unfinished ``.partial`` dataset (to check a resume uses the same settings)."""
    import h5py

    try:
        with h5py.File(partial, "r") as f:
            return json.loads(f["parameters"].attrs["metadata"])
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{partial}: the unfinished dataset cannot be read ({exc}); delete "
                              "it and its checkpoint to start over") from exc
