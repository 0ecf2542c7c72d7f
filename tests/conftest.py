"""Shared test configuration: GPU tests skip without CUDA; plots render off-screen; one thread.

Test tensors are tiny, and with two intra-op threads on a busy 2-core machine a small matmul can
take milliseconds instead of microseconds, so tests run torch single-threaded.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)

# CI replays the same property-test examples every run (reproducible verdicts); local runs keep
# drawing new ones, which is how new counterexamples get found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
