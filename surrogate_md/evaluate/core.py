"""Evaluate a checkpoint on a dataset: errors, rollouts and physical validity, with baselines.

Windows are cut exactly as in training (the checkpoint records its data config and seed), so
``split="test"`` on the training files, given in the training order, is the held-out test split;
other files, a subset or another order would re-cut the split with training windows in it, and
are refused (``split="all"`` scores the windows of all three splits, from any files). The
``constant`` and ``linear`` floors are always evaluated on the same windows.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surrogate_md import metrics as M
from surrogate_md.data import keys as K
from surrogate_md.data.h5md import open_trajectory
from surrogate_md.data.windows import Protocol, WindowDataset, batch_to
from surrogate_md.errors import ConfigError, DataError
from surrogate_md.fileio import atomic_write_text
from surrogate_md.models import build_model
from surrogate_md.noise import DEFAULT_MAX_COMPONENTS, JumpNoise
from surrogate_md.surrogate import Surrogate
from surrogate_md.train.config import data_config_from_dict
from surrogate_md.train.data import prepare_data
from surrogate_md.validity import (
    excluded_pairs,
    gyration_summary,
    min_nonbonded_distance,
    radius_of_gyration,
)

log = logging.getLogger(__name__)

BASELINES = ("constant", "linear")
SPLITS = ("test", "val", "train", "all")
PROTOCOLS = ("s2t", "s2s")
COLLAPSE_A = 0.5  # bond-length deviation (Å) that counts as a collapsed/broken frame
#: reference frames each half must hold for the torsion sampling floor (first half of the
#: reference frames against the second): with fewer, the two histograms say nothing
TORSION_FLOOR_MIN_FRAMES = 5
CHAIN_BREAK_A = 4.5  # CA-CA(i, i+1) distance (Å) that counts as a chain break


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike | list, out_dir:
             str | os.PathLike, *, split: str = "test", protocol: str = "s2t",
             rollout_jumps: int = 10, n_rollouts: int = 4, batch_size: int = 32,
             device: str = "auto", max_windows: int | None = None,
             overwrite: bool = False, plots: bool = True, transfer: bool = False,
             noise_out: str | os.PathLike | None = None,
             noise_components: int | None = None,
             noise_revert: bool = False, noise_size: bool = False) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data`` and write ``report.md``, ``metrics.json`` and PNGs.

    Args:
        checkpoint: ``best.pt``/``last.pt``.
        data: dataset file(s) of the system the model was trained on.
        out_dir: output directory (created; existing reports are refused unless ``overwrite``).
        split: windows to score: ``test`` | ``val`` | ``train`` (cut as in training, which needs
            the training run's files in the training order: anything else is refused) or
            ``all`` (the windows of all three splits, from any files; files too short for
            the training split: every window they hold, with a warning).
        protocol: ``s2t`` (the trained output grid, F-MSE and A-MSE) or ``s2s`` (only the end of
            the jump, taken from the prediction on the trained grid).
        rollout_jumps: jumps per rollout (0 = no rollout); limited by the trajectory length.
            A rollout that diverges (non-finite positions, or a state the model refuses as
            input) is cut at that jump and recorded; the rest of the evaluation goes on.
        n_rollouts: rollouts started from windows spread over the split.
        max_windows: score at most this many windows (evenly spaced) of the split.
        transfer: ``data`` holds another system, or the same molecule in another force field or
            atom order (e.g. AdK from CHARMM files for a model trained on Amber MD): the model's
            nodes and graph are selected afresh in ``data`` by the training recipe, without the
            atom-by-atom check, and only one-jump errors are scored (no rollouts).
        noise_out: also fit a :class:`~surrogate_md.noise.JumpNoise` to the residuals of the
            scored windows at the end of the jump (on the trained output grid) and save it there
            (``.npz``; an existing file only with ``overwrite``), for stochastic jumps in the
            engines; fit it on ``val`` or ``train`` windows and keep ``test`` for scoring (on
            ``test`` it warns). Not with ``transfer``.
        noise_components: keep the leading this many principal components of the residuals
            (default :data:`~surrogate_md.noise.DEFAULT_MAX_COMPONENTS`). Fewer, collective
            components leave out the small, local part of the spread, whose Gaussian draws
            strain bonds and contacts the engines' relaxation must then undo (README,
            "Fewer noise components").
        noise_revert: fit the noise's mean reversion along each component too (the draws
            pulled back towards the fitted frames' spread, so that long runs stay in it: module
            doc of :mod:`surrogate_md.noise`).
        noise_size: fit the noise's size model too (the drawn ends scaled to the reference
            MD's radius of gyration at the jump's lag, undoing the mean prediction's shrinking:
            module doc of :mod:`surrogate_md.noise`).

    Returns:
        The metrics dict written to ``metrics.json``. Errors are Å² per atom (squared distance
        summed over xyz, averaged over atoms).
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {list(SPLITS)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    if rollout_jumps < 0 or n_rollouts < 1 or batch_size < 1:
        raise ConfigError("rollout_jumps must be >= 0, n_rollouts and batch_size >= 1")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows (--max-windows) must be >= 1, got {max_windows}; leave "
                          "it out to score every window of the split")
    if noise_components is not None and noise_components < 1:
        raise ConfigError(f"noise_components (--noise-components) must be >= 1, got "
                          f"{noise_components}; leave it out to keep up to "
                          f"{DEFAULT_MAX_COMPONENTS}")
    for flag, name in ((noise_revert, "noise_revert (--noise-revert)"),
                       (noise_size, "noise_size (--noise-size)")):
        if flag and noise_out is None:
            raise ConfigError(f"{name} is a property of the fitted jump noise; give --noise-out "
                              "FILE.npz to fit one")
    if noise_components is not None and noise_out is None:
        raise ConfigError("noise_components (--noise-components) sets how many components the "
                          "jump noise keeps, and no noise_out (--noise-out FILE) was given")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    if noise_out is not None:
        _check_noise_out(Path(noise_out), transfer, overwrite)
        if split == "test":
            log.warning("--noise-out fits the jump noise on the test windows: scores of "
                        "stochastic runs on this split are then not held out; fit it on "
                        "--split val (or train)")
    sur = Surrogate.load(checkpoint, device=device)
    prov = sur.meta.get("provenance") or {}
    paths = [str(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    given = [_file_info(p, identity=bool(prov.get("data_identity"))) for p in paths]
    if not transfer:  # another system is the first thing to tell, before any split question
        sur.check_atomic_numbers(given[0]["atomic_numbers"], given[0]["atom_names"])
    dc = dict(prov.get("data_config") or _data_config_from_protocol(sur))
    dc["path"] = paths
    if dc.get("protocol") == "history" and dc.get("history_stride_ps") is None:
        # recorded as "one saved frame": in data saved at another interval that is another
        # stride; the model's stride in ps is what its input must have
        dc["history_stride_ps"] = sur.history_stride_ps
    if sur.velocity_source == "finite_difference":
        # the model's inputs were finite differences: so are they here, also where these files
        # store velocities (a model trained on MD17 positions, scored on data made with
        # velocities); a model trained on stored velocities takes them where there are any
        dc["velocities"] = "difference"
    elif dc.get("velocities") == "file":
        dc["velocities"] = "auto"  # files without velocities: scored on differences, warned
    seed = int(prov.get("run_config", {}).get("train", {}).get("data_seed", 0))
    data_cfg = data_config_from_dict(dc, str(checkpoint))
    try:  # the time grid first: data that cannot give it is the problem, not the split
        Protocol.from_ps(data_cfg.protocol, data_cfg.jump_ps, data_cfg.n_out,
                         given[0]["interval_ps"], history=data_cfg.history,
                         history_stride_ps=data_cfg.history_stride_ps)
    except ConfigError as exc:
        raise _grid_error(sur, checkpoint, given[0], exc) from None
    warnings = _check_files_against_training(checkpoint, prov, given, split)
    every_window = False
    try:
        prepared = _prepare(data_cfg, seed, sur, checkpoint, given[0])
    except DataError:
        if split != "all":
            raise
        # files the training split cannot cut (shorter than its blocks, or than its paper
        # counts and margins) still hold windows: --split all scores every one of them. Any
        # other refusal of the data comes back from this second attempt.
        every_window = True
        prepared = _prepare(data_config_from_dict(
            {**dc, "split": "paper", "margin_frames": 0, "counts": [1, 0, 0]},
            str(checkpoint)), seed, sur, checkpoint, given[0])
    try:
        if transfer:
            selection, graph, rollout_jumps = prepared.selection, prepared.graph, 0
        else:
            selection, graph = sur.selection, sur.graph
        warnings += _velocity_warnings(sur, prepared, paths)
        if every_window:
            windows = _every_window(prepared)
            note = (f"the training run's {data_cfg.split} split cannot cut "
                    f"{', '.join(Path(p).name for p in paths)} (too few frames): --split all "
                    f"scores every window they hold ({len(windows)}) instead of the windows of "
                    "its three splits")
            log.warning("%s", note)
            warnings.append(note)
        else:
            windows = (np.concatenate([prepared.windows[k] for k in ("train", "val", "test")])
                       if split == "all" else prepared.windows[split])
        if max_windows is not None and len(windows) > max_windows:
            windows = windows[np.linspace(0, len(windows) - 1, max_windows).astype(int)]
        if len(windows) == 0:
            raise DataError(f"{paths[0]}: the {split} split has no windows; use --split all or "
                            "a longer trajectory")
        ds = WindowDataset(prepared.files, windows, prepared.protocol, selection, graph,
                           velocities=data_cfg.velocities)
        _check_time_grid(sur, ds, prepared, paths[0], checkpoint)
        result: dict[str, Any] = {
            "checkpoint": str(checkpoint), "checkpoint_hash": sur.checkpoint_hash,
            "model": sur.name, "data": paths, "split": split, "protocol": protocol,
            "transfer": transfer, "n_nodes": int(selection.n_nodes),
            "velocity_source": prepared.velocity_source,
            "model_velocity_source": sur.meta["protocol"].get("velocity_source"),
            "interval_ps": float(prepared.interval_ps),
            "model_interval_ps": sur.meta["protocol"].get("interval_ps"),
            "n_windows": int(len(windows)), "jump_ps": sur.jump_ps,
            "history_stride_ps": (float(prepared.protocol.history_stride * prepared.interval_ps)
                                  if sur.needs_history else None),
            "metric_definition": M.METRIC_DEFINITION,
            "training_metrics": sur.meta.get("metrics", {}),
        }
        ends: list[tuple[np.ndarray, np.ndarray]] | None = [] if noise_out is not None else None
        result["errors"] = _window_errors(sur, ds, protocol, batch_size, ends)
        if ends is not None:
            result["jump_noise"] = _fit_noise(sur, ends, noise_out, checkpoint, paths, split,
                                              noise_components or DEFAULT_MAX_COMPONENTS,
                                              noise_revert, noise_size)
        if rollout_jumps:
            result["rollout"] = _rollouts(sur, ds, prepared, rollout_jumps, n_rollouts)
            warnings += result["rollout"].pop("warnings", [])
            warnings += [f"rollout {r['rollout']} ({Path(r['data']).name}, start frame "
                         f"{r['start_frame']}): {r['divergence']}"
                         for r in result["rollout"].get("rollouts", []) if r["divergence"]]
    finally:
        prepared.close()
    result["warnings"] = warnings
    from surrogate_md.evaluate.report import PLOT_NAMES, write_plots, write_report

    out.mkdir(parents=True, exist_ok=True)  # only now: a failed evaluation leaves no directory
    # report.md, written last, marks a finished evaluation: an earlier run's report and metrics
    # go before this run writes anything, so an interrupted rewrite leaves no report.md beside
    # another run's metrics or plots (and the next run needs no --overwrite)
    for name in ("report.md", "metrics.json"):
        (out / name).unlink(missing_ok=True)
    if plots:
        result["plots"] = write_plots(result, out)
    for name in set(PLOT_NAMES) - set(result.get("plots", [])):
        (out / name).unlink(missing_ok=True)  # an earlier run's plot would pass for this one's
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(result), indent=2) + "\n")
    write_report(result, out / "report.md")
    log.info("evaluation written to %s", out)
    return result


def _prepare(data_cfg, seed: int, sur: Surrogate, checkpoint, info: dict[str, Any]):
    """:func:`prepare_data`, its configuration errors told in the checkpoint's terms (the time
    grid fits, as checked before: something else in the recipe)."""
    try:
        return prepare_data(data_cfg, seed=seed)
    except ConfigError as exc:
        raise _grid_error(sur, checkpoint, info, exc, interval_is_the_cause=False) from None


def _every_window(prepared) -> np.ndarray:
    """(n, 2) (file, t0) of every window the protocol can cut from the prepared files, t0 one
    saved frame apart."""
    p = prepared.protocol
    lo = p.before(prepared.velocity_source == "finite_difference")
    rows = [np.stack([np.full(max(f.n_frames - p.after - lo, 0), fi),
                      np.arange(lo, f.n_frames - p.after)], axis=1)
            for fi, f in enumerate(prepared.files)]
    return np.concatenate(rows).astype(np.int64).reshape(-1, 2)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output location the report cannot go to, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory; --out names the directory "
                          "for report.md, metrics.json and the plots: choose another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{out}: {parent} is a file, not a directory; choose another "
                                  "--out")
            break
    if (out / "report.md").exists() and not overwrite:
        raise ConfigError(f"{out}: already holds a report; pass --overwrite or choose another "
                          "--out")
    # can files be made there (permissions, a read-only or special file system, a dangling
    # symbolic link on the way)? Tried now by making the directory and a file in it, then
    # undone: the report is written only after the whole evaluation
    missing = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".report.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        link = next((d for d in missing if d.is_symlink()), None)
        why = (f"{link} is a symbolic link to {os.readlink(link)}, which does not exist"
               if link is not None else exc.strerror or str(exc))
        raise ConfigError(f"{out}: cannot write the report there ({why}); choose another "
                          "--out") from None
    finally:
        for d in missing:  # what this made, deepest first
            try:
                d.rmdir()
            except FileNotFoundError:  # not made: the making stopped above it
                continue
            except OSError:
                break


def _file_info(path: str, identity: bool = False) -> dict[str, Any]:
    """What the checks before the data preparation need of one dataset file (with
    ``identity``: its content identity, as the training run recorded it)."""
    with open_trajectory(path) as f:
        info = {"path": path, "metadata": f.metadata, "interval_ps": f.interval_ps,
                "atomic_numbers": f.topology.atomic_numbers,
                "atom_names": f.topology.atom_names}
        if identity:  # recorded only by versions that have it
            from surrogate_md.train.data import data_identity

            info["identity"] = data_identity(f)
        return info


def _resolved(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _content_difference(trained: dict[str, Any], given: dict[str, Any]) -> str | None:
    """None if ``given`` (a :func:`_file_info`) holds the content recorded in ``trained``
    ({"metadata": ..., "identity": ...}, either may be None), else what differs. The content
    identity decides where it was recorded (it covers the metadata too); the metadata say best
    what changed."""
    ident, meta, now = trained.get("identity"), trained.get("metadata"), given["metadata"]
    said = ""
    if ident is not None and given.get("identity") is not None:
        keys = [k for k in ("n_frames", "fields", "sha256")
                if ident.get(k) != given["identity"].get(k)]
        if not keys:
            return None
        said = "; ".join(f"{k}: {ident.get(k)!r} at training, {given['identity'].get(k)!r} now"
                         for k in keys[:2])
    elif meta is None or meta == now:
        return None
    if meta is not None and meta != now:
        keys = sorted(k for k in set(meta) | set(now) if meta.get(k) != now.get(k))
        said = "; ".join(f"metadata {k}: {meta.get(k)!r} at training, {now.get(k)!r} now"
                         for k in keys[:3])
    return said


def _check_files_against_training(checkpoint, prov: dict[str, Any],
                                  given: list[dict[str, Any]], split: str) -> list[str]:
    """Refuse a re-cut split on other files than the training run's, in another order or a
    subset of them (the cut depends on the files and their order: training windows would land
    in the test split); return warnings for scores that include training windows.

    A given file is a training file if it is the same path (or the same file name, moved) and
    holds the recorded content: its content identity (``data_identity``: frame count, fields
    and a hash of metadata, time axis and sampled frames) where the checkpoint recorded it,
    else its metadata (engine, seed, source, interval...). A file rewritten at the same path is
    another file.
    """
    data_config = prov.get("data_config")
    trained = prov.get("data_files") or (data_config or {}).get("path") or []
    trained = [str(t) for t in ([trained] if isinstance(trained, str) else trained)]

    def recorded(key: str) -> list:
        values = prov.get(key)
        ok = isinstance(values, list) and len(values) == len(trained)
        return values if ok else [None] * len(trained)

    content = [{"metadata": m, "identity": i}
               for m, i in zip(recorded("data_metadata"), recorded("data_identity"))]
    if split != "all" and not data_config:
        raise ConfigError(
            f"{checkpoint}: its provenance records no data_config (the data files, split and "
            f"seed of its training run), so its {split} split cannot be re-cut: any split made "
            "up here could hold the windows it was trained on. Evaluate with --split all (the "
            "windows of all three splits; held out only if the model never saw those files)")

    def match(info: dict[str, Any]) -> tuple[int | None, str]:
        """(index of the training file it is, or None; why not)."""
        why = "not one of the training files"
        for j, path in enumerate(trained):
            differ = _content_difference(content[j], info)
            if _resolved(path) == _resolved(info["path"]):
                if differ is None:
                    return j, ""
                why = (f"the training file's path, but not its content ({differ}): rewritten "
                       "since")
            elif (Path(path).name == Path(info["path"]).name and differ is None
                  and any(content[j].values())):
                return j, ""
        return None, why

    matches = [match(info) for info in given]
    names = [Path(info["path"]).name for info in given]
    if split != "all" and [j for j, _ in matches] != list(range(len(trained))):
        notes = [f"{info['path']}: {why}" for info, (j, why) in zip(given, matches)
                 if j is None]
        notes += [f"{info['path']}: training file {j + 1}, given as file {i + 1}"
                  for i, (info, (j, _)) in enumerate(zip(given, matches))
                  if j is not None and j != i]
        found = {j for j, _ in matches}
        given_paths = {_resolved(info["path"]) for info in given}
        notes += [f"{t}: not given" for k, t in enumerate(trained)
                  if k not in found and _resolved(t) not in given_paths]
        raise ConfigError(
            f"{checkpoint}: --split {split} re-cuts the training run's windows, which depend on "
            f"its data files and their order; it was trained on [{', '.join(trained)}] in this "
            f"order, and was given [{', '.join(info['path'] for info in given)}] "
            f"({'; '.join(notes)}). Windows cut from other files, a subset or another order "
            "put training windows into the test split. Give --data "
            f"{' '.join(trained)} (the same files in the same order), or score the windows of "
            "all three splits with --split all (training windows included)")
    seen = [n for n, (j, _) in zip(names, matches) if j is not None]
    warnings = []
    if split == "all" and seen:
        warnings.append(f"--split all scores the training and validation windows of "
                        f"{', '.join(seen)} too, which the model was trained on: these are not "
                        "held-out errors (--split test is)")
    elif split == "all" and not trained:
        warnings.append(f"{checkpoint} records no training data files: whether these windows "
                        "were trained on cannot be told")
    elif split == "train":
        warnings.append("--split train scores the windows the model was trained on: these are "
                        "not held-out errors (--split test is)")
    for w in warnings:
        log.warning("%s", w)
    return warnings


def _velocity_warnings(sur: Surrogate, prepared, paths: list[str]) -> list[str]:
    """The input velocities must be of the kind the model was trained on: velocities stored in
    the file, or finite differences over one saved frame (which depend on that interval)."""
    trained = sur.meta["protocol"].get("velocity_source")
    trained_iv = sur.meta["protocol"].get("interval_ps")
    here, iv = prepared.velocity_source, prepared.interval_ps
    warnings = []
    if trained and trained != here:
        how = {"file": "velocities stored in the file", "finite_difference":
               "finite differences of positions one saved frame apart"}
        warnings.append(f"{', '.join(paths)}: the velocities here are {how.get(here, here)} "
                        f"(frames every {iv:g} ps), the model was trained on "
                        f"{how.get(trained, trained)}: its inputs differ from training")
    elif (here == "finite_difference" and trained_iv is not None
          # relative 1e-4: DCD/XTC time stamps in single precision (0.99999991 ps for 1 ps)
          # differ by far less, and the velocities by as little
          and abs(float(trained_iv) - iv) > 1e-4 * max(abs(iv), abs(float(trained_iv)))):
        warnings.append(f"{', '.join(paths)}: velocities are finite differences over this data's "
                        f"saved-frame interval {iv:g} ps, the model's were over "
                        f"{float(trained_iv):g} ps: they are not the velocities it was trained on")
    for w in warnings:
        log.warning("%s", w)
    return warnings


def _check_time_grid(sur: Surrogate, ds: WindowDataset, prepared, path: str, checkpoint
                     ) -> None:
    """The windows must carry the time offsets the model was trained on: its output grid and
    (history models) its history stride, as recorded in the checkpoint's protocol. The windows
    are cut by the recorded data config; a checkpoint whose data config and protocol disagree
    (edited, or from another version) would otherwise be scored at the wrong times."""
    where = (f"{path}: windows cut from frames every {prepared.interval_ps:g} ps (training data: "
             f"every {_trained_interval(sur)} ps) with {checkpoint}'s recorded data config")
    fix = ("; the model answers only at its trained times: if the data's interval differs "
           "from training, use data saved at the training interval, otherwise the checkpoint's "
           "data_config and protocol disagree: use the best.pt/last.pt its training run wrote")
    if len(ds.times_ps) != len(sur.times_ps) or not np.allclose(ds.times_ps, sur.times_ps,
                                                                 rtol=1e-6, atol=1e-9):
        raise DataError(f"{where} have outputs at {_ps_list(ds.times_ps)} ps, the model's "
                        f"trained grid is {_ps_list(sur.times_ps)} ps{fix}")
    stride = prepared.protocol.history_stride * prepared.interval_ps
    if sur.needs_history and abs(stride - sur.history_stride_ps) > 1e-6:
        raise DataError(f"{where} have history frames {stride:g} ps apart, the model's are "
                        f"{sur.history_stride_ps:g} ps apart{fix}")


def _grid_error(sur: Surrogate, checkpoint, info: dict[str, Any], exc: Exception,
                interval_is_the_cause: bool = True) -> ConfigError:
    """The data cannot be cut into the windows the checkpoint was trained on: say which file,
    its interval, and the checkpoint's time grid (the underlying messages speak of training
    configs)."""
    msg = (f"{info['path']}: frames saved every {info['interval_ps']:g} ps cannot be cut into "
           f"the windows of {checkpoint}, which jumps {sur.jump_ps:g} ps with outputs at "
           f"{_ps_list(sur.times_ps)} ps{_history_note(sur)} ({exc})")
    if interval_is_the_cause:
        msg += ("; every one of these times must be a whole number of saved frames and the "
                f"jump a whole number of output steps: evaluate on data saved every "
                f"{_trained_interval(sur)} ps (the training data's interval) or a divisor of it")
    return ConfigError(msg)


def _ps_list(times) -> str:
    return "[" + ", ".join(f"{float(t):g}" for t in times) + "]"


def _history_note(sur: Surrogate) -> str:
    if not sur.needs_history:
        return ""
    return f" and history frames {sur.history_stride_ps:g} ps apart"


def _trained_interval(sur: Surrogate) -> str:
    iv = sur.meta["protocol"].get("interval_ps")
    return "?" if iv is None else f"{float(iv):g}"


def _data_config_from_protocol(sur: Surrogate) -> dict[str, Any]:
    p = sur.meta["protocol"]
    return {"protocol": p.get("kind", "s2t"), "selection": sur.selection.name,
            "jump_ps": sur.jump_ps, "n_out": len(sur.times_ps), "history": sur.history_length,
            "history_stride_ps": sur.history_stride_ps}


def _check_noise_out(path: Path, transfer: bool, overwrite: bool) -> None:
    """Refuse a jump-noise output that cannot be written, or would replace one without
    ``overwrite``, before any work is done."""
    if transfer:
        raise ConfigError("--noise-out fits the residuals of the model's own atoms; with "
                          "--transfer the nodes are selected afresh in other data: fit it on "
                          "the training system's files without --transfer")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; --noise-out names a file (e.g. noise.npz)")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist; create it or "
                          "choose another --noise-out")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: already exists (a run using it would no longer resume if "
                          "it changed); pass --overwrite or choose another --noise-out")


def _fit_noise(sur: Surrogate, ends: list[tuple[np.ndarray, np.ndarray]], path, checkpoint,
               paths: list[str], split: str, max_components: int, revert: bool = False,
               size: bool = False
               ) -> dict[str, Any]:
    """Fit and save the :class:`~surrogate_md.noise.JumpNoise` of the scored windows' jump
    ends; returns what the metrics record of it."""
    pred = np.concatenate([p for p, _ in ends])
    target = np.concatenate([t for _, t in ends])
    noise = JumpNoise.fit(pred, target, sur.jump_ps, max_components=max_components, meta={
        "model": sur.name, "checkpoint": Path(str(checkpoint)).name,
        "checkpoint_hash": sur.checkpoint_hash, "data": [Path(p).name for p in paths],
        "split": split}, revert=revert, size=size)
    noise.save(path)
    m = noise.meta
    log.info("jump noise: %d windows, %d components holding %.1f %% of the residual variance, "
             "%.3g Å RMS per atom -> %s", m["windows"], m["components"],
             100 * m["captured_variance"], noise.rms_A, path)
    if noise.reversion is not None:
        log.info("jump noise: mean reversion per component %.2f to %.2f (mean %.2f); the draws "
                 "keep %.3g Å RMS per atom around the pull", m["reversion"]["min"],
                 m["reversion"]["max"], m["reversion"]["mean"], noise.rms_A)
    if noise.size is not None:
        log.info("jump noise: size model R_target = %.3g Å + %.3g R_pred (spread %.3g Å); the "
                 "model's ends average %.3g Å, the MD's %.3g Å", *noise.size,
                 m["size"]["predicted_mean_A"], m["size"]["target_mean_A"])
    return {"path": str(path), **noise.describe()}


@torch.no_grad()
def _window_errors(sur: Surrogate, ds: WindowDataset, protocol: str, batch_size: int,
                   ends: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Errors of the model and the floors on every window of ``ds``; with ``ends`` (a list),
    each batch's predicted and reference jump ends are appended to it, (B, n, 3) Å each.

    Beside the errors, how far each model moves the atoms: ``fmsd`` (Å² per atom), the squared
    distance of the jump's end from the input positions, and ``fmsd_md`` the MD's own (the
    constant model's F-MSE). A model far below the MD's motion is close to copying its input,
    whatever its error: at long jumps a mean-square fit learns that, and its jump ends then
    pass energy checks for the wrong reason. ``sized_copy_fmse``: the F-MSE of the input scaled
    about its centroid to the radius of gyration of the MD's jump end (an oracle: no model is
    told that size), the share of a model's gain over copying that size alone gives."""
    from torch.utils.data import DataLoader

    c = sur.selection.n_channels
    models = {sur.name: sur.model}
    for name in BASELINES:
        if name != sur.name:
            models[name] = build_model(name, {"n_channels": c}).to(sur.device).eval()
    sums = {name: M.ErrorSums() for name in models}
    moved = {name: M.ErrorSums() for name in models}
    md_moved, sized_copy = M.ErrorSums(), M.ErrorSums()
    times = ds.times_ps if protocol == "s2t" else ds.times_ps[-1:]
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate):
        batch = batch_to(batch, sur.device, sur.dtype)
        # s2s scores the jump's end, predicted on the trained output grid: a model with a
        # temporal convolution (EGNO) asked for the end time alone computes something else
        keep = slice(None) if protocol == "s2t" else slice(-1, None)
        for name, model in models.items():
            pred = model(batch)
            sums[name].add(pred[keep], batch[K.TARGET][keep])
            moved[name].add(pred[-1:], batch[K.POS][None])
            if ends is not None and name == sur.name:
                n_win = int(batch[K.N_GRAPHS])
                ends.append(tuple(x[-1].double().cpu().numpy().reshape(n_win, -1, 3)
                                  for x in (pred, batch[K.TARGET])))
        md_moved.add(batch[K.TARGET][-1:], batch[K.POS][None])
        n_win = int(batch[K.N_GRAPHS])
        sized_copy.add(_sized_to(batch[K.POS], batch[K.TARGET][-1], n_win)[None],
                       batch[K.TARGET][-1:])
    return {"times_ps": [float(t) for t in times],
            "fmsd_md": md_moved.fmse, "sized_copy_fmse": sized_copy.fmse,
            "models": {name: {"fmse": s.fmse, "amse": s.amse, "fmsd": moved[name].fmse,
                              "mse_per_time": s.mse_per_time.tolist()}
                       for name, s in sums.items()}}


