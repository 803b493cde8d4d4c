"""Plain data of the consensus core: entries, hard state, configurations, messages.

Everything here is an immutable-by-convention dataclass with slots, so the core can be
copied cheaply by the simulator and encoded exactly by `raft.codec`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NodeId = str


class EntryKind(enum.IntEnum):
    NORMAL = 0
    NOOP = 1  # appended by every new leader so that it can commit earlier terms' entries
    CONF = 2  # data is an encoded ConfState: the whole new configuration


@dataclass(slots=True, frozen=True)
class Entry:
    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(slots=True, frozen=True)
class HardState:
    """What must be durable before any vote or append is acknowledged."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(slots=True, frozen=True)
class ConfState:
    """A cluster configuration. Voters and learners are sorted and disjoint."""

    voters: tuple[NodeId, ...] = ()
    learners: tuple[NodeId, ...] = ()

    def __post_init__(self) -> None:
        assert list(self.voters) == sorted(set(self.voters)), self.voters
        assert list(self.learners) == sorted(set(self.learners)), self.learners
        assert not set(self.voters) & set(self.learners), (self.voters, self.learners)

    def members(self) -> tuple[NodeId, ...]:
        return tuple(sorted(self.voters + self.learners))

    def is_voter(self, node: NodeId) -> bool:
        return node in self.voters

    def is_member(self, node: NodeId) -> bool:
        return node in self.voters or node in self.learners


class ConfChangeOp(enum.IntEnum):
    ADD_LEARNER = 0
    PROMOTE = 1
    REMOVE = 2


@dataclass(slots=True, frozen=True)
class ConfChange:
    op: ConfChangeOp
    node: NodeId


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    """Describes a snapshot: the state after applying every entry up to `index`."""

    index: int
    term: int
    conf: ConfState
    size: int  # bytes of snapshot data; chunks are cut from it by offset


@dataclass(slots=True, frozen=True)
class SnapshotChunk:
    """A piece of a snapshot received from the leader, to be written at `offset`."""

    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@dataclass(slots=True, frozen=True)
class ReadState:
    """A ReadIndex result: reads for `context` are linearizable once applied >= index."""

    context: bytes
    index: int


# --------------------------------------------------------------------------------------
# Messages. Every message names its sender, its recipient and the sender's term.


@dataclass(slots=True, frozen=True)
class Message:
    frm: NodeId
    to: NodeId
    term: int


@dataclass(slots=True, frozen=True)
class RequestVote(Message):
    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False  # sent after TimeoutNow: bypasses the leader lease


@dataclass(slots=True, frozen=True)
class RequestVoteResponse(Message):
    granted: bool
    pre_vote: bool = False


@dataclass(slots=True, frozen=True)
class AppendEntries(Message):
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(slots=True, frozen=True)
class AppendEntriesResponse(Message):
    index: int  # on success: last index known to match; on reject: the rejected prev_index
    reject: bool = False
    hint_index: int = 0  # on reject: the follower's best guess of where logs may match
    hint_term: int = 0  # ...and its term there, for the leader's fast back-off


@dataclass(slots=True, frozen=True)
class Heartbeat(Message):
    commit: int
    context: bytes = b""


@dataclass(slots=True, frozen=True)
class HeartbeatResponse(Message):
    context: bytes = b""


@dataclass(slots=True, frozen=True)
class InstallSnapshot(Message):
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@dataclass(slots=True, frozen=True)
class InstallSnapshotResponse(Message):
    meta_index: int
    next_offset: int  # the offset the follower expects next
    done: bool = False  # the snapshot is installed; follower's log now matches up to meta_index


@dataclass(slots=True, frozen=True)
class TimeoutNow(Message):
    pass


@dataclass(slots=True, frozen=True)
class ReadIndexRequest(Message):
    context: bytes


@dataclass(slots=True, frozen=True)
class ReadIndexResponse(Message):
    context: bytes
    index: int


@dataclass(slots=True, frozen=True)
class Persisted(Message):
    """The leader's log is durable up to `index`: sent to a follower whose proposals the
    leader appended, which can then count their commit itself (Raft._count_commit)."""

    index: int


MESSAGE_TYPES: tuple[type[Message], ...] = (
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
    Persisted,  # new types go last: a type's code is its place here
)


@dataclass(slots=True)
class Ready:
    """A batch of work the core hands to its runtime.

    The runtime must, in this order: write `snapshot_chunks`; install `snapshot` (if
    set); append `entries` (first truncating any stored entry with index >=
    entries[0].index); persist `hard_state` (if set); make all of that durable with one
    fsync (group commit); only then send `messages`; apply `committed_entries`; serve
    `read_states` once applied >= their index; then call `advance(ready)`.

    Entries go before the hard state: a crash that tears the batch must never leave a
    durable commit index pointing at an entry that did not reach the disk, or at the
    older, conflicting entry still stored at that index.
    """

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot_chunks: list[SnapshotChunk] = field(default_factory=list)
    snapshot: SnapshotMeta | None = None
    messages: list[Message] = field(default_factory=list)
    committed_entries: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    snapshot_due: bool = False  # the log has grown past a compaction threshold
    term_or_vote_changed: bool = False  # hard_state carries more than a new commit index

    def must_sync(self) -> bool:
        """Whether this batch needs an fsync before its messages go out. A hard state
        that only moves the commit index does not: a lost commit index is relearned
        from the leader (etcd's MustSync makes the same choice)."""
        return bool(
            self.term_or_vote_changed or self.entries or self.snapshot_chunks or self.snapshot
        )
