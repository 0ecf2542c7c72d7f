"""Tests written after a mutation review of the changes since 97f43d0: each pins a behaviour
that a small change of the code (named in its docstring) left every other test passing."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from _integration_fixtures import (
    PDB,
    alanine_system,
    cached_md,
    cold_start,
    make_checkpoint,
    reference_platform,
    small_egnn_config,
)
from openmm import app, unit
from scipy.constants import R

from surrogate_md import Surrogate
from surrogate_md.data.h5md import Topology


# -- surrogate_md.metrics.ca_pairs_of / consecutive_ca_pairs ---------------------------------------
def _backbone_topology(res_ids, bonds=None, segments=None):
    """Atoms N, CA, C per residue (ALA), numbered ``res_ids``."""
    n = len(res_ids)
    return dict(atom_names=["N", "CA", "C"] * n, residue_ids=np.repeat(res_ids, 3),
                residue_names=["ALA"] * 3 * n, segment_ids=segments, bonds=bonds)


def test_ca_pairs_without_bonds_skip_a_gap_in_the_numbering():
    """No bonds (a coarse-grained topology): residues 1, 2, 4, 5 (residue 3 missing) give the
    pairs 1-2 and 4-5 only; 2-4 is no peptide link. (Mutation: ``res_ids[b] - res_ids[a] >= 1``
    paired them, and the guard would call the gap a chain break.)"""
    from surrogate_md.metrics import ca_pairs_of

    topo = _backbone_topology([1, 2, 4, 5])
    np.testing.assert_array_equal(ca_pairs_of(**topo), [[1, 4], [7, 10]])


def test_ca_pairs_from_peptide_bonds_listed_n_first():
    """Peptide bonds listed as (N(i+1), C(i)), as some topologies order them: two chains
    numbered on (1-3, 4-6) without segment ids are still kept apart by the bonds. (Mutation:
    without the N/C swap no peptide bond is recognised, numbering decides, and CA(3)-CA(4)
    across the chains becomes a pair.)"""
    from surrogate_md.metrics import ca_pairs_of

    within = [(0, 1), (1, 2), (3, 4), (4, 5)]  # residue pairs joined by a peptide bond
    bonds = [[3 * j, 3 * i + 2] for i, j in within]  # N(j), C(i)
    bonds += [[3 * r, 3 * r + 1] for r in range(6)] + [[3 * r + 1, 3 * r + 2] for r in range(6)]
    topo = _backbone_topology([1, 2, 3, 4, 5, 6], bonds=bonds)
    np.testing.assert_array_equal(ca_pairs_of(**topo), [[1, 4], [4, 7], [10, 13], [13, 16]])


def test_consecutive_ca_pairs_leave_out_pairs_with_an_atom_outside_the_subset():
    """Four residues; a model subset of the CAs of residues 1, 2 and 4 (atoms 1, 4, 10): the
    pair 1-2 maps to subset positions (0, 1); 2-3 and 3-4 have CA(3) outside the subset and are
    left out. (Mutation: ``.any`` instead of ``.all`` kept them with a -1 index, the last model
    atom.)"""
    from surrogate_md.metrics import consecutive_ca_pairs

    t = _backbone_topology([1, 2, 3, 4])
    n = len(t["atom_names"])
    topo = Topology(np.tile([7, 6, 6], 4), np.tile([14.007, 12.011, 12.011], 4),
                    np.asarray(t["atom_names"]), t["residue_ids"], np.asarray(t["residue_names"]),
                    np.zeros((0, 2), dtype=np.int64), np.full(n, ""))
    np.testing.assert_array_equal(consecutive_ca_pairs(topo), [[1, 4], [4, 7], [7, 10]])
    np.testing.assert_array_equal(consecutive_ca_pairs(topo, np.array([1, 4, 10])), [[0, 1]])


# -- integrations.guards: energy_state / restore_energy_state --------------------------------------
class _BareSurrogate:  # what Guards reads of a surrogate, for a 3-atom system
    model_atoms = np.arange(3)
    n_atoms = 3
    validity = None
    topology = {"atom_names": ["C", "C", "C"], "residue_ids": [1, 1, 1],
                "residue_names": ["MOL"] * 3, "atomic_numbers": [6, 6, 6], "bonds": []}


def _restored(guards):
    from integrations.guards import GuardConfig, Guards

    fresh = Guards(_BareSurrogate(), GuardConfig(energy_window=3))
    fresh.restore_energy_state(json.loads(json.dumps(guards.energy_state())))
    return fresh


def test_restored_guards_keep_the_anchor_and_the_real_md_energies():
    """Window of 3, drift 0: the reference is the median of the last 3 energies capped at the
    anchor. (a) Energies 0, 0, 0 then 100, 100, 100 of surrogate states: the anchor is the first
    three's median, 0, so the reference is 0. (b) One real-MD energy -10, then 100 x 3: the
    anchor is the real-MD median, -10. A restart must judge the next jump against the same
    reference. (Mutations: the anchor restored from the window, 100; the real-MD energies not
    restored, anchor median(-10, 100, 100) = 100.)"""
    from integrations.guards import GuardConfig, Guards

    a = Guards(_BareSurrogate(), GuardConfig(energy_window=3))
    for e in (0.0, 0.0, 0.0, 100.0, 100.0, 100.0):
        a.record_energy(e)
    assert a.energy_reference_kJ_per_mol == 0.0
    assert _restored(a).energy_reference_kJ_per_mol == 0.0
    assert _restored(a).energy_state() == a.energy_state()

    b = Guards(_BareSurrogate(), GuardConfig(energy_window=3))
    b.record_md_energy(-10.0, md_ps=float("inf"))
    for e in (100.0, 100.0, 100.0):
        b.record_energy(e)
    assert b.energy_reference_kJ_per_mol == -10.0
    assert _restored(b).energy_reference_kJ_per_mol == -10.0
    assert _restored(b).energy_state() == b.energy_state()


# -- thermal end velocities: Surrogate.rollout and SurrogatePropagator ------------------------------
@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """The analytic linear surrogate on the 10 heavy atoms of alanine dipeptide (22 atoms)."""
    path = make_checkpoint(cached_md(), tmp_path_factory.mktemp("mf") / "heavy.pt",
                           selection="heavy")
    return Surrogate.load(path, dtype=torch.float64)


def test_thermal_rollout_draws_over_the_model_atoms_for_each_batch_member(heavy):
    """A batch of two copies of one state, 2 jumps, thermal end velocities seeded 7: member b's
    second jump starts from its first jump's end with draw b of ``thermal_velocities`` over the
    10 model atoms' masses (batch=(2,)), so the two copies part. (Mutations: one draw for the
    whole batch; the draws over all 22 atoms' masses and momentum.)"""
    from surrogate_md.surrogate import thermal_velocities

    assert heavy.n_model_atoms == 10 and heavy.n_atoms == 22
    md = cached_md()
    x, v = md["frames"][[0, 0]], md["velocities"][[0, 0]]
    frames, _ = heavy.rollout(x, v, n_jumps=2, end_velocities="thermal", temperature_K=300.0,
                              velocity_seed=7)
    p = len(heavy.times_ps)
    masses = np.asarray(heavy.topology["masses"], dtype=np.float64)[heavy.model_atoms]
    draws = thermal_velocities(masses, 300.0, np.random.default_rng(7), batch=(2,))
    for b in range(2):
        np.testing.assert_allclose(frames[b, p:2 * p], heavy.predict(frames[b, p - 1], draws[b]),
                                   atol=1e-9)
    np.testing.assert_allclose(frames[0, :p], frames[1, :p], atol=1e-12)
    assert np.abs(frames[0, p:] - frames[1, p:]).max() > 1e-3


