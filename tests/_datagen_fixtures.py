"""Small inputs for the datagen tests, generated from physics in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def md17_npz(path: Path, frames: int = 40, flavour: str = "md17", seed: int = 0,
             old_indices: np.ndarray | None = None) -> Path:
    """An MD17-style npz (Å, kcal/mol) from a short OpenMM run of the shipped ethanol GAFF2 model
    (rMD17 flavour with ``old_indices``: frame k has MD17 index old_indices[k], and the frames
    are stored shuffled)."""
    from openmm import unit

    from datagen.openmm_md import run_openmm
    from surrogate_md.data.h5md import open_trajectory

    h5 = run_openmm("ethanol", path.with_suffix(".src.h5"), frames=frames, equilibrate_ps=0.05,
                    seed=seed, overwrite=True, progress=False)
    with open_trajectory(h5) as f:
        x = f.read(slice(None))
        forces = f.read(slice(None), "forces")
        energy = np.asarray(f.potential_energy[()])
        z = f.topology.atomic_numbers
    to_kcal = (1.0 * unit.kilojoule_per_mole).value_in_unit(unit.kilocalorie_per_mole)
    if flavour == "md17":
        np.savez(path, R=x, z=z, E=(energy * to_kcal)[:, None], F=forces * to_kcal)
    else:
        extra = {}
        if old_indices is not None:  # frame k of the run has MD17 index old_indices[k]; stored
            perm = np.random.default_rng(seed).permutation(len(x))  # shuffled, as rMD17 is
            x, forces, energy = x[perm], forces[perm], energy[perm]
            extra["old_indices"] = np.asarray(old_indices)[perm]
        np.savez(path, coords=x, nuclear_charges=z, energies=energy * to_kcal,
                 forces=forces * to_kcal, **extra)
    return path


class Killed(Exception):
    """Stands for a kill: raised from a run's ``frame_callback`` (see :func:`kill_at`)."""


def kill_at(n: int):
    """A ``frame_callback`` that stops a datagen run at frame ``n`` as a kill would (after the
    frames and checkpoints written so far)."""
    def callback(frame: int) -> None:
        if frame == n:
            raise Killed
    return callback
