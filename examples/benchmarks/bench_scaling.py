"""Inference time and peak memory vs number of atoms and vs number of output times P, per model.

Inputs are synthetic (the weights are untrained: this measures cost, not accuracy): atoms on a
jittered cubic lattice at ``--density`` atoms/Å³ (0.1 by default, protein-like: lattice spacing
2.15 Å, so no two atoms come closer than ~1.3 Å), atomic numbers H/C/N/O/S in protein-like
proportions, Maxwell-like velocities, and a radius graph at ``--cutoff-A`` built with the package's
cell-list ``radius_edges``. One system per forward pass, ``torch.inference_mode``; the time is the
median of ``--repeats`` passes after one warm-up pass.

Sweeps:
- atoms: ``--atoms`` (default 10^3, 10^4, 10^5, bounded by ``--max-atoms``) at P = ``--p-fixed``;
  a log-log fit gives each model's exponent (time ~ atoms^slope; PAINET's type-factorised all-pair
  attention and the edge-wise decoder make it ~1 at fixed density), over all sizes and over the
  two largest (fixed costs weigh on the smallest systems, so the second is the large-system
  exponent);
- P: ``--p-values`` (default 1, 2, 4, 8, 16) at ``--p-atoms`` atoms.

A configuration is skipped when the time predicted from the model's previous (smaller) sizes
exceeds ``--max-seconds`` per pass, or its predicted peak memory ``--max-memory-gb``.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the passes minus what was allocated
before them; on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus
the RSS before the first pass, each configuration in a fresh child process so blocks freed by
earlier configurations cannot hide growth (``--in-process``: quicker, a lower bound).

Usage::

    python examples/benchmarks/bench_scaling.py --models painet egno --max-atoms 100000 \
        --json scaling.json --plot scaling.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_models import as_model_batch, memory_baseline, peak_above
from common import (
    command_line,
    fmt,
    loglog_slope,
    machine,
    machine_table,
    markdown_table,
    relative_path,
    save_figure,
    save_json,
    setup_logging,
)

from surrogate_md.data import keys as K
from surrogate_md.data.graphs import radius_edges
from surrogate_md.models import MODELS, build_model

log = logging.getLogger("bench_scaling")

DEFAULT_MODELS = ("egnn", "egno", "estag", "painet")
HISTORY = 10  # ESTAG input frames
#: atomic numbers and their shares in a protein with hydrogens (roughly: half H, then C, O, N, S)
ELEMENTS = np.array([1, 6, 7, 8, 16])
SHARES = np.array([0.50, 0.31, 0.085, 0.10, 0.005])
QUICK = {"atoms": [50, 100, 200], "p_values": [1, 2, 4], "p_atoms": 50, "repeats": 2}


def lattice_positions(n_atoms: int, density_per_A3: float, rng: np.random.Generator
                      ) -> np.ndarray:
    """(n_atoms, 3) Å: the first sites of a cubic lattice of spacing density^(-1/3), jittered by
    up to 20% of the spacing."""
    spacing = density_per_A3 ** (-1 / 3)
    side = math.ceil(n_atoms ** (1 / 3))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = grid[:n_atoms] * spacing
    return pos + rng.uniform(-0.2, 0.2, size=pos.shape) * spacing


def make_batch(n_atoms: int, n_times: int, cutoff_A: float, density_per_A3: float,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """One synthetic system as a model batch (float32); TIMES = P offsets up to 1 ps."""
    rng = np.random.default_rng(seed)
    pos = lattice_positions(n_atoms, density_per_A3, rng)
    edges = radius_edges(torch.as_tensor(pos), cutoff_A)
    x = pos[:, None, :]
    hist = x[None] + 0.05 * rng.normal(size=(HISTORY, n_atoms, 1, 3))
    hist[-1] = x
    batch = {
        K.POS: x, K.VEL: rng.normal(scale=5.0, size=(n_atoms, 1, 3)), K.HIST: hist,
        K.HIST_DT: np.float64(0.01),
        K.NODE_TYPE: rng.choice(ELEMENTS, size=n_atoms, p=SHARES),
        K.MASS: np.full(n_atoms, 12.0),
        K.GRAPH: np.zeros(n_atoms, dtype=np.int64), K.N_GRAPHS: np.int64(1),
        K.EDGE_INDEX: edges.numpy(), K.EDGE_TYPE: np.zeros(edges.shape[1], dtype=np.int64),
        K.TIMES: np.arange(1, n_times + 1) / n_times,
    }
    return as_model_batch(batch)


def run_case(case: dict) -> dict:
    """Time ``case["repeats"]`` inference passes of one model on one synthetic system."""
    device = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    start = time.perf_counter()
    batch = make_batch(case["n_atoms"], case["n_times"], case["cutoff_A"], case["density"])
    graph_s = time.perf_counter() - start
    batch = {k: v.to(device) for k, v in batch.items()}
    options = {"n_history": HISTORY} if case["model"] == "estag" else {}
    model = build_model(case["model"], options).to(device).eval()
    model.set_normalisation(velocity_scale=5.0, displacement_scale=0.5, time_scale=1.0)

    def forward() -> None:
        with torch.inference_mode():
            model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    base = memory_baseline(device)
    forward()  # warm-up: allocator growth happens here, kernels get picked
    times = []
    for _ in range(case["repeats"]):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_bytes": peak_above(device, base),
            "n_edges": int(batch[K.EDGE_INDEX].shape[1]), "graph_seconds": graph_s}


def measure(case: dict, isolate: bool, timeout_s: float | None) -> dict:
    if not isolate:
        return run_case(case)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case),
                        "--case-out", path], check=True, timeout=timeout_s)
        with open(path) as handle:
            return json.load(handle)


def predicted_seconds(done: list[dict], size: float, key: str) -> float:
    """Extrapolate a model's time to ``size`` from its measured points (power law; linear from
    one point)."""
    if not done:
        return 0.0
    xs = [d[key] for d in done]
    ys = [d["seconds"] for d in done]
    slope = loglog_slope(xs, ys) if len(done) > 1 else 1.0
    slope = 1.0 if not math.isfinite(slope) else max(slope, 1.0)
    return ys[-1] * (size / xs[-1]) ** slope


def predicted_memory_gb(done: list[dict], size: float, key: str) -> float:
    """Peak memory at ``size`` extrapolated linearly from a model's largest measured point."""
    if not done:
        return 0.0
    return done[-1]["peak_bytes"] / 1e9 * size / done[-1][key]


