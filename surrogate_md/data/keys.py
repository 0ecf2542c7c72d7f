"""Names of the fields of a model batch, with their shapes and units.

A batch is a ``dict[str, Tensor]`` over a *flat node list*: the nodes of all systems in the batch
are concatenated and ``GRAPH`` says which system each node belongs to (systems of different sizes
mix freely, no padding). ``N`` is the total number of nodes, ``C`` the number of channels per node
(1 for atoms, 4 for residue nodes N, CA, C, O), ``E`` the number of directed edges, ``P`` the
number of output times, ``T`` the number of history frames, ``B`` the number of systems.

The edge list is shared by every time point: models put time in a tensor dimension, they never
replicate the graph per time point.
"""

POS = "pos"  # (N, C, 3) float, Å: positions at the input time t0
VEL = "vel"  # (N, C, 3) float, Å/ps: velocities at t0
HIST = "hist"  # (T, N, C, 3) float, Å: past frames, oldest first; HIST[-1] == POS
HIST_DT = "hist_dt"  # () float, ps: time between consecutive history frames
NODE_TYPE = "node_type"  # (N,) long: atomic number for atoms, 100 + residue code for residues
MASS = "mass"  # (N,) float, amu (sum over channels for residue nodes)
GRAPH = "graph"  # (N,) long: index of the system each node belongs to, 0..B-1
N_GRAPHS = "n_graphs"  # () long: B
EDGE_INDEX = "edge_index"  # (2, E) long: row 0 = source j, row 1 = target i (message j -> i)
EDGE_TYPE = "edge_type"  # (E,) long: 0 = bond / radius edge, 1 = two-hop edge
TIMES = "times"  # (P,) float, ps: output time offsets after t0, shared by the batch
TARGET = "target"  # (P, N, C, 3) float, Å: reference positions at t0 + TIMES
TARGET_MASK = "target_mask"  # (N,) bool, optional: nodes that count in the loss
# (J, P, N, C, 3) float, Å, training with train.rollout_jumps = J + 1 only: reference positions
# of the J jumps chained after the first, at t0 + j·ΔT + TIMES (j = 1..J)
ROLLOUT = "rollout"

ALL_KEYS = (
    POS, VEL, HIST, HIST_DT, NODE_TYPE, MASS, GRAPH, N_GRAPHS,
    EDGE_INDEX, EDGE_TYPE, TIMES, TARGET, TARGET_MASK, ROLLOUT,
)
