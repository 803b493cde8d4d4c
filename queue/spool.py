"""The replicated spool: a deterministic state machine over committed commands.

Theory of operation. Every node applies the same commands in the same order, and the
spool's only inputs are those commands (time included: `cmd.at`), so every node holds
the same spool. Each recipient of each message is in exactly one RcptState; every
change goes through `_move`, which checks it against TRANSITIONS and keeps the
counters. A message leaves the spool when all its recipients are final (delivered or
bounced) and every bounce that needs a DSN has one.

Bodies live in a BodyStore beside the index, not in it, so the index of a million
queued messages stays small.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailqueue.commands import (
    Accept,
    Assign,
    Batch,
    BeginDot,
    Command,
    Delete,
    Expire,
    Hold,
    MessageId,
    NodeDown,
    NodeId,
    Outcome,
    OutcomeKind,
    RcptResult,
    Release,
    Retry,
    SetFormat,
    UncertainPolicy,
    Unhold,
)
from mailqueue.index import NOBODY, SpoolIndex
from mailqueue.tombstones import Tombstones, TombstonesView

# How long a copy of an Accept may take to commit, and so how long a message's
# tombstone outlives it, in the time of the node that accepted it. A front end proposes
# the same Accept again only while its client waits, at most 9 minutes
# (smtpcluster.node.ACCEPT_HARD_CAP_S); a copy that commits later than this is refused
# (the message is not queued, and its client got or gets a 4xx), so the tombstone it
# would have met is no longer needed. Measured on each node's own stamps, never against
# another node's clock: when it was an hour of the spool's time, which follows the
# fastest clock, one clock jumping a day ahead expired every tombstone at once, and a
# copy still under way queued a delivered message again.
REPLAY_WINDOW_MS = 3600 * 1000


class RcptState(enum.IntEnum):
    QUEUED = 0
    ASSIGNED = 1
    SENDING = 2  # BeginDot applied: the final dot may have been sent
    DELIVERED = 3
    BOUNCED = 4
    HELD = 5
    UNCERTAIN = 6  # its node died after BeginDot, before Outcome


S = RcptState
TRANSITIONS: dict[RcptState, frozenset[RcptState]] = {
    S.QUEUED: frozenset({S.ASSIGNED, S.HELD, S.BOUNCED}),
    S.ASSIGNED: frozenset({S.SENDING, S.QUEUED, S.BOUNCED, S.HELD}),
    S.SENDING: frozenset({S.DELIVERED, S.QUEUED, S.BOUNCED, S.UNCERTAIN}),
    S.UNCERTAIN: frozenset({S.QUEUED, S.HELD, S.BOUNCED}),
    S.HELD: frozenset({S.QUEUED, S.BOUNCED}),
    S.DELIVERED: frozenset(),
    S.BOUNCED: frozenset(),
}
FINAL = frozenset({S.DELIVERED, S.BOUNCED})


class IllegalTransition(AssertionError):
    """A bug: the spool was asked to move a recipient along an edge that does not exist."""


@dataclass(slots=True)
class Rcpt:
    address: str
    state: RcptState = RcptState.QUEUED
    next_attempt: int = 0  # ms since the epoch; due when <= now
    attempts: int = 0  # delivery attempts that reached an outcome
    attempt: int = 0  # the latest assignment's number: the fencing token
    node: NodeId = ""  # who holds the assignment (ASSIGNED, SENDING, UNCERTAIN)
    last_error: str = ""
    final_at: int = 0
    reply: str = ""  # DELIVERED: the remote's reply; BOUNCED: the reason
    dsn_sent: bool = False
    was_uncertain: bool = False

    def key(self) -> tuple[object, ...]:
        return (
            self.address, int(self.state), self.next_attempt, self.attempts, self.attempt,
            self.node, self.last_error, self.final_at, self.reply, self.dsn_sent,
            self.was_uncertain,
        )  # fmt: skip


@dataclass(slots=True)
class Message:
    id: MessageId
    sender: str
    size: int
    received_at: int
    accepted_by: NodeId
    is_bounce: bool
    rcpts: list[Rcpt] = field(default_factory=list)

    def domain(self, k: int) -> str:
        return self.rcpts[k].address.rpartition("@")[2].lower()

    def needs_dsn(self, r: Rcpt) -> bool:
        return r.state is S.BOUNCED and not r.dsn_sent and self.sender != "" and not self.is_bounce

    def copy(self) -> Message:
        rcpts = [dataclasses.replace(r) for r in self.rcpts]
        return dataclasses.replace(self, rcpts=rcpts)


class BodyStore(Protocol):
    def put(self, message_id: MessageId, body: bytes) -> None: ...
    def get(self, message_id: MessageId) -> bytes: ...
    def delete(self, message_id: MessageId) -> None: ...
    def clear(self) -> None: ...


class MemoryBodies:
    def __init__(self) -> None:
        self.bodies: dict[MessageId, bytes] = {}

    def put(self, message_id: MessageId, body: bytes) -> None:
        self.bodies[message_id] = body

    def get(self, message_id: MessageId) -> bytes:
        return self.bodies[message_id]

    def delete(self, message_id: MessageId) -> None:
        self.bodies.pop(message_id, None)

    def clear(self) -> None:
        self.bodies.clear()


@dataclass(frozen=True, slots=True)
class SpoolView:
    """The replicated state as it was when the view was opened, for a snapshot written
    by another thread while commands go on applying (Spool.open_view). Nothing in it
    changes: the spool copies a message before changing one the view shares, and keeps
    the bodies of messages that leave until the view is closed."""

    now: int
    uncertain_total: int
    messages: dict[MessageId, Message]
    finished: TombstonesView
    clocks: dict[NodeId, int]
    bodies: BodyStore
    format: int


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying a command did. `ok` is False when a command was refused, e.g. a
    BeginDot whose attempt no longer holds the assignment."""

    ok: bool = True
    detail: str = ""
    changed: int = 0  # recipients whose state changed
    items: tuple[Applied, ...] = ()  # a Batch: each command's own result, in order