def test_propagator_draws_at_its_own_temperature(heavy):
    """At 600 K: <m v_x^2> = kT (1 - m/M) with kT = R x 600 K for every atom (4000 draws,
    about 2 % noise per atom). (Mutation: the draws at 300 K whatever the engine's temperature:
    every test ran at 300 K.)"""
    from integrations.propagator import SurrogatePropagator

    masses = np.asarray(cached_md()["topology"].masses, dtype=np.float64)
    prop = SurrogatePropagator(heavy, end_velocities="thermal", masses_amu=masses,
                               temperature_K=600.0, seed=11)
    vel = np.zeros((2, heavy.n_atoms, 3))
    draws = np.stack([prop._end_velocities(vel)[-1] for _ in range(4000)])  # Å/ps
    kt = R * 1e-3 * 600.0  # kJ/mol
    m_v2 = masses[:, None] * (draws / 10.0) ** 2  # amu (nm/ps)^2 = kJ/mol
    np.testing.assert_allclose(m_v2.mean(axis=(0, 2)), kt * (1 - masses / masses.sum()),
                               rtol=0.08)


# -- surrogate_md.train.loop._recover_replaced -----------------------------------------------------
def _killed_overwrite(out):
    """A run directory as an --overwrite leaves it when killed after moving the old run aside:
    the old run's files in ``.replaced-run-*``, the new start's config.yaml and train.log."""
    import surrogate_md.train.loop as loop

    out.mkdir()
    for n in loop.RUN_FILES:
        (out / n).write_text(f"old {n}")
    _, replaced = loop._prepare_run_dir(out, resume=False, overwrite=True)
    (out / "config.yaml").write_text("new config.yaml")
    (out / "train.log").write_text("new train.log")
    return replaced


