"""The inference object integrations and users call: ``Surrogate.load(checkpoint)``.

Inputs and outputs are numpy arrays in Å, Å/ps and ps. A surrogate knows its jump, its output
time grid, the atoms it models and its protocol, and checks what it is given against them.

Atoms: a model may predict a subset of a system (heavy atoms, backbone, residue nodes). The
*model atoms* are ``selection.atom_index`` (for residue nodes: N, CA, C, O of each residue, in
that order). ``predict``/``rollout`` accept positions of the full system (``n_atoms`` atoms) or
of the model atoms only, and return model atoms.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surrogate_md.checkpoint import file_hash, load_checkpoint
from surrogate_md.data import keys as K
from surrogate_md.data.selection import NodeSelection
from surrogate_md.data.windows import GraphBuilder, collate
from surrogate_md.errors import CheckpointError, ConfigError, DataError, DeviceError
from surrogate_md.models import MODELS, build_model
from surrogate_md.validity import ValidityReference, bond_lengths

log = logging.getLogger(__name__)

#: Å: a history whose last frame is further than this from the positions given does not end at t0
_SAME_STATE_A = 1e-3


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present else CPU; a CUDA request without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {device!r} is not a device name; use 'auto', 'cpu', 'cuda' "
                          "or 'cuda:N' (N = 0, 1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} requested but CUDA is not available on this "
                          "machine; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {str(device)!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return dev


def _inference_dtypes(dtype: torch.dtype, device: torch.device, source: str = ""
                      ) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of weights and inputs, autocast dtype or None) for a requested ``dtype``."""
    where = f"{source}: " if source else ""
    if dtype in (torch.float32, torch.float64):
        return dtype, None
    if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type == "cuda"):
        return torch.float32, dtype
    if dtype == torch.float16:
        raise ConfigError(f"{where}dtype torch.float16 runs on CUDA only; on {device} use "
                          "torch.bfloat16 or torch.float32")
    raise ConfigError(f"{where}dtype {dtype!r} is not one a surrogate runs in; use "
                      "torch.float32 (default), torch.float64, or torch.bfloat16 / "
                      "torch.float16 (CUDA) for autocast")


def thermal_velocities(masses_amu: np.ndarray, temperature_K: float, rng: np.random.Generator,
                       batch: tuple[int, ...] = ()) -> np.ndarray:
    """Maxwell-Boltzmann velocities (*batch, n, 3) Å/ps at ``temperature_K`` for atoms of
    ``masses_amu`` (n,), with the centre-of-mass velocity taken out (zero net momentum, as
    OpenMM's ``CMMotionRemover`` keeps it; for Gaussian draws that is the exact distribution at
    zero momentum). Massless particles (virtual sites) get zero velocity."""
    from scipy.constants import R  # J/(mol K), CODATA (the core imports no MD engine)

    m = np.asarray(masses_amu, dtype=np.float64)
    if not (np.isfinite(temperature_K) and temperature_K > 0) or not np.all(np.isfinite(m)):
        raise ConfigError(f"thermal velocities need finite masses and a temperature > 0 K, got "
                          f"{temperature_K!r} K")
    kt = R * 1e-3 * float(temperature_K)  # kJ/mol
    massive = m > 0
    # sqrt(kJ/mol / (g/mol)) = nm/ps; x 10 for Å/ps
    sigma = np.where(massive, 10.0 * np.sqrt(kt / np.where(massive, m, 1.0)), 0.0)
    draw = rng.standard_normal((*batch, len(m), 3)) * sigma[:, None]
    if massive.any():
        p = (m[:, None] * draw).sum(axis=-2, keepdims=True) / m.sum()
        draw = np.where(massive[:, None], draw - p, 0.0)
    return draw


