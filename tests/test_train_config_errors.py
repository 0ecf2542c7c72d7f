"""Config mistakes are refused with a ConfigError that names the key and the fix.

- sections that are not mappings (``model: egno``, ``train: 0``) are refused, not read as defaults
  or left to a Python traceback;
- data settings that only the dataset file can check (the jump in saved frames, P dividing it)
  name the data.* keys and the file;
- split fractions over 1 are refused before the data file is opened;
- ``data.protocol: history`` with a model that reads no history is refused.
"""

from __future__ import annotations

import pytest
import yaml
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

from surrogate_md.errors import ConfigError
from surrogate_md.models import MODELS
from surrogate_md.train import load_config, train
from surrogate_md.train.__main__ import main

QUICK = {"epochs": 1, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


# -- sections that are not mappings ---------------------------------------------------------------
def test_model_given_as_a_name_is_a_one_line_error_with_the_fix(ala, tmp_path, capsys):
    cfg = tiny_config(ala, train=QUICK)
    cfg["model"] = "egno"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(cfg_file), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model must be a mapping" in err and "model: {name: egno}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section, value, key", [
    ("model", ["egno"], "model"),
    ("model", "", "model"),  # was read as the default model
    ("train", 5, "train"),
    ("train", 0, "train"),  # was read as all defaults
    ("runtime", "cpu", "runtime"),
    ("data", "x.h5", "data"),
])
def test_sections_that_are_not_mappings_are_refused(ala, section, value, key):
    base = tiny_config(ala)
    base[section] = value
    with pytest.raises(ConfigError, match=rf"{key} must be a mapping"):
        load_config(None, base=base)


def test_nested_section_that_is_not_a_mapping_is_refused(ala):
    base = tiny_config(ala)
    base["data"]["graph"] = 0  # was read as the default graph
    with pytest.raises(ConfigError, match=r"data\.graph must be a mapping"):
        load_config(None, base=base)


def test_empty_sections_are_defaults(ala):
    cfg = load_config(None, base={"data": {"path": str(ala)}, "train": None, "runtime": None})
    assert cfg.train.epochs == 100 and cfg.runtime.device == "auto"


# -- data settings -------------------------------------------------------------------------------
def test_fractions_over_one_name_the_key_before_the_data_is_opened(tmp_path):
    # the file does not exist: the fractions are refused first, from the config alone
    cfg = tiny_config(tmp_path / "not-there.h5", data={"fractions": [0.8, 0.3, 0.2]})
    with pytest.raises(ConfigError, match=r"data\.fractions = \[0\.8, 0\.3, 0\.2\] sum to 1\.3"):
        load_config(None, base=cfg)
    # the paper split does not use them
    load_config(None, base=tiny_config(tmp_path / "x.h5", data={
        "fractions": [0.8, 0.3, 0.2], "split": "paper", "counts": [4, 2, 2]}))


def test_n_out_that_does_not_divide_the_jump_names_both_keys_and_the_file(ala, tmp_path):
    # the fixture saves every 0.02 ps: 0.2 ps is 10 frames, which 3 outputs do not split
    with pytest.raises(ConfigError) as info:
        train(tiny_config(ala, data={"n_out": 3}, train=QUICK), tmp_path / "run")
    message = str(info.value)
    assert "data.n_out = 3" in message and "data.jump_ps = 0.2 ps" in message
    assert str(ala) in message and "[1, 2, 5, 10]" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, key", [
    ({"jump_ps": 0.03}, "data.jump_ps = 0.03 ps"),
    ({"protocol": "history", "history": 3, "history_stride_ps": 0.05},
     "data.history_stride_ps = 0.05 ps"),
])
def test_times_that_are_no_whole_number_of_frames_name_the_key_and_the_file(ala, tmp_path, data,
                                                                            key):
    model = "estag" if data.get("protocol") == "history" else "egno"
    with pytest.raises(ConfigError) as info:
        train(tiny_config(ala, model, data=data, train=QUICK), tmp_path / "run")
    message = str(info.value)
    assert key in message and str(ala) in message and "0.02 ps" in message


@pytest.mark.parametrize("model", [m for m, cls in MODELS.items() if not cls.needs_history])
def test_history_protocol_with_a_model_that_reads_no_history(ala, tmp_path, model):
    cfg = tiny_config(ala, model, data={"protocol": "history", "history": 3}, train=QUICK)
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "run")
    message = str(info.value)
    assert "data.protocol" in message and f"model.name = {model!r}" in message
    assert "estag" in message  # the models that do read history
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
