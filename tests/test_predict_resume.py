"""``python -m integrations.predict``: signals never tear a frame, and ``--resume`` continues a
stopped or killed run to the files of the uninterrupted one.

- a SIGINT or SIGTERM sent while a DCD frame is being written stops the run once that frame and
  its state-data line are whole (before: the file ended in a torn frame); one sent between
  frames stops it at once;
- a run stopped by SIGTERM (a real subprocess) and a killed run (its leftovers built in-process
  deterministically: hidden ``.partial`` files with a frame after the last checkpoint and a torn
  tail) continue with ``--resume`` to the uninterrupted run's frames, times, state data and
  guard counts (thermal velocity draws and a history model's frames included);
- ``--resume`` refuses another command's run, a run with nothing to resume, and says a finished
  run has nothing to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time

import MDAnalysis as mda
import numpy as np
import pytest
from _integration_fixtures import (
    PDB,
    cached_md,
    make_checkpoint,
    sigterm_after_rows,
    train_tiny_surrogate,
)
from openmm import app

from integrations.openmm_simulation import SurrogateSimulation
from integrations.predict import main

XTC_PRECISION_A = 0.01  # XTC stores positions to 0.001 nm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_surrogate(tmp_path_factory)


@pytest.fixture(scope="module")
def trained_history(tmp_path_factory):
    """An ESTAG trained for a few steps (an untrained one copies its last input frame, so the
    history it is given would not show): 3 input frames 0.1 ps apart, frames at 0.1 and
    0.2 ps."""
    from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

    from surrogate_md.train import train

    data = cached(tmp_path_factory, "ala", make_alanine_dipeptide)
    cfg = tiny_config(data, "estag", train={"epochs": 1, "max_steps_per_epoch": 3},
                      data={"protocol": "history", "history": 3, "history_stride_ps": 0.1,
                            "selection": "heavy"})
    return train(cfg, tmp_path_factory.mktemp("trained-estag") / "run", overwrite=True)


def predict_argv(ck, out, n, *extra):
    return [str(ck), "--topology", str(PDB), "-n", str(n), "-o", str(out), "--platform",
            "Reference", "--guard", "warn", *map(str, extra)]


def frames(path):
    """(times ps, positions Å) of every frame MDAnalysis reads."""
    u = mda.Universe(str(PDB), str(path))
    return (np.array([ts.time for ts in u.trajectory]),
            np.stack([ts.positions.copy() for ts in u.trajectory]))


def state_data(path):
    """(header, rows as float arrays) of a state-data CSV."""
    lines = path.read_text().splitlines()
    return lines[0], np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def hidden_files(directory):
    """Hidden files but MDAnalysis' offset caches of the XTC files it read."""
    return sorted(p.name for p in directory.glob(".*") if "_offsets." not in p.name)


def assert_same_run(resumed, reference):
    """Files of a resumed run equal to those of the uninterrupted run (``.xtc``/``.dcd`` paths),
    positions within the format's precision, times, steps and state data exact."""
    t, x = frames(resumed)
    t0, x0 = frames(reference)
    assert len(t) == len(t0)
    np.testing.assert_array_equal(t, t0)
    np.testing.assert_allclose(x, x0, atol=XTC_PRECISION_A)
    head, rows = state_data(resumed.with_suffix(".csv"))
    head0, rows0 = state_data(reference.with_suffix(".csv"))
    assert head == head0
    np.testing.assert_array_equal(rows[:, 0], np.arange(1, len(rows0) + 1) * rows0[0, 0])
    np.testing.assert_array_equal(rows[:, :2], rows0[:, :2])  # steps, times
    np.testing.assert_allclose(rows, rows0, rtol=1e-9, atol=1e-9)
    prov, prov0 = (json.loads(p.with_suffix(".json").read_text()) for p in (resumed, reference))
    for key in ("jumps", "fallbacks", "step", "time_ps", "guards", "frames"):
        assert prov[key] == prov0[key], key
    assert prov["interrupted"] is False and prov["signal"] is None
    return prov


