"""The core's log: conflicts, truncation, compaction and snapshot installation."""

from __future__ import annotations

import pytest

from raft import codec
from raft.log import LogInvariantError, RaftLog
from raft.types import ConfState, Entry, EntryKind, SnapshotMeta

CONF = ConfState(("a", "b", "c"), ())


def log_of(terms: list[int]) -> RaftLog:
    log = RaftLog(0, 0, CONF)
    log.append([Entry(t, i + 1) for i, t in enumerate(terms)])
    return log


def test_append_matching_entries_never_truncates() -> None:
    log = log_of([1, 1, 2, 2])
    # a delayed, shorter AppendEntries that agrees with us (akka-raft #66)
    assert log.maybe_append(1, 1, (Entry(1, 2),)) == 2
    assert log.last_index() == 4


def test_conflicting_entry_truncates_the_rest() -> None:
    log = log_of([1, 1, 2, 2])
    assert log.maybe_append(2, 1, (Entry(3, 3),)) == 3
    assert [log.term(i) for i in range(1, 4)] == [1, 1, 3] and log.last_index() == 3


def test_truncating_a_committed_entry_is_refused() -> None:
    log = log_of([1, 1, 2])
    log.commit_to(3)
    with pytest.raises(LogInvariantError):
        log.truncate_from(3)


def test_find_conflict_by_term_skips_a_whole_term() -> None:
    log = log_of([1, 1, 4, 4, 4, 5])
    assert log.find_conflict_by_term(6, 3) == (2, 1)
    assert log.find_conflict_by_term(6, 4) == (5, 4)


def test_snapshot_install_keeps_a_matching_suffix() -> None:
    log = log_of([1, 1, 2, 2, 2])
    log.restore(SnapshotMeta(3, 2, CONF, 10))
    assert (log.offset, log.last_index(), log.committed) == (3, 5, 3)


def test_snapshot_install_discards_a_conflicting_log() -> None:
    log = log_of([1, 1, 2, 2, 2])
    log.restore(SnapshotMeta(4, 3, CONF, 10))
    assert (log.offset, log.last_index(), log.committed, log.applied) == (4, 4, 4, 4)


def test_configuration_follows_appends_and_truncation() -> None:
    log = log_of([1])
    new = ConfState(("a", "b"), ())
    log.append([Entry(1, 2, EntryKind.CONF, codec.encode_conf(new))])
    assert log.latest_conf() == new
    log.truncate_from(2)
    assert log.latest_conf() == CONF  # rolled back (canonical/raft #250)


def test_compaction_keeps_the_configuration_in_force() -> None:
    log = log_of([1])
    new = ConfState(("a", "b"), ())
    log.append([Entry(1, 2, EntryKind.CONF, codec.encode_conf(new)), Entry(1, 3)])
    log.commit_to(3)
    log.applied = 3
    log.compact(3, 1)
    assert log.base_conf == new and log.term(3) == 1 and log.term(2) is None
