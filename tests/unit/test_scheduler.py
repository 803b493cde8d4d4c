"""The scheduler's view of which nodes are busy taking mail (its policy is tested in
test_policy)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from mailqueue.commands import Accept
from mailqueue.spool import Spool
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
