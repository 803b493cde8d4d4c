"""A fault schedule from a seed: the same seed gives the same faults, in the same
order, with the same targets and durations (what the cluster does meanwhile is not
deterministic: real processes on real time)."""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = (  # the default schedule's
    "kill9",  # kill -9 of a node, restarted after the hold
    "kill9_leader",  # the same, of the leader: during acceptance and delivery
    "pause",  # SIGSTOP, then SIGCONT: sometimes past the down detection (5 s)
    "partition",  # a node cut off from its peers
    "partition_leader",
    "slow_disk",  # every fsync of one node delayed
    "restart_all",  # kill -9 of every node, then all started again
    "membership",  # a fourth node joins under load, then leaves
    "disk_low",  # one node's data disk under min_free_space: its MAILs get 452 (a reload)
)
# On request only (--kinds): a node's wall clock 6 days or 2 hours ahead, or 2 hours
# behind, by libfaketime, under which every node then runs; a node's Raft port blocked
# inbound only (it still reaches its peers, they do not reach it). Out of the default
# so that the default schedule, CI's seeds and every recorded seed stay as they were.
OPT_IN = ("clock_jump", "deafen", "deafen_leader")
WEIGHTS = dict(zip(KINDS + OPT_IN, (3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 2, 2), strict=True))
# A clock_jump's offset, chosen by its pick: past the queue lifetime (5 days), past the
# hour a delivered message's id is remembered, and stepped back.
CLOCK_OFFSETS = ("+6d", "+2h", "-2h")


@dataclass(frozen=True)
class Fault:
    kind: str
    pick: int  # chooses the target among the candidates at injection time
    hold_s: float  # how long the fault lasts
    delay_ms: int = 0  # slow_disk: the fsync delay


def plan(seed: int, count: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    rng = random.Random(seed)
    weights = [WEIGHTS[k] for k in kinds]
    out = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        # Pauses and partitions sometimes outlast the down detection (5 s).
        long = kind in ("pause", "partition", "partition_leader", "slow_disk", "clock_jump",
                        "deafen", "deafen_leader")  # fmt: skip
        hold = rng.uniform(1, 9) if long else rng.uniform(1, 5)
        delay = rng.randint(20, 200) if kind == "slow_disk" else 0
        out.append(Fault(kind, rng.randrange(1 << 30), round(hold, 2), delay))
    return out
