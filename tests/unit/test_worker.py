"""The delivery worker's own arithmetic (its deliveries are tested against real
servers in tests/integration/test_delivery.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from mailqueue.commands import Accept
from mailqueue.policy import Policy
from mailqueue.spool import Spool
from smtpcluster.worker import Worker

if TYPE_CHECKING:
    from smtpcluster.node import Node


def test_a_retry_is_timed_from_the_spools_time_when_this_clock_lags() -> None:
    """The scheduler counts from the later of its clock and the spool's; a worker whose
    clock is an hour behind must not ask for the retry an hour early."""
    spool = Spool()
    ahead = int(time.time() * 1000) + 3600 * 1000
    spool.apply(Accept(ahead, "m1", "s@example.org", ("u@x.example",), b"x\r\n", "b"))
    schedule = (60_000, 300_000)

    async def propose(data: bytes, timeout: float) -> bytes:
        raise AssertionError("nothing to propose here")

    node = SimpleNamespace(
        machine=SimpleNamespace(spool=spool), policy=Policy(retry_schedule_ms=schedule),
        raft=SimpleNamespace(propose=propose),
        cfg=SimpleNamespace(node=SimpleNamespace(id="a"), delivery=SimpleNamespace(
            concurrency=2, destination_concurrency=1)),
    )  # fmt: skip
    worker = Worker(cast("Node", node))
    assert worker._retry_at("m1", 0) == ahead + schedule[0]
