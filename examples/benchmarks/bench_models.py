"""Forward+backward time and peak memory of every registered model on synthetic inputs.

Cases:
- MD17-size: 13 heavy atoms on a bent chain, bonds (< 1.6 Å) plus two-hop edges, P = 8, batch 100.
- AdK-size: 855 backbone atoms on a compact synthetic chain, 8 Å radius graph, P = 4, batch 1.
- PAINET scaling: one chain of 10^3 .. 10^5 atoms (bonds + two-hop), P = 2; time should grow
  linearly in atoms (the all-pair attention is type-factorised).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps; on CPU the peak resident set
size (VmHWM of /proc/self/status, reset through /proc/self/clear_refs before the first step) minus
the RSS before it, in a fresh child process per case, so memory freed by earlier cases cannot be
reused unseen (``--in-process`` measures in this process instead: quicker, but an underestimate
when the allocator reuses freed blocks). The table says which. (``resource.getrusage``'s
ru_maxrss is not used: it is inherited across fork+exec and cannot be reset.)

Usage: ``python examples/benchmarks/bench_models.py [--quick] [--device cuda] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from surrogate_md.data import keys as K
from surrogate_md.models import MODELS, build_model

SIZES = {
    "full": {"md17": (13, 100, 8), "adk": (855, 1, 4),
             "scaling": (1_000, 3_000, 10_000, 30_000, 100_000)},
    "quick": {"md17": (13, 4, 8), "adk": (60, 1, 4), "scaling": (100, 300, 1_000)},
}
SCALING_TIMES = 2
HISTORY = 10


def chain_positions(n: int, rng: np.random.Generator, bond_A: float = 1.45,
                    stiffness: float = 0.9, radius_A: float | None = None) -> np.ndarray:
    """A bent chain of steps ``bond_A`` (lower ``stiffness`` = straighter); with ``radius_A``,
    steps leaving that sphere are turned back, which packs the chain into a globule."""
    pos = np.zeros((n, 3))
    direction = np.array([1.0, 0.0, 0.0])
    for i in range(1, n):
        for _ in range(20):
            step = direction + stiffness * rng.normal(size=3)
            step *= bond_A / np.linalg.norm(step)
            cand = pos[i - 1] + step
            if radius_A is None or np.linalg.norm(cand) < radius_A:
                break
            direction = -pos[i - 1] / np.linalg.norm(pos[i - 1])
        pos[i], direction = cand, step / bond_A
    return pos


def bond_graph(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Chain bonds (type 0) and two-hop pairs (type 1), both directions."""
    first = np.arange(n - 1)
    second = np.arange(n - 2)
    src = np.concatenate([first, first + 1, second, second + 2])
    dst = np.concatenate([first + 1, first, second + 2, second])
    etype = np.concatenate([np.zeros(2 * (n - 1)), np.ones(2 * (n - 2))]).astype(np.int64)
    return np.stack([src, dst]), etype


def radius_graph(pos: np.ndarray, cutoff_A: float) -> tuple[np.ndarray, np.ndarray]:
    dist = torch.cdist(torch.as_tensor(pos), torch.as_tensor(pos))
    src, dst = torch.nonzero((dist < cutoff_A) & (dist > 0), as_tuple=True)
    return np.stack([src.numpy(), dst.numpy()]), np.zeros(src.shape[0], dtype=np.int64)