def _sized_to(pos: torch.Tensor, target: torch.Tensor, n_windows: int) -> torch.Tensor:
    """``pos`` (N, C, 3) Å, ``n_windows`` windows of equal size one after another, each scaled
    about its centroid to the radius of gyration of its window in ``target`` (same shape)."""
    x = pos.double().cpu().numpy().reshape(n_windows, -1, 3)
    y = target.double().cpu().numpy().reshape(n_windows, -1, 3)
    c = x.mean(axis=1, keepdims=True)
    scale = radius_of_gyration(y) / np.maximum(radius_of_gyration(x), 1e-12)
    return torch.from_numpy((c + (x - c) * scale[:, None, None]).reshape(pos.shape)).to(
        pos.device)


def _rollouts(sur: Surrogate, ds: WindowDataset, prepared, rollout_jumps: int,
              n_rollouts: int) -> dict[str, Any]:
    if not sur.history_fits_grid():
        log.warning("rollouts skipped: %s cannot build its history from its own predictions "
                    "(history stride %g ps, output spacing %g ps)", sur.name,
                    sur.history_stride_ps, sur.times_ps[0])
        return {"skipped": f"the history stride ({sur.history_stride_ps:g} ps) is not a multiple "
                           f"of the output spacing ({sur.times_ps[0]:g} ps), so the model "
                           "cannot be rolled out on its own predictions"}
    p = prepared.protocol
    spacing = int(p.out_frames[0])
    room = np.array([(prepared.files[fi].n_frames - 1 - int(t0)) // p.jump_frames
                     for fi, t0 in ds.windows])
    n_jumps = int(min(rollout_jumps, room.max()))
    if n_jumps < 1:
        return {"skipped": "the trajectory is too short after the rollout starts"}
    notes = []
    if n_jumps < rollout_jumps:
        notes.append(f"rollouts limited to {n_jumps} of the {rollout_jumps} jumps asked for by "
                     "the trajectory length")
    fits = np.nonzero(room >= n_jumps)[0]  # windows with reference frames for every jump
    pick = fits[np.unique(np.linspace(0, len(fits) - 1, min(n_rollouts, len(fits))).astype(int))]
    if len(pick) < n_rollouts:
        notes.append(f"only {len(pick)} of the {n_rollouts} rollouts asked for: "
                     f"{len(fits)} window(s) have reference frames for all {n_jumps} jumps; "
                     "the rollout curves and validity measures average over fewer starts")
    for note in notes:
        log.warning("%s", note)
    n_frames = n_jumps * p.n_out
    atoms = sur.model_atoms
    pos, vel, hist, ref, starts = [], [], [], [], []
    for i in pick:
        item = ds[int(i)]
        fi, t0 = ds.windows[i]
        pos.append(item[K.POS].reshape(-1, 3))
        vel.append(item[K.VEL].reshape(-1, 3))
        if K.HIST in item:
            hist.append(item[K.HIST].reshape(len(item[K.HIST]), -1, 3))
        offsets = int(t0) + spacing * np.arange(1, n_frames + 1)
        ref.append(prepared.files[fi].read(offsets)[:, atoms])
        starts.append((str(prepared.files[fi].path), int(t0)))
    pos, vel, ref = np.stack(pos), np.stack(vel), np.stack(ref)  # (R, ...), ref (R, F, A, 3)
    frames, diverged = _guarded_rollout(sur, pos, vel, np.stack(hist) if hist else None,
                                        n_jumps)
    times = np.concatenate([k * sur.jump_ps + sur.times_ps for k in range(n_jumps)])
    t = times.reshape(1, -1, 1, 1)
    # a diverged rollout's frames are NaN from its bad jump on, and so is the mean there: its
    # error is unbounded, and a mean over the rollouts that survived would hide that
    curves = {sur.name: M.per_frame_sq_error(frames, ref).mean(0),
              "constant": M.per_frame_sq_error(np.broadcast_to(pos[:, None], ref.shape),
                                               ref).mean(0),
              "linear": M.per_frame_sq_error(pos[:, None] + vel[:, None] * t, ref).mean(0)}
    rollouts = []
    for r, ((path, t0), (jump, reason)) in enumerate(zip(starts, diverged)):
        at = None if jump is None else float(jump * sur.jump_ps)
        rollouts.append({"rollout": r + 1, "data": path, "start_frame": t0,
                         "diverged_at_jump": jump, "diverged_at_ps": at,
                         "divergence": None if jump is None else
                         f"diverged at jump {jump} ({at:g} ps): {reason}"})
    for r in rollouts:
        if r["divergence"]:
            log.warning("rollout %d (%s, start frame %d): %s", r["rollout"], r["data"],
                        r["start_frame"], r["divergence"])
    result = {"n_rollouts": int(len(pick)), "n_jumps": int(n_jumps),
              "n_rollouts_requested": int(n_rollouts), "n_jumps_requested": int(rollout_jumps),
              "warnings": notes,
              "times_ps": times.tolist(),
              "mse_vs_time": {k: v.tolist() for k, v in curves.items()},
              "n_diverged": sum(j is not None for j, _ in diverged), "rollouts": rollouts}
    pred = frames.reshape(-1, len(atoms), 3)
    finite = np.isfinite(pred).all(axis=(1, 2))
    if finite.any():
        result["validity"] = _validity(sur, prepared, pred[finite], ref.reshape(-1, len(atoms), 3))
    else:
        result["validity"] = {"skipped": "every rollout diverged in its first jump"}
    return result


