"""Physical validity of long surrogate rollouts vs reference MD, per model.

Each model rolls out ``--jumps`` jumps (default 1000) with ``Surrogate.rollout`` from a state of
the reference trajectory (no engine, no guards: what the model does on its own), and every
predicted frame is scored with the package's validity measures (``surrogate_md.validity``,
``surrogate_md.metrics``):

- collapses: frames with a bond more than ``COLLAPSE_A`` (0.5 Å) off its reference mean length;
- clashes: frames whose closest non-bonded pair (beyond two bonds) is nearer than the
  checkpoint's learned clash distance;
- chain breaks (proteins): frames with a CA(i)–CA(i+1) distance above ``CHAIN_BREAK_A`` (4.5 Å);
- h(r) MAE: mean absolute difference of the normalised pair-distance histograms (0–20 Å, 0.1 Å
  bins) of the rollout and of the reference MD;
- torsion JSD: Jensen–Shannon divergence (nats, 0..ln 2) of the backbone (phi, psi) histograms
  (36 x 36 bins) of rollout and reference;
- guard events: the jump ends that ``integrations.guards.Guards`` would reject, checked as an
  engine checks them: on the full system (atoms the model does not predict, such as hydrogens
  and side chains, carried along by ``integrations.reconstruct.Reconstructor`` jump after jump),
  with the non-finite, bond, clash and chain-break checks, and the energy check when the
  reference MD was made by ``datagen`` from a built-in system (its force field is rebuilt from the
  dataset's metadata; the reference energies are those of the MD frames before the start).

With ``--engine`` the rollout runs inside OpenMM instead: ``SurrogateSimulation`` on the
dataset's force field (rebuilt from its metadata, as for the energy check), started from the same
MD frame, with the guards acting (``--guard-action``, default ``relax``: a rejected jump end is
minimised on the force field until the engine accepts it; ``fallback``: replaced by MD). Every
jump end the engine keeps is scored as above, and the guard events are the engine's own (jumps
accepted as predicted, relaxed, replaced by MD; energy of each kept state above the MD median):
the validity of what a user of the integration gets, not of the free-running model.
``--jump-noise`` (with ``--engine``) makes the jumps stochastic: one jump-noise file per
checkpoint (``none`` for a deterministic row; fit one with ``python -m surrogate_md.evaluate
CHECKPOINT --data FILE --split val --out DIR --noise-out FILE``), its draws scaled by
``--noise-scale``. The table's last row is the MD's own sampling floor: the torsion JSD and h(r)
MAE between the first and the second half of the reference frames.

Models: ``--checkpoints`` (with the ``--data`` they were trained on), or models trained here from
the example configs (``--train-epochs``) on MD generated with ``datagen``: alanine dipeptide
(``--system alanine-dipeptide``, default) or adenylate kinase (``--system adk``: backbone atoms,
4 ps jumps, P = 4, as the AdK accuracy benchmark; ``--data`` takes its MD).

Usage::

    python examples/benchmarks/bench_validity.py --models egno painet --train-epochs 30 \
        --jumps 1000 --json validity.json
    python examples/benchmarks/bench_validity.py --system adk --data adk.h5 --models egno \
        --hidden 32 --layers 3 --train-epochs 4 --max-steps-per-epoch 40 --jumps 1000
    python examples/benchmarks/bench_validity.py --checkpoints egno.pt --data adk.h5 --engine \
        --jumps 1000
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from common import (
    ADK_DEFAULTS,
    ADK_MD,
    clean_errors,
    command_line,
    first_draw_rise,
    fmt,
    machine,
    machine_table,
    markdown_table,
    motion_over_lag,
    relative_path,
    save_figure,
    save_json,
    setup_logging,
    superposed_msd,
)

log = logging.getLogger("bench_validity")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINABLE = ("egnn", "egno", "estag", "painet")
MAX_SCORED_FRAMES = 2000  # frames scored for the clash/h(r)/torsion statistics


def alanine_data(args: argparse.Namespace) -> Path:
    from datagen.openmm_md import run_openmm

    path = Path(args.data_dir) / f"alanine-dipeptide-{args.solvent}-{args.frames}f-seed0.h5"
    if not path.exists():
        log.info("generating %d frames of alanine dipeptide MD -> %s", args.frames, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        run_openmm("alanine-dipeptide", path, frames=args.frames, solvent=args.solvent, seed=0,
                   progress=args.progress)
    return path


def adk_data(args: argparse.Namespace) -> Path:
    """Cached AdK MD made as the AdK accuracy benchmark makes it (slow on a CPU: ~30 min)."""
    from datagen.openmm_md import run_openmm

    path = Path(args.data_dir) / f"adk-implicit-hmr-{args.frames}f-seed0.h5"
    if not path.exists():
        log.info("generating %d frames of AdK MD -> %s (give --data to reuse MD)", args.frames,
                 path)
        path.parent.mkdir(parents=True, exist_ok=True)
        run_openmm("adk", path, frames=args.frames, seed=0, progress=args.progress, **ADK_MD)
    return path


def train_model(args: argparse.Namespace, model: str, data: Path) -> Path:
    from surrogate_md.train import train

    stem = "alanine_dipeptide" if args.system == "alanine-dipeptide" else "adk_backbone"
    config = yaml.safe_load((CONFIGS / f"{model}_{stem}.yaml").read_text())
    config["data"]["path"] = str(data)
    if args.system == "adk":
        jump, n_out, stride = ADK_DEFAULTS["backbone"]
        config["data"].update({"jump_ps": jump, "n_out": n_out, "split": "blocked",
                               "fractions": [0.7, 0.1, 0.2]})
        if config["data"].get("protocol") == "history":
            config["data"]["history_stride_ps"] = stride
    if args.layers and model in ("egnn", "egno", "estag"):
        config["model"]["n_layers"] = args.layers
    if args.batch_size:
        config["train"]["batch_size"] = args.batch_size
    config["train"].update({"epochs": args.train_epochs, "patience": 0,
                            "max_steps_per_epoch": args.max_steps_per_epoch})
    config["runtime"].update({"device": args.device, "progress": args.progress,
                              "log_every": 10_000, "precision": args.precision})
    if args.hidden:
        config["model"]["hidden"] = args.hidden
    if args.selection:
        config["data"]["selection"] = args.selection
    return train(config, Path(args.out_dir) / f"train-{model}", overwrite=True)


def start_state(sur, traj, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Positions, velocities (file, else backward difference) and history at ``frame``."""
    interval = traj.interval_ps
    pos = traj.read(np.array([frame]))[0]
    if traj.velocities is not None:
        vel = traj.read(np.array([frame]), "velocities")[0]
    else:
        vel = (pos - traj.read(np.array([frame - 1]))[0]) / interval
    hist = None
    if sur.needs_history:
        stride = round(sur.history_stride_ps / interval)
        idx = frame - stride * np.arange(sur.history_length - 1, -1, -1)
        hist = traj.read(idx)
    return pos, vel, hist


