"""Two busy torch processes on the same CPU cores: one alone against two side by side.

Each process runs the same fixed workload (dense matrix products with an activation, what a
training step spends its time on) with ``OMP_NUM_THREADS`` threads. PyTorch starts one thread
per core by default; two such processes on the same cores keep preempting each other's threads
at every parallel region, which costs far more than sharing the cores. With one thread each,
two processes on two cores run as fast as one alone.

    python examples/benchmarks/bench_threads.py            # the README table
    python examples/benchmarks/bench_threads.py --quick    # a second's worth, for the tests

Prints a Markdown table and saves ``results/threads.json`` (``--json`` elsewhere; a ``--quick``
run saves only where ``--json`` says, so that it never replaces the measured result).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import command_line, machine, machine_table, markdown_table, save_json

HERE = Path(__file__).resolve().parent

WORKLOAD = r"""
import sys, time
import torch
torch.manual_seed(0)
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a, b = torch.randn(n, n), torch.randn(n, n)
start = time.perf_counter()
for _ in range(repeats):
    torch.nn.functional.silu(a @ b).sum()
print(time.perf_counter() - start)
"""


def run_side_by_side(processes: int, threads: int, size: int, repeats: int) -> list[float]:
    """Seconds each of ``processes`` concurrent workloads took with ``threads`` threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, "-c", WORKLOAD, str(size), str(repeats)],
                              env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"workload process failed with exit code {proc.returncode}")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="matrix edge (default 384)")
    parser.add_argument("--repeats", type=int, default=6000,
                        help="products per process (default 6000)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the default case (default: the cores, as torch "
                             "takes them)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="write results here (default: results/threads.json beside this "
                             "script; with --quick: nowhere)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats = 64, 200
    elif args.json_path is None:
        args.json_path = str(HERE / "results" / "threads.json")
    rows, cases = [], []
    alone = {}
    for threads in sorted({args.threads, 1}, reverse=True):
        for processes in (1, 2):
            seconds = run_side_by_side(processes, threads, args.size, args.repeats)
            mean = sum(seconds) / len(seconds)
            if processes == 1:
                alone[threads] = mean
            cases.append({"threads": threads, "processes": processes, "seconds": seconds})
            rows.append([threads, processes, f"{mean:.2f}", f"{mean / alone[threads]:.1f}×",
                         f"{processes * args.repeats / max(seconds):.0f}"])
    info = machine()
    print(machine_table(info, command_line(__file__, argv)))
    print()
    print(markdown_table(["threads per process", "processes side by side", "s per process",
                          "slowdown vs alone", "products/s, all processes"], rows))
    if args.json_path:
        save_json(args.json_path, {"machine": info, "command": command_line(__file__, argv),
                                   "quick": args.quick, "size": args.size,
                                   "repeats": args.repeats, "cases": cases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