def _guarded_rollout(sur: Surrogate, pos: np.ndarray, vel: np.ndarray, hist: np.ndarray | None,
                     n_jumps: int) -> tuple[np.ndarray, list[tuple[int | None, str]]]:
    """Roll out R states (R, A, 3), cutting each rollout at the first jump whose end state is
    non-finite or refused by the model as its next input (DataError).

    Returns:
        frames (R, n_jumps * P, A, 3) Å, NaN from a diverged rollout's bad jump on; and per
        rollout (the bad jump, 1-based, or None; why).
    Raises:
        DataError: the model refuses a rollout's first input (the reference frame): that is a
        problem of the data, not a divergence.
    """
    n_out = len(sur.times_ps)
    try:
        frames, _ = sur.rollout(pos, vel, hist, n_jumps=n_jumps)
        ran = [(f, n_jumps, "") for f in frames]
    except DataError:  # which rollout and which jump? one at a time, bisecting the jumps
        ran = [_longest_rollout(sur, pos[r:r + 1], vel[r:r + 1],
                                None if hist is None else hist[r:r + 1], n_jumps)
               for r in range(len(pos))]
    out = np.full((len(pos), n_jumps * n_out) + pos.shape[1:], np.nan)
    diverged: list[tuple[int | None, str]] = []
    for r, (f, done, refused) in enumerate(ran):
        finite = np.isfinite(f.reshape(done, -1)).all(axis=1)  # per jump
        if not finite.all():
            bad, why = int(np.argmin(finite)) + 1, "non-finite positions"
        elif done < n_jumps:  # jump done + 1 refused its input, the end state of jump done
            bad, why = done, f"the model refused its end state as the next input ({refused})"
        else:
            bad, why = None, ""
        keep = n_jumps if bad is None else bad - 1
        out[r, :keep * n_out] = f[:keep * n_out]
        diverged.append((bad, why))
    return out, diverged


