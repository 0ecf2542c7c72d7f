"""The training loop: one function, :func:`train`, behind ``python -m surrogate_md.train``.

Run directory::

    config.yaml    resolved config (absolute data paths, model options filled in)
    train.log      log of the run
    metrics.jsonl  one JSON record per epoch (+ a final ``split: test`` record); strict JSON,
                   metrics of an empty split are ``null``
    loss.png       loss curves
    last.pt        resumable: inference payload + ``training`` (optimiser, scheduler, RNG, epoch,
                   metric history)
    best.pt        inference payload of the epoch with the lowest validation A-MSE

Every file is written atomically. Determinism and resume: shuffling is a pure function of
(``train_seed``, epoch) (``DistributedSampler.set_epoch``), RNG states are saved with every
``last.pt`` at the end of an epoch, so a run killed at any point and resumed with
``resume=True`` repeats the unfinished epoch exactly and ends with the same metrics as an
uninterrupted run (CPU, fixed seeds).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (NCCL on GPU, gloo on CPU), each rank trains on its shard of every epoch,
training and validation sums are all-reduced (on the rank's GPU under NCCL), and only rank 0 logs
and writes files. The repeats that pad the last shards to equal length train but are not counted
in the training metrics.

Resume checks that the run's config (model, data settings, seeds) and its dataset files
(:func:`~surrogate_md.train.data.data_identity`) are the ones it started with. ``--overwrite``
keeps the replaced run until the new one has passed its start checks, and puts it back if it
fails before them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surrogate_md.checkpoint import build_payload, load_checkpoint, save_checkpoint
from surrogate_md.data import keys as K
from surrogate_md.data.windows import WindowDataset, batch_to
from surrogate_md.errors import CheckpointError, ConfigError, DeviceError
from surrogate_md.fileio import atomic_write_text, save_figure
from surrogate_md.metrics import ErrorSums, batch_amse
from surrogate_md.models import MODELS, build_model, compile_model, config_from_dict
from surrogate_md.surrogate import resolve_device
from surrogate_md.train.config import DataConfig, RunConfig, load_config, save_config
from surrogate_md.train.data import (
    PreparedData,
    ignored_settings,
    normalisation_stats,
    prepare_data,
    validity_reference,
)

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "loss.png", "last.pt", "best.pt")


# -- distributed helpers -------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    """This process's place in a ``torchrun`` job.

    ``device`` is where its collectives run: the rank's GPU under NCCL (whose process groups have
    no backend for CPU tensors), the CPU under gloo.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device_request: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_request != "cpu"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        # Before the group and its first barrier: NCCL puts a barrier on the current device,
        # GPU 0 on every rank unless set here (all ranks then share one GPU, or hang).
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        if use_cuda:  # device_id binds the group to this rank's GPU (torch >= 2.3)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        owns = True
    return Dist(rank, world, local, owns, device)


def _all_reduce(values: Any, dist: Dist) -> np.ndarray:
    """Element-wise sum of ``values`` (float64) over all ranks, computed on ``dist.device`` and
    returned on the CPU; ``values`` itself for a single process."""
    values = np.asarray(values, dtype=np.float64)
    if not dist.active:
        return values
    import torch.distributed as tdist

    vec = torch.as_tensor(values, dtype=torch.float64).to(dist.device)
    tdist.all_reduce(vec)
    return vec.cpu().numpy().copy()


def _all_reduce_sums(sums: ErrorSums, dist: Dist) -> ErrorSums:
    if not dist.active:
        return sums
    vec = _all_reduce(np.concatenate([sums.per_time, [sums.atoms]]), dist)
    return ErrorSums(vec[:-1], int(round(float(vec[-1]))))


def _real_samples(n: int, dist: Dist) -> int:
    """Windows of this rank's shard that are not padding: DistributedSampler (drop_last=False)
    makes every shard ``ceil(n / world)`` long by repeating the first indices of the epoch's
    order after the last, and deals position p of that list to rank p mod world; positions
    n and beyond, at the end of a shard, are the repeats."""
    return len(range(dist.rank, n, dist.world))


# -- model and data ----------------------------------------------------------------------------
def resolve_model_options(config: RunConfig) -> RunConfig:
    """Fill the model options the data decides (channels, history length); error on conflicts."""
    name = config.model.name
    cls = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    opts = dict(config.model.options)
    channels = 4 if config.data.selection == "residues" else 1
    if opts.get("n_channels", channels) != channels:
        raise ConfigError(f"model.n_channels = {opts['n_channels']} but selection "
                          f"{config.data.selection!r} gives {channels} channel(s); remove "
                          "model.n_channels")
    opts["n_channels"] = channels
    if "n_history" in fields:
        if opts.get("n_history", config.data.history) != config.data.history:
            raise ConfigError(f"model.n_history = {opts['n_history']} differs from data.history "
                              f"= {config.data.history}; set one of them")
        opts["n_history"] = config.data.history
    if cls.needs_history and (config.data.protocol != "history" or config.data.history < 2):
        raise ConfigError(f"model {name!r} needs past frames: set data.protocol: history and "
                          "data.history >= 2 (e.g. 10) with data.history_stride_ps")
    if not cls.needs_history and config.data.protocol == "history":
        readers = [n for n, c in MODELS.items() if c.needs_history]
        raise ConfigError(f"data.protocol = history cuts past frames, but model.name = {name!r} "
                          "reads only the frame at t0 and would ignore them; set data.protocol: "
                          f"s2t for {name!r}, or model.name to a model that reads history "
                          f"({', '.join(readers)})")
    if config.train.rollout_jumps > 1 and config.data.protocol != "s2t":
        raise ConfigError(f"train.rollout_jumps = {config.train.rollout_jumps} chains jumps of "
                          "the s2t protocol; the history protocol's next input needs past "
                          "frames the jumps do not all give. Set train.rollout_jumps: 1 or "
                          "data.protocol: s2t")
    model = dataclasses.replace(config.model, options=opts)
    return config.replace(model=model)


