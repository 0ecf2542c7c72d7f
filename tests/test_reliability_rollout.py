"""A long rollout of a tiny trained model through SurrogateSimulation with guards on.

1000 learned jumps of alanine dipeptide (egnn trained here for a few seconds on real MD) with the
``fallback`` guard: the XTC written by OpenMM's stock XTCReporter never holds a non-finite frame,
keeps a true time axis, and every guard event appears once in the log and once in the summary.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from _integration_fixtures import PDB, alanine_system, cold_start, reference_platform
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config
from openmm import app

from integrations.guards import GuardConfig
from integrations.openmm_simulation import SurrogateSimulation
from surrogate_md import Surrogate
from surrogate_md.train import train

N_JUMPS = 1000


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (measured: a jump
    of this 22-atom model takes ~6x longer with two threads under load than with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    ala = cached(tmp_path_factory, "ala", make_alanine_dipeptide)
    cfg = tiny_config(ala, "egnn", train={"epochs": 2, "max_steps_per_epoch": 6},
                      data={"n_out": 2, "jump_ps": 0.2})
    cfg["model"].update({"hidden": 8, "n_layers": 1, "time_dim": 4})
    return train(cfg, tmp_path_factory.mktemp("rollout") / "run")


@pytest.mark.slow
def test_thousand_jump_rollout_with_fallback_guards(trained, tmp_path, caplog):
    surrogate = Surrogate.load(trained)
    top, system, positions = alanine_system()
    # a tight bond tolerance makes the guard fire on a share of the jumps of this barely trained
    # model, so both paths (accepted jump, MD fallback) run many times
    guards = GuardConfig(action="fallback", bond_tolerance_A=0.08, temperature_K=300.0)
    sim = SurrogateSimulation(top, system, surrogate, platform=reference_platform(),
                              guards=guards, temperature_K=300.0)
    cold_start(sim.context, positions, temperature_K=300.0)
    out = tmp_path / "rollout.xtc"
    sim.reporters.append(app.XTCReporter(str(out), 1))
    with caplog.at_level(logging.DEBUG, logger="integrations.guards"):  # events after the
        sim.step(N_JUMPS)                                                # first ones: DEBUG
    logged = [r for r in caplog.records if r.name == "integrations.guards"
              and r.getMessage().startswith("guard:") and " -> " in r.getMessage()]
    summary = sim.summary()
    failures = summary["guards"]["failures"]
    assert summary["jumps"] + summary["fallbacks"] == N_JUMPS
    assert summary["guards"]["jumps_checked"] >= N_JUMPS
    assert sum(failures.values()) == len(logged) > 0
    assert summary["fallbacks"] == summary["guards"]["actions"].get("fallback", 0) > 0
    assert summary["jumps"] > 0  # the model is used, not only MD
    for check, count in failures.items():
        assert count == sum(f": {check} " in r.getMessage() for r in logged)

    import MDAnalysis as mda

    u = mda.Universe(str(PDB), str(out))
    assert len(u.trajectory) == N_JUMPS
    x = np.stack([ts.positions.copy() for ts in u.trajectory])
    assert np.isfinite(x).all()
    times = np.array([ts.time for ts in u.trajectory])
    np.testing.assert_allclose(times, np.arange(1, N_JUMPS + 1) * surrogate.jump_ps, rtol=1e-5)
    # the molecule stays a molecule: every bond of the final frame has a physical length
    bonds = np.array([(b[0].index, b[1].index) for b in top.bonds()])
    lengths = np.linalg.norm(x[-1, bonds[:, 0]] - x[-1, bonds[:, 1]], axis=1)
    assert lengths.min() > 0.8 and lengths.max() < 2.0
