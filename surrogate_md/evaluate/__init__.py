"""Evaluation: one-jump errors with baselines, rollouts and physical validity.

``evaluate(checkpoint, data, out_dir, ...)`` (CLI: ``python -m surrogate_md.evaluate``) writes
``report.md``, ``metrics.json`` and PNG plots. Errors are Å² per atom: squared distance summed over
x, y, z, averaged over atoms (see :mod:`surrogate_md.evaluate.metrics`).
"""

from __future__ import annotations

__all__ = ["evaluate"]


def __getattr__(name: str):
    # Lazy: the trainer imports evaluate.metrics, and evaluate.core imports the trainer's data
    # preparation; importing core here would make the two packages import each other.
    if name == "evaluate":
        from surrogate_md.evaluate.core import evaluate

        return evaluate
    raise AttributeError(name)
