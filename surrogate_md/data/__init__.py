"""Data layer: canonical dataset files, atom selections, sampling protocols, graphs, batches."""

from surrogate_md.data.h5md import (
    Topology,
    TrajectoryFile,
    TrajectoryWriter,
    open_trajectory,
    write_trajectory,
)

__all__ = ["Topology", "TrajectoryFile", "TrajectoryWriter", "open_trajectory", "write_trajectory"]
