"""The canonical dataset file, selections, protocols, splits, windows and graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surrogate_md.data import Topology, TrajectoryWriter, open_trajectory, write_trajectory
from surrogate_md.data import keys as K
from surrogate_md.data.graphs import bond_edges, full_edges, infer_bonds, radius_edges
from surrogate_md.data.selection import select_nodes
from surrogate_md.data.windows import (
    GraphBuilder,
    GraphSpec,
    Protocol,
    WindowDataset,
    frames_from_ps,
    make_windows,
    split_starts,
)
from surrogate_md.errors import ConfigError, DataError

WATER_LIKE = dict(atomic_numbers=[8, 1, 1, 6, 1], masses=[16.0, 1.0, 1.0, 12.0, 1.0])


def small_topology() -> Topology:
    return Topology.from_elements(WATER_LIKE["atomic_numbers"], WATER_LIKE["masses"],
                                  bonds=[[0, 1], [0, 2], [0, 3], [3, 4]])


def random_walk(n_frames: int, n_atoms: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start = np.arange(n_atoms * 3, dtype=float).reshape(n_atoms, 3)
    return start + np.cumsum(rng.normal(scale=0.01, size=(n_frames, n_atoms, 3)), axis=0)


@pytest.fixture
def dataset(tmp_path):
    pos = random_walk(400)
    vel = np.gradient(pos, 0.1, axis=0)
    path = write_trajectory(tmp_path / "d.h5", small_topology(), pos, np.arange(400) * 0.1,
                            {"interval_ps": 0.1, "engine": "test"}, velocities=vel)
    return path, pos, vel


def test_roundtrip_and_metadata(dataset):
    path, pos, vel = dataset
    with open_trajectory(path) as f:
        assert (f.n_frames, f.n_atoms) == (400, 5)
        assert f.interval_ps == pytest.approx(0.1)
        assert f.metadata["engine"] == "test" and "package_version" in f.metadata
        np.testing.assert_allclose(f.read(slice(None)), pos, atol=1e-4)
        np.testing.assert_allclose(f.read([7, 3, 3], "velocities"), vel[[7, 3, 3]], rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_allclose(f.time_ps, np.arange(400) * 0.1)
        assert list(f.topology.atom_names) == ["O1", "H2", "H3", "C4", "H5"]
        assert f.topology.bonds.tolist() == [[0, 1], [0, 2], [0, 3], [3, 4]]


def test_file_opens_in_mdanalysis_h5md_reader(dataset, tmp_path):
    mda = pytest.importorskip("MDAnalysis")
    path, pos, vel = dataset
    with open_trajectory(path) as f:
        top = f.topology
    # a topology file for MDAnalysis, written by MDAnalysis itself
    u0 = mda.Universe.empty(top.n_atoms, n_residues=1, atom_resindex=[0] * top.n_atoms,
                            trajectory=True)
    u0.add_TopologyAttr("names", top.atom_names)
    u0.add_TopologyAttr("resnames", ["MOL"])
    u0.add_TopologyAttr("elements", top.elements)
    u0.atoms.positions = pos[0]
    u0.atoms.write(tmp_path / "top.pdb")
    u = mda.Universe(str(tmp_path / "top.pdb"), str(path), format="H5MD")
    assert len(u.trajectory) == 400
    for i in (0, 123, 399):
        ts = u.trajectory[i]
        np.testing.assert_allclose(ts.positions, pos[i], atol=1e-4)
        np.testing.assert_allclose(ts.velocities, vel[i], rtol=1e-5, atol=1e-4)
        assert ts.time == pytest.approx(i * 0.1)


def test_writer_is_atomic_and_resumable(tmp_path):
    top = small_topology()
    out = tmp_path / "r.h5"
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(out, top, {"interval_ps": 0.1}, keep_partial=True) as w:
            w.append(random_walk(10), np.arange(10) * 0.1)
            raise RuntimeError("killed")
    assert not out.exists() and (tmp_path / "r.h5.partial").exists()
    with TrajectoryWriter(out, top, {"interval_ps": 0.1}, resume=True) as w:
        assert w.n_frames == 10
        w.append(random_walk(5), np.arange(10, 15) * 0.1)
    with open_trajectory(out) as f:
        np.testing.assert_allclose(f.time_ps, np.arange(15) * 0.1)
    assert not (tmp_path / "r.h5.partial").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_frames_are_rejected(tmp_path, bad):
    pos = random_walk(5)
    pos[3, 2, 1] = bad
    with pytest.raises(DataError, match="NaN or inf"):
        write_trajectory(tmp_path / "bad.h5", small_topology(), pos, np.arange(5) * 0.1,
                         {"interval_ps": 0.1})
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "bad.h5.partial").exists()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such dataset"):
        open_trajectory(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="junk.h5"):
        open_trajectory(tmp_path / "junk.h5")
    with pytest.raises(DataError, match="does not exist"):
        write_trajectory(tmp_path / "nodir" / "x.h5", small_topology(), random_walk(3),
                         np.arange(3.0), {"interval_ps": 1.0})


def test_time_axis_must_match_the_interval(tmp_path):
    # an uneven axis, or metadata that contradicts it, would put every window's times wrong
    top, pos = small_topology(), random_walk(20)
    uneven = np.concatenate([np.arange(10) * 0.1, 1.9 + np.arange(10) * 0.1])
    for name, times, meta in (("uneven", uneven, {}),
                              ("contradicts", np.arange(20) * 0.2, {"interval_ps": 0.1}),
                              ("backward", np.arange(20)[::-1] * 0.1, {})):
        path = write_trajectory(tmp_path / f"{name}.h5", top, pos, times, meta)
        with pytest.raises(DataError, match=f"{name}.h5: frames are not"):
            open_trajectory(path)
    even = write_trajectory(tmp_path / "even.h5", top, pos, 5.0 + np.arange(20) * 0.2, {})
    with open_trajectory(even) as f:
        assert f.interval_ps == pytest.approx(0.2)


def test_writer_refuses_fields_it_was_not_opened_with(tmp_path):
    top, pos = small_topology(), random_walk(3)
    with pytest.raises(DataError, match="velocities, box given to a writer opened without"):
        with TrajectoryWriter(tmp_path / "w.h5", top, {"interval_ps": 0.1}) as w:
            w.append(pos, np.arange(3) * 0.1, velocities=pos, box=np.tile(np.eye(3), (3, 1, 1)))
    assert not (tmp_path / "w.h5").exists()


def test_windows_load_only_what_they_read(dataset, tmp_path):
    pos = random_walk(50)
    path = write_trajectory(tmp_path / "f.h5", small_topology(), pos, np.arange(50) * 0.1,
                            {"interval_ps": 0.1}, velocities=pos, forces=pos)
    f = open_trajectory(path)
    assert f.nbytes == 2 * pos.size * 4  # positions and velocities, as stored (float32)
    sel = select_nodes(f.topology, "all")
    graph = GraphBuilder.for_selection(GraphSpec(kind="bonds"), sel, f.topology.bonds,
                                       sel.gather(f.read(np.array([0])))[0])
    WindowDataset([f], np.array([[0, 0]]), Protocol("s2t", 4, 2), sel, graph, in_memory=True)
    assert isinstance(f.positions, np.ndarray) and isinstance(f.velocities, np.ndarray)
    assert not isinstance(f.forces, np.ndarray)  # left on disk
    f.close()
    f = open_trajectory(path)  # finite differences read no stored velocities
    WindowDataset([f], np.array([[0, 1]]), Protocol("s2t", 4, 2), sel, graph, in_memory=True,
                  velocities="difference")
    assert isinstance(f.positions, np.ndarray) and not isinstance(f.velocities, np.ndarray)
    f.close()


def test_paper_counts_over_several_files_are_exact(tmp_path):
    files = [open_trajectory(write_trajectory(tmp_path / f"{i}.h5", small_topology(),
                                              random_walk(n), np.arange(n) * 0.1,
                                              {"interval_ps": 0.1}))
             for i, n in enumerate((3000, 3000, 3000))]
    w = make_windows(files, Protocol("s2t", 10, 2), split="paper", counts=(50, 200, 200),
                     margin_frames=0, seed=0)
    assert [len(w[k]) for k in ("train", "val", "test")] == [50, 200, 200]
    for f in files:
        f.close()


def test_selections():
    top = small_topology()
    assert select_nodes(top, "heavy").atom_index.tolist() == [0, 3]
    tip4p = Topology.from_elements([8, 1, 1, 0], [16.0, 1.0, 1.0, 0.0])  # M: a virtual site
    assert select_nodes(tip4p, "heavy").atom_index.tolist() == [0]
    assert select_nodes(top, "all").n_nodes == 5
    with pytest.raises(DataError, match="matches no atoms"):
        select_nodes(top, "backbone")
    with pytest.raises(DataError, match="unknown atom selection"):
        select_nodes(top, "sidechains")


def test_residue_nodes():
    names = ["N", "CA", "C", "O", "CB", "N", "CA", "C", "O", "N", "CA"]
    resid = [1] * 5 + [2] * 4 + [3] * 2
    top = Topology([7, 6, 6, 8, 6, 7, 6, 6, 8, 7, 6], [14.0, 12, 12, 16, 12, 14, 12, 12, 16, 14, 12],
                   names, resid, ["ALA"] * 5 + ["GLY"] * 4 + ["HIE"] * 2)
    sel = select_nodes(top, "residues")
    assert sel.index.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]  # residue 3 lacks C and O
    assert sel.node_type.tolist() == [101, 108]
    assert sel.n_channels == 4
    assert select_nodes(top, "ca").atom_index.tolist() == [1, 6, 10]


def test_force_field_residue_names_are_protein():
    # GROMACS (HISE, CYS2, LYSH) and Amber terminal (NMET, CLYS) names are amino acids: their
    # backbone is selected and their residue nodes typed; the caps ACE/NME are not residues
    res = ["ACE", "NMET", "HISE", "CYS2", "LYSH", "CLYS", "NME"]
    names, resid, resn, z = [], [], [], []
    for i, r in enumerate(res):
        atoms = ["C", "O", "CH3"] if r == "ACE" else ["N", "CH3"] if r == "NME" else \
            ["N", "CA", "C", "O"]
        names += atoms
        resid += [i + 1] * len(atoms)
        resn += [r] * len(atoms)
        z += [{"N": 7, "O": 8}.get(a, 6) for a in atoms]
    top = Topology(z, [12.0] * len(z), names, resid, resn)
    assert len(select_nodes(top, "backbone").atom_index) == 20
    assert select_nodes(top, "ca").n_nodes == 5
    codes = [t - 100 for t in select_nodes(top, "residues").node_type]
    from surrogate_md.data.selection import AMINO_ACIDS

    assert [AMINO_ACIDS[c - 1] for c in codes] == ["MET", "HIS", "CYS", "LYS", "LYS"]


def test_residue_node_graphs_place_nodes_at_ca_by_default():
    # (nodes, C=4, 3): N atoms 3 Å apart along x, CA atoms 6 Å apart along y
    n = 5
    nodes = np.zeros((n, 4, 3))
    nodes[:, 0, 0] = 3.0 * np.arange(n)
    nodes[:, 1, 1] = 6.0 * np.arange(n)
    nodes[:, 1, 0] = 1.0
    radius = GraphBuilder(GraphSpec(kind="radius", cutoff_A=4.0))
    assert radius(nodes)[0].shape[1] == 0  # CA: no pair within 4 Å (on N all 8 neighbours)
    assert GraphBuilder(GraphSpec(kind="radius", cutoff_A=4.0, radius_channel=0))(
        nodes)[0].shape[1] == 2 * (n - 1)
    atoms = nodes[:, 1:2]  # one channel: the atom itself
    assert radius(atoms)[0].shape[1] == 0
    # inferred residue bonds (4.2 Å rule) on CA too
    close = nodes.copy()
    close[:, 1, 1] = 3.8 * np.arange(n)
    close[:, 0, 0] = 10.0 * np.arange(n)
    sel = select_nodes(Topology([7, 6, 6, 8] * n, [1.0] * 4 * n, ["N", "CA", "C", "O"] * n,
                                np.repeat(np.arange(n), 4), ["ALA"] * 4 * n), "residues")
    bonds = GraphBuilder.for_selection(GraphSpec(kind="bonds", two_hop=False), sel, [], close)
    assert sorted(map(tuple, bonds.bonds.tolist())) == [(i, i + 1) for i in range(n - 1)]


def test_protocol_conversion_from_ps():
    p = Protocol.from_ps("s2t", 1.5, 8, 0.0005)
    assert p.jump_frames == 3000 and p.out_frames[-1] == 3000 and p.out_frames[0] == 375
    with pytest.raises(ConfigError, match="multiple"):
        frames_from_ps(0.25, 0.1, "jump_ps")
    with pytest.raises(ConfigError, match="divisible"):
        Protocol("s2t", 10, 3)


def test_paper_split_counts_and_margin():
    p = Protocol("s2t", 3000, 8)
    s = split_starts(100_000, p, split="paper", counts=(500, 2000, 2000), margin_frames=10_000,
                     seed=1)
    assert [len(s[k]) for k in ("train", "val", "test")] == [500, 2000, 2000]
    allv = np.concatenate(list(s.values()))
    assert len(np.unique(allv)) == 4500
    assert allv.min() >= 10_000 and allv.max() <= 100_000 - 1 - 10_000
    again = split_starts(100_000, p, split="paper", counts=(500, 2000, 2000), seed=1)
    assert all(np.array_equal(s[k], again[k]) for k in s)


def test_blocked_split_takes_the_fractions_as_given():
    """Shares of the usable frames as written: (0.5, 0.1, 0.1) trains on 5/7 of what
    (0.7, 0.1, 0.2) trains on (not on 0.5 / 0.7 = 71 % of the range) and leaves the end of the
    trajectory unused; its val block is as long as the other's."""
    p = Protocol("s2t", 4, 2)
    part = split_starts(1000, p, fractions=(0.5, 0.1, 0.1))
    whole = split_starts(1000, p, fractions=(0.7, 0.1, 0.2))
    assert len(part["train"]) / len(whole["train"]) == pytest.approx(5 / 7, abs=0.005)
    assert len(part["val"]) == len(whole["val"]) and len(part["test"]) == len(part["val"])
    assert whole["test"].max() - part["test"].max() > 0.25 * 1000


