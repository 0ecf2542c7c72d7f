"""Model options that no model can be built or run with are ConfigErrors at config time,
naming ``model.<option>``, the value and the fix (not tracebacks from inside the model)."""

from __future__ import annotations

import pytest
import torch

from surrogate_md import testing as H
from surrogate_md.errors import ConfigError
from surrogate_md.models import MODELS, build_model, config_from_dict
from surrogate_md.models.painet import PAINETConfig, particle_type_table
from surrogate_md.train import load_config

BASE = {"data": {"path": "unused.h5"}}


@pytest.mark.parametrize("name, options, pattern", [
    ("painet", {"hidden": 10}, r"model\.hidden = 10 must be a multiple of model\.n_heads = 4"),
    ("painet", {"hidden": 16, "n_heads": 3}, r"model\.hidden = 16 .* model\.n_heads = 3"),
    ("painet", {"eta": 1.5}, r"model\.eta = 1\.5: .* between 0 and 1; set model\.eta"),
    ("painet", {"eta": 1.0}, r"model\.eta = 1\.0"),
    ("painet", {"eta": float("nan")}, r"model\.eta\) must be > 0 and finite"),
    ("egno", {"hidden": True}, r"'hidden' \(model\.hidden\) must be int, got True"),
    ("egnn", {"n_layers": False}, r"model\.n_layers\) must be int, got False"),
    ("estag", {"length_scale_A": True}, r"model\.length_scale_A\) must be float, got True"),
    ("egno", {"hidden": 2.5}, r"model\.hidden\) must be int, got 2\.5"),
    ("egno", {"time_dim": 7}, r"model\.time_dim = 7: .* even .* e\.g\. 8"),
    ("painet", {"time_dim": 1}, r"model\.time_dim = 1"),
    ("egnn", {"length_scale_A": float("inf")}, r"must be > 0 and finite"),
])
def test_invalid_options_are_config_errors(name, options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(name, options)
    with pytest.raises(ConfigError, match=pattern):
        build_model(name, options)


@pytest.mark.parametrize("override, pattern", [
    ("model.hidden=10", r"model\.hidden = 10 must be a multiple of model\.n_heads"),
    ("model.eta=1.5", r"model\.eta = 1\.5"),
    ("model.hidden=true", r"model\.hidden\) must be int, got True"),
])
def test_invalid_options_fail_when_the_config_loads(override, pattern, tmp_path):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["model.name=painet", override], base=BASE)


def test_painet_config_checks_itself_when_built_directly():
    with pytest.raises(ConfigError, match="model.hidden = 10"):
        PAINETConfig(hidden=10)
    with pytest.raises(ConfigError, match="model.eta"):
        PAINETConfig(eta=0.0)


@pytest.mark.parametrize("n_node_types", [1, 9, 50, 100, 101])
def test_painet_builds_with_an_embedding_for_atoms_only(n_node_types):
    table = particle_type_table(n_node_types, 6)
    assert table.shape == (n_node_types,) and int(table.max()) < 6
    if n_node_types > 8:
        assert [int(table[z]) for z in (1, 6, 7, 8)] == [0, 1, 2, 3]
    if n_node_types == 101:
        assert int(table[100]) == 0  # residue code 0
    model = build_model("painet", {"n_node_types": n_node_types, "hidden": 8, "time_dim": 4,
                                   "n_decoder_layers": 1}).double()
    if n_node_types > 16:  # random_batch draws elements H, C, N, O, S
        model.set_normalisation(velocity_scale=2.0, displacement_scale=0.3, time_scale=0.4)
        out = model(H.random_batch(n_channels=1))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_valid_defaults_still_build(name):
    assert build_model(name, {}).config == config_from_dict(name, {})
