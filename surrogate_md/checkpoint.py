"""Checkpoint format: a state dict plus plain metadata, loadable with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values (no pickled classes)::

    format: "surrogate-md-checkpoint", format_version: int
    model: {name, config (dict)}, state_dict: {...}, normalisation: {...}
    protocol: {kind, jump_frames, n_out, history, history_stride, interval_ps, jump_ps,
               times_ps, history_stride_ps, velocity_source}
    selection: NodeSelection.to_dict(), graph: GraphBuilder.to_dict()
    topology: {atomic_numbers, atom_names, residue_ids, residue_names, segment_ids, bonds,
    masses} (full system)
    validity: {bonds, bond_length_mean_A, bond_tolerance_A, min_distance_A, gyration_range_A}
    provenance (the trainer's: data_files, data_metadata, data_identity (what a resume checks
    the files against), data_config, n_windows, run_config), versions: {surrogate_md, torch}
    training (last.pt only): optimiser, scheduler, RNG states, epoch, step, best metric

Writes are atomic (temporary file + rename). :func:`migrate` upgrades older format versions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from surrogate_md.errors import CheckpointError
from surrogate_md.fileio import atomic_path

FORMAT = "surrogate-md-checkpoint"
FORMAT_VERSION = 3


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format markers) atomically to ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: directory {path.parent} does not exist; create it first")
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    with atomic_path(path, fsync=True) as tmp:
        torch.save(data, tmp)
    return path


def migrate(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Upgrade a checkpoint dict to the current format version (the one place that does so)."""
    version = data.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: checkpoint has no format_version; it was not written by "
                              "surrogate-md")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                              f"surrogate-md reads ({FORMAT_VERSION}); upgrade surrogate-md")
    if version < 2:
        data = _complex_vector_convolution(data)
    if version < 3:
        data = _painet_without_common_scale(data)
    data["format_version"] = FORMAT_VERSION
    return data


def _complex_vector_convolution(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: EGNO's temporal convolution on vectors gained an imaginary part of its
    weights (``conv_x.<i>.weight_im``), as the reference has; a zero imaginary part computes
    exactly what the format-1 model did. The optimiser state of a format-1 ``last.pt`` has no
    moments for the new weights, so such a run cannot be resumed (``training.resumable``)."""
    state = data.get("state_dict", {})
    added = False
    for key in list(state):
        if key.startswith("conv_x.") and key.endswith(".weight"):
            im = key[:-len("weight")] + "weight_im"
            if im not in state:
                state[im] = torch.zeros_like(state[key])
                added = True
    if added and isinstance(data.get("training"), dict):
        data["training"]["resumable"] = (
            "it was written before EGNO's vector convolution had complex weights (checkpoint "
            "format 1); start a new run")
    return data


def _painet_without_common_scale(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 -> 3: PAINET lost ``log_s``, a learnable common scale of its type-pair
    matrices Phi and Psi that cancels in the normalised attention (its gradient was zero, its
    value never changed a prediction). It is dropped from the weights and, in a ``last.pt``, from
    the optimiser state, whose other entries are renumbered in the order of the current model's
    parameters, so the run resumes where it stopped (to float32 rounding: a trained log s a few
    1e-6 from zero cancelled only to about 1e-8 relative)."""
    state = data.get("state_dict", {})
    if data.get("model", {}).get("name") != "painet" or "log_s" not in state:
        return data
    saved_keys = list(state)
    del state["log_s"]
    training = data.get("training")
    if isinstance(training, dict) and isinstance(training.get("optimiser"), dict):
        from surrogate_md.models import build_model

        with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the RNG
            model = build_model("painet", data["model"].get("config") or {})
        # the trainer's optimiser holds the parameters that require a gradient, in model order
        params = dict(model.named_parameters())
        trained = [name for name, p in params.items() if p.requires_grad]
        saved = [k for k in saved_keys if k == "log_s" or k in params]
        optimiser = training["optimiser"]
        n_saved = sum(len(g.get("params", ())) for g in optimiser.get("param_groups", ()))
        if saved == [*trained[:trained.index("type_psi") + 1], "log_s",
                     *trained[trained.index("type_psi") + 1:]] and n_saved == len(saved):
            training["optimiser"] = _drop_optimiser_entry(optimiser, saved.index("log_s"))
        else:
            training["resumable"] = ("its PAINET parameters do not match this version's; start "
                                     "a new run")
    return data


def _drop_optimiser_entry(state: dict[str, Any], index: int) -> dict[str, Any]:
    """A torch optimiser ``state_dict`` without parameter ``index``, later ones renumbered."""
    def renumber(i: int) -> int:
        return i - 1 if i > index else i

    groups = [{**g, "params": [renumber(i) for i in g["params"] if i != index]}
              for g in state["param_groups"]]
    kept = {renumber(int(i)): v for i, v in state["state"].items() if int(i) != index}
    return {**state, "state": kept, "param_groups": groups}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and migrate it to the current format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path (a training "
                              "run writes RUN_DIR/best.pt and RUN_DIR/last.pt)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupted or foreign files
        raise CheckpointError(f"{path}: not a readable surrogate-md checkpoint ({type(exc).__name__}"
                              f": {str(exc).splitlines()[0] if str(exc) else ''}); it may be "
                              "truncated or not a checkpoint: use a best.pt/last.pt written by "
                              "`python -m surrogate_md.train`") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a surrogate-md checkpoint (no format marker); use a "
                              "best.pt/last.pt written by `python -m surrogate_md.train`")
    return migrate(data, path)


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """Short sha256 of a file (identifies the checkpoint in trajectory headers and logs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def build_payload(model: torch.nn.Module, *, protocol: dict[str, Any], selection: Any,
                  graph: Any, topology: Any, validity: Any = None,
                  provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inference part of a checkpoint (what :class:`~surrogate_md.Surrogate` needs).

    Args:
        model: a registered :class:`~surrogate_md.models.TrajectoryModel` (normalisation set).
        protocol: ``Protocol.to_dict()`` plus ``interval_ps``, ``jump_ps``, ``times_ps``,
            ``history_stride_ps`` and ``velocity_source`` (``file`` or ``finite_difference``).
        selection: :class:`~surrogate_md.data.selection.NodeSelection`.
        graph: :class:`~surrogate_md.data.windows.GraphBuilder`.
        topology: :class:`~surrogate_md.data.Topology` of the full system.
        validity: :class:`~surrogate_md.validity.ValidityReference` over the model atoms.
        provenance: data files and their metadata (JSON-like).
    """
    import dataclasses

    import surrogate_md

    return {
        "model": {"name": model.name, "config": dataclasses.asdict(model.config)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalisation": model.normalisation(),
        "protocol": dict(protocol),
        "selection": selection.to_dict(),
        "graph": graph.to_dict(),
        "topology": {"atomic_numbers": topology.atomic_numbers.tolist(),
                     "masses": topology.masses.tolist(),
                     "atom_names": topology.atom_names.tolist(),
                     "residue_ids": topology.residue_ids.tolist(),
                     "residue_names": topology.residue_names.tolist(),
                     "segment_ids": topology.segment_ids.tolist(),
                     "bonds": topology.bonds.tolist()},
        "validity": None if validity is None else validity.to_dict(),
        "provenance": provenance or {},
        "units": {"length": "Angstrom", "time": "ps", "velocity": "Angstrom/ps",
                  "energy": "kJ/mol", "mass": "amu"},
        "versions": {"surrogate_md": surrogate_md.__version__, "torch": str(torch.__version__)},
    }