@settings(max_examples=40, deadline=None)
@given(n_frames=st.integers(60, 3000), jump=st.integers(1, 20), p=st.integers(1, 4),
       history=st.integers(1, 5), stride=st.integers(1, 4), fd=st.booleans(),
       step=st.integers(1, 7))
def test_blocked_split_never_leaks(n_frames, jump, p, history, stride, fd, step):
    jump = jump * p
    proto = Protocol("history" if history > 1 else "s2t", jump, p, history, stride)
    if proto.window_length(fd) * 3 + 2 > n_frames:
        with pytest.raises(DataError):
            split_starts(n_frames, proto, finite_difference=fd, stride=step)
        return
    s = split_starts(n_frames, proto, finite_difference=fd, stride=step)

    def frames(starts):
        lo, hi = proto.before(fd), proto.after
        return {f for t in starts for f in range(t - lo, t + hi + 1)}

    train, val, test = frames(s["train"]), frames(s["val"]), frames(s["test"])
    assert not train & test and not train & val and not val & test
    everything = set().union(train, val, test)
    assert min(everything) >= 0 and max(everything) <= n_frames - 1


def test_windows_content_and_batch(dataset):
    path, pos, vel = dataset
    f = open_trajectory(path)
    proto = Protocol.from_ps("history", 1.0, 2, f.interval_ps, history=3, history_stride_ps=0.2)
    w = make_windows([f], proto, seed=0)
    sel = select_nodes(f.topology, "heavy")
    gb = GraphBuilder.for_selection(GraphSpec("bonds"), sel, f.topology.bonds,
                                    sel.gather(pos[:1])[0])
    ds = WindowDataset([f], w["train"], proto, sel, gb)
    t0 = int(w["train"][4, 1])
    item = ds[4]
    np.testing.assert_allclose(item[K.POS][:, 0], pos[t0, [0, 3]], atol=1e-4)
    np.testing.assert_allclose(item[K.VEL][:, 0], vel[t0, [0, 3]], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(item[K.TARGET][:, :, 0], pos[[t0 + 5, t0 + 10]][:, [0, 3]],
                               atol=1e-4)
    np.testing.assert_allclose(item[K.HIST][:, :, 0], pos[[t0 - 4, t0 - 2, t0]][:, [0, 3]],
                               atol=1e-4)
    assert item[K.EDGE_INDEX].tolist() == [[0, 1], [1, 0]]  # O-C bond kept, H bonds dropped
    b = ds.collate([ds[0], ds[1], ds[2]])
    assert b[K.POS].shape == (6, 1, 3) and b[K.TARGET].shape == (2, 6, 1, 3)
    assert b[K.HIST].shape == (3, 6, 1, 3)
    assert b[K.GRAPH].tolist() == [0, 0, 1, 1, 2, 2] and int(b[K.N_GRAPHS]) == 3
    assert b[K.EDGE_INDEX].tolist() == [[0, 1, 2, 3, 4, 5], [1, 0, 3, 2, 5, 4]]
    np.testing.assert_allclose(b[K.TIMES].numpy(), [0.5, 1.0])


def test_finite_difference_velocities_look_back_only(tmp_path):
    pos = random_walk(200)
    path = write_trajectory(tmp_path / "nv.h5", small_topology(), pos, np.arange(200) * 0.5,
                            {"interval_ps": 0.5})
    f = open_trajectory(path)
    proto = Protocol("s2t", 4, 2)
    w = make_windows([f], proto)
    sel = select_nodes(f.topology, "all")
    ds = WindowDataset([f], w["test"], proto, sel, GraphBuilder(GraphSpec("full"), None, 5))
    t0 = int(w["test"][0, 1])
    np.testing.assert_allclose(ds[0][K.VEL][:, 0], (pos[t0] - pos[t0 - 1]) / 0.5, atol=1e-3)


def test_velocities_setting_forces_differences_or_stored_velocities(dataset, tmp_path):
    """``data.velocities``: ``difference`` takes x[t0] - x[t0 - 1] over one saved frame even
    where the file stores velocities (the MD17 protocol on data made with velocities; before,
    stored ones were used whenever there were any), starts no window at frame 0 and is what the
    checkpoint records; ``file`` refuses a file without velocities by name; ``auto`` is as
    before."""
    from surrogate_md.train.config import config_from_dict
    from surrogate_md.train.data import prepare_data

    path, pos, vel = dataset
    no_v = write_trajectory(tmp_path / "nv.h5", small_topology(), pos, np.arange(400) * 0.1,
                            {"interval_ps": 0.1})

    def prepared(data_path, velocities):
        return prepare_data(config_from_dict({
            "data": {"path": str(data_path), "jump_ps": 0.2, "n_out": 2, "velocities": velocities,
                     "graph": {"kind": "full"}},
            "model": {"name": "constant"}}).data)

    forced = prepared(path, "difference")
    try:
        ds = forced.datasets["train"]
        assert forced.velocity_source == "finite_difference" and ds.finite_difference
        assert forced.protocol_meta()["velocity_source"] == "finite_difference"
        assert int(forced.windows["train"][:, 1].min()) >= 1
        for i in (0, 7):
            t0 = int(ds.windows[i, 1])
            np.testing.assert_allclose(ds[i][K.VEL][:, 0], (pos[t0] - pos[t0 - 1]) / 0.1,
                                       rtol=1e-4, atol=1e-3)
            assert not np.allclose(ds[i][K.VEL][:, 0], vel[t0], atol=1e-3)
    finally:
        forced.close()
    for velocities, source in (("auto", "file"), ("file", "file")):
        plain = prepared(path, velocities)
        try:
            assert plain.velocity_source == source
            item, t0 = plain.datasets["train"][3], int(plain.windows["train"][3, 1])
            np.testing.assert_allclose(item[K.VEL][:, 0], vel[t0], rtol=1e-4, atol=1e-3)
        finally:
            plain.close()
    auto = prepared(no_v, "auto")
    assert auto.velocity_source == "finite_difference"
    auto.close()
    with pytest.raises(DataError, match=r"nv\.h5: data\.velocities is 'file' but the file "
                                        r"stores no velocities; use data\.velocities: difference"):
        prepared(no_v, "file")
    with pytest.raises(ConfigError, match="data.velocities"):
        prepared(path, "stored")


def brute_radius(pos: np.ndarray, cutoff: float) -> set[tuple[int, int]]:
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, j = np.nonzero((d < cutoff) & ~np.eye(len(pos), dtype=bool))
    return set(zip(j.tolist(), i.tolist()))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 120), cutoff=st.floats(0.5, 8.0), box=st.floats(1.0, 30.0),
       seed=st.integers(0, 10_000))
