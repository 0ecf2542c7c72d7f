"""Ingest: the time axis comes from the files (or --dt-ps), never a made-up uniform series."""

from __future__ import annotations

import numpy as np
import pytest

from datagen.ingest import ingest
from surrogate_md.data.h5md import open_trajectory
from surrogate_md.errors import DataError

mda = pytest.importorskip("MDAnalysis")
datafiles = pytest.importorskip("MDAnalysisTests.datafiles")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore:Reader has no dt information:UserWarning")

TOP = datafiles.PDB_multiframe  # 392 atoms, 24 models, no time stamps


def _frames(indices) -> np.ndarray:
    u = mda.Universe(TOP)
    return np.stack([u.trajectory[i].positions.copy() for i in indices]).astype(np.float64)


def _write(path, indices, times=None):
    """Frames ``indices`` of the multi-model PDB to ``path``, stamped with ``times`` (ps)."""
    u = mda.Universe(TOP)
    with mda.Writer(str(path), n_atoms=u.atoms.n_atoms) as w:
        for k, i in enumerate(indices):
            u.trajectory[i]
            if times is not None:
                u.trajectory.ts.time = times[k]
            w.write(u.atoms)
    return path


def test_formats_without_times_need_dt_ps(tmp_path):
    out = tmp_path / "o.h5"
    with pytest.raises(DataError, match=r"nmr_neopetrosiamide.pdb: this file stores no frame "
                                        r"times.*--dt-ps"):
        ingest(TOP, out)
    with pytest.raises(DataError, match=r"2r9r-1b.xyz: this file stores no frame times"):
        ingest([datafiles.XYZ_psf, datafiles.XYZ], out)
    assert list(tmp_path.iterdir()) == []
    ingest(TOP, out, dt_ps=0.002)
    with open_trajectory(out) as f:
        assert f.n_frames == 24
        np.testing.assert_allclose(f.time_ps, np.arange(24) * 0.002)
        assert f.metadata["interval_ps"] == 0.002 and f.metadata["interval_source"] == "user"


def test_file_times_are_kept(tmp_path):
    xtc = _write(tmp_path / "a.xtc", range(4), [10.0, 10.5, 11.0, 11.5])
    with open_trajectory(ingest([TOP, xtc], tmp_path / "o.h5")) as f:
        np.testing.assert_allclose(f.time_ps, [10.0, 10.5, 11.0, 11.5])
        assert f.metadata["interval_ps"] == pytest.approx(0.5)
        assert f.metadata["interval_source"] == "trajectory"


def test_chained_run_repeating_its_start_frame_is_dropped(tmp_path):
    # a continued run writes its start (the last frame of the run before) again
    a = _write(tmp_path / "a.xtc", range(0, 4), [0.0, 1.0, 2.0, 3.0])
    b = _write(tmp_path / "b.xtc", range(3, 6), [3.0, 4.0, 5.0])
    with open_trajectory(ingest([TOP, a, b], tmp_path / "o.h5")) as f:
        np.testing.assert_allclose(f.time_ps, np.arange(6.0))
        # XTC keeps 0.01 Å
        np.testing.assert_allclose(f.read(slice(None)), _frames(range(6)), atol=6e-3)
        assert f.metadata["dropped_duplicate_frames"] == [4]
    # without time stamps, a boundary frame identical to the previous one is the repeat
    a = _write(tmp_path / "a.xyz", range(0, 3))
    b = _write(tmp_path / "b.xyz", range(2, 5))
    with open_trajectory(ingest([TOP, a, b], tmp_path / "x.h5", dt_ps=0.1)) as f:
        np.testing.assert_allclose(f.time_ps, np.arange(5) * 0.1)
        np.testing.assert_allclose(f.read(slice(None)), _frames(range(5)), atol=1e-3)


def test_uneven_or_backward_times_are_refused(tmp_path):
    out = tmp_path / "o.h5"
    a = _write(tmp_path / "a.xtc", range(0, 4), [0.0, 1.0, 2.0, 3.0])
    b = _write(tmp_path / "b.xtc", range(3, 6), [3.0, 3.5, 4.0])  # another interval
    with pytest.raises(DataError, match=r"b.xtc: frame 1 \(t = 3.5 ps\) is 0.5 ps after .* "
                                        r"not evenly spaced"):
        ingest([TOP, a, b], out)
    c = _write(tmp_path / "c.xtc", range(0, 3), [0.0, 2.0, 1.0])
    with pytest.raises(DataError, match=r"c.xtc: frame 2 is at t = 1 ps, not after .*time order"):
        ingest([TOP, c], out)
    # a file whose clock restarts after the one before it
    with pytest.raises(DataError, match=r"a.xtc: frame 0 is at t = 0 ps"):
        ingest([TOP, a, a], out)
    assert list(tmp_path.glob("o.h5*")) == []


def test_single_precision_intervals_are_read_as_the_decimals_written(tmp_path):
    """DCD and XTC keep times in float32: the AdK DCD reports 0.99999991 ps between frames, an
    XTC written every 0.1 ps 0.1000000015 ps, which made a 4 ps jump 3.9999996 ps (and asking a
    checkpoint for 4 ps a jump beyond its trained one). The interval is the decimal within float32
    precision; the file's own value is kept beside it, and the frames' time stamps as stored."""
    out = tmp_path / "adk.h5"
    ingest([datafiles.PSF, datafiles.DCD], out)
    with open_trajectory(out) as f:
        assert f.metadata["interval_ps"] == 1.0 and f.interval_ps == 1.0
        assert f.metadata["interval_in_file_ps"] == pytest.approx(0.99999991, abs=1e-8)
        assert f.time_ps[1] - f.time_ps[0] == pytest.approx(0.99999991, abs=1e-7)
    times = np.float32(0.1) * np.arange(4, dtype=np.float32)
    xtc = _write(tmp_path / "b.xtc", range(4), [float(t) for t in times])
    with open_trajectory(ingest([TOP, xtc], tmp_path / "b.h5")) as f:
        assert f.metadata["interval_ps"] == 0.1
    # an interval with no short decimal: its shortest one within float32 precision
    third = np.float32(1 / 3) * np.arange(3, dtype=np.float32)
    odd = _write(tmp_path / "c.xtc", range(3), [float(t) for t in third])
    with open_trajectory(ingest([TOP, odd], tmp_path / "c.h5")) as f:
        assert f.metadata["interval_ps"] == pytest.approx(1 / 3, rel=4e-7)
