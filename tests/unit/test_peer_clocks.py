"""Reading a peer's wall clock from a ping and its answer (raft.clocks)."""

from __future__ import annotations

import logging

import pytest

from raft.clocks import FRESH_S, MAX_RTT_S, PeerClocks


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_peers_clock_is_read_halfway_through_the_round_trip() -> None:
    mono, wall = Clock(100.0), Clock(1_000.0)
    mine = PeerClocks(wall, mono)
    ping = mine.ping()["ping"]
    mono.t += 0.2  # the answer comes back 200 ms later, written by a clock 60 s ahead
    wall.t += 0.2
    reading = mine.read("b", ping, 1_000.1 + 60)
    assert reading is not None and reading.rtt == pytest.approx(0.2)
    assert mine.offsets() == {"b": pytest.approx(60.0)}
    assert mine.walls() == {"b": pytest.approx(1_060.2)}


def test_a_step_of_this_nodes_clock_does_not_move_its_readings_of_the_others() -> None:
    """The leader's clock jumps six days ahead between two readings: its peers' clocks
    have not moved, and a leader that took them for as far ahead as itself would judge
    the queue's age by the wrong clock alone."""
    mono, wall = Clock(100.0), Clock(1_000.0)
    mine = PeerClocks(wall, mono)
    mine.read("b", mine.ping()["ping"], 1_000.0)
    wall.t += 6 * 86400.0
    mono.t += 0.5
    assert mine.walls() == {"b": pytest.approx(1_000.5)}
    assert mine.offsets() == {"b": pytest.approx(-6 * 86400.0)}


def test_a_slow_or_foreign_answer_is_not_read() -> None:
    mono, wall = Clock(100.0), Clock(1_000.0)
    mine = PeerClocks(wall, mono)
    ping = mine.ping()["ping"]
    mono.t += MAX_RTT_S + 0.1  # queued behind a snapshot: when was it written?
    assert mine.read("b", ping, 5_000.0) is None
    assert mine.read("b", mono.t + 1, 5_000.0) is None  # not a ping of this process
    assert mine.offsets() == {}


def test_a_reading_goes_stale() -> None:
    mono, wall = Clock(100.0), Clock(1_000.0)
    mine = PeerClocks(wall, mono)
    mine.read("b", mine.ping()["ping"], 1_000.0)
    assert "b" in mine.offsets()
    mono.t += FRESH_S
    assert mine.offsets() == {}


def test_a_clock_that_is_off_is_warned_of_once_and_its_return_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mono, wall = Clock(100.0), Clock(1_000.0)
    mine = PeerClocks(wall, mono)
    caplog.set_level(logging.INFO, logger="raft.clocks")
    for offset in (6 * 86400, 6 * 86400, -3600, 0.2, 0.1):
        mine.read("b", mine.ping()["ping"], wall.t + offset)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "b's clock is 518400.0 s ahead of this node's: one of them is wrong",
        "b's clock agrees with this node's again (+0.200 s)",
    ]