# -- 1. signals never tear a frame -----------------------------------------------------------------
class _SignalOnWrite:
    """A file object that sends ``signum`` to this process right after its ``at``-th write."""

    def __init__(self, real, signum: int, at: int) -> None:
        self._real, self._signum, self._at, self._n = real, signum, at, 0

    def write(self, data):
        written = self._real.write(data)
        self._n += 1
        if self._n == self._at:
            os.kill(os.getpid(), self._signum)
        return written

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_frame_write_waits_for_the_whole_frame(tmp_path, monkeypatch, signum):
    """The signal arrives after the 3rd of the ~10 writes of DCD frame 4: the run stops once
    frame 4, its state-data line and its checkpoint are written (frame 4 is not one of the
    every-3-jumps checkpoints: the stop writes it), with MDAnalysis reading 4 whole frames
    (before: the frame was cut mid-way and 3 read back, the CSV lacked its line)."""
    write_model = app.DCDFile.writeModel
    models = []

    def write_and_signal(self, *args, **kwargs):
        models.append(1)
        if len(models) != 4:
            return write_model(self, *args, **kwargs)
        real = self._file
        self._file = _SignalOnWrite(real, signum, at=3)
        try:
            return write_model(self, *args, **kwargs)
        finally:
            self._file = real

    monkeypatch.setattr(app.DCDFile, "writeModel", write_and_signal)
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    out = tmp_path / "cut.dcd"
    rc = main(predict_argv(ck, out, 20, "--checkpoint-every", 3))
    assert rc == 128 + signum
    prov = json.loads((tmp_path / "cut.json").read_text())
    assert prov["interrupted"] is True and prov["signal"] == signal.Signals(signum).name
    assert prov["frames"] == 4 and len(models) == 4
    times, x = frames(out)
    jump = prov["surrogate"]["jump_ps"]
    np.testing.assert_allclose(times, np.arange(1, 5) * jump, rtol=1e-6)
    assert np.isfinite(x).all()
    assert mda.coordinates.DCD.DCDReader(str(out)).n_frames == 4
    _, rows = state_data(tmp_path / "cut.csv")
    assert rows[:, 0].tolist() == [1, 2, 3, 4]
    record = json.loads((tmp_path / ".cut.chk.json").read_text())
    assert record["frames"] == 4 and record["jumps_done"] == 4


def test_a_signal_between_frames_stops_the_run_at_once(tmp_path, monkeypatch):
    """Outside a frame's writing a signal is not deferred: raised inside the 4th jump, the
    statement after the kill never runs, and three frames are kept."""
    jump = SurrogateSimulation._jump
    calls, after_kill = [], []

    def signalled(self):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            after_kill.append(1)
        jump(self)

    monkeypatch.setattr(SurrogateSimulation, "_jump", signalled)
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    out = tmp_path / "cut.xtc"
    assert main(predict_argv(ck, out, 20)) == 143
    assert after_kill == [] and len(calls) == 4
    assert len(frames(out)[0]) == 3
    assert json.loads((tmp_path / "cut.json").read_text())["frames"] == 3


#: ``python -m integrations.predict`` with 20 ms of sleep before every jump, so that the run
#: cannot end before the test's SIGTERM on a busy machine (the sleep changes no result)
SLOWED_PREDICT = """
import sys, time
from integrations.openmm_simulation import SurrogateSimulation
from integrations.predict import main
jump = SurrogateSimulation._jump
def slowed(self):
    time.sleep(0.02)
    jump(self)
SurrogateSimulation._jump = slowed
sys.exit(main(sys.argv[1:]))
"""


