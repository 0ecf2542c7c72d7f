"""Shared test data of the integration tests: a short physical MD run and surrogate checkpoints.

Everything is generated from physics in seconds: alanine dipeptide in vacuum (amber14, HBonds
constraints) run with OpenMM, written as a canonical dataset file, and analytic (``linear``,
``constant``) or deliberately broken (``egnn`` with NaN weights) surrogates built on it with the
package's own checkpoint format.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

import datagen
from surrogate_md.checkpoint import build_payload, save_checkpoint
from surrogate_md.data import Topology, write_trajectory
from surrogate_md.data.windows import GraphBuilder, GraphSpec, Protocol, select_nodes
from surrogate_md.models import build_model
from surrogate_md.validity import ValidityReference

PDB = Path(datagen.__file__).parent / "systems" / "alanine-dipeptide.pdb"
MD_STEP_PS = 0.002
NM = unit.nanometer
ANGSTROM = unit.angstrom


def alanine_system(constraints=app.HBonds) -> tuple[app.Topology, openmm.System, unit.Quantity]:
    """(topology, System, positions) of alanine dipeptide in vacuum with amber14."""
    pdb = app.PDBFile(str(PDB))
    ff = app.ForceField("amber14-all.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=constraints)
    return pdb.topology, system, pdb.positions


def reference_platform() -> openmm.Platform:
    return openmm.Platform.getPlatformByName("Reference")


def topology_from_openmm(topology: app.Topology) -> Topology:
    atoms = list(topology.atoms())
    return Topology(
        atomic_numbers=[a.element.atomic_number for a in atoms],
        masses=[a.element.mass.value_in_unit(unit.dalton) for a in atoms],
        atom_names=[a.name for a in atoms],
        residue_ids=[a.residue.index + 1 for a in atoms],
        residue_names=[a.residue.name for a in atoms],
        bonds=[(b[0].index, b[1].index) for b in topology.bonds()],
    )


@functools.cache
def cached_md() -> dict:
    """The default MD run, computed once per test process (treat as read-only)."""
    return run_alanine_md()


def cold_start(context: openmm.Context, positions, temperature_K: float = 0.05,
               seed: int = 1) -> None:
    """Minimised positions and velocities at a very low temperature: the analytic ``linear``
    surrogate then stays within the guards' tolerances for dozens of 0.02 ps jumps."""
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 100)
    context.setVelocitiesToTemperature(temperature_K * unit.kelvin, seed)


def run_alanine_md(n_frames: int = 150, interval_steps: int = 5, temperature_K: float = 300.0,
                   seed: int = 0) -> dict:
    """Short Langevin MD; returns frames (F, N, 3) Å, velocities Å/ps, times ps, topology."""
    topology, system, positions = alanine_system()
    integ = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, 5.0 / unit.picosecond,
                                            MD_STEP_PS * unit.picosecond)
    integ.setRandomNumberSeed(seed + 1)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("CPU"),
                         {"Threads": "1"})
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    ctx.setVelocitiesToTemperature(temperature_K * unit.kelvin, seed + 1)
    integ.step(200)
    frames, vels = [], []
    for _ in range(n_frames):
        integ.step(interval_steps)
        st = ctx.getState(positions=True, velocities=True)
        frames.append(st.getPositions(asNumpy=True).value_in_unit(ANGSTROM))
        vels.append(st.getVelocities(asNumpy=True).value_in_unit(ANGSTROM / unit.picosecond))
    interval_ps = interval_steps * MD_STEP_PS
    return {"topology": topology_from_openmm(topology), "frames": np.asarray(frames),
            "velocities": np.asarray(vels), "interval_ps": interval_ps,
            "times": np.arange(n_frames) * interval_ps, "temperature_K": temperature_K}


def write_dataset(md: dict, path: Path) -> Path:
    return write_trajectory(path, md["topology"], md["frames"], md["times"],
                            {"engine": "openmm", "force_field": "amber14-all",
                             "temperature_K": md["temperature_K"], "step_fs": MD_STEP_PS * 1000,
                             "interval_ps": md["interval_ps"], "seed": 0},
                            velocities=md["velocities"])


