"""Training configs, splits over several files, graphs and Surrogate inputs: the cases a new
user runs into, each on small OpenMM-made datasets."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _train_fixtures import cached, make_adk_backbone, make_alanine_dipeptide

from surrogate_md.data import open_trajectory, write_trajectory
from surrogate_md.data.windows import Protocol, make_windows
from surrogate_md.errors import ConfigError, DataError, DeviceError
from surrogate_md.train.config import DataConfig, RuntimeConfig, load_config
from surrogate_md.train.data import prepare_data


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


@pytest.fixture(scope="module")
def ala_short(tmp_path_factory):
    """Another alanine-dipeptide run, 120 frames 0.02 ps apart."""
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide, n_frames=120, seed=1)


BASE = {"data": {"path": "data.h5"}}


# -- config values --------------------------------------------------------------------------------
@pytest.mark.parametrize("item", ["train.data_seed=-1", "train.model_seed=-3",
                                  f"train.train_seed={2**64}"])
def test_seeds_outside_what_the_generators_take_name_the_key(item):
    # numpy refuses negative seeds and torch seeds beyond 64 bits: both used to surface as a
    # traceback once the data was open
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} must be an integer from 0 to"):
        load_config(None, [item], base=BASE)


def test_the_largest_seed_fits_every_generator():
    import random

    import torch

    cfg = load_config(None, [f"train.train_seed={2**63 - 1}", f"train.data_seed={2**63 - 1}"],
                      base=BASE)
    seed = cfg.train.train_seed
    torch.Generator().manual_seed(seed + 1000)  # DistributedSampler: seed + epoch
    np.random.default_rng(cfg.train.data_seed + 5)  # one split seed per file
    random.seed(seed)


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "cuda:0.5"])
def test_cuda_device_names_need_an_index(device):
    with pytest.raises(ConfigError, match="runtime.device must be auto, cpu, cuda or cuda:N"):
        RuntimeConfig(device=device)
    assert RuntimeConfig(device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("device", ["GPU", "cuda:x", "CPU0"])
def test_resolve_device_refuses_names_that_are_no_device(device):
    from surrogate_md.surrogate import resolve_device

    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device(device)


def test_a_section_given_twice_is_refused_not_half_dropped(tmp_path):
    # YAML keeps the last of two equal keys: the second `train:` would replace the first one
    # whole, lr and batch size back to their defaults without a word
    path = tmp_path / "run.yaml"
    path.write_text("data: {path: data.h5}\n"
                    "train:\n  epochs: 200\n  lr: 0.001\n  batch_size: 4\n"
                    "runtime: {device: cpu}\n"
                    "train:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'train' is given twice .*lines 2 "
                                          r"and 7"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set .*key 'kind' is given twice"):
        load_config(None, ["data.graph={kind: radius, kind: bonds}"], base=BASE)
    # a key merged in with << may still be overridden
    merged = tmp_path / "merged.yaml"
    merged.write_text("data:\n  <<: {path: a.h5, jump_ps: 2.0}\n  jump_ps: 3.0\n")
    cfg = load_config(merged)
    assert (cfg.data.path, cfg.data.jump_ps) == ("a.h5", 3.0)


def test_switching_the_model_on_the_command_line():
    # an example config carries its model's options: another model.name refuses them, and
    # there was no way to leave them out without editing the file
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "configs"
    example = example / "egno_alanine_dipeptide.yaml"
    with pytest.raises(ConfigError, match=r"model 'painet' has no options 'modes', 'n_layers'.* "
                                          r"--set model.modes=null --set model.n_layers=null"):
        load_config(example, ["model.name=painet"])
    cfg = load_config(example, ["model.name=painet", "model.modes=null", "model.n_layers=null"])
    assert cfg.model.name == "painet" and cfg.model.options == {"hidden": 64}
    assert cfg.model.typed().hidden == 64
    cfg = load_config(example, ["model.hidden=null"])  # an option back to its default
    assert "hidden" not in cfg.model.options


def test_keys_that_yaml_reads_as_numbers_or_booleans_are_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {path: data.h5, 1: 2, jump: 3}\n")
    with pytest.raises(ConfigError, match="unknown key data.1"):
        load_config(path)
    path.write_text("data: {path: data.h5}\non: 1\nextra: 2\n")  # `on` is true in YAML 1.1
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path)


# -- splits over several files ----------------------------------------------------------------------
def test_paper_split_over_files_of_different_lengths(ala, ala_short, tmp_path, caplog):
    # 400 and 120 frames, margin 50: the files offer 300 and 20 start frames. Shared out by
    # file length the short file was asked for 41 of 180 windows and the split refused data
    # that holds enough.
    files = [open_trajectory(ala), open_trajectory(ala_short)]
    protocol = Protocol("s2t", 10, 2)
    # t0 from 50 to min(n - 1 - 10, n - 1 - 50): 50..349 and 50..69
    pools = [300, 20]
    counts = (100, 40, 40)
    w = make_windows(files, protocol, split="paper", counts=counts, margin_frames=50, seed=0)
    assert [len(w[k]) for k in ("train", "val", "test")] == list(counts)
    every = np.concatenate([w[k] for k in ("train", "val", "test")])
    for fi, f in enumerate(files):
        t0 = every[every[:, 0] == fi, 1]
        assert len(t0) == len(np.unique(t0)) <= pools[fi]
        assert t0.min() >= 50 and t0.max() <= f.n_frames - 1 - max(50, protocol.after)
    short = np.sum(every[:, 0] == 1)
    assert 0 < short <= 20
    # all the start frames the files offer, and not one more
    w = make_windows(files, protocol, split="paper", counts=(280, 20, 20), margin_frames=50)
    assert sum(len(v) for v in w.values()) == 320
    with pytest.raises(DataError, match=r"needs 321 distinct start frames but the files offer "
                                        r"only 320 \(\[300, 20\]\)"):
        make_windows(files, protocol, split="paper", counts=(281, 20, 20), margin_frames=50)
    # a file with no start frame beyond its margins gives no windows, and says so
    with open_trajectory(ala_short) as src:
        tiny = write_trajectory(tmp_path / "tiny.h5", src.topology, src.read(slice(0, 90)),
                                src.time_ps[:90], src.metadata,
                                velocities=src.read(slice(0, 90), "velocities"))
    files.append(open_trajectory(tiny))
    with caplog.at_level(logging.WARNING, logger="surrogate_md"):
        w = make_windows(files, protocol, split="paper", counts=counts, margin_frames=50)
    assert [len(w[k]) for k in ("train", "val", "test")] == list(counts)
    assert not np.any(np.concatenate(list(w.values()))[:, 0] == 2)
    assert ("tiny.h5: its 90 frames hold no window of 11 frames at least 50 frames from both "
            "ends" in caplog.text)
    for f in files:
        f.close()


def test_a_file_with_the_atoms_in_another_order_is_refused(ala, tmp_path, caplog):
    # swap two methyl hydrogens (same element, so the atomic numbers still agree): windows
    # from the second file would train each of them on the other's motion
    with open_trajectory(ala) as src:
        top, meta = src.topology, src.metadata
        x, v, t = src.read(slice(0, 200)), src.read(slice(0, 200), "velocities"), src.time_ps[:200]
    hydrogens = np.flatnonzero(top.atomic_numbers == 1)
    i, j = int(hydrogens[0]), int(hydrogens[1])
    assert top.atom_names[i] != top.atom_names[j]
    order = np.arange(top.n_atoms)
    order[[i, j]] = [j, i]
    from surrogate_md.data import Topology

    swapped = Topology(top.atomic_numbers[order], top.masses[order], top.atom_names[order],
                       top.residue_ids[order], top.residue_names[order],
                       np.argsort(order)[top.bonds], top.segment_ids[order])
    other = write_trajectory(tmp_path / "swapped.h5", swapped, x[:, order], t, meta,
                             velocities=v[:, order])
    cfg = DataConfig(path=[str(ala), str(other)], jump_ps=0.2, n_out=2)
    with pytest.raises(DataError, match=r"swapped.h5: holds the atoms of .* in another order "
                                        r"\(2 atoms moved"):
        prepare_data(cfg)
    # other names for the same atoms in the same order: another naming convention, a warning
    renamed = Topology(top.atomic_numbers, top.masses,
                       [f"{n}X" if k == i else n for k, n in enumerate(top.atom_names)],
                       top.residue_ids, top.residue_names, top.bonds, top.segment_ids)
    other = write_trajectory(tmp_path / "renamed.h5", renamed, x, t, meta, velocities=v)
    with caplog.at_level(logging.WARNING, logger="surrogate_md"):
        prepare_data(DataConfig(path=[str(ala), str(other)], jump_ps=0.2, n_out=2)).close()
    assert "renamed.h5: 1 atom names differ" in caplog.text


def test_a_trajectory_listed_twice_is_refused(ala, ala_short, tmp_path):
    # the paper split draws start frames per file: a test window of one copy was a training
    # window of the other, and every window counted twice
    import shutil

    copy = shutil.copy(ala, tmp_path / "copy.h5")
    cfg = dict(jump_ps=0.2, n_out=2, split="paper", counts=(40, 20, 20), margin_frames=0)
    with pytest.raises(DataError, match=r"ala.h5: is listed twice in data.path"):
        prepare_data(DataConfig(path=[str(ala), str(ala)], **cfg))
    with pytest.raises(DataError, match=r"copy.h5: holds the same frames as .*ala.h5"):
        prepare_data(DataConfig(path=[str(ala), str(copy)], **cfg))
    prepared = prepare_data(DataConfig(path=[str(ala), str(ala_short)], **cfg))
    assert sum(len(w) for w in prepared.windows.values()) == 80
    prepared.close()


# -- settings the rest of the config leaves unused ----------------------------------------------------
def _train_constant(data: dict, out, *overrides: str):
    """Run the trainer with the parameter-free ``constant`` model (no optimisation)."""
    from surrogate_md.train import train

    config = {"data": data, "model": {"name": "constant"},
              "runtime": {"device": "cpu", "progress": False}}
    return train(config, out, overrides=list(overrides))


def test_settings_that_do_not_apply_are_reported(ala, tmp_path, caplog):
    base = {"path": str(ala), "jump_ps": 0.2, "n_out": 2}
    with caplog.at_level(logging.WARNING, logger="surrogate_md"):
        _train_constant(base, tmp_path / "a", "data.graph.cutoff_A=6", "data.margin_frames=100")
    assert "data.graph.cutoff_A = 6 is ignored: data.graph.kind is 'bonds'" in caplog.text
    assert "data.margin_frames = 100 is ignored" in caplog.text
    caplog.clear()
    paper = {**base, "split": "paper", "counts": [20, 10, 10], "margin_frames": 0}
    with caplog.at_level(logging.WARNING, logger="surrogate_md"):
        _train_constant(paper, tmp_path / "b", "data.stride=5", "data.fractions=[0.5,0.25,0.25]")
    assert "data.stride = 5 is ignored" in caplog.text
    assert "data.fractions = [0.5, 0.25, 0.25] is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="surrogate_md"):
        _train_constant(base, tmp_path / "c")
    assert "ignored" not in caplog.text


def test_s2t_ignores_a_history_stride(ala, tmp_path, caplog):
    # 0.03 ps is no whole number of the 0.02 ps frames: it used to stop an s2t run that takes
    # no past frames, and a whole number of them went into the checkpoint's history stride
    from surrogate_md import Surrogate

    for stride_ps in (0.03, 0.06):
        cfg = DataConfig(path=str(ala), jump_ps=0.2, n_out=2, history_stride_ps=stride_ps)
        prepared = prepare_data(cfg)
        assert prepared.protocol.history_stride == 1
        prepared.close()
    with caplog.at_level(logging.WARNING, logger="surrogate_md"):
        best = _train_constant({"path": str(ala), "jump_ps": 0.2, "n_out": 2,
                                "history_stride_ps": 0.06}, tmp_path / "run")
    assert "data.history_stride_ps = 0.06 is ignored" in caplog.text
    assert Surrogate.load(best).history_stride_ps == pytest.approx(0.02)


def test_bond_graph_of_ca_atoms_suggests_a_cutoff_that_bonds_them(tmp_path_factory):
    adk = cached(tmp_path_factory, "adk-backbone", make_adk_backbone)
    cfg = DataConfig(path=str(adk), selection="ca", jump_ps=4.0, n_out=2)
    with pytest.raises(DataError, match=r"the topology bonds none of them\); set "
                                        r"data.graph.bond_cutoff_A \(e.g. 4.2\)"):
        prepare_data(cfg)
    cfg = load_config(None, ["data.graph.bond_cutoff_A=1.6"],
                      base={"data": {"path": str(adk), "selection": "ca", "jump_ps": 4.0,
                                     "n_out": 2}})
    with pytest.raises(DataError, match=r"no two of them are closer than "
                                        r"data.graph.bond_cutoff_A = 1.6 Å .*raise "
                                        r"data.graph.bond_cutoff_A \(e.g. 4.2\)"):
        prepare_data(cfg.data)
    # the suggested cutoff makes a chain of the 30 CA atoms
    cfg = load_config(None, ["data.graph.bond_cutoff_A=4.2"],
                      base={"data": {"path": str(adk), "selection": "ca", "jump_ps": 4.0,
                                     "n_out": 2}})
    prepared = prepare_data(cfg.data)
    assert prepared.selection.n_nodes == 30
    assert len(prepared.graph.bonds) >= 29
    prepared.close()


# -- Surrogate inputs -------------------------------------------------------------------------------
def test_history_batched_differently_from_the_positions_says_so(tmp_path):
    from _integration_fixtures import cached_md, make_checkpoint

    from surrogate_md import Surrogate

    md = cached_md()
    sur = Surrogate.load(make_checkpoint(md, tmp_path / "estag.pt", model="estag",
                                         jump_frames=4, n_out=2, history=3, history_stride=2))
    x, v = md["frames"], md["velocities"]
    hist = x[[10, 12, 14]]
    assert sur.predict(x[14], v[14], history=hist).shape == (2, 22, 3)
    with pytest.raises(DataError, match=r"positions are one state \(atoms, 3\) but history has "
                                        r"shape \(1, 3, 22, 3\); give history as \(T, atoms, 3\)"):
        sur.predict(x[14], v[14], history=hist[None])
    with pytest.raises(DataError, match=r"positions are a batch of states \(B, atoms, 3\) but "
                                        r"history has shape \(3, 22, 3\)"):
        sur.predict(x[14][None], v[14][None], history=hist)
    with pytest.raises(DeviceError, match="not a device name"):
        Surrogate.load(tmp_path / "estag.pt", device="cuda:x")


def test_low_precision_inference_keeps_positions_in_float32(tmp_path):
    # dtype=torch.bfloat16 used to cast the inputs too: positions 40 Å from the origin were
    # rounded to bf16's 0.25 Å steps before the model saw them. Now the matrix products run
    # under autocast, as training's runtime.precision: bf16 does.
    import torch
    from _integration_fixtures import cached_md, make_checkpoint

    from surrogate_md import Surrogate

    md = cached_md()
    x, v = md["frames"][20] + 40.0, md["velocities"][20]
    copy = Surrogate.load(make_checkpoint(md, tmp_path / "constant.pt", model="constant"),
                          dtype=torch.bfloat16)
    np.testing.assert_array_equal(copy.predict(x, v)[-1], x.astype(np.float32))
    assert (copy.dtype, copy.autocast_dtype) == (torch.float32, torch.bfloat16)
    ckpt = make_checkpoint(md, tmp_path / "egno.pt", model="egno",
                           model_config={"hidden": 16, "n_layers": 2, "time_dim": 8})
    full = Surrogate.load(ckpt).predict(x, v)
    low = Surrogate.load(ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in low.model.parameters())
    assert np.abs(low.predict(x, v) - full).max() < 0.02  # bf16 positions: up to 0.125 Å
    with pytest.raises(ConfigError, match="egno.pt: dtype torch.float16 runs on CUDA only"):
        Surrogate.load(ckpt, dtype=torch.float16)
    with pytest.raises(ConfigError, match="is not one a surrogate runs in"):
        Surrogate.load(ckpt, dtype=torch.int64)


def test_a_data_path_under_the_home_directory(ala, tmp_path, monkeypatch):
    # neither YAML nor a --set value goes through the shell: `~/ala.h5` was looked up as a
    # folder named `~` in the working directory
    import shutil

    import yaml
    from _train_fixtures import tiny_config

    from surrogate_md.train import train

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ala, home / "ala.h5")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    best = train(tiny_config("placeholder.h5", "constant"), tmp_path / "run",
                 overrides=["data.path=~/ala.h5"])
    assert best.is_file()
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["path"]
    assert recorded == [str(home / "ala.h5")]