def _longest_rollout(sur: Surrogate, pos: np.ndarray, vel: np.ndarray, hist: np.ndarray | None,
                     n_jumps: int) -> tuple[np.ndarray, int, str]:
    """(frames (k * P, A, 3), k, the refusal) of the longest rollout of one state (1, A, 3) the
    model accepts every input of, k <= n_jumps. Jumps are deterministic, so a rollout of k
    jumps is the first k jumps of a longer one and the longest one is found by bisection."""

    def attempt(k: int) -> np.ndarray | DataError:
        try:
            return sur.rollout(pos, vel, hist, n_jumps=k)[0][0]
        except DataError as exc:
            return exc

    first = attempt(1)
    if isinstance(first, DataError):
        raise first  # the first input is the reference frame, not a prediction
    best, good, bad = first, 1, n_jumps + 1
    refused = ""
    while bad - good > 1:
        k = (good + bad) // 2 if bad <= n_jumps else n_jumps
        got = attempt(k)
        if isinstance(got, DataError):
            bad, refused = k, str(got)
        else:
            best, good = got, k
    return best, good, refused


def _spread(values: np.ndarray, limit: int = 20000) -> list[float]:
    """At most ``limit`` of ``values`` (frames, n) for the plots: whole frames evenly spaced over
    all of them (rollout-major frames: every rollout, early and late)."""
    values = np.asarray(values).reshape(len(values), -1)
    per_frame = max(values.shape[1], 1)
    if values.size > limit:
        keep = np.unique(np.linspace(0, len(values) - 1, max(1, limit // per_frame)).astype(int))
        values = values[keep]
    return values.ravel().tolist()


def _frame_sample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``limit`` of ``n`` frames: all of them, or a seeded random
    subset. Rollout frames run jump by jump, P to a jump, and a fixed stride that is a multiple
    of P would pick the same output time of every jump (never its end, the state fed back)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _validity(sur: Surrogate, prepared, pred: np.ndarray, ref: np.ndarray,
              max_frames: int = 40, clash_frames: int = 2000) -> dict[str, Any]:
    """Physical validity of predicted frames vs reference frames ((F, atoms, 3) Å each; the
    counts may differ: frames of diverged rollouts are left out of ``pred``).

    Bond lengths, chain breaks and torsions are measured on every frame, clashes on up to
    ``clash_frames`` frames and h(r) on up to ``max_frames`` (all of them, or a seeded random
    subset of the frames, see :func:`_frame_sample`)."""
    v = sur.validity
    out: dict[str, Any] = {}
    sub = prepared.topology.subset(sur.model_atoms)
    bonds = v.bonds if v is not None else sub.bonds
    if len(bonds):
        from surrogate_md.validity import bond_lengths

        mean = v.bond_length_mean_A if v is not None else bond_lengths(ref, bonds).mean(0)
        dev_pred = np.abs(bond_lengths(pred, bonds) - mean)
        dev_ref = np.abs(bond_lengths(ref, bonds) - mean)
        out["bond_deviation_A"] = {
            "model_mean": float(dev_pred.mean()), "model_max": float(dev_pred.max()),
            "reference_mean": float(dev_ref.mean()), "reference_max": float(dev_ref.max()),
            "collapsed_fraction": float((dev_pred.max(1) > COLLAPSE_A).mean()),
            "collapse_threshold_A": COLLAPSE_A,
            "tolerance_A": None if v is None else v.bond_tolerance_A,
            "model_values": _spread(dev_pred), "reference_values": _spread(dev_ref)}
    pred_s = pred[_frame_sample(len(pred), max_frames)]
    ref_s = ref[_frame_sample(len(ref), max_frames)]
    excluded = excluded_pairs(bonds, pred.shape[-2])
    dmin_pred = np.array([min_nonbonded_distance(f, bonds, excluded=excluded)
                          for f in pred[_frame_sample(len(pred), clash_frames)]])
    dmin_ref = np.array([min_nonbonded_distance(f, bonds, excluded=excluded)
                         for f in ref[_frame_sample(len(ref), clash_frames)]])
    threshold = v.min_distance_A if v is not None else 0.0
    out["min_nonbonded_distance_A"] = {
        "model_min": float(dmin_pred.min()), "reference_min": float(dmin_ref.min()),
        "clash_threshold_A": threshold,
        "model_clash_fraction": float((dmin_pred < threshold).mean()),
        "reference_clash_fraction": float((dmin_ref < threshold).mean()),
        "model_frames_checked": int(len(dmin_pred)),
        "reference_frames_checked": int(len(dmin_ref))}
    ca = M.consecutive_ca_pairs(prepared.topology, sur.model_atoms)
    if len(ca) >= 2:
        out["chain_breaks"] = {
            "threshold_A": CHAIN_BREAK_A,
            "model_frames_with_break": float((M.chain_breaks(pred, ca, CHAIN_BREAK_A) > 0).mean()),
            "reference_frames_with_break": float(
                (M.chain_breaks(ref, ca, CHAIN_BREAK_A) > 0).mean())}
    # the frames the guards' size check would fail (compacted or swollen)
    out["radius_of_gyration_A"] = gyration_summary(
        pred, ref, None if v is None else v.gyration_range_A)
    max_A = 20.0
    bins = np.linspace(0.0, max_A, 201)
    beyond_pred = M.fraction_pairs_beyond(pred_s, max_A)
    beyond_ref = M.fraction_pairs_beyond(ref_s, max_A)
    out["distance_histogram"] = {
        "mae": float(np.abs(M.distance_histogram(pred_s, bins)
                            - M.distance_histogram(ref_s, bins)).mean()),
        "bin_width_A": 0.1, "max_A": max_A,
        # the MAE compares h(r) inside max_A only (see M.distance_histogram): the pairs it
        # drops tell a structure that blew apart
        "model_fraction_beyond_max": beyond_pred, "reference_fraction_beyond_max": beyond_ref,
        "fraction_beyond_max_difference": beyond_pred - beyond_ref}
    quads = M.backbone_torsion_atoms(prepared.topology, sur.model_atoms)
    if len(quads["phi"]) and len(quads["psi"]):
        pairs = [(a, b) for a, qa in enumerate(quads["phi"].tolist())
                 for b, qb in enumerate(quads["psi"].tolist()) if tuple(qa[1:3]) == tuple(qb[:2])]
        if pairs:
            ia, ib = np.array(pairs).T
            phi_p, psi_p = (M.torsions(pred, quads["phi"])[:, ia],
                            M.torsions(pred, quads["psi"])[:, ib])
            phi_r, psi_r = M.torsions(ref, quads["phi"])[:, ia], M.torsions(ref, quads["psi"])[:, ib]
            half = len(ref) // 2
            # a floor for the above: two samples of the same MD differ by this much when the
            # sample is short (first vs second half of the reference frames); None when the
            # halves are too small to be samples at all
            floor = (_torsion_js(phi_r[:half], psi_r[:half], phi_r[half:], psi_r[half:])
                     if half >= TORSION_FLOOR_MIN_FRAMES else None)
            out["torsions"] = {
                "n_residues": int(len(pairs)), **_torsion_js(phi_p, psi_p, phi_r, psi_r),
                "reference_split_half": floor, "reference_frames": int(len(ref)),
                "floor_min_frames": 2 * TORSION_FLOOR_MIN_FRAMES,
                "model_phi": _spread(phi_p), "model_psi": _spread(psi_p),
                "reference_phi": _spread(phi_r), "reference_psi": _spread(psi_r)}
    return out


def _torsion_js(phi_a: np.ndarray, psi_a: np.ndarray, phi_b: np.ndarray, psi_b: np.ndarray
                ) -> dict[str, float]:
    """Jensen-Shannon divergences (nats) of two (phi, psi) samples, degrees (frames, residues)."""
    def hist1(x: np.ndarray) -> np.ndarray:
        return np.histogram(x, 36, (-180, 180))[0]

    return {"js_phi_psi": M.js_divergence(M.torsion_histogram(phi_a, psi_a),
                                          M.torsion_histogram(phi_b, psi_b)),
            "js_phi": M.js_divergence(hist1(phi_a), hist1(phi_b)),
            "js_psi": M.js_divergence(hist1(psi_a), hist1(psi_b))}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
