"""Processes killed with SIGKILL (not exceptions) resume or leave readable files.

- training killed at several seeded random points resumes to the same metrics and weights as an
  uninterrupted run (the kill-and-resume procedure of ``test_train_resume.py``, reused);
- ``python -m datagen openmm`` killed mid-run resumes with ``--resume`` to a continuous time axis,
  frame for frame the uninterrupted trajectory;
- OpenMM's XTCReporter/DCDReporter driven by ``SurrogateSimulation`` in a killed process leave
  files that MDAnalysis reads, holding every frame reported before the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import test_train_resume as resume_helpers
import torch
import yaml
from _reliability_fixtures import PDB, linear_checkpoint
from _train_fixtures import cached, make_alanine_dipeptide

from surrogate_md.data import open_trajectory
from surrogate_md.train import train

TESTS = Path(__file__).resolve().parent


EPOCHS = 6


def _kill_points(n: int = 5, seed: int = 20240611) -> list[tuple[int, float]]:
    """(completed epochs, extra delay s) of ``n`` kills of one run, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    epochs = np.sort(rng.choice(EPOCHS, size=n, replace=False))
    return [(int(e), round(float(rng.uniform(0.0, 0.08)), 3)) for e in epochs]


KILL_POINTS = _kill_points()


def _config(ala) -> dict:
    cfg = resume_helpers._config(ala)
    cfg["train"]["epochs"] = EPOCHS
    return cfg


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


def test_kill_points_are_many_and_seeded():
    assert len(KILL_POINTS) >= 5 and KILL_POINTS == _kill_points()
    assert all(e < EPOCHS for e, _ in KILL_POINTS)


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_identically(ala, tmp_path):
    """One run killed with SIGKILL at every point of KILL_POINTS (each kill lands in the run the
    previous attempt resumed), then resumed to the end: the same metrics and weights as an
    uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1): tiny model, shared cores
    try:
        _kill_and_resume(ala, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(ala, tmp_path):
    from surrogate_md.checkpoint import load_checkpoint
    from surrogate_md.train.__main__ import main

    reference = tmp_path / "reference"
    train(_config(ala), reference)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(ala)))
    run = tmp_path / "run"
    log = run / "train.log"
    for attempt, (epochs_done, delay_s) in enumerate(KILL_POINTS):
        args = ["--config", str(cfg_file), "--out", str(run)] if attempt == 0 else \
            ["--resume", str(run)]
        logged = log.stat().st_size if log.exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "surrogate_md.train", *args, "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                started = log.exists() and log.stat().st_size > logged  # this attempt runs
                if started and len(resume_helpers._lines(run)) >= epochs_done:
                    time.sleep(delay_s)
                    break
                time.sleep(0.005)
            killed = proc.poll() is None
        finally:
            _kill(proc)
        assert killed, f"attempt {attempt} finished before its kill point: " + \
            proc.stderr.read().decode()[-2000:]
        for name in ("last.pt", "best.pt"):  # a kill may leave a temp file, never a torn one
            if (run / name).exists():
                load_checkpoint(run / name)
        assert len(resume_helpers._lines(run)) <= EPOCHS  # no test record: not finished
    assert main(["--resume", str(run), "-q"]) == 0
    resume_helpers._compare(run, reference)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_datagen_openmm_killed_resumes_to_a_continuous_time_axis(tmp_path):
    from datagen.cli import main

    frames, interval = 1500, 0.01
    argv = ["openmm", "--system", "alanine-dipeptide", "--frames", str(frames),
            "--interval-ps", str(interval), "--step-fs", "1", "--equilibrate-ps", "0.1",
            "--checkpoint-frames", "100", "--platform", "Reference", "--seed", "7",
            "--no-progress"]
    out = tmp_path / "killed.h5"
    partial, chk = Path(f"{out}.partial"), Path(f"{out}.chk.npz")
    proc = subprocess.Popen([sys.executable, "-m", "datagen", *argv, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not chk.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.15)  # into the next checkpoint interval, mid-write of some block
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and partial.exists() and chk.exists()
    with np.load(chk) as c:
        checkpointed = int(c["frames"])
    assert 0 < checkpointed < frames
    assert main([*argv, "-o", str(out), "--resume"]) == 0
    assert not partial.exists() and not chk.exists()
    ref = tmp_path / "ref.h5"
    assert main([*argv, "-o", str(ref)]) == 0
    with open_trajectory(out) as a, open_trajectory(ref) as b:
        assert a.n_frames == frames
        np.testing.assert_allclose(a.time_ps, np.arange(frames) * interval, rtol=0, atol=1e-9)
        steps = a._file["particles/trajectory/position/step"][()]
        np.testing.assert_array_equal(steps, np.arange(frames) * round(interval / 0.001))
        # no duplicated or missing frame: the resumed trajectory is the uninterrupted one
        np.testing.assert_array_equal(a.read(slice(None)), b.read(slice(None)))
        np.testing.assert_array_equal(a.read(slice(None), "velocities"),
                                      b.read(slice(None), "velocities"))


CHILD = """
import sys

from openmm import app

from _integration_fixtures import alanine_system, cold_start, reference_platform
from integrations.openmm_simulation import SurrogateSimulation

checkpoint, xtc, dcd = sys.argv[1:4]
top, system, positions = alanine_system()
sim = SurrogateSimulation(top, system, checkpoint, platform=reference_platform(), guards="raise")
cold_start(sim.context, positions)
sim.reporters.append(app.XTCReporter(xtc, 1))
sim.reporters.append(app.DCDReporter(dcd, 1))
for k in range(1, 100000):
    sim.step(1)
    print(k, flush=True)  # every reporter has written frame k
"""


@pytest.mark.slow
def test_killed_trajectory_writers_leave_readable_files(tmp_path):
    import MDAnalysis as mda

    ck = linear_checkpoint(tmp_path / "constant.pt", model="constant")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    xtc, dcd = tmp_path / "run.xtc", tmp_path / "run.dcd"
    proc = subprocess.Popen([sys.executable, str(script), str(ck), str(xtc), str(dcd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    reported = 0
    try:
        deadline = time.monotonic() + 120
        while reported < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported = int(line)
    finally:
        _kill(proc)
    assert reported >= 40, proc.stderr.read()[-2000:]
    for path in (xtc, dcd):
        u = mda.Universe(str(PDB), str(path))
        n = len(u.trajectory)
        assert n >= reported, (path.name, n, reported)
        x = np.stack([ts.positions.copy() for ts in u.trajectory[:reported]])
        assert np.isfinite(x).all()
        # frame k is the state after jump k: its time is k jumps (every file's own clock)
        times = np.array([ts.time for ts in u.trajectory[:reported]])
        np.testing.assert_allclose(np.diff(times), times[0], rtol=1e-3)