def make_checkpoint(md: dict, path: Path, *, model: str = "linear", selection: str = "all",
                    jump_frames: int = 2, n_out: int = 2, model_config: dict | None = None,
                    break_weights: bool = False, dataset: Path | None = None,
                    history: int = 1, history_stride: int = 1) -> Path:
    """A surrogate checkpoint built on the MD in ``md`` (jump = ``jump_frames`` saved frames).

    ``break_weights`` fills every floating parameter with NaN: a deliberately corrupted model.
    ``history`` > 1 makes a history-protocol checkpoint (``history`` input frames
    ``history_stride`` saved frames apart; give a history model such as ``estag``).
    """
    topo: Topology = md["topology"]
    sel = select_nodes(topo, selection)
    nodes = sel.gather(md["frames"])  # (F, nodes, C, 3)
    graph = GraphBuilder.for_selection(GraphSpec(kind="bonds"), sel, topo.bonds, nodes[0])
    validity = ValidityReference.from_frames(md["frames"][:, sel.atom_index], graph.bonds)
    config = dict(model_config or {})
    if history > 1 and model == "estag":
        config.setdefault("n_history", history)
    net = build_model(model, config)
    net.set_normalisation(velocity_scale=float(np.sqrt((md["velocities"] ** 2).mean())),
                          displacement_scale=0.3, time_scale=jump_frames * md["interval_ps"])
    if break_weights:
        for p in net.parameters():
            p.data.fill_(float("nan"))
    proto = (Protocol("history", jump_frames, n_out, history, history_stride) if history > 1
             else Protocol("s2t", jump_frames, n_out))
    protocol = {**proto.to_dict(), "interval_ps": md["interval_ps"],
                "jump_ps": jump_frames * md["interval_ps"],
                "times_ps": (proto.out_frames * md["interval_ps"]).tolist(),
                "history_stride_ps": history_stride * md["interval_ps"],
                "velocity_source": "file"}
    payload = build_payload(net, protocol=protocol, selection=sel, graph=graph, topology=topo,
                            validity=validity,
                            provenance={"dataset": str(dataset.name) if dataset else "",
                                        "fixture": "tests/_integration_fixtures.py"})
    return save_checkpoint(path, payload)


def small_egnn_config() -> dict:
    from surrogate_md.models.egnn import EGNNConfig

    return dataclasses.asdict(EGNNConfig(hidden=8, n_layers=1, time_dim=4))


def train_tiny_surrogate(tmp_path_factory, selection: str = "heavy") -> Path:
    """``best.pt`` of an egnn trained here for a few seconds (``surrogate_md.train.train``) on a
    real alanine-dipeptide MD run (400 frames, 0.02 ps apart; the dataset is shared with the
    other tests of the session). ``selection`` picks the atoms it predicts ("heavy": the others
    are rebuilt by the integrations). Jump 0.2 ps, two output frames (0.1, 0.2 ps)."""
    from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

    from surrogate_md.train import train

    data = cached(tmp_path_factory, "ala", make_alanine_dipeptide)
    cfg = tiny_config(data, "egnn", train={"epochs": 2, "max_steps_per_epoch": 6},
                      data={"n_out": 2, "jump_ps": 0.2, "selection": selection})
    cfg["model"].update({"hidden": 8, "n_layers": 1, "time_dim": 4})
    return train(cfg, tmp_path_factory.mktemp(f"trained-{selection}") / "run", overwrite=True)


def thermal_start(frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions Å, velocities Å/ps) of one frame of the 300 K fixture MD: a real thermal state
    to start a trained surrogate from."""
    md = cached_md()
    return md["frames"][frame].copy(), md["velocities"][frame].copy()


def sigterm_after_rows(argv: list[str], state_data: Path, rows: int, log: Path,
                       cwd: Path | None = None) -> int:
    """Run ``argv`` (a predict command) in a process with one torch thread, send it SIGTERM once
    its state-data file ``state_data`` has more than ``rows`` lines, and return its exit code
    (stderr goes to ``log``; the test fails if the run ended or stalled before)."""
    import os
    import signal
    import subprocess
    import time

    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                if state_data.exists() and len(state_data.read_text().splitlines()) > rows:
                    break
                time.sleep(0.005)
            assert proc.poll() is None, log.read_text()[-2000:]
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