# -- 2. --resume ----------------------------------------------------------------------------------
def test_sigterm_then_resume_gives_the_uninterrupted_run(tmp_path, trained):
    """A trained EGNN with thermal end velocities (every jump draws from the generator the
    checkpoint carries) in a real process stopped by SIGTERM after a few frames, wherever the
    signal lands (mostly between jumps, sometimes in one or in a frame's writing), then the
    same command with --resume: the uninterrupted run's files."""
    n = 120
    extra = ["--end-velocities", "thermal", "--temperature-K", "300", "--seed", "3"]
    reference = tmp_path / "ref" / "run.xtc"
    reference.parent.mkdir()
    assert main(predict_argv(trained, reference, n, *extra)) == 0

    work = tmp_path / "work"
    work.mkdir()
    out = work / "run.xtc"
    partial_csv = work / ".run.csv.partial"
    rc = sigterm_after_rows([sys.executable, "-c", SLOWED_PREDICT,
                             *predict_argv(trained, out, n, *extra)], partial_csv, 4,
                            tmp_path / "stderr.txt")
    assert rc == 143, (tmp_path / "stderr.txt").read_text()[-2000:]
    stopped = json.loads((work / "run.json").read_text())
    assert stopped["interrupted"] is True and 4 <= stopped["frames"] < n
    record = json.loads((work / ".run.chk.json").read_text())
    assert record["frames"] == stopped["frames"]  # a checkpoint with every frame

    assert main(predict_argv(trained, out, n, *extra, "--resume")) == 0
    prov = assert_same_run(out, reference)
    parts = prov["parts"]
    assert [p["stopped_by"] for p in parts] == ["SIGTERM", None]
    assert parts[0]["jumps"] == [0, record["jumps_done"]]
    assert parts[1]["jumps"] == [record["jumps_done"], n]
    assert hidden_files(work) == []  # no checkpoint, no partial file left


def _killed_run(tmp_path, monkeypatch, argv, out, stop_at_jump):
    """What a run killed while writing frame ``stop_at_jump`` leaves, built deterministically:
    a run stopped by an exception inside that jump (``--checkpoint-every 2``: the last
    checkpoint is 1 frame back), its outputs moved back under the hidden names (a kill never
    renames them), no provenance, and torn tails (a half-written frame and state-data line)."""
    jump = SurrogateSimulation._jump
    calls = []

    def stopped(self):
        calls.append(1)
        if len(calls) == stop_at_jump:
            raise KeyboardInterrupt
        jump(self)

    with monkeypatch.context() as m:
        m.setattr(SurrogateSimulation, "_jump", stopped)
        assert main(argv) == 130
    csv, prov = out.with_suffix(".csv"), out.with_suffix(".json")
    record = json.loads((out.parent / f".{out.stem}.chk.json").read_text())
    assert record["frames"] == stop_at_jump - 2  # one frame after the last checkpoint
    traj_partial = out.with_name(f".{out.name}.partial{out.suffix}")
    csv_partial = csv.with_name(f".{csv.name}.partial")
    os.replace(out, traj_partial)
    os.replace(csv, csv_partial)
    prov.unlink()
    with open(traj_partial, "ab") as fh:
        fh.write(traj_partial.read_bytes()[-37:])  # a frame cut short
    with open(csv_partial, "a") as fh:
        fh.write("99,1.98,-2")
    return record


@pytest.mark.parametrize("kind", ["xtc-thermal-egnn", "dcd-history-estag",
                                  "xtc-hybrid-fallbacks"])
