"""Reference values computed by hand (first principles, literal constants), not by the code path
under test: squared-displacement metrics, guard thresholds and checks, validity tolerances,
checkpoint versions, MD17 and OpenMM units and time axes, history spacing, rollout floors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

K_B_KJ_PER_MOL_K = 0.008314462618  # molar gas constant, kJ/mol/K


# -- 1. metrics: squared distance summed over x, y, z, averaged over atoms ------------------------
def test_squared_error_sums_xyz_and_averages_atoms():
    from surrogate_md.metrics import batch_amse, per_frame_sq_error

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 3, 5, 3))  # (..., atoms, 3)
    pred = ref + np.array([1.0, 2.0, 2.0])  # every atom moved by |(1, 2, 2)| = 3 Å
    np.testing.assert_allclose(per_frame_sq_error(pred, ref), np.full((2, 3), 9.0))
    assert float(batch_amse(torch.from_numpy(pred), torch.from_numpy(ref))) == pytest.approx(9.0)
    # one atom of four moved by 2 Å along x: 4 Å² / 4 atoms = 1 Å² per atom
    moved = np.zeros((4, 3))
    moved[0, 0] = 2.0
    assert float(per_frame_sq_error(moved, np.zeros((4, 3)))) == pytest.approx(1.0)
    assert float(batch_amse(torch.from_numpy(moved), torch.zeros(4, 3))) == pytest.approx(1.0)


# -- 2. default energy threshold: 8 kT sqrt(n_dof / 2) ------------------------------------------
def test_default_energy_threshold_literal_numbers():
    from integrations.guards import default_energy_threshold

    kt_300 = K_B_KJ_PER_MOL_K * 300.0  # 2.4943387854 kJ/mol
    # n_dof = 200: sqrt(100) = 10 -> 80 kT = 199.547 kJ/mol
    assert default_energy_threshold(200, 300.0) == pytest.approx(80.0 * kt_300, rel=1e-6)
    assert default_energy_threshold(200, 300.0) == pytest.approx(199.5471, rel=1e-6)
    # n_dof = 18 at 500 K: sqrt(9) = 3 -> 24 kT
    assert default_energy_threshold(18, 500.0) == pytest.approx(
        24.0 * K_B_KJ_PER_MOL_K * 500.0, rel=1e-6)


# -- 3. guard clash and chain-break checks at their thresholds ----------------------------------
def _stub_surrogate(topology: dict, validity=None):
    class Stub:
        pass

    s = Stub()
    s.topology = topology
    s.n_atoms = len(topology["atom_names"])
    s.model_atoms = np.arange(s.n_atoms)
    s.validity = validity
    return s


def test_clash_check_trips_just_below_the_min_distance():
    from integrations.guards import GuardConfig, Guards
    from surrogate_md.validity import ValidityReference

    topology = {"atom_names": ["C1", "C2"], "residue_ids": [1, 1], "residue_names": ["MOL"] * 2,
                "atomic_numbers": [6, 6], "bonds": []}
    validity = ValidityReference(np.zeros((0, 2), dtype=np.int64), np.zeros(0), float("inf"), 2.0)
    guards = Guards(_stub_surrogate(topology, validity), GuardConfig(action="warn"))
    assert guards.min_distance_A == 2.0
    for d, expected in [(2.5, []), (2.05, []), (1.95, ["clash"]), (1.5, ["clash"])]:
        x = np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0]])
        events = guards.check(x)
        assert [e.check for e in events] == expected, d
        if events:
            assert events[0].value == pytest.approx(d) and events[0].threshold == 2.0


def test_chain_break_check_trips_just_beyond_4_5_angstrom():
    from integrations.guards import GuardConfig, Guards

    topology = {"atom_names": ["CA", "CA"], "residue_ids": [1, 2], "residue_names": ["ALA"] * 2,
                "atomic_numbers": [6, 6], "bonds": []}
    guards = Guards(_stub_surrogate(topology), GuardConfig(action="warn"))
    for d, expected in [(3.8, []), (4.45, []), (4.6, ["chain_break"]), (5.2, ["chain_break"])]:
        x = np.array([[0.0, 0.0, 0.0], [0.0, d, 0.0]])
        events = guards.check(x)
        assert [e.check for e in events] == expected, d
        if events:
            assert events[0].value == pytest.approx(d) and events[0].threshold == 4.5


# -- 4. validity tolerances learned from frames ------------------------------------------------
def test_validity_reference_from_hand_made_frames():
    from surrogate_md.validity import ValidityReference

    # a bent chain 0-1-2-3; the only pair more than two bonds apart is (0, 3)
    f0 = np.array([[0.0, 0, 0], [1.0, 0, 0], [1.0, 1.0, 0], [3.0, 1.0, 0]])
    f1 = f0.copy()
    f1[0] = [-0.5, 0.0, 0.0]  # bond 0-1 stretched from 1.0 to 1.5 Å
    bonds = np.array([[0, 1], [1, 2], [2, 3]])
    ref = ValidityReference.from_frames(np.stack([f0, f1]), bonds, margin_A=0.1,
                                        clash_factor=0.6)
    # bond lengths: (1.0, 1.5) mean 1.25; (1, 1); (2, 2)
    np.testing.assert_allclose(ref.bond_length_mean_A, [1.25, 1.0, 2.0])
    # largest |length - mean| is 0.25 Å, plus the 0.1 Å margin
    assert ref.bond_tolerance_A == pytest.approx(0.35)
    # 0-3: sqrt(3^2 + 1) in frame 0, sqrt(3.5^2 + 1) in frame 1; the 1-3 pairs (0, 2) at
    # sqrt(2) Å and (1, 3) at sqrt(5) Å are excluded
    assert ref.min_distance_A == pytest.approx(0.6 * math.sqrt(10.0))
    # radius of gyration: frame 0 centroid (1.25, 0.5, 0), squared distances 1.8125, 0.3125,
    # 0.3125, 3.3125 -> sqrt(5.75 / 4); frame 1 centroid (1.125, 0.5, 0), squared distances
    # 2.890625, 0.265625, 0.265625, 3.765625 -> sqrt(7.1875 / 4)
    rg0, rg1 = math.sqrt(5.75 / 4), math.sqrt(7.1875 / 4)
    from surrogate_md.validity import radius_of_gyration
    np.testing.assert_allclose(radius_of_gyration(np.stack([f0, f1])), [rg0, rg1])
    # widened by half the range (0.0708 Å) on each side: more than 5 % of the mean (0.0635 Å)
    widen = 0.5 * (rg1 - rg0)
    assert ref.gyration_range_A == pytest.approx((rg0 - widen, rg1 + widen))
    # one frame: no range, so 5 % of its radius of gyration
    single = ValidityReference.from_frames(f0[None], bonds)
    assert single.gyration_range_A == pytest.approx((0.95 * rg0, 1.05 * rg0))
    # stored and read back; a reference of an older release has none (no check)
    assert ValidityReference.from_dict(ref.to_dict()).gyration_range_A == pytest.approx(
        ref.gyration_range_A)
    old = ref.to_dict()
    del old["gyration_range_A"]
    assert ValidityReference.from_dict(old).gyration_range_A is None


def test_gyration_summary_counts_frames_outside_the_range():
    """Hand-computed: the two frames above, a copy shrunk to half and a non-finite one."""
    from surrogate_md.validity import gyration_summary

    f0 = np.array([[0.0, 0, 0], [1.0, 0, 0], [1.0, 1.0, 0], [3.0, 1.0, 0]])
    f1 = f0.copy()
    f1[0] = [-0.5, 0.0, 0.0]
    rg0, rg1 = math.sqrt(5.75 / 4), math.sqrt(7.1875 / 4)
    nan = np.full_like(f0, np.nan)
    model = np.stack([f0, 0.5 * f1 + 3.0, nan])  # the NaN frame is left out, not counted
    g = gyration_summary(model, np.stack([f0, f1]), (rg0 - 0.01, rg1 + 0.01))
    assert g["model_min"] == pytest.approx(0.5 * rg1) and g["model_max"] == pytest.approx(rg0)
    assert g["model_mean"] == pytest.approx(0.5 * (rg0 + 0.5 * rg1))
    assert g["model_outside_fraction"] == 0.5  # the shrunk copy, below the range
    assert g["reference_outside_fraction"] == 0.0
    assert (g["reference_min"], g["reference_max"]) == pytest.approx((rg0, rg1))
    assert g["allowed"] == pytest.approx([rg0 - 0.01, rg1 + 0.01])
    # a range that leaves out the larger MD frame counts it; no range: no fractions
    assert gyration_summary(model, np.stack([f0, f1]), (0.0, rg0 + 0.01))[
        "reference_outside_fraction"] == 0.5
    bare = gyration_summary(model, np.stack([f0, f1]), None)
    assert bare["allowed"] is None and bare["model_outside_fraction"] is None
    # only non-finite frames: nothing to summarise, no error
    assert gyration_summary(nan[None], np.stack([f0]), None)["model_mean"] is None


def test_size_check_trips_just_outside_the_gyration_range():
    from integrations.guards import GuardConfig, Guards
    from surrogate_md.validity import ValidityReference

    topology = {"atom_names": ["C1", "C2"], "residue_ids": [1, 1], "residue_names": ["MOL"] * 2,
                "atomic_numbers": [6, 6], "bonds": []}
    validity = ValidityReference(np.zeros((0, 2), dtype=np.int64), np.zeros(0), float("inf"),
                                 0.0, (1.0, 2.0))
    guards = Guards(_stub_surrogate(topology, validity), GuardConfig(action="relax"))
    # two atoms d apart: radius of gyration d / 2
    for d, expected in [(2.1, []), (1.9, ["size"]), (3.9, []), (4.1, ["size"])]:
        events = guards.check(np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0]]))
        assert [e.check for e in events] == expected, d
        if events:
            assert events[0].value == pytest.approx(d / 2)
            assert events[0].threshold == (1.0 if d < 2 else 2.0)
            # a minimiser does not expand a compacted molecule: relax falls back at once; a
            # swollen one it may pull back
            assert guards.action_for(events) == ("fallback" if d < 2 else "relax")
    stretched = GuardConfig(action="relax", gyration_range_A=(1.0, 3.0))
    assert Guards(_stub_surrogate(topology, validity), stretched).check(
        np.array([[0.0, 0.0, 0.0], [4.1, 0.0, 0.0]])) == []
    # an older reference without a range: no check
    older = ValidityReference(validity.bonds, validity.bond_length_mean_A, float("inf"), 0.0)
    assert Guards(_stub_surrogate(topology, older), GuardConfig()).check(
        np.array([[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]])) == []


# -- 5. checkpoint format versions -------------------------------------------------------------
def test_checkpoint_from_a_newer_format_is_refused():
    from surrogate_md.checkpoint import FORMAT_VERSION, migrate
    from surrogate_md.errors import CheckpointError

    for newer in (FORMAT_VERSION + 1, FORMAT_VERSION + 2):
        with pytest.raises(CheckpointError, match="newer"):
            migrate({"format_version": newer}, Path("ck.pt"))
    assert migrate({"format_version": FORMAT_VERSION}, Path("ck.pt"))["format_version"] == \
        FORMAT_VERSION


# -- 6. MD17 frames are 0.5 fs apart -----------------------------------------------------------
def test_md17_time_axis_is_half_a_femtosecond_per_frame(tmp_path):
    from datagen.ingest import ingest
    from surrogate_md.data.h5md import open_trajectory

    rng = np.random.default_rng(1)
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    r = water + 0.01 * rng.normal(size=(6, 3, 3))
    np.savez(tmp_path / "w.npz", R=r, z=np.array([8, 1, 1]))
    out = ingest(tmp_path / "w.npz", tmp_path / "w.h5", progress=False)
    with open_trajectory(out) as f:
        assert f.interval_ps == pytest.approx(0.0005, rel=1e-12)
        np.testing.assert_allclose(f.time_ps, 0.0005 * np.arange(6), rtol=0, atol=1e-12)


# -- 7. OpenMM datagen: forces in kJ/mol/Å, frames at the simulated time ------------------------
@pytest.fixture(scope="module")
def ethanol_run(tmp_path_factory):
    pytest.importorskip("openmm")
    from datagen.openmm_md import run_openmm

    out = tmp_path_factory.mktemp("omm") / "ethanol.h5"
    return run_openmm("ethanol", out, frames=4, interval_ps=0.001, step_fs=0.5,
                      equilibrate_ps=0.01, seed=3, platform="Reference", progress=False)


def test_openmm_forces_stored_in_kj_per_mol_per_angstrom(ethanol_run):
    import openmm
    from openmm import unit

    from datagen.openmm_md import prepare_system
    from datagen.systems import BUILTIN_SYSTEMS
    from surrogate_md.data.h5md import open_trajectory

    with open_trajectory(ethanol_run) as f:
        x = np.asarray(f.read([2])[0], dtype=np.float64)
        stored = np.asarray(f.read([2], "forces")[0], dtype=np.float64)
    # the run's own system: the built-in's constraints (None: a bond that is constrained drops
    # out of OpenMM's bond force, so its force would be missing)
    prepared = prepare_system("ethanol", constraints=BUILTIN_SYSTEMS["ethanol"].constraints)
    ctx = openmm.Context(prepared.system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x / 10.0)  # Å -> nm, by hand
    per_nm = ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
        unit.kilojoule_per_mole / unit.nanometer)
    per_angstrom = np.asarray(per_nm) / 10.0  # kJ/mol/nm -> kJ/mol/Å: 1 nm = 10 Å
    scale = np.abs(per_angstrom).max()
    assert scale > 1.0
    np.testing.assert_allclose(stored, per_angstrom, rtol=1e-3, atol=1e-3 * scale)


def test_openmm_frames_are_one_interval_of_simulated_time_apart(ethanol_run):
    from surrogate_md.data.h5md import open_trajectory

    with open_trajectory(ethanol_run) as f:
        t = np.asarray(f.time_ps)
        x = np.asarray(f.read(slice(None)), dtype=np.float64)
        v = np.asarray(f.read(slice(None), "velocities"), dtype=np.float64)
    np.testing.assert_allclose(t, 0.001 * np.arange(4), rtol=0, atol=1e-12)
    # displacement over a frame = integral of the velocity (trapezoid over 1 fs, 2 steps)
    dx = (x[1:] - x[:-1]).ravel()
    expect = (0.5 * (v[1:] + v[:-1]) * 0.001).ravel()
    slope = float(dx @ expect / (expect @ expect))
    assert slope == pytest.approx(1.0, abs=0.1)


# -- 8. history spacing in a batch -------------------------------------------------------------
def test_history_dt_is_stride_times_interval(tmp_path):
    from surrogate_md.data import Topology, open_trajectory, write_trajectory
    from surrogate_md.data import keys as K
    from surrogate_md.data.selection import select_nodes
    from surrogate_md.data.windows import GraphBuilder, GraphSpec, Protocol, WindowDataset

    n = 3
    top = Topology(atomic_numbers=[6] * n, masses=[12.0] * n, atom_names=["C1", "C2", "C3"],
                   residue_ids=[1] * n, residue_names=["MOL"] * n, bonds=[[0, 1], [1, 2]])
    rng = np.random.default_rng(2)
    pos = np.cumsum(0.05 * rng.normal(size=(60, n, 3)), axis=0) + np.arange(n)[None, :, None]
    path = write_trajectory(tmp_path / "h.h5", top, pos, np.arange(60) * 0.25,
                            {"interval_ps": 0.25}, velocities=np.zeros_like(pos))
    f = open_trajectory(path)
    proto = Protocol("history", 4, 2, history=3, history_stride=3)
    sel = select_nodes(f.topology, "all")
    ds = WindowDataset([f], np.array([[0, 10], [0, 20]]), proto, sel,
                       GraphBuilder(GraphSpec("full"), None, n))
    b = ds.collate([ds[0], ds[1]])
    assert float(b[K.HIST_DT]) == pytest.approx(0.75)  # 3 frames x 0.25 ps
    np.testing.assert_allclose(b[K.TIMES].numpy(), [0.5, 1.0])


# -- 9. rollout curve of the constant floor ------------------------------------------------------
def test_rollout_constant_floor_is_the_mean_squared_displacement(tmp_path_factory, tmp_path):
    from _train_fixtures import cached, make_alanine_dipeptide, tiny_config

    from surrogate_md.data import open_trajectory
    from surrogate_md.evaluate import evaluate
    from surrogate_md.train import train

    ala = cached(tmp_path_factory, "ala", make_alanine_dipeptide)
    ck = train(tiny_config(ala, "egnn", train={"epochs": 1, "max_steps_per_epoch": 1}),
               tmp_path / "run")
    res = evaluate(ck, ala, tmp_path / "report", rollout_jumps=3, n_rollouts=2, plots=False,
                   device="cpu")
    roll = res["rollout"]
    # jump 0.2 ps, 2 outputs: frames every 0.1 ps, 5 saved frames of 0.02 ps
    with open_trajectory(ala) as f:
        assert f.interval_ps == pytest.approx(0.02)
        np.testing.assert_allclose(roll["times_ps"], 0.1 * np.arange(1, 7), atol=1e-9)
        msd = []
        for r in roll["rollouts"]:
            t0 = r["start_frame"]
            x0 = f.read(np.array([t0]))[0].astype(np.float64)
            ref = f.read(t0 + 5 * np.arange(1, 7)).astype(np.float64)
            msd.append(((ref - x0) ** 2).sum(-1).mean(-1))
    assert len(msd) == roll["n_rollouts"] == 2
    np.testing.assert_allclose(roll["mse_vs_time"]["constant"], np.mean(msd, axis=0), rtol=1e-5)
    assert min(roll["mse_vs_time"]["constant"]) > 0
