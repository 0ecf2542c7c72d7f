"""surrogate-md: learned SE(3)-equivariant trajectory operators for molecular dynamics.

Units inside the package: Å, ps, amu, kJ/mol (velocities Å/ps).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Surrogate", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import surrogate_md` stays cheap and never pulls torch for data-only use.
    if name == "Surrogate":
        from surrogate_md.surrogate import Surrogate

        return Surrogate
    raise AttributeError(name)
