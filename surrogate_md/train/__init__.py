"""Training: typed run configs, the training loop and its CLI (``python -m surrogate_md.train``).

Library use::

    from surrogate_md.train import load_config, train
    best = train(load_config("examples/configs/egno_alanine_dipeptide.yaml",
                             ["data.path=ala.h5", "train.epochs=20"]), "runs/ala")
    # best: Path of best.pt, loadable with surrogate_md.Surrogate.load(best)
"""

from __future__ import annotations

from surrogate_md.train.config import (
    DataConfig,
    ModelSection,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_config,
)
from surrogate_md.train.loop import cpu_has_native_bf16, train

__all__ = ["DataConfig", "ModelSection", "RunConfig", "RuntimeConfig",
           "TrainConfig", "config_from_dict", "cpu_has_native_bf16", "load_config", "save_config",
           "train"]
