"""A seeded, single-threaded simulator for the Raft core.

Virtual time, a lossy reordering network with partitions, disks that lose unsynced
writes on a crash, and clients that propose, read, change membership and transfer
leadership. `raft.sim.checker` verifies Raft's safety properties after every event.
Every run is a pure function of its seed.
"""

from raft.sim.checker import Violation
from raft.sim.options import SimOptions
from raft.sim.world import SimResult, run_seed

__all__ = ["SimOptions", "SimResult", "Violation", "run_seed"]
