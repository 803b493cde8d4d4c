"""The runtime keeps running while a snapshot is cut in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import pathlib
import struct
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator

import cbor2
import pytest

from raft import codec
from raft.core import RaftError, Role
from raft.kv import KV, put
from raft.node import _RAFT, LeaderChanged, NodeConfig, RaftNode, _after_kind
from raft.progress import ProgressState
from raft.transport import Address
from raft.types import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    Ready,
    RequestVote,
)
from tests.integration.kvcluster import free_port, free_ports


class GatedKV(KV):
    """A KV whose snapshot stops half-way until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.gate = threading.Event()
        self.gate_timed_out = False
        self.done = 0

    def snapshot(self) -> Iterable[bytes]:
        return self._gated(iter(super().snapshot()))  # the state is taken now

    def _gated(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        yield next(chunks)
        self.inside.set()
        # Only a test that still runs can open the gate: if the snapshot blocked the
        # event loop, nobody could, and the wait would time out.
        self.gate_timed_out = not self.gate.wait(5)
        yield from chunks

    def snapshot_done(self) -> None:
        self.done += 1


def snapshot_state(node: RaftNode) -> KV:
    """The state machine as the node's latest snapshot holds it."""
    meta = node.storage.snapshot
    assert meta is not None
    data = b"".join(node.storage.snapshot_chunks(meta))
    (peers,) = struct.unpack_from("<I", data)  # the peers' addresses come first
    kv = KV()
    kv.restore(iter([data[4 + peers :]]))
    return kv


async def _until(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _leader_alone(
    tmp_path: pathlib.Path, kv: KV, snapshot_entries: int | None = None
) -> RaftNode:
    """One node on loopback that is its own cluster, started and leading."""
    addr = Address("127.0.0.1", free_port("127.0.0.1"))
    cfg = NodeConfig("n1", addr, {"n1": addr}, str(tmp_path), b"k" * 32, tick_ms=5)
    if snapshot_entries is not None:
        cfg = dataclasses.replace(cfg, snapshot_entries=snapshot_entries)
    node = RaftNode(cfg, kv)
    await node.start()
    await _until(lambda: node.core.role is Role.LEADER)
    return node


async def _one_entry_each(node: RaftNode, datas: list[bytes]) -> list[asyncio.Task[bytes]]:
    """Propose without waiting for the results, but each in a log entry of its own
    (proposals made together would share one batch entry)."""
    tasks = []
    for data in datas:
        last = node.core.log.last_index()
        tasks.append(asyncio.create_task(node.propose(data)))
        await _until(lambda last=last: node.core.log.last_index() > last)
    return tasks


def test_a_slow_snapshot_holds_back_neither_applying_nor_the_raft_loop(
    tmp_path: pathlib.Path,
) -> None:
    async def run() -> None:
        kv = GatedKV()
        node = await _leader_alone(tmp_path, kv, snapshot_entries=5)
        early = await _one_entry_each(node, [put(f"k{k}", b"v") for k in range(6)])
        await _until(kv.inside.is_set)  # a snapshot is due at 5: its thread is parked
        late = await _one_entry_each(node, [put(f"k{k % 6}", b"late") for k in range(20)])
        await asyncio.gather(*early, *late)  # applied while the snapshot is parked
        assert set(kv.data.values()) == {b"late"}
        assert node.storage.snapshot is None and not kv.gate.is_set() and kv.done == 0
        kv.gate.set()
        await _until(lambda: node.storage.snapshot is not None and node._snap_task is None)
        assert not kv.gate_timed_out and kv.done == 1
        # The snapshot holds the state from when it was due, not what applied after.
        snap, meta = snapshot_state(node), node.storage.snapshot
        assert meta is not None and snap.applied == meta.index < kv.applied
        assert snap.data and set(snap.data.values()) == {b"v"}
        await node.stop()

    asyncio.run(run())


class CountingKV(GatedKV):
    def __init__(self) -> None:
        super().__init__()
        self.taken = 0
        self.ended = threading.Event()  # set once the node is done with a snapshot

    def snapshot(self) -> Iterable[bytes]:
        self.taken += 1
        return super().snapshot()

    def snapshot_done(self) -> None:
        super().snapshot_done()
        self.ended.set()


def test_a_snapshot_is_not_cut_again_on_a_ready_made_before_the_last_one_ended(
    tmp_path: pathlib.Path,
) -> None:
    """The snapshot ends while the Ready loop awaits a write; the Ready being written
    said "due" when the old snapshot was still the last. Acting on it cut the whole
    state again at once: two snapshots for one, every time."""

    async def run() -> None:
        kv = CountingKV()
        node = await _leader_alone(tmp_path, kv, snapshot_entries=5)
        write = node.persist
        armed = threading.Event()

        def write_after_the_snapshot(rd: Ready) -> None:
            if rd.snapshot_due and armed.is_set() and not kv.gate.is_set():
                kv.gate.set()  # the snapshot ends while this Ready is being written
                kv.ended.wait(10)
            write(rd)

        node.persist = write_after_the_snapshot
        await asyncio.gather(*await _one_entry_each(node, [put(f"k{k}", b"v") for k in range(6)]))
        await _until(kv.inside.is_set)
        # Applied after the snapshot's point, so that another would have something new.
        await asyncio.gather(*await _one_entry_each(node, [put(f"j{k}", b"v") for k in range(3)]))
        armed.set()
        await node.propose(put("during", b"v"))  # its Ready is due, written as it ends
        await _until(lambda: kv.gate.is_set() and node._snap_task is None)
        await node.propose(put("after", b"v"))
        assert node.storage.snapshot is not None and kv.done >= 1
        assert kv.taken == 1, "a second snapshot right after the first"
        await node.stop()

    asyncio.run(run())


class FullDiskKV(KV):
    """A KV whose snapshots fail as on a full disk while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True
        self.attempts = 0

    def snapshot(self) -> Iterable[bytes]:
        self.attempts += 1
        chunks = list(super().snapshot())
        if self.full:
            chunks.append(b"")  # a marker the generator below turns into the error
        return self._failing(chunks)

    @staticmethod
    def _failing(chunks: list[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if not chunk:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield chunk


def test_a_failed_snapshot_is_retried_after_a_pause_not_at_every_entry(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        kv = FullDiskKV()
        node = await _leader_alone(tmp_path, kv, snapshot_entries=5)
        await asyncio.gather(*await _one_entry_each(node, [put(f"k{k}", b"v") for k in range(6)]))
        await _until(lambda: kv.attempts >= 1 and node._snap_task is None)
        # Still due after each of these entries, but within the pause: no new attempt.
        await asyncio.gather(*await _one_entry_each(node, [put(f"j{k}", b"v") for k in range(20)]))
        assert kv.attempts == 1 and node.storage.snapshot is None
        assert "No space left on device" in caplog.text and "next attempt in 5 s" in caplog.text
        kv.full = False
        node._snap_retry_at = 0.0  # the pause is over
        await node.propose(put("after", b"v"))
        await _until(lambda: node.storage.snapshot is not None)
        assert kv.attempts == 2
        await node.stop()

    asyncio.run(run())


def test_restart_restores_from_the_snapshot_and_the_log(tmp_path: pathlib.Path) -> None:
    async def run(kv: KV) -> RaftNode:
        return await _leader_alone(tmp_path, kv, snapshot_entries=10)

    async def first() -> None:
        node = await run(KV())
        for k in range(25):
            await node.propose(put(f"k{k}", b"%d" % k))
        await _until(lambda: node.storage.snapshot is not None and node._snap_task is None)
        await node.stop()

    async def second() -> dict[str, bytes]:
        kv = KV()
        node = await run(kv)
        await node.read_index()
        await node.stop()
        return kv.data

    asyncio.run(first())
    data = asyncio.run(second())
    assert data == {f"k{k}": b"%d" % k for k in range(25)}


class BrokenKV(KV):
    """A state machine with a bug: applying the key "boom" raises."""

    def apply(self, index: int, command: bytes | memoryview) -> bytes:
        if cbor2.loads(command)[1] == "boom":
            raise KeyError("boom")
        return super().apply(index, command)


def test_a_failing_apply_is_reported_not_swallowed(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        node = await _leader_alone(tmp_path, BrokenKV())
        await node.propose(put("fine", b"v"))
        assert node.failure is None
        boom = asyncio.create_task(node.propose(put("boom", b"v")))
        await asyncio.wait_for(node.failed.wait(), 10)
        assert node.failure is not None and "ready loop" in str(node.failure)
        assert "KeyError('boom')" in str(node.failure)
        boom.cancel()
        await node.stop()  # a failed task does not make stopping fail too

    with caplog.at_level(logging.CRITICAL):
        asyncio.run(run())
    assert "no longer takes part in the cluster" in caplog.text


class EchoKV(KV):
    """Answers each put with its own key, so a result can be matched to its proposal.
    Keeps the type each proposal came as: a large one is a view of its log entry."""

    def __init__(self) -> None:
        super().__init__()
        self.came_as: dict[str, type] = {}

    def apply(self, index: int, command: bytes | memoryview) -> bytes:
        self.came_as[cbor2.loads(command)[1]] = type(command)
        super().apply(index, command)
        key: str = cbor2.loads(command)[1]
        return key.encode()


def test_proposals_made_together_share_an_entry_and_get_their_own_results(
    tmp_path: pathlib.Path,
) -> None:
    async def run(kv: KV) -> tuple[list[bytes], int]:
        node = await _leader_alone(tmp_path, kv)
        before = node.core.log.last_index()
        results = await asyncio.gather(*(node.propose(put(f"k{k}", b"v")) for k in range(50)))
        entries = node.core.log.last_index() - before
        await node.stop()
        return list(results), entries

    results, entries = asyncio.run(run(EchoKV()))
    assert results == [f"k{k}".encode() for k in range(50)]
    assert entries < 50  # batched: one entry per pass of the Ready loop
    replayed = EchoKV()
    asyncio.run(run(replayed))  # a restart applies the batch entries from the log again
    assert {f"k{k}" for k in range(50)} <= set(replayed.data)


@contextlib.asynccontextmanager
async def _three(
    tmp_path: pathlib.Path,
) -> AsyncIterator[tuple[list[RaftNode], dict[str, EchoKV]]]:
    """Three in-process nodes on loopback, started, one of them leader; stopped on the
    way out, but for those the test stopped itself."""
    ports = free_ports("127.0.0.1", 3)
    addrs = {f"n{k}": Address("127.0.0.1", port) for k, port in enumerate(ports, 1)}
    kvs = {n: EchoKV() for n in addrs}
    nodes = [
        RaftNode(NodeConfig(n, a, addrs, str(tmp_path / n), b"k" * 32, tick_ms=5), kvs[n])
        for n, a in addrs.items()
    ]
    for node in nodes:
        await node.start()
    try:
        await _until(lambda: any(n.core.role is Role.LEADER for n in nodes))
        yield nodes, kvs
    finally:
        for node in nodes:
            if not node.stopped:
                await node.stop()


def test_a_follower_applies_its_proposal_though_the_leader_never_hears_its_ack(
    tmp_path: pathlib.Path,
) -> None:
    """The leader tells a follower that forwarded a proposal when its own copy is
    durable (raft.types.Persisted): with the follower's copy that is a majority of
    three, so the follower counts the commit itself, a round trip before the leader's
    word would come. Here that word never comes: the third node is down and the leader
    never hears the follower's acknowledgements, yet the proposal is applied."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            taker, third = (n for n in nodes if n is not leader)
            await _until(lambda: taker.cfg.id in leader._counters)  # its hello arrived

            # Caught up first: a leader still probing it would resend from below what it
            # counted committed, which it answers only with an ack the leader never hears.
            def caught_up() -> bool:
                pr = leader.core.prs.get(taker.cfg.id)
                return (
                    pr is not None
                    and pr.state is ProgressState.REPLICATE
                    and pr.match == leader.core.log.last_index()
                )

            await _until(caught_up)
            await third.stop()
            send = taker.transport.send

            def deaf(to: str, payload: bytes | codec.Pieces, *, urgent: bool = False) -> None:
                frame = codec.joined(payload)
                if frame[:1] != b"R" or not isinstance(
                    codec.decode_message(frame[1:]), AppendEntriesResponse
                ):
                    send(to, payload, urgent=urgent)

            taker.transport.send = deaf  # type: ignore[method-assign]
            assert await taker.propose(put("k", b"v"), timeout=5) == b"k"
            assert leader.core.log.committed < taker.core.log.committed == taker.applied

    asyncio.run(run())


def test_a_peer_whose_hello_is_an_older_releases_gets_neither_persisted_nor_pieces(
    tmp_path: pathlib.Path,
) -> None:
    """A node of an older release cannot decode a Persisted (it would log each one as
    undecodable) nor read a payload in pieces (it would refuse the connection): its
    hello lacks "counts" and "pieces", and its proposals commit the old way."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            old = next(n for n in nodes if n is not leader)
            hello = old._hello_frame

            def older_hello(more: dict[str, float]) -> bytes:
                said = cbor2.loads(hello(more)[1:])
                del said["counts"], said["pieces"]
                return b"V" + cbor2.dumps(said)

            old._hello_frame = older_hello  # type: ignore[method-assign]
            leader._hello(old.cfg.id, cbor2.loads(older_hello({})[1:]))
            assert old.cfg.id not in leader._counters
            reads_pieces = {n: p.pieces for n, p in leader.transport._peers.items()}
            assert reads_pieces == {n.cfg.id: n is not old for n in nodes if n is not leader}
            sent: list[bytes] = []
            send = leader.transport.send

            def watched(to: str, payload: bytes | codec.Pieces, *, urgent: bool = False) -> None:
                if to == old.cfg.id and (frame := codec.joined(payload))[:1] == b"R":
                    sent.append(frame)
                send(to, payload, urgent=urgent)

            leader.transport.send = watched  # type: ignore[method-assign]
            for k in range(5):
                assert await old.propose(put(f"k{k}", b"v"), timeout=5) == f"k{k}".encode()
            kinds = {type(codec.decode_message(p[1:])).__name__ for p in sent}
            assert "AppendEntries" in kinds and "Persisted" not in kinds

    asyncio.run(run())


async def _ready_for_a_change(nodes: list[RaftNode]) -> tuple[RaftNode, RaftNode, RaftNode]:
    """The leader and the two others, once the leader has committed an entry of its own
    term: a membership change needs one first."""
    leader = next(n for n in nodes if n.core.role is Role.LEADER)
    one, other = (n for n in nodes if n is not leader)
    await leader.propose(put("before", b"v"))
    return leader, one, other


def test_a_followers_proposals_are_settled_by_its_own_apply_and_refusals_still_answered(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd's way: a follower forwards a proposal and waits until it applies the entry
    itself; the leader sends no answer frame for a success, only for a refusal."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, kvs):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            await _until(lambda: all(n.core.lead == leader.cfg.id for n in nodes))
            follower, other = (n for n in nodes if n is not leader)
            answers: list[object] = []
            real = follower._answer

            def counted(answer: list[object]) -> None:
                answers.append(answer)
                real(answer)

            monkeypatch.setattr(follower, "_answer", counted)
            results = await asyncio.gather(
                *(follower.propose(put(f"k{k}", b"v")) for k in range(20))
            )
            assert results == [f"k{k}".encode() for k in range(20)]
            assert {f"k{k}" for k in range(20)} <= set(kvs[follower.cfg.id].data)
            assert answers == []
            with pytest.raises(RaftError, match="NotLeader"):  # `other` refuses: answered
                await follower._forward(other.cfg.id, [0, put("refused", b"v")])
            assert len(answers) == 1 and "refused" not in kvs[leader.cfg.id].data

    asyncio.run(run())


def test_a_removed_nodes_forwarded_proposal_is_answered_by_the_leader(
    tmp_path: pathlib.Path,
) -> None:
    """A node removed from the cluster no longer receives the log, so it cannot settle
    its forwarded proposals by applying them: the leader answers those itself (a removed
    node closes its SMTP ports, but a message already under way must get its 250)."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, kvs):
            leader, removed, _ = await _ready_for_a_change(nodes)
            await leader.membership("leave", removed.cfg.id)
            assert removed.cfg.id not in leader.core.conf().members()
            result = await asyncio.wait_for(
                removed._forward(leader.cfg.id, [0, put("after", b"v")]), 5
            )
            assert result == b"after" and kvs[leader.cfg.id].data["after"] == b"v"
            assert "after" not in kvs[removed.cfg.id].data  # it never applied it

    asyncio.run(run())


def test_a_refusal_forwarded_back_names_its_kind_once(tmp_path: pathlib.Path) -> None:
    """The leader sends "Unavailable: why"; it read "Unavailable: Unavailable: why"."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            node = nodes[0]
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            node._forwards[7] = fut
            node._answer([7, None, "Unavailable: leadership moved while j1 caught up"])
            with pytest.raises(RaftError) as caught:
                await fut
            assert str(caught.value) == "leadership moved while j1 caught up"

    asyncio.run(run())


def test_a_message_for_another_node_is_dropped_and_said(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two members at one address: what the leader sends the one reaches the other. It
    must not act on it (a higher term here would have unseated it)."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            node = nodes[0]
            term = node.core.term
            stray = Heartbeat(frm=nodes[1].cfg.id, to="elsewhere", term=term + 5, commit=0)
            node._on_frame(nodes[1].cfg.id, _RAFT + codec.encode_message(stray))
            assert node.core.term == term

    asyncio.run(run())
    assert "a message for elsewhere from n2 reached n1: dropped" in caplog.text, caplog.text


def test_a_peer_counts_as_reachable_only_when_it_answers(tmp_path: pathlib.Path) -> None:
    """A member that cannot hear the leader (its Raft port blocked inbound) still sends
    it pre-votes. Counting those made it look alive, so the scheduler kept giving it
    mail it never learned of, and `cluster status` said REACHABLE yes."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            node, peer = nodes[0], nodes[1].cfg.id
            node.last_answer.pop(peer, None)
            vote = RequestVote(frm=peer, to=node.cfg.id, term=node.core.term + 1,
                               last_index=0, last_term=0, pre_vote=True)  # fmt: skip
            node._on_frame(peer, _RAFT + codec.encode_message(vote))
            assert peer not in node.last_answer
            answer = HeartbeatResponse(frm=peer, to=node.cfg.id, term=node.core.term)
            node._on_frame(peer, _RAFT + codec.encode_message(answer))
            assert peer in node.last_answer

    asyncio.run(run())


def test_the_leader_tells_a_removed_node_that_it_is_out(tmp_path: pathlib.Path) -> None:
    """The removal never reaches the removed node through the log (the leader stops
    replicating to it), so the leader says so once it applies the change; a stale word
    (a configuration this node knows to be older than its own) is not believed."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader, removed, stays = await _ready_for_a_change(nodes)
            assert not any(n.removed for n in nodes)
            await leader.membership("leave", removed.cfg.id)
            await _until(lambda: removed.removed)
            assert removed.core.conf().is_member(removed.cfg.id)  # the log never told it
            assert not leader.removed and not stays.removed
            await _until(lambda: bool(stays.core.log.confs))
            stays._removed_at(stays.core.log.confs[-1][0] - 1, leader.cfg.id)  # stale
            assert not stays.removed

    asyncio.run(run())


def test_a_node_removed_while_it_was_down_is_told_when_it_asks_for_votes(
    tmp_path: pathlib.Path,
) -> None:
    """Replacing a dead VM: the leader's word went nowhere. Back with its old log, the
    node still thinks itself a voter and campaigns; the leader answers that it is out."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader, dead, _ = await _ready_for_a_change(nodes)
            await dead.stop()
            await leader.membership("leave", dead.cfg.id)
            back = RaftNode(dead.cfg, EchoKV())
            await back.start()
            try:
                assert back.core.conf().is_member(dead.cfg.id) and not back.removed
                await _until(lambda: back.removed)
            finally:
                await back.stop()

    asyncio.run(run())


def test_an_entry_of_a_kind_this_version_does_not_know_stops_the_node_naming_it(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer version's entry, met during a rolling upgrade: passing over it would make
    this replica differ from the others, so the node stops at it and says why."""
    kv = KV()

    async def run() -> str:
        node = await _leader_alone(tmp_path, kv)
        await node.propose(put("before", b"v"))
        node.core.propose(cbor2.dumps([99, b"new", [b"boot", 1]]))
        node._wake.set()
        await asyncio.wait_for(node.failed.wait(), 10)
        await node.stop()
        return str(node.failure)

    with caplog.at_level(logging.CRITICAL):
        failure = asyncio.run(run())
    assert "is of kind 99, unknown to this version" in failure
    assert "no longer takes part in the cluster" in caplog.text
    assert kv.data == {"before": b"v"}


def test_each_node_reads_its_peers_clocks_and_the_leader_shows_them(
    tmp_path: pathlib.Path,
) -> None:
    """One node's wall clock runs six days ahead: the others read it so, it reads
    theirs six days behind, and the members' view gives the leader's readings."""
    ahead = 6 * 86400.0

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            fast = nodes[0]
            fast.clocks.wall = lambda: time.time() + ahead

            def read(node: RaftNode, peer: str) -> float | None:
                return node.clocks.offsets().get(peer)

            def all_read() -> bool:
                # Pings answered before the skew was set leave readings of the right
                # clock: wait for the first ones taken since, on both sides.
                pairs = [(a, b) for a in nodes for b in nodes if a is not b]
                if any(read(a, b.cfg.id) is None for a, b in pairs):
                    return False
                return all(
                    (read(a, fast.cfg.id) or 0) > ahead / 2
                    and (read(fast, a.cfg.id) or 0) < -ahead / 2
                    for a in nodes
                    if a is not fast
                )

            await _until(all_read)
            slow = [n for n in nodes if n is not fast]
            for node in slow:
                assert read(node, fast.cfg.id) == pytest.approx(ahead, abs=1)
                assert read(fast, node.cfg.id) == pytest.approx(-ahead, abs=1)
                assert read(node, next(n.cfg.id for n in slow if n is not node)) == (
                    pytest.approx(0, abs=1)
                )
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            shown = {m["id"]: m["clock_offset_s"] for m in leader._members_here()}
            assert shown[leader.cfg.id] == 0.0
            assert shown == pytest.approx(
                {n.cfg.id: read(leader, n.cfg.id) or 0.0 for n in nodes}, abs=1
            )

    asyncio.run(run())


def test_a_transfer_of_leadership_is_answered_once_it_happened_or_was_abandoned(
    tmp_path: pathlib.Path,
) -> None:
    """The core abandons a transfer whose target does not take over within an election
    timeout. The operator was told "ok" at once, and leadership had not moved."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader, one, other = await _ready_for_a_change(nodes)
            await other.stop()
            with pytest.raises(RaftError, match="did not take over"):
                await leader.membership("transfer", other.cfg.id)
            assert leader.core.role is Role.LEADER
            await one.membership("transfer", one.cfg.id)  # asked of a follower, for itself
            assert leader.core.role is not Role.LEADER
            await _until(lambda: one.core.role is Role.LEADER)

    asyncio.run(run())


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_a_large_frame_is_decoded_where_it_lies_to_the_same_message(
    kind: type[bytes] | type[bytearray],
) -> None:
    """Past its kind byte, a frame of codec.LARGE or more is read in place: slicing the
    byte off was one more copy of the whole frame, alive with it and the message. So is
    one that came in pieces (the transport's bytearray): a BytesIO copies that whole."""
    for size in (10, 8 * codec.LARGE):
        m = AppendEntries("a", "b", 1, 0, 0, (Entry(1, 1, EntryKind.NORMAL, b"x" * size),), 0)
        frame = kind(codec.joined(codec.frame_message(b"R", m)))
        tracemalloc.start()
        body = _after_kind(frame)
        assert codec.decode_message(body) == m
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(body, bytes) == (size == 10)
        if size > 10:
            assert peak < 1.5 * size  # the entry's data, decoded; no copy of the frame


def test_a_forward_whose_leader_gave_way_ends_at_once_in_leader_changed(
    tmp_path: pathlib.Path,
) -> None:
    """The leader took a forwarded proposal and died. Its fate is unknown, as after a
    timeout, but that is known as soon as this node knows another leader: the proposer
    hears it then (and tries the new leader), not at the end of its timeout."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            taker = next(n for n in nodes if n is not leader)
            await _until(lambda: taker.core.lead == leader.cfg.id)
            taken: list[int] = []
            leader._serve_forward = lambda peer, req, envelope: taken.append(req)  # type: ignore[method-assign]
            proposal = asyncio.create_task(taker.propose(put("k", b"v"), timeout=60))
            await _until(lambda: taken != [])
            await leader.stop()
            with pytest.raises(LeaderChanged):
                await proposal
            assert taker.core.lead != leader.cfg.id

    asyncio.run(run())


def test_a_proposal_waiting_for_a_leader_wakes_when_one_is_known(
    tmp_path: pathlib.Path,
) -> None:
    """With no leader known, a proposal waits for the leader to change, not only for a
    poll's sleep, which woke it up to half a second after the election. Its bound here is
    an hour: only the change can end the wait."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            taker = next(n for n in nodes if n is not leader)
            await _until(lambda: taker.core.lead == leader.cfg.id)
            waits = [asyncio.create_task(taker._leader_moves(3600)) for _ in range(2)]
            await asyncio.sleep(0)  # both are waiting
            await leader.stop()
            await _until(lambda: all(w.done() for w in waits))
            assert taker.core.lead != leader.cfg.id
            # A later wait is for the next change, not one that has happened.
            later = asyncio.create_task(taker._leader_moves(3600))
            await asyncio.sleep(0)
            assert not later.done()
            later.cancel()

    asyncio.run(run())


def test_a_large_proposal_reaches_every_state_machine_as_a_view_of_its_entry(
    tmp_path: pathlib.Path,
) -> None:
    """Unwrapped from its envelope by cbor2, a large proposal was one more copy of
    itself on every node, alive with its entry and with what the state machine decoded
    from it. Forwarded (with its origin's tag), batched with others or alone, it now
    comes as a view of the entry; a small one still comes as bytes."""
    big = b"B" * (codec.LARGE + 7)

    async def run() -> None:
        async with _three(tmp_path) as (nodes, kvs):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            taker = next(n for n in nodes if n is not leader)
            await _until(lambda: taker.core.lead == leader.cfg.id)
            await asyncio.gather(
                taker.propose(put("forwarded", big)), leader.propose(put("small", b"s")),
                leader.propose(put("batched", big)),
            )  # fmt: skip
            await taker.propose(put("alone", big))
            await _until(lambda: all(len(kv.came_as) == 4 for kv in kvs.values()))
            for kv in kvs.values():
                assert kv.came_as == {
                    "forwarded": memoryview, "small": bytes, "batched": memoryview,
                    "alone": memoryview,
                }  # fmt: skip
                assert kv.data["forwarded"] == kv.data["alone"] == big

    asyncio.run(run())


def test_a_forward_outlives_a_pre_vote_after_which_its_leader_is_back(
    tmp_path: pathlib.Path,
) -> None:
    """A follower that stopped hearing its leader clears it (its pre-vote), and hears it
    again. Its forward was not ended meanwhile: that leader committed it, and ending it
    had it proposed again, one more copy in every log."""

    async def run() -> None:
        async with _three(tmp_path) as (nodes, _):
            leader = next(n for n in nodes if n.core.role is Role.LEADER)
            taker = next(n for n in nodes if n is not leader)
            await _until(lambda: taker.core.lead == leader.cfg.id)
            hear = taker.transport._on_frame
            deaf = [True]

            def from_leader_dropped(peer: str, payload: bytes | bytearray) -> None:
                if not (deaf[0] and peer == leader.cfg.id):
                    hear(peer, payload)

            taker.transport._on_frame = from_leader_dropped
            proposal = asyncio.create_task(taker.propose(put("k", b"v"), timeout=60))
            await _until(lambda: taker.core.lead is None)  # its pre-vote
            deaf[0] = False
            assert await proposal == b"k"  # answered: it was not ended in LeaderChanged
            assert taker.core.lead == leader.cfg.id

    asyncio.run(run())
