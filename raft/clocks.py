"""Each peer's wall clock as this node reads it, for an application that must not act
on one wrong clock (the relay bounces mail for its age: that cannot be undone).

Read as NTP does: a ping carries this node's monotonic time, the peer answers with it
and its wall clock, and the peer's clock is taken to have said that halfway through
the round trip. The error is at most half the round trip, so slow answers (a queue
behind a snapshot, a paused process) are not read at all. etcd's peers measure the
same and warn of a drift over a second; ours warn over WARN_S, since a reading from
a busy event loop can be off by a few hundred milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from raft.types import NodeId

log = logging.getLogger(__name__)

EVERY_S = 1.0  # how often each peer is pinged
MAX_RTT_S = 0.5  # a slower answer says too little about when it was written
FRESH_S = 5.0  # an older reading is not given out: the clock may have moved since
WARN_S = 5.0


@dataclass(frozen=True, slots=True)
class Reading:
    # What the peer's wall clock said at `at`, this node's monotonic time: kept apart
    # from this node's wall clock, which may step while the reading is in use. Kept as
    # an offset, a leader whose own clock jumped days ahead would have taken its peers
    # for as far ahead as itself until the next readings.
    wall: float
    at: float
    rtt: float  # the round trip it was read in, seconds


class PeerClocks:
    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wall = wall
        self._monotonic = monotonic
        self.readings: dict[NodeId, Reading] = {}
        self._warned: set[NodeId] = set()  # peers whose clock is off, as last logged

    def ping(self) -> dict[str, float]:
        return {"ping": self._monotonic()}

    def pong(self, ping: float) -> dict[str, float]:
        return {"pong": ping, "wall": self.wall()}

    def read(self, peer: NodeId, ping: float, wall: float) -> Reading | None:
        """A peer's answer to our `ping`: its reading, or None when the round trip was
        too slow (or the answer is not to a ping of this process) to say much."""
        now = self._monotonic()
        rtt = now - ping
        if not 0.0 <= rtt <= MAX_RTT_S:
            return None
        reading = Reading(wall + rtt / 2, now, rtt)
        self.readings[peer] = reading
        self._say(peer, reading.wall - self.wall())
        return reading

    def walls(self) -> dict[NodeId, float]:
        """What each peer's wall clock says now, carried on from its reading by this
        node's monotonic clock, for the peers read in the last FRESH_S."""
        now = self._monotonic()
        return {n: r.wall + (now - r.at) for n, r in self.readings.items() if now - r.at < FRESH_S}

    def offsets(self) -> dict[NodeId, float]:
        """Seconds each peer's clock is ahead of this node's (negative: behind), for the
        peers read in the last FRESH_S."""
        mine = self.wall()
        return {n: wall - mine for n, wall in self.walls().items()}

    def _say(self, peer: NodeId, offset: float) -> None:
        off = abs(offset) > WARN_S
        if off == (peer in self._warned):
            return
        if off:
            self._warned.add(peer)
            way = "ahead of" if offset > 0 else "behind"
            log.warning("%s's clock is %.1f s %s this node's: one of them is wrong",
                        peer, abs(offset), way)  # fmt: skip
        else:
            self._warned.discard(peer)
            log.info("%s's clock agrees with this node's again (%+.3f s)", peer, offset)