class Surrogate:
    """A trained trajectory operator ready for inference.

    Attributes:
        name: model name in the registry.
        jump_ps: the learned jump ΔT in ps.
        times_ps: (P,) output time grid after t0, ps (the last entry is ``jump_ps``).
        atomic_numbers: (n_atoms,) atomic numbers of the full system it was trained on.
        selection: :class:`NodeSelection` of the modelled atoms.
        model_atoms: (n_model_atoms,) indices of the modelled atoms in the full system.
        needs_history: the model takes ``history`` (T frames at ``history_stride_ps``).
        validity: tolerances for the guards (:class:`ValidityReference` over model atoms).
        checkpoint_hash: short sha256 of the checkpoint file.
        dtype: dtype of the weights and of the inputs the model is given (float32 or float64).
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` when matrix products run under
            autocast (``dtype=`` given as one of them), else None.
        compiled: whether the model runs through ``torch.compile`` (``compile=``).
    """

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 source: str = "", compile: bool | dict[str, Any] = False) -> None:
        self.model = model
        self.meta = meta
        self.source = source
        self.device = resolve_device(device)
        self.dtype, self.autocast_dtype = _inference_dtypes(dtype, self.device, source)
        self.model.to(device=self.device, dtype=self.dtype).eval()
        self._forward = self.model
        self.compiled = compile is True or isinstance(compile, dict)
        if self.compiled and not MODELS[meta["model"]["name"]].has_parameters:
            self.compiled = False  # an analytic baseline: nothing to fuse
        if self.compiled and self.device.type == "cpu" and self.autocast_dtype is not None:
            # edge blocks are padded to bucket sizes under CPU autocast (oneDNN keeps memory per
            # shape), a size Dynamo cannot keep symbolic: every new edge count would compile anew
            log.warning("%s: compile is not used with %s autocast on a CPU (every edge count "
                        "would compile anew); running eagerly", source or meta["model"]["name"],
                        self.autocast_dtype)
            self.compiled = False
        if self.compiled:
            from surrogate_md.models import compile_model

            self._forward = compile_model(self.model,
                                          **(compile if isinstance(compile, dict) else {}))
        proto = meta["protocol"]
        self.name: str = meta["model"]["name"]
        self.jump_ps = float(proto["jump_ps"])
        self.times_ps = np.asarray(proto["times_ps"], dtype=np.float64)
        self.history_length = int(proto.get("history", 1))
        self.history_stride_ps = float(proto.get("history_stride_ps") or self.jump_ps)
        self.velocity_source = proto.get("velocity_source", "file")
        self.needs_history = bool(MODELS[self.name].needs_history)
        self.selection = NodeSelection.from_dict(meta["selection"])
        self.model_atoms = self.selection.atom_index
        self.n_atoms = self.selection.n_atoms_total
        topo = meta["topology"]
        self.topology = topo
        self.atomic_numbers = np.asarray(topo["atomic_numbers"], dtype=np.int64)
        self.graph = GraphBuilder.from_dict(meta["graph"], self.selection.n_nodes)
        self.validity = (ValidityReference.from_dict(meta["validity"])
                         if meta.get("validity") else None)
        self.checkpoint_hash = meta.get("checkpoint_hash", "")
        self._warned = False  # times_ps beyond the trained jump (warned once)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, compile: bool | dict[str, Any] = False
             ) -> Surrogate:
        """Load ``best.pt``/``last.pt`` (weights-only) onto ``device`` (``"auto"`` picks CUDA).

        ``dtype``: ``torch.float32`` (default) or ``torch.float64`` for the weights and inputs;
        ``torch.bfloat16`` (CPU or GPU) or ``torch.float16`` (GPU) runs the matrix products
        under autocast, as training's ``runtime.precision`` does, with weights and positions
        kept in float32 (positions cast to bf16 would be rounded by up to 0.03 Å at 8 Å from
        the origin and 0.25 Å at 64 Å).

        ``compile=True`` runs the model through ``torch.compile``
        (:func:`~surrogate_md.models.compile_model`; a dict passes its options, e.g.
        ``{"mode": "max-autotune"}``): the first call compiles for its shapes and the second
        graph size once more with dynamic shapes (seconds to a minute on a CPU; inductor caches
        the result on disk for later processes), after which every graph size reuses it. On two
        CPU cores an AdK-backbone EGNO (856 nodes, 22 000 edges, P = 4; hidden 32, 3 layers)
        predicts 1.7x faster (0.072 against 0.119 s) and its guarded jumps in OpenMM run 1.9x
        faster, the same positions to 1e-5 Å; worth it for runs of hundreds of jumps. A
        compilation that fails inside torch is logged and the model runs eagerly; under bf16 or
        fp16 autocast on a CPU (``dtype=``), where edge blocks are padded to bucket sizes that
        would each compile anew, it is not used (a warning).
        """
        path = Path(checkpoint)
        try:
            _inference_dtypes(dtype, resolve_device(device), str(path))
        except DeviceError as exc:
            raise DeviceError(f"{path}: {exc}") from None
        data = load_checkpoint(path)
        name = data.get("model", {}).get("name")
        if name not in MODELS:
            raise CheckpointError(f"{path}: checkpoint model {name!r} is not in this package's "
                                  f"registry {sorted(MODELS)}; upgrade surrogate-md")
        for key in ("protocol", "selection", "graph", "topology", "state_dict"):
            if key not in data:
                raise CheckpointError(f"{path}: checkpoint lacks {key!r}; it is incomplete, "
                                      "re-export it from the run directory")
        try:
            model = build_model(name, data["model"]["config"])
        except ConfigError as exc:
            raise CheckpointError(f"{path}: the stored model config does not fit this package's "
                                  f"{name!r} ({exc}); re-export it from its run directory or "
                                  "upgrade surrogate-md") from exc
        try:
            model.load_state_dict(data["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit model {name!r} with the stored "
                                  f"config ({str(exc).splitlines()[0]}); the file is inconsistent: "
                                  "use the best.pt/last.pt its training run wrote") from exc
        meta = {k: v for k, v in data.items() if k not in ("state_dict", "training")}
        meta["checkpoint_hash"] = file_hash(path)
        return cls(model, meta, device=device, dtype=dtype, source=str(path), compile=compile)

    # -- shapes and checks ------------------------------------------------------------------------
    @property
    def n_model_atoms(self) -> int:
        return len(self.model_atoms)

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary (name, jump, grid, atoms, checkpoint hash) for file headers/logs."""
        return {"surrogate": self.name, "jump_ps": self.jump_ps, "compiled": self.compiled,
                "times_ps": self.times_ps.tolist(), "selection": self.selection.name,
                "n_model_atoms": self.n_model_atoms, "n_atoms": self.n_atoms,
                "checkpoint": os.path.basename(self.source),
                "checkpoint_hash": self.checkpoint_hash}

    def _to_model_atoms(self, arr: np.ndarray, what: str) -> np.ndarray:
        """(..., n_atoms or n_model_atoms, 3) -> (..., n_model_atoms, 3) float64, checked."""
        arr = np.asarray(arr, dtype=np.float64)
        # (atoms, 3) or (B, atoms, 3); history (T, atoms, 3) or (B, T, atoms, 3)
        dims = (3, 4) if what == "history" else (2, 3)
        if arr.ndim not in dims or arr.shape[-1] != 3:
            shapes = ("(T, atoms, 3) or (B, T, atoms, 3)" if what == "history"
                      else "(atoms, 3) or (B, atoms, 3)")
            raise DataError(f"{what} must have shape {shapes}, got {arr.shape}")
        if arr.size == 0:
            raise DataError(f"{what} are empty (shape {arr.shape}); give at least one state")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{what} contain NaN or inf; the input state is broken")
        n = arr.shape[-2]
        if n == self.n_atoms:
            return arr[..., self.model_atoms, :]
        if n == self.n_model_atoms:
            return arr
        raise DataError(f"{what} have {n} atoms but the surrogate models a system of "
                        f"{self.n_atoms} atoms ({self.n_model_atoms} predicted, selection "
                        f"{self.selection.name!r}); give positions of that system")

    def check_atomic_numbers(self, atomic_numbers: np.ndarray,
                             atom_names: np.ndarray | list[str] | None = None) -> None:
        """Raise if the system's atoms differ from the training system's, atom by atom.

        Args:
            atomic_numbers: (n_atoms,) of the full system.
            atom_names: (n_atoms,) names (``"CA"``), where the caller has them. The training
                system's names in another order mean reordered atoms of one element (swapped
                methyl hydrogens, CA and CB), which elements alone cannot see: an error. Names
                that differ otherwise are taken for another naming convention: a warning.
        """
        z = np.asarray(atomic_numbers, dtype=np.int64)
        if len(z) != self.n_atoms or not np.array_equal(z, self.atomic_numbers):
            raise DataError(f"the system's atoms ({len(z)} atoms) differ from the {self.n_atoms} "
                            f"atoms the surrogate {self.source or self.name} was trained on; "
                            "use a checkpoint trained on this system")
        trained = self.topology.get("atom_names")
        if atom_names is None or trained is None or len(trained) != len(z):
            return
        names = np.char.upper(np.char.strip(np.asarray(atom_names, dtype=str)))
        ref = np.char.upper(np.char.strip(np.asarray(trained, dtype=str)))
        differ = np.nonzero(names != ref)[0]
        if len(differ) == 0:
            return
        shown = ", ".join(f"atom {i}: {names[i]} (trained: {ref[i]})" for i in differ[:4])
        if np.array_equal(np.sort(names), np.sort(ref)):
            raise DataError(f"the system has the training system's atoms in another order "
                            f"({len(differ)} atoms moved; {shown}); the surrogate "
                            f"{self.source or self.name} would predict each atom from another "
                            "one's place. Write the atoms in the training order (the topology "
                            "the data were made with)")
        log.warning("%d atom names differ from the training system's (%s); fine if only the "
                    "naming convention differs, wrong if atoms of one element were reordered",
                    len(differ), shown)

    def _check_length_unit(self, pos: np.ndarray, what: str) -> None:
        """Refuse model-atom positions (B, n, 3) in nm (OpenMM's unit) instead of Å: the median
        bond is 0.05-0.2 of its trained length. Only that band: the median over all bonds never
        gets there in a poor or even exploding prediction (a run left to blow up under guards
        'warn' reaches 3x), which stays the guards' business."""
        val = self.validity
        if val is None or len(val.bonds) == 0:
            return
        ratio = float(np.median(bond_lengths(pos[0], val.bonds)
                                / np.maximum(val.bond_length_mean_A, 1e-6)))
        if 0.05 <= ratio <= 0.2:
            raise DataError(f"{what}: bonds are {ratio:.3g} times the lengths the surrogate was "
                            "trained on; positions must be in Å, and these look like nm: "
                            "multiply by 10 (OpenMM: value_in_unit(angstrom))")

    # -- prediction -------------------------------------------------------------------------------
    def _default_velocities(self, pos: np.ndarray, history: np.ndarray | None) -> np.ndarray:
        if history is not None and history.shape[-3] >= 2:
            return (history[..., -1, :, :] - history[..., -2, :, :]) / self.history_stride_ps
        if self.name == "constant":
            return np.zeros_like(pos)
        raise DataError(f"velocities are required (Å/ps) for this surrogate; pass velocities= "
                        f"or a history of at least two frames {self.history_stride_ps:g} ps "
                        "apart (the last two give the velocity)")

    @torch.inference_mode()
    def predict(self, positions: np.ndarray, velocities: np.ndarray | None = None,
                history: np.ndarray | None = None, times_ps: np.ndarray | None = None
                ) -> np.ndarray:
        """Advance one jump.

        Args:
            positions: (atoms, 3) or (B, atoms, 3) Å at t0 (full system or model atoms).
            velocities: same shape, Å/ps.
            history: (T, atoms, 3) or (B, T, atoms, 3) Å, ``history_stride_ps`` apart, oldest
                first, the last frame the state at t0 (= ``positions``); required when
                ``needs_history``. Without ``velocities``, the last two frames give them.
            times_ps: output offsets (ps) instead of the trained grid (models that support it).
        Returns:
            (P, n_model_atoms, 3) Å, or (B, P, n_model_atoms, 3) for batched input.
        """
        pos = self._to_model_atoms(positions, "positions")
        batched = pos.ndim == 3
        if not batched:
            pos = pos[None]
        self._check_length_unit(pos, "positions")
        hist = None
        if history is not None:
            hist = self._to_model_atoms(history, "history")
            if hist.ndim != (4 if batched else 3):
                given, want = (("a batch of states (B, atoms, 3)", "(B, T, atoms, 3)") if batched
                               else ("one state (atoms, 3)", "(T, atoms, 3)"))
                raise DataError(f"positions are {given} but history has shape {hist.shape}; "
                                f"give history as {want} to match")
            if not batched:
                hist = hist[None]
            if hist.shape[0] != pos.shape[0]:
                raise DataError(f"history holds {hist.shape[0]} states but positions "
                                f"{pos.shape[0]}; give one history per state")
            if hist.shape[1] != self.history_length and self.needs_history:
                raise DataError(f"history has {hist.shape[1]} frames; the surrogate takes "
                                f"{self.history_length} frames {self.history_stride_ps} ps apart")
            off = float(np.abs(hist[:, -1] - pos).max())
            if off > _SAME_STATE_A:
                raise DataError(f"the last history frame is {off:.3g} Å from positions; history "
                                "runs oldest first and ends with the state at t0 (the "
                                "positions given)")
        elif self.needs_history:
            raise DataError(f"this surrogate ({self.name}) needs history: {self.history_length} "
                            f"frames {self.history_stride_ps} ps apart, the last at t0")
        if velocities is None:
            vel = self._default_velocities(pos, hist)
        else:
            vel = self._to_model_atoms(velocities, "velocities")
            if not batched:
                vel = vel[None]
        if vel.shape != pos.shape:
            raise DataError(f"velocities shape {vel.shape} differs from positions {pos.shape}")
        times = self.times_ps if times_ps is None else np.atleast_1d(
            np.asarray(times_ps, dtype=np.float64))
        if times.ndim != 1 or len(times) == 0 or not np.all(np.isfinite(times)) or np.any(
                times <= 0) or np.any(np.diff(times) <= 0):
            raise DataError(f"times_ps must be a non-empty 1-D array of increasing offsets > 0 "
                            f"ps, got {times_ps!r}")
        if (times_ps is not None and getattr(self.model, "trained_grid_only", False)
                and not (len(times) <= len(self.times_ps)
                         and np.allclose(times, self.times_ps[:len(times)], atol=1e-9))):
            raise DataError(f"{self.name} takes one step per output time of its trained grid "
                            f"{self.times_ps.tolist()} ps and answers only there (or at its "
                            f"first entries); got times_ps {times.tolist()}")
        if times_ps is not None and times[-1] > self.jump_ps * (1 + 1e-9) and not self._warned:
            self._warned = True
            log.warning("%s: times_ps up to %g ps, beyond the trained jump of %g ps: the model "
                        "was never trained there and extrapolates (chain jumps, as rollout() "
                        "and the engines do, to go further)", self.source or self.name,
                        times[-1], self.jump_ps)
        nodes, c = self.selection.n_nodes, self.selection.n_channels
        items = []
        for b in range(len(pos)):
            p = pos[b].reshape(nodes, c, 3)
            item = {K.POS: p, K.VEL: vel[b].reshape(nodes, c, 3),
                    K.NODE_TYPE: self.selection.node_type, K.MASS: self.selection.mass}
            if hist is not None:
                item[K.HIST] = hist[b].reshape(-1, nodes, c, 3)
            item[K.EDGE_INDEX], item[K.EDGE_TYPE] = self.graph(p)
            items.append(item)
        batch = collate(items)
        batch[K.TIMES] = torch.as_tensor(times)
        batch[K.HIST_DT] = torch.tensor(self.history_stride_ps)
        batch = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                 for k, v in batch.items()}
        with (torch.autocast(self.device.type, dtype=self.autocast_dtype)
              if self.autocast_dtype is not None else contextlib.nullcontext()):
            out = self._call_model(batch)
        out = out.to(torch.float64).cpu().numpy()  # (P, B*nodes, C, 3)
        out = out.reshape(len(times), len(pos), nodes * c, 3).transpose(1, 0, 2, 3)
        return out if batched else out[0]

    def _call_model(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model on ``batch``, compiled if asked for; a compilation that fails (a Dynamo
        or inductor error: torch's, not the input's) is logged once and the model runs eagerly
        from then on, with the same weights."""
        if self._forward is self.model:
            return self.model(batch)
        import torch._dynamo.exc

        try:
            return self._forward(batch)
        except torch._dynamo.exc.TorchDynamoException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("%s: torch.compile failed for this model (%s: %s); running it "
                        "eagerly", self.source or self.name, type(exc).__name__, first)
            self._forward, self.compiled = self.model, False
            for layer in self.model.modules():  # compile_model compiled the edge chunks too
                if hasattr(layer, "compiled_chunk"):
                    layer.compiled_chunk = None
            return self.model(batch)

    def history_fits_grid(self, times_ps: np.ndarray | None = None) -> bool:
        """Whether chained jumps can supply a history model's next input themselves: its history
        stride is a whole multiple of the output spacing and the output times (``times_ps``,
        default the trained grid) lie on that spacing. True for models without history."""
        if not self.needs_history:
            return True
        times = np.asarray(self.times_ps if times_ps is None else times_ps, dtype=np.float64)
        grid = np.concatenate([[0.0], times])
        spacing = float(np.min(np.diff(grid)))
        ratio = self.history_stride_ps / spacing
        return bool(abs(ratio - round(ratio)) < 1e-6 and round(ratio) >= 1
                    and np.allclose(grid / spacing, np.round(grid / spacing), atol=1e-6))

    def rollout(self, positions: np.ndarray, velocities: np.ndarray | None = None,
                history: np.ndarray | None = None, n_jumps: int = 10,
                progress: bool = False, *, end_velocities: str = "difference",
                temperature_K: float | None = None,
                velocity_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Chain ``n_jumps`` jumps, feeding each jump's end state into the next.

        The velocity for the next jump is, with ``end_velocities="difference"``, the backward
        difference of the last two frames of the jump (the last output frame and the one before
        it, or the input when P = 1): deterministic, but far slower than instantaneous MD
        velocities when the output spacing is long. With ``"thermal"`` it is a Maxwell-Boltzmann
        draw at ``temperature_K`` with zero net momentum (:func:`thermal_velocities` over the
        model atoms, generator seeded by ``velocity_seed``), the inputs a model trained on MD
        velocities (``velocity_source == "file"``) saw in training; the engines'
        ``end_velocities`` and ``velocity_seed`` do the same inside OpenMM and ASE.
        History models take their next history from the input and predicted frames at the
        history stride (which must be a multiple of the output spacing).

        Args:
            positions: (atoms, 3) or (B, atoms, 3) Å; velocities, history as in :meth:`predict`.
            n_jumps: number of jumps (>= 1).
            end_velocities: ``"difference"`` or ``"thermal"`` (needs ``temperature_K`` in K).
        Returns:
            frames (n_jumps * P, n_model_atoms, 3) Å, or (B, n_jumps * P, n_model_atoms, 3) for
            batched input, and their times (n_jumps * P,) ps after t0.
        """
        from tqdm.auto import tqdm

        if (isinstance(n_jumps, bool) or not isinstance(n_jumps, (int, np.integer, float))
                or int(n_jumps) != n_jumps or n_jumps < 1):
            raise DataError(f"n_jumps must be a whole number >= 1, got {n_jumps!r}")
        if end_velocities not in ("difference", "thermal"):
            raise ConfigError(f"end_velocities must be 'difference' or 'thermal', got "
                              f"{end_velocities!r}")
        rng = masses = None
        if end_velocities == "thermal":
            if temperature_K is None:
                raise ConfigError("end_velocities='thermal' needs temperature_K (K), the "
                                  "temperature of the MD the model was trained on")
            masses = np.asarray(self.topology["masses"], dtype=np.float64)[self.model_atoms]
            thermal_velocities(masses, temperature_K, np.random.default_rng(0))  # checks T
            rng = np.random.default_rng(velocity_seed)
        if not self.history_fits_grid():
            raise DataError(
                f"this {self.name} surrogate takes history frames {self.history_stride_ps:g} ps "
                f"apart but predicts frames at {self.times_ps.tolist()} ps, so a rollout cannot "
                f"build the next jump's history from its own predictions; train it with a "
                f"history stride (data.history_stride_ps) that is a multiple of jump_ps / n_out "
                f"= {self.times_ps[0]:g} ps, or run it inside an MD engine "
                f"(integrations), which rebuilds the history with MD")
        pos = self._to_model_atoms(positions, "positions")
        vel = None if velocities is None else self._to_model_atoms(velocities, "velocities")
        hist = None if history is None else self._to_model_atoms(history, "history")
        # known frames by time (in output spacings) for the history lookup; frames keep any
        # leading batch axis, the time axis of ``out``/``hist`` is axis -3
        spacing = float(np.min(np.diff(np.concatenate([[0.0], self.times_ps]))))
        known: dict[int, np.ndarray] = {}
        if hist is not None:
            n_hist = hist.shape[-3]
            for k in range(n_hist):
                known[round(-k * self.history_stride_ps / spacing)] = hist[..., n_hist - 1 - k,
                                                                           :, :]
        frames, times = [], []
        t = 0.0
        for _ in tqdm(range(int(n_jumps)), disable=not progress, desc="rollout", unit="jump"):
            out = self.predict(pos, vel, hist)  # (..., P, atoms, 3)
            n_out = out.shape[-3]
            prev = out[..., -2, :, :] if n_out > 1 else pos
            dt = (self.times_ps[-1] - self.times_ps[-2]) if n_out > 1 else self.times_ps[-1]
            for k in range(n_out):
                known[round((t + self.times_ps[k]) / spacing)] = out[..., k, :, :]
            frames.append(out)
            times.append(t + self.times_ps)
            t += self.jump_ps
            vel = (out[..., -1, :, :] - prev) / dt
            if rng is not None:
                vel = thermal_velocities(masses, temperature_K, rng, batch=vel.shape[:-2])
            pos = out[..., -1, :, :]
            if hist is not None:
                want = [round((t - k * self.history_stride_ps) / spacing)
                        for k in range(self.history_length - 1, -1, -1)]
                missing = [w for w in want if w not in known]
                if missing:
                    raise DataError("history stride is not a multiple of the output spacing; "
                                    "cannot roll this history model out")
                hist = np.stack([known[w] for w in want], axis=-3)
        return np.concatenate(frames, axis=-3), np.concatenate(times)
