"""The delivery worker's own arithmetic (its deliveries are tested against real
servers in tests/integration/test_delivery.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from mailqueue.commands import Accept, Assign, Assignment, BeginDot
from mailqueue.machine import SpoolMachine
from mailqueue.policy import Policy
from mailqueue.spool import RcptState, Spool
from smtpcluster.clock import ClusterClock
from smtpcluster.smtp_client import Transaction
from smtpcluster.worker import Worker

if TYPE_CHECKING:
    from smtpcluster.node import Node


DELIVERY: dict[str, object] = {  # the rest of [delivery] a Worker reads
    "smarthost_tls": "may", "smarthost_ca_file": "", "smarthost_login": None,
    "smarthost_tls_wrapper": False, "route_tls": {}, "route_ca_file": "",
    "source_addresses": (),
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
            concurrency=2, destination_concurrency=1, destination_recipient_limit=50, **DELIVERY)),
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
            concurrency=2, destination_concurrency=1, destination_recipient_limit=50, **DELIVERY)),
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


def worker_node(
    machine: SpoolMachine, propose: Callable[[bytes, float], Awaitable[bytes]]
) -> object:
    """A node for a worker of node a, delivering through a smarthost, Raft standing in
    by `propose`."""
    delivery = SimpleNamespace(
        concurrency=2, destination_concurrency=1, destination_recipient_limit=50,
        smarthost="127.0.0.1:2525", routes={}, on_uncertain="redeliver", **DELIVERY)  # fmt: skip
    return SimpleNamespace(
        machine=machine, policy=Policy(retry_schedule_ms=(60_000,)),
        raft=SimpleNamespace(propose=propose), clock=ClusterClock(lambda: machine.spool.now),
        cfg=SimpleNamespace(node=SimpleNamespace(id="a"), delivery=delivery,
                            smtp=SimpleNamespace(hostname="w.test")),
        metrics=SimpleNamespace(delivery_seconds=Recorded(), outcomes=Recorded()),
    )  # fmt: skip


class Recorded:
    """A metric that takes anything (metrics are tested in test_metrics)."""

    def observe(self, value: float) -> None: ...
    def inc(self) -> None: ...
    def labels(self, *names: str) -> Recorded:
        return self


def assigned_worker(now: int) -> tuple[Worker, Spool]:
    """Node a's worker, over a spool where message m1's one recipient is assigned to
    it; what it proposes is applied at once."""
    machine = SpoolMachine()
    machine.spool.apply(Accept(now, "m1", "s@example.org", ("u@x.example",), b"x\r\n", "a"))
    machine.spool.apply(Assign(now, (Assignment("m1", 0, "a", 1),)))
    index = iter(range(1, 1000))

    async def propose(data: bytes, timeout: float) -> bytes:
        return machine.apply(next(index), data)

    return Worker(cast("Node", worker_node(machine, propose))), machine.spool


class Failing:
    """A connection pool whose transaction raises what no SMTP failure raises (as
    aiosmtplib's ValueError for a control character in an address), after passing the
    fence or before it."""

    def __init__(self, fence_first: bool) -> None:
        self.fence_first = fence_first
        self.calls = 0

    async def deliver(self, job: object, fence: Callable[[list[int]], Awaitable[bool]]) -> None:
        self.calls += 1
        if self.fence_first:
            assert await fence([0])
        raise ValueError("Command arg contains a prohibited control character")


@pytest.mark.parametrize("fence_first", [False, True])
def test_an_attempt_that_fails_unexpectedly_is_settled_not_retried_at_once(
    fence_first: bool,
) -> None:
    """It used to stay assigned, and the next poll (50 ms) tried it again, forever.
    Deferred by the retry schedule instead; uncertain once its dot may have gone out
    (on_uncertain = redeliver queues it again, the attempt counted)."""
    now = int(time.time() * 1000)
    worker, spool = assigned_worker(now)
    pool = Failing(fence_first)
    worker.pool = pool  # type: ignore[assignment]
    [(job, ks)] = worker._transactions(spool.messages["m1"]).items()
    asyncio.run(worker.deliver(job, ks))
    rcpt = spool.messages["m1"].rcpts[0]
    assert rcpt.state is RcptState.QUEUED and rcpt.attempts == 1
    want = "4.4.2 connection lost after the final dot" if fence_first else "4.3.0 internal error"
    assert rcpt.last_error.startswith(want), rcpt.last_error
    assert rcpt.next_attempt >= now + 60_000  # waits for the schedule, not the next poll
    assert spool.uncertain_total == (1 if fence_first else 0)
    assert pool.calls == 1 and not worker.inflight
    assert worker.bugs == 1  # smtpcluster_internal_errors_total{part="delivery"}


class Refusing:
    """A connection pool whose remote refuses the recipient in a two-line reply holding
    a Latin-1 byte, as aiosmtplib hands it over (surrogateescape, lines joined by LF)."""

    async def deliver(self, job: object, fence: object) -> Transaction:
        return Transaction(rcpt_replies={0: (550, "5.1.1 caf\udce9 unknown\n5.1.1 user")})


def test_a_reply_with_a_latin1_byte_and_two_lines_is_kept_clean_and_settled() -> None:
    """It could not be encoded: the Outcome never committed, and the recipient stayed
    assigned. Kept as valid UTF-8 on one line, it bounces, and its DSN can be sent."""
    now = int(time.time() * 1000)
    worker, spool = assigned_worker(now)
    worker.pool = Refusing()  # type: ignore[assignment]
    [(job, ks)] = worker._transactions(spool.messages["m1"]).items()
    asyncio.run(worker.deliver(job, ks))
    rcpt = spool.messages["m1"].rcpts[0]
    assert rcpt.state is RcptState.BOUNCED
    assert rcpt.reply == "550 5.1.1 caf\ufffd unknown 5.1.1 user"


class Blocking:
    """A connection pool whose transactions wait until released, then deliver."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def deliver(
        self, job: object, fence: Callable[[list[int]], Awaitable[bool]]
    ) -> Transaction:
        self.calls += 1
        await self.release.wait()
        assert await fence([0])
        return Transaction(
            rcpt_replies={0: (250, "2.1.5 ok")}, final=(250, "2.0.0 ok"), dot_sent=True
        )


def test_a_reload_that_regroups_recipients_never_starts_a_second_transaction_for_one() -> None:
    """A reload may give x.example a route: the recipient in flight towards the
    smarthost then belongs to another transaction (another destination). Started, that
    one's BeginDot (the same attempt) would be accepted too, and the mail sent twice."""
    now = int(time.time() * 1000)
    worker, spool = assigned_worker(now)
    pool = Blocking()
    worker.pool = pool  # type: ignore[assignment]

    async def run() -> None:
        worker.dispatch()
        await asyncio.sleep(0)  # the first transaction starts and waits in the pool
        node = cast("SimpleNamespace", worker.node)
        node.policy = Policy(retry_schedule_ms=(60_000,), routes={"x.example": "127.0.0.1:2600"})
        [job] = worker._transactions(spool.messages["m1"])
        assert job not in worker.inflight  # regrouped: another destination
        worker.dispatch()
        await asyncio.sleep(0)
        assert pool.calls == 1
        pool.release.set()
        await asyncio.gather(*worker.tasks)

    asyncio.run(run())
    rcpt = spool.messages.get("m1")
    assert rcpt is None or rcpt.rcpts[0].state is RcptState.DELIVERED
    assert pool.calls == 1 and not worker.sending
