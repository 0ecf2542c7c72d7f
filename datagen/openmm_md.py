"""Produce MD datasets with OpenMM: built-in systems, user PDB / Amber / System-XML inputs.

Every saved frame holds positions (Å), velocities (Å/ps), forces (kJ/mol/Å) and the potential
energy (kJ/mol), at exact times ``frame * interval_ps``. Long runs checkpoint (an OpenMM context
checkpoint plus the ``.partial`` dataset, every ``checkpoint_frames`` frames) so that a killed run
resumes where it stopped with ``resume=True`` and a continuous time axis.

Thermostats: gas-phase molecules start with zero total linear and angular momentum and default to
OpenMM's ``NoseHooverIntegrator``, which rescales velocities uniformly and so keeps both zero;
proteins in implicit solvent default to ``LangevinMiddleIntegrator`` (whose velocities are the
half-step, leapfrog ones). Langevin on a gas-phase molecule makes it drift and tumble: see the
design notes before choosing it for MD17-like data.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.interrupts import raise_if_interrupted
from datagen.runs import frame_steps, plan_run
from datagen.systems import BUILTIN_SYSTEMS, BuiltinSystem, md17_charge_method
from surrogate_md.data.h5md import Topology, TrajectoryWriter
from surrogate_md.errors import CheckpointError, ConfigError, DataError, DeviceError, EngineError

log = logging.getLogger(__name__)

SOLVENTS = ("vacuum", "implicit", "explicit")
INTEGRATORS = ("langevin", "nose-hoover")
PLATFORMS = ("auto", "Reference", "CPU", "CUDA", "OpenCL")
#: Below this many atoms without periodic boundaries, OpenMM's Reference platform outruns the CPU
#: platform (measured: alanine dipeptide in OBC2 runs 8x faster on Reference).
REFERENCE_MAX_ATOMS = 200
#: Hydrogen mass with ``hmr=True`` (Hopkins et al., JCTC 2015), for 4 fs steps.
HMR_HYDROGEN_MASS_AMU = 3.0
HMR_STEP_FS = 4.0
#: Nose-Hoover chain collision frequency (1/ps) and Langevin friction default (1/ps).
NOSE_HOOVER_COLLISION_PER_PS = 10.0
DEFAULT_FRICTION_PER_PS = 1.0
PROTEIN_FORCEFIELD = ("amber14-all.xml",)
EXPLICIT_WATER_FORCEFIELD = "amber14/tip3p.xml"
EXPLICIT_CUTOFF_NM = 1.0
#: Metadata entries that must agree between an interrupted run and its resumption.
RESUME_KEYS = ("system", "solvent", "force_field", "temperature_K", "step_fs", "interval_ps",
               "seed", "integrator", "friction_per_ps", "hmr", "constraints", "cutoff_nm")


@dataclass
class PreparedSystem:
    """An OpenMM system ready to simulate: ``topology`` (openmm.app), ``system``, ``positions``."""

    topology: Any
    system: Any
    positions: Any
    label: str
    force_field: str
    solvent: str
    source_files: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


# -- building systems -------------------------------------------------------------------------------
def _constraints(name: str | None):
    from openmm import app

    table = {None: None, "none": None, "hbonds": app.HBonds, "allbonds": app.AllBonds,
             "hangles": app.HAngles}
    key = None if name is None else str(name).lower()
    if key not in table:
        raise ConfigError(f"constraints={name!r} is not one of None, HBonds, AllBonds, HAngles")
    return table[key]


def _add_native_obc2(system, topology) -> None:
    """Add OBC2 generalized Born as OpenMM's native ``GBSAOBCForce`` (not a CustomGBForce).

    Radii (mbondi2) and screening factors are OpenMM's own standard OBC2 parameters, the ones its
    Amber loader uses; charges come from the system's NonbondedForce.
    """
    import openmm as mm
    from openmm.app.internal.customgbforces import GBSAOBC2Force

    nonbonded = next(f for f in system.getForces() if isinstance(f, mm.NonbondedForce))
    params = GBSAOBC2Force.getStandardParameters(topology)
    gb = mm.GBSAOBCForce()
    gb.setNonbondedMethod(mm.GBSAOBCForce.NoCutoff)
    for i in range(system.getNumParticles()):
        charge = nonbonded.getParticleParameters(i)[0]
        gb.addParticle(charge, float(params[i][0]), float(params[i][1]))
    system.addForce(gb)


def _require_water(topology, source: Path) -> None:
    """Explicit solvent needs water in the structure (a box alone is a periodic vacuum)."""
    from surrogate_md.data.selection import WATER_RESIDUES

    if not any(r.name.upper() in WATER_RESIDUES for r in topology.residues()):
        raise ConfigError(f"{source}: solvent='explicit' but the structure holds no water; "
                          "solvate it first (openmm.app.Modeller.addSolvent) or use "
                          "solvent='implicit'")


def _from_pdb(pdb_path: Path, forcefield: tuple[str, ...], solvent: str, constraints,
              hydrogen_mass) -> tuple[Any, Any, Any, list[str]]:
    """(topology, System, positions, force-field files used) of a PDB/PDBx structure."""
    from openmm import app, unit

    try:
        pdb = app.PDBxFile(str(pdb_path)) if pdb_path.suffix.lower() in (".cif", ".pdbx") \
            else app.PDBFile(str(pdb_path))
    except Exception as exc:  # OpenMM's readers raise bare Exceptions
        raise DataError(f"{pdb_path}: unreadable structure file ({exc}); give a PDB or PDBx/mmCIF"
                        " file") from exc
    files = list(forcefield)
    if solvent == "explicit" and EXPLICIT_WATER_FORCEFIELD not in files and \
            files == list(PROTEIN_FORCEFIELD):
        files.append(EXPLICIT_WATER_FORCEFIELD)
    try:
        ff = app.ForceField(*files)
    except Exception as exc:
        raise ConfigError(f"force field {files}: cannot load ({exc}); give OpenMM force-field XML "
                          "files such as amber14-all.xml") from exc
    kwargs = {"constraints": constraints, "hydrogenMass": hydrogen_mass}
    if solvent == "explicit":
        if pdb.topology.getPeriodicBoxVectors() is None:
            raise ConfigError(f"{pdb_path}: solvent='explicit' needs a periodic box (CRYST1); "
                              "solvate the system first or use solvent='implicit'")
        _require_water(pdb.topology, pdb_path)
        kwargs.update(nonbondedMethod=app.PME,
                      nonbondedCutoff=EXPLICIT_CUTOFF_NM * unit.nanometer)
    else:
        kwargs.update(nonbondedMethod=app.NoCutoff)
    try:
        system = ff.createSystem(pdb.topology, **kwargs)
    except Exception as exc:
        raise EngineError(f"{pdb_path}: the force field {files} cannot parametrise it ({exc}); "
                          "add missing hydrogens/caps (PDBFixer, Modeller.addHydrogens) or choose "
                          "a force field that covers every residue") from exc
    given = _solvent_of(system)  # force-field files may bring their own GB (implicit/*.xml)
    if solvent == "implicit" and given == "vacuum":
        _add_native_obc2(system, pdb.topology)
    elif solvent == "vacuum" and given == "implicit":
        raise ConfigError(f"force field {files} includes implicit solvent, but solvent='vacuum'; "
                          "use solvent='implicit' (which then adds no second GB model) or drop "
                          "the implicit/*.xml file")
    return pdb.topology, system, pdb.positions, files


def _from_amber(prmtop: Path, inpcrd: Path, solvent: str, constraints,
                hydrogen_mass) -> tuple[Any, Any, Any]:
    from openmm import app, unit

    try:
        top = app.AmberPrmtopFile(str(prmtop))
        crd = app.AmberInpcrdFile(str(inpcrd))
    except Exception as exc:
        raise DataError(f"{prmtop}: unreadable Amber prmtop/inpcrd pair ({exc}); give a prmtop "
                        "and its inpcrd/rst7") from exc
    kwargs: dict[str, Any] = {"constraints": constraints, "hydrogenMass": hydrogen_mass}
    if solvent == "explicit":
        if crd.boxVectors is None:
            raise ConfigError(f"{inpcrd}: solvent='explicit' needs a periodic box")
        _require_water(top.topology, prmtop)
        kwargs.update(nonbondedMethod=app.PME,
                      nonbondedCutoff=EXPLICIT_CUTOFF_NM * unit.nanometer)
    else:
        kwargs.update(nonbondedMethod=app.NoCutoff)
        if solvent == "implicit":
            kwargs["implicitSolvent"] = app.OBC2  # native GBSAOBCForce when there is no salt
    try:
        system = top.createSystem(**kwargs)
    except Exception as exc:
        raise EngineError(f"{prmtop}: OpenMM cannot build the system ({exc})") from exc
    topology = top.topology
    if len(crd.positions) != topology.getNumAtoms():
        raise DataError(f"{inpcrd}: holds {len(crd.positions)} atoms but {prmtop} has "
                        f"{topology.getNumAtoms()}; give the coordinates that belong to this "
                        "prmtop (CLI: --coordinates)")
    if crd.boxVectors is not None:
        topology.setPeriodicBoxVectors(crd.boxVectors)
    return topology, system, crd.positions


def _from_xml(xml: Path, pdb_path: Path | None) -> tuple[Any, Any, Any]:
    import openmm as mm
    from openmm import app

    if pdb_path is None:
        raise ConfigError(f"{xml}: a serialized System needs a PDB for the topology and positions;"
                          " pass coordinates=PDB (CLI: --coordinates PDB)")
    try:
        system = mm.XmlSerializer.deserialize(xml.read_text())
    except Exception as exc:
        raise DataError(f"{xml}: not a serialized OpenMM System ({exc}); write one with "
                        "openmm.XmlSerializer.serialize(system)") from exc
    if not isinstance(system, mm.System):
        raise DataError(f"{xml}: holds a {type(system).__name__}, not a System")
    try:
        pdb = app.PDBxFile(str(pdb_path)) if pdb_path.suffix.lower() in (".cif", ".pdbx") \
            else app.PDBFile(str(pdb_path))
    except Exception as exc:  # OpenMM's readers raise bare Exceptions (IndexError on junk)
        raise DataError(f"{pdb_path}: unreadable coordinates for the System in {xml} "
                        f"({type(exc).__name__}: {exc}); give the PDB (or PDBx/mmCIF) file the "
                        "System was built from") from exc
    if pdb.topology.getNumAtoms() != system.getNumParticles():
        raise DataError(f"{xml}: the System has {system.getNumParticles()} particles but "
                        f"{pdb_path} has {pdb.topology.getNumAtoms()} atoms; give the PDB the "
                        "System was built from")
    if system.usesPeriodicBoundaryConditions() and pdb.topology.getPeriodicBoxVectors() is None:
        # no CRYST1: the run uses the System's own box, so record that one in the dataset
        pdb.topology.setPeriodicBoxVectors(system.getDefaultPeriodicBoxVectors())
    return pdb.topology, system, pdb.positions


def _solvent_of(system) -> str:
    """``explicit``, ``implicit`` or ``vacuum``: what a built ``system`` models."""
    import openmm as mm

    if system.usesPeriodicBoundaryConditions():
        return "explicit"
    gb = (mm.GBSAOBCForce, mm.CustomGBForce) + ((mm.GBVIForce,) if hasattr(mm, "GBVIForce")
                                                 else ())
    return "implicit" if any(isinstance(f, gb) for f in system.getForces()) else "vacuum"


def _refuse_xml_settings(xml: Path, *, hmr: bool, constraints: str | None = "default",
                         solvent: str | None = None) -> None:
    """A serialized System fixes its masses, constraints and solvent: refuse settings for them.

    ``constraints="default"`` and ``solvent=None`` mean "not given".
    """
    given = []
    if hmr:
        given.append("hmr (--hmr)")
    if constraints != "default":
        given.append(f"constraints={constraints!r} (--constraints)")
    if solvent is not None:
        given.append(f"solvent={solvent!r} (--solvent)")
    if given:
        raise ConfigError(
            f"{xml}: a serialized System already fixes its particle masses, constraints and "
            f"solvent model, so {', '.join(given)} cannot be applied to it; drop "
            f"{'these options' if len(given) > 1 else 'this option'}, or re-create the System "
            "with those settings (ForceField.createSystem(..., hydrogenMass=3*amu, "
            "constraints=HBonds), then XmlSerializer.serialize) or pass the PDB/prmtop itself "
            "as the system")


def apply_cutoff(system, cutoff_nm: float) -> None:
    """Switch a non-periodic ``system``'s Coulomb/LJ and native GB forces to ``CutoffNonPeriodic``.

    Without a cutoff, Coulomb and generalized Born cost O(N^2) per step: AdK (3341 atoms, OBC2)
    runs at 0.135 s per step on two CPU cores with no cutoff and 0.044 s with 1.2 nm. Beyond the
    cutoff, Coulomb becomes a reaction field with dielectric 1 (as OpenMM's own builders set it
    next to GB, which already screens the charges; 1 is also the gas-phase value). Measured on
    AdK at 1.2 nm: RMS force error 11 kJ/mol/nm against the exact sums (RMS force 541).

    Only ``NonbondedForce`` and the native ``GBSAOBCForce`` are switched: custom GB and
    nonbonded forces carry their cutoff inside their energy expressions, set when they are built,
    so a system with one of them must be built with a cutoff in ``createSystem`` instead.
    """
    import openmm as mm

    if not (cutoff_nm > 0 and math.isfinite(cutoff_nm)):
        raise ConfigError(f"cutoff_nm={cutoff_nm} must be a positive distance in nm")
    if system.usesPeriodicBoundaryConditions():
        raise ConfigError("cutoff_nm applies to non-periodic (vacuum/implicit) systems; this one is "
                          "periodic and keeps its own cutoff: drop cutoff_nm (--cutoff-nm)")
    for force in system.getForces():
        if isinstance(force, mm.NonbondedForce):
            force.setNonbondedMethod(mm.NonbondedForce.CutoffNonPeriodic)
            force.setCutoffDistance(cutoff_nm)
            force.setReactionFieldDielectric(1.0)
        elif isinstance(force, mm.GBSAOBCForce):
            force.setNonbondedMethod(mm.GBSAOBCForce.CutoffNonPeriodic)
            force.setCutoffDistance(cutoff_nm)
        elif hasattr(force, "getNonbondedMethod"):
            raise ConfigError(f"cutoff_nm cannot be applied to a {type(force).__name__} after the "
                              "system is built (its cutoff is part of its energy expression); "
                              "build the system with nonbondedMethod=CutoffNonPeriodic in "
                              "createSystem, or drop cutoff_nm")


def prepare_system(system: str | os.PathLike, *, solvent: str = "vacuum",
                   forcefield: tuple[str, ...] | list[str] | str | None = None,
                   constraints: str | None = "HBonds", hmr: bool = False,
                   coordinates: str | os.PathLike | None = None,
                   cutoff_nm: float | None = None) -> PreparedSystem:
    """Build an OpenMM ``System`` from a built-in name or a user file.

    Args:
        system: a name in ``BUILTIN_SYSTEMS``, a PDB/PDBx file, an Amber prmtop (coordinates from
            ``coordinates`` or a sibling ``.inpcrd``/``.rst7``), or a serialized System XML (with
            ``coordinates`` = the PDB it was built from).
        solvent: ``vacuum`` (no cutoff), ``implicit`` (OBC2 GB, native GBSAOBCForce) or
            ``explicit`` (PME; the input must be solvated and carry a box).
        forcefield: OpenMM force-field XML files for PDB inputs (default amber14-all.xml).
        constraints: ``None``, ``"HBonds"``, ``"AllBonds"`` or ``"HAngles"``.
        hmr: hydrogen mass repartitioning (H mass ``HMR_HYDROGEN_MASS_AMU``); refused for a
            System XML, whose masses are fixed (as are its constraints and solvent: the
            ``solvent`` of the result is read from the System, ``constraints`` ignored).
        cutoff_nm: nonbonded/GB cutoff for vacuum or implicit solvent (default: none, exact).
    """
    prepared = _prepare_system(system, solvent=solvent, forcefield=forcefield,
                               constraints=constraints, hmr=hmr, coordinates=coordinates)
    if cutoff_nm is not None:
        apply_cutoff(prepared.system, cutoff_nm)
        prepared.extra["cutoff_nm"] = float(cutoff_nm)
    if not prepared.system.usesPeriodicBoundaryConditions():
        # a CRYST1 line (or an inpcrd box) of a structure simulated without periodic boundaries
        # is no box of the run: the dataset records none, and gas-phase runs stay gas-phase
        prepared.topology.setPeriodicBoxVectors(None)
    return prepared


def _prepare_system(system, *, solvent, forcefield, constraints, hmr,
                    coordinates) -> PreparedSystem:
    from openmm import unit

    if solvent not in SOLVENTS:
        raise ConfigError(f"solvent={solvent!r} is not one of {SOLVENTS}")
    cons = _constraints(constraints)
    h_mass = HMR_HYDROGEN_MASS_AMU * unit.amu if hmr else None
    if isinstance(forcefield, str):
        forcefield = (forcefield,)
    name = str(system)
    extra: dict[str, Any] = {}
    if name in BUILTIN_SYSTEMS:
        spec = BUILTIN_SYSTEMS[name]
        paths = spec.paths()
        _refuse_unused(name, coordinates=(coordinates, "a built-in system brings its own "
                                                       "coordinates"),
                       forcefield=(forcefield if spec.kind != "pdb" else None,
                                   "its GAFF2 parameters are part of the shipped prmtop"))
        if spec.kind == "pdb":
            ff = tuple(forcefield) if forcefield else spec.forcefield
            top, sys_, pos, ff = _from_pdb(paths[0], ff, solvent, cons, h_mass)
            ff_label = "+".join(ff)
        else:
            top, sys_, pos = _from_amber(paths[0], paths[1], solvent, cons, h_mass)
            ff_label = "GAFF2"
            extra["charge_method"] = md17_charge_method(name)
        return PreparedSystem(top, sys_, pos, name, ff_label, solvent,
                              [f"datagen/systems/{f}" for f in spec.files], extra)
    path = Path(system)
    if not path.is_file():
        raise ConfigError(f"{path}: neither a built-in system ({', '.join(BUILTIN_SYSTEMS)}) nor "
                          "an existing file; check the name or path")
    suffix = path.suffix.lower()
    coords = Path(coordinates) if coordinates is not None else None
    if coords is not None and not coords.is_file():
        raise DataError(f"{coords}: no such coordinates file; check the path")
    if suffix in (".pdb", ".cif", ".pdbx"):
        _refuse_unused(path, coordinates=(coordinates, "the structure file holds the "
                                                       "coordinates"))
        ff = tuple(forcefield) if forcefield else PROTEIN_FORCEFIELD
        top, sys_, pos, ff = _from_pdb(path, ff, solvent, cons, h_mass)
        return PreparedSystem(top, sys_, pos, path.stem, "+".join(ff), solvent, [str(path)])
    if suffix in (".prmtop", ".parm7"):
        _refuse_unused(path, forcefield=(forcefield, "a prmtop carries its own force field"))
        if coords is None:
            for ext in (".inpcrd", ".rst7", ".crd"):
                if path.with_suffix(ext).is_file():
                    coords = path.with_suffix(ext)
                    break
        if coords is None:
            raise DataError(f"{path}: no coordinates found next to the prmtop; pass "
                            "coordinates=FILE.inpcrd (CLI: --coordinates)")
        top, sys_, pos = _from_amber(path, coords, solvent, cons, h_mass)
        return PreparedSystem(top, sys_, pos, path.stem, "amber prmtop", solvent,
                              [str(path), str(coords)])
    if suffix == ".xml":
        _refuse_xml_settings(path, hmr=hmr)
        _refuse_unused(path, forcefield=(forcefield, "a serialized System is already "
                                                     "parametrised"))
        top, sys_, pos = _from_xml(path, coords)
        return PreparedSystem(top, sys_, pos, path.stem, "serialized System", _solvent_of(sys_),
                              [str(path), str(coords)])
    raise DataError(f"{path}: unknown system file type {suffix!r}; give a PDB/PDBx, an Amber "
                    "prmtop (+ inpcrd) or a serialized System XML (+ PDB)")


def _refuse_unused(source: str | os.PathLike, **options: tuple[Any, str]) -> None:
    """Refuse options that a kind of system input would silently ignore: ``name=(value, why)``
    for each; a value of None or empty is not given."""
    given = [(name, why) for name, (value, why) in options.items() if value]
    if given:
        names = ", ".join(f"--{n} ({why})" for n, why in given)
        raise ConfigError(f"{source}: {names} would be ignored for this input; drop "
                          f"{'it' if len(given) == 1 else 'them'}")


def topology_from_openmm(topology, system) -> Topology:
    """Our :class:`Topology` from an ``openmm.app.Topology`` (masses as the System has them)."""
    from openmm import unit

    atoms = list(topology.atoms())
    z = [a.element.atomic_number if a.element is not None else 0 for a in atoms]
    masses = [system.getParticleMass(i).value_in_unit(unit.amu) for i in range(len(atoms))]
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    segment = chain_segment_ids(topology)
    return Topology(
        atomic_numbers=np.array(z), masses=np.array(masses),
        atom_names=[a.name for a in atoms],
        residue_ids=[int(a.residue.id) if str(a.residue.id).lstrip("-").isdigit()
                     else a.residue.index + 1 for a in atoms],
        residue_names=[a.residue.name for a in atoms],
        bonds=np.array(bonds, dtype=np.int64).reshape(-1, 2),
        segment_ids=[segment[a.residue.chain.index] for a in atoms])


def chain_segment_ids(topology) -> list[str]:
    """One distinct segment id per chain of an ``openmm.app.Topology``, in chain order.

    A chain keeps its id when it is non-blank and unique; a blank or repeated id (PDB files may
    leave the chain column empty, or reuse an id for waters and ions) becomes the chain's
    index, so residues of different chains never share a (segment id, residue number) label.
    """
    ids = [str(c.id).strip() for c in topology.chains()]
    counts = {i: ids.count(i) for i in ids}
    out = [i if i and counts[i] == 1 else str(k) for k, i in enumerate(ids)]
    if len(set(out)) != len(out):  # an index coincides with a kept id: number every chain
        out = [str(k) for k in range(len(ids))]
    return out


# -- running ---------------------------------------------------------------------------------------
def _gpu_properties(platform) -> dict[str, str]:
    """Context properties of a data-producing run: on CUDA and OpenCL, mixed precision (the
    default single precision drifts in long runs) and deterministic force sums (otherwise the
    order of atomic additions, and so the trajectory, changes from run to run); none on CPU and
    Reference, which are deterministic and at least mixed-precise already."""
    if platform.getName() not in ("CUDA", "OpenCL"):
        return {}
    names = set(platform.getPropertyNames())  # OpenCL lacks DeterministicForces in some builds
    wanted = {"Precision": "mixed", "DeterministicForces": "true"}
    return {k: v for k, v in wanted.items() if k in names}


def choose_platform(name: str, n_atoms: int, solvent: str):
    """The OpenMM platform for ``name`` (``auto``: CUDA, else Reference for small non-periodic
    systems, else CPU)."""
    import openmm as mm

    available = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    if name == "auto":
        if "CUDA" in available:
            name = "CUDA"
        elif solvent != "explicit" and n_atoms < REFERENCE_MAX_ATOMS:
            name = "Reference"
        else:
            name = "CPU" if "CPU" in available else "Reference"
    if name not in available:
        err = DeviceError if name in ("CUDA", "OpenCL") else EngineError
        raise err(f"OpenMM platform {name!r} is not available here (have {available}); choose one "
                  "of those or --platform auto")
    return mm.Platform.getPlatformByName(name)


def _hydrogen_mass_amu(topology: Topology) -> float | list[float] | None:
    """The hydrogen mass(es) the System simulates, amu: one value, or the distinct ones (HMR
    leaves water hydrogens light); ``None`` without hydrogens."""
    masses = np.unique(np.round(topology.masses[topology.atomic_numbers == 1], 4))
    if len(masses) == 0:
        return None
    return float(masses[0]) if len(masses) == 1 else [float(m) for m in masses]


def _openmm_seed(seed: int) -> int:
    # OpenMM treats seed 0 as "pick one at random": shift so every user seed is reproducible.
    return int(seed) % (2**31 - 2) + 1


def _kinetic_dof(system, gas_phase: bool) -> int:
    import openmm as mm

    n = sum(1 for i in range(system.getNumParticles()) if system.getParticleMass(i)._value > 0)
    dof = 3 * n - system.getNumConstraints()
    if any(isinstance(f, mm.CMMotionRemover) for f in system.getForces()) or gas_phase:
        dof -= 3
    if gas_phase and n > 2:
        dof -= 3  # total angular momentum is zeroed and stays zero
    return int(dof)


def zero_momenta(positions_A: np.ndarray, velocities: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Velocities with the total linear and angular momentum removed.

    Args:
        positions_A: (N, 3); velocities: (N, 3) (any consistent units); masses: (N,).
    """
    m = masses[:, None]
    total = m.sum()
    v = velocities - (m * velocities).sum(axis=0) / total
    r = positions_A - (m * positions_A).sum(axis=0) / total
    angular = (m * np.cross(r, v)).sum(axis=0)
    inertia = (m[:, 0] * (r * r).sum(axis=1)).sum() * np.eye(3) - (m * r).T @ r
    omega = np.linalg.pinv(inertia) @ angular
    return v - np.cross(omega, r)