def _dtype_context(device: torch.device, precision: str):
    """Autocast for ``precision``: bf16 on CUDA or CPU, fp16 on CUDA only, else nothing.

    Autocast runs the matrix products (the bulk of the work) in the low precision; the models keep
    positions, per-node sums of edge terms and the loss in fp32. On CPUs with AVX512-BF16 or AMX,
    bf16 training steps ran 1.3-1.5x faster than fp32 (``bench_training.py --precision``);
    elsewhere bf16 is emulated and several times slower (see :func:`cpu_has_native_bf16`).
    """
    if precision == "fp32" or (device.type != "cuda" and precision != "bf16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU runs bf16 natively (compute capability 8.0, Ampere, or newer);
    older ones emulate it, slower than fp32."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX, as oneDNN sees
    it). Without them torch emulates bf16: a training step of EGNO at MD17 size ran 6x slower
    under bf16 autocast than in fp32 on an AVX2-only CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed blocks for reuse instead of returning them to the system.

    A CPU training step allocates and frees the same multi-MiB activation blocks every step; by
    default glibc serves blocks above its mmap threshold with fresh mappings and trims the heap
    top, so every step pays page faults and zeroing of fresh pages (10-20 % of a step's time was
    system time at MD17 size). Raising the mmap and trim thresholds keeps those pages mapped:
    about 5 % faster steps, at the price of the process holding its peak heap until it exits.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                    and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
                    and libc.mallopt(_M_TOP_PAD, 1 << 26))
    except (OSError, AttributeError):
        return False


def _loader(dataset: WindowDataset, batch_size: int, sampler=None, workers: int = 0,
            indices: np.ndarray | None = None):
    from torch.utils.data import DataLoader, Subset

    ds = dataset if indices is None else Subset(dataset, indices.tolist())
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=dataset.collate, num_workers=workers,
                      persistent_workers=False)