class Spool:
    def __init__(self, bodies: BodyStore | None = None) -> None:
        self.bodies: BodyStore = bodies if bodies is not None else MemoryBodies()
        self.messages: dict[MessageId, Message] = {}
        self.finished = Tombstones()  # the ids of messages that left
        # Each node's newest Accept stamp: the clock its own replays are measured by.
        self.clocks: dict[NodeId, int] = {}
        self.counts: dict[RcptState, int] = dict.fromkeys(RcptState, 0)
        self.load: dict[NodeId, int] = {}  # assigned + sending recipients per node
        # Messages each node's front end has accepted, counted as Accepts apply: derived
        # (zero again after a restore), for the scheduler's view of who is busy.
        self.accepted: collections.Counter[NodeId] = collections.Counter()
        self.uncertain_total = 0
        self.now = 0  # the newest command time applied
        self.format = 1  # the replicated format the cluster writes (commands.FORMAT)
        self.index = SpoolIndex()  # derived, not replicated: see mailqueue.index
        self._view: SpoolView | None = None  # open for a snapshot being written
        self._doomed: list[MessageId] = []  # bodies that view still needs

    # ---- a view for snapshots

    def open_view(self) -> SpoolView:
        """Copying the index of messages is O(messages) but fast (a million: about 50
        ms), where holding back every command while a snapshot is written took as long
        as writing it (seconds per hundred thousand messages), and no 250 was sent
        meanwhile. `.copy()`, not `dict(...)`: once messages have left out of order the
        table has holes, and CPython's dict() then re-inserts key by key (a million:
        about 250 ms, all of it on the event loop), where copy() clones the table."""
        assert self._view is None, "one snapshot at a time"
        self._view = SpoolView(
            self.now, self.uncertain_total, self.messages.copy(), self.finished.frozen(),
            self.clocks.copy(), self.bodies, self.format,
        )  # fmt: skip
        return self._view

    def close_view(self) -> None:
        self._view = None
        doomed, self._doomed = self._doomed, []
        for mid in doomed:
            self.bodies.delete(mid)

    def _mine(self, message_id: MessageId) -> Message | None:
        """The message, to be changed: copied first if the open view shares it."""
        msg = self.messages.get(message_id)
        view = self._view
        if view is not None and msg is not None and view.messages.get(message_id) is msg:
            msg = self.messages[message_id] = msg.copy()
        return msg

    # ---- the one way to change a recipient

    def _move(self, r: Rcpt, to: RcptState) -> None:
        if to not in TRANSITIONS[r.state]:
            raise IllegalTransition(f"{r.address}: {r.state.name} -> {to.name}")
        if r.state in (S.ASSIGNED, S.SENDING):
            self.load[r.node] -= 1
            if not self.load[r.node]:
                del self.load[r.node]
        if to in (S.ASSIGNED, S.SENDING):
            self.load[r.node] = self.load.get(r.node, 0) + 1
        self.counts[r.state] -= 1
        self.counts[to] += 1
        r.state = to
        if to in FINAL:
            r.final_at = self.now

    def stamp(self, node: NodeId, wall: int) -> int:
        """The time for an Accept `node` proposes by its clock reading `wall`: never
        before its newest Accept, since a copy's age is measured on that node's own
        stamps (REPLAY_WINDOW_MS). After its clock steps back, fresh mail would look
        an hour old; its stamps wait for the clock instead."""
        return max(wall, self.clocks.get(node, 0))

    # ---- applying commands

    def apply(self, cmd: Command) -> Applied:
        if not isinstance(cmd, Batch):  # a Batch's commands each bring their own time
            self.now = max(self.now, cmd.at)
        handler = _HANDLERS[type(cmd)]
        result: Applied = handler(self, cmd)
        return result

    def _set_format(self, cmd: SetFormat) -> Applied:
        if cmd.format <= self.format:
            return Applied(True, f"format already {self.format}")
        self.format = cmd.format
        return Applied(True, f"format {cmd.format}")

    def _batch(self, cmd: Batch) -> Applied:
        items = tuple(self.apply(c) for c in cmd.commands)
        return Applied(True, "", sum(a.changed for a in items), items)

    def _accept(self, cmd: Accept) -> Applied:
        if cmd.message_id in self.messages or cmd.message_id in self.finished:
            return Applied(True, "already accepted")
        origin = cmd.accepted_by
        newest = self.clocks.get(origin, cmd.at)
        if newest - cmd.at > REPLAY_WINDOW_MS:
            late = (newest - cmd.at) // 1000
            return Applied(False, f"proposed {late} s ago by {origin}'s clock: too late")
        if cmd.at >= newest:
            self.clocks[origin] = cmd.at
            self._forget_tombstones(origin)
        msg = Message(
            cmd.message_id, cmd.sender, len(cmd.body), cmd.at, cmd.accepted_by, cmd.is_bounce,
            [Rcpt(a, next_attempt=cmd.at) for a in cmd.recipients],
        )  # fmt: skip
        self.messages[msg.id] = msg
        self.index.add(msg.id)
        self.accepted[cmd.accepted_by] += 1
        self.counts[S.QUEUED] += len(msg.rcpts)
        self.bodies.put(msg.id, cmd.body)
        self._settle(msg)
        if cmd.bounce_of:
            self._dsn_sent(cmd.bounce_of, cmd.bounce_rcpts)
        return Applied(True, "accepted", len(msg.rcpts))

    def _dsn_sent(self, message_id: MessageId, rcpts: tuple[int, ...]) -> None:
        orig = self._mine(message_id)
        if orig is None:
            return
        for k in rcpts:
            if 0 <= k < len(orig.rcpts):
                orig.rcpts[k].dsn_sent = True
        self._settle(orig)

    def _assign(self, cmd: Assign) -> Applied:
        changed = 0
        touched: dict[MessageId, Message] = {}
        for a in cmd.assignments:
            msg = self._mine(a.message_id)
            r = self._rcpt(a.message_id, a.rcpt)
            # Compare-and-set on the attempt number: a replayed Assign, or one computed
            # from a stale view, changes nothing.
            if msg is None or r is None or r.state is not S.QUEUED or a.attempt != r.attempt + 1:
                continue
            r.node, r.attempt = a.node, a.attempt
            self._move(r, S.ASSIGNED)
            touched[msg.id] = msg
            changed += 1
        for msg in touched.values():
            self._settle(msg)
        return Applied(True, "", changed)

    def _begin_dot(self, cmd: BeginDot) -> Applied:
        msg = self._mine(cmd.message_id)
        if msg is None:
            return Applied(False, "message no longer queued")
        targets = [msg.rcpts[k] for k in cmd.rcpts if 0 <= k < len(msg.rcpts)]
        if len(targets) != len(cmd.rcpts) or not targets:
            return Applied(False, "no such recipients")
        for r in targets:
            held = r.node == cmd.node and r.attempt == cmd.attempt
            if not held or r.state not in (S.ASSIGNED, S.SENDING):
                return Applied(False, f"attempt {cmd.attempt} no longer holds {r.address}")
        changed = 0
        for r in targets:
            if r.state is S.ASSIGNED:
                self._move(r, S.SENDING)
                changed += 1
        return Applied(True, "", changed)

    def _outcome(self, cmd: Outcome) -> Applied:
        msg = self._mine(cmd.message_id)
        if msg is None:
            return Applied(False, "message no longer queued")
        changed = 0
        for res in cmd.results:
            if not 0 <= res.rcpt < len(msg.rcpts):
                continue
            r = msg.rcpts[res.rcpt]
            if r.node != cmd.node or r.attempt != cmd.attempt:
                continue  # a late outcome of an attempt that lost its assignment
            if r.state is S.ASSIGNED and res.kind is OutcomeKind.DELIVERED:
                continue  # delivered without BeginDot: the worker broke the protocol
            if r.state not in (S.ASSIGNED, S.SENDING):
                continue  # already decided (a repeated Outcome)
            r.attempts += 1
            if res.kind is OutcomeKind.DELIVERED:
                r.reply = res.reply
                self._move(r, S.DELIVERED)
            elif res.kind is OutcomeKind.FAILED:
                r.reply = res.reply
                self._move(r, S.BOUNCED)
            elif res.kind is OutcomeKind.UNCERTAIN and r.state is S.SENDING:
                self._crossed_dot(r, res)
            else:
                r.last_error, r.next_attempt = res.reply, res.retry_at
                self._move(r, S.QUEUED)
            changed += 1
        self._settle(msg)
        return Applied(True, "", changed)

    def _crossed_dot(self, r: Rcpt, res: RcptResult) -> None:
        """The same window as a worker that died after BeginDot (NodeDown), seen by a
        worker that lived: counted the same, and held or queued again the same."""
        r.last_error = res.reply
        self._uncertain(r)
        if res.retry_at:
            r.next_attempt = res.retry_at
            self._move(r, S.QUEUED)

    def _uncertain(self, r: Rcpt) -> None:
        """A SENDING recipient whose dot may have been taken: counted, once, for ever."""
        self._move(r, S.UNCERTAIN)
        r.was_uncertain = True
        self.uncertain_total += 1

    def _release(self, cmd: Release) -> Applied:
        changed = 0
        self._mine(cmd.message_id)
        for k in cmd.rcpts:
            r = self._rcpt(cmd.message_id, k)
            if r and r.state is S.ASSIGNED and (r.node, r.attempt) == (cmd.node, cmd.attempt):
                self._move(r, S.QUEUED)
                changed += 1
        if changed:
            self._settle(self.messages[cmd.message_id])
        return Applied(True, "", changed)

    def _node_down(self, cmd: NodeDown) -> Applied:
        changed = 0
        for mid in self.index.held(cmd.node):
            msg = self._mine(mid)
            assert msg is not None, mid  # the index holds only queued messages
            for r in msg.rcpts:
                if r.node != cmd.node:
                    continue
                if r.state is S.ASSIGNED:
                    self._move(r, S.QUEUED)
                    changed += 1
                elif r.state is S.SENDING:
                    self._uncertain(r)
                    if cmd.policy is UncertainPolicy.REDELIVER:
                        self._move(r, S.QUEUED)
                    changed += 1
            self._settle(msg)
        return Applied(True, "", changed)

    def _expire(self, cmd: Expire) -> Applied:
        msg = self._mine(cmd.message_id)
        if msg is None:
            return Applied(False, "message no longer queued")
        changed = 0
        for r in msg.rcpts:
            if r.state in (S.QUEUED, S.HELD, S.UNCERTAIN, S.ASSIGNED):
                r.reply = cmd.reason
                self._move(r, S.BOUNCED)
                changed += 1
        self._settle(msg)
        return Applied(True, "", changed)

    def _admin(self, ids: tuple[MessageId, ...], edges: dict[RcptState, RcptState]) -> Applied:
        changed = 0
        for mid in ids:
            msg = self._mine(mid)
            for r in msg.rcpts if msg else []:
                to = edges.get(r.state)
                if to is None:
                    continue
                if to is S.QUEUED:
                    r.next_attempt = self.now  # due now
                if to is not r.state:
                    self._move(r, to)
                changed += 1
            if msg:
                self._settle(msg)
        return Applied(True, "", changed)

    def _delete(self, cmd: Delete) -> Applied:
        changed = 0
        for mid in cmd.message_ids:
            msg = self._mine(mid)
            if msg is None:
                continue
            for r in msg.rcpts:
                if r.state not in FINAL:
                    r.reply = "deleted by the administrator"
                    r.dsn_sent = True  # an operator's delete sends no bounce
                    self._move(r, S.BOUNCED)
                    changed += 1
                r.dsn_sent = True
            self._settle(msg)
        return Applied(True, "", changed)

    # ---- helpers

    def _rcpt(self, message_id: MessageId, k: int) -> Rcpt | None:
        msg = self.messages.get(message_id)
        if msg is None or not 0 <= k < len(msg.rcpts):
            return None
        return msg.rcpts[k]

    def _settle(self, msg: Message) -> None:
        """After a command changed `msg`: it leaves the spool if it is done, else the
        index learns its new state."""
        if any(r.state not in FINAL or msg.needs_dsn(r) for r in msg.rcpts):
            self.reindex(msg)
            return
        self.index.drop(msg.id)
        for r in msg.rcpts:
            self.counts[r.state] -= 1
        del self.messages[msg.id]
        if self._view is not None and msg.id in self._view.messages:
            self._doomed.append(msg.id)
        else:
            self.bodies.delete(msg.id)
        # Stamped by the clock that measures the age of any copy of its Accept, which is
        # stamped no later than this.
        stamp = self.clocks.get(msg.accepted_by, msg.received_at)
        self.finished.add(msg.id, msg.accepted_by, stamp)

    def reindex(self, msg: Message) -> None:
        self.index.update(*index_entry(msg))

    def rebuild_index(self) -> None:
        self.index = SpoolIndex.build(index_entry(m) for m in self.messages.values())

    def _forget_tombstones(self, origin: NodeId) -> None:
        """Those no copy of an Accept from `origin` can need any more: every one old
        enough to forget is refused as too late (see _accept)."""
        self.finished.forget_before(origin, self.clocks[origin] - REPLAY_WINDOW_MS)

    # ---- comparing replicas

    def state_key(self) -> tuple[object, ...]:
        """Everything replicated, in a canonical form: equal keys, equal spools."""
        msgs = tuple(
            (m.id, m.sender, m.size, m.received_at, m.accepted_by, m.is_bounce,
             tuple(r.key() for r in m.rcpts))
            for m in sorted(self.messages.values(), key=lambda m: m.id)
        )  # fmt: skip
        tombs = tuple(sorted(self.finished.items()))
        clocks = tuple(sorted(self.clocks.items()))
        return (msgs, tombs, clocks, self.uncertain_total, self.now, self.format)


