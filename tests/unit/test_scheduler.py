"""The scheduler's view of which nodes are busy taking mail (its policy is tested in
test_policy)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from mailqueue import codec
from mailqueue.commands import Accept, Assign, Command, Expire, Hold
from mailqueue.machine import encode_result
from mailqueue.policy import Policy
from mailqueue.spool import Applied, Spool
from raft.core import Role
from smtpcluster.clock import ClusterClock
from smtpcluster.scheduler import BUSY_WINDOW_TICKS, Scheduler

if TYPE_CHECKING:
    from smtpcluster.node import Node


def test_busy_counts_each_nodes_recent_acceptances_and_the_leaders_replication() -> None:
    spool = Spool()
    leader = SimpleNamespace(machine=SimpleNamespace(spool=spool), cfg=SimpleNamespace(
        node=SimpleNamespace(id="a"), delivery=SimpleNamespace(concurrency=6)))  # fmt: skip
    sched = Scheduler(cast("Node", leader))
    assert sum(sched.busy().values()) == 0
    for k in range(5):
        spool.apply(Accept(0, f"b{k}", "s@example.org", ("u@x.example",), b"x\r\n", "b"))
    spool.apply(Accept(0, "a0", "s@example.org", ("u@x.example",), b"x\r\n", "a"))
    # b's own work; the leader's: its front end's and replicating all, capped at the
    # six recipients a node delivers at once
    assert sched.busy() == {"b": 5, "a": 6}
    for _ in range(BUSY_WINDOW_TICKS - 2):
        assert sched.busy() == {"b": 5, "a": 6}  # still within the window
    assert sum(sched.busy().values()) == 0  # a second later, forgotten


def test_mail_from_a_node_with_a_clock_ahead_is_assigned_at_once() -> None:
    """b's clock is an hour ahead of the leader's: b's message is due at b's time, and
    the leader's scheduler must not hold it back for the hour."""
    spool = Spool()
    ahead = int(time.time() * 1000) + 3600 * 1000
    spool.apply(Accept(ahead, "m1", "s@example.org", ("u@x.example",), b"x\r\n", "b"))
    proposed = tick(spool)
    assigned = [a.message_id for c in proposed if isinstance(c, Assign) for a in c.assignments]
    assert assigned == ["m1"]


def test_a_node_clock_days_ahead_does_not_expire_the_queue() -> None:
    """b's clock runs six days ahead, past the five-day queue lifetime, and b's
    commands carry the spool's time with them; the leader's clock says the message is
    an hour old, and bouncing for age cannot be undone: it waits."""
    spool = Spool()
    wall = int(time.time() * 1000)
    spool.apply(Accept(wall - 3600_000, "m1", "s@example.org", ("u@x.example",), b"x\r\n", "a"))
    spool.apply(Hold(wall, ("m1",)))  # waiting, as a deferred message would
    spool.apply(Accept(wall + 6 * 86400_000, "m2", "s@example.org", ("u@x.example",), b"", "b"))
    assert spool.now > wall + 5 * 86400_000
    proposed = tick(spool)
    assert not [c for c in proposed if isinstance(c, Expire)]
    old = Spool()
    old.apply(Accept(wall - 6 * 86400_000, "m1", "s@example.org", ("u@x.example",), b"", "a"))
    old.apply(Hold(wall, ("m1",)))
    assert [c.message_id for c in tick(old) if isinstance(c, Expire)] == ["m1"]  # by its clock


def test_a_leader_with_its_clock_days_ahead_does_not_expire_the_queue() -> None:
    """Leader a's clock says m1 is six days old, past the five-day lifetime; b's clock,
    read a moment ago, says a's is six days ahead. One of them is wrong, and bouncing
    cannot be undone: m1 is bounced only once a majority of the clocks says so."""
    spool = Spool()
    wall = int(time.time() * 1000)
    spool.apply(Accept(wall - 6 * 86400_000, "m1", "s@example.org", ("u@x.example",), b"", "a"))
    spool.apply(Hold(wall, ("m1",)))
    behind = -6 * 86400.0 + 3600
    assert not [c for c in tick(spool, {"b": behind}) if isinstance(c, Expire)]
    # b's clock not read (just elected, or b's release does not answer): a waits too
    assert not [c for c in tick(spool, {}) if isinstance(c, Expire)]
    # b's clock agrees with a's: m1 is six days old
    assert [c.message_id for c in tick(spool) if isinstance(c, Expire)] == ["m1"]


def tick(spool: Spool, offsets: dict[str, float] | None = None) -> list[Command]:
    """What leader a's scheduler proposes in one pass over `spool`, b alive; `offsets`:
    how far b's clock is ahead of a's as a read it (default: they agree)."""
    proposed: list[Command] = []

    async def propose(data: bytes, timeout: float) -> bytes:
        proposed.append(codec.decode(data))
        return encode_result(Applied(True))

    members = SimpleNamespace(members=lambda: ("a", "b"), voters=("a", "b"))
    read = {"b": 0.0} if offsets is None else offsets
    clocks = SimpleNamespace(walls=lambda: {n: time.time() + o for n, o in read.items()})
    leader = SimpleNamespace(
        machine=SimpleNamespace(spool=spool), policy=Policy(),
        clock=ClusterClock(lambda: spool.now),
        raft=SimpleNamespace(
            propose=propose, cfg=SimpleNamespace(id="a"), last_answer={"b": time.monotonic()},
            core=SimpleNamespace(conf=lambda: members), format_of=lambda n: 1, clocks=clocks,
        ),
        cfg=SimpleNamespace(
            node=SimpleNamespace(id="a"), smtp=SimpleNamespace(hostname="relay.test"),
            delivery=SimpleNamespace(concurrency=6, node_down_after_ms=10_000,
                                     on_uncertain="redeliver"),
        ),
    )  # fmt: skip
    sched = Scheduler(cast("Node", leader))
    sched.lead_since = time.monotonic()
    asyncio.run(sched.tick())
    return proposed


def test_a_tick_that_raises_does_not_end_the_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in one tick (a DSN that cannot be rendered, say) ended the task: nothing was
    assigned, expired or bounced again while this node led, and nothing said so."""
    core = SimpleNamespace(role=Role.LEADER, term=1)
    sched = Scheduler(cast("Node", SimpleNamespace(raft=SimpleNamespace(core=core))))
    ticks: list[int] = []

    async def tick() -> None:
        ticks.append(1)
        if len(ticks) == 1:
            raise ValueError("a bug")

    sched.tick = tick  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.create_task(sched.run())
        deadline = asyncio.get_running_loop().time() + 10
        while len(ticks) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no tick after the bug"
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert "scheduler tick failed" in caplog.text and "ValueError: a bug" in caplog.text
    assert sched.bugs == 1  # smtpcluster_internal_errors_total{part="scheduler"}
