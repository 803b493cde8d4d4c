"""The spool and Python's cyclic garbage collector.

A queued message is a few container objects that live until it is delivered, and a
full collection walks every live container with the event loop stopped: with a million
queued messages that is 0.6-0.9 s on this machine, long enough for a leader to miss
its heartbeats. The spool's objects form no reference cycles (reference counting frees
a message when it leaves the spool, which tests/unit/test_heap.py checks), so the
collector has nothing to find among them; it is needed only for the short-lived cycles
of sessions, tasks and exceptions. Hence:

- `building()`: no collections while a snapshot becomes a spool. Each would walk
  everything built so far and find nothing (restoring a million messages spent 8.7 of
  its 43 s in the collector).
- `settle()`: once built, what is alive is moved out of the collector's sight
  (`gc.freeze`), at start and after a snapshot is installed.
- `FullCollections`: a spool that grows after start (a remote down for hours) brings
  the long pauses back; when a full collection takes longer than its limit, the
  survivors of it are frozen too.

The price of freezing: an object alive at that moment that later becomes part of an
unreachable cycle (a session that ends) is never freed. Freezes happen at start, after
a snapshot install and after a slow full collection, so this stays a few sessions'
worth per freeze.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

FULL_PAUSE_LIMIT_S = 0.05  # a full collection longer than this freezes its survivors


@contextlib.contextmanager
def building() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def settle() -> None:
    gc.collect()
    gc.freeze()


class FullCollections:
    """Notes full collections slower than `limit_s` (from the collector's callback, in
    whatever thread allocated) and freezes their survivors when `tend()` is next called
    from the event loop: the callback itself runs in the middle of an allocation, where
    doing anything more than setting a flag is unsafe."""

    def __init__(self, limit_s: float = FULL_PAUSE_LIMIT_S) -> None:
        self.limit_s = limit_s
        self.slow = 0  # full collections over the limit
        self.freezes = 0
        self._began = 0.0
        self._due = False

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        elif time.perf_counter() - self._began > self.limit_s:
            self.slow += 1
            self._due = True

    def tend(self) -> bool:
        """Freezes what is alive if a slow full collection happened since the last call.
        The young generations are collected first, so only what was created since that
        collection and is already garbage can be caught in the freeze."""
        if not self._due:
            return False
        self._due = False
        gc.collect(1)
        gc.freeze()
        self.freezes += 1
        log.info(
            "a full garbage collection took over %.0f ms: %d long-lived objects are now "
            "exempt from collection", self.limit_s * 1000, gc.get_freeze_count(),
        )  # fmt: skip
        return True
