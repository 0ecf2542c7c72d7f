"""Typed run configuration: four frozen dataclass sections loaded from YAML.

A config file has the sections ``data``, ``model``, ``train`` and ``runtime``::

    data:
      path: alanine_dipeptide.h5      # one file or a list of files of the same system
      protocol: s2t                   # s2t | history
      selection: all                  # all | heavy | backbone | ca | residues
      jump_ps: 1.0                    # ΔT, a multiple of the dataset's saved-frame interval
      n_out: 4                        # P output frames evenly spaced up to ΔT
      graph: {kind: bonds, two_hop: true}
    model: {name: egno, hidden: 64, n_layers: 4}   # name + the model's own options
    train: {epochs: 100, batch_size: 32, lr: 5.0e-4}
    runtime: {device: auto, precision: fp32}

Unknown keys, wrong types and impossible values raise :class:`~surrogate_md.errors.ConfigError`
naming the key. ``--set section.key=value`` overrides are parsed as YAML scalars. Times are in ps
and converted to frames with the dataset's interval when the data is opened.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from surrogate_md.data.windows import VELOCITY_SOURCES, GraphSpec
from surrogate_md.errors import ConfigError
from surrogate_md.fileio import atomic_write_text

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMISERS = ("adam", "adamw")
SCHEDULES = ("cosine", "none")
LOSSES = ("mse",)
SELECTIONS = ("all", "heavy", "backbone", "ca", "residues")
MAX_SEED = 2**63 - 1


class UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Plain YAML loaders keep the last of two equal keys and drop the first without a word, so a
    second ``train:`` section at the end of a config would replace the whole first one (its lr,
    batch size, ... back to the defaults). Keys merged in with ``<<`` may still be overridden.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if earlier is not None:
                    raise ConfigError(f"key {key!r} is given twice in one mapping (lines "
                                      f"{earlier} and {line}); YAML would keep only the "
                                      "second and ignore the first: remove one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeySafeLoader)


@dataclass(frozen=True)
class DataConfig:
    """Which frames become training windows.

    path: dataset file(s), relative to the working directory, ``~`` for the home directory;
    protocol: ``s2t`` | ``history``; selection: model nodes; split: ``blocked`` | ``paper``; fractions: blocked split
    shares; counts: windows per split (paper: required; blocked: optional cap); stride: frames
    between blocked start frames; margin_frames: paper split end margin; jump_ps: ΔT (ps); n_out:
    P; history: T input frames (history protocol); history_stride_ps: spacing of history frames
    (ps, default one saved frame); max_stat_windows: training windows sampled for the
    normalisation statistics and validity tolerances; velocities: the input velocities, ``auto``
    (those stored in the files, finite differences where a file has none), ``file`` (stored ones,
    required) or ``difference`` (x[t0] - x[t0 - 1] over one saved frame, Å/ps, even where the
    files store velocities: the MD17 protocol on data made with velocities).
    """

    path: str | list[str] = ""
    protocol: str = "s2t"
    selection: str = "all"
    split: str = "blocked"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    counts: tuple[int, int, int] | None = None
    stride: int = 1
    margin_frames: int = 10000
    jump_ps: float = 1.0
    n_out: int = 1
    history: int = 1
    history_stride_ps: float | None = None
    graph: GraphSpec = field(default_factory=GraphSpec)
    max_stat_windows: int = 512
    velocities: str = "auto"

    def __post_init__(self) -> None:
        paths = [self.path] if isinstance(self.path, str) else list(self.path)
        if not paths or any(not p for p in paths):
            raise ConfigError("data.path is required: the dataset file(s) to train on (set it in "
                              "the config or with --set data.path=FILE.h5)")
        _choice("data.protocol", self.protocol, ("s2t", "history"))
        _choice("data.selection", self.selection, SELECTIONS)
        _choice("data.split", self.split, ("blocked", "paper"))
        _choice("data.velocities", self.velocities, VELOCITY_SOURCES)
        if len(self.fractions) != 3 or not all(0 <= f < math.inf for f in self.fractions) or sum(
                self.fractions) <= 0:
            raise ConfigError(f"data.fractions must be three shares >= 0 (train, val, test), got "
                              f"{list(self.fractions)}")
        if self.split == "blocked" and sum(self.fractions) > 1 + 1e-9:  # as split_starts
            raise ConfigError(f"data.fractions = {list(self.fractions)} sum to "
                              f"{sum(self.fractions):g}; the train, val and test shares of the "
                              "frames must sum to at most 1, e.g. [0.8, 0.1, 0.1]")
        if self.counts is not None and (len(self.counts) != 3 or any(c < 0 for c in self.counts)):
            raise ConfigError(f"data.counts must be three window counts >= 0, got "
                              f"{list(self.counts)}")
        if self.split == "paper" and self.counts is None:
            raise ConfigError("data.split = paper needs data.counts (n_train, n_val, n_test), "
                              "e.g. [500, 2000, 2000]")
        _positive("data.stride", self.stride)
        _non_negative("data.margin_frames", self.margin_frames)
        _positive("data.jump_ps", self.jump_ps)
        _positive("data.n_out", self.n_out)
        _positive("data.history", self.history)
        _positive("data.max_stat_windows", self.max_stat_windows)
        if self.history_stride_ps is not None:
            _positive("data.history_stride_ps", self.history_stride_ps)
        if self.protocol == "s2t" and self.history != 1:
            raise ConfigError("data.history > 1 needs data.protocol = history")

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass(frozen=True)
class ModelSection:
    """``name`` (a key of :data:`surrogate_md.models.MODELS`) and the model's own options."""

    name: str = "egno"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from surrogate_md.models import config_from_dict

        config_from_dict(self.name, self.options)  # unknown model/option -> ConfigError

    def typed(self):
        """The model's frozen config dataclass."""
        from surrogate_md.models import config_from_dict

        return config_from_dict(self.name, self.options)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation.

    optimiser: ``adam`` | ``adamw``; lr; weight_decay; schedule: ``cosine`` (per epoch, after a
    linear warmup of ``warmup_epochs``) | ``none``; epochs; batch_size; patience: stop after this
    many epochs without a better validation A-MSE (0 = never); grad_clip: max gradient norm
    (0 = off); data_seed (splits), model_seed (initial weights), train_seed (shuffling, dropout);
    loss: ``mse`` (A-MSE in Å², squared distance summed over xyz, mean over atoms and times);
    max_steps_per_epoch: cap on optimiser steps per epoch (0 = whole training split);
    eval_batch_size: batch size for validation/test (0 = 2 x batch_size);
    input_noise_A: standard deviation (Å, per coordinate) of Gaussian noise added to the input
    positions (and history frames) of every training window, the targets left as the MD's: the
    model learns to bring slightly displaced inputs back onto the MD's path, as it must when its
    own outputs become its next inputs (0 = off; validation and test never see noise);
    rollout_jumps: R >= 1 chained jumps per training window (s2t protocol). Above 1, each
    window's first jump is followed by R - 1 more, each from the model's own end state as the
    engines chain jumps by default (positions: the last predicted frame; velocities: the
    backward difference of the last two, also for a model whose first jumps see the MD's
    instantaneous velocities: the engines' ``end_velocities="thermal"`` is not what it trains
    for; radius graphs rebuilt on those positions), each scored against the MD
    frames of its interval; the loss is the mean of the R jump losses. No gradient flows through
    a later jump's start (the pushforward trick): the model learns to continue from its own
    outputs, not to steer them. Costs R forward and backward passes per step; training windows
    must hold the R jumps (:func:`~surrogate_md.train.data.rollout_windows`); validation and
    test metrics stay one-jump.
    """

    optimiser: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    epochs: int = 100
    batch_size: int = 32
    patience: int = 0
    grad_clip: float = 0.0
    data_seed: int = 0
    model_seed: int = 0
    train_seed: int = 0
    loss: str = "mse"
    max_steps_per_epoch: int = 0
    eval_batch_size: int = 0
    input_noise_A: float = 0.0
    rollout_jumps: int = 1

    def __post_init__(self) -> None:
        _choice("train.optimiser", self.optimiser, OPTIMISERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.loss", self.loss, LOSSES)
        _positive("train.lr", self.lr)
        _positive("train.batch_size", self.batch_size)
        _positive("train.rollout_jumps", self.rollout_jumps)
        for name in ("weight_decay", "warmup_epochs", "epochs", "patience", "grad_clip",
                     "max_steps_per_epoch", "eval_batch_size", "input_noise_A"):
            _non_negative(f"train.{name}", getattr(self, name))
        for name in ("data_seed", "model_seed", "train_seed"):
            # numpy's generators refuse negative seeds and torch's stop at 64 bits; the
            # shuffling seed is offset by the epoch, hence the margin below 2**64
            value = getattr(self, name)
            if not 0 <= value <= MAX_SEED:
                raise ConfigError(f"train.{name} must be an integer from 0 to {MAX_SEED} "
                                  f"(2**63 - 1), got {value!r}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run.

    device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; precision: ``fp32`` | ``bf16`` | ``fp16``
    (autocast of the matrix products; bf16 also on CPU, fast where the CPU has AVX512-BF16 or
    AMX and emulated, several times slower, elsewhere; fp16 on GPU only, with loss scaling);
    compile: ``torch.compile`` the model and the chunked edge pass of large graphs
    (:func:`surrogate_md.models.compile_model`; the first steps pay for compilation, 1-3
    minutes);
    workers: DataLoader worker processes; log_every: log a line every N optimiser steps;
    progress: tqdm bars (null = when attached to a terminal).
    """

    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    workers: int = 0
    log_every: int = 50
    progress: bool | None = None

    def __post_init__(self) -> None:
        _choice("runtime.precision", self.precision, PRECISIONS)
        index = self.device[len("cuda:"):] if self.device.startswith("cuda:") else None
        if not (self.device in ("auto", "cpu", "cuda")
                or (index is not None and index.isascii() and index.isdigit())):
            raise ConfigError(f"runtime.device must be auto, cpu, cuda or cuda:N (N = 0, 1, "
                              f"...), got {self.device!r}")
        _non_negative("runtime.workers", self.workers)
        _positive("runtime.log_every", self.log_every)


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the YAML layout (model options flattened beside ``name``)."""
        out = {}
        for section in ("data", "train", "runtime"):
            out[section] = _plain(dataclasses.asdict(getattr(self, section)))
        out["model"] = {"name": self.model.name, **_plain(self.model.options)}
        return {k: out[k] for k in ("data", "model", "train", "runtime")}

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "runtime": RuntimeConfig}


# -- loading ------------------------------------------------------------------------------------
def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from plain values; unknown keys/wrong types -> ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping with sections data, model, "
                          f"train, runtime; got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"data", "model", "train", "runtime"}, key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; the sections are data, "
                          "model, train, runtime")
    if "data" not in raw:
        raise ConfigError(f"{source}: the data section is missing; give at least data.path")
    try:
        # an empty section (`train:`) is all defaults; any other non-mapping is refused by
        # _build, not read as defaults (`train: 0`)
        sections = {name: _build(cls, {} if raw.get(name) is None else raw[name], name)
                    for name, cls in SECTIONS.items() if name in raw or name != "data"}
        model_raw = {} if raw.get("model") is None else raw["model"]
        if not isinstance(model_raw, dict):
            example = model_raw if isinstance(model_raw, str) and model_raw else "egno"
            raise ConfigError(f"model must be a mapping of the model's name and options, got "
                              f"{model_raw!r}; write e.g. `model: {{name: {example}}}` (options "
                              f"beside the name: `model: {{name: {example}, hidden: 64}}`)")
        model_raw = dict(model_raw)
        name = model_raw.pop("name", "egno")
        if not isinstance(name, str):
            raise ConfigError(f"model.name must be a string, got {name!r}")
        _check_model_options(name, model_raw)
        model = ModelSection(name, model_raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return RunConfig(model=model, **sections)


def _check_model_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options model ``name`` does not have, saying how to drop them from the command
    line (a config written for another model, switched with ``--set model.name=...``)."""
    from surrogate_md.models import MODELS

    if name not in MODELS:
        return  # ModelSection names the choices
    known = {f.name for f in dataclasses.fields(MODELS[name].config_class)}
    unknown = sorted(set(options) - known, key=str)
    if unknown:
        drop = " ".join(f"--set model.{k}=null" for k in unknown)
        raise ConfigError(f"model {name!r} has no option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; its options are {sorted(known)}. "
                          f"Remove {'them' if len(unknown) > 1 else 'it'} from the config, or "
                          f"on the command line: {drop}")


