"""Markdown report and PNG plots of an evaluation result (see :func:`evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from surrogate_md.evaluate.core import COLLAPSE_A, TORSION_FLOOR_MIN_FRAMES
from surrogate_md.fileio import atomic_write_text, save_figure
from surrogate_md.metrics import METRIC_DEFINITION

# every plot an evaluation can write: a rerun into the same directory removes those it did not
# write this time, so an old plot never sits beside a new report
PLOT_NAMES = ("error_per_offset.png", "rollout_error.png", "bond_deviation.png", "torsions.png")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path)


def write_plots(result: dict[str, Any], out: Path) -> list[str]:
    """Error vs time, per-offset error, bond-deviation histogram, torsion maps; returns names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ylabel = "Å² per atom (sq. distance summed over xyz)"
    err = result["errors"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in err["models"].items():
        ax.plot(err["times_ps"], m["mse_per_time"], marker="o", label=name)
    ax.set_xlabel("time offset after t0 (ps)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")  # the linear baseline is orders of magnitude off at ps jumps
    ax.set_title(f"{result['split']} windows: error per output time")
    ax.legend()
    _save(fig, out / "error_per_offset.png")
    written.append("error_per_offset.png")
    roll = result.get("rollout", {})
    if "mse_vs_time" in roll:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in roll["mse_vs_time"].items():
            ax.plot(roll["times_ps"], curve, label=name)
        ax.set_xlabel("simulated time (ps)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(f"rollout error vs reference ({_count(roll['n_rollouts'], 'start')})")
        ax.legend()
        _save(fig, out / "rollout_error.png")
        written.append("rollout_error.png")
        val = roll.get("validity", {})
        bonds = val.get("bond_deviation_A")
        if bonds:
            fig, ax = plt.subplots(figsize=(6, 4))
            hi = max(max(bonds["model_values"], default=0), max(bonds["reference_values"],
                                                                  default=0), 1e-3)
            bins = np.linspace(0, hi, 50)
            ax.hist(bonds["reference_values"], bins=bins, alpha=0.6, label="reference MD",
                    density=True)
            ax.hist(bonds["model_values"], bins=bins, alpha=0.6, label=result["model"],
                    density=True)
            ax.set_xlabel("|bond length - training mean| (Å)")
            ax.set_ylabel("density")
            ax.legend()
            _save(fig, out / "bond_deviation.png")
            written.append("bond_deviation.png")
        tors = val.get("torsions")
        if tors:
            fig, axes = plt.subplots(1, 2, figsize=(9, 4.3), sharex=True, sharey=True)
            for ax, label, key in ((axes[0], "reference MD", "reference"),
                                   (axes[1], result["model"], "model")):
                ax.hist2d(tors[f"{key}_phi"], tors[f"{key}_psi"], bins=36,
                          range=[[-180, 180], [-180, 180]], cmap="viridis")
                ax.set_title(label)
                ax.set_xlabel("phi (deg)")
            axes[0].set_ylabel("psi (deg)")
            _save(fig, out / "torsions.png")
            written.append("torsions.png")
    return written


def _velocities(source: str | None, interval_ps: float | None) -> str:
    kind = {"file": "stored in the file",
            "finite_difference": "finite differences of positions one frame apart"}.get(
        source or "", "unknown")
    return kind + ("" if interval_ps is None else f" (frames every {interval_ps:g} ps)")


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}" if np.isfinite(x) else "n/a"
    return str(x)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def write_report(result: dict[str, Any], path: Path) -> Path:
    """``report.md``: tables labelled with their metric definition, plots linked."""
    lines = [f"# Evaluation of `{Path(result['checkpoint']).name}` ({result['model']})", "",
             f"- checkpoint hash: `{result['checkpoint_hash']}`",
             f"- data: {', '.join(Path(p).name for p in result['data'])}; split "
             f"`{result['split']}`, {result['n_windows']} windows; protocol "
             f"`{result['protocol']}`; jump {result['jump_ps']:g} ps",
             f"- input velocities: "
             f"{_velocities(result.get('velocity_source'), result.get('interval_ps'))}; "
             f"the model's training velocities: "
             f"{_velocities(result.get('model_velocity_source'), result.get('model_interval_ps'))}",
             ""]
    if result.get("transfer"):
        lines[-1:-1] = [f"- transfer: {result['n_nodes']} nodes selected afresh in this data by "
                        "the training recipe"]
    if result.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    err = result["errors"]
    lines += ["## One-jump errors", "",
              f"Metric: {METRIC_DEFINITION}. (ESTAG's tables average over the three coordinates "
              "as well: divide by 3 to compare.)", "",
              "| model | F-MSE (Å²/atom) | A-MSE (Å²/atom) | moves the atoms (Å²/atom) |",
              "|---|---|---|---|"]
    for name, m in err["models"].items():
        lines.append(f"| {name} | {_fmt(m['fmse'])} | {_fmt(m['amse'])} | "
                     f"{_fmt(m.get('fmsd'))} |")
    if err.get("fmsd_md") is not None:
        lines += [f"| MD | – | – | {_fmt(err['fmsd_md'])} |", "",
                  "Moves the atoms: squared distance of the jump's end from its start, per atom. "
                  "A model that moves them far less than the MD is close to copying its input "
                  "(a long jump's mean-square best guess), however small its error."]
    sized = err.get("sized_copy_fmse")
    const = err["models"].get("constant", {}).get("fmse")
    own = err["models"].get(result["model"], {}).get("fmse")
    if sized is not None and const is not None and own is not None and result["model"] != (
            "constant"):
        lines += ["", f"Size alone: the input scaled about its centroid to the radius of "
                  f"gyration of the MD's jump end (an oracle: no model is told that size) "
                  f"scores F-MSE {_fmt(sized)} Å²/atom, against the copy's {_fmt(const)} and "
                  f"the model's {_fmt(own)}. A model at or above it has learned little "
                  "beyond the size its jumps end at."]
    lines += ["", "Error per output time offset (Å² per atom, squared distance summed over xyz):",
              "", "| model | " + " | ".join(f"{t:g} ps" for t in err["times_ps"]) + " |",
              "|---|" + "---|" * len(err["times_ps"])]
    for name, m in err["models"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in m["mse_per_time"]) + " |")
    noise = result.get("jump_noise")
    if noise:
        lines += ["", "## Jump noise", "",
                  f"Fitted to the residuals at the end of the jump of these {noise['windows']} "
                  f"windows and saved to `{Path(noise['path']).name}`: {noise['components']} "
                  f"principal components holding {100 * noise['captured_variance']:.1f} % of "
                  f"the residual variance; a draw moves the predicted atoms "
                  f"{_fmt(noise['rms_A'])} Å RMS (residual RMS {_fmt(noise['residual_rms_A'])} "
                  f"Å, of which the mean, left out of the draws, "
                  f"{_fmt(noise['residual_mean_rms_A'])} Å)."]
        if noise.get("reverting"):
            rev = noise["reversion"]
            lines += ["", f"Mean-reverting draws: along each component the draw pulls the "
                      f"prediction back towards the fitted frames by {_fmt(-rev['max'])} to "
                      f"{_fmt(-rev['min'])} of its offset (mean {_fmt(-rev['mean'])}), so "
                      f"that long runs keep the spread of these windows; the random part "
                      f"left moves the atoms {_fmt(rev['draw_rms_A'])} Å RMS."]
        if noise.get("sized"):
            size = noise["size"]
            lines += ["", f"Size model: each drawn end is scaled about its centroid to a radius "
                      f"of gyration of {_fmt(size['intercept_A'])} Å + {_fmt(size['slope'])} × "
                      f"the model's end's, with a spread of {_fmt(size['spread_A'])} Å (the "
                      f"model's ends average {_fmt(size['predicted_mean_A'])} Å, the MD's "
                      f"{_fmt(size['target_mean_A'])} Å)."]
    roll = result.get("rollout")
    if roll and "mse_vs_time" in roll:
        times = roll["times_ps"]
        marks = sorted({int(i) for i in np.linspace(0, len(times) - 1, min(6, len(times)))})
        ran = f"{_count(roll['n_rollouts'], 'rollout')} of {_count(roll['n_jumps'], 'jump')}"
        asked = (roll.get("n_rollouts_requested", roll["n_rollouts"]),
                 roll.get("n_jumps_requested", roll["n_jumps"]))
        if asked != (roll["n_rollouts"], roll["n_jumps"]):  # the data were too short
            ran += f" (asked for: {asked[0]} of {asked[1]}; see Warnings)"
        lines += ["", "## Rollout", "",
                  f"{ran}, each jump fed back as the next input, compared with the reference MD "
                  f"at the same times. Metric: {METRIC_DEFINITION.split(' (')[0]}.", "",
                  "| model | " + " | ".join(f"{times[i]:g} ps" for i in marks) + " |",
                  "|---|" + "---|" * len(marks)]
        for name, curve in roll["mse_vs_time"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(curve[i]) for i in marks) + " |")
        gone = [r for r in roll.get("rollouts", []) if r["divergence"]]
        if gone:
            lines += ["", f"{len(gone)} of {roll['n_rollouts']} rollouts diverged; their frames "
                      "from the bad jump on are left out (the mean error there is n/a):", ""]
            lines += [f"- rollout {r['rollout']} ({Path(r['data']).name}, start frame "
                      f"{r['start_frame']}): {r['divergence']}" for r in gone]
        val = roll.get("validity", {})
        lines += ["", "## Physical validity of the rollout frames", ""]
        lines += ([f"Not measured: {val['skipped']}."] if "skipped" in val else
                  ["| measure | model | reference MD |", "|---|---|---|"])
        b = val.get("bond_deviation_A")
        if b:
            lines += [f"| mean bond-length deviation from training mean (Å) | "
                      f"{_fmt(b['model_mean'])} | {_fmt(b['reference_mean'])} |",
                      f"| max bond-length deviation (Å) | {_fmt(b['model_max'])} | "
                      f"{_fmt(b['reference_max'])} |",
                      f"| frames with a bond deviating > "
                      f"{b.get('collapse_threshold_A', COLLAPSE_A):g} Å (collapse) | "
                      f"{_fmt(b['collapsed_fraction'])} | - |"]
        d = val.get("min_nonbonded_distance_A")
        if d:
            lines += [f"| minimum non-bonded distance (Å) | {_fmt(d['model_min'])} | "
                      f"{_fmt(d['reference_min'])} |",
                      f"| frames with a clash (< {_fmt(d['clash_threshold_A'])} Å) | "
                      f"{_fmt(d['model_clash_fraction'])} | "
                      f"{_fmt(d['reference_clash_fraction'])} |"]
        c = val.get("chain_breaks")
        if c:
            lines.append(f"| frames with a CA-CA(i,i+1) > {c['threshold_A']} Å chain break | "
                         f"{_fmt(c['model_frames_with_break'])} | "
                         f"{_fmt(c['reference_frames_with_break'])} |")
        g = val.get("radius_of_gyration_A")
        if g:
            lines.append(f"| radius of gyration, mean (min-max) (Å) | {_fmt(g['model_mean'])} "
                         f"({_fmt(g['model_min'])}-{_fmt(g['model_max'])}) | "
                         f"{_fmt(g['reference_mean'])} ({_fmt(g['reference_min'])}-"
                         f"{_fmt(g['reference_max'])}) |")
            if g.get("allowed") is not None:
                lo, hi = g["allowed"]
                lines.append(f"| frames outside the size check's {_fmt(lo)}-{_fmt(hi)} Å "
                             f"(compacted or swollen) | {_fmt(g['model_outside_fraction'])} | "
                             f"{_fmt(g['reference_outside_fraction'])} |")
        h = val.get("distance_histogram")
        if h:
            lines.append(f"| pairwise-distance histogram h(r) MAE vs reference (0.1 Å bins, "
                         f"pairs within {h['max_A']:g} Å only) | {_fmt(h['mae'])} | 0 |")
            if "model_fraction_beyond_max" in h:
                lines.append(f"| fraction of atom pairs beyond {h['max_A']:g} Å (not in h(r); "
                             f"model - reference: "
                             f"{_fmt(h['fraction_beyond_max_difference'])}) | "
                             f"{_fmt(h['model_fraction_beyond_max'])} | "
                             f"{_fmt(h['reference_fraction_beyond_max'])} |")
        t = val.get("torsions")
        if t:
            floor = t.get("reference_split_half") or {}
            lines += [f"| backbone (phi, psi) Jensen-Shannon divergence (nats, 36x36 bins) | "
                      f"{_fmt(t['js_phi_psi'])} | {_fmt(floor.get('js_phi_psi'))} * |",
                      f"| phi / psi JS divergence (nats, 36 bins) | {_fmt(t['js_phi'])} / "
                      f"{_fmt(t['js_psi'])} | {_fmt(floor.get('js_phi'))} / "
                      f"{_fmt(floor.get('js_psi'))} * |", ""]
            if floor:
                lines.append("\\* The reference-MD column for the JS divergences is the "
                             "sampling floor: the first half of the reference frames against "
                             "the second half (half the sample each). Two samples of the same "
                             "MD this short differ by about this much; a model value near it "
                             "is as close as the sample can tell.")
            else:
                held = (f"{_count(t['reference_frames'], 'frame')}"
                        if "reference_frames" in t else "too few frames")
                need = t.get("floor_min_frames", 2 * TORSION_FLOOR_MIN_FRAMES)
                lines.append("\\* No sampling floor: it compares the first half of the "
                             f"reference frames with the second half, and the reference holds "
                             f"{held} (the floor needs at least {need}). With so few frames "
                             "the JS divergences measure the sample size more than the model.")
    elif roll:
        lines += ["", f"Rollout skipped: {roll.get('skipped')}."]
    tm = result.get("training_metrics") or {}
    if "test_amse" in tm:
        lines += ["", f"Training run's own test metrics (best epoch {tm.get('best_epoch')}): "
                  f"F-MSE {_fmt(tm.get('test_fmse'))}, A-MSE {_fmt(tm.get('test_amse'))} "
                  "Å² per atom."]
    if result.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