@pytest.mark.parametrize("written", ["best.pt", "last.pt"])
def test_a_new_run_with_any_checkpoint_keeps_its_files(tmp_path, written):
    """The new run had got past its start checks and written one checkpoint (best.pt comes
    before last.pt in an epoch; an analytic model writes best.pt only) when it was killed: the
    old run's folder goes, the new run's files stay. (Mutations: ``all`` of the two files, or
    best.pt alone, taken for a started run: the old files moved back over the new ones.)"""
    import surrogate_md.train.loop as loop

    out = tmp_path / "run"
    replaced = _killed_overwrite(out)
    (out / written).write_text(f"new {written}")
    loop._recover_replaced(out)
    assert not replaced.exists()
    assert (out / written).read_text() == f"new {written}"
    assert (out / "config.yaml").read_text() == "new config.yaml"


def test_a_fresh_start_after_a_killed_overwrite_finds_the_previous_run_in_place(tmp_path):
    """After an --overwrite killed in its start checks, a new run without --resume or
    --overwrite is refused (the directory holds a run) and leaves the previous run back in place,
    not hidden. (Mutation: the recovery only on --resume.)"""
    from _train_fixtures import tiny_config

    import surrogate_md.train.loop as loop
    from surrogate_md.errors import ConfigError
    from surrogate_md.train import train

    out = tmp_path / "run"
    replaced = _killed_overwrite(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(tmp_path / "data.h5"), out)
    assert not replaced.exists()
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: f"old {n}"
                                                              for n in loop.RUN_FILES}


# -- integrations.ase_dynamics: save_state / load_state ------------------------------------------
def _ase_atoms(positions):
    from ase.io import read

    atoms = read(str(PDB))
    atoms.set_positions(positions)
    return atoms


