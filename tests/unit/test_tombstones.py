"""Tombstones: forgotten in each node's clock order, and a view that stays as it was
while the tombstones go on changing (a snapshot is written from it in another thread)."""

from __future__ import annotations

import collections
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailqueue.tombstones import COMPACT_AT, Tombstones

NODES = ("n1", "n2", "n3")


class Model:
    """The dict and per-node deques the spool kept before `Tombstones` replaced them."""

    def __init__(self) -> None:
        self.finished: dict[str, tuple[str, int]] = {}
        self.order: dict[str, collections.deque[tuple[int, str]]] = {}

    def add(self, mid: str, origin: str, stamp: int) -> None:
        self.finished[mid] = (origin, stamp)
        self.order.setdefault(origin, collections.deque()).append((stamp, mid))

    def forget_before(self, origin: str, horizon: int) -> None:
        order = self.order.get(origin)
        while order and order[0][0] < horizon:
            self.finished.pop(order.popleft()[1], None)


# Steps: ("add", node, stamp step) | ("forget", node, horizon step) | ("view",)
step = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NODES), st.integers(0, 3)),
    st.tuples(st.just("forget"), st.sampled_from(NODES), st.integers(0, 40)),
    st.tuples(st.just("view")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=300))
def test_as_the_dict_it_replaced_and_every_view_as_it_was(steps: list[tuple[Any, ...]]) -> None:
    tombs, model = Tombstones(), Model()
    clock = dict.fromkeys(NODES, 0)
    views = []
    for n, s in enumerate(steps):
        if s[0] == "add":
            clock[s[1]] += s[2]  # a node's stamps never go back (Spool.clocks)
            tombs.add(f"m{n}", s[1], clock[s[1]])
            model.add(f"m{n}", s[1], clock[s[1]])
        elif s[0] == "forget":
            tombs.forget_before(s[1], s[2])
            model.forget_before(s[1], s[2])
        else:
            views.append((tombs.frozen(), dict(model.finished)))
        assert sorted(tombs.items()) == sorted(model.finished.items())
        assert len(tombs) == len(model.finished) and set(tombs) == set(model.finished)
        assert all(mid in tombs for mid in model.finished)
    for view, then in views:
        assert len(view) == len(then)
        assert sorted(view.items()) == sorted(then.items())


def test_a_view_survives_the_column_it_reads_being_replaced() -> None:
    """Past COMPACT_AT forgotten entries a node's column is replaced by its live tail: a
    view taken before still reads the whole of the old one."""
    tombs = Tombstones()
    for k in range(2 * COMPACT_AT):
        tombs.add(f"m{k}", "n1", k)
    view = tombs.frozen()
    tombs.forget_before("n1", 2 * COMPACT_AT - 10)  # past the compaction threshold
    tombs.add("late", "n1", 2 * COMPACT_AT)
    assert len(tombs) == 11 and sorted(tombs) == sorted([*(f"m{k}" for k in range(
        2 * COMPACT_AT - 10, 2 * COMPACT_AT)), "late"])  # fmt: skip
    assert len(view) == 2 * COMPACT_AT
    assert dict(view.items()) == {f"m{k}": ("n1", k) for k in range(2 * COMPACT_AT)}
    assert tombs.frozen().spans[0][1] is not view.spans[0][1]  # a new column, not cut


def test_a_view_costs_a_span_per_node_whatever_the_number_of_tombstones() -> None:
    """Opening a snapshot's view runs on the event loop: it must not copy the
    tombstones (1.8 million after an hour at 500 messages a second)."""
    tombs = Tombstones()
    for k in range(20_000):
        tombs.add(f"m{k}", NODES[k % 3], k)
    view = tombs.frozen()
    assert len(view.spans) == 3 and len(view) == 20_000
    assert all(col is tombs._columns[node] for node, col, _, _ in view.spans)


def test_loaded_from_a_snapshot_in_any_order_it_forgets_in_clock_order() -> None:
    records = [("b", "n1", 20), ("c", "n2", 5), ("a", "n1", 10), ("d", "n1", 30)]
    tombs = Tombstones.load(records)
    assert sorted(tombs.items()) == sorted((m, (o, s)) for m, o, s in records)
    tombs.forget_before("n1", 25)
    assert sorted(tombs) == ["c", "d"]


def test_forgotten_ids_are_let_go_once_they_are_an_eighth_of_a_column() -> None:
    """A forgotten tombstone's id stays referenced by its column until the column is
    replaced: waiting for half of it to be forgotten kept up to twice the ids alive."""
    tombs = Tombstones()
    for k in range(8 * COMPACT_AT):
        tombs.add(f"m{k}", "n1", k)
    tombs.forget_before("n1", COMPACT_AT - 1)
    assert len(tombs._columns["n1"].ids) == 8 * COMPACT_AT  # not yet: too few
    tombs.forget_before("n1", COMPACT_AT)
    assert len(tombs._columns["n1"].ids) == 7 * COMPACT_AT  # replaced by the live part
    assert list(tombs) == [f"m{k}" for k in range(COMPACT_AT, 8 * COMPACT_AT)]
