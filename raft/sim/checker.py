"""Raft's safety properties, checked incrementally while a simulation runs.

The oracle records every entry as soon as any node's commit index covers it. From it:
- Election Safety: at most one leader per term (checked when a node is seen leading).
- Leader Completeness: a new leader's log holds every entry in the oracle.
- State Machine Safety: a committed index never changes its entry, and every applied
  entry is the committed one, applied in order.
- Log Matching: two logs with an entry of the same index and term agree on every entry
  up to it (checked over all pairs periodically and at the end).
- Committed entries are safe: no node lacking a committed entry has a log at least as
  up to date as a majority of voters, so none could be elected and lose it. This is the
  inductive invariant behind Leader Completeness; checking it when an entry commits
  catches a premature commit (Raft figure 8) before the unlucky election happens. It is
  checked twice: over the logs as they are, and over the disks alone (every node
  crashed at once), which catches a commit counted on a copy not yet written.
- Linearizable reads: a ReadIndex answer is at least the highest commit index any node
  knew when the read was invoked.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from raft.core import Raft, Role
from raft.types import Entry, NodeId


class Violation(AssertionError):
    """A safety or liveness property failed."""

    def __init__(self, prop: str, detail: str) -> None:
        super().__init__(f"{prop}: {detail}")
        self.prop = prop
        self.detail = detail


def chain(prev: int, entry: Entry) -> int:
    """A running fingerprint of an applied sequence (deterministic across processes)."""
    return zlib.crc32(
        entry.data, zlib.crc32(b"%d:%d:%d" % (entry.index, entry.term, entry.kind), prev)
    )


@dataclass(slots=True)
class NodeMarks:
    """What the checker last saw of one node (reset when the node restarts)."""

    commit: int = 0
    term: int = 0
    led_term: int = -1


@dataclass(frozen=True, slots=True)
class LogView:
    """A node's log as an election would judge it, live or from its disk."""

    offset: int
    last_index: int
    last_term: int
    term_at: Callable[[int], int | None]

    def holds(self, index: int, term: int) -> bool:
        return index <= self.offset or self.term_at(index) == term


