"""From a :class:`~surrogate_md.train.config.DataConfig` to datasets, statistics and tolerances.

Shared by the trainer and the evaluator so both cut windows the same way.
"""

from __future__ import annotations

import hashlib
import json
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
    frames_from_ps,
    make_windows,
    uses_finite_difference,
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
        windows: {split: (n, 2) (file, t0)}; datasets: {split: WindowDataset};
        identity: :func:`data_identity` of each file.
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
    identity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def velocity_source(self) -> str:
        return ("finite_difference" if uses_finite_difference(self.files, self.config.velocities)
                else "file")

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
                "data_identity": [dict(i) for i in self.identity],
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


def prepare_data(cfg: DataConfig, seed: int = 0, in_memory: bool | str = "auto",
                 rollout_jumps: int = 1) -> PreparedData:
    """Open the files of ``cfg``, build protocol, selection, graph, splits and datasets.

    ``rollout_jumps`` (``train.rollout_jumps``) > 1 gives the training dataset the reference
    frames of that many chained jumps (:func:`rollout_windows` keeps the training windows that
    have them); validation and test stay one-jump windows.

    Raises:
        DataError: missing/unreadable files, files of different systems, too few frames.
        ConfigError: jump/stride not a multiple of the saved-frame interval, bad protocol.
    """
    # `~/data/ala.h5` as a shell would read it: --set values and YAML strings are not expanded
    files = [open_trajectory(Path(p).expanduser()) for p in cfg.paths]
    first = files[0]
    for f in files[1:]:
        if not np.array_equal(f.topology.atomic_numbers, first.topology.atomic_numbers):
            raise DataError(f"{f.path}: its atoms differ from {first.path}; train on files of one "
                            "system (same atoms in the same order)")
        _check_same_atom_order(first, f)
    intervals = {round(f.interval_ps, 9) for f in files}
    if len(intervals) != 1:
        raise DataError(f"{', '.join(str(f.path) for f in files)}: saved-frame intervals differ "
                        f"({sorted(intervals)} ps); train on files saved at one interval")
    identity = [data_identity(f) for f in files]
    _check_distinct_files(files, identity)
    interval = first.interval_ps
    protocol = protocol_for(cfg, interval, str(first.path))
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
        # CA atoms and residue nodes sit 3.8 Å from their neighbours along the chain; atoms
        # are bonded at 1.6 Å (the MD17 rule)
        hint = 4.2 if cfg.selection in ("ca", "residues") else 1.6
        if spec.bond_cutoff_A is not None:
            why = (f"no two of them are closer than data.graph.bond_cutoff_A = "
                   f"{spec.bond_cutoff_A:g} Å in the first frame")
            fix = (f"raise data.graph.bond_cutoff_A (e.g. {hint:g})" if hint > spec.bond_cutoff_A
                   else "check the structure")
        else:
            why, fix = "the topology bonds none of them", f"set data.graph.bond_cutoff_A " \
                f"(e.g. {hint:g})"
        raise DataError(f"{first.path}: the {cfg.selection!r} atoms have no bonds for a bond "
                        f"graph ({why}); {fix} or set data.graph.kind: radius")
    windows = make_windows(files, protocol, split=cfg.split, fractions=tuple(cfg.fractions),
                           counts=None if cfg.counts is None else tuple(cfg.counts),
                           stride=cfg.stride, margin_frames=cfg.margin_frames, seed=seed,
                           velocities=cfg.velocities)
    if len(windows["train"]) == 0:
        raise DataError(f"{first.path}: the split leaves no training windows; generate more "
                        "frames, shorten the jump or change data.fractions/counts")
    if rollout_jumps > 1:
        windows["train"] = rollout_windows(windows["train"], files, protocol, rollout_jumps,
                                           cfg.split)
    prepared = PreparedData(cfg, files, first.topology, protocol, interval, selection, graph,
                            windows, identity=identity)
    for name, w in windows.items():
        prepared.datasets[name] = WindowDataset(
            files, w, protocol, selection, graph, in_memory=in_memory, velocities=cfg.velocities,
            rollout_jumps=rollout_jumps if name == "train" else 1)
    log.info("data: %s, %d atoms -> %d %s nodes x %d channels; jump %g ps (%d frames), P = %d; "
             "windows train/val/test = %d/%d/%d", ", ".join(Path(p).name for p in cfg.paths),
             first.n_atoms, selection.n_nodes, cfg.selection, selection.n_channels,
             protocol.jump_frames * interval, protocol.jump_frames, protocol.n_out,
             *(len(windows[k]) for k in ("train", "val", "test")))
    return prepared


