"""The clock a node schedules by (smtpcluster.clock)."""

from __future__ import annotations

from smtpcluster.clock import ClusterClock

DAY_MS = 86_400_000


class Fake:
    """A wall clock, a monotonic clock and a spool's time, each set by the test."""

    def __init__(self) -> None:
        self.wall_ms = 1_000_000
        self.mono_s = 50.0
        self.spool_ms = 0

    def clock(self) -> ClusterClock:
        return ClusterClock(lambda: self.spool_ms, lambda: self.wall_ms / 1000, lambda: self.mono_s)

    def elapse(self, ms: int) -> None:
        self.wall_ms += ms
        self.mono_s += ms / 1000


def test_with_the_spool_behind_it_is_the_wall_clock() -> None:
    f = Fake()
    c = f.clock()
    f.spool_ms = f.wall_ms - 5_000
    assert c.now() == f.wall_ms
    f.elapse(250)
    assert c.now() == f.wall_ms


def test_with_the_spool_ahead_it_goes_on_from_there_at_the_rate_of_real_time() -> None:
    """Another node's clock was six days ahead, and stamped the spool; nothing stamps it
    later. A retry due a minute after that stamp must come a minute later, not in six
    days, when the wall clocks get there."""
    f = Fake()
    c = f.clock()
    f.spool_ms = f.wall_ms + 6 * DAY_MS
    assert c.now() == f.spool_ms
    f.elapse(60_000)
    assert c.now() == f.spool_ms + 60_000


def test_it_never_goes_back_when_the_wall_clock_steps_back() -> None:
    f = Fake()
    c = f.clock()
    before = c.now()
    f.wall_ms -= 3_600_000  # NTP steps it back an hour
    f.mono_s += 1
    assert c.now() == before + 1000
