"""The delivery worker's own arithmetic (its deliveries are tested against real
servers in tests/integration/test_delivery.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from mailqueue.commands import Accept, Assign, Assignment, BeginDot
from mailqueue.policy import Policy
from mailqueue.spool import Spool
from smtpcluster.clock import ClusterClock
from smtpcluster.worker import Worker

if TYPE_CHECKING:
    from smtpcluster.node import Node


SMARTHOST: dict[str, object] = {
    "smarthost_tls": "may", "smarthost_ca_file": "", "smarthost_login": None,
    "smarthost_tls_wrapper": False, "route_tls": {}, "route_ca_file": "",
}  # fmt: skip


def test_a_retry_is_timed_from_the_spools_time_when_this_clock_lags() -> None:
    """The scheduler counts from the later of its clock and the spool's (ClusterClock);
    a worker whose clock is an hour behind must not ask for the retry an hour early."""
    spool = Spool()
    ahead = int(time.time() * 1000) + 3600 * 1000
    spool.apply(Accept(ahead, "m1", "s@example.org", ("u@x.example",), b"x\r\n", "b"))
    schedule = (60_000, 300_000)

    async def propose(data: bytes, timeout: float) -> bytes:
        raise AssertionError("nothing to propose here")

    node = SimpleNamespace(
        machine=SimpleNamespace(spool=spool), policy=Policy(retry_schedule_ms=schedule),
        raft=SimpleNamespace(propose=propose), clock=ClusterClock(lambda: spool.now),
        cfg=SimpleNamespace(node=SimpleNamespace(id="a"), delivery=SimpleNamespace(
            concurrency=2, destination_concurrency=1, destination_recipient_limit=50, **SMARTHOST)),
    )  # fmt: skip
    worker = Worker(cast("Node", node))
    assert worker._retry_at("m1", 0) == ahead + schedule[0]


def test_transactions_split_by_destination_and_limit_and_never_regroup() -> None:
    """120 recipients in one domain and 3 in another, all assigned here in one pass:
    three transactions of at most 50 for the first, one for the second. As recipients
    leave ASSIGNED (their dot begun, or decided) the others keep their transaction:
    a task in flight is never joined by a second one holding the same recipients."""
    spool = Spool()
    rcpts = tuple(f"u{k}@big.example" for k in range(120)) + ("a@small.example",) * 3
    spool.apply(Accept(1000, "m1", "s@example.org", rcpts, b"x\r\n", "a"))
    spool.apply(Assign(1001, tuple(Assignment("m1", k, "a", 1) for k in range(123))))

    async def propose(data: bytes, timeout: float) -> bytes:
        raise AssertionError("nothing to propose here")

    node = SimpleNamespace(
        machine=SimpleNamespace(spool=spool), policy=Policy(),
        raft=SimpleNamespace(propose=propose),
        cfg=SimpleNamespace(node=SimpleNamespace(id="a"), delivery=SimpleNamespace(
            concurrency=2, destination_concurrency=1, destination_recipient_limit=50, **SMARTHOST)),
    )  # fmt: skip
    worker = Worker(cast("Node", node))
    before = worker._transactions(spool.messages["m1"])
    sizes = {job[2:]: len(ks) for job, ks in before.items()}
    assert sizes == {("big.example", 0): 50, ("big.example", 1): 50, ("big.example", 2): 20,
                     ("small.example", 0): 3}  # fmt: skip
    spool.apply(BeginDot(1002, "m1", tuple(range(0, 120, 2)), "a", 1))  # half of them sending
    after = worker._transactions(spool.messages["m1"])
    for job, ks in after.items():
        assert set(ks) <= set(before[job])  # the rest stay where they were
