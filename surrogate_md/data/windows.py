"""Sampling protocols, splits, training windows and batches.

Protocols (see design.md):

- **S2T**: input = the state at t0 (positions + velocities); targets = frames at
  t0 + k·ΔT/P, k = 1..P. **S2S** is S2T with P = 1.
- **History**: input = T past frames t0-(T-1)·s … t0 (and the velocity at t0); targets as S2T.
- **Rollout** evaluation chains jumps (see :mod:`surrogate_md.evaluate`).

Velocities come from the file when it has them; otherwise they are the backward one-frame
difference (x[t0] - x[t0-1]) / Δt in Å/ps, which never looks past t0 (a central difference would
leak part of the target when frames are far apart).

Splits:

- ``blocked`` (default, honest): the valid start frames are cut into contiguous train/val/test
  blocks separated by a gap longer than one window, so no test window shares a frame with a
  training window.
- ``paper``: start frames drawn at random (seeded) from the pool that excludes the first and last
  ``margin_frames`` frames, as EGNO/PAINET do for MD17 (500/2000/2000, margin 10000).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from surrogate_md.data import keys as K
from surrogate_md.data.graphs import bond_edges, full_edges, infer_bonds, radius_edges
from surrogate_md.data.h5md import TrajectoryFile
from surrogate_md.data.selection import NodeSelection, select_nodes
from surrogate_md.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PROTOCOLS = ("s2t", "history")
SPLITS = ("blocked", "paper")
SPLIT_NAMES = ("train", "val", "test")


def frames_from_ps(value_ps: float, interval_ps: float, what: str) -> int:
    """Convert a duration in ps to a whole number of saved frames (error if not a multiple)."""
    if interval_ps <= 0:
        raise DataError(f"saved-frame interval must be > 0 ps, got {interval_ps}")
    n = value_ps / interval_ps
    if n < 0.5 or abs(n - round(n)) > 1e-6 * max(1.0, n):
        raise ConfigError(f"{what} = {value_ps} ps is not a positive multiple of the dataset's "
                          f"saved-frame interval {interval_ps} ps; choose a multiple")
    return int(round(n))


@dataclass(frozen=True)
class Protocol:
    """A sampling protocol in frames of the dataset.

    Attributes:
        kind: ``s2t`` or ``history``.
        jump_frames: ΔT in saved frames.
        n_out: P, number of output frames, evenly spaced up to ΔT (ΔT divisible by P).
        history: T, number of input frames (1 for S2T).
        history_stride: s, frames between history frames.
    """

    kind: str = "s2t"
    jump_frames: int = 1
    n_out: int = 1
    history: int = 1
    history_stride: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.kind!r}; choose one of {PROTOCOLS}")
        for name in ("jump_frames", "n_out", "history", "history_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"protocol {name} must be >= 1, got {getattr(self, name)}")
        if self.jump_frames % self.n_out:
            raise ConfigError(f"the jump ({self.jump_frames} frames) must be divisible by the "
                              f"number of output frames P = {self.n_out}")
        if self.kind == "s2t" and self.history != 1:
            raise ConfigError("the s2t protocol takes one input frame; set history = 1 or use "
                              "the history protocol")

    @classmethod
    def from_ps(cls, kind: str, jump_ps: float, n_out: int, interval_ps: float,
                history: int = 1, history_stride_ps: float | None = None) -> Protocol:
        jump = frames_from_ps(jump_ps, interval_ps, "jump_ps")
        stride = 1 if history_stride_ps is None else frames_from_ps(
            history_stride_ps, interval_ps, "history_stride_ps")
        return cls(kind, jump, n_out, history, stride)

    @property
    def out_frames(self) -> np.ndarray:
        """(P,) frame offsets of the targets after t0."""
        return np.arange(1, self.n_out + 1) * (self.jump_frames // self.n_out)

    def before(self, finite_difference: bool) -> int:
        """Frames needed before t0."""
        return (self.history - 1) * self.history_stride + int(finite_difference)

    @property
    def after(self) -> int:
        return self.jump_frames

    def window_length(self, finite_difference: bool) -> int:
        return self.before(finite_difference) + self.after + 1

    def to_dict(self) -> dict:
        return asdict(self)


def split_starts(n_frames: int, protocol: Protocol, *, split: str = "blocked",
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 counts: tuple[int, int, int] | None = None, stride: int = 1,
                 margin_frames: int = 10000, finite_difference: bool = False, seed: int = 0,
                 source: str = "") -> dict[str, np.ndarray]:
    """Start frames t0 of the train/val/test windows of one trajectory.

    Args:
        n_frames: frames in the trajectory.
        split: ``blocked`` or ``paper``.
        fractions: blocked split: shares of the valid range for train/val/test, summing to at
            most 1 (what is left over at the end of the range is not used).
        counts: number of windows per split (paper: required, e.g. (500, 2000, 2000); blocked:
            optional cap, drawn at random inside each block).
        stride: blocked split: frames between consecutive start frames.
        margin_frames: paper split: frames excluded at both ends.
        finite_difference: velocities come from x[t0] - x[t0-1] (one more frame needed).
        seed: the data seed.
    Returns:
        {"train": (n,), "val": (n,), "test": (n,)} sorted int arrays.
    """
    where = f"{source}: " if source else ""
    lo = protocol.before(finite_difference)
    hi = n_frames - 1 - protocol.after  # last valid t0
    rng = np.random.default_rng(seed)
    if hi < lo:
        raise DataError(f"{where}{n_frames} frames are too few for one window of "
                        f"{protocol.window_length(finite_difference)} frames; use a shorter jump "
                        "or generate more frames")
    if split == "paper":
        if counts is None:
            raise ConfigError("the paper split needs counts (n_train, n_val, n_test)")
        pool = np.arange(*_paper_pool_bounds(n_frames, protocol, margin_frames,
                                             finite_difference))
        need = sum(counts)
        if len(pool) < need:
            raise DataError(f"{where}the paper split needs {need} distinct start frames but only "
                            f"{len(pool)} remain after excluding {margin_frames} frames at each "
                            "end; lower margin_frames or the counts, or use the blocked split")
        chosen = rng.choice(pool, size=need, replace=False)
        a, b = counts[0], counts[0] + counts[1]
        return {"train": np.sort(chosen[:a]), "val": np.sort(chosen[a:b]),
                "test": np.sort(chosen[b:])}
    if split != "blocked":
        raise ConfigError(f"unknown split {split!r}; choose one of {SPLITS}")
    if any(f < 0 for f in fractions) or not 0 < sum(fractions) <= 1 + 1e-9:
        raise ConfigError(f"split fractions must be >= 0 and sum to at most 1, got {fractions}")
    gap = protocol.window_length(finite_difference)  # no frame shared across blocks
    usable = hi - lo + 1 - gap * 2
    if usable < 3:
        raise DataError(f"{where}{n_frames} frames are too few for a blocked split with windows "
                        f"of {gap} frames; generate more frames or shorten the jump")
    # shares of the usable frames as given (a sum below 1 leaves the end unused); the epsilon
    # keeps 0.7 + 0.1 + 0.2 = 0.9999999999999999 from losing a frame to rounding
    sizes = np.floor(np.asarray(fractions) * usable + 1e-9).astype(int)
    out, start = {}, lo
    for name, size, count in zip(SPLIT_NAMES, sizes, counts or (None, None, None)):
        block = np.arange(start, start + size, max(stride, 1))
        if count is not None and count < len(block):
            block = np.sort(rng.choice(block, size=count, replace=False))
        out[name] = block
        start += size + gap
    return out


def _paper_pool_bounds(n_frames: int, protocol: Protocol, margin_frames: int,
                       finite_difference: bool) -> tuple[int, int]:
    """[first, stop) of the start frames the paper split draws from: every t0 whose window fits
    in the trajectory and lies ``margin_frames`` or more from both ends."""
    lo = max(protocol.before(finite_difference), margin_frames)
    hi = min(n_frames - 1 - protocol.after, n_frames - 1 - margin_frames)
    return lo, max(lo, hi + 1)


def paper_pool_size(n_frames: int, protocol: Protocol, margin_frames: int,
                    finite_difference: bool = False) -> int:
    """Number of start frames the paper split can draw from a trajectory of ``n_frames``."""
    lo, stop = _paper_pool_bounds(n_frames, protocol, margin_frames, finite_difference)
    return stop - lo


@dataclass(frozen=True)
class GraphSpec:
    """How edges are built for a sample.

    Attributes:
        kind: ``bonds`` (topology bonds, or inferred by ``bond_cutoff_A``), ``radius`` (per
            input frame, on channel ``radius_channel``), or ``full``.
        cutoff_A: radius graphs: cutoff in Å.
        two_hop: bonds: add two-hop edges (edge type 1).
        bond_cutoff_A: bonds: infer bonds as node pairs closer than this in the first frame
            (MD17 protocol: 1.6 Å on heavy atoms) instead of using the topology.
        max_neighbours: radius graphs: keep the nearest k sources per node.
        radius_channel: which channel's positions the radius graph (and the inferred bonds of
            residue nodes) use; None (default): CA (1) for residue nodes (N, CA, C, O), the atom
            itself for atom nodes.
    """

    kind: str = "bonds"
    cutoff_A: float = 8.0
    two_hop: bool = True
    bond_cutoff_A: float | None = None
    max_neighbours: int | None = None
    radius_channel: int | None = None

    def __post_init__(self) -> None:
        # Field names as they appear in a training config (``data.graph.*``).
        if self.kind not in ("bonds", "radius", "full"):
            raise ConfigError(f"data.graph.kind = {self.kind!r} is not one of "
                              "['bonds', 'radius', 'full']")
        for name in ("cutoff_A", "bond_cutoff_A", "max_neighbours"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"data.graph.{name} must be > 0, got {value!r}")
        if self.radius_channel is not None and self.radius_channel < 0:
            raise ConfigError(f"data.graph.radius_channel must be >= 0, got "
                              f"{self.radius_channel!r}")

    def channel(self, n_channels: int) -> int:
        """The channel whose positions place a node: ``radius_channel``, or CA (1) for residue
        nodes and 0 for atoms."""
        if self.radius_channel is not None:
            return self.radius_channel
        return 1 if n_channels > 1 else 0

    def to_dict(self) -> dict:
        return asdict(self)


class GraphBuilder:
    """Edges for one system's nodes; static edge lists are built once and reused."""

    def __init__(self, spec: GraphSpec, bonds: np.ndarray | None = None,
                 n_nodes: int | None = None) -> None:
        self.spec = spec
        self.bonds = None if bonds is None else np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        if spec.kind == "bonds":
            if self.bonds is None or n_nodes is None:
                raise ValueError("bond graphs need bonds and n_nodes")
            self._static = bond_edges(self.bonds, n_nodes, two_hop=spec.two_hop)
        elif spec.kind == "full" and n_nodes is not None:
            e = full_edges(n_nodes)
            self._static = (e, torch.zeros(e.shape[1], dtype=torch.long))

    @classmethod
    def for_selection(cls, spec: GraphSpec, selection: NodeSelection, topology_bonds: np.ndarray,
                      first_frame_nodes: np.ndarray) -> GraphBuilder:
        """Builder for the nodes of ``selection``; ``first_frame_nodes`` (nodes, C, 3) Å."""
        bonds = None
        if spec.kind == "bonds":
            if spec.bond_cutoff_A is not None or selection.n_channels > 1:
                cutoff = spec.bond_cutoff_A or 4.2  # residues: consecutive CA-CA are ~3.8 Å
                bonds = infer_bonds(first_frame_nodes[:, spec.channel(selection.n_channels)],
                                    cutoff_A=cutoff)
            else:
                remap = np.full(selection.n_atoms_total, -1)
                remap[selection.index[:, 0]] = np.arange(selection.n_nodes)
                b = remap[np.asarray(topology_bonds, dtype=np.int64).reshape(-1, 2)]
                bonds = b[(b >= 0).all(axis=1)]
        return cls(spec, bonds, selection.n_nodes)

    def __call__(self, nodes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge_index (2, E), edge_type (E,)) for node positions (nodes, C, 3) Å."""
        if self._static is not None:
            return self._static
        x = torch.as_tensor(np.asarray(nodes))
        if self.spec.kind == "full":
            e = full_edges(x.shape[0])
        else:
            e = radius_edges(x[:, self.spec.channel(x.shape[1])], self.spec.cutoff_A,
                             max_neighbours=self.spec.max_neighbours)
        return e, torch.zeros(e.shape[1], dtype=torch.long)

    def batch_edges(self, nodes: torch.Tensor, graph: torch.Tensor, edge_index: torch.Tensor,
                    edge_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edges of a whole batch whose nodes moved to ``nodes`` (N, C, 3) Å (``graph`` (N,):
        the system of every node): radius graphs are rebuilt on the device of ``nodes``, per
        system, in the order :func:`collate` gives the per-system graphs; bond and full graphs
        do not depend on positions, and the batch's ``edge_index``/``edge_type`` are returned.
        """
        if self.spec.kind != "radius":
            return edge_index, edge_type
        e = radius_edges(nodes[:, self.spec.channel(nodes.shape[1])], self.spec.cutoff_A,
                         graph=graph, max_neighbours=self.spec.max_neighbours)
        return e, torch.zeros(e.shape[1], dtype=torch.long, device=e.device)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(),
                "bonds": None if self.bonds is None else self.bonds.tolist()}

    @classmethod
    def from_dict(cls, d: dict, n_nodes: int) -> GraphBuilder:
        return cls(GraphSpec(**d["spec"]), d["bonds"], n_nodes)


