"""Group commit of the worker's commands (smtpcluster.batcher), against a spool
machine standing in for Raft."""

from __future__ import annotations

import asyncio

import pytest

from mailqueue import codec
from mailqueue.commands import (
    Accept,
    Assign,
    Assignment,
    Batch,
    BeginDot,
    Command,
    Outcome,
    OutcomeKind,
    RcptResult,
)
from mailqueue.machine import SpoolMachine
from smtpcluster.batcher import Batcher


class FakeRaft:
    """Applies each proposal once `gate` opens; records what was proposed."""

    def __init__(self) -> None:
        self.sm = SpoolMachine()
        self.proposed: list[Command] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def propose(self, data: bytes, timeout: float) -> bytes:
        self.proposed.append(codec.decode(data))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.sm.apply(len(self.proposed), data)


def queued(raft: FakeRaft, n: int) -> None:
    for k in range(n):
        raft.sm.apply(0, codec.encode(Accept(1, f"m{k}", "s@x", ("u@y.example",), b"b", "a")))
    assignments = tuple(Assignment(f"m{k}", 0, "a", 1) for k in range(n))
    raft.sm.apply(0, codec.encode(Assign(1, assignments)))


def started(n: int) -> tuple[FakeRaft, Batcher]:
    """A batcher over a spool holding `n` messages, each assigned to node a."""
    raft = FakeRaft()
    queued(raft, n)
    return raft, Batcher(raft.propose, 10)


def test_commands_made_while_one_is_in_flight_go_together_each_with_its_result() -> None:
    async def run() -> None:
        raft, batcher = started(4)
        first = asyncio.create_task(batcher.submit(BeginDot(2, "m0", (0,), "a", 1)))
        await asyncio.sleep(0)  # the first is in flight, alone
        rest = [
            asyncio.create_task(batcher.submit(BeginDot(3, "m1", (0,), "a", 1))),
            asyncio.create_task(batcher.submit(BeginDot(3, "m2", (0,), "b", 1))),  # not b's
            asyncio.create_task(batcher.submit(BeginDot(4, "m3", (0,), "a", 1))),
        ]
        await asyncio.sleep(0)
        raft.gate.set()
        assert (await first).ok
        assert [(await t).ok for t in rest] == [True, False, True]
        assert raft.proposed[0] == BeginDot(2, "m0", (0,), "a", 1)
        assert isinstance(raft.proposed[1], Batch) and len(raft.proposed[1].commands) == 3
        assert raft.proposed[1].at == 4 and len(raft.proposed) == 2

    asyncio.run(run())


def test_a_batch_whose_fate_is_unknown_leaves_every_command_in_it_unknown() -> None:
    async def run() -> None:
        raft, batcher = started(2)
        raft.fail = TimeoutError("no quorum")
        tasks = [
            asyncio.create_task(batcher.submit(BeginDot(2, f"m{k}", (0,), "a", 1)))
            for k in range(2)
        ]
        await asyncio.sleep(0)
        raft.gate.set()
        for t in tasks:
            with pytest.raises(TimeoutError, match="no quorum"):
                await t
        raft.fail = None  # and the batcher goes on with the next commands
        assert (await batcher.submit(BeginDot(3, "m0", (0,), "a", 1))).ok

    asyncio.run(run())


def test_a_stopping_node_leaves_nobody_waiting_and_nothing_queued() -> None:
    async def run() -> None:
        raft, batcher = started(2)
        tasks = [asyncio.create_task(batcher.submit(BeginDot(2, "m0", (0,), "a", 1)))]
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # m0 in flight...
        tasks.append(asyncio.create_task(batcher.submit(BeginDot(2, "m1", (0,), "a", 1))))
        await asyncio.sleep(0)  # ...and m1 waiting for it
        assert raft.proposed == [BeginDot(2, "m0", (0,), "a", 1)] and batcher._flushing
        batcher._flushing.cancel()  # what the loop's shutdown does
        for t in tasks:
            with pytest.raises(asyncio.CancelledError):
                await t
        raft.gate.set()
        await batcher.submit(BeginDot(3, "m1", (0,), "a", 1))
        assert raft.proposed[1:] == [BeginDot(3, "m1", (0,), "a", 1)]  # not the forgotten m1

    asyncio.run(run())


def test_a_command_that_cannot_be_encoded_fails_alone_and_nobody_waits_for_ever() -> None:
    """A reply text holding a lone surrogate (aiosmtplib's decoding of a Latin-1 byte)
    cannot be encoded. Its batch used to stay unanswered, its callers waiting for
    ever with their delivery slots; now it alone fails, and its batch mates commit."""
    bad = Outcome(3, "m1", "a", 1, (RcptResult(0, OutcomeKind.FAILED, "550 caf\udce9"),))

    async def run() -> None:
        raft, batcher = started(3)
        first = asyncio.create_task(batcher.submit(BeginDot(2, "m0", (0,), "a", 1)))
        await asyncio.sleep(0)  # in flight: the next two wait and go together
        good = asyncio.create_task(batcher.submit(BeginDot(3, "m2", (0,), "a", 1)))
        poison = asyncio.create_task(batcher.submit(bad))
        await asyncio.sleep(0)
        raft.gate.set()
        assert (await first).ok
        with pytest.raises(UnicodeEncodeError):
            await asyncio.wait_for(poison, 5)
        assert (await asyncio.wait_for(good, 5)).ok

    asyncio.run(run())