def test_ase_state_keeps_the_fallback_count_and_velocities_in_their_units(tmp_path, caplog):
    """Every jump of a NaN-weight model falls back to MD: after 2 steps, 2 fallbacks. A
    dynamics loading the state onto a copy of the same atoms has the same counts, and no
    warning that its velocities differ from the saved ones (they are the same). (Mutations:
    n_fallbacks not restored; the velocities saved in ASE units, not Å/ps.)"""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from integrations.ase_dynamics import SurrogateDynamics

    broken = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "nan.pt", selection="heavy",
                                            model="egnn", model_config=small_egnn_config(),
                                            break_weights=True))

    def build(atoms):
        atoms.calc = EMT()
        md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        return SurrogateDynamics(atoms, broken, guards="fallback", fallback_dynamics=md)

    atoms = _ase_atoms(cached_md()["frames"][0])
    thermalize_momenta(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    first = build(atoms)
    first.run(2)
    assert first.n_fallbacks == 2 and first.n_jumps == 0
    first.save_state(tmp_path / "s.npz")
    again = build(first.atoms.copy())
    with caplog.at_level(logging.WARNING, logger="integrations.ase_dynamics"):
        again.load_state(tmp_path / "s.npz")
    assert "velocities differ" not in caplog.text
    for dyn in (first, again):
        assert (dyn.nsteps, dyn.n_jumps, dyn.n_fallbacks, dyn.n_history_md) == (2, 0, 2, 0)
    assert again.guards.summary() == first.guards.summary()


def test_ase_state_applies_to_the_same_atoms_wrapped_and_rounded(tmp_path, heavy):
    """A periodic box (40 Å) with the molecule across its corner: the state applies to the same
    atoms after ``atoms.wrap()`` (whole box vectors apart: minimum image) and written to 3
    decimals as a PDB does (at most 0.87 mÅ away, within the 1e-3 Å tolerance). (Mutations: no
    minimum image; a tolerance below the PDB's rounding.)"""
    from integrations.ase_dynamics import SurrogateDynamics

    x = cached_md()["frames"][0]
    atoms = _ase_atoms(x - x.mean(axis=0))  # half the atoms at negative coordinates
    atoms.cell, atoms.pbc = [40.0, 40.0, 40.0], True
    first = SurrogateDynamics(atoms, heavy, guards="warn")
    first.run(2)
    first.save_state(tmp_path / "s.npz")

    wrapped = first.atoms.copy()
    wrapped.wrap()
    assert np.abs(wrapped.positions - first.atoms.positions).max() > 30.0
    wrapped.positions = np.round(wrapped.positions, 3)
    again = SurrogateDynamics(wrapped, heavy, guards="warn")
    again.load_state(tmp_path / "s.npz")
    assert again.nsteps == 2 and again.n_jumps == first.n_jumps == 2


# -- integrations.openmm_simulation: restarts inside and around hybrid cycles ----------------------
class StepRecorder:
    """A reporter every ``interval`` steps recording the step it reports at."""

    def __init__(self, interval: int) -> None:
        self.interval, self.steps = interval, []

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": []}

    def report(self, simulation, state) -> None:
        self.steps.append(simulation.currentStep)


def _state(sim):
    s = sim.context.getState(positions=True, velocities=True)
    return (s.getTime().value_in_unit(unit.picosecond),
            np.asarray(s.getPositions(asNumpy=True).value_in_unit(unit.angstrom)),
            np.asarray(s.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.picosecond)))


def _extra(chk) -> dict:
    with np.load(f"{chk}.surrogate.npz") as data:
        return json.loads(str(data["extra"]))


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, heavy):
    """Hybrid run (10 MD steps, then a 0.02 ps jump with frames at steps 5 and 10 of it: a
    20-step cycle) for 3 cycles, with a StepRecorder every 7 steps and CheckpointReporters
    every 15, 20 and 45 steps, and a checkpoint the user saves after the second step()."""
    from integrations.openmm_simulation import SurrogateSimulation

    d = tmp_path_factory.mktemp("hybrid")
    top, system, positions = alanine_system()

    def build(md_steps: int = 10, checkpoints: bool = False):
        sim = SurrogateSimulation(top, system, heavy, platform=reference_platform(),
                                  md_steps=md_steps, guards="warn")
        recorder = StepRecorder(7)
        sim.reporters.append(recorder)
        if checkpoints:
            sim.reporters += [app.CheckpointReporter(str(d / f"every{k}.chk"), k)
                              for k in (15, 20, 45)]
        return sim, recorder

    sim, recorder = build(checkpoints=True)
    assert list(sim.steps_per_frame) == [5, 10]
    cold_start(sim.context, positions)
    sim.integrator.setRandomNumberSeed(3)
    sim.step(1)
    for suffix in ("", ".surrogate.npz"):
        shutil.copy(d / f"every15.chk{suffix}", d / f"step15.chk{suffix}")
        shutil.copy(d / f"every20.chk{suffix}", d / f"step20.chk{suffix}")
    sim.step(1)
    sim.saveCheckpoint(str(d / "user40.chk"))
    sim.step(1)
    assert sim.currentStep == 60 and sim.n_jumps == 3
    return {"dir": d, "build": build, "end": _state(sim), "steps": recorder.steps,
            "n_jumps": sim.n_jumps}


