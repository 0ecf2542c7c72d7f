"""From a :class:`~surrogate_md.train.config.DataConfig` to datasets, statistics and tolerances.

Shared by the trainer and the evaluator so both cut windows the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surrogate_md.data import keys as K
from surrogate_md.data.h5md import Topology, TrajectoryFile, open_trajectory
from surrogate_md.data.selection import NodeSelection, select_nodes
from surrogate_md.data.windows import (
    GraphBuilder,
    Protocol,
    WindowDataset,
    make_windows,
)
from surrogate_md.errors import ConfigError, DataError
from surrogate_md.train.config import DataConfig
from surrogate_md.validity import ValidityReference

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything cut from the dataset files for one run.

    Attributes:
        files: open dataset files; topology: full-system topology (of the first file);
        protocol: in frames; interval_ps: saved-frame interval (ps); selection, graph;
        windows: {split: (n, 2) (file, t0)}; datasets: {split: WindowDataset}.
    """

    config: DataConfig
    files: list[TrajectoryFile]
    topology: Topology
    protocol: Protocol
    interval_ps: float
    selection: NodeSelection
    graph: GraphBuilder
    windows: dict[str, np.ndarray]
    datasets: dict[str, WindowDataset] = field(default_factory=dict)

    @property
    def velocity_source(self) -> str:
        return "finite_difference" if any(f.velocities is None for f in self.files) else "file"

    def protocol_meta(self) -> dict[str, Any]:
        """Protocol in frames plus its times in ps (the checkpoint's ``protocol`` entry)."""
        p = self.protocol
        return {**p.to_dict(), "interval_ps": self.interval_ps,
                "jump_ps": p.jump_frames * self.interval_ps,
                "times_ps": (p.out_frames * self.interval_ps).tolist(),
                "history_stride_ps": p.history_stride * self.interval_ps,
                "velocity_source": self.velocity_source}

    def provenance(self) -> dict[str, Any]:
        return {"data_files": [str(f.path) for f in self.files],
                "data_metadata": [f.metadata for f in self.files],
                "data_config": _plain(self.config),
                "n_windows": {k: int(len(v)) for k, v in self.windows.items()}}

    def model_bonds(self) -> np.ndarray:
        """(B, 2) bonds between model atoms (indices into ``selection.atom_index``)."""
        sub = self.topology.subset(self.selection.atom_index)
        if len(sub.bonds) or self.selection.n_channels > 1 or self.graph.bonds is None:
            return sub.bonds
        return self.graph.bonds  # topology without bonds: the graph's (inferred) bonds

    def close(self) -> None:
        for f in self.files:
            f.close()


def prepare_data(cfg: DataConfig, seed: int = 0, in_memory: bool | str = "auto"
                 ) -> PreparedData:
    """Open the files of ``cfg``, build protocol, selection, graph, splits and datasets.

    Raises:
        DataError: missing/unreadable files, files of different systems, too few frames.
        ConfigError: jump/stride not a multiple of the saved-frame interval, bad protocol.
    """
    files = [open_trajectory(p) for p in cfg.paths]
    first = files[0]
    for f in files[1:]:
        if not np.array_equal(f.topology.atomic_numbers, first.topology.atomic_numbers):
            raise DataError(f"{f.path}: its atoms differ from {first.path}; train on files of one "
                            "system (same atoms in the same order)")
    intervals = {round(f.interval_ps, 9) for f in files}
    if len(intervals) != 1:
        raise DataError(f"{', '.join(str(f.path) for f in files)}: saved-frame intervals differ "
                        f"({sorted(intervals)} ps); train on files saved at one interval")
    interval = first.interval_ps
    protocol = Protocol.from_ps(cfg.protocol, cfg.jump_ps, cfg.n_out, interval,
                                history=cfg.history,
                                history_stride_ps=cfg.history_stride_ps)
    selection = select_nodes(first.topology, cfg.selection, source=str(first.path))
    spec = g = cfg.graph
    if g.radius_channel is not None and g.radius_channel >= selection.n_channels:
        raise ConfigError(f"data.graph.radius_channel = {g.radius_channel} but selection "
                          f"{cfg.selection!r} has {selection.n_channels} channel(s); use 0"
                          + (" or 1 (CA)" if selection.n_channels > 1 else ""))
    _warn_periodic_solvent(first, selection, spec)
    first_nodes = selection.gather(first.read(np.array([0])))[0]
    graph = GraphBuilder.for_selection(spec, selection, first.topology.bonds, first_nodes)
    if spec.kind == "bonds" and (graph.bonds is None or len(graph.bonds) == 0):
        raise DataError(f"{first.path}: the {cfg.selection!r} atoms have no bonds for a bond "
                        "graph; set data.graph.bond_cutoff_A (e.g. 1.6) or data.graph.kind: "
                        "radius")
    windows = make_windows(files, protocol, split=cfg.split, fractions=tuple(cfg.fractions),
                           counts=None if cfg.counts is None else tuple(cfg.counts),
                           stride=cfg.stride, margin_frames=cfg.margin_frames, seed=seed)
    if len(windows["train"]) == 0:
        raise DataError(f"{first.path}: the split leaves no training windows; generate more "
                        "frames, shorten the jump or change data.fractions/counts")
    prepared = PreparedData(cfg, files, first.topology, protocol, interval, selection, graph,
                            windows)
    for name, w in windows.items():
        prepared.datasets[name] = WindowDataset(files, w, protocol, selection, graph,
                                                in_memory=in_memory)
    log.info("data: %s, %d atoms -> %d %s nodes x %d channels; jump %g ps (%d frames), P = %d; "
             "windows train/val/test = %d/%d/%d", ", ".join(Path(p).name for p in cfg.paths),
             first.n_atoms, selection.n_nodes, cfg.selection, selection.n_channels,
             protocol.jump_frames * interval, protocol.jump_frames, protocol.n_out,
             *(len(windows[k]) for k in ("train", "val", "test")))
    return prepared


