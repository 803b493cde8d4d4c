"""The time a node schedules by: its wall clock, unless the spool's time is ahead.

The spool's time (Spool.now) is the newest stamp any node put on a command. Mail a
node with its clock ahead took is due at that node's time, so the scheduler counts
from the spool's time when it is ahead of its own clock. But the spool's time moves
only when some node stamps a command later than it: after the fast clock is set right,
or while the fast node is idle, no clock is past it, it stands still, and with it
every deferred recipient, whose retry time lies just beyond it. So this clock, once
ahead, goes on at the rate of real time (the monotonic clock), and never goes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class ClusterClock:
    def __init__(
        self,
        spool_now: Callable[[], int],
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool_now = spool_now
        self._wall = wall
        self._monotonic = monotonic
        self._last = 0  # ms: what now() last returned...
        self._last_at = monotonic()  # ...and when, by the monotonic clock

    def now(self) -> int:
        """Milliseconds since the epoch, as the cluster schedules: never before the
        spool's time, nor before this clock's last answer plus the real time since."""
        at = self._monotonic()
        carried = self._last + int((at - self._last_at) * 1000)
        self._last = max(int(self._wall() * 1000), self._spool_now(), carried)
        self._last_at = at
        return self._last


def agreed_wall(own_ms: int, peers_ms: Mapping[str, int], voters: int) -> int | None:
    """The wall time a majority of the voters' clocks vouches for, for what cannot be
    undone (bouncing mail for its age): this node's clock, unless it is ahead of the
    lower median of the clocks read (`peers_ms`: what each voting peer's clock says
    now). With one clock wrong, the median is bounded by right ones; a leader with its
    clock days ahead bounced the whole queue. None until a majority of the voters'
    clocks (this one included) are known: a leader just elected, or a peer of a release
    that does not answer pings, leaves expiry waiting, which is harmless."""
    known = sorted([own_ms, *peers_ms.values()])
    if len(known) < voters // 2 + 1:
        return None
    return min(own_ms, known[(len(known) - 1) // 2])
