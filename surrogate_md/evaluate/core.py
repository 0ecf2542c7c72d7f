"""Evaluate a checkpoint on a dataset: errors, rollouts and physical validity, with baselines.

Windows are cut exactly as in training (the checkpoint records its data config and seed), so
``split="test"`` on the training file is the held-out test split. The ``constant`` and
``linear`` floors are always evaluated on the same windows.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surrogate_md import metrics as M
from surrogate_md.data import keys as K
from surrogate_md.data.windows import WindowDataset, batch_to
from surrogate_md.errors import ConfigError, DataError
from surrogate_md.fileio import atomic_write_text
from surrogate_md.models import build_model
from surrogate_md.surrogate import Surrogate
from surrogate_md.train.config import data_config_from_dict
from surrogate_md.train.data import prepare_data
from surrogate_md.validity import excluded_pairs, min_nonbonded_distance

log = logging.getLogger(__name__)

BASELINES = ("constant", "linear")
SPLITS = ("test", "val", "train", "all")
PROTOCOLS = ("s2t", "s2s")
COLLAPSE_A = 0.5  # bond-length deviation (Å) that counts as a collapsed/broken frame
CHAIN_BREAK_A = 4.5  # CA-CA(i, i+1) distance (Å) that counts as a chain break


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike | list, out_dir:
             str | os.PathLike, *, split: str = "test", protocol: str = "s2t",
             rollout_jumps: int = 10, n_rollouts: int = 4, batch_size: int = 32,
             device: str = "auto", max_windows: int | None = None,
             overwrite: bool = False, plots: bool = True, transfer: bool = False
             ) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data`` and write ``report.md``, ``metrics.json`` and PNGs.

    Args:
        checkpoint: ``best.pt``/``last.pt``.
        data: dataset file(s) of the system the model was trained on.
        out_dir: output directory (created; existing reports are refused unless ``overwrite``).
        split: windows to score: ``test`` | ``val`` | ``train`` (cut as in training) or ``all``.
        protocol: ``s2t`` (the trained output grid, F-MSE and A-MSE) or ``s2s`` (only the end of
            the jump, taken from the prediction on the trained grid).
        rollout_jumps: jumps per rollout (0 = no rollout); limited by the trajectory length.
        n_rollouts: rollouts started from windows spread over the split.
        max_windows: score at most this many windows (evenly spaced) of the split.
        transfer: ``data`` holds another system, or the same molecule in another force field or
            atom order (e.g. AdK from CHARMM files for a model trained on Amber MD): the model's
            nodes and graph are selected afresh in ``data`` by the training recipe, without the
            atom-by-atom check, and only one-jump errors are scored (no rollouts).

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
    out = Path(out_dir)
    if (out / "report.md").exists() and not overwrite:
        raise ConfigError(f"{out}: already holds a report; pass --overwrite or choose another "
                          "--out")
    sur = Surrogate.load(checkpoint, device=device)
    prov = sur.meta.get("provenance", {})
    paths = [str(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    dc = dict(prov.get("data_config") or _data_config_from_protocol(sur))
    dc["path"] = paths
    seed = int(prov.get("run_config", {}).get("train", {}).get("data_seed", 0))
    prepared = prepare_data(data_config_from_dict(dc, str(checkpoint)), seed=seed)
    try:
        if transfer:
            selection, graph, rollout_jumps = prepared.selection, prepared.graph, 0
            trained_v = sur.meta["protocol"].get("velocity_source")
            if trained_v and trained_v != prepared.velocity_source:
                log.warning("%s: velocities here are %s, the model was trained on %s velocities",
                            paths[0], prepared.velocity_source, trained_v)
        else:
            sur.check_atomic_numbers(prepared.topology.atomic_numbers,
                                     prepared.topology.atom_names)
            selection, graph = sur.selection, sur.graph
        if abs(prepared.protocol.jump_frames * prepared.interval_ps - sur.jump_ps) > 1e-6:
            raise DataError(f"{paths[0]}: the jump cut from this file differs from the "
                            f"checkpoint's {sur.jump_ps} ps")
        windows = (np.concatenate([prepared.windows[k] for k in ("train", "val", "test")])
                   if split == "all" else prepared.windows[split])
        if max_windows is not None and len(windows) > max_windows:
            windows = windows[np.linspace(0, len(windows) - 1, max_windows).astype(int)]
        if len(windows) == 0:
            raise DataError(f"{paths[0]}: the {split} split has no windows; use --split all or "
                            "a longer trajectory")
        ds = WindowDataset(prepared.files, windows, prepared.protocol, selection, graph)
        result: dict[str, Any] = {
            "checkpoint": str(checkpoint), "checkpoint_hash": sur.checkpoint_hash,
            "model": sur.name, "data": paths, "split": split, "protocol": protocol,
            "transfer": transfer, "n_nodes": int(selection.n_nodes),
            "velocity_source": prepared.velocity_source,
            "n_windows": int(len(windows)), "jump_ps": sur.jump_ps,
            "metric_definition": M.METRIC_DEFINITION,
            "training_metrics": sur.meta.get("metrics", {}),
        }
        result["errors"] = _window_errors(sur, ds, protocol, batch_size)
        if rollout_jumps:
            result["rollout"] = _rollouts(sur, ds, prepared, rollout_jumps, n_rollouts)
    finally:
        prepared.close()
    from surrogate_md.evaluate.report import write_plots, write_report

    out.mkdir(parents=True, exist_ok=True)  # only now: a failed evaluation leaves no directory
    if plots:
        result["plots"] = write_plots(result, out)
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(result), indent=2) + "\n")
    write_report(result, out / "report.md")
    log.info("evaluation written to %s", out)
    return result


def _data_config_from_protocol(sur: Surrogate) -> dict[str, Any]:
    p = sur.meta["protocol"]
    return {"protocol": p.get("kind", "s2t"), "selection": sur.selection.name,
            "jump_ps": sur.jump_ps, "n_out": len(sur.times_ps), "history": sur.history_length,
            "history_stride_ps": sur.history_stride_ps}


@torch.no_grad()
def _window_errors(sur: Surrogate, ds: WindowDataset, protocol: str, batch_size: int
                   ) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    c = sur.selection.n_channels
    models = {sur.name: sur.model}
    for name in BASELINES:
        if name != sur.name:
            models[name] = build_model(name, {"n_channels": c}).to(sur.device).eval()
    sums = {name: M.ErrorSums() for name in models}
    times = ds.times_ps if protocol == "s2t" else ds.times_ps[-1:]
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate):
        batch = batch_to(batch, sur.device, sur.dtype)
        # s2s scores the jump's end, predicted on the trained output grid: a model with a
        # temporal convolution (EGNO) asked for the end time alone computes something else
        keep = slice(None) if protocol == "s2t" else slice(-1, None)
        for name, model in models.items():
            sums[name].add(model(batch)[keep], batch[K.TARGET][keep])
    return {"times_ps": [float(t) for t in times],
            "models": {name: {"fmse": s.fmse, "amse": s.amse,
                              "mse_per_time": s.mse_per_time.tolist()}
                       for name, s in sums.items()}}


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
    if n_jumps < rollout_jumps:
        log.warning("rollouts limited to %d jumps by the trajectory length", n_jumps)
    fits = np.nonzero(room >= n_jumps)[0]  # windows with reference frames for every jump
    pick = fits[np.unique(np.linspace(0, len(fits) - 1, min(n_rollouts, len(fits))).astype(int))]
    n_frames = n_jumps * p.n_out
    atoms = sur.model_atoms
    pos, vel, hist, ref = [], [], [], []
    for i in pick:
        item = ds[int(i)]
        fi, t0 = ds.windows[i]
        pos.append(item[K.POS].reshape(-1, 3))
        vel.append(item[K.VEL].reshape(-1, 3))
        if K.HIST in item:
            hist.append(item[K.HIST].reshape(len(item[K.HIST]), -1, 3))
        offsets = int(t0) + spacing * np.arange(1, n_frames + 1)
        ref.append(prepared.files[fi].read(offsets)[:, atoms])
    pos, vel, ref = np.stack(pos), np.stack(vel), np.stack(ref)  # (R, ...), ref (R, F, A, 3)
    frames, times = sur.rollout(pos, vel, np.stack(hist) if hist else None, n_jumps=n_jumps)
    t = times.reshape(1, -1, 1, 1)
    curves = {sur.name: M.per_frame_sq_error(frames, ref).mean(0),
              "constant": M.per_frame_sq_error(np.broadcast_to(pos[:, None], ref.shape),
                                               ref).mean(0),
              "linear": M.per_frame_sq_error(pos[:, None] + vel[:, None] * t, ref).mean(0)}
    result = {"n_rollouts": int(len(pick)), "n_jumps": int(n_jumps),
              "times_ps": times.tolist(),
              "mse_vs_time": {k: v.tolist() for k, v in curves.items()}}
    result["validity"] = _validity(sur, prepared, frames.reshape(-1, len(atoms), 3),
                                   ref.reshape(-1, len(atoms), 3))
    return result


def _validity(sur: Surrogate, prepared, pred: np.ndarray, ref: np.ndarray,
              max_frames: int = 40) -> dict[str, Any]:
    """Physical validity of predicted frames vs reference frames (both (F, atoms, 3) Å)."""
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
            "tolerance_A": None if v is None else v.bond_tolerance_A,
            "model_values": dev_pred.ravel()[:20000].tolist(),
            "reference_values": dev_ref.ravel()[:20000].tolist()}
    step = max(1, len(pred) // max_frames)
    excluded = excluded_pairs(bonds, pred.shape[-2])
    dmin_pred = np.array([min_nonbonded_distance(f, bonds, excluded=excluded)
                          for f in pred[::step]])
    dmin_ref = np.array([min_nonbonded_distance(f, bonds, excluded=excluded)
                         for f in ref[::step]])
    threshold = v.min_distance_A if v is not None else 0.0
    out["min_nonbonded_distance_A"] = {
        "model_min": float(dmin_pred.min()), "reference_min": float(dmin_ref.min()),
        "clash_threshold_A": threshold,
        "model_clash_fraction": float((dmin_pred < threshold).mean()),
        "reference_clash_fraction": float((dmin_ref < threshold).mean())}
    ca = M.consecutive_ca_pairs(prepared.topology, sur.model_atoms)
    if len(ca) >= 2:
        out["chain_breaks"] = {
            "threshold_A": CHAIN_BREAK_A,
            "model_frames_with_break": float((M.chain_breaks(pred, ca, CHAIN_BREAK_A) > 0).mean()),
            "reference_frames_with_break": float(
                (M.chain_breaks(ref, ca, CHAIN_BREAK_A) > 0).mean())}
    bins = np.linspace(0.0, 20.0, 201)
    h_pred = M.distance_histogram(pred[::step], bins)
    h_ref = M.distance_histogram(ref[::step], bins)
    out["distance_histogram"] = {"mae": float(np.abs(h_pred - h_ref).mean()),
                                 "bin_width_A": 0.1, "max_A": 20.0}
    quads = M.backbone_torsion_atoms(prepared.topology, sur.model_atoms)
    if len(quads["phi"]) and len(quads["psi"]):
        res_phi = {tuple(q[1:3]) for q in quads["phi"].tolist()}
        pairs = [(a, b) for a, qa in enumerate(quads["phi"].tolist())
                 for b, qb in enumerate(quads["psi"].tolist()) if tuple(qa[1:3]) == tuple(qb[:2])]
        if pairs and res_phi:
            ia, ib = np.array(pairs).T
            phi_p, psi_p = (M.torsions(pred, quads["phi"])[:, ia],
                            M.torsions(pred, quads["psi"])[:, ib])
            phi_r, psi_r = M.torsions(ref, quads["phi"])[:, ia], M.torsions(ref, quads["psi"])[:, ib]
            out["torsions"] = {
                "n_residues": int(len(pairs)),
                "js_phi_psi": M.js_divergence(M.torsion_histogram(phi_p, psi_p),
                                              M.torsion_histogram(phi_r, psi_r)),
                "js_phi": M.js_divergence(np.histogram(phi_p, 36, (-180, 180))[0],
                                          np.histogram(phi_r, 36, (-180, 180))[0]),
                "js_psi": M.js_divergence(np.histogram(psi_p, 36, (-180, 180))[0],
                                          np.histogram(psi_r, 36, (-180, 180))[0]),
                "model_phi": phi_p.ravel()[:20000].tolist(),
                "model_psi": psi_p.ravel()[:20000].tolist(),
                "reference_phi": phi_r.ravel()[:20000].tolist(),
                "reference_psi": psi_r.ravel()[:20000].tolist()}
    return out


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