def test_killed_run_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys, trained,
                                                     trained_history, kind):
    """SIGKILL's leftovers (hidden ``.partial`` files, a frame after the last checkpoint, torn
    tails): --resume cuts them back to the checkpoint's frame and ends with the uninterrupted
    run's files. XTC with thermal velocity draws (the generator carried over), DCD with a
    history model (ESTAG: its remembered frames carried over), and hybrid cycles whose jumps
    fail the guards and fall back to Langevin MD (the integrator's random state carried over;
    a checkpoint at the end of a fallback cycle used to resume inside its MD segment and take
    one jump too many)."""
    if kind == "xtc-thermal-egnn":
        ck, suffix = trained, ".xtc"
        extra = ["--end-velocities", "thermal", "--seed", "5"]
    elif kind == "dcd-history-estag":
        ck, suffix, extra = trained_history, ".dcd", ["--seed", "5"]
    else:
        ck = make_checkpoint(cached_md(), tmp_path / "linear.pt", selection="heavy")
        suffix, extra = ".xtc", ["--md-steps", 10, "--guard", "fallback", "--minimize"]
    n = 11
    reference = tmp_path / "ref" / f"run{suffix}"
    reference.parent.mkdir()
    assert main(predict_argv(ck, reference, n, *extra)) == 0
    work = tmp_path / "work"
    work.mkdir()
    out = work / f"run{suffix}"
    argv = predict_argv(ck, out, n, *extra, "--checkpoint-every", 2)
    record = _killed_run(tmp_path, monkeypatch, argv, out, stop_at_jump=6)
    assert not out.exists()
    # the same command without --resume does not throw the killed run's frames away
    left = _snapshot(work)
    capsys.readouterr()
    assert main(argv) == 1
    assert "an unfinished run (killed) left its frames" in capsys.readouterr().err
    assert _snapshot(work) == left
    assert main([*argv, "--resume"]) == 0
    prov = assert_same_run(out, reference)
    if kind == "xtc-hybrid-fallbacks":
        assert prov["fallbacks"] >= 5 and prov["md_steps"] == 10
    assert [p["stopped_by"] for p in prov["parts"]] == ["killed", None]
    assert prov["parts"][1]["jumps"] == [record["jumps_done"], n]
    assert hidden_files(work) == []


def test_killed_after_its_last_frame_resumes_to_the_renames(tmp_path, monkeypatch, trained):
    """Killed after the last frame and its checkpoint but before the outputs were renamed:
    --resume has no jump left to take and finishes the files."""
    from integrations.guards import Guards

    extra = ["--end-velocities", "thermal"]
    reference = tmp_path / "ref" / "run.xtc"
    reference.parent.mkdir()
    assert main(predict_argv(trained, reference, 6, *extra)) == 0
    out = tmp_path / "work" / "run.xtc"
    out.parent.mkdir()

    def killed(self):
        raise SystemExit("killed")  # nothing below the jumps runs, as after a SIGKILL

    with monkeypatch.context() as m:
        m.setattr(Guards, "log_summary", killed)
        with pytest.raises(SystemExit):
            main(predict_argv(trained, out, 6, *extra))
    assert not out.exists() and json.loads(
        (out.parent / ".run.chk.json").read_text())["frames"] == 6
    assert main(predict_argv(trained, out, 6, *extra, "--resume")) == 0
    prov = assert_same_run(out, reference)
    assert [p["jumps"] for p in prov["parts"]] == [[0, 6], [6, 6]]
    assert hidden_files(out.parent) == []


