"""datagen: turn existing MD into canonical dataset files, and produce new MD with OpenMM and ASE.

Library entry points (each also behind ``python -m datagen``):

- :func:`datagen.ingest.ingest` - MD17/rMD17 ``.npz``, anything MDAnalysis reads, ASE trajectories.
- :func:`datagen.openmm_md.run_openmm` - OpenMM runs of built-in or user systems.
- :func:`datagen.ase_md.run_ase` - ASE runs (EMT, Lennard-Jones, GFN2-xTB via tblite).
- :func:`datagen.replicas.run_replicas` - independent seeds in parallel processes.

Every output is one canonical dataset file (see ``surrogate_md.data.h5md``) in Å, ps, amu, kJ/mol.
Heavy engine imports happen inside the functions, so ``import datagen`` stays cheap.
"""

from __future__ import annotations
