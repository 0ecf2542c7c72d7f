"""Model registry: the one list of model names.

The CLI choices, the checkpoint loader and the parametrised tests all read :data:`MODELS`; a model
added here is trained, loaded and equivariance-tested without touching anything else.

Registered: ``constant``, ``linear`` (floors), ``egnn``, ``egno``, ``estag``, ``painet``.

One interface: ``model(batch) -> (P, N, C, 3)`` Å, positions at the P offsets ``batch[TIMES]``.
Mixed-size batches are a flat node list with ``batch[GRAPH]`` (no padding in the interface): every
per-system reduction (EGNO's centroids, ESTAG's centring of the history, PAINET's all-pair sums)
is a segment operation over ``GRAPH`` (``index_add_``), and message passing only follows
``EDGE_INDEX``, so a system's outputs do not depend on what else is in the batch. The time axis
(P output times, or T history frames for ESTAG) is a leading tensor dimension over the one shared
edge list; no model replicates the graph per time point.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from surrogate_md.errors import ConfigError
from surrogate_md.models.base import ModelConfig, TrajectoryModel
from surrogate_md.models.baselines import ConstantModel, LinearModel
from surrogate_md.models.egnn import EGNNModel
from surrogate_md.models.egno import EGNOModel
from surrogate_md.models.estag import ESTAGModel
from surrogate_md.models.painet import PAINETModel

MODELS: dict[str, type[TrajectoryModel]] = {
    cls.name: cls
    for cls in (ConstantModel, LinearModel, EGNNModel, EGNOModel, ESTAGModel, PAINETModel)
}


def config_from_dict(name: str, values: dict[str, Any] | None = None) -> ModelConfig:
    """The typed config of model ``name`` from plain values.

    Unknown keys, wrong types (``true`` is not a number), sizes and scales that are not finite
    and > 0, and combinations a model cannot build (its config's ``__post_init__``) are a
    :class:`ConfigError` naming ``model.<option>``. Numbers written as strings that parse as
    floats (``1e-3``, which YAML 1.1 reads as a string) are accepted for float options.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name].config_class
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"model {name!r} has no option {unknown[0]!r}; its options are "
                          f"{sorted(known)}")
    for key, value in values.items():
        want = known[key].type if isinstance(known[key].type, type) else None
        want = want or type(known[key].default)
        values[key] = _option_value(name, key, value, want, known[key].default)
    time_dim = values.get("time_dim", getattr(cls, "time_dim", 2))
    if time_dim % 2:
        raise ConfigError(f"model.time_dim = {time_dim}: model {name!r} needs an even size (sin "
                          f"and cos pairs); set model.time_dim to e.g. {time_dim + 1}")
    return cls(**values)


def _option_value(name: str, key: str, value: Any, want: type, default: Any) -> Any:
    """``value`` checked (and for floats converted) to the option's type ``want``."""
    where = f"model {name!r} option {key!r} (model.{key})"
    if want is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int in Python: model.hidden = true must not become a size of 1
    if want in (int, float, bool, str) and (not isinstance(value, want) or (
            want is not bool and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {want.__name__}, got {value!r}; e.g. "
                          f"model.{key}: {default!r}")
    if want in (int, float) and not 0 < value < math.inf:  # every size and scale is positive
        raise ConfigError(f"{where} must be > 0 and finite, got {value!r}; e.g. "
                          f"model.{key}: {default!r}")
    return value


def build_model(name: str, config: ModelConfig | dict[str, Any] | None = None) -> TrajectoryModel:
    """Instantiate registered model ``name`` from its config (dataclass or dict)."""
    if not isinstance(config, ModelConfig):
        config = config_from_dict(name, config)
    return MODELS[name](config)


def compile_model(model: torch.nn.Module, *, dynamic: bool | None = None, **options: Any
                  ) -> torch.nn.Module:
    """``torch.compile`` a model so that its forward is one graph, and the chunked edge pass of
    its EGNN layers chunk by chunk.

    The models read the number of systems of a batch (``int(batch[N_GRAPHS])``) and PAINET the
    largest system size, as Python integers; Dynamo breaks the graph there unless scalar outputs
    are captured, which this turns on (process-wide, as the setting is global). Every registered
    model then traces as one graph (tested with ``fullgraph=True`` and the ``eager`` backend),
    except the recomputed edge pass of large graphs, which runs eagerly between compiled parts.
    With the default inductor backend PAINET does not lower as one graph (torch 2.13: its
    per-system padded attention products have data-dependent sizes, and inductor's bmm lowering
    cannot guard on them): ``fullgraph=True`` raises, and the default ``fullgraph=False``
    compiles it in pieces with eager code between them (same results, to 1e-7). ``options`` go
    to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``).

    ``dynamic=None`` is torch's default: the first batch compiles with static shapes and a batch
    of another size recompiles once with dynamic ones. (``dynamic=True`` from the start failed an
    inductor stride check on AdK-size graphs with torch 2.13.) Measured on one AVX2 CPU thread
    (``bench_training.py --compile``): EGNO trains 1.1x faster at MD17 size, PAINET and ESTAG
    slower; compiling takes 1-3 minutes. On GPUs (unmeasured here) the small elementwise kernels
    it fuses weigh more.

    Large graphs (AdK size) spend their time in the chunked edge pass, which the model's graph
    leaves to eager code: there each chunk (:func:`~surrogate_md.models.layers._chunk_sums`) is
    compiled on its own, with dynamic shapes (chunks and graphs differ in size), forward and
    recomputed backward, with the same ``backend`` and ``mode``: EGNO AdK backbone training steps
    1.15-1.24x faster under bf16 autocast on one Intel Xeon (AMX) thread, 1.05-1.16x in fp32.
    This switches the model's own EGNN layers to the compiled chunks too (``compiled_chunk``).
    """
    import torch._dynamo

    from surrogate_md.models.layers import EGNNLayer, _chunk_sums

    torch._dynamo.config.capture_scalar_outputs = True
    chunk_options = {k: v for k, v in options.items() if k in ("backend", "mode")}
    compiled_chunk = torch.compile(_chunk_sums, dynamic=True, **chunk_options)
    for layer in model.modules():
        if isinstance(layer, EGNNLayer):
            layer.compiled_chunk = compiled_chunk
    return torch.compile(model, dynamic=dynamic, **options)


__all__ = ["MODELS", "ModelConfig", "TrajectoryModel", "build_model", "compile_model",
           "config_from_dict"]
