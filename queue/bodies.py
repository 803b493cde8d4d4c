"""Message bodies on disk, beside the in-memory index.

Bodies are appended to segment files; the index keeps (segment, offset, length) per
message. A segment is deleted once no live message points into it. Nothing here is
fsynced: the Raft log and snapshots are the durable copy, and a restarting node
rebuilds its bodies from them (clear(), then the snapshot and the log re-add them).
The placement of bodies is local to a node and never part of the replicated state.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from mailqueue.commands import MessageId

SEGMENT_BYTES = 64 << 20


class DiskBodies:
    def __init__(self, directory: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._where: dict[MessageId, tuple[int, int, int]] = {}
        self._live: dict[int, int] = {}  # segment -> live bodies in it
        self._seg = 0
        self._out: BinaryIO | None = None
        self._size = 0
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
        if message_id in self._where:
            return
        if self._out is None or (self._size + len(body) > self.segment_bytes and self._size):
            self._roll()
        assert self._out is not None
        self._out.write(body)
        self._where[message_id] = (self._seg, self._size, len(body))
        self._live[self._seg] = self._live.get(self._seg, 0) + 1
        self._size += len(body)

    def get(self, message_id: MessageId) -> bytes:
        seg, offset, length = self._where[message_id]
        if seg == self._seg and self._out is not None:
            self._out.flush()
        with open(self._path(seg), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def delete(self, message_id: MessageId) -> None:
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
        if self._out is not None:
            self._out.close()
            self._out = None
        for name in os.listdir(self.dir):
            if name.endswith(".seg"):
                os.remove(os.path.join(self.dir, name))
        self._where.clear()
        self._live.clear()
        self._size = 0

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
