"""Inputs of the reliability tests: good files made from physics in seconds, and ways to break them.

Everything starts from the alanine-dipeptide MD of ``_integration_fixtures`` (OpenMM, about a
second) or a tiny model trained with ``surrogate_md.train.train``; broken variants (truncated,
overwritten, tampered) are derived from those in the test's temporary directory, so no binary
file is committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from _integration_fixtures import PDB, cached_md, make_checkpoint, write_dataset

from surrogate_md.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["PDB", "cached_md", "corrupt", "dataset", "linear_checkpoint", "listing",
           "tampered_checkpoint", "trajectory", "truncate"]


def listing(directory: Path) -> list[str]:
    """Every entry under ``directory`` (recursive, relative names, hidden files included)."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


def dataset(path: Path) -> Path:
    """A canonical dataset file of alanine dipeptide (150 frames, 0.01 ps apart, 22 atoms)."""
    return write_dataset(cached_md(), path)


def trajectory(path: Path, n_frames: int = 20, *, inf_at: int | None = None) -> Path:
    """A DCD or XTC (by suffix) of the fixture MD, written by MDAnalysis' own writer.

    ``inf_at`` puts an infinite coordinate into that frame (a blown-up run's output).
    """
    import MDAnalysis as mda

    md = cached_md()
    u = mda.Universe(str(PDB))
    with mda.Writer(str(path), n_atoms=u.atoms.n_atoms) as w:
        for i, x in enumerate(md["frames"][:n_frames]):
            x = x.copy()
            if i == inf_at:
                x[3, 1] = np.inf
            u.atoms.positions = x
            u.trajectory.ts.time = i * md["interval_ps"]
            w.write(u.atoms)
    return path


def truncate(src: Path, dst: Path, n_bytes: int) -> Path:
    """``dst`` = the first ``n_bytes`` of ``src`` (a copy cut short, as by a killed writer)."""
    dst.write_bytes(Path(src).read_bytes()[:n_bytes])
    return dst


def corrupt(src: Path, dst: Path, offset: int, n_bytes: int, seed: int = 0) -> Path:
    """``dst`` = ``src`` with ``n_bytes`` random bytes written over it at ``offset``."""
    raw = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    raw[offset:offset + n_bytes] = rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(raw))
    return dst


def linear_checkpoint(path: Path, **kwargs) -> Path:
    """An analytic ``linear`` surrogate of alanine dipeptide in the package's checkpoint format."""
    return make_checkpoint(cached_md(), path, **kwargs)


def tampered_checkpoint(src: Path, dst: Path, **changes) -> Path:
    """``dst`` = the checkpoint ``src`` with top-level entries replaced (``None`` deletes one).

    Nested entries are given as ``section__key=value`` (e.g. ``model__name="egno"``).
    """
    data = load_checkpoint(src)
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        target = data[section] if sub else data
        name = sub or section
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    # save_checkpoint writes the format markers first, so an explicit format_version wins
    return save_checkpoint(dst, data)


def read_only(directory: Path) -> Path:
    """Make ``directory`` read-only (the caller restores it with ``os.chmod(d, 0o755)``)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o555)
    return directory