# -- 3. what --resume refuses ----------------------------------------------------------------------
def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_resume_refuses_another_command_and_says_what_differs(tmp_path, monkeypatch, capsys):
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    other = make_checkpoint(cached_md(), tmp_path / "l.pt", selection="heavy")
    out = tmp_path / "run" / "cut.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 12)
    jump, calls = SurrogateSimulation._jump, []

    def stopped(self):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        jump(self)

    with monkeypatch.context() as m:
        m.setattr(SurrogateSimulation, "_jump", stopped)
        assert main(argv) == 130
    before = _snapshot(out.parent)
    assert ".cut.chk.json" in before
    capsys.readouterr()
    cases = {
        "another model": ([str(other), *argv[1:], "--resume"], "the surrogate checkpoint"),
        "another interval": ([*argv, "--report-interval", "2", "--resume"],
                             "--report-interval was 1, now 2"),
        "another -n": ([*predict_argv(ck, out, 13), "--resume"], "-n/--jumps was 12, now 13"),
    }
    for case, (bad, why) in cases.items():
        assert main(bad) == 1, case
        err = capsys.readouterr().err
        assert f"error: {out}: the interrupted run was made by another command" in err, case
        assert why in err and "--overwrite" in err and "Traceback" not in err, case
        assert _snapshot(out.parent) == before, case
    # another OpenMM platform cannot load the checkpoint: said before anything is touched
    assert main([*argv[:-4], "--guard", "warn", "--platform", "CPU", "--resume"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"\.cut\.[01]\.chk: written on the OpenMM platform Reference", err)
    assert "resume with --platform Reference" in err
    assert _snapshot(out.parent) == before
    # --resume and --overwrite contradict each other
    assert main([*argv, "--resume", "--overwrite"]) == 1
    assert "pass one of them" in capsys.readouterr().err
    # the right command goes on
    assert main([*argv, "--resume"]) == 0
    assert len(frames(out)[0]) == 12


def test_resume_with_nothing_to_resume_or_a_finished_run(tmp_path, capsys, caplog):
    ck = make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")
    out = tmp_path / "run" / "done.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 4)
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"error: {out}: nothing to resume: no checkpoint .done.chk.json beside it" in err
    assert "without --resume" in err
    assert list(out.parent.iterdir()) == []
    assert main(argv) == 0
    assert hidden_files(out.parent) == []  # the checkpoints went with the finished run
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.parent.iterdir()}
    with caplog.at_level(logging.INFO, logger="integrations.run_control"):
        assert main([*argv, "--resume"]) == 0
    assert "the run is complete (4 jumps); nothing to do" in caplog.text
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in out.parent.iterdir()} == before
    # a finished run of another command is not this one's to call done
    assert main([*predict_argv(ck, out, 5), "--resume"]) == 1
    assert "the finished run was made by another command" in capsys.readouterr().err


# -- 4. one run at a time, failures and signals that keep what can be resumed ----------------------
def _constant(tmp_path):
    return make_checkpoint(cached_md(), tmp_path / "c.pt", selection="heavy", model="constant")


def _reference(ck, tmp_path, n, *extra):
    reference = tmp_path / "ref" / "run.xtc"
    reference.parent.mkdir()
    assert main(predict_argv(ck, reference, n, *extra)) == 0
    return reference


def test_a_second_run_on_the_same_output_is_refused_while_one_writes_it(tmp_path, capsys):
    """A run holding ``.run.lock`` (as a concurrent predict does for its whole run) makes a
    second run on the same OUT, fresh or --resume, refuse before touching anything (before:
    both wrote the files, giving duplicated frames marked complete); a lock file a killed run
    left, held by nobody, is taken over and removed."""
    import fcntl

    ck = _constant(tmp_path)
    out = tmp_path / "w" / "run.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 4)
    lock = out.parent / ".run.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ([], ["--resume"], ["--overwrite"]):
            capsys.readouterr()
            assert main([*argv, *extra]) == 1, extra
            err = capsys.readouterr().err
            assert f"error: {out}: another predict run is writing it" in err, extra
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1
            assert sorted(p.name for p in out.parent.iterdir()) == [".run.lock"]
    finally:
        os.close(fd)
    assert main(argv) == 0  # the stale lock file is taken over
    assert hidden_files(out.parent) == []


def _failing_write(monkeypatch, at):
    """The trajectory reporter's ``at``-th frame fails as on a full disk."""
    import errno

    report, calls = app.XTCReporter.report, []

    def full(self, simulation, state):
        calls.append(1)
        if len(calls) == at:
            raise OSError(errno.ENOSPC, "No space left on device", self._fileName)
        return report(self, simulation, state)

    monkeypatch.setattr(app.XTCReporter, "report", full)


