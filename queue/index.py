"""Derived indexes over the spool: what is due, what each node holds, what needs a DSN.

The leader's scheduler runs every 100 ms and every node's worker every 50 ms. Walking
the whole spool there took 34 ms per pass with 100,000 deferred messages (a third of
the leader's time; with a million, all of it, delaying acceptance and heartbeats).
With these indexes a pass touches only the messages that are due, and a worker only
those assigned to it: 0.6-1.0 ms for the same backlog (bench/spool_bench.py).

Nothing here is replicated: every node derives the same indexes from the same spool,
and they are rebuilt on restore. `Spool` calls `update` for each message a command
touched, with what it derived from the message's recipients.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

NOBODY: frozenset[str] = frozenset()


class SpoolIndex:
    def __init__(self) -> None:
        self._due: SortedList = SortedList()  # (earliest next_attempt of a queued rcpt, id)
        self._due_at: dict[str, int] = {}
        # node -> messages with recipients assigned to it or being sent by it
        self.held_by: dict[str, dict[str, None]] = {}
        self._holders: dict[str, frozenset[str]] = {}
        self.dsn_pending: dict[str, None] = {}  # messages with a bounce not yet reported
        # Every message id in order, for the operator's paged `queue list`: sorting
        # a million ids for each page blocked the node for half a second a page.
        self.ids: SortedList = SortedList()

    def update(self, mid: str, due: int | None, holders: frozenset[str], dsn: bool) -> None:
        """Message `mid` is next due at `due` (None: nothing queued), has recipients
        assigned to or being sent by `holders`, and needs a DSN if `dsn`."""
        self._set_due(mid, due)
        self._set_holders(mid, holders)
        if dsn:
            self.dsn_pending[mid] = None
        else:
            self.dsn_pending.pop(mid, None)

    @classmethod
    def build(cls, entries: Iterable[tuple[str, int | None, frozenset[str], bool]]) -> SpoolIndex:
        """An index of many messages at once (a restore): sorted once, not one by one."""
        index = cls()
        due, ids = [], []
        for mid, at, holders, dsn in entries:
            ids.append(mid)
            if holders:
                index._set_holders(mid, holders)
            if dsn:
                index.dsn_pending[mid] = None
            if at is not None:
                due.append((at, mid))
                index._due_at[mid] = at
        index._due = SortedList(due)
        index.ids = SortedList(ids)
        return index

    def add(self, mid: str) -> None:
        """`mid` entered the spool."""
        self.ids.add(mid)

    def drop(self, mid: str) -> None:
        """`mid` left the spool."""
        self._set_due(mid, None)
        self._set_holders(mid, NOBODY)
        self.dsn_pending.pop(mid, None)
        self.ids.discard(mid)

    def due(self, now: int) -> Iterator[str]:
        """Messages with a queued recipient due by `now`, the longest due first."""
        for _, mid in self._due.irange(maximum=(now, "\U0010ffff")):
            yield mid

    def held(self, node: str) -> list[str]:
        """Messages with recipients assigned to `node` or being sent by it."""
        return list(self.held_by.get(node, ()))

    def _set_due(self, mid: str, due: int | None) -> None:
        old = self._due_at.get(mid)
        if old == due:
            return
        if old is not None:
            self._due.remove((old, mid))
            del self._due_at[mid]
        if due is not None:
            self._due.add((due, mid))
            self._due_at[mid] = due

    def _set_holders(self, mid: str, holders: frozenset[str]) -> None:
        old = self._holders.get(mid, NOBODY)
        if old == holders:
            return
        for node in old - holders:
            held = self.held_by[node]
            del held[mid]
            if not held:
                del self.held_by[node]
        for node in holders - old:
            self.held_by.setdefault(node, {})[mid] = None
        if holders:
            self._holders[mid] = holders
        else:
            del self._holders[mid]

    def view(self) -> tuple[object, ...]:
        """The index's content, order-free: for comparing with a rebuilt one."""
        held = {n: frozenset(ids) for n, ids in self.held_by.items()}
        return (list(self._due), self._due_at, held, set(self.dsn_pending), list(self.ids))
