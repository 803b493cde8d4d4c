"""The parameters of one simulated run, all derived from its seed."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import cast


@dataclass(frozen=True, slots=True)
class SimOptions:
    nodes: int = 5
    initial_voters: int = 3
    tick_ms: int = 10
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    drop: float = 0.05
    duplicate: float = 0.02
    delay_min_ms: float = 1.0
    delay_max_ms: float = 15.0
    disk_max_ms: float = 3.0
    torn_tail: float = 0.5  # chance that a crash keeps a prefix of the write in flight
    max_entries_per_msg: int = 8
    max_inflight_msgs: int = 4
    snapshot_entries: int = 40
    snapshot_growth: float = 1.0
    snapshot_entries_max: int = 100_000
    snapshot_chunk_bytes: int = 32
    compaction_trailing: int = 5
    client_interval_ms: float = 8.0
    fault_interval_ms: float = 120.0
    safety_ms: int = 2500  # faults and load
    liveness_budget_ms: int = 4000  # after healing, a leader and a commit within this
    partitions: bool = True
    crashes: bool = True
    membership: bool = True
    transfers: bool = True
    pre_vote: bool = True
    check_quorum: bool = True
    # Chance that a newly elected leader crashes within a few ms (FoundationDB's
    # BUGGIFY idea): it makes the rare interleavings of Raft's figure 8 common.
    leader_crash: float = 0.2
    # Chance that a leader crashes soon after its commit index advances: the moment when
    # followers may not yet know what was committed.
    commit_crash: float = 0.02
    # Chance that a newly elected leader is cut off from everyone for a while: it leaves
    # entries of its term on a minority, the raw material of Raft's figure 8.
    leader_isolate: float = 0.2
    restart_max_ms: float = 400.0  # a crashed node is back within this

    @staticmethod
    def for_seed(seed: int, **overrides: object) -> SimOptions:
        """Vary the shape of the run with the seed, so many seeds cover many shapes."""
        r = random.Random(f"options:{seed}")
        nodes = r.choice([3, 3, 4, 5])
        derived: dict[str, object] = {
            "nodes": nodes,
            "initial_voters": min(nodes, r.choice([1, 3, 3, 3])),
            "drop": r.choice([0.0, 0.02, 0.1]),
            "duplicate": r.choice([0.0, 0.02, 0.05]),
            "delay_max_ms": r.choice([3.0, 15.0, 40.0]),
            "max_entries_per_msg": r.choice([1, 1, 2, 8, 64]),
            "max_inflight_msgs": r.choice([1, 4, 16]),
            "snapshot_entries": r.choice([15, 40, 1000]),
            "snapshot_chunk_bytes": r.choice([16, 64, 4096]),
            "compaction_trailing": r.choice([0, 5]),
            "heartbeat_ticks": r.choice([1, 2, 3]),
            "fault_interval_ms": r.choice([40.0, 80.0, 150.0]),
            "safety_ms": r.choice([2500, 4000]),
            "leader_crash": r.choice([0.0, 0.2, 0.5]),
            "commit_crash": r.choice([0.0, 0.02, 0.1]),
            "leader_isolate": r.choice([0.0, 0.2, 0.5]),
            "restart_max_ms": r.choice([400.0, 1500.0]),
            # Drawn last, so that every earlier seed keeps the rest of its shape.
            "snapshot_growth": r.choice([0.0, 1.0, 4.0]),
        }
        cap_factor = r.choice([3, 1000])
        derived.update(overrides)
        # The cap follows snapshot_entries as overridden: Config refuses a cap below it.
        entries = cast(int, derived["snapshot_entries"])
        derived.setdefault("snapshot_entries_max", cap_factor * entries)
        return SimOptions(**derived)  # type: ignore[arg-type]

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
