"""The Raft runtime: drives one core with real time, real disks and real sockets.

One asyncio task owns the core. Ticks, peer messages and requests step it; a second
loop takes each Ready, saves it in a worker thread (the event loop keeps receiving
meanwhile, so the next Ready batches everything that arrived: group commit), then
sends, applies and answers. Nothing is sent before it is durable.

Normal entries carry an envelope: application data, or a peer's address (so that a
node added at run time becomes reachable everywhere, and stays so after snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2

from raft import clocks, codec, streams
from raft.core import ConfChangeRefused, Config, LogLost, NotLeader, Raft, RaftError, Role
from raft.storage import Storage
from raft.transport import Address, Transport
from raft.types import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    Message,
    NodeId,
    ReadIndexResponse,
    Ready,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
)

log = logging.getLogger(__name__)

_APP, _PEER, _BATCH = 0, 1, 2
_ARITY = {_APP: 1, _PEER: 2}  # an envelope's fields; a forwarded one adds its origin
# Proposals that wait while the previous batch is being persisted share one log entry,
# up to these bounds (one entry stays well under an AppendEntries message's size).
BATCH_MAX_BYTES = 512 << 10
BATCH_MAX_COUNT = 256
_RAFT, _FORWARD, _ANSWER, _CALL, _REMOVED, _HELLO = b"R", b"F", b"A", b"C", b"X", b"V"
# Raft messages sent only in reply to one of ours: the peer hears us.
_ANSWERS = (AppendEntriesResponse, HeartbeatResponse, InstallSnapshotResponse,
            RequestVoteResponse, ReadIndexResponse)  # fmt: skip
SNAPSHOT_RETRY_S = (5.0, 300.0)  # after a failed snapshot: the first pause, the longest
JOIN_CATCH_UP_S = 60.0  # how long a joining node may take to catch up before promotion
_ADDR_LEN = struct.Struct("<I")


class StateMachine(Protocol):
    def apply(self, index: int, data: bytes | memoryview) -> bytes:
        """Apply a committed proposal. A large one (codec.LARGE or more) comes as a view
        of its log entry: read it in place (raft.streams.view), as a copy would be one
        more of its size."""
        ...

    def snapshot(self) -> Iterable[bytes]:
        """The state as of the last apply, captured when called: the chunks are read by
        a worker thread while applying goes on."""
        ...

    def snapshot_done(self) -> None:
        """On the event loop, once the last snapshot's chunks were read (or its writing
        failed): what was kept for it can go."""
        ...

    def restore(self, chunks: Iterator[bytes]) -> None: ...


class NodeFailed(RaftError):
    """A task the node cannot work without (its ticker, its Ready loop, a snapshot's
    bookkeeping) ended with an error: the node no longer takes part in the cluster, and
    only a restart brings it back."""


class UnknownEntry(Exception):
    """A committed entry of a kind this version cannot apply: written by a newer version
    during a rolling upgrade. Passing over it would leave this node's state machine unlike
    the others', so the Ready loop stops instead (NodeFailed), naming the entry, and keeps
    stopping at it after each restart until the node runs a version that knows it."""


class LeaderChanged(TimeoutError):
    """A forwarded proposal's leader is no longer this node's leader. Its fate is
    unknown (that leader may have appended it, and its successor may commit it), as
    after a timeout; said at once, so that the proposer looks and tries again with the
    new leader rather than at the end of its timeout."""


class ProposalLost(RaftError):
    """Another entry was committed at the index of this proposal: it will never apply."""


class Unavailable(RaftError):
    """The leader refused the proposal before appending it: it is in no log."""


class NoLeader(Unavailable):
    """No leader appeared in time, so the proposal was never handed to one."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    id: NodeId
    listen: Address
    peers: dict[NodeId, Address]  # the initial voters, this node included
    data_dir: str
    key: bytes
    tick_ms: float = 50.0
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    snapshot_entries: int = 10_000
    join: bool = False  # start empty and wait to be added, instead of bootstrapping
    # The newest format of entries this node's state machine applies. Each peer is told
    # at connect (RaftNode.peer_formats), so that an application can hold back a new
    # kind of entry until every member reads it: a rolling upgrade.
    format: int = 1
    raft: dict[str, Any] = field(default_factory=dict)  # further raft.core.Config fields


@dataclass(slots=True)
class _Waiter:
    index: int
    term: int
    future: asyncio.Future[bytes]
    slot: int = -1  # its place in a batch entry; -1 when the entry is not a batch