def _make_integrator(kind: str, temperature_K: float, step_fs: float, friction_per_ps: float,
                     seed: int, thermostat_K: float):
    import openmm as mm
    from openmm import unit

    step = step_fs * unit.femtosecond
    if kind == "langevin":
        integ = mm.LangevinMiddleIntegrator(temperature_K * unit.kelvin,
                                            friction_per_ps / unit.picosecond, step)
        integ.setRandomNumberSeed(_openmm_seed(seed))
    elif kind == "nose-hoover":
        integ = mm.NoseHooverIntegrator(thermostat_K * unit.kelvin,
                                        NOSE_HOOVER_COLLISION_PER_PS / unit.picosecond, step)
    else:
        raise ConfigError(f"integrator={kind!r} is not one of {INTEGRATORS}")
    return integ


def _save_checkpoint(path: Path, context, frames: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, state=np.frombuffer(context.createCheckpoint(), dtype=np.uint8),
                 frames=np.int64(frames))
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> tuple[bytes, int]:
    try:
        with np.load(path) as data:
            return data["state"].tobytes(), int(data["frames"])
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable run checkpoint ({exc}); delete it and the "
                              ".partial dataset to start over") from exc


def run_openmm(system: str | os.PathLike = "alanine-dipeptide",
               out: str | os.PathLike = "alanine-dipeptide.h5", *,
               frames: int = 1000,
               interval_ps: float | None = None,
               step_fs: float | None = None,
               temperature_K: float | None = None,
               seed: int = 0,
               solvent: str | None = None,
               forcefield: str | list[str] | tuple[str, ...] | None = None,
               friction_per_ps: float = DEFAULT_FRICTION_PER_PS,
               integrator: str | None = None,
               platform: str = "auto",
               hmr: bool = False,
               constraints: str | None = "default",
               coordinates: str | os.PathLike | None = None,
               cutoff_nm: float | None = None,
               equilibrate_ps: float | None = None,
               minimize: bool = True,
               checkpoint_frames: int = 1000,
               resume: bool = False,
               overwrite: bool = False,
               progress: bool | None = None,
               frame_callback: Callable[[int], None] | None = None,
               command: str | None = None) -> Path:
    """Run OpenMM MD and save every ``interval_ps`` to a canonical dataset file.

    Args:
        system: built-in name (``alanine-dipeptide``, ``adk``, MD17 molecules such as ``aspirin``;
            see ``datagen.systems.BUILTIN_SYSTEMS``) or a PDB / Amber prmtop / System XML file.
        out: output ``.h5`` (written as ``out.partial``, renamed when complete).
        frames: number of saved frames (the first is the equilibrated start, at t = 0).
        interval_ps: saved-frame interval, a whole number of steps (built-in default per system;
            MD17 molecules: every 0.5 fs step).
        step_fs: integrator step (default per system; 4 fs with ``hmr``).
        temperature_K: thermostat target.
        seed: initial velocities and Langevin noise (same seed, same platform: same trajectory;
            on CUDA/OpenCL the run uses mixed precision and, where the platform has them,
            deterministic force sums for that, recorded as ``platform_properties``).
        solvent: ``vacuum``, ``implicit`` (OBC2, native GBSAOBCForce) or ``explicit``.
        forcefield: OpenMM XML files for PDB inputs (default amber14-all.xml).
        friction_per_ps: Langevin friction.
        integrator: ``nose-hoover`` (default in vacuum) or ``langevin`` (default otherwise).
        platform: ``auto``, ``Reference``, ``CPU``, ``CUDA`` or ``OpenCL``.
        hmr: hydrogen mass repartitioning (and 4 fs unless ``step_fs`` is given).
        constraints: ``None``/``"HBonds"``/...; ``"default"``: the built-in's choice, else HBonds.
        coordinates: inpcrd for a prmtop, PDB for a System XML.
        cutoff_nm: nonbonded/GB cutoff in vacuum or implicit solvent (default none: exact O(N^2)
            sums; 1.2 makes AdK in OBC2 3x faster on a CPU).
        equilibrate_ps: MD after minimisation and before frame 0 (default per system, else 10 ps).
        minimize: minimise the energy first.
        checkpoint_frames: write the dataset and an OpenMM checkpoint every this many frames.
        resume: continue an interrupted run from ``out.partial`` and ``out.chk.npz``.
        overwrite: replace an existing ``out``.
        progress: tqdm bar with ns/day (default: when attached to a terminal).
        frame_callback: called with the index of each saved frame (for monitoring; raising stops
            the run and keeps what was checkpointed for ``resume``).
        command: the command to record in metadata (default ``sys.argv``).

    Returns:
        Path of the dataset: positions (F, N, 3) Å, velocities Å/ps, forces kJ/mol/Å, potential
        energy (F,) kJ/mol, time (F,) ps = frame * interval_ps.
    """
    import openmm as mm
    from openmm import unit
    from tqdm.auto import tqdm

    out = Path(out)
    if frames < 1:
        raise ConfigError(f"frames={frames} must be at least 1")
    if checkpoint_frames < 1:
        raise ConfigError(f"checkpoint_frames={checkpoint_frames} must be at least 1")
    spec: BuiltinSystem | None = BUILTIN_SYSTEMS.get(str(system))
    serialized = spec is None and Path(system).suffix.lower() == ".xml"
    if serialized:
        _refuse_xml_settings(Path(system), hmr=hmr, constraints=constraints, solvent=solvent)
    solvent = solvent or (spec.solvent if spec else "vacuum")
    if constraints == "default":
        constraints = spec.constraints if spec else "HBonds"
    if step_fs is None:
        step_fs = HMR_STEP_FS if hmr else (spec.step_fs if spec else 2.0)
    if temperature_K is None:
        temperature_K = spec.temperature_K if spec else 300.0
    if not (temperature_K > 0 and math.isfinite(temperature_K)):
        raise ConfigError(f"temperature_K={temperature_K} must be positive")
    if interval_ps is None:
        interval_ps = spec.interval_ps if spec else 1.0
        if spec and spec.interval_ps < step_fs / 1000.0:
            interval_ps = step_fs / 1000.0
    try:
        steps_per_frame = frame_steps(interval_ps, step_fs)
    except ConfigError as exc:
        raise ConfigError(f"{out}: {exc}") from None
    if equilibrate_ps is None:
        equilibrate_ps = spec.equilibrate_ps if spec else 10.0
    if not (equilibrate_ps >= 0 and math.isfinite(equilibrate_ps)):
        raise ConfigError(f"equilibrate_ps={equilibrate_ps} must be a number of ps >= 0; pass "
                          "e.g. equilibrate_ps=10 (CLI: --equilibrate-ps 10)")
    if not (friction_per_ps >= 0 and math.isfinite(friction_per_ps)):
        # 0 is a Langevin integrator without a thermostat (constant energy), as OpenMM allows
        raise ConfigError(f"friction_per_ps={friction_per_ps} must be a number of 1/ps >= 0; "
                          "pass e.g. friction_per_ps=1 (CLI: --friction-per-ps 1)")

    prepared = prepare_system(system, solvent=solvent, forcefield=forcefield,
                              constraints=constraints, hmr=hmr, coordinates=coordinates,
                              cutoff_nm=cutoff_nm)
    solvent = prepared.solvent  # a serialized System's own
    gas_phase = solvent == "vacuum" and prepared.topology.getPeriodicBoxVectors() is None
    if integrator is None:
        small = prepared.system.getNumParticles() < REFERENCE_MAX_ATOMS
        integrator = spec.integrator if spec and solvent == spec.solvent else (
            "nose-hoover" if gas_phase and small else "langevin")
    if integrator not in INTEGRATORS:
        raise ConfigError(f"integrator={integrator!r} is not one of {INTEGRATORS}")
    # a gas-phase molecule keeps zero angular momentum under Nose-Hoover only (Langevin's random
    # forces give it back its 3 rotational degrees of freedom)
    dof = _kinetic_dof(prepared.system, gas_phase and integrator == "nose-hoover")
    default_dof = _kinetic_dof(prepared.system, False)
    # NoseHooverIntegrator counts 3N - constraints - 3 degrees of freedom; a gas-phase molecule
    # with zero angular momentum has 3 fewer, so aim its thermostat so the true temperature is T.
    thermostat_K = temperature_K * dof / default_dof if integrator == "nose-hoover" else \
        temperature_K
    topology = topology_from_openmm(prepared.topology, prepared.system)
    n_atoms = topology.n_atoms
    plat = choose_platform(platform, n_atoms, solvent)

    metadata: dict[str, Any] = {
        "engine": "openmm", "engine_version": mm.__version__, "system": prepared.label,
        "force_field": prepared.force_field, "solvent": prepared.solvent,
        "temperature_K": float(temperature_K), "step_fs": float(step_fs),
        "interval_ps": float(interval_ps), "steps_per_frame": steps_per_frame,
        "seed": int(seed), "integrator": integrator,
        "friction_per_ps": float(friction_per_ps) if integrator == "langevin" else None,
        "thermostat_temperature_K": float(thermostat_K), "kinetic_dof": dof,
        "hmr": bool(hmr), "hydrogen_mass_amu": _hydrogen_mass_amu(topology),
        "constraints": "as serialized" if serialized else constraints,
        "n_constraints": int(prepared.system.getNumConstraints()),
        "equilibrate_ps": float(equilibrate_ps),
        "platform": plat.getName(), "platform_properties": _gpu_properties(plat),
        "source_files": prepared.source_files,
        "velocities": "half-step (leapfrog)" if integrator == "langevin" else "on-step",
        "command": command if command is not None else shlex.join(sys.argv),
        **prepared.extra,
    }
    state, partial, chk_path = plan_run(out, metadata, RESUME_KEYS, resume=resume,
                                        overwrite=overwrite, frames=frames)
    if state == "done":
        return out
    resuming = state == "resume"

    integ = _make_integrator(integrator, temperature_K, step_fs, friction_per_ps, seed,
                             thermostat_K)
    try:
        context = mm.Context(prepared.system, integ, plat, _gpu_properties(plat))
    except Exception as exc:
        raise EngineError(f"{prepared.label}: OpenMM cannot create a context on "
                          f"{plat.getName()} ({exc}); try --platform Reference or CPU") from exc
    start_frame = 0
    if resuming:
        state_bytes, start_frame = _load_checkpoint(chk_path)
        if frames < start_frame:
            raise ConfigError(f"{partial}: the unfinished run already holds {start_frame} frames, "
                              f"more than the {frames} asked for; ask for at least {start_frame} "
                              "or delete the .partial and checkpoint files to start over")
        try:
            context.loadCheckpoint(state_bytes)
        except Exception as exc:
            raise CheckpointError(f"{chk_path}: does not fit this system/platform ({exc}); "
                                  "resume on the same platform or start over") from exc
        log.info("resuming %s at frame %d", out, start_frame)
    else:
        _initialise(context, prepared, temperature_K, seed, minimize, gas_phase,
                    int(round(equilibrate_ps / (step_fs / 1000.0))), integ)
        state = context.getState(getPositions=True, getEnergy=True)
        if not (np.isfinite(state.getPositions(asNumpy=True)._value).all()
                and math.isfinite(state.getPotentialEnergy()._value)):
            raise _blown_up(prepared.label, "during the equilibration", step_fs, constraints,
                            hmr)

    periodic = prepared.topology.getPeriodicBoxVectors() is not None
    writer = TrajectoryWriter(out, topology, metadata, velocities=True, forces=True,
                              energies=True, box=periodic, overwrite=overwrite, resume=resuming,
                              keep_partial=True)
    if resuming:
        writer.truncate(start_frame)
    block = max(1, min(checkpoint_frames, 100))
    buf: dict[str, list] = {k: [] for k in ("x", "v", "f", "e", "box", "t", "s")}
    since_checkpoint = 0
    ps_per_frame = float(interval_ps)
    bar = tqdm(total=frames, initial=start_frame, unit="frame", desc=f"openmm {prepared.label}",
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    wall0 = time.perf_counter()
    with writer, bar:
        for frame in range(start_frame, frames):
            if frame > 0:
                integ.step(steps_per_frame)
            state = context.getState(getPositions=True, getVelocities=True, getForces=True,
                                     getEnergy=True)
            buf["x"].append(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
            buf["v"].append(state.getVelocities(asNumpy=True).value_in_unit(
                unit.angstrom / unit.picosecond))
            buf["f"].append(state.getForces(asNumpy=True).value_in_unit(
                unit.kilojoule_per_mole / unit.angstrom))
            buf["e"].append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
            if not (math.isfinite(buf["e"][-1]) and np.isfinite(buf["x"][-1]).all()):
                raise _blown_up(prepared.label, f"at frame {frame} (t = "
                                f"{frame * ps_per_frame:g} ps)", step_fs, constraints, hmr)
            buf["box"].append(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(
                unit.angstrom))
            buf["t"].append(frame * ps_per_frame)
            buf["s"].append(frame * steps_per_frame)
            since_checkpoint += 1
            raise_if_interrupted()  # a Ctrl-C Python swallowed
            if len(buf["x"]) == block or frame == frames - 1 or \
                    since_checkpoint >= checkpoint_frames:
                writer.append(np.asarray(buf["x"]), np.asarray(buf["t"]), step=np.asarray(buf["s"]),
                              velocities=np.asarray(buf["v"]), forces=np.asarray(buf["f"]),
                              potential_energy=np.asarray(buf["e"]),
                              box=np.asarray(buf["box"]) if periodic else None)
                buf = {k: [] for k in buf}
                if since_checkpoint >= checkpoint_frames and frame < frames - 1:
                    writer.flush()
                    _save_checkpoint(chk_path, context, frame + 1)
                    since_checkpoint = 0
            wall = time.perf_counter() - wall0
            bar.update(1)
            if wall > 0 and (frame % 50 == 0 or frame == frames - 1):
                done_ps = (frame + 1 - start_frame) * ps_per_frame
                bar.set_postfix_str(f"{done_ps * 1e-3 / (wall / 86400):.1f} ns/day")
            if frame_callback is not None:
                frame_callback(frame)
    chk_path.unlink(missing_ok=True)
    wall = time.perf_counter() - wall0
    done = frames - start_frame
    log.info("wrote %s: %d frames x %d atoms in %.1f s (%.3g frames/s, %.3g ns/day)", out, frames,
             n_atoms, wall, done / max(wall, 1e-9),
             done * interval_ps * 1e-3 / max(wall, 1e-9) * 86400.0)
    return out


def _blown_up(label: str, when: str, step_fs: float, constraints: str | None,
              hmr: bool) -> EngineError:
    """The error for a simulation whose positions or energy stopped being finite, which an
    integrator step too long for the fastest motions causes."""
    fixes = ["a shorter --step-fs (step_fs=)"]
    if constraints is None or str(constraints).lower() == "none":
        fixes.append("constraints on bonds to hydrogen (--constraints HBonds)")
    if hmr:
        fixes.append("no --hmr")
    return EngineError(f"{label}: the simulation blew up {when} (positions or energy are NaN or "
                       f"inf): the {step_fs:g} fs time step is too long for this system; use "
                       f"{' or '.join(fixes)}")


def _initialise(context, prepared: PreparedSystem, temperature_K: float, seed: int,
                minimize: bool, gas_phase: bool, equilibrate_steps: int, integ) -> None:
    import openmm as mm
    from openmm import unit

    context.setPositions(prepared.positions)
    if prepared.topology.getPeriodicBoxVectors() is not None:
        context.setPeriodicBoxVectors(*prepared.topology.getPeriodicBoxVectors())
    if minimize:
        mm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(temperature_K * unit.kelvin, _openmm_seed(seed))
    if gas_phase:
        _zero_context_momenta(context, prepared.system, temperature_K)
    if equilibrate_steps > 0:
        integ.step(equilibrate_steps)
        state = context.getState(getPositions=True)
        if not np.isfinite(state.getPositions(asNumpy=True)._value).all():
            return  # blown up: the caller says why
        if gas_phase:  # a Langevin equilibration re-introduces momentum; remove it again
            _zero_context_momenta(context, prepared.system, None)
    context.setTime(0.0)
    context.setStepCount(0)


def _zero_context_momenta(context, system, temperature_K: float | None) -> None:
    from openmm import unit

    state = context.getState(getPositions=True, getVelocities=True)
    x = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    v = state.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.picosecond)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.amu)
                       for i in range(system.getNumParticles())])
    context.setVelocities(zero_momenta(x, v, masses) * (unit.angstrom / unit.picosecond))
    context.applyVelocityConstraints(1e-6)
    if temperature_K is not None:
        # restore the target kinetic energy lost with the removed rigid-body motion
        ke = context.getState(getEnergy=True).getKineticEnergy()
        dof = _kinetic_dof(system, True)
        target = 0.5 * dof * unit.MOLAR_GAS_CONSTANT_R * temperature_K * unit.kelvin
        scale = math.sqrt(target / ke) if ke.value_in_unit(unit.kilojoule_per_mole) > 0 else 1.0
        v2 = context.getState(getVelocities=True).getVelocities(asNumpy=True)
        context.setVelocities(v2 * scale)


def temperature_K(velocities_A_per_ps: np.ndarray, masses_amu: np.ndarray, dof: int) -> np.ndarray:
    """Instantaneous kinetic temperature of frames.

    Args:
        velocities_A_per_ps: (F, N, 3) Å/ps.
        masses_amu: (N,) amu.
        dof: kinetic degrees of freedom (``metadata["kinetic_dof"]`` for OpenMM datasets).

    Returns:
        (F,) K.
    """
    from openmm import unit

    mv2 = (masses_amu[None, :, None] * velocities_A_per_ps**2).sum(axis=(1, 2))
    to_kj = (1.0 * unit.amu * unit.angstrom**2 / unit.picosecond**2).value_in_unit(
        unit.kilojoule_per_mole)
    r = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    return mv2 * to_kj / (dof * r)


def describe_systems() -> str:
    """One line per built-in system (for ``--help``)."""
    return "\n".join(f"  {k:18s} {v.description}" for k, v in BUILTIN_SYSTEMS.items())