def test_radius_graph_equals_brute_force(n, cutoff, box, seed):
    pos = np.random.default_rng(seed).uniform(0, box, size=(n, 3))
    e = radius_edges(torch.from_numpy(pos), cutoff)
    assert set(zip(e[0].tolist(), e[1].tolist())) == brute_radius(pos, cutoff)


def test_radius_graph_respects_systems_and_neighbour_cap():
    pos = torch.from_numpy(np.random.default_rng(0).uniform(0, 6, size=(80, 3)))
    graph = torch.tensor([0] * 30 + [1] * 50)
    e = radius_edges(pos, 4.0, graph)
    assert bool((graph[e[0]] == graph[e[1]]).all())
    capped = radius_edges(pos, 4.0, graph, max_neighbours=3)
    assert int(torch.bincount(capped[1]).max()) <= 3


@pytest.mark.parametrize("cap", [None, 5])
def test_radius_graph_kdtree_dense_and_cell_list_paths_agree(monkeypatch, cap):
    # CPU positions take the k-d tree; off CPU small systems take all pair distances at once,
    # large ones the cell list: same edges, same order, across systems of a batch, also for
    # pairs a hair inside and outside the cutoff
    from surrogate_md.data import graphs as G

    rng = np.random.default_rng(4)
    pos = rng.uniform(0, 25, size=(700, 3))
    direction = rng.normal(size=(40, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    pos[300:340] = pos[:40] + direction * 6.0 * (1 + rng.choice([-1e-12, 1e-12], size=(40, 1)))
    pos = torch.from_numpy(pos)
    graph = torch.tensor([0] * 300 + [1] * 400)
    for g in (graph, None):
        monkeypatch.setattr(G, "USE_KDTREE", True)
        kdtree = radius_edges(pos, 6.0, g, max_neighbours=cap)
        monkeypatch.setattr(G, "USE_KDTREE", False)
        monkeypatch.setattr(G, "DENSE_RADIUS_MAX_NODES", 1024)
        dense = radius_edges(pos, 6.0, g, max_neighbours=cap)
        monkeypatch.setattr(G, "DENSE_RADIUS_MAX_NODES", 0)
        cells = radius_edges(pos, 6.0, g, max_neighbours=cap)
        assert dense.shape[1] > 1000
        assert torch.equal(dense, cells)
        assert torch.equal(kdtree, dense)


def test_bond_graph_two_hop_and_full():
    ei, et = bond_edges(np.array([[0, 1], [1, 2], [2, 3]]), 4, two_hop=True)
    pairs = {(int(a), int(b)): int(t) for a, b, t in zip(ei[0], ei[1], et)}
    assert pairs[(0, 1)] == 0 and pairs[(0, 2)] == 1 and pairs[(3, 1)] == 1
    assert (0, 3) not in pairs and len(pairs) == 10
    e = full_edges(3, torch.tensor([0, 0, 1]))
    assert e.tolist() == [[1, 0], [0, 1]]


def test_infer_bonds_md17_rule():
    pos = np.array([[0.0, 0, 0], [1.5, 0, 0], [3.7, 0, 0]])
    assert infer_bonds(pos, cutoff_A=1.6).tolist() == [[0, 1]]
    assert infer_bonds(pos, cutoff_A=2.5).tolist() == [[0, 1], [1, 2]]


def test_surrogate_md_core_does_not_import_engines():
    """The one-direction import rule: the core never imports MD engines."""
    import subprocess
    import sys

    code = ("import sys, surrogate_md, surrogate_md.data, surrogate_md.models, "
            "surrogate_md.surrogate, surrogate_md.checkpoint, surrogate_md.validity\n"
            "bad = [m for m in ('openmm', 'ase', 'MDAnalysis', 'mdtraj', 'datagen', "
            "'integrations') if m in sys.modules]\nprint(bad)\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_radius_graphs_over_periodic_solvent_warn(tmp_path, caplog):
    # water in a periodic box: radius graphs see no periodic images, which the user is told
    import logging

    from surrogate_md.train.config import config_from_dict
    from surrogate_md.train.data import prepare_data

    n_water = 8
    z = np.tile([8, 1, 1], n_water)
    top = Topology(z, np.tile([16.0, 1.0, 1.0], n_water), np.tile(["O", "H1", "H2"], n_water),
                   np.repeat(np.arange(n_water), 3), ["HOH"] * 3 * n_water,
                   bonds=[[3 * i, 3 * i + k] for i in range(n_water) for k in (1, 2)])
    rng = np.random.default_rng(0)
    pos = (rng.uniform(0, 12, (1, 3 * n_water, 3))
           + np.cumsum(rng.normal(scale=0.05, size=(60, 3 * n_water, 3)), axis=0))
    for periodic in (True, False):
        box = np.tile(np.eye(3) * 12.0, (60, 1, 1)) if periodic else None
        path = write_trajectory(tmp_path / f"w{periodic}.h5", top, pos, np.arange(60) * 0.1,
                                {"interval_ps": 0.1}, velocities=pos, box=box)
        for kind in ("radius", "bonds"):
            caplog.clear()
            cfg = config_from_dict({"data": {"path": str(path), "selection": "all",
                                             "jump_ps": 0.2, "n_out": 2,
                                             "graph": {"kind": kind}},
                                    "model": {"name": "constant"}})
            with caplog.at_level(logging.WARNING):
                prepare_data(cfg.data).close()
            warned = "without periodic images" in caplog.text
            assert warned == (periodic and kind == "radius"), (periodic, kind)


def test_batch_to_keeps_the_system_count_on_the_cpu():
    """Every tensor goes to the device (``meta`` stands in for a GPU here) and floats take the
    dtype, except the system count, which stays a CPU scalar that ``int()`` reads without a
    device sync."""
    from surrogate_md.data.windows import batch_to
    from surrogate_md.testing import random_batch

    batch = random_batch(seed=1)
    moved = batch_to(batch, torch.device("meta"), torch.float32)
    assert moved[K.N_GRAPHS].device.type == "cpu"
    assert int(moved[K.N_GRAPHS]) == int(batch[K.N_GRAPHS])
    assert all(v.device.type == "meta" for k, v in moved.items() if k != K.N_GRAPHS)
    assert moved[K.POS].dtype == torch.float32 and moved[K.EDGE_INDEX].dtype == torch.long