def rollout_windows(train: np.ndarray, files: list[TrajectoryFile], protocol: Protocol,
                    jumps: int, split: str) -> np.ndarray:
    """The training windows (n, 2) (file, t0) that hold ``jumps`` chained jumps.

    Blocked split: those whose later jumps end at or before the last frame the training block
    already reads (t0 + jumps·ΔT <= last training t0 + ΔT of the file), so the chained targets
    never reach into the gap or the validation and test blocks. Paper split (start frames drawn
    over the whole trajectory, which the one-jump windows of its splits share already): those
    whose later jumps end inside the file.

    Raises:
        DataError: no training window is long enough, naming the file and the fix.
    """
    jump = protocol.jump_frames
    keep = np.zeros(len(train), dtype=bool)
    for fi, f in enumerate(files):
        mine = train[:, 0] == fi
        if not mine.any():
            continue
        last = (int(train[mine, 1].max()) + jump if split == "blocked" else f.n_frames - 1)
        keep |= mine & (train[:, 1] + jumps * jump <= last)
    if not keep.any():
        paths = ", ".join(str(f.path) for f in files)
        raise DataError(f"{paths}: no training window has room for train.rollout_jumps = "
                        f"{jumps} chained jumps of {jump} frames inside "
                        f"{'its training block' if split == 'blocked' else 'its file'}; lower "
                        "train.rollout_jumps, shorten data.jump_ps or generate more frames")
    if not keep.all():
        log.info("train.rollout_jumps = %d: %d of %d training windows hold %d chained jumps "
                 "and train", jumps, int(keep.sum()), len(train), jumps)
    return train[keep]


def ignored_settings(cfg: DataConfig) -> list[str]:
    """Messages for data.* settings given a value that the rest of ``cfg`` leaves unused
    (a graph cutoff on a bond graph, a history stride on the s2t protocol, ...): typically a
    sign that another setting was meant. Settings left at their defaults are not reported."""
    g, defaults = cfg.graph, type(cfg.graph)()
    out = []

    def unused(key: str, why: str) -> None:
        out.append(f"data.{key} is ignored: {why}")

    if cfg.protocol == "s2t" and cfg.history_stride_ps is not None:
        unused(f"history_stride_ps = {cfg.history_stride_ps:g}",
               "the s2t protocol takes no past frames (data.protocol: history does)")
    if cfg.split == "paper" and cfg.stride != 1:
        unused(f"stride = {cfg.stride}", "it spaces the start frames of the blocked split; the "
               "paper split draws data.counts start frames at random")
    if cfg.split == "paper" and tuple(cfg.fractions) != tuple(DataConfig.fractions):
        unused(f"fractions = {list(cfg.fractions)}", "they share the frames out in the "
               "blocked split; the paper split takes data.counts windows")
    if cfg.split == "blocked" and cfg.margin_frames != DataConfig.margin_frames:
        unused(f"margin_frames = {cfg.margin_frames}", "it applies to the paper split; the "
               "blocked split keeps its blocks a window apart by itself")
    if g.kind != "radius" and g.cutoff_A != defaults.cutoff_A:
        unused(f"graph.cutoff_A = {g.cutoff_A:g}", f"data.graph.kind is {g.kind!r}; a cutoff "
               "builds the graph only with data.graph.kind: radius (bonds inferred by distance: "
               "data.graph.bond_cutoff_A)")
    if g.kind != "radius" and g.max_neighbours is not None:
        unused(f"graph.max_neighbours = {g.max_neighbours}", f"data.graph.kind is {g.kind!r}; "
               "it caps the neighbours of radius graphs")
    if g.kind != "bonds" and g.bond_cutoff_A is not None:
        unused(f"graph.bond_cutoff_A = {g.bond_cutoff_A:g}", f"data.graph.kind is {g.kind!r}; "
               "it infers the bonds of bond graphs")
    if g.kind != "bonds" and not g.two_hop:
        unused("graph.two_hop = false", f"data.graph.kind is {g.kind!r}; two-hop edges belong "
               "to bond graphs")
    return out


def _check_distinct_files(files: list[TrajectoryFile], identity: list[dict[str, Any]]) -> None:
    """Refuse a file listed twice, or two copies of one trajectory: every window would be
    there twice, and under the paper split (start frames drawn per file) a test window of one
    copy is a training window of the other."""
    seen: dict[str, TrajectoryFile] = {}
    for f, ident in zip(files, identity):
        earlier = seen.get(ident["sha256"])
        if earlier is not None:
            same = ("is listed twice in data.path" if earlier.path.resolve() == f.path.resolve()
                    else f"holds the same frames as {earlier.path}")
            raise DataError(f"{f.path}: {same}; its windows would be counted twice and, split "
                            "per file, land in training and test at once. List each "
                            "trajectory once")
        seen[ident["sha256"]] = f