def data_config_from_dict(values: dict[str, Any], source: str = "config") -> DataConfig:
    """A :class:`DataConfig` from plain values (e.g. a checkpoint's recorded data config)."""
    try:
        return _build(DataConfig, dict(values), "data")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or start from ``base``) and apply ``section.key=value`` overrides.

    Relative ``data.path`` entries are relative to the working directory and a leading ``~``
    is the home directory (the trainer records them as absolute paths in the run directory's
    resolved config).
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping with sections data, model, "
                              "train, runtime")
    elif base is not None:
        raw = _deepcopy(base)
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key[.sub]=value`` override in place (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=10")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must name a section and a field, e.g. "
                          "data.path=FILE.h5")
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not a YAML scalar "
                          f"({str(exc).splitlines()[0]})") from exc
    except ConfigError as exc:
        raise ConfigError(f"--set {item!r}: {exc}") from None
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = nxt
    if value is None and len(parts) == 2 and parts[0] == "model" and parts[1] != "name":
        # no model option takes null: it drops the option (back to the model's default), the
        # way to leave out another model's options when switching model.name
        node.pop(parts[1], None)
        return
    node[parts[-1]] = value


def save_config(config: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_text(path, text)
    return path


# -- typed construction ---------------------------------------------------------------------------
def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        keys = sorted(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{where} must be a mapping of its keys ({', '.join(keys)}), got "
                          f"{values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    # YAML keys need not be strings (`1:`, `null:`, and `on:`/`yes:` read as true)
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; the keys of {where} are "
                          f"{sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if value is None:
            raise ConfigError(f"{key} is empty; give it a value")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} entries, got {list(value)}")
        item_types = args if origin is tuple and args and args[-1] is not Ellipsis else \
            [args[0] if args else Any] * len(value)
        out = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        return _finite_float(value, key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {list(choices)}")


def _finite_float(value: Any, key: str) -> float:
    """``value`` as a finite float. YAML 1.1 (PyYAML) reads ``1e-3`` as a string, since its
    float syntax wants a dot in the mantissa, so strings that parse as a number are accepted."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _positive(key: str, value: Any) -> None:
    # written so that NaN fails too (every comparison with NaN is False)
    if not 0 < value < math.inf:
        finite = " and finite" if isinstance(value, float) else ""
        raise ConfigError(f"{key} must be > 0{finite}, got {value!r}")


def _non_negative(key: str, value: Any) -> None:
    if not 0 <= value < math.inf:
        finite = " and finite" if isinstance(value, float) else ""
        raise ConfigError(f"{key} must be >= 0{finite}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _deepcopy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(_plain(value)))


__all__ = ["DataConfig", "ModelSection", "RunConfig", "RuntimeConfig", "TrainConfig",
           "apply_override", "config_from_dict", "data_config_from_dict", "load_config",
           "save_config"]