class WindowDataset(torch.utils.data.Dataset):
    """Training/evaluation windows over one or more dataset files of the same system.

    Each item is a dict of numpy arrays for one system (see :func:`collate` for the batch):
    ``pos`` (nodes, C, 3) Å, ``vel`` (nodes, C, 3) Å/ps, ``hist`` (T, nodes, C, 3) Å when the
    protocol has history, ``target`` (P, nodes, C, 3) Å, ``node_type``, ``mass``, ``edge_index``,
    ``edge_type``; plus ``times`` (P,) ps shared by all items.

    Args:
        files: open :class:`TrajectoryFile` objects (same atoms in each).
        windows: (n, 2) int array of (file index, t0).
        protocol, selection, graph: what to cut and how to connect it.
        in_memory: load files into RAM (``"auto"``: when under 2 GiB in total).
        velocities: input velocities, ``"auto"`` | ``"file"`` | ``"difference"``
            (:func:`uses_finite_difference`).
        rollout_jumps: R >= 1; above 1, items also carry ``rollout`` (R - 1, P, nodes, C, 3) Å,
            the reference frames of the R - 1 jumps that follow the first
            (``train.rollout_jumps``); every window must have those frames in its file.
    """

    def __init__(self, files: list[TrajectoryFile], windows: np.ndarray, protocol: Protocol,
                 selection: NodeSelection, graph: GraphBuilder, in_memory: bool | str = "auto",
                 velocities: str = "auto", rollout_jumps: int = 1) -> None:
        if rollout_jumps < 1:
            raise ValueError(f"rollout_jumps must be >= 1, got {rollout_jumps}")
        self.rollout_jumps = int(rollout_jumps)
        self.files = files
        self.windows = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
        self.protocol = protocol
        self.selection = selection
        self.graph = graph
        self.finite_difference = uses_finite_difference(files, velocities)
        # what windows read: finite differences need no stored velocities
        fields = ("positions",) if self.finite_difference else ("positions", "velocities")
        if in_memory == "auto":
            in_memory = sum(int(getattr(f, k).size) * getattr(f, k).dtype.itemsize
                            for f in files for k in fields
                            if getattr(f, k) is not None) < 2 * 1024**3
        if in_memory:
            for f in files:
                f.load(fields)
        intervals = {round(f.interval_ps, 9) for f in files}
        if len(intervals) != 1:
            raise DataError(f"dataset files have different saved-frame intervals {intervals}; "
                            "train on files saved at one interval")
        self.interval_ps = intervals.pop()
        self.times_ps = protocol.out_frames * self.interval_ps
        self.node_type = selection.node_type
        self.mass = selection.mass

    def __len__(self) -> int:
        return len(self.windows)

    def frame_offsets(self) -> np.ndarray:
        """Offsets (relative to t0) of every frame an item reads, sorted."""
        p = self.protocol
        hist = -np.arange(p.history)[::-1] * p.history_stride
        extra = np.array([-1] if self.finite_difference else [], dtype=np.int64)
        return np.unique(np.concatenate([hist, extra, *self.rollout_frames()])).astype(np.int64)

    def rollout_frames(self) -> np.ndarray:
        """(R, P) frame offsets after t0 of the targets of each chained jump (row 0: the
        first jump's ``out_frames``)."""
        p = self.protocol
        return p.out_frames[None, :] + p.jump_frames * np.arange(self.rollout_jumps)[:, None]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        fi, t0 = self.windows[i]
        f = self.files[fi]
        p = self.protocol
        offsets = self.frame_offsets()
        frames = f.read(t0 + offsets)  # (k, atoms, 3), one sorted read
        sel = self.selection.gather(frames)  # (k, nodes, C, 3)
        at = {int(o): j for j, o in enumerate(offsets)}
        pos = sel[at[0]]
        if self.finite_difference:
            vel = (pos - sel[at[-1]]) / self.interval_ps
        else:
            vel = self.selection.gather(f.read(np.array([t0]), "velocities"))[0]
        item = {
            K.POS: pos,
            K.VEL: vel,
            K.TARGET: sel[[at[int(o)] for o in p.out_frames]],
            K.NODE_TYPE: self.node_type,
            K.MASS: self.mass,
        }
        if self.rollout_jumps > 1:
            later = self.rollout_frames()[1:]
            item[K.ROLLOUT] = sel[[at[int(o)] for o in later.ravel()]].reshape(
                *later.shape, *pos.shape)
        if p.kind == "history":
            item[K.HIST] = sel[[at[int(-k * p.history_stride)]
                                for k in range(p.history - 1, -1, -1)]]
        item[K.EDGE_INDEX], item[K.EDGE_TYPE] = self.graph(pos)
        return item

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(items)
        batch[K.TIMES] = torch.as_tensor(self.times_ps, dtype=torch.float64)
        if self.protocol.kind == "history":
            batch[K.HIST_DT] = torch.tensor(self.protocol.history_stride * self.interval_ps,
                                            dtype=torch.float64)
        return batch


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate per-system items into one flat-node batch (see :mod:`surrogate_md.data.keys`).

    Node-wise arrays are concatenated along the node axis (axis 1 for ``hist``/``target``, 2 for
    ``rollout``),
    edges are offset by each system's first node, ``graph`` records the system of every node.
    Float arrays become float64 tensors; cast with ``batch_to``.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    sizes = [len(it[K.POS]) for it in items]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out: dict[str, torch.Tensor] = {}
    for key, axis in ((K.POS, 0), (K.VEL, 0), (K.NODE_TYPE, 0), (K.MASS, 0), (K.HIST, 1),
                      (K.TARGET, 1), (K.TARGET_MASK, 0), (K.ROLLOUT, 2)):
        if key in items[0]:
            out[key] = torch.as_tensor(np.concatenate([np.asarray(it[key]) for it in items],
                                                      axis=axis))
    out[K.EDGE_INDEX] = torch.cat([torch.as_tensor(it[K.EDGE_INDEX]) + int(s)
                                   for it, s in zip(items, starts)], dim=1)
    out[K.EDGE_TYPE] = torch.cat([torch.as_tensor(it[K.EDGE_TYPE]) for it in items])
    out[K.GRAPH] = torch.repeat_interleave(torch.arange(len(items)), torch.as_tensor(sizes))
    out[K.N_GRAPHS] = torch.tensor(len(items))
    out[K.NODE_TYPE] = out[K.NODE_TYPE].long()
    return out