def test_a_full_disk_keeps_a_resumable_run_and_says_so(tmp_path, monkeypatch, capsys):
    """An OSError (disk full) at frame 5 of a run checkpointed every 2 frames: one ``error:``
    line telling to free space and rerun with --resume, the frames and checkpoint kept, and
    --resume gives the uninterrupted run (before: a traceback, and every frame and the
    checkpoint deleted). Before the first checkpoint nothing is resumable and nothing is
    left."""
    ck = _constant(tmp_path)
    n = 10
    reference = _reference(ck, tmp_path, n)
    out = tmp_path / "w" / "run.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, n, "--checkpoint-every", 2)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _failing_write(m, at=5)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert "No space left on device" in err
    assert "free space and rerun the command with --resume" in err
    assert {".run.chk.json", ".run.xtc.partial.xtc", ".run.csv.partial"} <= set(
        hidden_files(out.parent))
    assert main([*argv, "--resume"]) == 0
    assert_same_run(out, reference)
    assert hidden_files(out.parent) == []
    parts = json.loads(out.with_suffix(".json").read_text())["parts"]
    # the full disk is what stopped the first part (it read "killed")
    assert [p["stopped_by"] for p in parts] == ["error: No space left on device", None]
    assert parts[0]["jumps"] == [0, 4] and parts[1]["jumps"] == [4, n]

    fresh = tmp_path / "w2" / "run.xtc"
    fresh.parent.mkdir()
    with monkeypatch.context() as m:
        _failing_write(m, at=1)
        assert main(predict_argv(ck, fresh, n, "--checkpoint-every", 2)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "free space and rerun the command" in err
    assert "--resume" not in err.splitlines()[-1]
    assert list(fresh.parent.iterdir()) == []


def test_a_signal_just_after_the_last_jump_keeps_the_finished_run(tmp_path, monkeypatch):
    """SIGTERM handled at the entry of ``StopSignals.hold()``, after ``sim.step()`` returned
    (before: the run went the failure path and deleted every frame of the finished run): the
    run is finished and written whole."""
    from integrations.run_control import StopSignals

    hold, sent = StopSignals.hold, []

    def signalled_hold(self):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        hold(self)

    monkeypatch.setattr(StopSignals, "hold", signalled_hold)
    ck = _constant(tmp_path)
    out = tmp_path / "run.xtc"
    assert main(predict_argv(ck, out, 6)) == 0
    assert sent == [1]
    prov = json.loads(out.with_suffix(".json").read_text())
    assert prov["interrupted"] is False and prov["frames"] == 6
    assert len(frames(out)[0]) == 6
    assert hidden_files(tmp_path) == []


def _sigterm_at_jump(monkeypatch, k):
    jump, calls = SurrogateSimulation._jump, []

    def signalled(self):
        calls.append(1)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGTERM)
        jump(self)

    monkeypatch.setattr(SurrogateSimulation, "_jump", signalled)


def test_sigterm_before_the_first_frame_or_checkpoint_says_what_works(tmp_path, monkeypatch,
                                                                       capsys, caplog):
    """Stopped in the first jump: no file is left (before: a 0-byte trajectory and provenance
    that made the rerun refuse), so the command runs again as it is. Stopped after 3 frames
    with --checkpoint-every 6 (no checkpoint yet): the log and --resume both say to rerun with
    --overwrite (before: the log said --resume continues it, and --resume refused)."""
    ck = _constant(tmp_path)
    for suffix in (".xtc", ".dcd"):
        out = tmp_path / suffix[1:] / f"run{suffix}"
        out.parent.mkdir()
        argv = predict_argv(ck, out, 4)
        with monkeypatch.context() as m:
            _sigterm_at_jump(m, 1)
            assert main(argv) == 143
        assert list(out.parent.iterdir()) == [], suffix
        assert main(argv) == 0, suffix

    out = tmp_path / "chain" / "run.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 12, "--checkpoint-every", 6)
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        _sigterm_at_jump(m, 4)
        assert main(argv) == 143
    assert "rerun the command with --overwrite" in caplog.text
    assert "--resume continues it" not in caplog.text
    assert json.loads(out.with_suffix(".json").read_text())["frames"] == 3
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint" in err and "with --overwrite" in err
    assert main([*argv, "--overwrite"]) == 0


