"""A tiny replicated key-value state machine, for the runtime's tests and benchmark."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import cbor2

from raft import streams


class KV:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.applied = 0

    def apply(self, index: int, command: bytes | memoryview) -> bytes:
        op, key, *value = cbor2.loads(command)
        self.applied = index
        if op == "put":
            self.data[key] = value[0]
        elif op == "del":
            self.data.pop(key, None)
        return b"ok"

    def snapshot(self) -> Iterable[bytes]:
        # A count, then one record per key: written and read as a stream. The items are
        # taken now, not when read: applying goes on while another thread reads them.
        items = list(self.data.items())
        head = cbor2.dumps([self.applied, len(items)])
        return itertools.chain([head], (cbor2.dumps([k, v]) for k, v in items))

    def snapshot_done(self) -> None: ...

    def restore(self, chunks: Iterator[bytes]) -> None:
        decoder = cbor2.CBORDecoder(streams.reader(chunks))
        self.applied, count = decoder.decode()
        self.data = {}
        for _ in range(count):
            key, value = decoder.decode()
            self.data[key] = value


def put(key: str, value: bytes) -> bytes:
    return cbor2.dumps(["put", key, value])