def batch_to(batch: dict[str, torch.Tensor], device: torch.device | str,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Move a batch to ``device`` and cast its floating tensors to ``dtype``. The system count
    (``N_GRAPHS``, read with ``int()``) stays on the CPU: on a GPU every read would wait for the
    device."""
    return {k: v if k == K.N_GRAPHS else (
        v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in batch.items()}


VELOCITY_SOURCES = ("auto", "file", "difference")


def uses_finite_difference(files: list[TrajectoryFile], velocities: str = "auto") -> bool:
    """Whether input velocities are finite differences x[t0] - x[t0 - 1] over one saved frame:
    ``velocities`` ``"difference"``, or ``"auto"`` with a file that stores none; ``"file"``
    needs stored velocities in every file."""
    if velocities not in VELOCITY_SOURCES:
        raise ValueError(f"velocities must be one of {VELOCITY_SOURCES}, got {velocities!r}")
    missing = [str(f.path) for f in files if f.velocities is None]
    if velocities == "file" and missing:
        raise DataError(f"{', '.join(missing)}: data.velocities is 'file' but the file stores no "
                        "velocities; use data.velocities: difference (or auto) to take finite "
                        "differences of positions one saved frame apart")
    return velocities == "difference" or (velocities == "auto" and bool(missing))


def make_windows(files: list[TrajectoryFile], protocol: Protocol, *, velocities: str = "auto",
                 **split_kwargs) -> dict[str, np.ndarray]:
    """Split every file and return {split: (n, 2) (file index, t0)} windows.

    For the paper split the counts apply to the pooled files, shared out in proportion to the
    start frames each file offers once its margins are excluded (a file too short to offer any
    contributes no windows); for the blocked split each file is cut into blocks on its own, and
    counts (a cap) are shared out in proportion to the files' lengths.
    """
    fd = uses_finite_difference(files, velocities)
    out = {name: [] for name in SPLIT_NAMES}
    counts = split_kwargs.pop("counts", None)
    shares = None
    if counts is not None and len(files) > 1:
        if split_kwargs.get("split", "blocked") == "paper":
            margin = split_kwargs.get("margin_frames", 10000)
            pools = [paper_pool_size(f.n_frames, protocol, margin, fd) for f in files]
            need = int(sum(counts))
            if sum(pools) < need:
                raise DataError(
                    f"{', '.join(str(f.path) for f in files)}: the paper split needs {need} "
                    f"distinct start frames but the files offer only {sum(pools)} ({pools}) "
                    f"after excluding {margin} frames at each end of each file; lower "
                    "margin_frames or the counts, or use the blocked split")
            shares = _share_pool(counts, pools)
            for f, pool in zip(files, pools):
                if pool == 0:
                    log.warning("%s: its %d frames hold no window of %d frames at least %d "
                                "frames from both ends; the paper split takes no windows from "
                                "it", f.path, f.n_frames, protocol.window_length(fd), margin)
        else:
            shares = np.stack([_share_out(n, [f.n_frames for f in files]) for n in counts],
                              axis=1)
    for fi, f in enumerate(files):
        c = counts if shares is None else tuple(int(n) for n in shares[fi])
        if shares is not None and split_kwargs.get("split") == "paper" and not sum(c):
            for name in SPLIT_NAMES:
                out[name].append(np.zeros((0, 2), dtype=np.int64))
            continue
        starts = split_starts(f.n_frames, protocol, counts=c, finite_difference=fd,
                              source=str(f.path), **{**split_kwargs,
                                                     "seed": split_kwargs.get("seed", 0) + fi})
        for name in SPLIT_NAMES:
            out[name].append(np.stack([np.full(len(starts[name]), fi), starts[name]], axis=1))
    return {k: np.concatenate(v).astype(np.int64) for k, v in out.items()}


def _share_pool(counts: tuple[int, ...], pools: list[int]) -> np.ndarray:
    """(files, splits) window counts: each split's count shared out in proportion to the
    files' ``pools`` (:func:`_share_out`), then units moved from files given more than their
    pool (by rounding) to files with room, keeping every split's total. ``sum(pools)`` must be
    at least ``sum(counts)``."""
    if sum(pools) == 0:
        return np.zeros((len(pools), len(counts)), dtype=np.int64)
    shares = np.stack([_share_out(int(n), pools) for n in counts], axis=1)
    pools_arr = np.asarray(pools, dtype=np.int64)
    while True:
        over = np.flatnonzero(shares.sum(axis=1) > pools_arr)
        if not len(over):
            return shares
        room = np.flatnonzero(shares.sum(axis=1) < pools_arr)
        i, j = int(over[0]), int(room[0])
        k = int(np.argmax(shares[i]))
        shares[i, k] -= 1
        shares[j, k] += 1


def _share_out(count: int, sizes: list[int]) -> np.ndarray:
    """``count`` split over files in proportion to ``sizes``, summing to ``count`` exactly
    (largest remainders get the leftover units)."""
    exact = count * np.asarray(sizes, dtype=np.float64) / sum(sizes)
    share = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - share), kind="stable")
    share[order[:count - int(share.sum())]] += 1
    return share


__all__ = ["GraphBuilder", "GraphSpec", "Protocol", "WindowDataset", "batch_to", "collate",
           "frames_from_ps", "make_windows", "paper_pool_size", "select_nodes", "split_starts"]