def test_a_signal_python_swallowed_still_stops_the_run_at_the_next_frame(tmp_path,
                                                                         monkeypatch):
    """A SIGTERM handled while Python runs a finaliser raises there, and Python prints
    "Exception ignored" and goes on (a datagen Ctrl-C was lost that way once). Emulated: the
    signal arrives inside a block that swallows the exception. The run stops at its next frame
    (before: it ran to the end, every later signal only logged), as a stopped run does."""
    jump, calls = SurrogateSimulation._jump, []

    def swallowed(self):
        calls.append(1)
        if len(calls) == 3:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here and raises into this block
            except KeyboardInterrupt:
                pass
        jump(self)

    monkeypatch.setattr(SurrogateSimulation, "_jump", swallowed)
    ck = _constant(tmp_path)
    out = tmp_path / "run.xtc"
    assert main(predict_argv(ck, out, 8)) == 143
    prov = json.loads(out.with_suffix(".json").read_text())
    assert prov["interrupted"] is True and prov["signal"] == "SIGTERM"
    assert prov["frames"] == len(frames(out)[0]) < 8


def test_a_swallowed_stop_signal_prints_no_traceback(monkeypatch):
    """The KeyboardInterrupt of a stop signal raised in a finaliser would make Python print
    "Exception ignored ... Traceback"; inside StopSignals it is raised again at the next frame
    instead, so it is not printed; other unraisable errors, and one before any signal, still
    reach the previous hook (here a recorder), which comes back at the end."""
    import gc

    from integrations.run_control import StopSignals

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))
    hook = sys.unraisablehook
    with StopSignals() as signals:
        Raises(KeyboardInterrupt())  # no signal arrived: not ours, printed as before
        gc.collect()
        signals._fired = signal.SIGINT  # as the handler records a raise
        Raises(KeyboardInterrupt())
        Raises(ValueError("kept"))
        gc.collect()
    assert seen == [KeyboardInterrupt, ValueError]
    assert sys.unraisablehook is hook


def test_temporary_files_of_killed_writes_are_removed(tmp_path, monkeypatch):
    """Temporary files of a trajectory rewrite and of a provenance write that a kill left
    (``..run.xtc.partial.xtc.*.tmp``, ``.run.json.*.tmp``) go with the next resume, and with
    a fresh run (before: they stayed forever)."""
    ck = _constant(tmp_path)
    out = tmp_path / "w" / "run.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 8, "--checkpoint-every", 2)
    _killed_run(tmp_path, monkeypatch, argv, out, stop_at_jump=6)
    junk = [out.parent / "..run.xtc.partial.xtc.k1ll3d.tmp", out.parent / ".run.json.k1ll3d.tmp"]
    for path in junk:
        path.write_bytes(b"half")
    assert main([*argv, "--resume"]) == 0
    assert hidden_files(out.parent) == []

    fresh = tmp_path / "fresh" / "run.xtc"
    fresh.parent.mkdir()
    for path in junk:
        (fresh.parent / path.name).write_bytes(b"half")
    assert main(predict_argv(ck, fresh, 4)) == 0
    assert hidden_files(fresh.parent) == []


def _dcd_header_frames(path):
    """The frame count of a DCD header, as OpenMM's DCDFile reads it to append."""
    with open(path, "rb") as fh:
        return app.DCDFile(fh, app.PDBFile(str(PDB)).topology, 0.001, append=True)._modelCount


