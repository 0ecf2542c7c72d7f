"""Config values: numbers as YAML 1.1 writes them, and non-finite values.

PyYAML (YAML 1.1) reads ``1e-3`` (no dot in the mantissa) as a string; float keys accept any
string that parses as a number, in files, ``--set`` overrides and model options. NaN and
infinities are refused wherever a value must be finite (every size, rate and scale here).
"""

from __future__ import annotations

import pytest

from surrogate_md.errors import ConfigError
from surrogate_md.train import load_config

BASE = {"data": {"path": "unused.h5"}}


@pytest.mark.parametrize("override, section, key, value", [
    ("train.lr=1e-3", "train", "lr", 1e-3),
    ("train.weight_decay=1E-2", "train", "weight_decay", 1e-2),
    ("train.grad_clip=1e1", "train", "grad_clip", 10.0),
    ("data.jump_ps=2e-1", "data", "jump_ps", 0.2),
    ("data.history_stride_ps=1e-1", "data", "history_stride_ps", 0.1),
])
def test_scientific_notation_is_a_number(override, section, key, value):
    cfg = load_config(None, [override], base=BASE)
    got = getattr(getattr(cfg, section), key)
    assert got == pytest.approx(value) and isinstance(got, float)


def test_scientific_notation_in_a_config_file_and_model_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: x.h5, fractions: [8e-1, 1e-1, 1e-1], graph: {cutoff_A: 8e0}}\n"
                    "model: {name: painet, eta: 5e-1, length_scale_A: 2e0}\n"
                    "train: {lr: 1e-4}\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.fractions == pytest.approx((0.8, 0.1, 0.1))
    assert cfg.data.graph.cutoff_A == 8.0
    typed = cfg.model.typed()
    assert typed.eta == 0.5 and isinstance(typed.eta, float) and typed.length_scale_A == 2.0
    # the resolved config writes real numbers, and reads back the same
    from surrogate_md.train.config import config_from_dict

    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, key, problem", [
    ("train.lr=abc", "train.lr", "must be a number"),
    ("train.lr=1e-3x", "train.lr", "must be a number"),
    ("train.lr=.inf", "train.lr", "finite"),
    ("train.lr=nan", "train.lr", "finite"),
    ("train.grad_clip=.nan", "train.grad_clip", "finite"),
    ("train.weight_decay=.nan", "train.weight_decay", "finite"),
    ("train.weight_decay=-1e-2", "train.weight_decay", ">= 0"),
    ("data.jump_ps=.nan", "data.jump_ps", "finite"),
    ("data.fractions=[.nan, 0.1, 0.1]", "data.fractions", "finite"),
    ("data.graph.cutoff_A=.inf", "data.graph.cutoff_A", "finite"),
    ("train.epochs=1e2", "train.epochs", "must be an integer"),
    ("model.length_scale_A=.nan", "length_scale_A", "finite"),
    ("model.length_scale_A=ten", "length_scale_A", "must be float"),
])
def test_non_numbers_and_non_finite_values_are_refused(override, key, problem):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], base=BASE)
    message = str(info.value)
    assert key in message and problem in message


def test_non_finite_values_are_refused_when_built_directly():
    from surrogate_md.train.config import TrainConfig

    for key in ("lr", "weight_decay", "grad_clip"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=f"train.{key}"):
                TrainConfig(**{key: bad})
