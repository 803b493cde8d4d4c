"""The clock a node schedules by (smtpcluster.clock)."""

from __future__ import annotations

from smtpcluster.clock import ClusterClock, agreed_wall

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


T = 1_800_000_000_000


def test_the_agreed_wall_is_bounded_by_right_clocks_when_one_is_wrong() -> None:
    # three voters, each one in turn six days ahead: the time agreed on stays T
    assert agreed_wall(T + 6 * DAY_MS, {"b": T, "c": T}, 3) == T
    assert agreed_wall(T, {"b": T + 6 * DAY_MS, "c": T}, 3) == T
    assert agreed_wall(T, {"b": T, "c": T + 6 * DAY_MS}, 3) == T
    # two of three clocks read: the lower of the two
    assert agreed_wall(T + 6 * DAY_MS, {"b": T}, 3) == T
    assert agreed_wall(T, {"c": T + 6 * DAY_MS}, 3) == T


def test_the_agreed_wall_is_never_ahead_of_this_clock() -> None:
    # the others agree among themselves an hour ahead: this clock lags, and bounces late
    assert agreed_wall(T, {"b": T + 3_600_000, "c": T + 3_600_000}, 3) == T
    assert agreed_wall(T, {"b": T - 1500, "c": T - 2000}, 3) == T - 1500  # two clocks behind
    assert agreed_wall(T, {"b": T - 1500, "c": T + 2000}, 3) == T


def test_no_time_is_agreed_until_a_majority_of_clocks_is_known() -> None:
    assert agreed_wall(T, {}, 3) is None
    assert agreed_wall(T, {"b": T}, 5) is None
    assert agreed_wall(T, {"b": T, "c": T}, 5) == T
    assert agreed_wall(T, {}, 1) == T  # a cluster of one has only its own
