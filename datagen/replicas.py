"""Independent replicas: R seeds of one run in parallel processes, one dataset file each.

``OUT.h5`` with ``replicas=3`` gives ``OUT_r000.h5``, ``OUT_r001.h5``, ``OUT_r002.h5`` (seeds
``seed``, ``seed+1``, ``seed+2``) and ``OUT_manifest.json`` listing files, seeds and outcomes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from surrogate_md.errors import ConfigError, EngineError

log = logging.getLogger(__name__)


def replica_path(out: str | os.PathLike, index: int) -> Path:
    """``OUT_r{index:03d}.h5`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_r{index:03d}{out.suffix or '.h5'}")


def manifest_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_manifest.json")


def _one(fn: Callable[..., Path], target: Any, out: Path, seed: int, kwargs: dict) -> str:
    return str(fn(target, out=out, seed=seed, progress=False, **kwargs))


def run_replicas(fn: Callable[..., Path], target: Any, out: str | os.PathLike, *, replicas: int,
                 seed: int = 0, workers: int | None = None, **kwargs: Any) -> Path:
    """Run ``fn(target, out=OUT_rXXX.h5, seed=seed+r, **kwargs)`` for r < ``replicas`` in parallel.

    Args:
        fn: :func:`datagen.openmm_md.run_openmm` or :func:`datagen.ase_md.run_ase`.
        target: the system / molecule argument of ``fn``.
        out: base output name.
        replicas: number of independent runs.
        seed: seed of replica 0; replica r uses ``seed + r``.
        workers: parallel processes (default: ``min(replicas, cpu count)``).

    Returns:
        Path of the JSON manifest. Raises :class:`EngineError` (after writing the manifest) when
        a replica failed.
    """
    if replicas < 1:
        raise ConfigError(f"replicas={replicas} must be at least 1")
    workers = workers or min(replicas, os.cpu_count() or 1)
    jobs = [(replica_path(out, r), seed + r) for r in range(replicas)]
    results: list[dict[str, Any]] = []
    # spawn: engines (OpenMM contexts, threads) must not be inherited through fork
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_one, fn, target, path, s, kwargs) for path, s in jobs]
        for (path, s), fut in zip(jobs, futures):
            entry: dict[str, Any] = {"file": path.name, "seed": s}
            try:
                fut.result()
                entry["status"] = "ok"
            except Exception as exc:  # report every replica, then fail as a whole
                entry["status"] = "failed"
                entry["error"] = f"{type(exc).__name__}: {exc}"
                log.error("replica %s failed: %s", path.name, exc)
            results.append(entry)
    manifest = {
        "runner": f"{fn.__module__}.{fn.__name__}", "target": str(target),
        "replicas": results,
        "settings": {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
                     for k, v in kwargs.items()},
    }
    path = manifest_path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    failed = [r["file"] for r in results if r["status"] != "ok"]
    if failed:
        raise EngineError(f"{path}: {len(failed)} of {replicas} replicas failed ({failed}); see "
                          "the manifest for the errors")
    return path