def score(sur, frames: np.ndarray, ref: np.ndarray, topology) -> dict[str, Any]:
    """Validity of predicted ``frames`` (F, model atoms, 3) Å against reference MD ``ref``."""
    from surrogate_md import metrics as M
    from surrogate_md.evaluate.core import CHAIN_BREAK_A, COLLAPSE_A
    from surrogate_md.validity import (
        bond_lengths,
        excluded_pairs,
        gyration_summary,
        min_nonbonded_distance,
    )

    v = sur.validity
    out: dict[str, Any] = {"frames": int(len(frames))}
    finite = np.isfinite(frames).all(axis=(1, 2))
    out["nonfinite_frames"] = int((~finite).sum())
    good = frames[finite]
    bonds = v.bonds if v is not None else np.zeros((0, 2), dtype=np.int64)
    if len(bonds) and len(good):
        dev = np.abs(bond_lengths(good, bonds) - v.bond_length_mean_A).max(1)
        out["collapsed_frames"] = int((dev > COLLAPSE_A).sum() + (~finite).sum())
        out["max_bond_deviation_A"] = float(dev.max())
    step = max(1, len(good) // MAX_SCORED_FRAMES)
    ref_step = max(1, len(ref) // MAX_SCORED_FRAMES)
    scored, ref_scored = good[::step], ref[::ref_step]
    excluded = excluded_pairs(bonds, frames.shape[1])
    if len(scored):
        dmin = np.array([min_nonbonded_distance(f, bonds, excluded=excluded) for f in scored])
        threshold = v.min_distance_A if v is not None else 0.0
        out["clash_fraction"] = float((dmin < threshold).mean())
        out["min_nonbonded_A"] = float(dmin.min())
    ca = M.consecutive_ca_pairs(topology, sur.model_atoms)
    if len(ca):
        out["chain_break_frames"] = int((M.chain_breaks(good, ca, CHAIN_BREAK_A) > 0).sum())
    if len(good):  # the size the guards' size check sees, every frame
        out["radius_of_gyration_A"] = gyration_summary(
            good, ref, v.gyration_range_A if v is not None else None)
    bins = np.linspace(0.0, 20.0, 201)
    if len(scored):
        out["h_r_mae"] = float(np.abs(M.distance_histogram(scored, bins)
                                      - M.distance_histogram(ref_scored, bins)).mean())
    phi_psi = ramachandran_quads(sur, topology)
    if phi_psi is not None and len(scored):
        def rama(x: np.ndarray) -> np.ndarray:
            return M.torsion_histogram(*(M.torsions(x, q) for q in phi_psi))

        out["torsion_jsd"] = M.js_divergence(rama(scored), rama(ref_scored))
    return out


def ramachandran_quads(sur, topology) -> tuple[np.ndarray, np.ndarray] | None:
    """(phi quads, psi quads), (r, 4) each in the model's atom order, of the r residues with
    both backbone torsions among the predicted atoms; None if there are none."""
    from surrogate_md import metrics as M

    quads = M.backbone_torsion_atoms(topology, sur.model_atoms)
    pairs = [(a, b) for a, qa in enumerate(quads["phi"].tolist())
             for b, qb in enumerate(quads["psi"].tolist()) if qa[1:3] == qb[:2]]
    if not pairs:
        return None
    ia, ib = np.array(pairs).T
    return quads["phi"][ia], quads["psi"][ib]


def plot_ramachandran(panels: list[tuple[str, np.ndarray, np.ndarray]], path: Path,
                      title: str) -> Path:
    """One (phi, psi) density panel per run, degrees (all residues pooled), the reference MD
    first: where the runs go, beside where the MD goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3), squeeze=False,
                             gridspec_kw={"wspace": 0.35})
    edges = np.linspace(-180.0, 180.0, 73)
    for ax, (label, phi, psi) in zip(axes[0], panels):
        h, _, _ = np.histogram2d(phi.ravel(), psi.ravel(), bins=[edges, edges])
        ax.imshow(np.log1p(h.T), origin="lower", extent=(-180, 180, -180, 180),
                  cmap="viridis", aspect="equal")
        ax.set_title(f"{label}\n({phi.shape[0]} frames)", fontsize=8)
        ax.set_xlabel("phi (deg)")
        ax.set_xticks([-180, 0, 180])
        ax.set_yticks([-180, 0, 180])
    axes[0][0].set_ylabel("psi (deg)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


class ReferenceEnergy:
    """Potential energy of full-system states with the force field of a dataset's MD.

    Rebuilt from the dataset's metadata (``datagen`` runs of a built-in system: system, solvent,
    constraints, cutoff); :meth:`from_trajectory` returns None, with the reason, for anything else.
    """

    def __init__(self, context, label: str) -> None:
        self.context = context
        self.label = label

    @classmethod
    def from_trajectory(cls, traj, platform: str = "auto") -> tuple[ReferenceEnergy | None, str]:
        import openmm
        from openmm import unit

        from datagen.openmm_md import choose_platform, prepare_system
        from datagen.systems import BUILTIN_SYSTEMS

        meta = traj.metadata
        name = meta.get("system")
        if meta.get("engine") != "openmm" or name not in BUILTIN_SYSTEMS:
            return None, (f"no force field: the reference MD is not a datagen run of a built-in "
                          f"system (engine {meta.get('engine')!r}, system {name!r})")
        solvent = meta.get("solvent", "vacuum")
        prepared = prepare_system(name, solvent=solvent, constraints=meta.get("constraints"),
                                  cutoff_nm=meta.get("cutoff_nm"))
        if prepared.system.getNumParticles() != traj.n_atoms:
            return None, (f"the rebuilt {name} has {prepared.system.getNumParticles()} atoms, "
                          f"the data {traj.n_atoms}")
        plat = choose_platform(platform, traj.n_atoms, solvent)
        context = openmm.Context(prepared.system, openmm.VerletIntegrator(0.001 * unit.picosecond),
                                 plat)
        return cls(context, f"{name} ({prepared.force_field}, {solvent})"), ""

    def __call__(self, positions_A: np.ndarray) -> float:
        """kJ/mol of (n_atoms, 3) Å positions (NaN where the engine cannot evaluate them)."""
        from openmm import unit

        try:
            self.context.setPositions(np.asarray(positions_A, dtype=np.float64) * 0.1)
            state = self.context.getState(getEnergy=True)
        except Exception:  # OpenMM raises on NaN coordinates
            return float("nan")
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def reference_energies(traj, frame: int, energy: ReferenceEnergy, window: int = 10
                       ) -> tuple[np.ndarray, float | None]:
    """Energies (kJ/mol) of the ``window`` MD frames up to ``frame`` and, where the data stores
    energies, the largest difference between stored and rebuilt values (a force-field check)."""
    idx = np.arange(max(0, frame - window + 1), frame + 1)
    full = traj.read(idx)
    ours = np.array([energy(f) for f in full])
    if traj.potential_energy is None:
        return ours, None
    stored = np.asarray(traj.potential_energy[idx[0]:idx[-1] + 1], dtype=np.float64)
    return ours, float(np.abs(ours - stored).max())


def guard_events(sur, frames: np.ndarray, times_ps: np.ndarray, start_full: np.ndarray,
                 energy: ReferenceEnergy | None = None,
                 md_energies: np.ndarray | None = None) -> dict[str, Any]:
    """Guard checks on every jump end of a rollout, as an engine would run them.

    Args:
        frames: (F, model atoms, 3) Å, the rollout (P frames per jump).
        times_ps: (F,) ps.
        start_full: (n_atoms, 3) Å, the full system the rollout started from; the atoms the
            model does not predict are carried along from it jump by jump.
        energy: the reference force field (None: no energy check).
        md_energies: kJ/mol of reference MD frames, the energy check's baseline.
    """
    from integrations.guards import GuardConfig, Guards
    from integrations.reconstruct import Reconstructor

    guards = Guards(sur, GuardConfig(action="warn"))
    for e in md_energies if md_energies is not None else ():
        guards.record_energy(float(e))
    rebuild = Reconstructor.for_surrogate(sur)
    n_out = len(sur.times_ps)
    failed: dict[str, int] = {}
    rejected = 0
    rises = []
    full = np.asarray(start_full, dtype=np.float64)
    for j, k in enumerate(range(n_out - 1, len(frames), n_out)):
        if np.isfinite(frames[k]).all() and np.isfinite(full).all():
            full = rebuild(full, frames[k])
        else:
            full = np.full_like(full, np.nan)
        e = energy(full) if energy is not None and np.isfinite(full).all() else None
        if e is not None and md_energies is not None and len(md_energies):
            rises.append(guards.energy_rise(e))  # the window holds the MD energies only
        events = guards.check(full, energy_kJ_per_mol=e, jump=j, time_ps=float(times_ps[k]))
        rejected += bool(events)
        for ev in events:
            failed[ev.check] = failed.get(ev.check, 0) + 1
    checked = len(frames) // n_out
    out: dict[str, Any] = {"jumps_checked": checked, "rejected": rejected, "failures": failed,
                           "pass_fraction": 1 - rejected / max(checked, 1),
                           "energy_checked": energy is not None,
                           "energy_threshold_kJ_per_mol": float(guards.energy_jump_kJ_per_mol),
                           "reconstructed_atoms": int(sur.n_atoms - sur.n_model_atoms)}
    if rises:
        out["energy_rise_kJ_per_mol"] = {"median": float(np.median(rises)),
                                         "max": float(np.max(rises)),
                                         "first_jump": float(rises[0])}
    return out


class _KeptStates:
    """OpenMM reporter: model-atom positions (Å), time (ps) and potential energy (kJ/mol) of the
    state after every step of a ``SurrogateSimulation`` (one step = one jump), whether fallback
    MD made it (``from_md``: such states are MD's, not the model's), and the wall clock (s) and
    the guards' relaxation iterations so far at each (``clock_s``, ``relaxed``: from
    :meth:`start`, one more entry than reports), and the model atoms' positions (Å) at the
    start (``first``). Per jump also what tells why a run grows dearer: how many draws it took
    (``draws``), the energy rise (kJ/mol over the reference) of its first draw where the energy
    check failed it (``first_rise``, NaN where it passed), and after it the guards' reference
    energy (``reference``) and the relaxation's full-to-solvent-free drop ratio
    (``drop_ratio``, NaN before any relaxation)."""

    def __init__(self, atoms: np.ndarray) -> None:
        self.atoms = np.asarray(atoms)
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.energies: list[float] = []
        self.from_md: list[bool] = []
        self.clock_s: list[float] = []
        self.relaxed: list[int] = []
        self.first: np.ndarray | None = None
        self.keep_full: set[int] = set()  # jumps (1 = the first) whose full state is kept
        self.full: dict[int, np.ndarray] = {}  # jump (0 = the start) -> (n_atoms, 3) Å
        self.draws: list[int] = []
        self.first_rise: list[float] = []
        self.reference: list[float] = []
        self.drop_ratio: list[float] = []
        self._fallbacks = 0
        self._redraws = 0

    def start(self, simulation) -> None:
        """The timed run begins now."""
        from openmm import unit

        state = simulation.context.getState(positions=True)
        full = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
        self.first = full[self.atoms]
        if self.keep_full:
            self.full[0] = full
        self.clock_s = [time.perf_counter()]
        self.relaxed = [simulation.guards.relax_iterations_used]

    def describeNextReport(self, simulation) -> dict:
        return {"steps": 1, "periodic": None, "include": ["positions", "energy"]}

    def report(self, simulation, state) -> None:
        from openmm import unit

        pos = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        self.frames.append(np.asarray(pos)[self.atoms])
        if len(self.frames) in self.keep_full:
            self.full[len(self.frames)] = np.array(pos)
        self.times.append(state.getTime().value_in_unit(unit.picosecond))
        self.energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        self.from_md.append(simulation.n_fallbacks > self._fallbacks)
        self._fallbacks = simulation.n_fallbacks
        self.clock_s.append(time.perf_counter())
        guards = simulation.guards
        self.relaxed.append(guards.relax_iterations_used)
        self.draws.append(1 + simulation.n_redraws - self._redraws)
        self._redraws = simulation.n_redraws
        self.first_rise.append(first_draw_rise(simulation))
        self.reference.append(guards.energy_reference_kJ_per_mol)
        relaxation = getattr(simulation, "_relax", None)  # built by the first relaxation
        self.drop_ratio.append(float("nan") if relaxation is None else relaxation.drop_ratio)


def engine_rollout(sur, traj, frame: int, n_jumps: int, *, action: str, relax_iterations: int,
                   platform: str = "auto", progress: bool = True,
                   end_velocities: str = "difference", jump_noise=None,
                   noise_scale: float = 1.0, redraws: int = 0,
                   basin_states: int = 0) -> dict[str, Any]:
    """``n_jumps`` jumps of ``SurrogateSimulation`` from MD frame ``frame``, guards acting
    (stochastic jumps with ``jump_noise``, a JumpNoise or its file, draws seeded with 1; a failed
    draw drawn again up to ``redraws`` times before MD stands in).

    The System is the dataset's (a ``datagen`` OpenMM run of a built-in system, rebuilt from its
    metadata with the same solvent, constraints, cutoff and hydrogen masses); fallback MD uses the
    dataset's integrator settings. Returns ``frames`` (n_jumps, model atoms, 3) Å and ``times``
    (n_jumps,) ps from the start, ``energies`` (n_jumps,) kJ/mol of the kept states, the engine's
    ``guards`` summary, ``jumps``/``fallbacks`` counts and ``wall_s``. ``basin_states`` > 0:
    also ``basins``, the :func:`basin_depths` of the start, of that many kept states spread
    over the run and of as many MD frames (after the timed run).
    """
    import openmm
    from openmm import unit

    from datagen.openmm_md import choose_platform, prepare_system
    from datagen.systems import BUILTIN_SYSTEMS
    from integrations.guards import GuardConfig
    from integrations.openmm_simulation import SurrogateSimulation

    meta = traj.metadata
    if meta.get("engine") != "openmm" or meta.get("system") not in BUILTIN_SYSTEMS:
        raise SystemExit(f"--engine needs reference MD made by datagen from a built-in system "
                         f"(its force field is rebuilt from the metadata); this data has engine "
                         f"{meta.get('engine')!r}, system {meta.get('system')!r}")
    solvent = meta.get("solvent", "vacuum")
    prepared = prepare_system(meta["system"], solvent=solvent,
                              constraints=meta.get("constraints"), hmr=bool(meta.get("hmr")),
                              cutoff_nm=meta.get("cutoff_nm"))
    temperature = float(meta.get("temperature_K", 300.0))
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, float(meta.get("friction_per_ps") or 1.0) / unit.picosecond,
        float(meta.get("step_fs", 2.0)) * 1e-3 * unit.picosecond)
    integrator.setRandomNumberSeed(1)
    sim = SurrogateSimulation(prepared.topology, prepared.system, sur, integrator=integrator,
                              platform=choose_platform(platform, traj.n_atoms, solvent),
                              guards=GuardConfig(action=action, relax_iterations=relax_iterations),
                              temperature_K=temperature, progress=progress,
                              end_velocities=end_velocities, velocity_seed=1,
                              jump_noise=jump_noise, noise_scale=noise_scale, noise_seed=1,
                              redraws=redraws if jump_noise is not None else 0)
    frame_idx = np.array([frame])
    sim.context.setPositions(traj.read(frame_idx)[0] * 0.1)  # Å -> nm
    if traj.velocities is not None:
        sim.context.setVelocities(traj.read(frame_idx, "velocities")[0] * 0.1)  # Å/ps -> nm/ps
    else:
        sim.context.setVelocitiesToTemperature(temperature * unit.kelvin, 1)
    start_ps = sim.context.getState().getTime().value_in_unit(unit.picosecond)
    if sur.needs_history:  # the MD frames before the start are its first input history
        _, _, hist = start_state(sur, traj, frame)
        for k, past in enumerate(hist[::-1]):
            sim.propagator.observe(start_ps - k * sur.history_stride_ps, past)
    kept = _KeptStates(sur.model_atoms)
    if basin_states > 0:
        kept.keep_full = {int(j) for j in np.linspace(0, n_jumps, basin_states + 1)[1:].round()}
    sim.reporters.append(kept)
    t0 = time.perf_counter()
    kept.start(sim)
    sim.step(n_jumps)
    wall = time.perf_counter() - t0
    basins = None
    if basin_states > 0:
        md = np.linspace(frame, traj.n_frames - 1, basin_states).round().astype(int)
        basins = basin_depths(prepared.system, sim.context.getPlatform(), sur.model_atoms,
                              {f"jump {j}": x for j, x in sorted(kept.full.items())},
                              {f"MD frame {i}": traj.read(np.array([i]))[0] for i in md})
    model = ~np.asarray(kept.from_md, dtype=bool)  # fallback MD's states are not scored
    n_atoms = len(sur.model_atoms)
    # how far each jump moved the model atoms once superposed (its internal part, Å²), and how
    # far from the start each state is (Å RMSD, superposed): motion, and drift
    states = [kept.first, *kept.frames]
    moved = [superposed_msd(b, a) for a, b in zip(states[:-1], states[1:])]
    from_start = [float(np.sqrt(superposed_msd(x, kept.first))) for x in kept.frames]
    return {"frames": np.asarray(kept.frames).reshape(-1, n_atoms, 3)[model],
            "times": (np.asarray(kept.times) - start_ps)[model],
            "energies": np.asarray(kept.energies)[model], "guards": sim.guard_summary(),
            "jumps": sim.n_jumps, "fallbacks": sim.n_fallbacks, "redrawn": sim.n_redraws,
            "wall_s": wall, "basins": basins,
            "simulated_ps": float(kept.times[-1] - start_ps) if kept.times else 0.0,
            # per jump, fallbacks included: wall s (the reporters' own time too) and relaxation
            # iterations, where a run that grows dearer as it goes shows
            "per_jump": {"wall_s": np.diff(kept.clock_s).tolist(),
                         "relax_iterations": np.diff(kept.relaxed).tolist(),
                         "from_md": list(kept.from_md), "moved_internal_A2": moved,
                         "rmsd_from_start_A": from_start, "draws": kept.draws,
                         "energy_kJ_per_mol": kept.energies,
                         "first_draw_rise_kJ_per_mol": kept.first_rise,
                         "energy_reference_kJ_per_mol": kept.reference,
                         "drop_ratio": kept.drop_ratio}}


#: cumulative minimiser iterations at which :func:`basin_depths` reads the energy
BASIN_ITERATIONS = (10, 30, 100, 300)


def basin_depths(system, platform, model_atoms: np.ndarray, kept: dict[str, np.ndarray],
                 md: dict[str, np.ndarray], iterations=BASIN_ITERATIONS) -> dict[str, Any]:
    """How deep the energy basin of each state is: its potential energy (kJ/mol, the System's
    full force field, flexible copy) and the energies after ``iterations`` cumulative L-BFGS
    iterations from it, for ``kept`` states of a run and ``md`` frames (name -> (n_atoms, 3)
    Å), all relative to the mean energy of the ``md`` frames; and per force of the System, the
    energy at the floor (after the last iteration count) relative to the MD frames' mean floor
    (``floor_by_force``: which terms hold a kept state's shallower basin).

    An MD state carries its thermal strain, most of it in the stiff terms a few iterations
    remove; a relaxed state sits at the guards' target with those terms already cold. The energy
    after many iterations (the floor of the state's basin) tells whether the kept states stay in
    basins as low as the MD's or climb into higher ones, where a relaxation that must reach the
    same target needs ever more iterations."""
    import openmm

    from integrations.openmm_simulation import Relaxation

    grouped, names = split_bonded_by_part(system, model_atoms)
    forces = list(grouped.getForces())
    if len(forces) > 31:
        raise SystemExit(f"--basin-states splits the energy by force: the System has "
                         f"{len(forces)} forces, OpenMM counts at most 31 besides the copy's own")
    for group, force in enumerate(forces, start=1):  # 0: the flexible copy's own bonds
        force.setForceGroup(group)
    names = [f"{name} {group}" for group, name in enumerate(names, start=1)]
    relax = Relaxation(grouped, platform, None, model_atoms)

    def by_force(y: np.ndarray) -> list[float]:
        relax.energy(y)  # sets the positions
        return [relax.context.getState(energy=True, groups={g}).getPotentialEnergy()
                .value_in_unit(openmm.unit.kilojoule_per_mole)
                for g in range(1, len(forces) + 1)]

    def profile(x: np.ndarray) -> tuple[list[float], list[float]]:
        y = np.asarray(x, dtype=np.float64)
        out, done = [relax.energy(y)], 0
        for n in iterations:
            y = relax.minimise(y, None, n - done)
            done = n
            out.append(relax.energy(y))
        return out, by_force(y)

    md_p = {k: profile(x) for k, x in md.items()}
    kept_p = {k: profile(x) for k, x in kept.items()}
    ref = float(np.mean([e[0] for e, _ in md_p.values()]))
    floor = np.mean([f for _, f in md_p.values()], axis=0)
    return {"iterations": [0, *iterations], "md_mean_energy_kJ_per_mol": ref,
            "md": {k: [e - ref for e in es] for k, (es, _) in md_p.items()},
            "kept": {k: [e - ref for e in es] for k, (es, _) in kept_p.items()},
            "forces": names,
            "floor_by_force": {k: (np.asarray(f) - floor).tolist()
                               for k, (_, f) in {**md_p, **kept_p}.items()}}


#: bonded forces :func:`split_bonded_by_part` splits: class -> (terms, parameters of a term)
_BONDED = {"HarmonicBondForce": ("getNumBonds", "getBondParameters", "addBond", 2),
           "HarmonicAngleForce": ("getNumAngles", "getAngleParameters", "addAngle", 3),
           "PeriodicTorsionForce": ("getNumTorsions", "getTorsionParameters", "addTorsion", 4)}


def split_bonded_by_part(system, model_atoms: np.ndarray):
    """A copy of ``system`` whose bond, angle and torsion forces are each split in three by the
    atoms a term touches: only atoms the model predicts (``model``), only atoms it rebuilds
    (``rebuilt``: side chains and hydrogens riding on a backbone) or both (``junction``). The
    energy is unchanged. Returns the copy and a name per force (class and part)."""
    import openmm

    out = openmm.XmlSerializer.clone(system)
    predicted = np.zeros(system.getNumParticles(), dtype=bool)
    predicted[np.asarray(model_atoms)] = True
    for index in reversed(range(out.getNumForces())):
        force = out.getForce(index)
        kind = type(force).__name__
        if kind not in _BONDED:
            continue
        count, get, add, n_atoms = _BONDED[kind]
        parts = {part: getattr(openmm, kind)() for part in ("model", "junction", "rebuilt")}
        for part, split in parts.items():
            split.setName(f"{kind} ({part} atoms)")
        for i in range(getattr(force, count)()):
            params = getattr(force, get)(i)
            inside = predicted[list(params[:n_atoms])]
            part = "model" if inside.all() else "rebuilt" if not inside.any() else "junction"
            getattr(parts[part], add)(*params)
        for part in parts.values():
            part.setUsesPeriodicBoundaryConditions(force.usesPeriodicBoundaryConditions())
        out.removeForce(index)
        for part in parts.values():
            out.addForce(part)
    names = [force.getName() for force in out.getForces()]
    return out, names


def by_quarter(values: list[float], stat=np.mean) -> list[float | None]:
    """``stat`` (default the mean) of the finite ``values`` in each of the four quarters of the
    run (fewer for fewer than 4 values; None for a quarter without a finite value)."""
    parts = np.array_split(np.asarray(values, dtype=np.float64), min(4, len(values)))
    return [float(stat(part[np.isfinite(part)])) if np.isfinite(part).any() else None
            for part in parts if len(part)]


def engine_motion(per_jump: dict[str, list], traj, sur) -> dict[str, Any]:
    """What an engine run's jumps moved: the mean internal motion of the model's own jumps (Å²
    per atom, superposed: fallback MD's left out), beside the reference MD's over the same
    time (every frame of ``traj`` a start; None where the file is shorter than one jump), and
    the RMSD from the start (Å, superposed) by quarter of the run and at its end."""
    own = [m for m, md in zip(per_jump["moved_internal_A2"], per_jump["from_md"]) if not md]
    md = motion_over_lag(traj.read(slice(None))[:, sur.model_atoms],
                         int(round(sur.jump_ps / traj.interval_ps)))
    rmsd = per_jump["rmsd_from_start_A"]
    return {"internal_A2_per_jump": float(np.mean(own)) if own else None,
            "md_internal_A2": md["internal_A2"] if md else None,
            "rmsd_from_start_A_by_quarter": by_quarter(rmsd) if rmsd else [],
            "rmsd_from_start_A_end": float(rmsd[-1]) if rmsd else None}


def md_sampling_floor(traj, sur) -> dict[str, Any] | None:
    """h(r) MAE and torsion JSD between the first and the second half of the reference MD's
    frames (scored as the rollouts are, on ``sur``'s atoms): what two stretches of the MD itself
    differ by, the floor a rollout's figures are read against. None without a model."""
    if sur is None or traj.n_frames < 4:
        return None
    half = traj.n_frames // 2
    step = max(1, half // MAX_SCORED_FRAMES)
    first = traj.read(slice(0, half, step))[:, sur.model_atoms]
    second = traj.read(slice(half, 2 * half, step))[:, sur.model_atoms]
    out = score(sur, first, second, traj.topology)
    return {"frames": int(len(first)), "h_r_mae": out.get("h_r_mae"),
            "torsion_jsd": out.get("torsion_jsd")}


def engine_guard_events(run: dict[str, Any], md_energies: np.ndarray | None) -> dict[str, Any]:
    """The engine's guard record of an :func:`engine_rollout`, in the shape of
    :func:`guard_events` (``rejected``: jumps the guards rejected and acted on) plus what the
    actions did and how far the kept states' energies sit above the MD's."""
    g = run["guards"]
    rejected = int(g["jumps_failed"])  # jumps, not actions (a failed relaxation adds fallback)
    out: dict[str, Any] = {"jumps_checked": g["jumps_checked"], "rejected": rejected,
                           "failures": g["failures"], "actions": g["actions"],
                           "pass_fraction": 1 - rejected / max(g["jumps_checked"], 1),
                           "accepted_as_predicted": g["jumps_checked"] - rejected,
                           "relaxations": g["relaxations"], "fallbacks": run["fallbacks"],
                           "redrawn": run.get("redrawn", 0),
                           "relax_iterations_per_relaxation": (g["relax_iterations_used"]
                                                               / max(g["relaxations"], 1)),
                           "energy_checked": True,
                           "energy_threshold_kJ_per_mol":
                               g["thresholds"]["energy_jump_kJ_per_mol"],
                           "engine": True}
    if md_energies is not None and len(md_energies):
        md_median = float(np.median(md_energies))
        above = run["energies"] - md_median
        if g.get("energy_reference_kJ_per_mol") is not None:  # what the guards measured from
            out["energy_reference_above_md_kJ_per_mol"] = (g["energy_reference_kJ_per_mol"]
                                                           - md_median)
        out["kept_energy_above_md_kJ_per_mol"] = {"median": float(np.median(above)),
                                                  "max": float(np.max(above)),
                                                  "last_100_median":
                                                      float(np.median(above[-100:])),
                                                  "series": above.tolist(),
                                                  "times_ps": np.asarray(run["times"]).tolist()}
    return out


def kept_times_ns(row: dict[str, Any]) -> np.ndarray:
    """(n_kept,) ns: the simulated times of an engine row's kept states (the states fallback MD
    made are left out, so after a fallback they are not one jump apart)."""
    kept = row["guards"]["kept_energy_above_md_kJ_per_mol"]
    if "times_ps" in kept:
        return np.asarray(kept["times_ps"], dtype=float) * 1e-3
    # results saved before the times were kept: one state per jump
    return np.arange(1, len(kept["series"]) + 1) * row["jump_ps"] * 1e-3


def plot_engine_energies(rows: list[dict[str, Any]], md_above: np.ndarray | None, path: Path,
                         title: str) -> Path:
    """Potential energy of the states the engine kept, above the reference MD's median, vs
    simulated time, with the MD's own spread and each run's guard threshold (its energy
    reference at the end of the run plus the allowed rise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        g = r["guards"]
        kept = g.get("kept_energy_above_md_kJ_per_mol")
        if kept is None:
            continue
        t_ns = kept_times_ns(r)
        line, = ax.plot(t_ns, np.asarray(kept["series"]) * 1e-3, lw=1.0,
                        label=f"{r['model']} (kept)")
        base = g.get("energy_reference_above_md_kJ_per_mol", 0.0)
        ax.axhline((base + g["energy_threshold_kJ_per_mol"]) * 1e-3, color=line.get_color(),
                   ls="--", lw=0.8, label=f"{r['model']} guard threshold")
    if md_above is not None and len(md_above):
        ax.axhspan(float(md_above.min()) * 1e-3, float(md_above.max()) * 1e-3, color="grey",
                   alpha=0.3, label="reference MD (range)")
    ax.set_xlabel("simulated time (ns)")
    ax.set_ylabel("potential energy above MD median (MJ/mol)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return save_figure(fig, path)


@clean_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI)")
    parser.add_argument("--checkpoints", nargs="+", default=None,
                        help="trained checkpoints (of the system in --data)")
    parser.add_argument("--data", default=None,
                        help="reference MD (default: datagen MD of --system, cached)")
    parser.add_argument("--system", default="alanine-dipeptide",
                        choices=["alanine-dipeptide", "adk"],
                        help="system of the models trained here (adk: backbone, 4 ps jumps)")
    parser.add_argument("--models", nargs="+", default=["egno", "painet"], choices=TRAINABLE,
                        help="models trained here when no --checkpoints are given")
    parser.add_argument("--solvent", default="vacuum", choices=["vacuum", "implicit"])
    parser.add_argument("--frames", type=int, default=None,
                        help="frames of generated MD (default 5000 alanine, 800 AdK)")
    parser.add_argument("--train-epochs", type=int, default=30)
    parser.add_argument("--max-steps-per-epoch", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="override n_layers")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="training precision of the models trained here (rollouts: fp32)")
    parser.add_argument("--platform", default="auto",
                        help="OpenMM platform of the energy check (auto: as datagen picks)")
    parser.add_argument("--no-energy", dest="energy", action="store_false",
                        help="skip the energy guard even where the force field can be rebuilt")
    parser.add_argument("--selection", default=None, choices=["all", "heavy"],
                        help="model atoms of the models trained here (default: the example "
                             "config's, all atoms); heavy: hydrogens left out, as the engine "
                             "integrations rebuild them")
    parser.add_argument("--engine", action="store_true",
                        help="roll out inside OpenMM (SurrogateSimulation, guards acting) "
                             "instead of the free-running model")
    parser.add_argument("--guard-action", default="relax", choices=["relax", "fallback", "warn"],
                        help="with --engine: what the guards do with a rejected jump")
    parser.add_argument("--end-velocities", default="difference",
                        choices=["difference", "thermal"],
                        help="--engine: velocities of each kept jump's end state (the next "
                             "jump's input): backward differences or Maxwell-Boltzmann draws")
    parser.add_argument("--jump-noise", nargs="+", default=None, metavar="FILE|none",
                        help="with --engine: a jump-noise file (evaluate --noise-out) per "
                             "checkpoint, 'none' for deterministic jumps")
    parser.add_argument("--noise-scale", type=float, default=1.0,
                        help="scale of the jump-noise draws (default 1)")
    parser.add_argument("--redraws", type=int, default=0, metavar="N",
                        help="with --jump-noise: a draw the guards reject (and its relaxation "
                             "cannot save) is drawn again up to N times before MD stands in")
    parser.add_argument("--basin-states", type=int, default=0, metavar="N",
                        help="with --engine: after the run, minimise N kept states spread over "
                             "it, the start and N MD frames, and print how deep each one's "
                             "energy basin is (energies after 10/30/100/300 iterations): "
                             "whether a run's states climb into higher basins")
    parser.add_argument("--relax-iterations", type=int, default=200,
                        help="with --engine and relax: minimiser iterations per relaxation")
    parser.add_argument("--jumps", type=int, default=1000)
    parser.add_argument("--start-fraction", type=float, default=0.9,
                        help="start the rollout at this fraction of the reference trajectory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="bench_data")
    parser.add_argument("--out-dir", default="bench_runs/validity")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.noise_scale != 1.0 and args.jump_noise is None:
        parser.error("--noise-scale scales the draws of --jump-noise; give --jump-noise too")
    setup_logging()
    if args.quick:
        if args.system != "alanine-dipeptide":
            parser.error("--quick runs on alanine dipeptide")
        args.frames, args.train_epochs, args.max_steps_per_epoch = 300, 1, 2
        args.hidden, args.jumps = args.hidden or 8, min(args.jumps, 10)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    from surrogate_md import Surrogate
    from surrogate_md.data.h5md import open_trajectory
    from surrogate_md.evaluate.core import COLLAPSE_A

    info = machine(args.device)
    command = command_line(__file__, argv)
    start = time.perf_counter()
    args.frames = args.frames or (5000 if args.system == "alanine-dipeptide" else 800)
    data = Path(args.data) if args.data else (alanine_data(args) if args.system ==
                                              "alanine-dipeptide" else adk_data(args))
    if args.checkpoints:
        checkpoints = [Path(c) for c in args.checkpoints]
    else:
        checkpoints = [train_model(args, m, data) for m in args.models]
    noises: list[str | None] = [None] * len(checkpoints)
    loaded: dict[str, Any] = {}
    if args.basin_states < 0 or (args.basin_states and not args.engine):
        parser.error("--basin-states N (N >= 0) minimises states of a run inside OpenMM: it "
                     "needs --engine")
    if args.redraws < 0 or (args.redraws and args.jump_noise is None):
        parser.error("--redraws N (N >= 0) draws a stochastic jump again: it needs --jump-noise")
    if args.jump_noise is not None:
        if not args.engine or len(args.jump_noise) != len(checkpoints):
            parser.error("--jump-noise needs --engine and one entry (a file or 'none') per "
                         "checkpoint")
        from surrogate_md.noise import JumpNoise

        noises = [None if n == "none" else n for n in args.jump_noise]
        loaded = {n: JumpNoise.load(n) for n in set(noises) - {None}}  # bad files before work
    rows = []
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []  # (phi, psi) of the MD and each run
    with open_trajectory(data) as traj:
        energy, no_energy = (ReferenceEnergy.from_trajectory(traj, args.platform) if args.energy
                             else (None, "--no-energy"))
        if energy is None:
            log.info("energy guard off: %s", no_energy)
        for ckpt, noise in zip(checkpoints, noises):
            sur = Surrogate.load(ckpt, device=args.device)
            sur.check_atomic_numbers(traj.topology.atomic_numbers)
            history_frames = (round(sur.history_length * sur.history_stride_ps /
                                    traj.interval_ps) if sur.needs_history else 1)
            frame = min(max(int(args.start_fraction * (traj.n_frames - 1)), history_frames),
                        traj.n_frames - 1)
            pos, vel, hist = start_state(sur, traj, frame)
            md_energies, energy_check = (reference_energies(traj, frame, energy)
                                         if energy is not None else (None, None))
            log.info("%s: %d-jump rollout (%g ps) from frame %d", sur.name, args.jumps,
                     args.jumps * sur.jump_ps, frame)
            engine_run = None
            t0 = time.perf_counter()
            if args.engine:
                engine_run = engine_rollout(sur, traj, frame, args.jumps,
                                            action=args.guard_action,
                                            relax_iterations=args.relax_iterations,
                                            platform=args.platform, progress=args.progress,
                                            end_velocities=args.end_velocities,
                                            jump_noise=loaded.get(noise),
                                            noise_scale=args.noise_scale,
                                            redraws=args.redraws,
                                            basin_states=args.basin_states)
                frames, times = engine_run["frames"], engine_run["times"]
                rollout_s = engine_run["wall_s"]  # the engine's stepping, as its ns/day
                if len(frames) == 0:
                    raise SystemExit(f"{sur.name}: every jump fell back to MD; there are no "
                                     "model states to score (guards "
                                     f"{engine_run['guards']['failures']})")
            else:
                with np.errstate(all="ignore"):
                    frames, times = sur.rollout(pos, vel, hist, n_jumps=args.jumps,
                                                progress=args.progress)
                rollout_s = time.perf_counter() - t0
            step = max(1, traj.n_frames // MAX_SCORED_FRAMES)
            ref = traj.read(slice(0, traj.n_frames, step))[:, sur.model_atoms]
            phi_psi = ramachandran_quads(sur, traj.topology)
            if phi_psi is not None:
                from surrogate_md import metrics as M

                ok = frames[np.isfinite(frames).all(axis=(1, 2))]
                if not panels:
                    panels.append(("reference MD", *(M.torsions(ref, q) for q in phi_psi)))
                label = sur.name + (" + jump noise" if noise is not None else "")
                panels.append((label, *(M.torsions(ok, q) for q in phi_psi)))
            with np.errstate(all="ignore"):
                row = {"model": sur.name, "checkpoint": relative_path(ckpt), "jump_ps": sur.jump_ps,
                       "rollout_ps": (engine_run["simulated_ps"] if engine_run
                                      else float(times[-1])), "rollout_s": rollout_s,
                       "start_frame": frame, "reference_frames": int(len(ref)),
                       **score(sur, frames, ref, traj.topology),
                       "guards": (engine_guard_events(engine_run, md_energies) if engine_run
                                  else guard_events(sur, frames, times, pos, energy,
                                                    md_energies))}
                if noise is not None:
                    row["model"] += " + jump noise"
                    row["jump_noise"] = {"file": relative_path(Path(noise)),
                                         "scale": args.noise_scale,
                                         **loaded[noise].describe()}
                if engine_run is not None:
                    per = engine_run["per_jump"]
                    row["per_jump"] = per
                    row["by_quarter"] = {
                        "s_per_jump": by_quarter(per["wall_s"]),
                        "relax_iterations_per_jump": by_quarter(per["relax_iterations"]),
                        "draws_per_jump": by_quarter(per["draws"]),
                        "first_draw_rise_kJ_per_mol_median":
                            by_quarter(per["first_draw_rise_kJ_per_mol"], np.median),
                        "kept_energy_above_reference_kJ_per_mol_median": by_quarter(
                            np.subtract(per["energy_kJ_per_mol"],
                                        per["energy_reference_kJ_per_mol"]), np.median),
                        "energy_reference_kJ_per_mol": by_quarter(
                            per["energy_reference_kJ_per_mol"]),
                        "drop_ratio": by_quarter(per["drop_ratio"])}
                    row["motion"] = engine_motion(per, traj, sur)
                    if engine_run["basins"] is not None:
                        row["basins"] = engine_run["basins"]
                    row["engine"] = {"guard_action": args.guard_action,
                                     "relax_iterations": args.relax_iterations,
                                     "redraws": args.redraws if noise is not None else 0,
                                     "wall_s": engine_run["wall_s"],
                                     "ns_per_day": engine_run["simulated_ps"] * 1e-3 * 86400.0
                                     / engine_run["wall_s"]}
                if energy is not None:
                    row["guards"]["md_energy_median_kJ_per_mol"] = float(np.median(md_energies))
                    row["guards"]["force_field_check_kJ_per_mol"] = energy_check
                else:
                    row["guards"]["energy_skipped"] = no_energy
            rows.append(row)
        md_floor = md_sampling_floor(traj, sur if rows else None)
    results = {"machine": info, "command": command, "quick": args.quick, "engine": args.engine,
               "data": relative_path(data), "md_floor": md_floor,
               "jumps": args.jumps, "models": rows, "wall_seconds": time.perf_counter() - start}

    def guard_cell(g: dict) -> str:
        fails = ", ".join(f"{k} {v}" for k, v in sorted(g["failures"].items())) or "none"
        cell = f"{g['rejected']}/{g['jumps_checked']} ({fails})"
        if g.get("engine"):
            cell += (f"; relaxed {g['relaxations']} "
                     f"({fmt(g['relax_iterations_per_relaxation'])} it. each), "
                     f"MD fallbacks {g['fallbacks']}"
                     + (f", redrawn {g['redrawn']}" if g.get("redrawn") else ""))
        return cell

    def size_cell(r: dict) -> str:
        g = r.get("radius_of_gyration_A")
        if not g or g["model_min"] is None:
            return "n/a"
        cell = (f"{fmt(g['model_min'])}–{fmt(g['model_max'])} "
                f"(MD {fmt(g['reference_min'])}–{fmt(g['reference_max'])})")
        if g["allowed"] is not None:
            cell += f"; {fmt(g['model_outside_fraction'])} outside {fmt(g['allowed'][0])}–" \
                    f"{fmt(g['allowed'][1])}"
        return cell

    body = []
    for r in rows:
        body.append([r["model"], f"{args.jumps} x {fmt(r['jump_ps'])} ps", fmt(r["rollout_s"]),
                     f"{r.get('collapsed_frames', 'n/a')}/{r['frames']}",
                     fmt(r.get("clash_fraction")),
                     str(r.get("chain_break_frames", "n/a")), fmt(r.get("h_r_mae")),
                     fmt(r.get("torsion_jsd")), size_cell(r), guard_cell(r["guards"])])
    if md_floor:
        body.append([f"reference MD, first half vs second half ({md_floor['frames']} frames "
                     "each)", "–", "–", "–", "–", "–", fmt(md_floor.get("h_r_mae")),
                     fmt(md_floor.get("torsion_jsd")), "–", "–"])
    table = markdown_table(["model", "rollout", "wall (s)", "collapsed frames",
                            "clash fraction", "chain-break frames", "h(r) MAE vs MD",
                            "torsion JSD vs MD", "radius of gyration (Å)",
                            "jumps rejected by guards"], body)
    where = (f"inside OpenMM, guards acting ({args.guard_action})" if args.engine
             else "free-running model")
    print(f"# Validity of {args.jumps}-jump rollouts ({where}) vs reference MD ({data.name})\n")
    print(machine_table(info, command) + "\n")
    print(table + "\n")
    print(f"Collapsed: a bond > {COLLAPSE_A:g} Å off its mean (or non-finite); clash: closest "
          "pair beyond two bonds nearer than the checkpoint's clash distance (fraction of scored "
          "frames); "
          "h(r): pair-distance histogram, 0.1 Å bins; torsion JSD: (phi, psi) histograms, "
          "nats (0..0.69); radius of gyration of the predicted atoms, range over the rollout "
          "(the reference MD's) and the fraction of frames outside the size check's range. "
          "Guards: on the full system, non-finite/bond/clash/chain-break/size"
          + (f" and energy (more than {fmt(rows[0]['guards']['energy_threshold_kJ_per_mol'])} "
             f"kJ/mol above the median of {energy.label} MD before the start)"
             if energy is not None and rows else f" checks; no energy check ({no_energy})")
          + (": the engine's own record (SurrogateSimulation scored the jump ends it kept, "
             "after the guard action)" if args.engine else "")
          + ".\n")
    def series(values) -> str:
        return ", ".join(fmt(v) for v in values)

    quarters = (("s per jump", "s_per_jump"),
                ("relaxation iterations per jump", "relax_iterations_per_jump"),
                ("draws per jump", "draws_per_jump"),
                ("first draw's energy rise (median, kJ/mol)", "first_draw_rise_kJ_per_mol_median"),
                ("kept energy over the reference (median, kJ/mol)",
                 "kept_energy_above_reference_kJ_per_mol_median"),
                ("drop ratio", "drop_ratio"))
    for r in rows:
        if r.get("by_quarter"):
            q = r["by_quarter"]
            print(f"{r['model']}, by quarter of the run: "
                  + "; ".join(f"{label} {series(q[key])}" for label, key in quarters))
        if r.get("motion"):
            m = r["motion"]
            print(f"{r['model']}: internal motion per jump {fmt(m['internal_A2_per_jump'])} Å² "
                  f"(the reference MD's over {r['jump_ps']:g} ps: {fmt(m['md_internal_A2'])}); "
                  f"RMSD from the start by quarter {series(m['rmsd_from_start_A_by_quarter'])} "
                  f"Å, {fmt(m['rmsd_from_start_A_end'])} at the end")
        if r.get("basins"):
            b = r["basins"]
            print(f"\n{r['model']}: energy basins, kJ/mol relative to the MD frames' mean "
                  f"energy, as minimised (full force field, cumulative L-BFGS iterations)\n")
            print(markdown_table(["state", *(f"{n} it." for n in b["iterations"])],
                                 [[name, *(fmt(e, 4) for e in es)]
                                  for part in ("md", "kept") for name, es in b[part].items()]))
            print(f"\n{r['model']}: the floor ({b['iterations'][-1]} it.) by force, kJ/mol "
                  f"relative to the MD frames' mean floor\n")
            print(markdown_table(["state", *b["forces"]],
                                 [[name, *(fmt(e, 4) for e in es)]
                                  for name, es in b["floor_by_force"].items()]))
    print(f"wall time {results['wall_seconds']:.1f} s")
    if args.json_path:
        save_json(args.json_path, results)
        if len(panels) > 1:
            png = plot_ramachandran(panels, Path(args.json_path).with_suffix(".rama.png"),
                                    f"{data.name}: backbone (phi, psi) of {args.jumps}-jump "
                                    + ("runs inside OpenMM" if args.engine else "rollouts"))
            print(f"Ramachandran plot: {png}")
        if args.engine and energy is not None:
            with open_trajectory(data) as traj:
                stored = traj.potential_energy
                md_above = (None if stored is None or not rows else
                            np.asarray(stored, dtype=np.float64)
                            - rows[0]["guards"]["md_energy_median_kJ_per_mol"])
            png = plot_engine_energies(rows, md_above,
                                       Path(args.json_path).with_suffix(".energy.png"),
                                       f"{data.name}: {args.jumps} jumps inside OpenMM, "
                                       f"guards {args.guard_action}")
            print(f"energy plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
