"""Property-based tests (hypothesis) of the data layer, the unit boundaries and the graphs.

- dataset files: whatever shapes, optional fields, chunk sizes and append blocks, what is read
  back is what was written;
- windows: splits never share a frame, counts are as asked, every item holds exactly the frames
  its protocol names (checked on a trajectory whose coordinates encode the frame number);
- units: OpenMM nm <-> Å and nm/ps <-> Å/ps as the integrations convert them, ASE velocities
  <-> Å/ps as datagen and the integrations convert them, against MDAnalysis' unit table and the
  kinetic energy ASE itself computes;
- graphs: radius graphs of several systems in a batch equal brute force, are symmetric and have no
  self loops; bond + two-hop graphs equal a brute-force adjacency walk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surrogate_md.data import Topology, open_trajectory
from surrogate_md.data.graphs import BOND, TWO_HOP, bond_edges, radius_edges
from surrogate_md.data.h5md import TrajectoryWriter
from surrogate_md.data.selection import select_nodes
from surrogate_md.data.windows import (
    SPLIT_NAMES,
    GraphBuilder,
    GraphSpec,
    Protocol,
    WindowDataset,
    split_starts,
)

FAST = settings(deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _topology(n_atoms: int) -> Topology:
    z = np.resize([6, 1, 8, 7], n_atoms)
    return Topology.from_elements(z, np.resize([12.011, 1.008, 15.999, 14.007], n_atoms))


# -- dataset files -----------------------------------------------------------------------------
@FAST
@given(data=st.data(), n_atoms=st.integers(1, 6), n_frames=st.integers(1, 40),
       chunk=st.integers(1, 16), velocities=st.booleans(), forces=st.booleans(),
       box=st.booleans(), energies=st.booleans(), seed=st.integers(0, 2**16))
def test_dataset_round_trip(data, n_atoms, n_frames, chunk, velocities, forces, box, energies,
                            seed):
    rng = np.random.default_rng(seed)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(n_frames - 1, 1)), max_size=4,
                                     unique=True)))
    cuts = [c for c in cuts if c < n_frames]
    bounds = [0, *cuts, n_frames]
    x = rng.normal(scale=10.0, size=(n_frames, n_atoms, 3))
    v = rng.normal(size=x.shape) if velocities else None
    f = rng.normal(scale=100.0, size=x.shape) if forces else None
    e = rng.normal(scale=1e4, size=n_frames) if energies else None
    b = (np.eye(3) * rng.uniform(20, 40, size=(n_frames, 1, 1))) if box else None
    t = rng.uniform(0.0, 100.0) + 0.5 * np.arange(n_frames)  # even, at the interval_ps below
    steps = np.cumsum(rng.integers(1, 100, n_frames))
    topo = _topology(n_atoms)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.h5"
        with TrajectoryWriter(path, topo, {"interval_ps": 0.5, "seed": seed},
                              velocities=velocities, forces=forces, energies=energies, box=box,
                              chunk_frames=chunk) as w:
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                sl = slice(lo, hi)
                w.append(x[sl], t[sl], step=steps[sl],
                         velocities=None if v is None else v[sl],
                         forces=None if f is None else f[sl],
                         potential_energy=None if e is None else e[sl],
                         box=None if b is None else b[sl])
            assert not path.exists()  # only the .partial exists while writing
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["d.h5"]
        with open_trajectory(path) as r:
            assert (r.n_frames, r.n_atoms) == (n_frames, n_atoms)
            np.testing.assert_array_equal(r.read(slice(None)), x.astype(np.float32))
            np.testing.assert_array_equal(r.time_ps, t)
            assert r.metadata["seed"] == seed and r.interval_ps == 0.5
            assert r.topology.atom_names.tolist() == topo.atom_names.tolist()
            np.testing.assert_array_equal(r.topology.masses, topo.masses)
            for name, want in (("velocities", v), ("forces", f)):
                if want is None:
                    assert getattr(r, name) is None
                else:
                    np.testing.assert_array_equal(r.read(slice(None), name),
                                                  want.astype(np.float32))
            if e is None:
                assert r.potential_energy is None
            else:
                np.testing.assert_array_equal(r.potential_energy[()], e)
            if b is None:
                assert r.box is None
            else:
                np.testing.assert_array_equal(r.box[()], b.astype(np.float32))
            # unsorted, repeated frame indices read what a plain index would
            idx = rng.integers(0, n_frames, size=7)
            np.testing.assert_array_equal(r.read(idx), x.astype(np.float32)[idx])


# -- windows -----------------------------------------------------------------------------------
@st.composite
def protocols(draw):
    n_out = draw(st.integers(1, 4))
    jump = n_out * draw(st.integers(1, 4))
    if draw(st.booleans()):
        return Protocol("history", jump, n_out, draw(st.integers(2, 4)), draw(st.integers(1, 3)))
    return Protocol("s2t", jump, n_out)


def _touched(starts: np.ndarray, protocol: Protocol, fd: bool) -> set[int]:
    lo, hi = protocol.before(fd), protocol.after
    return {int(t) + k for t in starts for k in range(-lo, hi + 1)}


@FAST
@given(protocol=protocols(), n_frames=st.integers(30, 300), fd=st.booleans(),
       stride=st.integers(1, 3), seed=st.integers(0, 1000),
       fractions=st.tuples(*[st.floats(0.05, 1.0)] * 3),
       cap=st.one_of(st.none(), st.tuples(*[st.integers(0, 30)] * 3)))
def test_blocked_split_never_leaks_and_counts(protocol, n_frames, fd, stride, seed, fractions,
                                              cap):
    total = sum(fractions)
    fractions = tuple(f / total for f in fractions)
    try:
        out = split_starts(n_frames, protocol, fractions=fractions, counts=cap, stride=stride,
                           finite_difference=fd, seed=seed)
    except Exception as exc:  # too short for this protocol: a DataError, nothing else
        from surrogate_md.errors import DataError

        assert isinstance(exc, DataError)
        assert n_frames - protocol.window_length(fd) * 3 < 3
        return
    frames = {name: _touched(out[name], protocol, fd) for name in SPLIT_NAMES}
    for a in range(3):
        for b in range(a + 1, 3):
            assert not frames[SPLIT_NAMES[a]] & frames[SPLIT_NAMES[b]]
    lo, hi = protocol.before(fd), n_frames - 1 - protocol.after
    uncapped = split_starts(n_frames, protocol, fractions=fractions, stride=stride,
                            finite_difference=fd, seed=seed)
    for k, name in enumerate(SPLIT_NAMES):
        s = out[name]
        assert np.all((s >= lo) & (s <= hi)) and np.all(np.diff(s) > 0)
        assert set(s.tolist()) <= set(uncapped[name].tolist())
        want = len(uncapped[name]) if cap is None else min(cap[k], len(uncapped[name]))
        assert len(s) == want
    # the same seed cuts the same windows
    again = split_starts(n_frames, protocol, fractions=fractions, counts=cap, stride=stride,
                         finite_difference=fd, seed=seed)
    assert all(np.array_equal(again[n], out[n]) for n in SPLIT_NAMES)


@FAST
@given(protocol=protocols(), seed=st.integers(0, 1000), counts=st.tuples(
    st.integers(0, 20), st.integers(0, 20), st.integers(0, 20)))
def test_paper_split_counts_and_distinct_starts(protocol, seed, counts):
    out = split_starts(200, protocol, split="paper", counts=counts, margin_frames=5, seed=seed)
    starts = np.concatenate([out[n] for n in SPLIT_NAMES])
    assert [len(out[n]) for n in SPLIT_NAMES] == list(counts)
    assert len(np.unique(starts)) == len(starts)
    assert starts.min(initial=10**9) >= max(5, protocol.before(False))
    assert starts.max(initial=-1) <= 200 - 1 - max(5, protocol.after)


@FAST
@given(protocol=protocols(), velocities=st.booleans(), seed=st.integers(0, 1000))
def test_window_items_hold_exactly_the_protocol_frames(protocol, velocities, seed):
    """Coordinates encode the frame number (x = f, y = -f, z = atom), so every frame of an item
    tells where it came from."""
    # long enough for a blocked split of any generated protocol (three blocks and two gaps)
    n_frames, n_atoms, interval = 3 * protocol.window_length(True) + 20, 3, 0.25
    f = np.arange(n_frames, dtype=np.float64)[:, None]
    x = np.stack([np.repeat(f, n_atoms, 1), -np.repeat(f, n_atoms, 1),
                  np.broadcast_to(np.arange(n_atoms), (n_frames, n_atoms))], axis=-1)
    v = x * 0.5 if velocities else None
    topo = _topology(n_atoms)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.h5"
        from surrogate_md.data import write_trajectory

        write_trajectory(path, topo, x, np.arange(n_frames) * interval,
                         {"interval_ps": interval}, velocities=v)
        with open_trajectory(path) as file:
            sel = select_nodes(topo, "all")
            graph = GraphBuilder(GraphSpec(kind="full"), n_nodes=n_atoms)
            starts = split_starts(n_frames, protocol, finite_difference=v is None, seed=seed)
            windows = np.concatenate([np.stack([np.zeros_like(s), s], 1)
                                      for s in starts.values()])
            ds = WindowDataset([file], windows, protocol, sel, graph, in_memory=False)
            np.testing.assert_allclose(ds.times_ps, protocol.out_frames * interval)
            for i in range(len(ds)):
                t0 = int(windows[i, 1])
                item = ds[i]
                frame_of = lambda a: a[..., 0, 0, 0]  # noqa: E731
                assert frame_of(item["pos"]) == t0
                np.testing.assert_array_equal(frame_of(item["target"]),
                                              t0 + protocol.out_frames)
                if protocol.kind == "history":
                    want = t0 - np.arange(protocol.history - 1, -1, -1) * protocol.history_stride
                    np.testing.assert_array_equal(frame_of(item["hist"]), want)
                # velocities: the file's at t0, else the backward difference x[t0] - x[t0-1]
                want_v = 0.5 * t0 if velocities else 1.0 / interval
                np.testing.assert_allclose(item["vel"][:, 0, 0], want_v)


# -- units at the boundaries -------------------------------------------------------------------
finite = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False)


def _arrays(n):
    return st.lists(st.tuples(finite, finite, finite), min_size=n, max_size=n).map(
        lambda rows: np.asarray(rows, dtype=np.float64))


@settings(deadline=None, max_examples=20)
@given(data=st.data(), n=st.integers(1, 5))
def test_openmm_boundary_nm_and_nm_per_ps(data, n):
    import openmm
    from MDAnalysis.units import convert
    from openmm import unit

    from integrations.openmm_simulation import read_state, write_state

    x, v = data.draw(_arrays(n)), data.draw(_arrays(n))
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    write_state(ctx, x, v, constrained=False)
    state = ctx.getState(getPositions=True, getVelocities=True)
    # what OpenMM holds in its own units (nm, nm/ps), against MDAnalysis' unit table
    raw_x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    raw_v = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    np.testing.assert_allclose(raw_x, convert(x, "A", "nm"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(raw_v, convert(v, "A/ps", "nm/ps"), rtol=1e-12, atol=1e-12)
    back_x, back_v, _, _ = read_state(ctx)
    np.testing.assert_allclose(back_x, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(back_v, v, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(data=st.data(), n=st.integers(1, 5))
def test_ase_velocity_boundary(data, n):
    from ase import Atoms
    from openmm import unit

    from datagen.ingest import ase_velocity_to_A_per_ps, ev_to_kj_per_mol
    from integrations.writers import PS_IN_ASE_TIME

    v = data.draw(_arrays(n))  # Å/ps
    masses = data.draw(st.lists(st.floats(1.0, 200.0), min_size=n, max_size=n))
    atoms = Atoms("C" * n, positions=np.zeros((n, 3)), masses=masses)
    # the integrations set ASE velocities from Å/ps; datagen reads them back to Å/ps
    atoms.set_velocities(v / PS_IN_ASE_TIME)
    np.testing.assert_allclose(atoms.get_velocities() * ase_velocity_to_A_per_ps(), v,
                               rtol=1e-12, atol=1e-12)
    assert PS_IN_ASE_TIME == ase_velocity_to_A_per_ps()
    # and ASE's own kinetic energy (eV) is 1/2 m v^2 of the Å/ps velocities
    ke_amu = 0.5 * float((np.asarray(masses)[:, None] * v**2).sum())  # amu Å² / ps²
    to_kj = (1.0 * unit.amu * unit.angstrom**2 / unit.picosecond**2).value_in_unit(
        unit.kilojoule_per_mole)
    np.testing.assert_allclose(atoms.get_kinetic_energy() * ev_to_kj_per_mol(), ke_amu * to_kj,
                               rtol=1e-9, atol=1e-9)


# -- graphs ------------------------------------------------------------------------------------
@FAST
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4),
       cutoff=st.floats(0.5, 6.0), scale=st.floats(1.0, 12.0), seed=st.integers(0, 10**6))
def test_radius_graph_of_a_batch_equals_brute_force(sizes, cutoff, scale, seed):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-scale, scale, size=(sum(sizes), 3))
    # systems overlap in space on purpose: edges must still never cross systems
    graph = np.repeat(np.arange(len(sizes)), sizes)
    edges = radius_edges(torch.as_tensor(pos), cutoff, torch.as_tensor(graph)).numpy()
    got = set(map(tuple, edges.T.tolist()))
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    same = graph[:, None] == graph[None]
    want = {(int(j), int(i)) for i, j in zip(*np.nonzero((d < cutoff) & same))
            if i != j}
    assert got == want
    assert len(got) == edges.shape[1]  # no duplicates
    assert all((b, a) in got for a, b in got)
    assert all(a != b for a, b in got)


@FAST
@given(n=st.integers(2, 14), data=st.data(), two_hop=st.booleans())
def test_bond_graph_equals_brute_force(n, data, two_hop):
    pairs = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                               max_size=2 * n))
    bonds = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    adj = np.zeros((n, n), dtype=bool)
    for a, b in bonds:
        if a != b:
            adj[a, b] = adj[b, a] = True
    want = {(int(a), int(b)): BOND for a, b in zip(*np.nonzero(adj))}
    if two_hop:
        walk = (adj.astype(int) @ adj.astype(int)) > 0
        for a, c in zip(*np.nonzero(walk)):
            if a != c and not adj[a, c]:
                want[(int(a), int(c))] = TWO_HOP
    edges, types = bond_edges(bonds, n, two_hop=two_hop)
    got = {(int(a), int(b)): int(t) for (a, b), t in zip(edges.T.tolist(), types.tolist())}
    assert got == want
    assert edges.shape[1] == len(got)  # no duplicates
