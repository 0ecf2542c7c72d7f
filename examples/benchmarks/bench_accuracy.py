"""One-jump accuracy of every model on one system and protocol: F-MSE and A-MSE over seeds.

Systems and protocols (the templates are the example configs in ``examples/configs``):

- MD17 molecules (``--system aspirin|ethanol|malonaldehyde|uracil``; template
  ``MODEL_aspirin.yaml``): heavy atoms, bonds < 1.6 Å in the first frame plus two-hop edges,
  jump 1.5 ps (3000 frames of 0.5 fs), P = 8, ``--split paper`` (500/2000/2000 start frames,
  10000-frame margins) or ``blocked``. ESTAG runs the history protocol (10 frames, 5 fs apart)
  with the same jump and P, so its row is comparable (the floors on its windows are listed too);
- alanine dipeptide (``--system alanine-dipeptide``, vacuum or ``--solvent implicit``; template
  ``MODEL_alanine_dipeptide.yaml``): all atoms, topology bonds + two-hop, jump 1 ps, P = 5,
  blocked split; ESTAG on the history protocol (10 frames, 0.1 ps apart).
- adenylate kinase (``--system adk``, implicit solvent; ``--protocol backbone``: EGNO's, backbone
  atoms, 8 Å radius graph, P = 4, template ``MODEL_adk_backbone.yaml``; ``--protocol residues``:
  ESTAG's, one 4-channel node (N, CA, C, O) per residue, 6 Å CA graph, template
  ``MODEL_adk_residues.yaml``); blocked split. The papers jump 3.6 ns over microseconds of MD;
  on the 150 ps that a CPU makes here the defaults are a 4 ps jump (backbone) and a 1 ps jump
  (residues), with history frames 1 ps apart. ``--transfer FILE.h5`` also scores every trained
  model on another AdK trajectory with the nodes selected afresh (``--transfer mdanalysistests``:
  the CHARMM AdK PSF/DCD that ship with MDAnalysisTests, ingested here: 98 frames 1 ps apart of a
  biased (DIMS) closed-to-open transition, not equilibrium MD, and without velocities, so the S2T
  models see finite-difference velocities over 1 ps there).

Data: ``--data FILE.h5`` (any canonical dataset of that system, e.g. the real MD17 trajectory
ingested with ``python -m datagen ingest``), else MD generated here with ``datagen`` at the
system's built-in conditions (MD17: 500 K, 0.5 fs, Nosé–Hoover, every step saved) and cached in
``--data-dir``.

Seeds: run ``s`` of ``--seeds N`` sets ``train.model_seed = train.train_seed = s`` and keeps
``data_seed = 0``, so every seed is scored on the same test windows and the spread is that of
initialisation and shuffling. ``constant`` and ``linear`` have no parameters and run once.
Errors are Å² per atom (squared distance summed over x, y, z, averaged over atoms), as in the
EGNO and PAINET tables; ESTAG's paper averages over coordinates too (3x smaller).

Usage::

    python examples/benchmarks/bench_accuracy.py --system aspirin --epochs 20 --seeds 3 \
        --json accuracy_aspirin.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import (
    ADK_DEFAULTS,
    ADK_MD,
    clean_errors,
    command_line,
    fmt,
    fmt_pm,
    machine,
    machine_table,
    markdown_table,
    mean_std,
    relative_path,
    require_files,
    save_figure,
    save_json,
    setup_logging,
)

log = logging.getLogger("bench_accuracy")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MD17 = ("aspirin", "ethanol", "malonaldehyde", "uracil")
SYSTEMS = (*MD17, "alanine-dipeptide", "adk")
#: benchmark variants: label -> (registered model, option overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "constant": ("constant", {}),
    "linear": ("linear", {}),
    "egnn": ("egnn", {}),
    "egno": ("egno", {}),
    "egno-noconv": ("egno", {"temporal_conv": False}),
    "estag": ("estag", {}),
    "painet": ("painet", {}),
}
BASELINES = ("constant", "linear")


def template(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The example config of ``model`` for this system's protocol."""
    stem = ("aspirin" if args.system in MD17 else f"adk_{args.protocol}" if args.system == "adk"
            else "alanine_dipeptide")
    return yaml.safe_load((CONFIGS / f"{model}_{stem}.yaml").read_text())


