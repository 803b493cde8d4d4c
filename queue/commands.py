"""The spool's commands: what the leader proposes and every node applies, in order.

Each command carries `at`, the proposing node's clock when it was proposed
(milliseconds since the epoch; an Accept's, the clock of the node that took the
message): the only time the state machine ever sees. Every command is idempotent:
applying it twice leaves the spool as applying it once (see docs/spool.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NodeId = str
MessageId = str

# The newest replicated format this code applies: the layout of the commands in the log
# and of the spool's snapshots. A release that changes either raises it, and proposes its
# new commands only once the cluster's format (Spool.format) has reached the new value,
# which the leader raises by SetFormat once every member has said it reads it.
FORMAT = 1


class FormatTooNew(Exception):
    """The cluster writes a replicated format newer than this code reads: this node was
    downgraded, or joined with an old version, after the cluster moved on. Applying on
    would leave its spool unlike the others', so the Ready loop stops here (NodeFailed),
    and stops again after every restart until the node runs a version that reads it."""


class OutcomeKind(enum.IntEnum):
    DELIVERED = 0  # 2xx after the dot
    DEFERRED = 1  # 4xx: try again later
    FAILED = 2  # 5xx: bounce to the sender
    # The dot went out and no reply came back (RFC 1047): the remote may have the
    # message. Counted as uncertain; `retry_at` 0 holds it for an operator.
    UNCERTAIN = 3


class UncertainPolicy(enum.IntEnum):
    REDELIVER = 0  # at-least-once: queue it again
    HOLD = 1  # keep it for an operator to decide


@dataclass(frozen=True, slots=True)
class Accept:
    at: int
    message_id: MessageId
    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    body: bytes
    accepted_by: NodeId
    is_bounce: bool = False  # a DSN we generated: never bounced itself
    bounce_of: MessageId = ""  # for a DSN: the message whose failures it reports...
    bounce_rcpts: tuple[int, ...] = ()  # ...and which of its recipients


@dataclass(frozen=True, slots=True)
class Assignment:
    message_id: MessageId
    rcpt: int  # index into the message's recipients
    node: NodeId
    attempt: int  # must be the recipient's last attempt number + 1: a compare-and-set


@dataclass(frozen=True, slots=True)
class Assign:
    at: int
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True, slots=True)
class BeginDot:
    """The fence: a worker may send the final dot only if this applied with success."""

    at: int
    message_id: MessageId
    rcpts: tuple[int, ...]
    node: NodeId
    attempt: int


@dataclass(frozen=True, slots=True)
class RcptResult:
    rcpt: int
    kind: OutcomeKind
    reply: str  # the remote's reply, or why the attempt failed
    retry_at: int = 0  # DEFERRED, UNCERTAIN: when to try again (the proposer's schedule)


@dataclass(frozen=True, slots=True)
class Outcome:
    at: int
    message_id: MessageId
    node: NodeId
    attempt: int
    results: tuple[RcptResult, ...]


@dataclass(frozen=True, slots=True)
class Release:
    """A worker gives back assignments it will not attempt (shutdown, no route yet)."""

    at: int
    message_id: MessageId
    rcpts: tuple[int, ...]
    node: NodeId
    attempt: int


@dataclass(frozen=True, slots=True)
class NodeDown:
    """The leader gives up on a silent node: its assignments go back to the queue; the
    recipients it had begun the dot for become uncertain, then follow `policy`."""

    at: int
    node: NodeId
    policy: UncertainPolicy = UncertainPolicy.REDELIVER


@dataclass(frozen=True, slots=True)
class Expire:
    """The leader bounces what is still undelivered past the queue lifetime."""

    at: int
    message_id: MessageId
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    at: int
    message_ids: tuple[MessageId, ...]


@dataclass(frozen=True, slots=True)
class Unhold:
    at: int
    message_ids: tuple[MessageId, ...]


@dataclass(frozen=True, slots=True)
class Retry:
    """Make deferred recipients due now (postqueue -f / postqueue -i)."""

    at: int
    message_ids: tuple[MessageId, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    at: int
    message_ids: tuple[MessageId, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """A worker's commands made while its previous ones were being committed, applied
    in order, each with its own result: one proposal, one forward and one decode for a
    burst of BeginDots and Outcomes instead of one each. Never nested."""

    at: int
    commands: tuple[Command, ...]


@dataclass(frozen=True, slots=True)
class SetFormat:
    """The leader raises the cluster's replicated format: every member has told it that
    it reads `format`. It never goes down again."""

    at: int
    format: int


Command = (
    Accept
    | Assign
    | BeginDot
    | Outcome
    | Release
    | NodeDown
    | Expire
    | Hold
    | Unhold
    | Retry
    | Delete
    | Batch
    | SetFormat
)
# A command's code on the wire is its place here: append, never reorder.
COMMAND_TYPES: tuple[type, ...] = (
    Accept, Assign, BeginDot, Outcome, Release, NodeDown, Expire, Hold, Unhold, Retry, Delete,
    Batch, SetFormat,
)  # fmt: skip