class RaftNode:
    def __init__(self, cfg: NodeConfig, sm: StateMachine) -> None:
        self.cfg = cfg
        self.sm = sm
        self.storage = Storage(cfg.data_dir, owner=cfg.id)
        self.addresses: dict[NodeId, Address] = dict(cfg.peers)
        bootstrap = ConfState() if cfg.join else ConfState(tuple(sorted(cfg.peers)), ())
        init = self.storage.initial_state(bootstrap)
        core_cfg = Config(
            id=cfg.id,
            election_ticks=cfg.election_ticks,
            heartbeat_ticks=cfg.heartbeat_ticks,
            snapshot_entries=cfg.snapshot_entries,
            **cfg.raft,
        )
        self.core = Raft(core_cfg, random.Random(), init, self.storage)
        self.sm_applied = 0  # what the state machine has applied (may trail the core)
        self._snap_task: asyncio.Task[None] | None = None
        self._snap_backoff = 0.0  # seconds to wait after a failed snapshot; doubles
        self._snap_retry_at = 0.0  # monotonic time before which none is attempted
        if init.snapshot is not None:
            self._restore(self.storage.snapshot_chunks(init.snapshot))
            self.sm_applied = init.snapshot.index
        # A map, so that a later release can say more without confusing this one.
        hello = self._hello_frame({})
        self.transport = Transport(cfg.id, cfg.listen, cfg.key, self._on_frame, hello=hello)
        self.peer_formats: dict[NodeId, int] = {}  # what each peer said at its last connect
        self.clocks = clocks.PeerClocks()  # each peer's wall clock; a test may skew ours
        self._waiters: dict[int, list[_Waiter]] = {}
        # Not yet in the log: each with the follower that forwarded it, if any.
        self._pending: list[tuple[bytes, asyncio.Future[bytes], NodeId | None]] = []
        self._counters: set[NodeId] = set()  # peers that count commits (raft.types.Persisted)
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._read_points: list[tuple[int, asyncio.Future[int]]] = []
        self._forwards: dict[int, asyncio.Future[bytes]] = {}
        self._forwarded_to: dict[int, NodeId] = {}  # a forward's request id: its leader
        self._lead_seen: NodeId | None = None
        self._lead_moved = asyncio.Event()  # set, and replaced, when _lead_seen changes
        self._ids = itertools.count(1)
        # Tags this process's forwarded proposals in the log, unlike any other node's or
        # any earlier run's (whose request numbers started over).
        self._boot = os.urandom(8)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._applied_events: list[asyncio.Event] = []
        self.on_fsync: Callable[[float], None] = lambda seconds: None  # for metrics
        # How a Ready is persisted: the storage's save, which a test may wrap (a slow disk).
        self.persist: Callable[[Ready], None] = self.storage.save
        # peer -> monotonic time of its last answer to us. Any frame would not do: a peer
        # we cannot reach still sends (pre-votes, forwards), and counted so it looked
        # alive to the scheduler, which gave it mail it never learned of.
        self.last_answer: dict[NodeId, float] = {}
        self.stopped = False
        self.failure: NodeFailed | LogLost | None = None  # what stopped this node
        self.failed = asyncio.Event()  # set with `failure`
        self.removed = False  # the leader said a configuration without this node applied

    # ================================================================ lifecycle

    async def start(self) -> None:
        await self.transport.start()
        for node, addr in self.addresses.items():
            self.transport.set_peer(node, addr)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._ticker(), name="raft ticker"),
            loop.create_task(self._ready_loop(), name="raft ready loop"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._watch)

    def _watch(self, task: asyncio.Task[None]) -> None:
        # An error here used to end the task silently: the process went on answering SMTP
        # while it committed nothing. Crash-only instead: the owner exits and is restarted.
        if task.cancelled() or task.exception() is None or self.failure is not None:
            return
        exc = task.exception()
        log.critical("raft node %s: the %s failed; this node no longer takes part in the "
                     "cluster", self.cfg.id, task.get_name(), exc_info=exc)  # fmt: skip
        self._fail(NodeFailed(f"the {task.get_name()} failed: {exc!r}"))

    def _fail(self, failure: NodeFailed | LogLost) -> None:
        if self.failure is None:
            self.failure = failure
            self.failed.set()

    async def stop(self) -> None:
        self.stopped = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                if not t.done() or t.cancelled() or t.exception() is None:
                    await t  # a failed one was reported by _watch
        await self.transport.close()
        self.storage.close()

    async def _ticker(self) -> None:
        pinged = 0.0
        while True:
            await asyncio.sleep(self.cfg.tick_ms / 1000)
            self.core.tick()
            self._notice_leader()
            self._wake.set()
            if (now := time.monotonic()) - pinged >= clocks.EVERY_S:
                pinged = now
                self._ping_clocks()

    def _ping_clocks(self) -> None:
        # In a hello, which a node of an older release reads for its format only, so
        # that it takes the ping without a complaint (and does not answer it).
        ping = self._hello_frame(self.clocks.ping())
        for peer in self.addresses:
            # Not queued for a peer not connected: it would arrive too late to be read.
            if peer != self.cfg.id and self.transport.is_connected(peer):
                self.transport.send(peer, ping, urgent=True)

    def _hello_frame(self, more: dict[str, float]) -> bytes:
        # What this node reads that a node of an older release does not: Persisted
        # notices ("counts"; it would log each as undecodable) and payloads in pieces
        # ("pieces"; it would refuse the connection). Each is sent only to a peer that
        # said so.
        mine = {"format": self.cfg.format, "counts": True, "pieces": True}
        return _HELLO + cbor2.dumps({**mine, **more})

    # ================================================================ API

    @property
    def applied(self) -> int:
        return self.sm_applied

    async def propose(self, data: bytes, timeout: float = 10.0) -> bytes:
        """Replicate `data`; returns the state machine's result once applied on this
        node (so what this node serves afterwards reflects it).

        ProposalLost, Unavailable, NoLeader and NotLeader (this node stopped leading as
        it appended) mean the entry is in no log and never will be. TimeoutError means
        its fate is unknown: a leader got it and it may yet commit."""
        handed: list[bool] = [False]
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the coroutine in a task of
            # its own, a cost every Accept, BeginDot and Outcome paid.
            async with asyncio.timeout(timeout):
                return await self._propose([_APP, data], handed)
        except TimeoutError:
            if not handed[0]:
                raise NoLeader("no leader within the timeout") from None
            raise

    async def _propose(self, envelope: list[Any], handed: list[bool] | None = None) -> bytes:
        delay = 0.02
        while True:
            if self.core.role is Role.LEADER:
                if handed is not None:
                    handed[0] = True
                return await self._enqueue(cbor2.dumps(envelope))
            leader = self.core.lead
            if leader is not None and leader != self.cfg.id:
                if handed is not None:
                    handed[0] = True
                return await self._forward(leader, envelope)
            await self._leader_moves(delay)  # an election is under way
            delay = min(delay * 2, 0.5)

    async def _leader_moves(self, bound: float) -> None:
        """Wait for this node's leader to change, or `bound` seconds. Asleep for the
        bound alone, a proposal without a leader woke up to half a second after one was
        elected; the bound stays, because a leader can also be learned where
        _notice_leader does not look."""
        moved = self._lead_moved
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await moved.wait()

    def _enqueue(self, envelope: bytes, origin: NodeId | None = None) -> asyncio.Future[bytes]:
        """Queue `envelope` for the Ready loop, which appends everything queued since
        its last pass as one entry: group commit, one fsync and one log entry for the
        proposals that arrived while the previous ones were being persisted."""
        if self.core.role is not Role.LEADER:
            raise NotLeader(self.core.lead)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending.append((envelope, fut, origin))
        self._wake.set()
        return fut

    def _flush_proposals(self) -> None:
        pending, self._pending = self._pending, []
        start = 0
        while start < len(pending):
            end, size = start, 0
            while end < len(pending) and end - start < BATCH_MAX_COUNT and size < BATCH_MAX_BYTES:
                size += len(pending[end][0])
                end += 1
            self._propose_batch(pending[start:end])
            start = end

    def _propose_batch(
        self, batch: list[tuple[bytes, asyncio.Future[bytes], NodeId | None]]
    ) -> None:
        single = len(batch) == 1
        data = batch[0][0] if single else cbor2.dumps([_BATCH, [env for env, _, _ in batch]])
        origins = {origin for _, _, origin in batch if origin is not None}
        try:
            index, term = self.core.propose(data, origins & self._counters, origins)
        except RaftError as exc:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(type(exc)(*exc.args))
            return
        waiters = self._waiters.setdefault(index, [])
        for slot, (_, fut, _) in enumerate(batch):
            waiters.append(_Waiter(index, term, fut, -1 if single else slot))

    async def _wait_applied(self, index: int, term: int) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(index, []).append(_Waiter(index, term, fut))
        self._wake.set()
        return await fut

    async def _forward(self, leader: NodeId, envelope: list[Any]) -> bytes:
        """Hand a proposal to the leader. The envelope carries this process's tag, and
        applying it here settles the result (etcd's way: a follower waits for its own
        apply, not for the leader's word); the leader answers only a refusal."""
        large = sum(len(v) for v in envelope if isinstance(v, bytes)) >= codec.LARGE

        def args(req: int) -> list[Any]:
            inner = [*envelope, [self._boot, req]]
            return [codec.pieces(inner) if large else cbor2.dumps(inner)]

        # No bound of its own: every caller of _propose has one, and an Accept's retry
        # waits longer each time (a fixed 5 s here cut them all short).
        return await self._ask(leader, _FORWARD, args, None, large=large, forward=True)

    async def _ask(
        self, leader: NodeId, kind: bytes, args: Callable[[int], list[Any]],
        timeout: float | None, *, large: bool = False, forward: bool = False,
    ) -> bytes:  # fmt: skip
        """Send a request frame to the leader; its _ANSWER frame settles the result (or,
        for a forwarded proposal, applying it here: see _forward; LeaderChanged when
        that leader is no longer this node's)."""
        req = next(self._ids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._forwards[req] = fut
        if forward:
            self._forwarded_to[req] = leader
        try:
            self.transport.send(leader, codec.frame(kind, [req, *args(req)], large))
            async with asyncio.timeout(timeout):
                return await fut  # ours alone: cancelled on timeout, then forgotten
        finally:
            self._forwards.pop(req, None)
            self._forwarded_to.pop(req, None)

    def _notice_leader(self) -> None:
        """After a step or a tick, which may have changed this node's leader: the
        forwards that went to another leader end in LeaderChanged. Waiting for their
        timeout held a client for seconds after a new leader was known. Not while no
        leader is known: a pre-vote of this node's own clears its leader too, and if
        that leader was only slow to reach it, it comes back and answers them. Ended
        then, each was proposed again, one more copy of it in every log."""
        lead = self.core.lead
        if lead == self._lead_seen:
            return
        self._lead_seen = lead
        self._lead_moved.set()
        self._lead_moved = asyncio.Event()
        if lead is None:
            return
        for req, to in self._forwarded_to.items():
            fut = self._forwards.get(req)
            if to != lead and fut is not None and not fut.done():
                fut.set_exception(LeaderChanged(f"leader {to} gave way to {lead}"))

    async def read_index(self, timeout: float = 10.0) -> int:
        """A linearizable read point: once this returns, the local state machine
        reflects every write committed before the call."""
        async with asyncio.timeout(timeout):
            return await self._read_index()

    async def _read_index(self) -> int:
        delay = 0.02
        while True:
            ctx = f"{self.cfg.id}:{next(self._ids)}".encode()
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            try:
                self.core.read_index(ctx)
            except NotLeader:
                await self._leader_moves(delay)
                delay = min(delay * 2, 0.5)
                continue
            self._reads[ctx] = fut
            self._wake.set()
            try:
                async with asyncio.timeout(1.0):
                    return await asyncio.shield(fut)
            except TimeoutError:
                continue  # the leader changed or the request was lost: ask again
            finally:
                self._reads.pop(ctx, None)

    async def add_learner(self, node: NodeId, addr: Address, timeout: float = 10.0) -> None:
        if node in self.core.conf().members():
            # Asked first: the address is committed before the change is, so a join of
            # a member under a mistyped address moved that member there, in every log,
            # and no leader reached it any more, though the change itself was refused.
            raise ConfChangeRefused(f"{node} is already a member")
        holder = next(
            (m for m in self.core.conf().members() if self.addresses.get(m) == addr), None
        )
        if holder is not None:  # the leader would replicate to `holder` as if to `node`
            raise ConfChangeRefused(f"{addr} is the address of member {holder}")
        await self.propose_peer(node, addr, timeout)
        await self.change(ConfChange(ConfChangeOp.ADD_LEARNER, node), timeout)

    async def propose_peer(self, node: NodeId, addr: Address, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._propose([_PEER, node, str(addr)])

    async def change(self, change: ConfChange, timeout: float = 10.0) -> None:
        """A membership change, proposed on this node (which must be the leader)."""
        index, term = self.core.propose_conf_change(change)
        async with asyncio.timeout(timeout):
            await self._wait_applied(index, term)

    def transfer_leader(self, target: NodeId) -> None:
        self.core.transfer_leader(target)
        self._wake.set()

    async def membership(self, op: str, target: NodeId, addr: str = "") -> None:
        """An operator's membership change from any node, carried out by the leader:
        "join" (add as learner, wait for it to catch up, promote), "leave" (remove),
        "transfer" (hand leadership to `target`). Raises Unavailable with the leader's
        reason when it refuses."""
        if op not in ("join", "leave", "transfer"):
            raise ValueError(f"unknown membership operation {op!r}")
        deadline = JOIN_CATCH_UP_S + 20 if op == "join" else 20.0
        if self.core.role is Role.LEADER:
            async with asyncio.timeout(deadline):
                await self._membership_here(op, target, addr)
        else:
            await self._call_leader(op, target, addr, deadline)

    async def members(self) -> list[dict[str, Any]]:
        """The leader's view of every member: role, address, whether the leader hears
        from it, and how far its log is behind. Asked of the leader from any node."""
        if self.core.role is Role.LEADER:
            return self._members_here()
        view: list[dict[str, Any]] = cbor2.loads(await self._call_leader("view", "", "", 5.0))
        return view

    def _members_here(self) -> list[dict[str, Any]]:
        c = self.core
        conf = c.conf()
        now = time.monotonic()
        heard_s = 2 * self.cfg.election_ticks * self.cfg.tick_ms / 1000
        last = c.log.last_index()
        offsets = self.clocks.offsets()
        out = []
        for n in sorted(conf.members()):
            p = c.prs.get(n)
            match = last if n == self.cfg.id else p.match if p else 0
            out.append({
                "id": n,
                "address": str(self.addresses.get(n, "")),
                "role": "leader" if n == c.lead else "follower" if conf.is_voter(n) else "learner",
                "reachable": n == self.cfg.id or now - self.last_answer.get(n, -1e9) < heard_s,
                "match": match,
                "lag": last - match,
                "format": self.format_of(n),
                "clock_offset_s": 0.0 if n == self.cfg.id else offsets.get(n),
            })  # fmt: skip
        return out

    async def _call_leader(self, op: str, target: str, addr: str, deadline: float) -> bytes:
        leader = self.core.lead
        if leader is None or leader == self.cfg.id:
            raise NoLeader("no leader to carry out the change")
        return await self._ask(leader, _CALL, lambda req: [op, target, addr], deadline)

    async def _membership_here(self, op: str, target: NodeId, addr: str) -> None:
        if self.core.role is not Role.LEADER:
            raise NotLeader(self.core.lead)
        if op == "transfer":
            self.transfer_leader(target)
            await self._handed_over(target)
        elif op == "leave":
            await self.change(ConfChange(ConfChangeOp.REMOVE, target))
        elif op == "join":
            await self.add_learner(target, Address.parse(addr))
            await self._caught_up(target, JOIN_CATCH_UP_S)
            await self.change(ConfChange(ConfChangeOp.PROMOTE, target))

    async def _handed_over(self, target: NodeId) -> None:
        """Until this node stops leading. The core abandons a transfer whose target did
        not catch up and campaign within an election timeout: the operator was told "ok"
        all the same, and leadership had not moved."""
        while self.core.role is Role.LEADER and target != self.cfg.id:
            if self.core.lead_transferee != target:
                raise Unavailable(f"{target} did not take over within an election timeout "
                                  "(behind or unreachable): try again")  # fmt: skip
            await asyncio.sleep(0.01)

    async def _caught_up(self, target: NodeId, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (p := self.core.prs.get(target)) is None or p.match < self.core.log.committed:
            if self.core.role is not Role.LEADER:
                # Not a slow node: said as such, an operator would look at the wrong one.
                raise Unavailable(f"leadership moved while {target} caught up: join it again")
            if loop.time() > deadline:
                raise Unavailable(f"{target} did not catch up within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def status(self) -> dict[str, Any]:
        c = self.core
        progress = {
            n: {
                "match": p.match,
                "next": p.next,
                "state": p.state.value,
                "lag": c.log.last_index() - p.match,
            }
            for n, p in sorted(c.prs.items())
        }
        conf = c.conf()
        return {
            "id": self.cfg.id,
            "role": c.role.value,
            "term": c.term,
            "leader": c.lead,
            "commit": c.log.committed,
            "applied": self.sm_applied,
            "last_index": c.log.last_index(),
            "voters": list(conf.voters),
            "learners": list(conf.learners),
            "progress": progress,
            "snapshot_index": c.snapshot.index if c.snapshot else 0,
        }

    def format_of(self, node: NodeId) -> int | None:
        """The newest entry format `node` reads, as it last said; None: not heard yet."""
        return self.cfg.format if node == self.cfg.id else self.peer_formats.get(node)

    # ================================================================ inbound

    def _on_frame(self, peer: NodeId, payload: bytes | bytearray) -> None:
        kind, body = bytes(payload[:1]), _after_kind(payload)
        if kind == _ANSWER:
            self.last_answer[peer] = time.monotonic()
        try:
            if kind == _RAFT:
                msg = codec.decode_message(body)
                if isinstance(msg, _ANSWERS):
                    self.last_answer[peer] = time.monotonic()
                if msg.to != self.cfg.id:
                    # Two members at one address (a join that named another's): never
                    # act on what was meant for another node.
                    log.warning("a message for %s from %s reached %s: dropped; do two "
                                "members share an address?", msg.to, peer, self.cfg.id)  # fmt: skip
                    return
                if isinstance(msg, RequestVote):
                    self._answer_outsider(peer)
                self._step(msg)
            elif kind == _FORWARD:
                req, envelope = _load(body)
                self._serve_forward(peer, req, envelope)
            elif kind == _ANSWER:
                self._answer(_load(body))
            elif kind == _CALL:
                call = self._serve_call(peer, *_load(body))
                asyncio.get_running_loop().create_task(call)
            elif kind == _REMOVED:
                self._removed_at(_load(body), peer)
            elif kind == _HELLO:
                self._hello(peer, _load(body))
            else:
                log.warning("unknown frame kind %r from %s", kind, peer)
        except codec.DecodeError as exc:
            log.warning("undecodable frame from %s: %s", peer, exc)
        self._wake.set()

    def _step(self, msg: Message) -> None:
        if self.failure is not None:
            return  # stopping: this node takes no further part
        try:
            self.core.step(msg)
            self._notice_leader()
        except LogLost as exc:
            log.critical("raft node %s: %s; it stops and takes no further part", self.cfg.id, exc)
            self._fail(exc)

    def _hello(self, peer: NodeId, said: Any) -> None:
        fmt = said.get("format") if isinstance(said, dict) else None
        if type(fmt) is not int:
            log.warning("malformed hello from %s: %r", peer, said)
            return
        if self.peer_formats.get(peer) != fmt:
            log.info("peer %s reads entry formats up to %d", peer, fmt)
        self.peer_formats[peer] = fmt
        if said.get("counts") is True:
            self._counters.add(peer)
        else:
            self._counters.discard(peer)
        self.transport.set_reads_pieces(peer, said.get("pieces") is True)
        ping, pong, wall = said.get("ping"), said.get("pong"), said.get("wall")
        if type(ping) is float:
            self.transport.send(peer, self._hello_frame(self.clocks.pong(ping)), urgent=True)
        elif type(pong) is float and type(wall) is float:
            self.clocks.read(peer, pong, wall)

    def _serve_forward(self, peer: NodeId, req: int, envelope: bytes) -> None:
        """A follower's proposal: answered when it applies here, by a callback rather
        than a task per proposal (the leader serves one for every forwarded Accept,
        BeginDot and Outcome)."""
        try:
            fut = self._enqueue(envelope, peer)
        except RaftError as exc:
            self._send_answer(peer, req, b"", exc)
            return
        fut.add_done_callback(lambda f: self._forward_done(peer, req, f))

    def _forward_done(self, peer: NodeId, req: int, fut: asyncio.Future[bytes]) -> None:
        if fut.cancelled():
            return  # the node is stopping: the follower's attempt times out, fate unknown
        exc = fut.exception()
        if exc is None:
            # The follower settles it when it applies the entry (see _forward), unless
            # it is no longer a member: then the entry never reaches it. (A removed node
            # keeps its SMTP ports until it is stopped, and its clients must not wait
            # for an answer that cannot come, to be cut off with a 4xx by the drain.)
            if not self.core.conf().is_member(peer):
                self._send_answer(peer, req, fut.result(), None)
            return
        if isinstance(exc, RaftError):
            self._send_answer(peer, req, b"", exc)
        else:
            log.error("forwarded proposal %s from %s failed", req, peer, exc_info=exc)

    def _send_answer(self, peer: NodeId, req: int, result: bytes, exc: RaftError | None) -> None:
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        self.transport.send(peer, _ANSWER + cbor2.dumps([req, result, error]), urgent=True)

    async def _serve_call(self, peer: NodeId, req: int, op: str, target: str, addr: str) -> None:
        result, error = b"", None
        try:
            if op == "view":
                result = cbor2.dumps(self._members_here())
            else:
                await self._membership_here(op, target, addr)
        except (RaftError, TimeoutError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.transport.send(peer, _ANSWER + cbor2.dumps([req, result, error]), urgent=True)

    def _answer(self, answer: list[Any]) -> None:
        req, result, error = answer
        fut = self._forwards.get(req)
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(result)
        elif error.startswith("ProposalLost"):
            fut.set_exception(ProposalLost(error))
        elif error.startswith(("ConfChangeRefused: ", "ValueError: ")):
            # The leader said no to the request itself: the caller's answer is the same
            # as if it had asked the leader directly, not "unavailable".
            kind, _, why = error.partition(": ")
            fut.set_exception(
                ConfChangeRefused(why) if kind == "ConfChangeRefused" else ValueError(why)
            )
        else:
            # "Unavailable: Unavailable: ..." said the leader's own type twice over.
            fut.set_exception(Unavailable(error.removeprefix("Unavailable: ")))

    # ================================================================ the Ready loop

    async def _ready_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._flush_proposals()
            while self.core.has_ready():
                durable = self.core.log.persisted  # by the Readies before this one
                rd = self.core.ready()
                if rd.snapshot is not None and self._snap_task is not None:
                    await self._snap_task  # never install over a snapshot being cut
                early = self._send_early(rd)
                applied = 0
                if rd.must_sync():
                    began = time.monotonic()
                    saving = loop.run_in_executor(None, self.persist, rd)
                    applied = self._apply_durable(rd, durable)  # while the thread writes
                    await saving
                    self.on_fsync(time.monotonic() - began)
                elif rd.hard_state is not None:
                    self.persist(rd)  # a commit index only: written, not fsynced
                self._handle(rd, early, applied)
                self._flush_proposals()  # what arrived during the fsync: the next batch

    def _send_early(self, rd: Ready) -> int:
        """A leader's replication messages may leave before its own fsync (Raft thesis
        §10.2.1): the leader counts itself only once its entries are durable. Answers
        (votes, acknowledgements) still wait. Returns how many leading messages went."""
        if rd.term_or_vote_changed:
            return 0
        sent = 0
        for m in rd.messages:
            if not isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
                break
            self._send_raft(m)
            sent += 1
        return sent

    def _send_raft(self, m: Message) -> None:
        # Only entries and snapshot chunks must keep their order (and may be large);
        # a heartbeat or a vote may pass them, so that a large entry on its way does
        # not look like a dead leader (or, behind a follower's forwarded Accept of tens
        # of MiB, a dead follower).
        urgent = not isinstance(m, AppendEntries | InstallSnapshot)
        self.transport.send(m.to, codec.frame_message(_RAFT, m), urgent=urgent)

    def _apply_durable(self, rd: Ready, durable: int) -> int:
        """Apply the committed entries this node had already made durable while the
        thread writes this Ready's new ones, not after: a 250 waiting on one does not
        wait for a write it has nothing to do with (often the next message's, or a
        delivery's). Returns how many were applied."""
        if rd.snapshot is not None:
            return 0
        done = 0
        for e in rd.committed_entries:
            if e.index > durable:
                break
            self._apply(e)
            done += 1
        return done

    def _handle(self, rd: Ready, early: int, applied: int = 0) -> None:
        for m in rd.messages[early:]:
            self._send_raft(m)
        if rd.snapshot is not None:
            self._restore(self.storage.snapshot_chunks(rd.snapshot))
            self.sm_applied = rd.snapshot.index
        self.core.advance(rd)
        # Before applying, which on a leader may take a while: a follower waits on it.
        for m in self.core.take_notices():
            self._send_raft(m)
        for e in rd.committed_entries[applied:]:
            self._apply(e)
        for rs in rd.read_states:
            fut = self._reads.get(rs.context)
            if fut is not None and not fut.done():
                self._read_points.append((rs.index, fut))
        self._release_reads()
        if rd.snapshot_due:
            self._take_snapshot()

    def _apply(self, e: Entry) -> None:
        assert e.index == self.sm_applied + 1, (e.index, self.sm_applied)
        self.sm_applied = e.index
        results = [b""]
        if e.kind is EntryKind.NORMAL:
            kind, *rest = _unwrap(e.data)
            if kind == _BATCH:
                results = [self._apply_envelope(e.index, *_unwrap(env)) for env in rest[0]]
            else:
                results = [self._apply_envelope(e.index, kind, *rest)]
        if e.kind is EntryKind.CONF and self.core.role is Role.LEADER:
            self._tell_removed(e.index)
        for w in self._waiters.pop(e.index, []):
            if w.future.done():
                continue
            if w.term == e.term:
                w.future.set_result(results[max(w.slot, 0)])
            else:
                w.future.set_exception(ProposalLost(f"entry {e.index} went to term {e.term}"))

    def _tell_removed(self, index: int) -> None:
        """Tell the nodes the configuration at `index` removes that they are out. The
        log no longer reaches them, so they could not learn it themselves (etcd's
        transport tells a removed member the same way). Best effort: one frame."""
        log_ = self.core.log
        after = log_.conf_at(index)
        for node in log_.conf_at(index - 1).members():
            if node != self.cfg.id and not after.is_member(node):
                self.transport.send(node, _REMOVED + cbor2.dumps(index))

    def _answer_outsider(self, peer: NodeId) -> None:
        """A vote request from outside the configuration this leader applied: a node
        removed while it was down (the frame above went nowhere), back with its old
        log. Told the same way. A node still joining never asks for votes."""
        if self.core.role is not Role.LEADER:
            return
        log_ = self.core.log
        if log_.conf_at(self.sm_applied).is_member(peer):
            return
        index = max((i for i, _ in log_.confs if i <= self.sm_applied), default=log_.offset)
        self.transport.send(peer, _REMOVED + cbor2.dumps(index))

    def _removed_at(self, index: int, peer: NodeId) -> None:
        """Believed unless this node knows a configuration newer than that one (one
        that added it back)."""
        confs = self.core.log.confs
        newest = confs[-1][0] if confs else self.core.log.offset
        if newest <= index and not self.removed:
            self.removed = True
            log.warning("%s says the configuration at index %d removed this node", peer, index)

    def _apply_envelope(self, index: int, kind: int, *rest: Any) -> bytes:
        if kind not in _ARITY:
            raise UnknownEntry(f"log entry {index} is of kind {kind!r}, unknown to this version")
        result = b""
        if kind == _APP:
            result = self.sm.apply(index, rest[0])
        elif kind == _PEER:
            self.addresses[rest[0]] = Address.parse(rest[1])
            self.transport.set_peer(rest[0], self.addresses[rest[0]])
        if len(rest) > _ARITY.get(kind, 0):
            boot, req = rest[-1]
            if boot == self._boot:  # forwarded from here: see _forward
                fut = self._forwards.get(req)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        return result

    def _release_reads(self) -> None:
        keep = []
        for index, fut in self._read_points:
            if fut.done():
                continue
            if index <= self.sm_applied:
                fut.set_result(index)
            else:
                keep.append((index, fut))
        self._read_points = keep

    # ================================================================ snapshots

    def _take_snapshot(self) -> None:
        """Cut a snapshot in a worker thread. Meanwhile the node keeps ticking, persisting,
        sending and applying: the state machine hands over a view of itself as of now
        (StateMachine.snapshot), so nothing waits for the thread."""
        if self._snap_task is not None or time.monotonic() < self._snap_retry_at:
            return
        # Asked again: the Ready that said so may have been made before the previous
        # snapshot ended (it ends while the loop awaits a write), and a second one, of
        # the whole state again, began a few hundred entries after every snapshot.
        if not self.core.snapshot_due():
            return
        meta = self.core.snapshot_meta(self.sm_applied, 0)
        if meta is None:
            return
        head = cbor2.dumps({n: str(a) for n, a in sorted(self.addresses.items())})
        chunks = itertools.chain([_ADDR_LEN.pack(len(head)) + head], self.sm.snapshot())
        self._snap_task = asyncio.get_running_loop().create_task(
            self._cut(meta, chunks), name="raft snapshot"
        )
        self._snap_task.add_done_callback(self._watch)

    async def _cut(self, meta: SnapshotMeta, chunks: Iterable[bytes]) -> None:
        loop = asyncio.get_running_loop()
        try:
            written = await loop.run_in_executor(
                None, self.storage.write_snapshot, meta.index, meta.term, meta.conf, chunks
            )
            self.core.snapshot_taken(written)
            self._snap_backoff = 0.0
        except Exception:
            # It stays due after every Ready: without a pause a full disk would be
            # written to, and the error logged, as fast as entries commit.
            self._snap_backoff = min(max(2 * self._snap_backoff, SNAPSHOT_RETRY_S[0]),
                                     SNAPSHOT_RETRY_S[1])  # fmt: skip
            self._snap_retry_at = time.monotonic() + self._snap_backoff
            log.exception("snapshot at %d failed; the log is kept whole; next attempt in "
                          "%.0f s", meta.index, self._snap_backoff)  # fmt: skip
        finally:
            self._snap_task = None
            self.sm.snapshot_done()

    def _restore(self, chunks: Iterator[bytes]) -> None:
        stream = _Stream(chunks)
        (length,) = _ADDR_LEN.unpack(stream.take(_ADDR_LEN.size))
        for node, addr in cbor2.loads(stream.take(length)).items():
            self.addresses[node] = Address.parse(addr)
            if hasattr(self, "transport"):
                self.transport.set_peer(node, self.addresses[node])
        self.sm.restore(stream.rest())


class _Stream:
    """Reads a prefix off an iterator of chunks, then hands on the remainder."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += next(self._chunks)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def rest(self) -> Iterator[bytes]:
        if self._buf:
            yield self._buf
        yield from self._chunks


def _unwrap(envelope: bytes | memoryview) -> Any:
    """An envelope's fields; a large proposal in it is a view of the entry, not a copy
    (codec.loads_in_place), which the state machine decodes where it lies."""
    if len(envelope) < codec.LARGE:
        return cbor2.loads(envelope)
    return codec.loads_in_place(envelope)


def _after_kind(payload: bytes | bytearray) -> bytes | io.BufferedReader:
    """A frame's body, past its kind byte. A large one is read in place: the slice of a
    frame of tens of MiB was one more copy of it, alive with the frame and what is
    decoded from it."""
    if len(payload) < codec.LARGE:
        return bytes(payload[1:])
    return streams.view(payload, 1)


def _load(body: bytes | io.BufferedReader) -> Any:
    return cbor2.loads(body) if isinstance(body, bytes) else cbor2.load(body)