class Checker:
    def __init__(
        self,
        views: Callable[[], Mapping[NodeId, LogView]],
        disk_views: Callable[[], Mapping[NodeId, LogView]] | None = None,
    ) -> None:
        self.views = views
        self.disk_views = disk_views
        self.leaders: dict[int, NodeId] = {}
        self.committed: list[tuple[int, int, bytes]] = []  # index-1 -> (term, kind, data)
        self.chains: list[int] = [0]  # chains[i]: fingerprint of entries 1..i
        # The term of the leader that committed each entry: a leader elected in term T
        # must hold the entries committed in earlier terms (a slow election of term T
        # may finish after a later term committed more).
        self.commit_terms: list[int] = []
        self.marks: dict[NodeId, NodeMarks] = {}

    # ---- the oracle

    def _record(self, node: NodeId, e: Entry, term: int) -> None:
        have = len(self.committed)
        if e.index <= have:
            t, k, d = self.committed[e.index - 1]
            if (t, k, d) != (e.term, e.kind, e.data):
                raise Violation(
                    "state machine safety",
                    f"{node} committed term {e.term} at {e.index}, already committed term {t}",
                )
            return
        if e.index != have + 1:
            raise Violation("commit", f"{node} committed {e.index} but oracle ends at {have}")
        self.committed.append((e.term, e.kind, e.data))
        self.commit_terms.append(term)
        self.chains.append(chain(self.chains[-1], e))

    def check_durable(self, node: NodeId, voters: tuple[NodeId, ...], index: int) -> None:
        """No voter lacking committed entry `index` could win an election."""
        self._check_durable(node, voters, index, self.views())
        if self.disk_views is not None:
            self._check_durable(node, voters, index, self.disk_views(), where=" on disk")

    def _check_durable(
        self,
        node: NodeId,
        voters: tuple[NodeId, ...],
        index: int,
        views: Mapping[NodeId, LogView],
        *,
        where: str = "",
    ) -> None:
        term = self.committed[index - 1][0]
        lasts = {v: (views[v].last_term, views[v].last_index) for v in voters if v in views}
        for x in voters:
            if x not in views or views[x].holds(index, term):
                continue
            supporters = sum(1 for v in voters if v in lasts and lasts[x] >= lasts[v])
            if supporters > len(voters) // 2:
                raise Violation(
                    "committed entry at risk",
                    f"{node} committed {index} (term {term}) but {x}, lacking it{where}, has "
                    f"a log{where} as up to date as {supporters} of {len(voters)} voters",
                )

    # ---- per-event checks

    def node_restarted(self, node: NodeId, core: Raft) -> None:
        snap = core.log.offset
        self.marks[node] = NodeMarks(commit=snap, term=core.term)
        self.observe(node, core)  # re-checks the recovered committed entries

    def observe(self, node: NodeId, core: Raft) -> None:
        marks = self.marks.setdefault(node, NodeMarks())
        log = core.log
        if not (log.offset <= log.applied <= log.committed <= log.last_index()):
            raise Violation(
                "log bounds",
                f"{node}: offset {log.offset} applied {log.applied} "
                f"commit {log.committed} last {log.last_index()}",
            )
        if core.term < marks.term:
            raise Violation("monotonic term", f"{node} went from {marks.term} to {core.term}")
        marks.term = core.term
        if core.role is Role.LEADER and marks.led_term != core.term:
            self._new_leader(node, core)
            marks.led_term = core.term
        if log.committed > marks.commit:
            known = len(self.committed)
            for i in range(max(marks.commit, log.offset) + 1, log.committed + 1):
                self._record(node, log.entry(i), core.term)
            if len(self.committed) > known:
                self.check_durable(node, core.conf().voters, len(self.committed))
            marks.commit = log.committed

    def _new_leader(self, node: NodeId, core: Raft) -> None:
        other = self.leaders.setdefault(core.term, node)
        if other != node:
            raise Violation("election safety", f"{other} and {node} both lead term {core.term}")
        log = core.log
        for i in range(log.offset + 1, len(self.committed) + 1):
            if self.commit_terms[i - 1] >= core.term:
                continue
            t = log.term(i)
            if t != self.committed[i - 1][0]:
                raise Violation(
                    "leader completeness",
                    f"{node} leads term {core.term} without committed entry {i} "
                    f"(has term {t}, committed term {self.committed[i - 1][0]})",
                )

    def applied(self, node: NodeId, prev_index: int, e: Entry) -> None:
        if e.index != prev_index + 1:
            raise Violation("state machine safety", f"{node} applied {e.index} after {prev_index}")
        if e.index > len(self.committed):
            raise Violation("state machine safety", f"{node} applied uncommitted entry {e.index}")
        t, k, d = self.committed[e.index - 1]
        if (t, k, d) != (e.term, e.kind, e.data):
            raise Violation(
                "state machine safety", f"{node} applied term {e.term} at {e.index}, not {t}"
            )

    def restored(self, node: NodeId, index: int, fingerprint: int) -> None:
        if index > len(self.committed) or self.chains[index] != fingerprint:
            raise Violation(
                "state machine safety", f"{node} restored a snapshot at {index} that differs"
            )

    def read_answered(self, node: NodeId, invoked_commit: int, index: int) -> None:
        if index < invoked_commit:
            raise Violation(
                "linearizable read",
                f"{node} read at {index}, but {invoked_commit} was committed before the read",
            )

    # ---- periodic

    def log_matching(self, cores: dict[NodeId, Raft]) -> None:
        ids = sorted(cores)
        for a_pos, a in enumerate(ids):
            for b in ids[a_pos + 1 :]:
                self._pair_matches(a, cores[a], b, cores[b])

    @staticmethod
    def _pair_matches(a: NodeId, ca: Raft, b: NodeId, cb: Raft) -> None:
        lo = max(ca.log.offset, cb.log.offset) + 1
        hi = min(ca.log.last_index(), cb.log.last_index())
        top = 0
        for i in range(hi, lo - 1, -1):
            if ca.log.term(i) == cb.log.term(i):
                top = i
                break
        for i in range(lo, top + 1):
            if ca.log.entry(i) != cb.log.entry(i):
                raise Violation(
                    "log matching",
                    f"{a} and {b} agree at {top} (term {ca.log.term(top)}) but differ at {i}",
                )