def dataset(args: argparse.Namespace) -> Path:
    """``--data``, or cached datagen MD of ``--system``."""
    if args.data:
        return Path(args.data)
    from datagen.openmm_md import run_openmm

    if args.system == "adk":
        path = Path(args.data_dir) / f"adk-implicit-hmr-{args.frames}f-seed0.h5"
        options = dict(ADK_MD)
    else:
        solvent = args.solvent if args.system == "alanine-dipeptide" else "vacuum"
        path = Path(args.data_dir) / f"{args.system}-{solvent}-{args.frames}f-seed0.h5"
        options = {"solvent": solvent}
    if not path.exists():
        log.info("generating %d frames of %s MD -> %s", args.frames, args.system, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        run_openmm(args.system, path, frames=args.frames, seed=0, progress=args.progress,
                   **options)
    return path


def mdanalysis_adk(data_dir: str) -> Path:
    """The AdK PSF/DCD of MDAnalysisTests as a dataset file: CHARMM, 98 frames 1 ps apart of a
    biased (DIMS) closed-to-open transition, no velocities (finite differences are used)."""
    try:
        from MDAnalysisTests.datafiles import DCD, PSF
    except ImportError as exc:
        raise SystemExit("--transfer mdanalysistests needs the MDAnalysisTests package: "
                         "pip install MDAnalysisTests") from exc
    from datagen.ingest import ingest

    path = Path(data_dir) / "adk-mdanalysistests.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ingest([PSF, DCD], path, progress=False)
    return path


def run_config(args: argparse.Namespace, label: str, data: Path, seed: int) -> dict[str, Any]:
    """The training config of one variant and seed."""
    model, options = VARIANTS[label]
    cfg = template(args, model)
    s2t = template(args, "egno")["data"]  # every row: the S2T rows' jump and P
    cfg["data"]["path"] = str(data)
    cfg["data"]["jump_ps"] = args.jump_ps or s2t["jump_ps"]
    cfg["data"]["n_out"] = args.n_out or s2t["n_out"]
    cfg["data"]["split"] = args.split
    cfg["data"]["velocities"] = args.velocities
    if args.split == "paper":
        cfg["data"]["counts"] = list(args.counts)
        cfg["data"]["margin_frames"] = args.margin_frames
    else:
        cfg["data"].pop("counts", None)
        if args.fractions:
            cfg["data"]["fractions"] = list(args.fractions)
    if cfg["data"].get("protocol") == "history":
        if args.history_stride_ps:
            cfg["data"]["history_stride_ps"] = args.history_stride_ps
        if args.history:
            cfg["data"]["history"] = args.history
            cfg["model"]["n_history"] = args.history
    cfg["model"].update(options)
    if args.hidden and model not in BASELINES:
        cfg["model"]["hidden"] = args.hidden
    if args.layers and model in ("egnn", "egno", "estag"):
        cfg["model"]["n_layers"] = args.layers
    cfg["train"].update({"epochs": 1 if model in BASELINES else args.epochs,
                         "max_steps_per_epoch": args.max_steps_per_epoch,
                         "patience": 0, "model_seed": seed, "train_seed": seed, "data_seed": 0})
    if args.batch_size:
        cfg["train"]["batch_size"] = args.batch_size
    cfg["runtime"].update({"device": args.device, "progress": args.progress,
                           "log_every": 10_000, "precision": args.precision})
    return cfg


def run_one(args: argparse.Namespace, label: str, data: Path, seed: int) -> dict[str, Any]:
    """Train one variant with one seed and evaluate it on the test split."""
    from surrogate_md.evaluate import evaluate
    from surrogate_md.train import train

    cfg = run_config(args, label, data, seed)
    variant = (f"-{args.protocol}" if args.system == "adk" else
               f"-{args.solvent}" if args.system == "alanine-dipeptide" else "")
    out = Path(args.out_dir) / f"{args.system}{variant}-{label}-seed{seed}"
    start = time.perf_counter()
    best = train(cfg, out / "train", overwrite=True)
    train_s = time.perf_counter() - start
    jumps = args.rollout_jumps if seed == 0 else 0
    metrics = evaluate(best, data, out / "evaluate", rollout_jumps=jumps, n_rollouts=4,
                       overwrite=True, device=args.device, max_windows=args.eval_windows,
                       plots=False)
    errors = metrics["errors"]["models"]
    name = metrics["model"]
    transfer = None
    if args.transfer:
        moved = evaluate(best, args.transfer, out / "transfer", split="all", overwrite=True,
                         device=args.device, max_windows=args.eval_windows, plots=False,
                         transfer=True)
        transfer = {k: {"fmse": v["fmse"], "amse": v["amse"]}
                    for k, v in moved["errors"]["models"].items()}
        transfer["n_windows"] = moved["n_windows"]
        transfer["velocity_source"] = moved["velocity_source"]
    rollout = metrics.get("rollout") or {}
    if "mse_vs_time" in rollout:
        rollout = {"n_rollouts": rollout["n_rollouts"], "n_jumps": rollout["n_jumps"],
                   "times_ps": rollout["times_ps"], "mse_vs_time": rollout["mse_vs_time"],
                   "model": name}
    elif jumps:
        log.warning("%s seed %d: no rollout (%s)", label, seed, rollout.get("skipped", "none"))
    return {"transfer": transfer, "rollout": rollout if "mse_vs_time" in rollout else None,
            "label": label, "seed": seed, "protocol": cfg["data"]["protocol"],
            "history": cfg["data"].get("history", 1),
            "history_stride_ps": cfg["data"].get("history_stride_ps"),
            "jump_ps": metrics["jump_ps"], "n_out": len(metrics["errors"]["times_ps"]),
            "n_test_windows": metrics["n_windows"], "fmse": errors[name]["fmse"],
            "amse": errors[name]["amse"], "train_s": train_s,
            "floors": {b: {"fmse": errors[b]["fmse"], "amse": errors[b]["amse"]}
                       for b in BASELINES if b in errors}}


@clean_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI)")
    parser.add_argument("--system", default="aspirin", choices=SYSTEMS)
    parser.add_argument("--data", default=None, help="dataset file of --system (else datagen)")
    parser.add_argument("--solvent", default="vacuum", choices=["vacuum", "implicit"],
                        help="alanine dipeptide only")
    parser.add_argument("--protocol", default="backbone", choices=list(ADK_DEFAULTS),
                        help="AdK only: EGNO's backbone S2T or ESTAG's 4-channel residues")
    parser.add_argument("--transfer", default=None,
                        help="also score every model on this dataset of the same system "
                             "(nodes selected afresh); 'mdanalysistests': MDAnalysisTests' AdK")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames of generated MD (MD17: 30000 = 15 ps; alanine: 5000)")
    parser.add_argument("--data-dir", default="bench_data")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--split", default=None, choices=["paper", "blocked"],
                        help="default: paper for MD17, blocked for alanine dipeptide")
    parser.add_argument("--counts", nargs=3, type=int, default=[500, 2000, 2000],
                        help="paper split windows (train, val, test)")
    parser.add_argument("--margin-frames", type=int, default=10000)
    parser.add_argument("--fractions", nargs=3, type=float, default=None,
                        help="blocked split fractions (train, val, test); default: the "
                             "template's 0.8 0.1 0.1")
    parser.add_argument("--velocities", default="auto", choices=["auto", "file", "difference"],
                        help="input velocities (data.velocities): stored ones where the data has "
                             "them (auto), or finite differences over one saved frame as real "
                             "MD17 npz files give (difference)")
    parser.add_argument("--jump-ps", type=float, default=None, help="override the jump (ps)")
    parser.add_argument("--n-out", type=int, default=None, help="override P")
    parser.add_argument("--history-stride-ps", type=float, default=None)
    parser.add_argument("--history", type=int, default=None, help="override past frames")
    parser.add_argument("--rollout-jumps", type=int, default=0,
                        help="also roll seed 0 of every model out this many jumps from 4 test "
                             "windows: error vs time, table and plot (--plot)")
    parser.add_argument("--plot", default=None, help="PNG of the rollout error curves")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--max-steps-per-epoch", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None, help="override model width")
    parser.add_argument("--layers", type=int, default=None, help="override n_layers")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="score at most this many test windows")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="training precision (runtime.precision; evaluation runs fp32)")
    parser.add_argument("--out-dir", default="bench_runs/accuracy")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    setup_logging()
    require_files(data=args.data,
                  transfer=None if args.transfer in (None, "mdanalysistests") else args.transfer)
    md17, adk = args.system in MD17, args.system == "adk"
    if adk:
        if args.quick:  # MDAnalysisTests' AdK: 98 frames, 1 ps apart
            jump, n_out, stride = 2.0, 2, 1.0
            args.history = args.history or 3
        else:
            jump, n_out, stride = ADK_DEFAULTS[args.protocol]
        args.jump_ps, args.n_out = args.jump_ps or jump, args.n_out or n_out
        args.history_stride_ps = args.history_stride_ps or stride
        if args.transfer == "mdanalysistests":
            args.transfer = str(mdanalysis_adk(args.data_dir))
        if args.quick and not args.data:
            args.data = str(mdanalysis_adk(args.data_dir))
    elif args.transfer == "mdanalysistests":
        parser.error("--transfer mdanalysistests holds AdK: use it with --system adk")
    if args.plot and not args.rollout_jumps:
        parser.error("--plot draws the rollout curves: give --rollout-jumps N too")
    if args.precision == "fp16" and args.device in ("cpu", "auto") and \
            not torch.cuda.is_available():
        parser.error("--precision fp16 runs on GPUs only; use bf16 on a CPU")
    if args.quick:
        args.frames = args.frames or (1200 if md17 else 300)
        args.split = args.split or "blocked"
        if md17:
            args.jump_ps, args.n_out = args.jump_ps or 0.02, args.n_out or 4
        args.seeds, args.epochs, args.max_steps_per_epoch = min(args.seeds, 2), 1, 2
        args.hidden, args.layers = args.hidden or 8, args.layers or 1
        args.eval_windows = args.eval_windows or 32
    args.frames = args.frames or (30000 if md17 else 1500 if adk else 5000)
    args.split = args.split or ("paper" if md17 else "blocked")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    info = machine(args.device)
    command = command_line(__file__, argv)
    data = dataset(args)
    start = time.perf_counter()
    runs = []
    from tqdm.auto import tqdm

    jobs = [(label, seed) for label in args.models
            for seed in range(1 if label in BASELINES else args.seeds)]
    for label, seed in tqdm(jobs, desc="train+evaluate", disable=not args.progress):
        log.info("%s seed %d", label, seed)
        runs.append(run_one(args, label, data, seed))
    rows = []
    for label in args.models:
        mine = [r for r in runs if r["label"] == label]
        fm, fs = mean_std([r["fmse"] for r in mine])
        am, as_ = mean_std([r["amse"] for r in mine])
        tm, _ = mean_std([r["train_s"] for r in mine])
        row = {"model": label, "protocol": _protocol(mine[0]), "fmse_mean": fm,
               "fmse_std": fs, "amse_mean": am, "amse_std": as_, "train_s_mean": tm,
               "seeds": len(mine), "n_test_windows": mine[0]["n_test_windows"]}
        if args.transfer:
            name = VARIANTS[label][0]
            row["transfer_fmse_mean"], row["transfer_fmse_std"] = mean_std(
                [r["transfer"][name]["fmse"] for r in mine])
            row["transfer_windows"] = mine[0]["transfer"]["n_windows"]
        rows.append(row)
    # the floors on the history windows (they differ from the S2T windows)
    for r in runs:
        if r["protocol"] == "history" and r["seed"] == 0:
            for b, err in r["floors"].items():
                row = {"model": f"{b} (history windows)", "protocol": _protocol(r),
                       "fmse_mean": err["fmse"], "fmse_std": 0.0,
                       "amse_mean": err["amse"], "amse_std": 0.0, "train_s_mean": None,
                       "seeds": 1, "n_test_windows": r["n_test_windows"]}
                if args.transfer:
                    row.update(transfer_fmse_mean=r["transfer"][b]["fmse"], transfer_fmse_std=0.0,
                               transfer_windows=r["transfer"]["n_windows"])
                rows.append(row)
            break
    results = {"machine": info, "command": command, "quick": args.quick, "system": args.system,
               "data": relative_path(data), "split": args.split, "epochs": args.epochs,
               "velocities": args.velocities,
               "max_steps_per_epoch": args.max_steps_per_epoch, "rows": rows, "runs": runs,
               "transfer": relative_path(args.transfer) if args.transfer else None,
               "precision": args.precision,
               "metric": "Å² per atom: squared distance summed over xyz, averaged over atoms",
               "wall_seconds": time.perf_counter() - start}
    head = ["model", "protocol", "F-MSE (Å²)", "A-MSE (Å²)", "train time (s)", "seeds",
            "test windows"]
    if args.transfer:
        head += [f"transfer F-MSE (Å², {Path(args.transfer).name})", "transfer windows"]
        vel = next((r["transfer"]["velocity_source"] for r in runs if r.get("transfer")), None)
    table = markdown_table(
        head,
        [[r["model"], r["protocol"], fmt_pm(r["fmse_mean"], r["fmse_std"]),
          fmt_pm(r["amse_mean"], r["amse_std"]), fmt(r["train_s_mean"]), r["seeds"],
          r["n_test_windows"]]
         + ([fmt_pm(r["transfer_fmse_mean"], r["transfer_fmse_std"]), r["transfer_windows"]]
            if args.transfer else []) for r in rows])
    print(f"# One-jump accuracy: {args.system} ({args.split} split, {args.epochs} epochs"
          f"{f', <= {args.max_steps_per_epoch} steps/epoch' if args.max_steps_per_epoch else ''})"
          "\n")
    print(machine_table(info, command) + "\n")
    print(table + "\n")
    if args.transfer:
        print(f"Transfer: every model scored on all windows of {args.transfer}, nodes selected "
              f"afresh by the training recipe; velocities there: {vel}.\n")
    print("F-MSE: last output frame; A-MSE: mean over the P output frames; Å² per atom, squared "
          "distance summed over x, y, z, averaged over atoms (mean ± std over seeds). Train time "
          "includes data preparation and the trainer's own test pass.\n")
    curves = rollout_curves(runs)
    if curves:
        results["rollout"] = curves
        print(rollout_table(curves) + "\n")
        if args.plot:
            plot_rollouts(curves, args.plot, f"{args.system}: {runs[0]['jump_ps']:g} ps jumps")
            print(f"rollout plot: {args.plot}\n")
    print(f"wall time {results['wall_seconds']:.1f} s")
    if args.json_path:
        save_json(args.json_path, results)
    return 0