def with_input_noise(batch: dict[str, torch.Tensor], sigma_A: float) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` whose input positions carry Gaussian noise of ``sigma_A`` Å per
    coordinate (``train.input_noise_A``): ``POS`` (N, C, 3), and for history batches every frame
    of ``HIST`` (T, N, C, 3), the last one being ``POS``. Velocities, the graph and the targets
    are left as they are. Isotropic noise keeps the training distribution E(3)-invariant."""
    out = dict(batch)
    hist = batch.get(K.HIST)
    if hist is not None:
        out[K.HIST] = hist + sigma_A * torch.randn_like(hist)
        out[K.POS] = out[K.HIST][-1]
    else:
        out[K.POS] = batch[K.POS] + sigma_A * torch.randn_like(batch[K.POS])
    return out


def next_jump_batch(batch: dict[str, torch.Tensor], pred: torch.Tensor, jump: int,
                    graph: Any) -> dict[str, torch.Tensor]:
    """The batch of chained jump ``jump`` (1 = the second) of ``train.rollout_jumps``, which
    starts where ``pred`` (P, N, C, 3) Å, the previous jump's prediction, ends.

    As the engines and :meth:`~surrogate_md.Surrogate.rollout` chain jumps: positions are the
    last predicted frame, velocities the backward difference of the last two (the input and the
    only frame when P = 1) over their time spacing (Å/ps), and radius graphs are rebuilt on the
    new positions (``graph``: the dataset's :class:`~surrogate_md.data.windows.GraphBuilder`).
    ``pred`` is detached: no gradient flows through the start of a later jump. The targets are
    ``batch[ROLLOUT][jump - 1]``, the MD frames of the jump's interval.
    """
    pred = pred.detach().to(batch[K.POS].dtype)
    times = batch[K.TIMES]
    if pred.shape[0] > 1:
        prev, dt = pred[-2], times[-1] - times[-2]
    else:
        prev, dt = batch[K.POS], times[-1]
    out = dict(batch)
    out[K.POS] = pred[-1]
    out[K.VEL] = (pred[-1] - prev) / dt
    out[K.EDGE_INDEX], out[K.EDGE_TYPE] = graph.batch_edges(
        out[K.POS], batch[K.GRAPH], batch[K.EDGE_INDEX], batch[K.EDGE_TYPE])
    out[K.TARGET] = batch[K.ROLLOUT][jump - 1]
    del out[K.ROLLOUT]
    return out


@torch.no_grad()
def evaluate_dataset(model: torch.nn.Module, dataset: WindowDataset, *, batch_size: int,
                     device: torch.device, precision: str = "fp32", dist: Dist | None = None,
                     workers: int = 0) -> ErrorSums:
    """Error sums of ``model`` over every window of ``dataset`` (sharded across ranks).

    ``precision`` defaults to fp32 whatever the training precision: the trainer picks and scores
    checkpoints as :class:`~surrogate_md.Surrogate` runs them.
    """
    dist = dist or Dist()
    sums = ErrorSums()
    indices = np.arange(dist.rank, len(dataset), dist.world)
    was_training = model.training
    model.eval()
    if len(indices):
        for batch in _loader(dataset, batch_size, workers=workers, indices=indices):
            batch = batch_to(batch, device, torch.float32)
            with _dtype_context(device, precision):
                pred = model(batch)
            sums.add(pred.float(), batch[K.TARGET])
    model.train(was_training)
    if sums.atoms == 0:  # the shape all ranks reduce; mse_per_time of no atoms is not zero
        sums.per_time = np.zeros(dataset.protocol.n_out)
    return _all_reduce_sums(sums, dist)


def _per_time(sums: ErrorSums) -> list[float]:
    """MSE per output time (Å² per atom), NaN for an empty split (as its F-MSE and A-MSE)."""
    if sums.atoms == 0:
        return [math.nan] * len(sums.per_time)
    return sums.mse_per_time.tolist()


# -- RNG state -----------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        saved, here = state["cuda"], torch.cuda.device_count()
        if len(saved) != here:
            log.warning("resuming on %d CUDA device(s) with the random state of %d: only the "
                        "first %d are restored", here, len(saved), min(here, len(saved)))
        for index, rng in enumerate(saved[:here]):
            torch.cuda.set_rng_state(rng, index)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


# -- schedule ------------------------------------------------------------------------------------
def lr_factor(epoch: int, epochs: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): linear warmup, then cosine to 0."""
    if warmup and epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if schedule == "none":
        return 1.0
    span = max(epochs - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))


def _restart_schedule(optimiser: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LambdaLR, tc: Any, epoch: int,
                      old_train: dict[str, Any]) -> None:
    """Put the learning rate of a resumed run on the schedule of the current config.

    A restored LambdaLR carries the old run's base lr and its last lr (0 at the end of a finished
    cosine schedule): extending ``train.epochs`` would train on at lr 0. The lr of ``epoch``
    (0-based, the first one to run) is recomputed as ``train.lr x lr_factor(epoch, ...)`` of the
    current settings, and the scheduler's base lrs set to ``train.lr`` so that its next steps
    follow the same schedule. For an unchanged config this is the lr the run had.
    """
    lr = tc.lr * lr_factor(epoch, tc.epochs, tc.warmup_epochs, tc.schedule)
    for group in optimiser.param_groups:
        group["initial_lr"] = tc.lr
        group["lr"] = lr
    scheduler.base_lrs = [tc.lr] * len(optimiser.param_groups)
    scheduler.last_epoch = epoch
    scheduler._last_lr = [lr] * len(optimiser.param_groups)  # what get_last_lr() reports
    new = dataclasses.asdict(tc)
    changed = [f"train.{k}: {old_train[k]!r} -> {new[k]!r}" for k in sorted(new)
               if k in old_train and old_train[k] != new[k]]
    if changed:
        log.info("resume: train settings changed (%s); they apply from epoch %d, which runs at "
                 "lr %.4g", "; ".join(changed), epoch + 1, lr)


# -- run directory -------------------------------------------------------------------------------
def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> tuple[bool, Path | None]:
    """Check and create the run directory.

    Returns:
        Whether this call created the directory, and where the files of the run it replaces
        (``overwrite``) were moved: a hidden folder in ``out``, which :func:`_discard_replaced`
        deletes once the new run has passed its start checks and :func:`_restore_replaced`
        moves back if it fails before them (a typo in data.path must not cost the old run).
    """
    if resume:
        if not out.is_dir():
            raise ConfigError(f"{out}: run directory to resume does not exist; start a new run "
                              "with --out instead of --resume")
        return False, None
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out}: run directory already holds a run ({', '.join(existing)}); "
                          "pass --resume to continue it, --overwrite to replace it, or choose "
                          "another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the run directory ({exc.strerror}); choose "
                          "another --out") from exc
    replaced = None
    if existing:
        replaced = Path(tempfile.mkdtemp(prefix=".replaced-run-", dir=out))
        for n in existing:
            os.replace(out / n, replaced / n)
        log.info("%s: the files of the run it held are kept in %s until the new run has passed "
                 "its start checks", out, replaced.name)
    return created, replaced


def _discard_replaced(replaced: Path | None) -> None:
    """Delete the replaced run's folder, renamed first: a kill during the deletion leaves a
    ``.discarded-run-*`` folder, which :func:`_recover_replaced` removes, never a part of the
    old run that it would mistake for one to put back."""
    if replaced is not None and replaced.exists():
        doomed = replaced.with_name(replaced.name.replace(".replaced-run-", ".discarded-run-", 1))
        os.replace(replaced, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _restore_replaced(out: Path, replaced: Path | None) -> None:
    """Move the files of the replaced run back into ``out`` (after a failed start)."""
    if replaced is None or not replaced.exists():
        return
    for path in replaced.iterdir():
        if not (out / path.name).exists():
            os.replace(path, out / path.name)
    with contextlib.suppress(OSError):  # not empty: a new run file was in the way
        replaced.rmdir()
    if replaced.exists():
        log.warning("%s: some files of the replaced run are left in %s", out, replaced)


def _recover_replaced(out: Path) -> None:
    """Clean up after an ``--overwrite`` start that was killed (SIGKILL, power loss) while the
    previous run's files sat in its hidden ``.replaced-run-*`` folder.

    Without a checkpoint in ``out`` the new run never got past its start checks (its first
    checkpoint comes after them): the previous run is the real one and its files go back,
    replacing the killed start's ``config.yaml``/``train.log``. With one, the new run had
    started and only the folder's deletion was cut short: the folder goes.
    """
    if not out.is_dir():
        return
    for folder in out.glob(".discarded-run-*"):  # a deletion cut short
        shutil.rmtree(folder, ignore_errors=True)
    for folder in sorted(out.glob(".replaced-run-*")):
        if not folder.is_dir():
            continue
        if any((out / n).exists() for n in ("last.pt", "best.pt")):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("%s: removed %s, left by an --overwrite whose new run had started",
                     out, folder.name)
            continue
        for path in folder.iterdir():
            os.replace(path, out / path.name)
        with contextlib.suppress(OSError):
            folder.rmdir()
        log.warning("%s: an earlier --overwrite was killed during its start checks; the run it "
                    "was replacing is back in place (from %s)", out, folder.name)


def _run_files(out: Path) -> dict[str, int]:
    """Modification time (ns) of each run file present in ``out``."""
    return {n: (out / n).stat().st_mtime_ns for n in RUN_FILES if (out / n).exists()}


def _undo_failed_start(out: Path, before: dict[str, int], created_dir: bool) -> None:
    """Remove what a run that failed before its first checkpoint wrote, so that the corrected
    command can be rerun as it was (no --overwrite or --resume for a run that never trained).

    Only run files this attempt created go; files that were there before (a resumed run, a user's
    own directory) stay. A run that wrote a checkpoint keeps everything: it can be resumed.
    """
    now = _run_files(out)
    if any(now.get(n) != before.get(n) for n in ("last.pt", "best.pt") if n in now):
        return
    for name in now:
        if name not in before:
            (out / name).unlink(missing_ok=True)
    if created_dir:
        with contextlib.suppress(OSError):  # not empty: something else was put there
            out.rmdir()


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None: strict JSON has no NaN (an empty split's errors are NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl: one strict-JSON record per line; undefined metrics are ``null``."""
    atomic_write_text(out / "metrics.jsonl", "".join(
        json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in history))


def _plot_losses(out: Path, history: list[dict]) -> None:
    epochs = [r for r in history if r.get("split") == "epoch"]
    if not epochs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["epoch"] for r in epochs]
    for key, label in (("train_amse", "train A-MSE"), ("val_amse", "val A-MSE"),
                       ("val_fmse", "val F-MSE")):
        y = [r.get(key) for r in epochs]
        if all(v is not None and np.isfinite(v) for v in y):
            ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Å² per atom (squared distance summed over xyz)")
    if all((r.get("val_amse") or 0) > 0 for r in epochs):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "loss.png")


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _LogToFile:
    """Attach a FileHandler for ``train.log`` to the package logger for the run's duration."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.handler: logging.Handler | None = None
        self.logger = logging.getLogger("surrogate_md")
        self.level = self.logger.level

    def __enter__(self) -> _LogToFile:
        if self.path is not None:
            self.handler = logging.FileHandler(self.path)
            self.handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.logger.addHandler(self.handler)
            if self.logger.getEffectiveLevel() > logging.INFO:
                self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
            self.logger.setLevel(self.level)


# -- the loop ------------------------------------------------------------------------------------
def train(config: RunConfig | dict | str | os.PathLike, out_dir: str | os.PathLike, *,
          resume: bool = False, overwrite: bool = False, device: str | None = None,
          overrides: list[str] | None = None) -> Path:
    """Train a model and return the path of its ``best.pt``.

    Args:
        config: a :class:`RunConfig`, a plain dict in the YAML layout, or a YAML file path.
            With ``resume=True`` it may be ``None``-like (``{}``): the run directory's
            ``config.yaml`` is used.
        out_dir: run directory (created; an existing run is refused unless ``resume`` or
            ``overwrite``).
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        overwrite: replace an existing run in ``out_dir``.
        device: overrides ``runtime.device`` (``auto``/``cpu``/``cuda``).
        overrides: ``section.key=value`` strings applied on top of ``config``.

    Returns:
        ``out_dir / "best.pt"`` (weights-only loadable; ``Surrogate.load`` accepts it).

    Raises:
        ConfigError, DataError, CheckpointError, DeviceError with a message naming the problem.
    """
    out = Path(out_dir).absolute()
    if int(os.environ.get("RANK", "0")) == 0:
        _recover_replaced(out)
    if resume and (config is None or config == {}):
        config = out / "config.yaml"
    cfg = _as_config(config, overrides)
    if device is not None:
        cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, device=device))
    try:  # before the run directory exists: a run that cannot start leaves nothing behind
        resolve_device(cfg.runtime.device)
    except DeviceError as exc:
        source = config if isinstance(config, (str, os.PathLike)) else "config"
        raise DeviceError(f"{source}: runtime.device: {exc}") from None
    cfg = resolve_model_options(cfg)
    cfg = cfg.replace(data=dataclasses.replace(
        cfg.data, path=[str(Path(p).expanduser().absolute()) for p in cfg.data.paths]))

    dist = _init_distributed(cfg.runtime.device)
    try:
        created_dir, before, replaced = False, {}, None
        if dist.main:
            created_dir, replaced = _prepare_run_dir(out, resume, overwrite)
            before = _run_files(out)
        if dist.active:
            import torch.distributed as tdist

            tdist.barrier()
        try:
            with _LogToFile(out / "train.log" if dist.main else None):
                return _run(cfg, out, resume, dist, replaced)
        except BaseException as exc:
            # an interrupt (Ctrl-C) too puts back a replaced run that the new one has not
            # started to replace yet
            pending = replaced is not None and replaced.exists()
            if dist.main and (isinstance(exc, Exception) or pending):
                _undo_failed_start(out, before, created_dir)
                _restore_replaced(out, replaced)
            raise
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _as_config(config: Any, overrides: list[str] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return load_config(None, overrides, base=config.to_dict())
        return config
    if isinstance(config, dict):
        return load_config(None, overrides, base=config)
    return load_config(config, overrides)


def _run(cfg: RunConfig, out: Path, resume: bool, dist: Dist, replaced: Path | None = None
         ) -> Path:
    t_start = time.perf_counter()
    device = resolve_device(cfg.runtime.device)
    if device.type == "cuda" and dist.active:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if device.type != "cuda" and cfg.runtime.precision == "fp16":
        log.warning("runtime.precision = fp16 applies on GPU only; running fp32 on %s "
                    "(bf16 runs on CPUs too)", device)
    if device.type == "cpu" and cfg.runtime.precision == "bf16" and not cpu_has_native_bf16():
        log.warning("runtime.precision = bf16 on a CPU without AVX512-BF16 or AMX: torch emulates "
                    "bf16 here and training runs several times slower than fp32; set "
                    "runtime.precision: fp32 unless you want bf16 numerics")
    if device.type == "cuda" and cfg.runtime.precision == "bf16" and not gpu_has_native_bf16(
            device):
        log.warning("runtime.precision = bf16 on a GPU without native bf16 (compute capability "
                    "below 8.0): it is emulated and slower than fp32; use runtime.precision: "
                    "fp16 there")
    if device.type == "cpu":
        keep_freed_memory()
    if dist.main and not resume:  # first, so that a run killed at any point can be resumed
        save_config(cfg, out / "config.yaml")
    log.info("run %s: model %s on %s (world size %d)", out, cfg.model.name, device, dist.world)
    # A resumed run's config.yaml is rewritten only once the checks below have passed, so that a
    # refused resume leaves the run as it was. (A new run that fails to start is undone by
    # train().)
    last = out / "last.pt"
    ckpt = None
    if resume and last.is_file():
        ckpt = load_checkpoint(last)
        why = ckpt.get("training", {}).get("resumable", True)
        if why is not True:
            raise CheckpointError(f"{last}: cannot resume this run: {why}")
        check_resume(ckpt, cfg, last)
    elif resume:
        log.info("%s has no last.pt yet: starting the run from the beginning", out)
    if dist.main:
        for message in ignored_settings(cfg.data):
            log.warning("%s", message)
    prepared = prepare_data(cfg.data, seed=cfg.train.data_seed,
                            rollout_jumps=cfg.train.rollout_jumps)
    try:
        if ckpt is not None:
            check_data_identity(ckpt, prepared, last)
        check_node_types(cfg, prepared)
        # the start checks have passed: the run this one replaces (--overwrite) can go
        _discard_replaced(replaced)
        if dist.main and resume:  # the resumed run's settings, now that they passed the checks
            save_config(cfg, out / "config.yaml")
        return _fit(cfg, prepared, out, ckpt, dist, device, t_start)
    finally:
        prepared.close()


def _flat(values: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every flattened key whose value differs."""
    unset = "(unset)"
    return [f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, unset) != new.get(k, unset)]


# train.* keys that decide the splits or the initial weights: changing them on resume would mix
# two protocols in one run (windows of the old test split in the new training split)
_FIXED_ON_RESUME = ("data_seed", "model_seed")


def _model_settings(model: Any) -> Any:
    """A config's model section with every option filled in (an option left out and the same
    value given explicitly are the same model)."""
    if not isinstance(model, dict):
        return model
    options = {k: v for k, v in model.items() if k != "name"}
    try:
        typed = config_from_dict(model.get("name"), options)
    except ConfigError:  # recorded by another version: compare as written
        return model
    return {"name": model.get("name"), **dataclasses.asdict(typed)}


def _data_settings(data: Any) -> Any:
    """A recorded data section with the settings added since it was written (``velocities``)
    at their defaults: a run started before a setting existed ran as its default says."""
    if not isinstance(data, dict):
        return data
    added = {f.name: f.default for f in dataclasses.fields(DataConfig)
             if f.name == "velocities"}
    return {**added, **data}


def check_resume(ckpt: dict[str, Any], cfg: RunConfig, last: Path) -> None:
    """Refuse to resume ``last`` (a ``last.pt``) under a config that changes the model, the
    data protocol or the seeds of the splits and initial weights.

    Raises:
        CheckpointError: naming every differing key (old -> new) and the fix.
    """
    state = ckpt.get("training")
    if not state:
        raise CheckpointError(f"{last}: has no training state; it cannot be resumed; start a "
                              "new run directory with --out")
    old = state.get("config") or {}
    new = cfg.to_dict()
    fix = (f"resume with the settings the run was started with (drop these --set overrides "
           f"or restore them in {last.parent / 'config.yaml'}), or start a new run directory "
           "with --out")
    changed = _differences(_flat(_model_settings(old.get("model")), "model"),
                           _flat(_model_settings(new["model"]), "model"))
    if changed:
        raise CheckpointError(f"{last}: was trained with another model config "
                              f"({'; '.join(changed)}); {fix}")
    old_data = {**_flat(_data_settings(old.get("data")), "data"),
                **{f"train.{k}": old.get("train", {}).get(k) for k in _FIXED_ON_RESUME}}
    new_data = {**_flat(new["data"], "data"),
                **{f"train.{k}": new["train"][k] for k in _FIXED_ON_RESUME}}
    changed = _differences(old_data, new_data)
    if changed:
        raise CheckpointError(f"{last}: cannot resume with changed data settings "
                              f"({'; '.join(changed)}): the resumed epochs would train and "
                              f"select on other windows than the finished ones (windows can "
                              f"move between the train, val and test splits); {fix}")


def check_data_identity(ckpt: dict[str, Any], prepared: PreparedData, last: Path) -> None:
    """Refuse to resume ``last`` on dataset files whose content changed since the run started
    (regenerated, extended or truncated at the same path): the resumed epochs would train and
    select on other frames than the finished ones. The identity is
    :func:`~surrogate_md.train.data.data_identity`, recorded in the checkpoint's provenance.
    A ``last.pt`` from before that record resumes unchecked, with a warning.

    Raises:
        CheckpointError: naming the file, what changed and the fix.
    """
    recorded = (ckpt.get("provenance") or {}).get("data_identity")
    if recorded is None:
        log.warning("%s: records no identity of its dataset files (written by an older "
                    "surrogate-md); cannot check that %s still hold the frames the run was "
                    "trained on", last, ", ".join(str(f.path) for f in prepared.files))
        return
    for old, new in zip(recorded, prepared.identity):
        old_same = {k: v for k, v in old.items() if k != "path"}
        new_same = {k: v for k, v in new.items() if k != "path"}
        if old_same == new_same:
            continue
        if old.get("n_frames") != new["n_frames"]:
            what = f"it had {old.get('n_frames')} frames, it has {new['n_frames']}"
        elif old.get("fields") != new["fields"]:
            what = f"it had the fields {old.get('fields')}, it has {new['fields']}"
        else:
            what = "same number of frames, other frames, times or metadata"
        raise CheckpointError(
            f"{last}: the dataset file {new['path']} changed since the run was trained on it "
            f"({what}); the resumed epochs would train on other frames than the finished ones. "
            f"Put back the file the run was started with, or train on the new data in a new run "
            "directory (--out) or over this one (--overwrite)")


def check_node_types(cfg: RunConfig, prepared: PreparedData) -> None:
    """The model's node-type embedding must cover every node type of the data (an index past
    it fails deep inside the first forward pass otherwise)."""
    if not MODELS[cfg.model.name].has_parameters:  # the floors embed nothing
        return
    n_types = int(cfg.model.typed().n_node_types)
    node_type = np.asarray(prepared.selection.node_type)
    largest = int(node_type.max()) if node_type.size else -1
    if largest >= n_types:
        kind = "atomic number" if largest < 100 else "residue node type (100 + residue code)"
        raise ConfigError(f"model.n_node_types = {n_types} is too small for "
                          f"{prepared.files[0].path}: its {cfg.data.selection!r} nodes include "
                          f"{kind} {largest}; set model.n_node_types to at least {largest + 1} "
                          "(or leave it at its default)")


def _fit(cfg: RunConfig, prepared: PreparedData, out: Path, ckpt: dict | None, dist: Dist,
         device: torch.device, t_start: float) -> Path:
    tc, rc = cfg.train, cfg.runtime
    train_ds, val_ds = prepared.datasets["train"], prepared.datasets["val"]
    if len(val_ds) == 0:
        log.warning("the validation split is empty: best.pt follows the training loss")
    stats = normalisation_stats(train_ds, cfg.data.max_stat_windows, seed=tc.data_seed)
    validity = validity_reference(prepared, seed=tc.data_seed)
    log.info("normalisation: velocity %.4g Å/ps, displacement %.4g Å, jump %.4g ps; validity: "
             "bond tolerance %.3g Å, min distance %.3g Å", stats["velocity_scale"],
             stats["displacement_scale"], stats["time_scale"], validity.bond_tolerance_A,
             validity.min_distance_A)

    torch.manual_seed(tc.model_seed)
    model = build_model(cfg.model.name, cfg.model.options)
    model.set_normalisation(**stats)
    model.to(device)
    trainable = model.has_parameters and any(p.requires_grad for p in model.parameters())

    def payload(metrics: dict | None = None) -> dict:
        p = build_payload(model, protocol=prepared.protocol_meta(), selection=prepared.selection,
                          graph=prepared.graph, topology=prepared.topology, validity=validity,
                          provenance={**prepared.provenance(), "run_config": cfg.to_dict()})
        if metrics is not None:
            p["metrics"] = metrics
        return p

    eval_bs = tc.eval_batch_size or 2 * tc.batch_size
    history: list[dict] = []

    if not trainable:
        # Analytic baselines: nothing to fit, but the run still reports and exports them.
        record = {"split": "epoch", "epoch": 0, "step": 0, "lr": 0.0}
        for name, ds in (("train", train_ds), ("val", val_ds)):
            s = evaluate_dataset(model, ds, batch_size=eval_bs, device=device, dist=dist,
                                 workers=rc.workers)
            record[f"{name}_fmse"], record[f"{name}_amse"] = s.fmse, s.amse
        record["train_loss"] = record["train_amse"]
        record["val_loss"] = record["val_amse"]
        record.update(samples_per_s=0.0, epoch_time_s=0.0,
                      peak_memory_MiB=_peak_memory_mib(device))
        history.append(record)
        if dist.main:
            save_checkpoint(out / "best.pt", payload({"best_epoch": 0, **record}))
        return _finish(cfg, model, prepared, out, dist, device, history, payload, t_start)

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if tc.optimiser == "adamw" else torch.optim.Adam
    optimiser = opt_cls(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda e: lr_factor(e, tc.epochs, tc.warmup_epochs, tc.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and
                                  rc.precision == "fp16")

    start_epoch, step, best, best_epoch, bad_epochs = 0, 0, math.inf, -1, 0
    last = out / "last.pt"
    if ckpt is not None:  # checked by check_resume
        state = ckpt["training"]
        model.load_state_dict(ckpt["state_dict"])
        # the saved state brings the old run's hyper-parameters; the current config's win
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimiser.param_groups]
        optimiser.load_state_dict(state["optimiser"])
        for group, settings in zip(optimiser.param_groups, fresh):
            group.update(settings)
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        bad_epochs = int(state["bad_epochs"])
        history = [dict(r) for r in state["history"]]
        _restart_schedule(optimiser, scheduler, tc, start_epoch,
                          (state.get("config") or {}).get("train") or {})
        if dist.main:
            _write_metrics(out, history)
        log.info("resumed %s at epoch %d (step %d, best val A-MSE %.4g)", last, start_epoch,
                 step, best)

    net: torch.nn.Module = model
    if dist.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = compile_model(net) if rc.compile else net

    from torch.utils.data.distributed import DistributedSampler
    from tqdm.auto import tqdm

    sampler = DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=tc.train_seed, drop_last=False)
    loader = _loader(train_ds, tc.batch_size, sampler=sampler, workers=rc.workers)
    show = dist.main and (rc.progress if rc.progress is not None else
                          bool(os.isatty(2)))
    real_on_rank = _real_samples(len(train_ds), dist)
    stopped = False
    for epoch in range(start_epoch, tc.epochs):
        if tc.patience and bad_epochs >= tc.patience:
            stopped = True
            break
        sampler.set_epoch(epoch)
        model.train()
        train_sums = ErrorSums()
        loss_sum, n_batches, n_samples, n_seen = 0.0, 0, 0, 0
        later_sum, later_n = 0.0, 0  # A-MSE of the chained jumps after the first
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_steps = len(loader) if not tc.max_steps_per_epoch else min(len(loader),
                                                                      tc.max_steps_per_epoch)
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch",
                   disable=not show, leave=False)
        for i, batch in enumerate(loader):
            if i >= n_steps:
                break
            batch = batch_to(batch, device, torch.float32)
            if tc.input_noise_A:
                batch = with_input_noise(batch, tc.input_noise_A)
            optimiser.zero_grad(set_to_none=True)
            # one forward and backward pass per chained jump (rollout_jumps > 1), the gradients
            # summed; under DDP only the last backward pass synchronises them
            jump_batch, jump_pred, loss_value = batch, None, 0.0
            for jump in range(tc.rollout_jumps):
                if jump_pred is not None:
                    jump_batch = next_jump_batch(batch, jump_pred, jump, train_ds.graph)
                last_jump = jump == tc.rollout_jumps - 1
                with (contextlib.nullcontext() if last_jump or not dist.active
                      else net.no_sync()):
                    with _dtype_context(device, rc.precision):
                        jump_pred = forward(jump_batch).float()
                    loss = batch_amse(jump_pred, jump_batch[K.TARGET])
                    if not torch.isfinite(loss):
                        raise ConfigError(
                            f"training diverged at epoch {epoch + 1}, step {step + 1}"
                            f"{f', chained jump {jump + 1}' if jump else ''} (loss "
                            f"{float(loss)}); lower train.lr or set train.grad_clip")
                    scaler.scale(loss / tc.rollout_jumps).backward()
                loss_value += float(loss.detach()) / tc.rollout_jumps
                if jump == 0:
                    pred = jump_pred.detach()
                else:
                    later_sum += float(loss.detach())
                    later_n += 1
            if tc.grad_clip:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            scaler.step(optimiser)
            scaler.update()
            step += 1
            # the padding of the sampler's shard trains (every rank must take the same number
            # of steps) but is not counted: its windows are counted on the rank that owns them
            size = int(batch[K.N_GRAPHS])
            real = min(size, max(real_on_rank - n_seen, 0))
            n_seen += size
            if real == size:
                train_sums.add(pred, batch[K.TARGET])
            elif real:
                keep = batch[K.GRAPH] < real  # systems are numbered in batch order
                train_sums.add(pred[:, keep], batch[K.TARGET][:, keep])
            loss_sum += loss_value
            n_batches += 1
            n_samples += real
            rate = n_samples * dist.world / max(time.perf_counter() - t0, 1e-9)  # estimate
            bar.set_postfix(loss=f"{loss_value:.4g}", samples_s=f"{rate:.0f}")
            bar.update(1)
            if step % rc.log_every == 0:
                log.info("epoch %d step %d loss %.5g (%.0f samples/s)", epoch + 1, step,
                         loss_value, rate)
        bar.close()
        elapsed = time.perf_counter() - t0
        if train_sums.atoms == 0:  # the shape all ranks reduce (a shard of padding only)
            train_sums.per_time = np.zeros(train_ds.protocol.n_out)
        train_sums = _all_reduce_sums(train_sums, dist)
        # train_loss: mean over the optimiser steps of all ranks of the loss they minimised
        loss_sum, n_batches, n_samples, later_sum, later_n = _all_reduce(
            [loss_sum, n_batches, n_samples, later_sum, later_n], dist)
        n_samples = int(round(n_samples))
        lr = optimiser.param_groups[0]["lr"]
        scheduler.step()
        val = evaluate_dataset(model, val_ds, batch_size=eval_bs, device=device, dist=dist,
                               workers=rc.workers)
        record = {"split": "epoch", "epoch": epoch + 1, "step": step, "lr": lr,
                  "train_loss": float(loss_sum / max(n_batches, 1)),
                  "train_fmse": train_sums.fmse, "train_amse": train_sums.amse,
                  "val_fmse": val.fmse, "val_amse": val.amse, "val_loss": val.amse,
                  "samples": n_samples,
                  "samples_per_s": n_samples / max(elapsed, 1e-9),
                  "epoch_time_s": elapsed, "peak_memory_MiB": _peak_memory_mib(device)}
        if tc.rollout_jumps > 1:  # batch means over the steps, padding included
            record["train_later_jumps_amse"] = float(later_sum / max(later_n, 1))
        history.append(record)
        metric = val.amse if len(val_ds) else record["train_amse"]
        improved = metric < best
        if improved:
            best, best_epoch, bad_epochs = metric, epoch + 1, 0
        else:
            bad_epochs += 1
        later = (f", chained jumps A-MSE {record['train_later_jumps_amse']:.5g}"
                 if tc.rollout_jumps > 1 else "")
        log.info("epoch %d/%d: train A-MSE %.5g%s, val F-MSE %.5g A-MSE %.5g Å²/atom, lr %.3g, "
                 "%.0f samples/s%s", epoch + 1, tc.epochs, record["train_amse"], later, val.fmse,
                 val.amse, lr, record["samples_per_s"], " (best)" if improved else "")
        if dist.main:
            if improved:
                save_checkpoint(out / "best.pt", payload({"best_epoch": best_epoch, **record}))
            state = {"optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "rng": _rng_state(), "epoch": epoch + 1, "step": step,
                     "best_metric": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                     "history": history, "config": cfg.to_dict()}
            save_checkpoint(last, {**payload(), "training": state})
            _write_metrics(out, history)
            _plot_losses(out, history)
        if dist.active:
            import torch.distributed as tdist

            tdist.barrier()
    if stopped:
        log.info("early stopping: no better validation A-MSE for %d epochs (best epoch %d)",
                 tc.patience, best_epoch)
    if best_epoch < 0 and dist.main:  # epochs = 0: export the initial model
        save_checkpoint(out / "best.pt", payload({"best_epoch": 0}))
    if dist.active:
        import torch.distributed as tdist

        tdist.barrier()
    best_state = load_checkpoint(out / "best.pt")["state_dict"]
    model.load_state_dict(best_state)
    return _finish(cfg, model, prepared, out, dist, device, history, payload, t_start)


def _finish(cfg: RunConfig, model: torch.nn.Module, prepared: PreparedData, out: Path,
            dist: Dist, device: torch.device, history: list[dict], payload, t_start: float
            ) -> Path:
    """Test-split metrics of the best model, written to metrics.jsonl and best.pt."""
    tc = cfg.train
    eval_bs = tc.eval_batch_size or 2 * tc.batch_size
    test = evaluate_dataset(model, prepared.datasets["test"], batch_size=eval_bs, device=device,
                            dist=dist, workers=cfg.runtime.workers)
    best = load_checkpoint(out / "best.pt") if dist.main else {}
    best_epoch = int(best.get("metrics", {}).get("best_epoch", 0)) if dist.main else 0
    final = {"split": "test", "best_epoch": best_epoch, "test_fmse": test.fmse,
             "test_amse": test.amse, "test_mse_per_time": _per_time(test),
             "times_ps": prepared.protocol_meta()["times_ps"],
             "wall_time_s": time.perf_counter() - t_start}
    log.info("test (best epoch %d): F-MSE %.5g, A-MSE %.5g Å² per atom (squared distance summed "
             "over xyz, mean over atoms)", best_epoch, test.fmse, test.amse)
    if dist.main:
        metrics = {**best.get("metrics", {}), **{k: v for k, v in final.items()
                                                   if k != "split"}}
        save_checkpoint(out / "best.pt", {**{k: v for k, v in best.items()
                                             if k not in ("format", "format_version")},
                                          "metrics": metrics})
        _write_metrics(out, [*history, final])
        _plot_losses(out, history)
    if dist.active:
        import torch.distributed as tdist

        tdist.barrier()
    return out / "best.pt"


__all__ = ["evaluate_dataset", "lr_factor", "next_jump_batch", "resolve_model_options", "train",
           "with_input_noise"]
