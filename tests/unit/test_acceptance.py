"""Node.submit: 451 only when the Accept can be in no log; otherwise wait and settle."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import sys
from collections.abc import Iterator

import pytest

from mailqueue import codec
from mailqueue.bodies import DiskBodies
from mailqueue.commands import Accept
from mailqueue.machine import encode_result
from mailqueue.spool import REPLAY_WINDOW_MS, Applied
from raft.core import NotLeader, TransferInProgress
from raft.node import LeaderChanged, NoLeader, ProposalLost
from smtpcluster.config import load
from smtpcluster.frontend import AcceptRefused
from smtpcluster.node import ACCEPT_HARD_CAP_S, ATTEMPT_MAX_S, ATTEMPT_S, Node

CONFIG = """
[node]
id = "n1"
data_dir = "{d}/data"
[cluster]
listen = "127.0.0.1:7400"
peers = {{ n1 = "127.0.0.1:7400" }}
key_file = "{d}/key"
[smtp]
hostname = "relay.test"
[admin]
token_file = "{d}/token"
"""
ACCEPT = Accept(1, "m1", "a@example.org", ("u@x.example",), b"body", "n1")


@pytest.fixture
def made(tmp_path: pathlib.Path) -> Iterator[list[Node]]:
    """The nodes a test made, closed after it: never started, they still opened their
    log and body files."""
    nodes: list[Node] = []
    yield nodes
    for n in nodes:
        n.raft.storage.close()
        bodies = n.machine.spool.bodies
        if isinstance(bodies, DiskBodies):
            bodies.close()


Outcomes = list[BaseException | Applied | None]


def node(made: list[Node], tmp_path: pathlib.Path, outcomes: Outcomes) -> Node:
    (tmp_path / "key").write_text("k" * 32)
    (tmp_path / "token").write_text("t" * 32)
    (tmp_path / "n1.toml").write_text(CONFIG.format(d=tmp_path))
    n = Node(load(str(tmp_path / "n1.toml")))
    made.append(n)
    script = iter(outcomes)

    async def propose(data: bytes, timeout: float = 10.0) -> bytes:
        outcome = next(script, None)
        if isinstance(outcome, TimeoutError):
            await asyncio.sleep(min(timeout, 0.02))  # an attempt that waited, unanswered
        if isinstance(outcome, Applied):
            return encode_result(outcome)
        if outcome is not None:
            raise outcome
        return encode_result(Applied(True, "accepted"))

    n.raft.propose = propose  # type: ignore[method-assign]
    return n


def test_refusals_before_any_leader_saw_it_end_in_451(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    n = node(made, tmp_path, [NoLeader("none")] * 1000)
    with pytest.raises(TimeoutError):
        asyncio.run(n.submit(ACCEPT, timeout=0.2, hard_cap=5))
    assert n.fate_unknown == 0


def test_an_unsettled_attempt_keeps_the_client_waiting_past_the_timeout(
    made: list[Node],
    tmp_path: pathlib.Path,
) -> None:
    # The first attempt reached a leader and timed out; no leader for a while (longer
    # than the timeout); then the same Accept goes through: 250, not 451.
    outcomes: Outcomes = [TimeoutError(), *[NoLeader("none")] * 10]
    n = node(made, tmp_path, outcomes)
    assert asyncio.run(n.submit(ACCEPT, timeout=0.1, hard_cap=5)) is True


def test_a_leader_that_lost_its_place_mid_proposal_keeps_the_client_waiting(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    """Chaos seed 12: this node led, was paused, and woke up still leading in its own
    eyes. Its first attempt timed out (its entry went on to commit under the new
    leader); the second was refused with NotLeader when it stepped down. That refusal
    reached the client as a 5xx, for a message that was then delivered."""
    n = node(made, tmp_path, [TimeoutError(), NotLeader("n2"), TransferInProgress("n3")])
    assert asyncio.run(n.submit(ACCEPT, timeout=0.1, hard_cap=5)) is True
    assert n.fate_unknown == 0


def test_a_lost_proposal_is_proposed_again(made: list[Node], tmp_path: pathlib.Path) -> None:
    n = node(made, tmp_path, [ProposalLost("overwritten"), ProposalLost("again")])
    assert asyncio.run(n.submit(ACCEPT, timeout=5)) is True


def test_an_attempt_never_settled_gives_up_at_the_hard_cap_and_says_so(
    made: list[Node],
    tmp_path: pathlib.Path,
) -> None:
    n = node(made, tmp_path, [TimeoutError()] * 1000)
    with pytest.raises(TimeoutError):
        asyncio.run(n.submit(ACCEPT, timeout=0.05, hard_cap=0.3))
    assert n.fate_unknown == 1


def test_an_accept_the_spool_refuses_is_reported_not_retried(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    n = node(made, tmp_path, [Applied(False, "a rule of a newer spool")])
    with pytest.raises(AcceptRefused, match="newer spool"):
        asyncio.run(n.submit(ACCEPT, timeout=5))
    assert n.fate_unknown == 0


def test_tombstones_outlast_the_time_a_front_end_proposes_the_same_accept() -> None:
    """A front end proposes an Accept again for at most ACCEPT_HARD_CAP_S; the spool
    takes a copy, and keeps a tombstone, for REPLAY_WINDOW_MS of the accepting node's
    time, with room to spare, and not for long: a day's worth was GiBs at a few hundred
    messages/s."""
    assert ACCEPT_HARD_CAP_S * 1000 * 4 <= REPLAY_WINDOW_MS <= 2 * 3600 * 1000


def test_after_the_clock_steps_back_a_node_stamps_no_earlier_than_before(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    """The spool measures a copy's age by the accepting node's newest stamp: stamped
    by a clock that stepped back an hour, a fresh Accept would look too late."""
    n = node(made, tmp_path, [None])
    scripted, sent = n.raft.propose, []

    async def recording(data: bytes, timeout: float = 10.0) -> bytes:
        sent.append(codec.decode(data))
        return await scripted(data, timeout)

    n.raft.propose = recording  # type: ignore[method-assign]
    n.spool.clocks["n1"] = ACCEPT.at + 3_600_000
    assert asyncio.run(n.submit(ACCEPT, timeout=5))
    assert [getattr(c, "at", None) for c in sent] == [ACCEPT.at + 3_600_000]


def test_a_removed_node_closes_its_front_ends_and_starts_no_more_deliveries(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    n = node(made, tmp_path, [])
    n.frontends_up = True
    n.raft.removed = True  # as the leader's frame sets it

    async def run() -> None:
        await asyncio.wait_for(n._stop_taking_mail_once_removed(), 30)

    asyncio.run(run())
    assert not n.frontends_up and n.worker.draining


def test_an_attempt_holds_the_message_once_encoded_not_also_as_the_accept(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    """What Node.submit keeps for its attempts is the encoded Accept; the Accept itself,
    as large as the message, goes once encoded (the front end keeps no reference)."""
    n = node(made, tmp_path, [])
    held: list[str] = []
    proposed: list[bytes] = []

    async def propose(data: bytes, timeout: float = 10.0) -> bytes:
        proposed.append(data)
        frame = sys._getframe(1)
        assert frame.f_code.co_name == "submit"
        held.extend(k for k, v in frame.f_locals.items() if isinstance(v, Accept))
        return encode_result(Applied(True, "accepted"))

    n.raft.propose = propose  # type: ignore[method-assign]
    assert asyncio.run(n.submit(dataclasses.replace(ACCEPT), timeout=1)) is True
    assert held == [] and codec.decode(proposed[0]) == ACCEPT


def test_an_attempt_that_committed_late_is_not_proposed_again(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    """Its timeout passed, but the Accept was applied meanwhile: 250 from the spool,
    without one more copy of the message in every log."""
    n = node(made, tmp_path, [])
    calls: list[float] = []

    async def propose(data: bytes, timeout: float = 10.0) -> bytes:
        calls.append(timeout)
        n.spool.apply(codec.decode(data))  # it commits, just after the attempt gave up
        raise TimeoutError

    n.raft.propose = propose  # type: ignore[method-assign]
    assert asyncio.run(n.submit(ACCEPT, timeout=10, hard_cap=30)) is True
    assert len(calls) == 1 and "m1" in n.spool.messages


def timeouts_of(n: Node) -> list[float]:
    """The timeout of each attempt n's scripted propose is asked for, as they come."""
    calls: list[float] = []
    scripted = n.raft.propose

    async def propose(data: bytes, timeout: float = 10.0) -> bytes:
        calls.append(timeout)
        return await scripted(data, timeout)

    n.raft.propose = propose  # type: ignore[method-assign]
    return calls


def test_each_retry_of_a_stuck_accept_waits_twice_as_long(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    """Every attempt adds a copy of the message to every log; retried every 3 s, ten
    24 MiB messages kept a busy cluster appending copies of them and committing none."""
    n = node(made, tmp_path, [TimeoutError()] * 6)
    calls = timeouts_of(n)
    assert asyncio.run(n.submit(ACCEPT, timeout=100, hard_cap=500)) is True
    assert calls[:7] == [ATTEMPT_S * 2**k for k in range(5)] + [ATTEMPT_MAX_S] * 2


def test_a_leader_change_is_retried_at_once_without_a_longer_wait(
    made: list[Node], tmp_path: pathlib.Path
) -> None:
    """The attempt's leader gave way: its fate is unknown, as after a timeout, so the
    client is not answered 451 for it; but nothing says the cluster is slow."""
    n = node(made, tmp_path, [LeaderChanged("n2 gave way to n3")] * 3)
    calls = timeouts_of(n)
    assert asyncio.run(n.submit(ACCEPT, timeout=100, hard_cap=500)) is True
    assert calls == [ATTEMPT_S] * 4
