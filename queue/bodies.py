"""Message bodies on disk, beside the in-memory index.

Bodies are appended to segment files; the index keeps (segment, offset, length) per
message. A segment is deleted once no live message points into it. Nothing here is
fsynced: the Raft log and snapshots are the durable copy, and a restarting node
rebuilds its bodies from them (clear(), then the snapshot and the log re-add them).
The placement of bodies is local to a node and never part of the replicated state.

A snapshot's worker thread reads bodies while the event loop stores and deletes others
(mailqueue.spool.SpoolView): one lock keeps the segment bookkeeping whole between them.

The most recent bodies (up to `cache_bytes`) are also kept in memory: most deliveries
start within a second of acceptance, and reading a body back from its segment cost a
flush of the segment being written plus an open, seek, read and close.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import BinaryIO

from mailqueue.commands import MessageId

SEGMENT_BYTES = 64 << 20
CACHE_BYTES = 16 << 20


class DiskBodies:
    def __init__(
        self, directory: str, segment_bytes: int = SEGMENT_BYTES, cache_bytes: int = CACHE_BYTES
    ) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.cache_bytes = cache_bytes
        self._recent: collections.OrderedDict[MessageId, bytes] = collections.OrderedDict()
        self._recent_size = 0
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._where: dict[MessageId, tuple[int, int, int]] = {}
        self._live: dict[int, int] = {}  # segment -> live bodies in it
        self._seg = 0
        self._out: BinaryIO | None = None
        self._size = 0
        self._lock = threading.Lock()
        self.clear()

    def _path(self, seg: int) -> str:
        return os.path.join(self.dir, f"{seg:08d}.seg")

    def _roll(self) -> None:
        if self._out is not None:
            self._out.close()
            if not self._live.get(self._seg):
                os.remove(self._path(self._seg))
        self._seg += 1
        self._out = open(self._path(self._seg), "ab")  # noqa: SIM115 - kept open while active
        self._size = 0

    def put(self, message_id: MessageId, body: bytes) -> None:
        with self._lock:
            self._put(message_id, body)

    def _put(self, message_id: MessageId, body: bytes) -> None:
        if message_id in self._where:
            return
        if self._out is None or (self._size + len(body) > self.segment_bytes and self._size):
            self._roll()
        assert self._out is not None
        self._out.write(body)
        self._where[message_id] = (self._seg, self._size, len(body))
        self._live[self._seg] = self._live.get(self._seg, 0) + 1
        self._size += len(body)
        self._remember(message_id, body)

    def _remember(self, message_id: MessageId, body: bytes) -> None:
        if len(body) > self.cache_bytes:
            return
        self._recent[message_id] = body
        self._recent_size += len(body)
        while self._recent_size > self.cache_bytes:
            _, old = self._recent.popitem(last=False)
            self._recent_size -= len(old)

    def _forget(self, message_id: MessageId) -> None:
        body = self._recent.pop(message_id, None)
        if body is not None:
            self._recent_size -= len(body)

    def get(self, message_id: MessageId) -> bytes:
        with self._lock:
            return self._get(message_id)

    def _get(self, message_id: MessageId) -> bytes:
        seg, offset, length = self._where[message_id]  # KeyError: not stored here
        recent = self._recent.get(message_id)
        if recent is not None:
            return recent
        if seg == self._seg and self._out is not None:
            self._out.flush()
        with open(self._path(seg), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def delete(self, message_id: MessageId) -> None:
        with self._lock:
            self._delete(message_id)

    def _delete(self, message_id: MessageId) -> None:
        self._forget(message_id)
        where = self._where.pop(message_id, None)
        if where is None:
            return
        seg = where[0]
        self._live[seg] -= 1
        if not self._live[seg]:
            del self._live[seg]
            if seg != self._seg:
                os.remove(self._path(seg))

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        for name in os.listdir(self.dir):
            if name.endswith(".seg"):
                os.remove(os.path.join(self.dir, name))
        self._where.clear()
        self._live.clear()
        self._recent.clear()
        self._recent_size = 0
        self._size = 0

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
