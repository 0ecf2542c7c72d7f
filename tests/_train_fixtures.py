"""Tiny real-MD datasets for the training/evaluation/Surrogate tests.

- alanine dipeptide in vacuum, amber14, Langevin 300 K, run with OpenMM here in about a second
  (``datagen.openmm_md.run_openmm`` replaces this once it exists);
- aspirin heavy-atom-sized small molecule: the shipped MD17 aspirin prmtop run the same way;
- AdK backbone: part of the MDAnalysisTests PSF/DCD (98 frames, 1 ps apart) ingested with
  datagen.

Files are generated once per test session under pytest's base temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from surrogate_md.data import Topology, write_trajectory

SYSTEMS = Path(__file__).resolve().parents[1] / "datagen" / "systems"


def _run_openmm(topology, system, positions, path: Path, *, n_frames: int, steps_per_frame: int,
                seed: int, step_ps: float = 0.002, temperature_K: float = 300.0,
                velocities: bool = True, source: str = "") -> Path:
    import openmm
    from openmm import app, unit

    integrator = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin,
                                                 5.0 / unit.picosecond, step_ps * unit.picosecond)
    integrator.setRandomNumberSeed(seed)
    platform = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(topology, system, integrator, platform, {"Threads": "1"})
    sim.context.setPositions(positions)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(temperature_K * unit.kelvin, seed)
    sim.step(200)  # short equilibration
    pos, vel = [], []
    length, speed = unit.angstrom, unit.angstrom / unit.picosecond
    for _ in range(n_frames):
        sim.step(steps_per_frame)
        state = sim.context.getState(getPositions=True, getVelocities=True)
        pos.append(state.getPositions(asNumpy=True).value_in_unit(length))
        vel.append(state.getVelocities(asNumpy=True).value_in_unit(speed))
    atoms = list(topology.atoms())
    masses = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(len(atoms))]
    top = Topology(
        atomic_numbers=[a.element.atomic_number for a in atoms],
        masses=masses,
        atom_names=[a.name for a in atoms],
        residue_ids=[int(a.residue.id) for a in atoms],
        residue_names=[a.residue.name for a in atoms],
        bonds=[[b[0].index, b[1].index] for b in topology.bonds()],
        segment_ids=[a.residue.chain.id for a in atoms],
    )
    interval = step_ps * steps_per_frame
    meta = {"engine": "openmm", "source": source, "temperature_K": temperature_K,
            "step_fs": step_ps * 1000, "interval_ps": interval, "seed": seed,
            "integrator": "LangevinMiddle"}
    return write_trajectory(path, top, np.asarray(pos), np.arange(1, n_frames + 1) * interval,
                            meta, velocities=np.asarray(vel) if velocities else None)


def make_alanine_dipeptide(path: Path, *, n_frames: int = 400, steps_per_frame: int = 10,
                           seed: int = 0, velocities: bool = True) -> Path:
    """Alanine dipeptide (22 atoms), frames 0.02 ps apart by default."""
    from openmm import app

    pdb = app.PDBFile(str(SYSTEMS / "alanine-dipeptide.pdb"))
    ff = app.ForceField("amber14-all.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    return _run_openmm(pdb.topology, system, pdb.positions, path, n_frames=n_frames,
                       steps_per_frame=steps_per_frame, seed=seed, velocities=velocities,
                       source="alanine-dipeptide.pdb")


def make_aspirin(path: Path, *, n_frames: int = 300, steps_per_frame: int = 5,
                 seed: int = 0) -> Path:
    """Aspirin (21 atoms, GAFF prmtop shipped with datagen), frames 0.005 ps apart."""
    from openmm import app

    prmtop = app.AmberPrmtopFile(str(SYSTEMS / "md17" / "aspirin.prmtop"))
    inpcrd = app.AmberInpcrdFile(str(SYSTEMS / "md17" / "aspirin.inpcrd"))
    system = prmtop.createSystem(nonbondedMethod=app.NoCutoff, constraints=None)
    return _run_openmm(prmtop.topology, system, inpcrd.positions, path, n_frames=n_frames,
                       steps_per_frame=steps_per_frame, seed=seed, step_ps=0.001,
                       temperature_K=500.0, velocities=False, source="aspirin.prmtop")


def make_adk_backbone(path: Path, residues: str = "1:30") -> Path:
    """Backbone atoms of AdK residues ``residues`` (30 residues: 120 atoms by default) from
    MDAnalysisTests' adk.psf + adk_dims.dcd (98 frames, 1 ps apart)."""
    from MDAnalysisTests.datafiles import DCD, PSF

    from datagen.ingest import ingest

    return ingest([PSF, DCD], path, select=f"backbone and resid {residues}", progress=False,
                  command="test fixture")


def cached(tmp_path_factory, name: str, maker, **kwargs) -> Path:
    """Build a dataset once per session (shared by every test module)."""
    base = tmp_path_factory.getbasetemp() / "train-fixtures"
    base.mkdir(exist_ok=True)
    suffix = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    path = base / f"{name}{'-' + suffix if suffix else ''}.h5"
    if not path.exists():
        maker(path, **kwargs)
    return path


def tiny_config(data_path: Path, model: str = "egno", **sections) -> dict:
    """A config dict that trains in a second or two on the alanine-dipeptide fixture."""
    cfg = {
        "data": {"path": str(data_path), "selection": "all", "jump_ps": 0.2, "n_out": 2,
                 "fractions": [0.6, 0.2, 0.2], "counts": [48, 16, 16],
                 "graph": {"kind": "bonds", "two_hop": True}},
        "model": {"name": model},
        "train": {"epochs": 3, "batch_size": 8, "lr": 2e-3},
        "runtime": {"device": "cpu", "progress": False, "log_every": 1000},
    }
    if model in ("egno", "egnn", "painet", "estag"):
        cfg["model"].update({"hidden": 16, "n_layers": 2} if model != "painet"
                            else {"hidden": 16, "n_decoder_layers": 2})
        cfg["model"]["time_dim"] = 8
    for key, value in sections.items():
        cfg[key].update(value)
    return cfg


def torchrun_train(config: dict, run: Path, *extra: str) -> subprocess.CompletedProcess:
    """Train ``config`` into ``run`` with two CPU processes (torchrun, gloo), one thread each."""
    import yaml

    cfg_file = run.parent / f"{run.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "surrogate_md.train", "--config",
                           str(cfg_file), "--out", str(run), "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=400, env=env)