def _check_same_atom_order(first: TrajectoryFile, other: TrajectoryFile) -> None:
    """Refuse ``other`` when it holds the atoms of ``first`` (same elements in the same order)
    under the same names in another order: atoms of one element swapped (CA and CB, methyl
    hydrogens), which the elements cannot show, and every window of ``other`` would then train
    one atom on another's motion. Names that differ otherwise are taken for another naming
    convention of the same atoms: a warning."""
    ref = np.char.upper(np.char.strip(first.topology.atom_names.astype(str)))
    names = np.char.upper(np.char.strip(other.topology.atom_names.astype(str)))
    differ = np.flatnonzero(names != ref)
    if len(differ) == 0:
        return
    shown = ", ".join(f"atom {i}: {names[i]} ({ref[i]} in {first.path.name})"
                      for i in differ[:4])
    if np.array_equal(np.sort(names), np.sort(ref)):
        raise DataError(f"{other.path}: holds the atoms of {first.path} in another order "
                        f"({len(differ)} atoms moved; {shown}); windows cut from the two files "
                        "would mix up those atoms. Write every file with the atom order of one "
                        "topology (python -m datagen ingest with the same topology file)")
    log.warning("%s: %d atom names differ from %s (%s); fine if only the naming convention "
                "differs, wrong if atoms of one element were reordered", other.path,
                len(differ), first.path, shown)


def protocol_for(cfg: DataConfig, interval_ps: float, source: str) -> Protocol:
    """The protocol of ``cfg`` in saved frames of ``source`` (frames ``interval_ps`` apart).

    Raises:
        ConfigError: naming ``source`` and the data.* keys whose times are no whole number of
            frames, or whose jump does not split into data.n_out equal steps.
    """
    try:
        jump = frames_from_ps(cfg.jump_ps, interval_ps, "data.jump_ps")
        # s2t takes no past frames: a history stride given there is unused (ignored_settings)
        stride = 1 if cfg.history_stride_ps is None or cfg.protocol != "history" else \
            frames_from_ps(cfg.history_stride_ps, interval_ps, "data.history_stride_ps")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if jump % cfg.n_out:
        fits = [k for k in range(1, jump + 1) if jump % k == 0]
        raise ConfigError(
            f"{source}: data.n_out = {cfg.n_out} does not divide the jump: data.jump_ps = "
            f"{cfg.jump_ps:g} ps is {jump} saved frames of {interval_ps:g} ps, and the "
            f"{cfg.n_out} outputs must be a whole number of frames apart; set data.n_out to one "
            f"of {fits} or data.jump_ps to a multiple of {cfg.n_out} x {interval_ps:g} ps")
    try:
        return Protocol(cfg.protocol, jump, cfg.n_out, cfg.history, stride)
    except ConfigError as exc:  # checked above; this keeps any other refusal tied to data.*
        raise ConfigError(f"{source}: data: {exc}") from None


IDENTITY_FRAMES = 8  # frames sampled by data_identity


def data_identity(f: TrajectoryFile) -> dict[str, Any]:
    """What a resumed run checks to tell that ``f`` still holds the frames it was trained on.

    ``{path, n_frames, fields, sha256}``: the frame count, the fields present (velocities decide
    how inputs are built), and a sha256 of the metadata (engine, seed, force field, interval...),
    the atomic numbers, the whole time axis (8 bytes a frame, read when the file opens) and the
    positions of :data:`IDENTITY_FRAMES` frames spread evenly over the file, first and last
    included. It is a hash of the content, not of the file's bytes: hashing a multi-GB
    trajectory whole would add minutes to every resume, and size + mtime would refuse an
    unchanged file copied to another disk (the mtime changes) while missing a file regenerated
    at the same length (the same size). Regenerated MD differs in its metadata and frames,
    extended or cut data in its frame count and time axis; an edit of frames between the
    sampled ones goes unnoticed.
    """
    h = hashlib.sha256()
    h.update(json.dumps(f.metadata, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(f.topology.atomic_numbers, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(f.time_ps, dtype=np.float64).tobytes())
    n = f.n_frames
    if n:
        frames = np.unique(np.linspace(0, n - 1, min(n, IDENTITY_FRAMES)).round()
                           .astype(np.int64))
        h.update(np.ascontiguousarray(f.read(frames)).tobytes())
    fields = [name for name in ("positions", "velocities", "forces", "box")
              if getattr(f, name) is not None]
    return {"path": str(f.path), "n_frames": int(n), "fields": fields,
            "sha256": h.hexdigest()[:32]}


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