def sweep(args: argparse.Namespace, models: list[str], key: str, values: list[int],
          fixed: dict, isolate: bool) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    cases = [(m, v) for m in models for v in values]
    done: dict[str, list[dict]] = {m: [] for m in models}
    for name, value in tqdm(cases, desc=f"scaling vs {key}", disable=not args.progress):
        case = {"model": name, "device": args.device, "repeats": args.repeats,
                "threads": args.threads, "cutoff_A": args.cutoff_A, "density": args.density,
                **fixed, key: value}
        guess = predicted_seconds(done[name], value, key)
        memory_gb = predicted_memory_gb(done[name], value, key)
        if guess > args.max_seconds or memory_gb > args.max_memory_gb:
            why = (f"predicted {guess:.1f} s > {args.max_seconds} s" if guess > args.max_seconds
                   else f"predicted {memory_gb:.1f} GB > {args.max_memory_gb} GB")
            log.info("skip %s at %s=%d: %s", name, key, value, why)
            rows.append({**case, "skipped": why})
            continue
        log.info("%s at %s=%d", name, key, value)
        try:
            # a child that runs far past the prediction is stopped rather than waited for
            res = measure(case, isolate, timeout_s=max(120.0, 20 * (guess + 1.0) *
                                                       (args.repeats + 1)))
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError, RuntimeError) as exc:
            log.warning("%s at %s=%d failed: %s", name, key, value, exc)
            rows.append({**case, "skipped": f"failed: {type(exc).__name__}"})
            continue
        row = {**case, **res}
        rows.append(row)
        done[name].append(row)
    return rows


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, slope in results["slopes_atoms"].items():
        pts = [r for r in results["atoms"] if r["model"] == name and "seconds" in r]
        if pts:
            ax1.loglog([r["n_atoms"] for r in pts], [r["seconds"] for r in pts], "o-",
                       label=f"{name} (slope {fmt(slope, 2)})")
    ax1.set_xlabel("atoms")
    ax1.set_ylabel("inference time per pass (s)")
    ax1.set_title(f"P = {results['p_fixed']}, cutoff {results['cutoff_A']} Å")
    ax1.legend()
    for name, slope in results["slopes_p"].items():
        pts = [r for r in results["p"] if r["model"] == name and "seconds" in r]
        if pts:
            ax2.loglog([r["n_times"] for r in pts], [r["seconds"] for r in pts], "o-",
                       label=f"{name} (slope {fmt(slope, 2)})")
    ax2.set_xlabel("output times P")
    ax2.set_ylabel("inference time per pass (s)")
    ax2.set_title(f"{results['p_atoms']} atoms")
    ax2.legend()
    fig.suptitle(f"inference scaling ({results['machine']['device']}, untrained weights)")
    return save_figure(fig, path)