def make_batch(kind: str, n_atoms: int, n_systems: int, n_times: int, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """Replicate one synthetic system ``n_systems`` times into a flat-node batch."""
    rng = np.random.default_rng(seed)
    if kind == "adk":
        # tuned so 855 atoms give ~37k edges at 8 Å, near the ~34k of the AdK backbone
        radius = 3.0 * n_atoms ** (1 / 3) + 2.0
        pos = chain_positions(n_atoms, rng, stiffness=0.3, radius_A=radius)
        edges, etype = radius_graph(pos, 8.0)
    else:
        pos = chain_positions(n_atoms, rng)
        edges, etype = bond_graph(n_atoms)
    n = n_atoms * n_systems
    offsets = np.repeat(np.arange(n_systems) * n_atoms, edges.shape[1])
    all_pos = np.tile(pos, (n_systems, 1))[:, None, :]
    hist = all_pos[None] + 0.05 * rng.normal(size=(HISTORY, n, 1, 3))
    hist[-1] = all_pos
    batch = {
        K.POS: all_pos, K.VEL: rng.normal(scale=5.0, size=(n, 1, 3)), K.HIST: hist,
        K.HIST_DT: np.float64(0.01),
        K.NODE_TYPE: np.tile(rng.choice([6, 7, 8], size=n_atoms), n_systems),
        K.MASS: np.full(n, 12.0),
        K.GRAPH: np.repeat(np.arange(n_systems), n_atoms),
        K.N_GRAPHS: np.int64(n_systems),
        K.EDGE_INDEX: np.tile(edges, n_systems) + offsets,
        K.EDGE_TYPE: np.tile(etype, n_systems),
        K.TIMES: 0.2 * np.arange(1, n_times + 1) / n_times,
    }
    return as_model_batch(batch)


def as_model_batch(arrays: dict) -> dict[str, torch.Tensor]:
    """numpy arrays -> a model batch: float32 for floating fields, int64 otherwise."""
    out = {}
    for key, value in arrays.items():
        tensor = torch.as_tensor(value)
        out[key] = tensor.float() if tensor.is_floating_point() else tensor.long()
    return out


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes (Linux)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_baseline(device: torch.device) -> int:
    """Bytes in use now, after resetting the peak counter (CUDA allocator, or this process's
    RSS high-water mark on Linux); where the RSS peak cannot be reset, the current peak, so that
    only growth above it counts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if _reset_peak_rss():
        return _status_bytes("VmRSS")
    return max(_status_bytes("VmRSS"), _status_bytes("VmHWM"))


def peak_above(device: torch.device, base: int) -> int:
    """Peak bytes reached since :func:`memory_baseline` returned ``base``."""
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _status_bytes("VmHWM"))
    return max(int(peak - base), 0)


def run_case(case: dict) -> dict:
    """Time forward+backward of one model on one input; returns seconds and peak bytes."""
    device = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    batch = {k: v.to(device) for k, v in make_batch(case["kind"], case["n_atoms"],
                                                      case["n_systems"], case["n_times"]).items()}
    options = {"n_history": HISTORY} if case["model"] == "estag" else {}
    options.update(case.get("options", {}))
    model = build_model(case["model"], options).to(device)
    model.set_normalisation(velocity_scale=5.0, displacement_scale=0.5, time_scale=0.2)
    trainable = any(p.requires_grad for p in model.parameters())

    def step() -> None:
        out = model(batch)
        if trainable:
            out.square().mean().backward()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # baseline before the warm-up step: that first step is the one that grows the process
    # (later steps reuse the allocator's freed blocks)
    base = memory_baseline(device)
    step()  # warm-up (allocator, kernels), not timed
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": peak_above(device, base),
            "n_nodes": int(batch[K.POS].shape[0]), "n_edges": int(batch[K.EDGE_INDEX].shape[1])}


def measure(case: dict, isolate: bool) -> dict:
    if not isolate:
        return run_case(case)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case),
                        "--case-out", path], check=True)
        with open(path) as handle:
            return json.load(handle)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: measure in this process (peak RSS is then a lower bound)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the PAINET scaling run")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    if args.case:  # child process of an isolated CPU measurement
        result = run_case(json.loads(args.case))
        with open(args.case_out, "w") as handle:
            json.dump(result, handle)
        return 0

    sizes = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (1 if args.quick else 3)
    isolate = args.device == "cpu" and not args.in_process
    memory_label = ("peak CUDA memory allocated (MiB)" if args.device != "cpu" else
                    "peak RSS delta, fresh process (MiB)" if isolate else
                    "peak RSS delta, in-process (MiB)")
    results: dict = {"device": args.device, "torch": torch.__version__, "quick": args.quick,
                     "memory": memory_label, "repeats": repeats, "cases": [], "scaling": []}
    lines = [f"| model | input | nodes | edges | P | fwd+bwd (ms) | {memory_label} |",
             "|---|---|---|---|---|---|---|"]
    for label in ("md17", "adk"):
        n_atoms, n_systems, n_times = sizes[label]
        for name in args.models:
            case = {"model": name, "kind": label, "n_atoms": n_atoms, "n_systems": n_systems,
                    "n_times": n_times, "device": args.device, "repeats": repeats,
                    "threads": args.threads}
            res = measure(case, isolate)
            results["cases"].append({**case, **res})
            lines.append(f"| {name} | {label} x{n_systems} | {res['n_nodes']} | "
                         f"{res['n_edges']} | {n_times} | {1e3 * res['seconds']:.1f} | "
                         f"{_mib(res['peak_bytes'])} |")
    print("\n".join(lines))
    if "painet" in args.models and not args.no_scaling:
        rows = ["", f"PAINET scaling (one chain, bonds + two-hop, P = {SCALING_TIMES}, "
                    f"hidden 32)", "",
                "| atoms | fwd+bwd (ms) | us per atom | " + memory_label + " |",
                "|---|---|---|---|"]
        for n_atoms in sizes["scaling"]:
            case = {"model": "painet", "kind": "chain", "n_atoms": n_atoms, "n_systems": 1,
                    "n_times": SCALING_TIMES, "device": args.device, "repeats": repeats,
                    "threads": args.threads, "options": {"hidden": 32}}
            res = measure(case, isolate)
            results["scaling"].append({**case, **res})
            rows.append(f"| {n_atoms} | {1e3 * res['seconds']:.1f} | "
                        f"{1e6 * res['seconds'] / n_atoms:.2f} | {_mib(res['peak_bytes'])} |")
        pts = results["scaling"]
        slope = ((math.log(pts[-1]["seconds"]) - math.log(pts[0]["seconds"]))
                 / (math.log(pts[-1]["n_atoms"]) - math.log(pts[0]["n_atoms"])))
        results["scaling_exponent"] = slope
        rows += ["", f"time ~ atoms^{slope:.2f} between {pts[0]['n_atoms']} and "
                     f"{pts[-1]['n_atoms']} atoms"]
        print("\n".join(rows))
    if args.json_path:
        tmp = f"{args.json_path}.tmp{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(results, handle, indent=2)
        os.replace(tmp, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
