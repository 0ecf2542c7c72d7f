"""Built-in systems shipped as package data, with the simulation conditions they default to.

Layout::

    datagen/systems/
        alanine-dipeptide.pdb    ACE-ALA-NME (tleap, ff14SB names), for amber14-all.xml
        adk.pdb                  adenylate kinase, open state, 3341 atoms with hydrogens
        md17/NAME.prmtop/.inpcrd GAFF2 + AM1-BCC parameters of the eight MD17 molecules
        md17/charges.json        charge method, SMILES and embedding per MD17 molecule
        build_proteins.py        regenerates the two PDB files
        build_md17.py            regenerates md17/ (needs the [amber] extra)

``BUILTIN_SYSTEMS`` is the only list of names: the CLI choices and the tests read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
MD17_MOLECULES = ("aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic",
                  "toluene", "uracil")


@dataclass(frozen=True)
class BuiltinSystem:
    """A shipped system and the conditions ``run_openmm`` uses unless told otherwise.

    Attributes:
        name: registry key.
        files: package-data file names (a PDB, or a prmtop and an inpcrd).
        kind: ``"pdb"`` (parametrised with ``forcefield``) or ``"amber"`` (prmtop/inpcrd).
        forcefield: OpenMM force-field XML files for ``kind="pdb"``; a label for ``"amber"``.
        solvent: ``"vacuum"`` or ``"implicit"`` (OBC2 GB with OpenMM's native GBSAOBCForce).
        temperature_K, step_fs, interval_ps: thermostat target, integrator step, saved interval.
        integrator: ``"nose-hoover"`` (gas-phase molecules) or ``"langevin"``.
        constraints: ``None`` or ``"HBonds"``.
        equilibrate_ps: MD run after minimisation, before the first saved frame.
    """

    name: str
    files: tuple[str, ...]
    kind: str
    forcefield: tuple[str, ...]
    solvent: str
    temperature_K: float
    step_fs: float
    interval_ps: float
    integrator: str
    constraints: str | None
    equilibrate_ps: float
    description: str

    def paths(self) -> tuple[Path, ...]:
        return tuple(HERE / f for f in self.files)


def _md17(name: str) -> BuiltinSystem:
    # MD17 conditions: vacuum, 500 K, 0.5 fs, every step saved, no constraints.
    return BuiltinSystem(
        name=name, files=(f"md17/{name}.prmtop", f"md17/{name}.inpcrd"), kind="amber",
        forcefield=("GAFF2",), solvent="vacuum", temperature_K=500.0, step_fs=0.5,
        interval_ps=0.0005, integrator="nose-hoover", constraints=None, equilibrate_ps=1.0,
        description=f"MD17 {name}, GAFF2 ({md17_charge_method(name)} charges), vacuum")


BUILTIN_SYSTEMS: dict[str, BuiltinSystem] = {
    "alanine-dipeptide": BuiltinSystem(
        name="alanine-dipeptide", files=("alanine-dipeptide.pdb",), kind="pdb",
        forcefield=("amber14-all.xml",), solvent="vacuum", temperature_K=300.0, step_fs=2.0,
        interval_ps=0.1, integrator="nose-hoover", constraints="HBonds", equilibrate_ps=10.0,
        description="ACE-ALA-NME, amber14 (ff14SB)"),
    "adk": BuiltinSystem(
        name="adk", files=("adk.pdb",), kind="pdb", forcefield=("amber14-all.xml",),
        solvent="implicit", temperature_K=300.0, step_fs=2.0, interval_ps=1.0,
        integrator="langevin", constraints="HBonds", equilibrate_ps=10.0,
        description="adenylate kinase (open), amber14 + OBC2 implicit solvent"),
}


@cache
def md17_charge_method(name: str) -> str:
    """Charge method recorded by ``build_md17.py`` for an MD17 molecule (e.g. ``"AM1-BCC"``)."""
    record = HERE / "md17" / "charges.json"
    if not record.exists():
        return "unknown"
    return json.loads(record.read_text()).get(name, {}).get("charge_method", "unknown")


for _name in MD17_MOLECULES:
    BUILTIN_SYSTEMS[_name] = _md17(_name)
del _name
