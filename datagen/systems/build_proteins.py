"""Regenerate the protein structures shipped in ``datagen/systems/``.

- ``alanine-dipeptide.pdb``: ACE-ALA-NME built by tleap (``[amber]`` extra, ff14SB templates,
  the protein force field of OpenMM's ``amber14-all.xml``) in its default extended geometry.
  ``run_openmm`` minimises and equilibrates before recording, so the exact start does not matter.
- ``adk.pdb``: adenylate kinase, open state (PDB 4AKE with hydrogens, 3341 atoms), copied from
  MDAnalysisTests' ``adk_open.pdb`` so users do not need MDAnalysisTests. It loads into
  ``amber14-all.xml`` as is.

Run: ``python -m datagen.systems.build_proteins``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

LEAP = """source leaprc.protein.ff14SB
mol = sequence { ACE ALA NME }
savepdb mol ala2.pdb
quit
"""


def build_alanine_dipeptide(out: Path) -> None:
    if shutil.which("tleap") is None:
        raise SystemExit("tleap not found: pip install 'surrogate-md[amber]'")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "leap.in").write_text(LEAP)
        subprocess.run(["tleap", "-f", "leap.in"], cwd=work, check=True, capture_output=True)
        tmp_target = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(work / "ala2.pdb", tmp_target)
        os.replace(tmp_target, out)


def copy_adk(out: Path) -> None:
    from MDAnalysisTests.datafiles import PDB_small  # adk_open.pdb

    tmp_target = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(PDB_small, tmp_target)
    os.replace(tmp_target, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_alanine_dipeptide(args.out_dir / "alanine-dipeptide.pdb")
    copy_adk(args.out_dir / "adk.pdb")
    log.info("wrote alanine-dipeptide.pdb and adk.pdb to %s", args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
