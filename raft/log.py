"""The core's view of the replicated log.

The log holds every entry after `offset` (the last compacted index, whose term is kept),
the configurations those entries carry, and the progress markers of persistence and
application.

Invariant: offset <= applied <= committed <= last_index().
Invariant: persisted <= handed <= last_index(); entries beyond `handed` have not yet been
given to storage, entries up to `persisted` are durable.
"""

from __future__ import annotations

from raft import codec
from raft.types import ConfState, Entry, EntryKind, SnapshotMeta


class LogInvariantError(AssertionError):
    """A request that would break Raft's safety, such as truncating committed entries."""


class RaftLog:
    def __init__(self, offset: int, offset_term: int, conf: ConfState) -> None:
        self.offset = offset
        self.offset_term = offset_term
        self.entries: list[Entry] = []
        self.base_conf = conf  # the configuration in force at `offset`
        self.confs: list[tuple[int, ConfState]] = []  # configurations of entries in the log
        self.committed = offset
        self.applied = offset
        self.persisted = offset
        self.handed = offset
        self.bytes_since_offset = 0

    # ---- reading

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`, or None if compacted away or not yet there."""
        if index == self.offset:
            return self.offset_term
        if index < self.offset or index > self.last_index():
            return None
        return self.entries[index - self.offset - 1].term

    def entry(self, index: int) -> Entry:
        e = self.entries[index - self.offset - 1]
        assert e.index == index, (e.index, index)
        return e

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi."""
        assert self.offset < lo <= hi <= self.last_index() + 1, (self.offset, lo, hi)
        return self.entries[lo - self.offset - 1 : hi - self.offset - 1]

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log at least as up to date as ours."""
        return last_term > self.last_term() or (
            last_term == self.last_term() and last_index >= self.last_index()
        )

    def conf_at(self, index: int) -> ConfState:
        conf = self.base_conf
        for conf_index, c in self.confs:
            if conf_index > index:
                break
            conf = c
        return conf

    def latest_conf(self) -> ConfState:
        return self.confs[-1][1] if self.confs else self.base_conf

    def latest_conf_index(self) -> int:
        return self.confs[-1][0] if self.confs else self.offset

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, and that term.

        Used by the leader to skip, in one round trip, a whole run of entries a follower
        rejected (the fast back-off of the Raft thesis, as in etcd).
        """
        index = min(index, self.last_index())
        while index > self.offset:
            t = self.term(index)
            assert t is not None
            if t <= term:
                return index, t
            index -= 1
        return self.offset, self.offset_term

    # ---- writing

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append entries that follow the last one (truncate first on conflicts)."""
        for e in entries:
            assert e.index == self.last_index() + 1, (e.index, self.last_index())
            assert e.term >= self.last_term(), (e.term, self.last_term())
            self.entries.append(e)
            self.bytes_since_offset += len(e.data)
            if e.kind == EntryKind.CONF:
                self.confs.append((e.index, codec.decode_conf(e.data)))

    def truncate_from(self, index: int) -> None:
        """Drop every entry with index >= `index` (a conflict with the leader's log)."""
        if index <= self.committed:
            raise LogInvariantError(f"truncating committed entry {index} <= {self.committed}")
        assert index > self.offset
        for e in self.entries[index - self.offset - 1 :]:
            self.bytes_since_offset -= len(e.data)
        del self.entries[index - self.offset - 1 :]
        self.confs = [(i, c) for i, c in self.confs if i < index]
        self.persisted = min(self.persisted, index - 1)
        self.handed = min(self.handed, index - 1)

    def maybe_append(
        self, prev_index: int, prev_term: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """Follower side of AppendEntries. Returns the last index now known to match the
        leader's, or None if our log has no entry (prev_index, prev_term).

        Entries already present with the same term are kept: a delayed, shorter message
        must never truncate entries we acknowledged (akka-raft #66).
        """
        if not self.match_term(prev_index, prev_term):
            return None
        for e in entries:
            if e.index <= self.offset:
                continue
            t = self.term(e.index)
            if t == e.term:
                continue
            if t is not None:
                self.truncate_from(e.index)
            self.append([x for x in entries if x.index >= e.index])
            break
        return prev_index + len(entries)

    def commit_to(self, index: int) -> bool:
        if index <= self.committed:
            return False
        assert index <= self.last_index(), (index, self.last_index())
        self.committed = index
        return True

    def compact(self, index: int, term: int) -> None:
        """Forget entries up to `index` (a snapshot covers them)."""
        if index <= self.offset:
            return
        assert index <= self.applied, (index, self.applied)
        assert self.term(index) == term, (index, term, self.term(index))
        self.base_conf = self.conf_at(index)
        self.confs = [(i, c) for i, c in self.confs if i > index]
        self.entries = self.entries[index - self.offset :]
        self.offset, self.offset_term = index, term
        self.bytes_since_offset = sum(len(e.data) for e in self.entries)

    def restore(self, meta: SnapshotMeta) -> None:
        """Install a snapshot received from the leader.

        If our log holds the snapshot's last entry, the entries after it are kept;
        otherwise the whole log is discarded (hashicorp/raft #697, redisraft #43).
        """
        if self.match_term(meta.index, meta.term) and meta.index <= self.last_index():
            self.applied = max(self.applied, meta.index)
            self.committed = max(self.committed, meta.index)
            self.compact(meta.index, meta.term)
            self.base_conf = meta.conf
            self.persisted = max(self.persisted, meta.index)
            self.handed = max(self.handed, meta.index)
        else:
            self.entries = []
            self.confs = []
            self.offset, self.offset_term = meta.index, meta.term
            self.base_conf = meta.conf
            self.bytes_since_offset = 0
            self.committed = self.applied = self.persisted = self.handed = meta.index