def index_entry(msg: Message) -> tuple[MessageId, int | None, frozenset[NodeId], bool]:
    """What the index holds of `msg`: when it is next due (None: nothing queued), who
    holds its assigned or sending recipients, whether it needs a DSN. One pass: this
    runs for every command applied."""
    due: int | None = None
    holders: set[NodeId] | None = None
    dsn = False
    for r in msg.rcpts:
        state = r.state
        if state is S.QUEUED:
            if due is None or r.next_attempt < due:
                due = r.next_attempt
        elif state is S.ASSIGNED or state is S.SENDING:
            if holders is None:
                holders = set()
            holders.add(r.node)
        elif state is S.BOUNCED and not dsn:
            dsn = msg.needs_dsn(r)
    return msg.id, due, frozenset(holders) if holders else NOBODY, dsn


_HANDLERS: dict[type, Callable[[Spool, Any], Applied]] = {
    Accept: Spool._accept,
    Assign: Spool._assign,
    BeginDot: Spool._begin_dot,
    Outcome: Spool._outcome,
    Release: Spool._release,
    NodeDown: Spool._node_down,
    Expire: Spool._expire,
    Batch: Spool._batch,
    Hold: lambda s, c: s._admin(c.message_ids, {S.QUEUED: S.HELD, S.ASSIGNED: S.HELD}),
    Unhold: lambda s, c: s._admin(c.message_ids, {S.HELD: S.QUEUED, S.UNCERTAIN: S.QUEUED}),
    Retry: lambda s, c: s._admin(
        c.message_ids, {S.QUEUED: S.QUEUED, S.UNCERTAIN: S.QUEUED, S.HELD: S.QUEUED}
    ),
    Delete: Spool._delete,
    SetFormat: Spool._set_format,
}