def _same_end(restart, run, name):
    again = _state(restart)
    assert restart.currentStep == 60 and restart.n_jumps == run["n_jumps"], name
    assert again[0] == pytest.approx(run["end"][0], abs=1e-9), name
    np.testing.assert_allclose(again[1], run["end"][1], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(again[2], run["end"][2], atol=1e-6, err_msg=name)


def test_checkpoint_saved_by_hand_after_step_restarts_at_a_cycle_start(hybrid_run):
    """``saveCheckpoint`` called after ``step()`` returned (step 40, between cycles) records no
    place in a cycle; a restart from it runs the next whole cycle and ends where the run did.
    (Mutation: the cycle bookkeeping not cleared when step() ends: the checkpoint said the MD
    segment was done and the restart skipped it, ending at step 50.)"""
    d = hybrid_run["dir"]
    assert _extra(d / "user40.chk")["cycle"] is None
    restart, _ = hybrid_run["build"]()
    restart.loadCheckpoint(str(d / "user40.chk"))
    restart.step(1)
    _same_end(restart, hybrid_run, "user40")


def test_restart_inside_a_jump_reports_as_the_run_did_and_can_be_saved_again(hybrid_run):
    """From the checkpoint at step 15 (the first jump's intermediate frame): a reporter every 7
    steps reports at the steps the uninterrupted run reported at after 15 (21, 28, 35, ...; not
    at 20), and a checkpoint saved right after loading, before any step, still holds the rest
    of the jump: a restart from it ends where the run did. (Mutations: the reports due counted
    from the jump's start, not the frame resumed at, adding a report at 20; a checkpoint of a
    loaded, not yet stepped state saved without its place in the cycle.)"""
    d = hybrid_run["dir"]
    restart, recorder = hybrid_run["build"]()
    restart.loadCheckpoint(str(d / "step15.chk"))
    restart.saveCheckpoint(str(d / "resaved15.chk"))
    restart.step(3)
    _same_end(restart, hybrid_run, "step15")
    assert recorder.steps == [s for s in hybrid_run["steps"] if s > 15]
    assert _extra(d / "resaved15.chk")["cycle"] == _extra(d / "step15.chk")["cycle"]
    again, _ = hybrid_run["build"]()
    again.loadCheckpoint(str(d / "resaved15.chk"))
    again.step(3)
    _same_end(again, hybrid_run, "resaved15")


def test_checkpoint_at_a_jump_end_has_no_md_behind_it(hybrid_run):
    """The state at a jump's end (step 20) is the surrogate's: no real MD since it, one jump
    done; a restart from it goes on as the run did. (Mutation: the MD time of the segment before
    the jump, 0.02 ps, saved with it: the restart took the next MD energies for long real MD.)"""
    d = hybrid_run["dir"]
    extra = _extra(d / "step20.chk")
    assert extra["md_ps"] == 0.0 and extra["n_jumps"] == 1 and extra["cycle"] is None
    restart, _ = hybrid_run["build"]()
    restart.loadCheckpoint(str(d / "step20.chk"))
    assert restart._md_ps == 0.0
    restart.step(2)
    _same_end(restart, hybrid_run, "step20")


def test_restart_inside_a_segment_with_other_md_steps_starts_a_new_segment(hybrid_run, caplog):
    """The checkpoint at step 45 is 5 steps into a 10-step MD segment; a simulation of 20-step
    segments warns and runs a whole new segment: 45 + 20 MD steps + a 10-step jump = step 75.
    (Mutation: the place taken anyway: 15 more MD steps, step 70.)"""
    d = hybrid_run["dir"]
    assert _extra(d / "every45.chk")["cycle"] == {"in": "md", "md_steps": 10, "md_done": 5}
    restart, _ = hybrid_run["build"](md_steps=20)
    with caplog.at_level(logging.WARNING, logger="integrations.openmm_simulation"):
        restart.loadCheckpoint(str(d / "every45.chk"))
    assert "starts a new segment" in caplog.text
    restart.step(1)
    assert restart.currentStep == 75


def test_checkpoint_at_a_fallback_end_counts_no_jump(tmp_path):
    """Jump-step mode, a NaN-weight model whose every jump falls back to MD, a checkpoint after
    every step: after 2 steps the checkpoint says 0 jumps and 2 fallbacks, and a restart from
    it has those counts. (Mutation: a fallback's end counted as a jump's.)"""
    from integrations.openmm_simulation import SurrogateSimulation

    broken = Surrogate.load(make_checkpoint(cached_md(), tmp_path / "nan.pt", model="egnn",
                                            model_config=small_egnn_config(),
                                            break_weights=True))
    top, system, positions = alanine_system()

    def build():
        return SurrogateSimulation(top, system, broken, platform=reference_platform(),
                                   guards="fallback")

    sim = build()
    cold_start(sim.context, positions)
    chk = tmp_path / "every1.chk"
    sim.reporters.append(app.CheckpointReporter(str(chk), 1))
    sim.step(2)
    assert (sim.n_jumps, sim.n_fallbacks) == (0, 2)
    extra = _extra(chk)
    assert (extra["n_jumps"], extra["n_fallbacks"]) == (0, 2)
    restart = build()
    restart.loadCheckpoint(str(chk))
    assert (restart.n_jumps, restart.n_fallbacks) == (0, 2)


# -- datagen.runs.plan_run ------------------------------------------------------------------------
@pytest.mark.parametrize("left", ["partial", "checkpoint"])
def test_a_lone_leftover_of_an_older_run_is_removed_not_refused(tmp_path, left):
    """Only a ``.partial`` (killed before its first checkpoint: nothing to resume) or only a
    checkpoint: a fresh run starts and removes it; only both together are an unfinished run
    that needs --resume or --overwrite. (Mutation: either one alone refused.)"""
    from datagen.runs import CHECKPOINT_SUFFIX, plan_run
    from surrogate_md.data.h5md import PARTIAL_SUFFIX

    out = tmp_path / "r.h5"
    path = tmp_path / ("r.h5" + (PARTIAL_SUFFIX if left == "partial" else CHECKPOINT_SUFFIX))
    path.write_bytes(b"leftover")
    state, _, _ = plan_run(out, {}, (), resume=False, overwrite=False)
    assert state == "fresh" and not path.exists()


# -- surrogate_md.evaluate.core._velocity_warnings ----------------------------------------------
@pytest.mark.parametrize(("trained", "here", "warned"), [
    (("finite_difference", 0.02), ("finite_difference", 0.019999998), False),  # float32 stamps
    (("finite_difference", 0.02), ("finite_difference", 0.021), True),  # 21 fs vs 20 fs: 5 %
    (("file", 0.02), ("file", 0.04), False),  # stored velocities do not depend on the interval
])
def test_velocity_interval_warnings(trained, here, warned):
    """Finite-difference velocities over a 5 % longer interval are other velocities (a warning);
    a float32 time stamp of the same interval, or stored velocities at another interval, are
    not. (Mutations: the relative tolerance loosened from 1e-4 to 0.1; the interval compared
    for stored velocities too.)"""
    from types import SimpleNamespace

    from surrogate_md.evaluate.core import _velocity_warnings

    sur = SimpleNamespace(meta={"protocol": {"velocity_source": trained[0],
                                             "interval_ps": trained[1]}})
    prepared = SimpleNamespace(velocity_source=here[0], interval_ps=here[1])
    warnings = _velocity_warnings(sur, prepared, ["data.h5"])
    assert bool(warnings) == warned, warnings
