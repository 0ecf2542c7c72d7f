"""Every shipped example config trains for one step on a tiny dataset of its kind.

Only the data path, the times (scaled to the tiny trajectories) and the sizes are overridden; the
protocol, selection, graph and model options are the example's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _train_fixtures import (
    cached,
    make_adk_backbone,
    make_alanine_dipeptide,
    make_aspirin,
)

from surrogate_md import Surrogate
from surrogate_md.models import MODELS
from surrogate_md.train import load_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SYSTEMS = ("alanine_dipeptide", "aspirin", "adk_backbone", "adk_residues")
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))


def test_every_model_has_an_example_for_every_system():
    names = {p.stem for p in EXAMPLES}
    assert names == {f"{m}_{s}" for m in MODELS for s in SYSTEMS}


def _overrides(system: str, raw: dict) -> list[str]:
    history = raw["data"].get("protocol") == "history"
    if system == "alanine_dipeptide":  # fixture: 400 frames, 0.02 ps apart
        times = ["data.jump_ps=0.2"]
    elif system == "aspirin":  # fixture: 300 frames, 0.005 ps apart, no velocities
        times = [] if history else ["data.jump_ps=0.04"]
        times += ["data.margin_frames=5"]
    else:  # MDAnalysisTests AdK: 98 frames, 1 ps apart
        times = ["data.jump_ps=4", "data.split=paper", "data.margin_frames=0"]
        if history:
            times.append("data.history_stride_ps=1")
    counts = "[2,1,1]" if system.startswith("adk") else "[4,2,2]"
    return times + [f"data.counts={counts}", "train.epochs=1", "train.max_steps_per_epoch=1",
                    "train.batch_size=2", "train.eval_batch_size=2", "runtime.device=cpu",
                    "runtime.progress=false"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return {
        "alanine_dipeptide": cached(tmp_path_factory, "ala", make_alanine_dipeptide),
        "aspirin": cached(tmp_path_factory, "aspirin", make_aspirin),
        "adk": cached(tmp_path_factory, "adk-backbone", make_adk_backbone),
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_runs_one_step(path, datasets, tmp_path):
    system = next(s for s in SYSTEMS if path.stem.endswith(s))
    raw = yaml.safe_load(path.read_text())
    data = datasets["adk" if system.startswith("adk") else system]
    cfg = load_config(path, [f"data.path={data}", *_overrides(system, raw)])
    assert cfg.model.name == raw["model"]["name"]
    best = train(cfg, tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    first = recs[0]
    assert first["step"] == (1 if MODELS[cfg.model.name].has_parameters else 0)
    assert recs[-1]["split"] == "test"
    sur = Surrogate.load(best)
    assert sur.selection.name == raw["data"]["selection"]
    assert sur.needs_history == (raw["data"]["protocol"] == "history")