def rollout_curves(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Seed-0 rollout RMSD curves (Å) of every variant, with the floors of its own windows.

    History models start their rollouts from later windows than single-state models, so their
    floors (constant, linear) differ and are listed as ``constant (history windows)``. Curves of
    other lengths than the first (a rollout cut short by the trajectory end) are left out, with a
    log line.
    """
    rolled = [r for r in runs if r.get("rollout")]
    if not rolled:
        return None
    first = min(rolled, key=lambda r: r["protocol"] != "s2t")["rollout"]
    times = first["times_ps"]
    rmsd: dict[str, list[float]] = {}
    for r in rolled:
        roll = r["rollout"]
        if len(roll["times_ps"]) != len(times):
            log.warning("%s: its rollout has %d frames, not %d; left out of the curves",
                        r["label"], len(roll["times_ps"]), len(times))
            continue
        suffix = " (history windows)" if r["protocol"] == "history" else ""
        curves = {r["label"]: roll["mse_vs_time"][roll["model"]]}
        curves.update({f"{b}{suffix}": roll["mse_vs_time"][b] for b in BASELINES})
        for name, curve in curves.items():
            rmsd.setdefault(name, [float(v) ** 0.5 for v in curve])
    return {"times_ps": times, "n_rollouts": first["n_rollouts"], "n_jumps": first["n_jumps"],
            "rmsd_A": rmsd}


def rollout_table(curves: dict[str, Any]) -> str:
    """RMSD (Å) of each variant at a few points along the rollout."""
    times, n_out = curves["times_ps"], len(curves["times_ps"]) // curves["n_jumps"]
    jumps = sorted({j for j in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                    if j <= curves["n_jumps"]} | {curves["n_jumps"]})
    cols = [j * n_out - 1 for j in jumps]
    head = ["model"] + [f"{j} jump{'s' if j > 1 else ''} ({times[c]:g} ps)"
                        for j, c in zip(jumps, cols)]
    body = [[k] + [fmt(v[c]) for c in cols] for k, v in curves["rmsd_A"].items()]
    return (f"Rollout RMSD (Å) vs the reference MD, seed 0, mean over {curves['n_rollouts']} "
            "rollouts from test windows, each jump fed back as the next input:\n\n"
            + markdown_table(head, body))


def plot_rollouts(curves: dict[str, Any], path: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rmsd in curves["rmsd_A"].items():
        if name.startswith("linear"):  # off the scale at picosecond jumps (see the table)
            continue
        style = ":" if name.split(" ")[0] in BASELINES else "-"
        ax.plot(curves["times_ps"], rmsd, style, label=name, lw=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("simulated time (ps)")
    ax.set_ylabel("RMSD to reference MD (Å)")
    ax.set_title(f"{title} (linear x + v t: off the scale)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _protocol(run: dict[str, Any]) -> str:
    text = f"{run['protocol']}, jump {fmt(run['jump_ps'])} ps, P = {run['n_out']}"
    if run["protocol"] == "history":
        text += f", {run['history']} frames x {fmt(run['history_stride_ps'])} ps"
    return text


if __name__ == "__main__":
    sys.exit(main())
