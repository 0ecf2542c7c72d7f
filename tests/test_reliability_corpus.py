"""Malformed inputs at every entry point: one clear error, nothing left under the final name.

Each row of :data:`CASES` builds a broken input (from a good one generated here) and calls one
entry point: a library function (expects a specific exception type from
``surrogate_md.errors``) or a CLI's ``main([...])`` in-process (expects a non-zero exit code and
one ``error:`` line on stderr). Either way the message is one line that names the offending file
(or option/object) and says what to do, and the directory the call could write to is left exactly
as it was (no output, no temporary file).

The file also holds the untrusted-file tests: a checkpoint that pickles an arbitrary object and a
YAML config with Python tags are refused without running anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from _reliability_fixtures import (
    PDB,
    cached_md,
    corrupt,
    dataset,
    linear_checkpoint,
    listing,
    read_only,
    tampered_checkpoint,
    trajectory,
    truncate,
)

from surrogate_md.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    EngineError,
    SurrogateMDError,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_CUDA = torch.cuda.is_available()
OFFSET_CACHE = re.compile(r"^\..+_offsets\.(npz|lock)$")


@dataclass
class Case:
    """One malformed-input call.

    call: raises (library) or returns an exit code (CLI ``main``).
    error: the expected exception type (library) or None (CLI: exit code != 0).
    mentions: texts the one-line message must contain (the file, option or object at fault).
    fix: regular expression for the advice in the message.
    watch: directory whose listing must not change.
    """

    call: Callable[[], int | None]
    error: type[Exception] | None
    mentions: tuple[str, ...]
    fix: str
    watch: Path
    skip: str = ""


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """Good inputs, made once: a dataset, DCD/XTC trajectories, an npz, checkpoints."""
    d = tmp_path_factory.mktemp("good")
    md = cached_md()
    np.savez(d / "mol.npz", R=md["frames"][:30], z=md["topology"].atomic_numbers)
    from _integration_fixtures import small_egnn_config

    return {
        "h5": dataset(d / "ala.h5"),
        "dcd": trajectory(d / "ala.dcd"),
        "xtc": trajectory(d / "ala.xtc"),
        "npz": d / "mol.npz",
        "ckpt": linear_checkpoint(d / "linear.pt"),
        "egnn": linear_checkpoint(d / "egnn.pt", model="egnn", model_config=small_egnn_config()),
    }


# -- helpers building calls --------------------------------------------------------------------
def _ingest(inputs, out, **kwargs):
    from datagen.ingest import ingest

    return lambda: ingest([str(p) for p in inputs], out, progress=False, command="test",
                          **kwargs)


def _datagen(*argv):
    from datagen.cli import main

    return lambda: main([str(a) for a in argv])


def _train_cli(*argv):
    from surrogate_md.train.__main__ import main

    return lambda: main([str(a) for a in argv])


def _evaluate_cli(*argv):
    from surrogate_md.evaluate.__main__ import main

    return lambda: main([str(a) for a in argv])


def _predict_cli(*argv):
    from integrations.predict import main

    return lambda: main([str(a) for a in argv])


def _load(path, **kwargs):
    from surrogate_md import Surrogate

    return lambda: Surrogate.load(path, **kwargs)


def _config(tmp: Path, good, name: str = "c.yaml", **sections) -> Path:
    from _train_fixtures import tiny_config

    cfg = tiny_config(good["h5"], "egnn", train={"epochs": 1, "max_steps_per_epoch": 1})
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _simulation(topology, system, surrogate):
    from integrations.openmm_simulation import SurrogateSimulation

    return lambda: SurrogateSimulation(topology, system, surrogate, guards="raise")


def _other_atoms(good, tmp: Path) -> Path:
    """A checkpoint whose training system had other elements (all carbon)."""
    z = np.full(cached_md()["topology"].n_atoms, 6).tolist()
    src = good["ckpt"]
    from surrogate_md.checkpoint import load_checkpoint

    topo = dict(load_checkpoint(src)["topology"], atomic_numbers=z)
    return tampered_checkpoint(src, tmp / "carbon.pt", topology=topo)


def _newer(good, tmp: Path) -> Path:
    return tampered_checkpoint(good["ckpt"], tmp / "future.pt", format_version=99)


def _ala_system(barostat: bool = False):
    import openmm
    from _integration_fixtures import alanine_system
    from openmm import unit

    topology, system, _ = alanine_system()
    if barostat:
        system.addForce(openmm.MonteCarloBarostat(1 * unit.bar, 300 * unit.kelvin))
    return topology, system


# -- the corpus ------------------------------------------------------------------------------
FIX_FORMAT = r"check the format|give"


def c_dcd_truncated(t, g):
    bad = truncate(g["dcd"], t / "cut.dcd", 150)
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("cut.dcd",), FIX_FORMAT, t)


def c_dcd_corrupted(t, g):
    bad = corrupt(g["dcd"], t / "bad.dcd", 0, 64)
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("bad.dcd",), FIX_FORMAT, t)


def c_dcd_inf(t, g):
    bad = trajectory(t / "inf.dcd", inf_at=5)
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("inf.dcd", "NaN or inf",
                                                             "frame 5"), r"remove or repair", t)


def c_xtc_truncated(t, g):
    bad = truncate(g["xtc"], t / "cut.xtc", 150)
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("cut.xtc",), FIX_FORMAT, t)


def c_xtc_torn_tail(t, g):
    size = g["xtc"].stat().st_size
    bad = truncate(g["xtc"], t / "torn.xtc", size * 3 // 5 - 37)  # inside a frame
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("torn.xtc", "only 11"),
                r"truncated.*write its first 11 frames", t)


def c_xtc_garbage(t, g):
    bad = t / "junk.xtc"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, np.uint8).tobytes())
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("junk.xtc",), FIX_FORMAT, t)


def c_h5_truncated(t, g):
    from surrogate_md.data import open_trajectory

    bad = truncate(g["h5"], t / "cut.h5", g["h5"].stat().st_size // 2)
    return Case(lambda: open_trajectory(bad), DataError, ("cut.h5",), r"regenerate", t)


def c_h5_corrupted_superblock(t, g):
    from surrogate_md.data import open_trajectory

    bad = corrupt(g["h5"], t / "bad.h5", 0, 8)
    return Case(lambda: open_trajectory(bad), DataError, ("bad.h5",), r"regenerate", t)


def c_h5_foreign(t, g):
    from surrogate_md.data import open_trajectory

    bad = t / "foreign.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = np.zeros(3)
    return Case(lambda: open_trajectory(bad), DataError, ("foreign.h5",), r"create one with", t)


def c_h5md_truncated_ingest(t, g):
    bad = truncate(g["h5"], t / "cut.h5md", g["h5"].stat().st_size // 2)
    return Case(_ingest([PDB, bad], t / "o.h5"), DataError, ("cut.h5md",), FIX_FORMAT, t)


def c_h5_nan_write(t, g):
    from surrogate_md.data import write_trajectory

    md = cached_md()
    x = md["frames"][:10].copy()
    x[4, 2, 0] = np.nan
    return Case(lambda: write_trajectory(t / "nan.h5", md["topology"], x, md["times"][:10], {}),
                DataError, ("nan.h5", "frame 4"), r"remove or repair", t)


def c_npz_nan(t, g):
    bad = t / "nan.npz"
    md = cached_md()
    x = md["frames"][:10].copy()
    x[7, 0, 1] = np.nan
    np.savez(bad, R=x, z=md["topology"].atomic_numbers)
    return Case(_ingest([bad], t / "o.h5"), DataError, ("nan.npz", "frame 7"),
                r"remove or repair", t)


def c_atom_count_mismatch(t, g):
    from MDAnalysisTests.datafiles import DCD as ADK_DCD

    return Case(_ingest([PDB, ADK_DCD], t / "o.h5"), DataError,
                ("alanine-dipeptide.pdb", "atom-count mismatch"), r"give the topology", t)


def c_empty_selection_mda(t, g):
    return Case(_ingest([PDB, g["dcd"]], t / "o.h5", select="resname XYZ"), DataError,
                ("resname XYZ",), r"check|choose|use", t)


def c_empty_selection_npz(t, g):
    return Case(_ingest([g["npz"]], t / "o.h5", select="name Q*"), DataError,
                ("mol.npz", "name Q*"), r"check|choose|use", t)


def c_npz_missing_key(t, g):
    bad = t / "noz.npz"
    np.savez(bad, R=cached_md()["frames"][:5])
    return Case(_ingest([bad], t / "o.h5"), DataError, ("noz.npz", "'R' and 'z'"), r"need", t)


def c_npz_misnamed_keys(t, g):
    bad = t / "renamed.npz"
    md = cached_md()
    np.savez(bad, positions=md["frames"][:5], numbers=md["topology"].atomic_numbers)
    return Case(_ingest([bad], t / "o.h5"), DataError, ("renamed.npz", "positions"), r"need", t)


def c_npz_shape_mismatch(t, g):
    bad = t / "shape.npz"
    np.savez(bad, R=cached_md()["frames"][:5], z=np.ones(5, dtype=int))
    return Case(_ingest([bad], t / "o.h5"), DataError, ("shape.npz",), r"expected", t)


def c_cli_ingest_dt_zero(t, g):
    return Case(_datagen("ingest", g["npz"], "-o", t / "o.h5", "--dt-ps", "0"), None,
                ("mol.npz", "dt_ps=0"), r"--dt-ps 0\.0005", t)


def c_cli_ingest_dt_negative(t, g):
    return Case(_datagen("ingest", PDB, g["dcd"], "-o", t / "o.h5", "--dt-ps", "-1"), None,
                ("alanine-dipeptide.pdb", "dt_ps=-1"), r"--dt-ps", t)


def c_cli_openmm_step_zero(t, g):
    return Case(_datagen("openmm", "--system", "alanine-dipeptide", "--frames", "2",
                         "--step-fs", "0", "--no-progress", "-o", t / "o.h5"), None,
                ("o.h5", "step_fs=0"), r"--step-fs", t)


def c_cli_openmm_interval_negative(t, g):
    return Case(_datagen("openmm", "--system", "alanine-dipeptide", "--frames", "2",
                         "--interval-ps", "-0.5", "--no-progress", "-o", t / "o.h5"), None,
                ("o.h5", "interval_ps=-0.5"), r"--interval-ps", t)


def c_cli_openmm_interval_zero(t, g):
    return Case(_datagen("openmm", "--system", "alanine-dipeptide", "--frames", "2",
                         "--interval-ps", "0", "--no-progress", "-o", t / "o.h5"), None,
                ("o.h5", "interval_ps=0"), r"--interval-ps", t)


def c_load_newer_format(t, g):
    return Case(_load(_newer(g, t)), CheckpointError, ("future.pt", "version 99"),
                r"upgrade surrogate-md", t)


def c_load_unknown_model(t, g):
    bad = tampered_checkpoint(g["ckpt"], t / "alien.pt", model={"name": "alien", "config": {}})
    return Case(_load(bad), CheckpointError, ("alien.pt", "'alien'"), r"upgrade", t)


def c_load_other_model_config(t, g):
    bad = tampered_checkpoint(g["egnn"], t / "swapped.pt", model__name="painet")
    return Case(_load(bad), CheckpointError, ("swapped.pt", "painet", "has no option"),
                r"re-export it", t)


def c_load_other_model_weights(t, g):
    bad = tampered_checkpoint(g["egnn"], t / "swapped.pt", model__name="egno")
    return Case(_load(bad), CheckpointError, ("swapped.pt", "egno", "do not fit"),
                r"use the best\.pt", t)


def c_load_weights_do_not_fit(t, g):
    from surrogate_md.checkpoint import load_checkpoint

    model = load_checkpoint(g["egnn"])["model"]
    model["config"] = dict(model["config"], hidden=32)
    bad = tampered_checkpoint(g["egnn"], t / "wide.pt", model=model)
    return Case(_load(bad), CheckpointError, ("wide.pt", "do not fit"), r"re-export|use", t)


def c_load_truncated(t, g):
    bad = truncate(g["ckpt"], t / "cut.pt", g["ckpt"].stat().st_size // 2)
    return Case(_load(bad), CheckpointError, ("cut.pt",), r"use a best\.pt", t)


def c_load_foreign_torch_file(t, g):
    bad = t / "weights.pt"
    torch.save({"w": torch.zeros(3)}, bad)
    return Case(_load(bad), CheckpointError, ("weights.pt", "no format marker"),
                r"use a best\.pt", t)


def c_load_missing(t, g):
    return Case(_load(t / "nowhere.pt"), CheckpointError, ("nowhere.pt",), r"check the path", t)


def c_load_incomplete(t, g):
    bad = tampered_checkpoint(g["ckpt"], t / "partial.pt", selection=None)
    return Case(_load(bad), CheckpointError, ("partial.pt", "'selection'"), r"re-export", t)


def c_load_cuda(t, g):
    return Case(_load(g["ckpt"], device="cuda"), DeviceError, ("linear.pt", "CUDA"),
                r"--device cpu|device=.cpu", t, skip="CUDA is available" if HAS_CUDA else "")


def c_evaluate_other_atoms(t, g):
    bad = _other_atoms(g, t)
    return Case(_evaluate_cli(bad, "--data", g["h5"], "--out", t / "report", "-q"), None,
                ("carbon.pt",), r"use a checkpoint trained on this system", t)


def c_evaluate_newer_format(t, g):
    return Case(_evaluate_cli(_newer(g, t), "--data", g["h5"], "--out", t / "report", "-q"),
                None, ("future.pt",), r"upgrade surrogate-md", t)


def c_simulation_other_atoms(t, g):
    topology, system = _ala_system()
    return Case(_simulation(topology, system, _other_atoms(g, t)), DataError, ("carbon.pt",),
                r"use a checkpoint trained on this system", t)


def c_simulation_other_atom_count(t, g):
    from datagen.openmm_md import prepare_system

    ethanol = prepare_system("ethanol")
    return Case(_simulation(ethanol.topology, ethanol.system, g["ckpt"]), DataError,
                ("linear.pt", "9 particles"), r"use a checkpoint trained on this system", t)


def c_simulation_barostat(t, g):
    topology, system = _ala_system(barostat=True)
    return Case(_simulation(topology, system, g["ckpt"]), EngineError, ("MonteCarloBarostat",),
                r"remove the barostat", t)


def c_simulation_newer_format(t, g):
    topology, system = _ala_system()
    return Case(_simulation(topology, system, _newer(g, t)), CheckpointError, ("future.pt",),
                r"upgrade surrogate-md", t)


def c_predict_newer_format(t, g):
    return Case(_predict_cli(_newer(g, t), "--topology", PDB, "-n", "2", "-o", t / "p.xtc",
                             "--platform", "Reference"), None, ("future.pt",),
                r"upgrade surrogate-md", t)


def c_predict_other_atoms(t, g):
    return Case(_predict_cli(_other_atoms(g, t), "--topology", PDB, "-n", "2", "-o",
                             t / "p.xtc", "--platform", "Reference"), None, ("carbon.pt",),
                r"use a checkpoint trained on this system", t)


def c_predict_other_model(t, g):
    bad = tampered_checkpoint(g["egnn"], t / "swapped.pt", model__name="egno")
    return Case(_predict_cli(bad, "--topology", PDB, "-n", "2", "-o", t / "p.xtc",
                             "--platform", "Reference"), None, ("swapped.pt",),
                r"re-export|use", t)


def c_train_unknown_key(t, g):
    cfg = _config(t, g, train={"epoch_count": 3})
    return Case(_train_cli("--config", cfg, "--out", t / "run"), None,
                ("c.yaml", "train.epoch_count"), r"the keys of train are", t)


def c_train_wrong_type(t, g):
    cfg = _config(t, g, train={"epochs": "ten"})
    return Case(_train_cli("--config", cfg, "--out", t / "run"), None,
                ("c.yaml", "train.epochs"), r"must be an integer", t)


def c_train_negative_size(t, g):
    cfg = _config(t, g, train={"batch_size": -4})
    return Case(_train_cli("--config", cfg, "--out", t / "run"), None,
                ("c.yaml", "train.batch_size"), r"must be > 0", t)


def c_train_negative_model_size(t, g):
    cfg = _config(t, g, model={"hidden": -16})
    return Case(_train_cli("--config", cfg, "--out", t / "run"), None,
                ("c.yaml", "hidden"), r"must be > 0|positive", t)


def c_train_not_a_mapping(t, g):
    cfg = t / "list.yaml"
    cfg.write_text("- data\n- model\n")
    return Case(_train_cli("--config", cfg, "--out", t / "run"), None, ("list.yaml",),
                r"must be a mapping", t)


def c_train_cuda(t, g):
    cfg = _config(t, g)
    return Case(_train_cli("--config", cfg, "--out", t / "run", "--device", "cuda"), None,
                ("c.yaml", "CUDA"), r"--device cpu", t,
                skip="CUDA is available" if HAS_CUDA else "")


def c_ingest_out_missing_dir(t, g):
    return Case(_ingest([g["npz"]], t / "missing" / "o.h5"), DataError,
                ("missing",), r"create it", t)


def c_ingest_out_read_only(t, g):
    ro = read_only(t / "ro")
    return Case(_ingest([g["npz"]], ro / "o.h5"), DataError, ("o.h5",), r"permissions", t,
                skip="root writes into read-only directories" if IS_ROOT else "")


def c_openmm_out_missing_dir(t, g):
    return Case(_datagen("openmm", "--system", "alanine-dipeptide", "--frames", "2",
                         "--equilibrate-ps", "0", "--no-progress", "-o", t / "no" / "o.h5"),
                None, ("no/o.h5",), r"create it", t)


def c_openmm_out_read_only(t, g):
    ro = read_only(t / "ro")
    return Case(_datagen("openmm", "--system", "alanine-dipeptide", "--frames", "2",
                         "--equilibrate-ps", "0", "--no-progress", "-o", ro / "o.h5"),
                None, ("o.h5",), r"permissions", t,
                skip="root writes into read-only directories" if IS_ROOT else "")


def c_train_out_under_a_file(t, g):
    cfg = _config(t, g)
    (t / "afile").write_text("not a directory\n")
    return Case(_train_cli("--config", cfg, "--out", t / "afile" / "run"), None,
                ("afile",), r"choose another --out", t)


def c_train_out_read_only(t, g):
    cfg = _config(t, g)
    ro = read_only(t / "ro")
    return Case(_train_cli("--config", cfg, "--out", ro / "run"), None, ("run",),
                r"choose another --out", t,
                skip="root writes into read-only directories" if IS_ROOT else "")


def c_predict_out_missing_dir(t, g):
    return Case(_predict_cli(g["ckpt"], "--topology", PDB, "-n", "2", "-o",
                             t / "nodir" / "p.xtc", "--platform", "Reference"), None,
                ("nodir",), r"create it", t)


def c_predict_out_read_only(t, g):
    ro = read_only(t / "ro")
    return Case(_predict_cli(g["ckpt"], "--topology", PDB, "-n", "2", "-o", ro / "p.xtc",
                             "--platform", "Reference"), None, ("p.xtc",),
                r"permissions|choose another", t,
                skip="root writes into read-only directories" if IS_ROOT else "")


CASES = {name[2:].replace("_", "-"): fn for name, fn in dict(globals()).items()
         if name.startswith("c_") and callable(fn)}


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_malformed_input(case_id, good, tmp_path, capsys):
    t = tmp_path / "case"
    t.mkdir()
    case = CASES[case_id](t, good)
    if case.skip:
        os.chmod(t / "ro", 0o755) if (t / "ro").exists() else None
        pytest.skip(case.skip)
    before = listing(t)
    capsys.readouterr()
    try:
        if case.error is None:
            code = case.call()
            err = capsys.readouterr().err
            assert code not in (0, None), f"exit code {code}"
            assert "Traceback" not in err
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(lines) == 1, err
            message = lines[0]
        else:
            with pytest.raises(SurrogateMDError) as info:
                case.call()
            assert isinstance(info.value, case.error), repr(info.value)
            message = str(info.value)
            assert "\n" not in message.strip()
        for text in case.mentions:
            assert text in message, message
        assert re.search(case.fix, message), message
        # MDAnalysis caches XTC frame offsets beside its input; those are not outputs
        after = [p for p in listing(t) if not OFFSET_CACHE.match(p)]
        assert after == before
    finally:
        if (t / "ro").exists():
            os.chmod(t / "ro", 0o755)


# -- untrusted files ---------------------------------------------------------------------------
class Payload:
    """An object whose unpickling would run code (it touches a marker file)."""

    marker: Path | None = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_object_in_checkpoint_is_refused_and_never_run(good, tmp_path):
    from surrogate_md import Surrogate
    from surrogate_md.checkpoint import load_checkpoint

    marker = tmp_path / "code-was-run"
    payload = Payload()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    data = torch.load(good["ckpt"], weights_only=True)
    data["provenance"] = {"note": payload}
    torch.save(data, evil)
    assert not marker.exists()
    for load in (load_checkpoint, Surrogate.load):
        with pytest.raises(CheckpointError, match="evil.pt") as info:
            load(evil)
        assert "not a readable surrogate-md checkpoint" in str(info.value)
        assert not marker.exists()
    # the payload is real: what unpickling would call does create the marker
    call, args = payload.__reduce__()
    call(*args)
    assert marker.exists()


def test_config_with_python_tags_is_refused_and_never_run(good, tmp_path):
    from surrogate_md.train.config import load_config

    marker = tmp_path / "code-was-run"
    for tag in (f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path"
                f" ['{marker}']]", "!!python/object:collections.OrderedDict {}",
                "!!python/name:os.system"):
        cfg = tmp_path / "evil.yaml"
        cfg.write_text(f"data:\n  path: {good['h5']}\ntrain:\n  epochs: {tag}\n")
        with pytest.raises(ConfigError, match="evil.yaml"):
            load_config(cfg)
        assert not marker.exists()
    # the same value through --set is refused as well
    with pytest.raises(ConfigError, match="train.epochs") as info:
        load_config(None, ["train.epochs=!!python/name:os.system"],
                    base={"data": {"path": str(good["h5"])}})
    assert "\n" not in str(info.value)


def test_torn_dcd_tail_ingests_exactly_the_complete_frames(good, tmp_path):
    """A DCD cut inside a frame (a killed writer) keeps its complete frames, bit for bit."""
    import MDAnalysis as mda

    from surrogate_md.data import open_trajectory

    u = mda.Universe(str(PDB), str(good["dcd"]))
    full = np.stack([ts.positions.copy() for ts in u.trajectory])
    frame_bytes = (good["dcd"].stat().st_size) // len(full)
    torn = truncate(good["dcd"], tmp_path / "torn.dcd", good["dcd"].stat().st_size
                    - frame_bytes // 2)
    from datagen.ingest import ingest

    out = ingest([str(PDB), str(torn)], tmp_path / "torn.h5", progress=False, command="test")
    with open_trajectory(out) as f:
        x = f.read(slice(None))
    assert len(x) == len(full) - 1
    np.testing.assert_array_equal(x, full[:-1].astype(np.float64))