def test_a_dcd_header_counting_a_frame_never_written_is_rewritten(tmp_path, monkeypatch):
    """Killed inside a frame's write after OpenMM counted it in the header: the file has the
    checkpoint's size but its header one frame more. The resume rewrites it and ends with the
    uninterrupted run's header count (before: one too many, as the appended frames were
    counted from it)."""
    ck = _constant(tmp_path)
    n = 8
    reference = tmp_path / "ref" / "run.dcd"
    reference.parent.mkdir()
    assert main(predict_argv(ck, reference, n)) == 0
    out = tmp_path / "w" / "run.dcd"
    out.parent.mkdir()
    argv = predict_argv(ck, out, n, "--checkpoint-every", 2)
    record = _killed_run(tmp_path, monkeypatch, argv, out, stop_at_jump=6)
    partial = out.parent / ".run.dcd.partial.dcd"
    os.truncate(partial, record["trajectory_bytes"])  # the 5th frame's data never written
    assert _dcd_header_frames(partial) == record["frames"] + 1
    assert main([*argv, "--resume"]) == 0
    assert_same_run(out, reference)
    assert _dcd_header_frames(out) == _dcd_header_frames(reference) == n


def test_a_rewrite_that_changes_the_frames_is_refused(tmp_path, monkeypatch, capsys):
    """The cut-back rewrite is checked frame by frame against the file, not only by size: a
    writer that moves the atoms by 0.1 % (same size) is refused with the file named and the
    killed run's files left as they were (before: accepted, as the sizes agreed)."""
    import integrations.run_control as run_control

    ck = _constant(tmp_path)
    out = tmp_path / "w" / "run.dcd"
    out.parent.mkdir()
    argv = predict_argv(ck, out, 8, "--checkpoint-every", 2)
    _killed_run(tmp_path, monkeypatch, argv, out, stop_at_jump=6)
    copy = run_control._copy_frames

    class Moved:
        def __init__(self, writer):
            self.writer = writer

        def writeModel(self, positions, periodicBoxVectors=None):
            self.writer.writeModel(positions * 1.001, periodicBoxVectors=periodicBoxVectors)

    monkeypatch.setattr(run_control, "_copy_frames",
                        lambda path, frames, writer: copy(path, frames, Moved(writer)))
    left = _snapshot(out.parent)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and ".run.dcd.partial.dcd: frame 1, written again" in err
    assert "Traceback" not in err
    assert {k: v for k, v in _snapshot(out.parent).items() if k != ".run.chk.json"} == {
        k: v for k, v in left.items() if k != ".run.chk.json"}


def test_a_signal_while_a_frame_is_written_counts_that_jump(tmp_path, monkeypatch):
    """SIGTERM arriving inside the 4th frame's writing is raised when the frame is whole, which
    is before the simulation counts its jump: the provenance said 3 jumps for 4 frames. It
    counts the jumps the files hold; the resume continues from that frame to the uninterrupted
    run."""
    report, calls = app.XTCReporter.report, []

    def signalled(self, simulation, state):
        calls.append(1)
        if len(calls) == 4:  # inside the frame's deferred section: raised once it is whole
            os.kill(os.getpid(), signal.SIGTERM)
        report(self, simulation, state)

    ck = _constant(tmp_path)
    n = 8
    reference = _reference(ck, tmp_path, n)
    out = tmp_path / "w" / "run.xtc"
    out.parent.mkdir()
    argv = predict_argv(ck, out, n, "--checkpoint-every", 3)
    with monkeypatch.context() as m:
        m.setattr(app.XTCReporter, "report", signalled)
        assert main(argv) == 143
    prov = json.loads(out.with_suffix(".json").read_text())
    assert prov["interrupted"] is True and prov["frames"] == 4
    assert prov["jumps"] + prov["fallbacks"] == 4
    assert prov["parts"][0]["jumps"] == [0, 4]
    assert main([*argv, "--resume"]) == 0
    assert_same_run(out, reference)