def total_memory_gb(device: str) -> float:
    """Memory of the GPU (CUDA) or of the machine (os.sysconf), GB."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        choices=sorted(MODELS))
    parser.add_argument("--atoms", nargs="+", type=int, default=[1_000, 10_000, 100_000])
    parser.add_argument("--max-atoms", type=int, default=100_000)
    parser.add_argument("--p-values", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--p-atoms", type=int, default=1_000, help="atoms of the P sweep")
    parser.add_argument("--p-fixed", type=int, default=4, help="P of the atom sweep")
    parser.add_argument("--cutoff-A", type=float, default=5.0, help="radius graph cutoff (Å)")
    parser.add_argument("--density", type=float, default=0.1, help="atoms per Å³")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a configuration predicted to take longer per pass")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip a configuration predicted to need more (default: half the "
                             "machine's memory, or of the GPU's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: measure in this process (peak RSS is then a lower bound)")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="PNG path (default beside --json)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # child process of an isolated measurement
        result = run_case(json.loads(args.case))
        with open(args.case_out, "w") as handle:
            json.dump(result, handle)
        return 0
    setup_logging()
    threads_before = torch.get_num_threads()
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.quick:
        args.atoms, args.p_values = QUICK["atoms"], QUICK["p_values"]
        args.p_atoms = QUICK["p_atoms"]
    args.repeats = args.repeats or (QUICK["repeats"] if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_memory_gb is None:
        args.max_memory_gb = 0.5 * total_memory_gb(args.device)
    atoms = sorted(a for a in args.atoms if a <= args.max_atoms)
    isolate = args.device == "cpu" and not args.in_process
    info = machine(args.device)
    command = command_line(__file__, argv)
    memory_label = ("peak CUDA MiB" if args.device != "cpu" else
                    "peak RSS MiB (fresh process)" if isolate else "peak RSS MiB (in-process)")
    results: dict = {"machine": info, "command": command, "quick": args.quick,
                     "cutoff_A": args.cutoff_A, "density_per_A3": args.density,
                     "p_fixed": args.p_fixed, "p_atoms": args.p_atoms, "repeats": args.repeats,
                     "memory": memory_label, "weights": "untrained"}
    t0 = time.perf_counter()
    results["atoms"] = sweep(args, args.models, "n_atoms", atoms, {"n_times": args.p_fixed},
                             isolate)
    results["p"] = sweep(args, args.models, "n_times", sorted(args.p_values),
                         {"n_atoms": args.p_atoms}, isolate)
    results["wall_seconds"] = time.perf_counter() - t0

    def slope(rows: list[dict], key: str, name: str) -> float:
        pts = [r for r in rows if r["model"] == name and "seconds" in r]
        return loglog_slope([r[key] for r in pts], [r["seconds"] for r in pts])

    def top_slope(rows: list[dict], key: str, name: str) -> float:
        pts = sorted((r for r in rows if r["model"] == name and "seconds" in r),
                     key=lambda r: r[key])[-2:]
        return loglog_slope([r[key] for r in pts], [r["seconds"] for r in pts])

    results["slopes_atoms"] = {m: slope(results["atoms"], "n_atoms", m) for m in args.models}
    results["slopes_atoms_largest_two"] = {m: top_slope(results["atoms"], "n_atoms", m)
                                           for m in args.models}
    results["slopes_p"] = {m: slope(results["p"], "n_times", m) for m in args.models}

    def table(rows: list[dict], key: str) -> str:
        body = []
        for r in rows:
            if "seconds" in r:
                body.append([r["model"], r["n_atoms"], r["n_times"], r["n_edges"],
                             fmt(1e3 * r["seconds"], 4),
                             fmt(1e6 * r["seconds"] / r["n_atoms"], 3),
                             f"{r['peak_bytes'] / 2**20:.1f}"])
            else:
                body.append([r["model"], r["n_atoms"], r["n_times"], "-", "skipped", "-",
                             r["skipped"]])
        return markdown_table(["model", "atoms", "P", "edges", "inference (ms)", "µs per atom",
                               memory_label], body)

    slopes = markdown_table(
        ["model", "slope vs atoms", "slope vs atoms, two largest sizes", "slope vs P"],
        [[m, fmt(results["slopes_atoms"][m], 2),
          fmt(results["slopes_atoms_largest_two"][m], 2), fmt(results["slopes_p"][m], 2)]
         for m in args.models])
    print(f"# Inference scaling (synthetic {args.density} atoms/Å³, radius graph "
          f"{args.cutoff_A} Å, untrained weights)\n")
    print(machine_table(info, command) + "\n")
    print(f"## Time and memory vs atoms (P = {args.p_fixed})\n\n" + table(results["atoms"],
                                                                           "n_atoms") + "\n")
    print(f"## Time and memory vs P ({args.p_atoms} atoms)\n\n" + table(results["p"], "n_times")
          + "\n")
    print("## Fitted log-log slopes (time ~ size^slope)\n\n" + slopes + "\n")
    print(f"wall time {results['wall_seconds']:.1f} s")
    plot_path = args.plot or (str(Path(args.json_path).with_suffix(".png"))
                              if args.json_path else None)
    if plot_path:
        drawn = plot(results, Path(plot_path))
        # beside the JSON: its name relative to the JSON's folder, never a machine's absolute path
        results["plot"] = (os.path.relpath(drawn.resolve(), Path(args.json_path).resolve().parent)
                           if args.json_path else relative_path(drawn))
    if args.json_path:
        save_json(args.json_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