def _warn_periodic_solvent(f, selection, spec) -> None:
    """Radius graphs see unwrapped coordinates and no periodic images: in a periodic box the
    solvent's neighbours across the box faces are missing, and diffusing molecules drift apart
    in those coordinates. Warn when such a graph takes solvent or ions as nodes."""
    if f.box is None or spec.kind == "bonds":
        return
    names = np.char.upper(np.char.strip(f.topology.residue_names.astype(str)))
    from surrogate_md.data.selection import ION_RESIDUES, WATER_RESIDUES

    solvent = np.isin(names[selection.atom_index], list(WATER_RESIDUES | ION_RESIDUES))
    if solvent.any():
        log.warning("%s: the %r selection takes %d water/ion atoms of a periodic box, and %s "
                    "graphs are built without periodic images: their neighbours across the box "
                    "faces are missing; select the solute (strip the solvent with `python -m "
                    "datagen ingest --select protein`) unless this is meant", f.path,
                    selection.name, int(solvent.sum()), spec.kind)


def normalisation_stats(dataset: WindowDataset, max_windows: int, seed: int = 0
                        ) -> dict[str, float]:
    """Statistics of the training split for ``model.set_normalisation``.

    Returns:
        ``velocity_scale``: RMS velocity component (Å/ps); ``displacement_scale``: RMS component
        of the displacement from t0 to the end of the jump (Å); ``time_scale``: the jump (ps).
        Degenerate (zero) statistics fall back to 1.
    """
    rng = np.random.default_rng(seed)
    n = len(dataset)
    idx = np.sort(rng.choice(n, size=min(n, max_windows), replace=False))
    v2, d2, count = 0.0, 0.0, 0
    for i in idx:
        item = dataset[int(i)]
        v2 += float(np.square(item[K.VEL]).sum())
        d2 += float(np.square(item[K.TARGET][-1] - item[K.POS]).sum())
        count += item[K.POS].size
    vel = float(np.sqrt(v2 / count)) if count else 0.0
    disp = float(np.sqrt(d2 / count)) if count else 0.0
    return {"velocity_scale": vel if vel > 0 else 1.0,
            "displacement_scale": disp if disp > 0 else 1.0,
            "time_scale": float(dataset.times_ps[-1])}


def validity_reference(prepared: PreparedData, max_frames: int = 200, seed: int = 0
                       ) -> ValidityReference:
    """Bond-length and clash tolerances from training frames (model atoms)."""
    train = prepared.windows["train"]
    rng = np.random.default_rng(seed)
    pick = train[np.sort(rng.choice(len(train), size=min(len(train), max_frames),
                                    replace=False))]
    frames = []
    for fi, t0 in pick:
        full = prepared.files[int(fi)].read(np.array([int(t0)]))[0]
        frames.append(full[prepared.selection.atom_index])
    return ValidityReference.from_frames(np.stack(frames), prepared.model_bonds())


def _plain(cfg: Any) -> Any:
    import dataclasses

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(dataclasses.asdict(cfg))
