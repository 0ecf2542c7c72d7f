"""Training throughput and peak memory of the models at the public reference configurations.

Each configuration runs full optimiser steps (AdamW, MSE against a synthetic target, forward +
backward + step) in a fresh child process, so its memory high-water mark is its own, and all of
them run back to back in one invocation. Inputs are the synthetic systems of ``bench_models.py``:
a 13-atom aspirin-like chain with bonds + two-hop edges, and an 855-atom protein-like backbone with
a real 8 Å radius graph.

Reference figures (the public EGNO / ESTAG code, one CPU thread):

- EGNO, aspirin: 13 heavy atoms, P = 8, hidden 64, 5 layers, batch 100: ~100 samples/s (the
  public MD17 configuration, whose temporal-convolution flag defaults to off: measured here both
  as ``egno conv-off aspirin``, like for like, and with the convolution on, ``egno aspirin``);
- EGNO, AdK backbone: 855 atoms, 8 Å graph, P = 4, hidden 128, 4 layers: 0.1 samples/s, 2.9 GB
  at batch 1 (over 19 GB at batch 8);
- ESTAG, aspirin history task: T = 10 past frames, P = 1, hidden 16, 2 layers: ~650 samples/s
  (batch 100 here; the reference figure does not name its batch size).

EGNN and PAINET run at the EGNO sizes for comparison; they have no reference figure.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size of the
child (VmHWM, reset before the first step) minus its RSS before that step, which counts the
activations, gradients and optimiser state of a training step.

``--compare-src DIR`` also measures every configuration with the ``surrogate_md`` package found in
DIR (e.g. ``git archive <commit> surrogate_md | tar -x -C DIR``), interleaved with the current one,
and reports the speed-up and memory ratio: before/after numbers taken on the same noisy machine in
the same run.

``--precision fp32 bf16`` runs each configuration in fp32 and under bf16 autocast (the trainer's
``runtime.precision: bf16``), side by side; bf16 is fast only where the CPU has AVX512-BF16 or AMX
(the machine table says whether it has: "native bf16"). ``--compile`` adds a ``torch.compile``d
(inductor) run of each configuration, as the trainer's ``runtime.compile: true``.

Usage: ``python examples/benchmarks/bench_training.py [--quick] [--threads 1] [--precision fp32
bf16] [--compile] [--json out.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GIB = 2**30


@dataclass(frozen=True)
class Config:
    """One benchmarked training configuration."""

    name: str
    model: str
    kind: str  # "md17" (bonds + two-hop chain) or "adk" (8 Å radius graph)
    n_atoms: int
    batch: int
    n_times: int  # P output times
    options: dict = field(default_factory=dict)  # model config values
    ref_samples_per_s: float | None = None
    ref_memory_gb: float | None = None
    repeats: int = 3
    precision: str = "fp32"  # "bf16": autocast of the matrix products, as runtime.precision
    compiled: bool = False  # torch.compile (inductor), as runtime.compile


def reference_configs(quick: bool, adk_batches: list[int]) -> list[Config]:
    """The benchmarked configurations (tiny sizes with ``quick``; references kept for labels)."""
    md17_batch, adk_atoms = (4, 60) if quick else (100, 855)
    md17 = {"hidden": 64, "n_layers": 5}
    adk = {"hidden": 128, "n_layers": 4}
    if quick:
        md17, adk = {"hidden": 16, "n_layers": 2}, {"hidden": 16, "n_layers": 2}
    reps_small, reps_adk = (1, 1) if quick else (10, 3)
    configs = [
        Config("egno aspirin", "egno", "md17", 13, md17_batch, 8, md17, 100.0, None, reps_small),
        # the reference's own MD17 configuration: its temporal convolution flag defaults to off
        Config("egno conv-off aspirin", "egno", "md17", 13, md17_batch, 8,
               {**md17, "temporal_conv": False}, 100.0, None, reps_small),
        Config("egnn aspirin", "egnn", "md17", 13, md17_batch, 8,
               {k: v for k, v in md17.items()}, None, None, reps_small),
        Config("painet aspirin", "painet", "md17", 13, md17_batch, 8,
               {"hidden": md17["hidden"], "n_decoder_layers": md17["n_layers"]}, None, None,
               reps_small),
        Config("estag aspirin history", "estag", "md17", 13, md17_batch, 1,
               {"hidden": 16, "n_layers": 2, "n_history": 10}, 650.0, None, reps_small),
    ]
    for b in adk_batches:
        ref_mem = {1: 2.9, 8: 19.0}.get(b)
        configs.append(Config(f"egno AdK x{b}", "egno", "adk", adk_atoms, b, 4, adk, 0.1,
                              ref_mem, reps_adk))
    b = adk_batches[0]
    configs += [
        Config(f"egnn AdK x{b}", "egnn", "adk", adk_atoms, b, 4, adk, None, None, reps_adk),
        Config(f"painet AdK x{b}", "painet", "adk", adk_atoms, b, 4,
               {"hidden": adk["hidden"], "n_decoder_layers": adk["n_layers"]}, None, None,
               reps_adk),
    ]
    return configs


def _bench_models():
    """The synthetic inputs and memory probes of the model micro-benchmark beside this file."""
    spec = importlib.util.spec_from_file_location("bench_models", HERE / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(config: Config, device_name: str, threads: int) -> dict:
    """Time full training steps of one configuration in this process; seconds and peak bytes."""
    from surrogate_md.data import keys as K
    from surrogate_md.models import build_model, compile_model
    try:
        from surrogate_md.train.loop import keep_freed_memory
    except ImportError:  # an earlier package (--compare-src) without it
        def keep_freed_memory() -> bool:
            return False

    bench = _bench_models()
    device = torch.device(device_name)
    torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    torch.manual_seed(0)
    batch = bench.make_batch(config.kind, config.n_atoms, config.batch, config.n_times)
    batch = {k: v.to(device) for k, v in batch.items()}
    if config.model == "estag":  # history protocol: the target is the frame after t0
        batch[K.HIST] = batch[K.HIST][-config.options.get("n_history", 10):]
    model = build_model(config.model, dict(config.options)).to(device)
    model.set_normalisation(velocity_scale=5.0, displacement_scale=0.5, time_scale=0.2)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    shape = (config.n_times, *batch[K.POS].shape)
    target = (batch[K.POS].unsqueeze(0)
              + 0.3 * torch.randn(shape, generator=gen).to(device, batch[K.POS].dtype))

    low = config.precision == "bf16"
    forward = compile_model(model) if config.compiled else model

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            pred = forward(batch)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    base = bench.memory_baseline(device)
    warm = time.perf_counter()
    step()  # warm-up: allocates activations, gradients and the optimiser state (and compiles)
    warm = time.perf_counter() - warm
    times, cpu_times = [], []
    for _ in range(config.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = bench.peak_above(device, base)
    seconds, cpu_seconds = statistics.median(times), statistics.median(cpu_times)
    return {"seconds_per_step": seconds, "samples_per_s": config.batch / seconds,
            "cpu_seconds_per_step": cpu_seconds, "samples_per_cpu_s": config.batch / cpu_seconds,
            "peak_bytes": peak, "n_nodes": int(batch[K.POS].shape[0]),
            "n_edges": int(batch[K.EDGE_INDEX].shape[1]), "first_step_seconds": warm,
            "step_seconds": times,
            "step_cpu_seconds": cpu_times}


def measure(config: Config, device: str, threads: int, src: str | None = None,
            in_process: bool = False) -> dict:
    """Run one configuration in a fresh child process (``src``: import surrogate_md from there)."""
    if in_process:
        before = torch.get_num_threads()
        try:
            return run_config(config, device, threads)
        finally:
            torch.set_num_threads(before)
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        payload = json.dumps({"config": asdict(config), "device": device, "threads": threads})
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", payload,
                        "--child-out", out], check=True, env=env, cwd=tmp)
        with open(out) as handle:
            return json.load(handle)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def _table(rows: list[dict], memory_label: str, compare: bool, key: str,
           quick: bool = False) -> str:
    """Markdown table; ratios use the throughput ``key`` (samples_per_s or samples_per_cpu_s).
    ``quick``: the models are tiny, so no ratio against the full-size reference figures."""
    head = ["configuration", "nodes", "edges", "P", "batch", "step (s)", "samples/s",
            "samples/CPU-s", "ref samples/s", "speed vs ref", f"peak {memory_label} (GiB)",
            "ref GB", "memory vs ref"]
    if compare:
        head += ["before samples/CPU-s" if key == "samples_per_cpu_s" else "before samples/s",
                 "before GiB", "speed-up", "memory after/before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cfg, res = row["config"], row["result"]
        mem = res["peak_bytes"] / GIB
        speed = (res[key] / cfg["ref_samples_per_s"]
                 if cfg["ref_samples_per_s"] and not quick else None)
        # the reference quotes GB (10^9 bytes); our peak is shown in GiB
        mem_ratio = (res["peak_bytes"] / 1e9 / cfg["ref_memory_gb"]
                     if cfg["ref_memory_gb"] and not quick else None)
        cells = [cfg["name"], str(res["n_nodes"]), str(res["n_edges"]), str(cfg["n_times"]),
                 str(cfg["batch"]), _fmt(res["seconds_per_step"], 3),
                 _fmt(res["samples_per_s"], 2), _fmt(res["samples_per_cpu_s"], 2),
                 _fmt(cfg["ref_samples_per_s"], 1), _fmt(speed, 2) + ("x" if speed else ""),
                 _fmt(mem, 3), _fmt(cfg["ref_memory_gb"], 1),
                 _fmt(mem_ratio, 3) + ("x" if mem_ratio else "")]
        if compare:
            before = row["before"]
            b_mem = before["peak_bytes"] / GIB
            cells += [_fmt(before[key], 2), _fmt(b_mem, 3),
                      _fmt(res[key] / before[key], 2) + "x",
                      _fmt(mem / b_mem if b_mem > 0 else None, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, "
                        "as the reference figures)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes of the AdK-size runs (default 1 8, quick 1 2)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="run every configuration at each of these precisions (bf16: "
                             "autocast, fast on CPUs with AVX512-BF16/AMX and on GPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="also run every configuration through torch.compile (inductor, "
                             "as runtime.compile); the first step, which compiles, is untimed")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (default 10 at MD17 size, 3 at AdK "
                             "size; 1 with --quick); a GPU step is short, so more steadies it")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only configurations whose name contains one of these words")
    parser.add_argument("--compare-src", default=None,
                        help="directory holding an earlier surrogate_md package to measure too")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (quick checks; peak memory is then a lower "
                             "bound, as the allocator reuses blocks freed by earlier runs)")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one configuration, in a fresh process
        payload = json.loads(args.child)
        result = run_config(Config(**payload["config"]), payload["device"], payload["threads"])
        with open(args.child_out, "w") as handle:
            json.dump(result, handle)
        return 0

    batches = args.batch_sizes or ([1, 2] if args.quick else [1, 8])
    if any(b < 1 for b in batches):
        parser.error("--batch-sizes must be positive")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    configs = [dataclasses.replace(c, name=c.name if p == "fp32" else f"{c.name} {p}",
                                   precision=p)
               for c in reference_configs(args.quick, batches) for p in args.precision]
    if args.repeats is not None:
        configs = [dataclasses.replace(c, repeats=args.repeats) for c in configs]
    if args.compile:
        configs = [variant for c in configs for variant in
                   (c, dataclasses.replace(c, name=f"{c.name} compiled", compiled=True))]
    if args.only:
        names = [c.name for c in configs]
        configs = [c for c in configs if any(word in c.name for word in args.only)]
        if not configs:
            parser.error(f"--only {' '.join(args.only)} matches no configuration (names are "
                         f"case-sensitive): {', '.join(names)}")
    if args.compare_src and args.in_process:
        parser.error("--compare-src needs fresh processes; drop --in-process")
    memory_label = ("CUDA allocated" if args.device != "cpu" else
                    "RSS, in-process" if args.in_process else "RSS")
    rows = []
    for config in configs:
        row = {"config": asdict(config)}
        if args.compare_src:
            row["before"] = measure(config, args.device, args.threads, args.compare_src)
        row["result"] = measure(config, args.device, args.threads, None, args.in_process)
        rows.append(row)
    # one CPU thread on a shared machine: CPU time is the work done, wall time adds the waits for
    # other users' processes; on an idle machine the two agree
    key = "samples_per_cpu_s" if args.device == "cpu" and args.threads == 1 else "samples_per_s"
    if str(HERE) not in sys.path:  # loaded by path (the tests) rather than run as a script
        sys.path.insert(0, str(HERE))
    from common import command_line, machine, machine_table, relative_path

    info = machine(args.device)
    info["torch_threads"] = args.threads  # what every measured step ran with
    print(machine_table(info, command_line(__file__, argv)) + "\n")
    print(f"Training steps (AdamW, forward + backward + step), device {args.device}, "
          f"{args.threads} thread(s), median of timed steps after one warm-up, torch "
          f"{torch.__version__}; ratios from {key.replace('_', ' ')}\n")
    if args.quick:
        print("--quick: tiny models (hidden 16, 2 layers, 60-atom 'AdK'); the reference figures "
              "are for the full sizes, so no ratio is given\n")
    print(_table(rows, memory_label, bool(args.compare_src), key, args.quick))
    if args.json_path:
        data = {"machine": info, "device": args.device, "threads": args.threads,
                "quick": args.quick,
                "ratios_from": key,
                "torch": torch.__version__, "memory": memory_label,
                "compare_src": relative_path(args.compare_src) if args.compare_src else None,
                "command": command_line(__file__, argv), "configs": rows}
        tmp = f"{args.json_path}.tmp{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
