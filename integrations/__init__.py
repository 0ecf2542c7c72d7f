"""integrations: trained surrogates inside the engines people already run.

- :class:`integrations.openmm_simulation.SurrogateSimulation` - an OpenMM ``Simulation``
  look-alike whose ``step`` takes learned jumps (stock reporters work unchanged);
  :class:`~integrations.openmm_simulation.SurrogateJumpReporter` for an unchanged ``Simulation``.
- :class:`integrations.ase_dynamics.SurrogateDynamics` - an ASE ``MolecularDynamics``.
- :mod:`integrations.guards` - checks after every jump; :mod:`integrations.reconstruct` - atoms a
  partial model does not predict; :class:`integrations.writers.TrajectoryObserver` - XTC/DCD from
  ASE runs; ``python -m integrations.predict`` - the command line, whose signals and
  ``--resume`` checkpoints :mod:`integrations.run_control` handles.

Names are imported lazily so ``import integrations`` does not pull in OpenMM or ASE.
"""

from __future__ import annotations

_EXPORTS = {
    "SurrogateSimulation": "integrations.openmm_simulation",
    "SurrogateJumpReporter": "integrations.openmm_simulation",
    "SurrogateDynamics": "integrations.ase_dynamics",
    "GuardConfig": "integrations.guards",
    "Guards": "integrations.guards",
    "Reconstructor": "integrations.reconstruct",
    "TrajectoryObserver": "integrations.writers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
