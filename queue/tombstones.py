"""The ids of messages that left the spool, each kept for its node's replay window.

A copy of an Accept may commit after its message was delivered and left (its front end
proposed it again when the first copy's fate was unknown); the tombstone makes that copy
a no-op (docs/spool.md). Each node's tombstones are kept in the order of its clock, and
that order is also the order they are forgotten in: columns per node with a moving head.

A snapshot needs the tombstones as they were when it began, while commands go on
applying. Copying a dict of them held the event loop for every tombstone: at 500
messages a second, an hour of them is 1.8 million, and the copy took about 0.2 s at
every snapshot. A view (`frozen`) takes each node's columns and bounds instead, in
time proportional to the number of nodes. The columns are never changed in place
behind a view: entries are only appended past its bounds, and a column whose forgotten
head has grown long is replaced by a new one, not cut.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MessageId = str
NodeId = str
Tombstone = tuple[NodeId, int]  # the node that accepted the message, its clock then

COMPACT_AT = 4096  # forgotten entries at a column's head before it may be replaced
# ...once they are also this share of it. A forgotten entry's id stays alive in the
# column until then: at a half, an hour-long soak's memory went on rising for another
# hour after the tombstones had stopped growing in number, towards twice their size.
COMPACT_SHARE = 8


@dataclass(frozen=True, slots=True)
class _Column:
    """One node's tombstones in stamp order. Two flat columns, not a tuple each: a
    tuple is an object the garbage collector walks, and millions of them made every
    full collection longer."""

    stamps: array[int] = field(default_factory=lambda: array("q"))
    ids: list[MessageId] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TombstonesView:
    """The tombstones as they were when `Tombstones.frozen` was called."""

    spans: tuple[tuple[NodeId, _Column, int, int], ...]  # node, column, head, end

    def __len__(self) -> int:
        return sum(end - head for _, _, head, end in self.spans)

    def items(self) -> Iterator[tuple[MessageId, Tombstone]]:
        for origin, col, head, end in self.spans:
            for k in range(head, end):
                yield col.ids[k], (origin, col.stamps[k])


class Tombstones:
    def __init__(self) -> None:
        self._ids: set[MessageId] = set()
        self._columns: dict[NodeId, _Column] = {}
        self._head: dict[NodeId, int] = {}  # the first entry of each column not forgotten

    def __contains__(self, mid: object) -> bool:
        return mid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[MessageId]:
        return (mid for mid, _ in self.items())

    def items(self) -> Iterator[tuple[MessageId, Tombstone]]:
        return self.frozen().items()

    def add(self, mid: MessageId, origin: NodeId, stamp: int) -> None:
        """`stamp` is never below the last one added for `origin` (Spool.clocks only
        grows), so each column stays in stamp order: were it not, a tombstone would only
        be forgotten later than it could be, never sooner."""
        col = self._columns.get(origin)
        if col is None:
            col = self._columns[origin] = _Column()
            self._head[origin] = 0
        col.stamps.append(stamp)
        col.ids.append(mid)
        self._ids.add(mid)

    def forget_before(self, origin: NodeId, horizon: int) -> None:
        """Forget `origin`'s tombstones stamped before `horizon`."""
        col = self._columns.get(origin)
        if col is None:
            return
        head, stamps = self._head[origin], col.stamps
        while head < len(stamps) and stamps[head] < horizon:
            self._ids.discard(col.ids[head])
            head += 1
        if head >= COMPACT_AT and head * COMPACT_SHARE >= len(stamps):
            # A new column, not one cut in place: a view may still read the old one.
            self._columns[origin], head = _Column(stamps[head:], col.ids[head:]), 0
        self._head[origin] = head

    def frozen(self) -> TombstonesView:
        return TombstonesView(
            tuple((o, col, self._head[o], len(col.ids)) for o, col in self._columns.items())
        )

    @classmethod
    def load(cls, items: Iterable[tuple[MessageId, NodeId, int]]) -> Tombstones:
        """From a snapshot's records, in any order."""
        out = cls()
        by_origin: dict[NodeId, list[tuple[int, MessageId]]] = {}
        for mid, origin, stamp in items:
            by_origin.setdefault(origin, []).append((stamp, mid))
        for origin, entries in by_origin.items():
            entries.sort()
            for stamp, mid in entries:
                out.add(mid, origin, stamp)
        return out
