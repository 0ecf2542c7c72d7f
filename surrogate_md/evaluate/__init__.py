"""Evaluation: one-jump errors with baselines, rollouts and physical validity.

``evaluate(checkpoint, data, out_dir, ...)`` (CLI: ``python -m surrogate_md.evaluate``) writes
``report.md``, ``metrics.json`` and PNG plots. Errors are Å² per atom: squared distance summed over
x, y, z, averaged over atoms (see :mod:`surrogate_md.metrics`). Evaluation sits after training in
the import order: it re-cuts the test split with the trainer's data preparation.
"""

from __future__ import annotations

from surrogate_md.evaluate.core import evaluate

__all__ = ["evaluate"]
