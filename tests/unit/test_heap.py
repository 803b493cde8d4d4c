"""The spool kept out of the cyclic garbage collector's walks (mailqueue.heap)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import cbor2
import pytest

from mailqueue import codec, heap
from mailqueue.commands import (
    Accept,
    Assign,
    Assignment,
    BeginDot,
    Outcome,
    OutcomeKind,
    RcptResult,
)
from mailqueue.machine import SpoolMachine
from mailqueue.snapshot import SnapshotError

N = 200


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def walked(obj: object) -> bool:
    """In one of the generations a collection walks (a frozen object is in none)."""
    return any(o is obj for o in gc.get_objects())


def queued(n: int) -> SpoolMachine:
    sm = SpoolMachine()
    for k in range(n):
        accept = Accept(1, f"m{k}", "s@example.org", ("u@x.example",), b"body", "a")
        sm.apply(k + 1, codec.encode(accept))
    return sm


def test_a_restored_spool_is_frozen_and_its_messages_freed_once_delivered() -> None:
    restored = SpoolMachine()
    restored.restore(iter(list(queued(N).snapshot())))
    assert gc.isenabled()
    assert len(restored.spool.messages) == N
    assert not walked(restored.spool.messages["m0"])
    assert not walked(restored.spool.messages["m0"].rcpts)
    frozen = gc.get_freeze_count()
    for k in range(N):
        mid = f"m{k}"
        done = (RcptResult(0, OutcomeKind.DELIVERED, "250 ok"),)
        for cmd in (Assign(2, (Assignment(mid, 0, "a", 1),)), BeginDot(2, mid, (0,), "a", 1),
                    Outcome(2, mid, "a", 1, done)):  # fmt: skip
            restored.apply(0, codec.encode(cmd))
    assert not restored.spool.messages
    # Reference counting alone freed them (a message, its list and its recipient):
    # frozen objects in a cycle would have stayed for good.
    assert frozen - gc.get_freeze_count() >= 3 * N


def test_a_refused_snapshot_leaves_the_collector_running() -> None:
    sm = SpoolMachine()
    with pytest.raises(SnapshotError):
        sm.restore(iter([cbor2.dumps([999, 0, 0, 0, 0])]))
    assert gc.isenabled()


def test_building_pauses_collection_and_puts_back_what_it_found() -> None:
    with heap.building():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), heap.building():
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with heap.building():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_slow_full_collection_freezes_its_survivors_at_the_next_tend() -> None:
    survivor = [object()]
    with heap.FullCollections(limit_s=0) as watch:  # every full collection is "slow"
        assert not watch.tend()
        gc.collect()
        assert watch.slow == 1 and walked(survivor)
        assert watch.tend() and watch.freezes == 1
        assert not walked(survivor)
        assert not watch.tend()
    gc.collect()
    assert watch.slow == 1  # no longer watching


def test_a_quick_full_collection_changes_nothing() -> None:
    survivor = [object()]
    with heap.FullCollections(limit_s=60) as watch:
        gc.collect()
        assert watch.slow == 0 and not watch.tend()
    assert walked(survivor)
