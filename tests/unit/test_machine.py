"""The spool behind raft.node's StateMachine interface."""

from __future__ import annotations

import logging
import tracemalloc

import pytest

from mailqueue import codec
from mailqueue.commands import Accept, Assign, Assignment, BeginDot
from mailqueue.machine import SpoolMachine, decode_result


def test_commands_apply_and_results_come_back_as_bytes() -> None:
    sm = SpoolMachine()
    sm.apply(1, codec.encode(Accept(1, "m1", "s@example.org", ("u@x.example",), b"b", "a")))
    sm.apply(2, codec.encode(Assign(2, (Assignment("m1", 0, "a", 1),))))
    stale = decode_result(sm.apply(3, codec.encode(BeginDot(3, "m1", (0,), "b", 1))))
    assert not stale.ok and "no longer holds" in stale.detail
    assert decode_result(sm.apply(4, codec.encode(BeginDot(4, "m1", (0,), "a", 1)))).ok


def test_an_undecodable_entry_is_refused_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    sm = SpoolMachine()
    with caplog.at_level(logging.ERROR):
        result = decode_result(sm.apply(7, b"\x00garbage"))
    assert not result.ok and sm.undecodable == 1
    assert "log entry 7" in caplog.text


def test_snapshot_and_restore_through_the_interface() -> None:
    sm = SpoolMachine()
    sm.apply(1, codec.encode(Accept(1, "m1", "s@example.org", ("u@x.example",), b"b", "a")))
    other = SpoolMachine()
    other.restore(iter(list(sm.snapshot())))
    assert other.spool.state_key() == sm.spool.state_key()
    assert other.spool.bodies.get("m1") == b"b"


def test_a_large_accept_is_applied_from_a_view_of_its_entry_without_a_copy() -> None:
    """raft.node hands a large proposal over as a view of its log entry. Decoded
    from that in place, the message's body is the one copy made of it."""
    body = b"x" * (8 << 20)
    entry = b"head" + codec.encode(Accept(1, "m1", "s@example.org", ("u@x.example",), body, "a"))
    sm = SpoolMachine()
    tracemalloc.start()
    result = decode_result(sm.apply(1, memoryview(entry)[4:]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.ok and sm.spool.bodies.get("m1") == body
    assert peak < 1.5 * len(body), peak
