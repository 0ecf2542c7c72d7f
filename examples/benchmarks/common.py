"""Shared helpers of the benchmark scripts: machine description, Markdown tables, JSON output.

The scripts import this module by name (``python examples/benchmarks/bench_x.py`` puts this
folder first on ``sys.path``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: AdK protocols for short MD made on a CPU: (jump ps, P, history stride ps)
ADK_DEFAULTS = {"backbone": (4.0, 4, 1.0), "residues": (1.0, 1, 1.0)}
#: AdK MD made here: implicit solvent, 4 fs steps with HMR, 1.2 nm cutoff, a frame every 0.1 ps
ADK_MD = {"solvent": "implicit", "hmr": True, "cutoff_nm": 1.2, "interval_ps": 0.1}


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device: str = "cpu") -> dict[str, Any]:
    """JSON-safe description of where a benchmark ran: CPU, cores, versions, device."""
    import torch

    from surrogate_md.train import cpu_has_native_bf16

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }
    try:
        import openmm

        info["openmm"] = openmm.__version__
    except ImportError:
        info["openmm"] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, relative to the repository root; absolute paths
    below the working directory are written relative to it (results carry no machine-specific
    absolute paths where the run allows)."""
    args = [relative_path(a) if os.path.isabs(a) else a
            for a in (sys.argv[1:] if argv is None else argv)]
    return shlex.join(["python", f"examples/benchmarks/{Path(script).name}", *args])


def clean_errors(main):
    """Wrap a benchmark's ``main(argv)``: a user error of the package (missing or unreadable data
    file, a checkpoint that is not one or does not fit the data) ends with one ``error:`` line on
    stderr and exit status 2, as the package's own command lines do, instead of a traceback."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        from surrogate_md.errors import SurrogateMDError

        try:
            return main(argv)
        except SurrogateMDError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return wrapped


def require_files(**paths: str | os.PathLike | None) -> None:
    """Refuse, before any work, an input file that is not there: ``require_files(data=args.data)``
    names the option (``--data``) and the path. None (not given) passes."""
    from surrogate_md.errors import DataError

    for option, path in paths.items():
        if path is not None and not Path(path).is_file():
            flag = "--" + option.replace("_", "-")
            what = "no such file" if not Path(path).exists() else "not a file"
            raise DataError(f"{path}: {what} ({flag}); give an existing file")


def relative_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (results carry no
    machine-specific absolute paths), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are formatted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def machine_table(info: dict[str, Any], command: str) -> str:
    """The two-column machine/command table every benchmark prints first."""
    simd = info.get("cpu_capability")
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(info.get("native_bf16"), "")
    rows = [["CPU", f"{info['cpu']} ({info['cores_usable']} of {info['cores']} cores usable, "
                    f"torch threads {info['torch_threads']}"
                    + (f", {simd}{bf16})" if simd else ")")],
            ["versions", f"python {info['python']}, torch {info['torch']}, "
                         f"openmm {info.get('openmm') or 'absent'}"],
            ["device", info["device"] + (f" ({info['gpu']})" if info.get("gpu") else "")],
            ["command", f"`{command}`"]]
    return markdown_table(["machine", ""], rows)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt(value: float | None, digits: int = 3) -> str:
    """Number for a table cell: ``digits`` significant digits, ``n/a`` for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def fmt_pm(mean: float, std: float, digits: int = 3) -> str:
    return f"{fmt(mean, digits)} ± {fmt(std, 2)}"


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than two points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def superposed_msd(moved_A: np.ndarray, reference_A: np.ndarray) -> float:
    """Squared distance per atom (Å²) of ``moved_A`` (n, 3) from ``reference_A`` once
    superposed onto it (a proper rotation and a translation): the internal part of a motion."""
    from integrations.reconstruct import kabsch

    rot, shift = kabsch(np.asarray(moved_A)[None], np.asarray(reference_A)[None])
    fitted = moved_A @ rot[0].T + shift[0]
    return float(((fitted - reference_A) ** 2).sum(-1).mean())


def motion_over_lag(positions_A: np.ndarray, lag: int) -> dict[str, Any] | None:
    """How far MD frames (F, n, 3) Å move their atoms over ``lag`` frames, every frame a start:
    squared distance per atom (Å²) as it is and after superposition (its internal part). None
    where the frames hold no such window."""
    from integrations.reconstruct import kabsch

    x = np.asarray(positions_A, dtype=np.float64)
    if lag < 1 or lag >= len(x):
        return None
    start, end = x[:-lag], x[lag:]
    rot, shift = kabsch(end, start)
    fitted = np.einsum("gni,gji->gnj", end, rot) + shift[:, None]
    return {"windows": int(len(start)), "raw_A2": float(((end - start) ** 2).sum(-1).mean()),
            "internal_A2": float(((fitted - start) ** 2).sum(-1).mean())}


def first_draw_rise(simulation) -> float:
    """The energy rise (kJ/mol over the guards' reference) at which the energy check failed the
    first draw of the jump a ``SurrogateSimulation`` just took (fallbacks counted), NaN where
    no draw failed it. Read from the guards' kept events, newest first."""
    jump = simulation.n_jumps + simulation.n_fallbacks - 1  # the index the guards gave it
    rise = float("nan")
    for ev in reversed(simulation.guards.events):
        if ev.jump < jump:
            break
        if ev.jump == jump and ev.check == "energy":
            rise = ev.value  # going back in time: the earliest draw's stays
    return rise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON atomically (temporary name, then ``os.replace``); NaN -> null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def setup_logging(verbose: bool = True) -> None:
    """Progress logs on stderr (the tables go to stdout)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
