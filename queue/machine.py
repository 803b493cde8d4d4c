"""The spool as a Raft state machine (raft.node.StateMachine): bytes in, bytes out."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import cbor2

from mailqueue import codec, heap, snapshot
from mailqueue.commands import FORMAT, Batch, Command, FormatTooNew, SetFormat
from mailqueue.spool import Applied, BodyStore, Spool

log = logging.getLogger(__name__)


class SpoolMachine:
    def __init__(self, bodies: BodyStore | None = None, readable: int = FORMAT) -> None:
        self.spool = Spool(bodies)
        self.readable = readable  # the newest format this node applies (commands.FORMAT)
        self.undecodable = 0  # committed entries that were not spool commands

    def apply(self, index: int, data: bytes | memoryview) -> bytes:
        try:
            cmd = codec.decode(data)
        except codec.DecodeError as exc:
            # Every replica refuses it the same way, so they stay identical; it is
            # reported, never skipped silently.
            self.undecodable += 1
            log.error("log entry %d is not a spool command and was refused: %s", index, exc)
            return encode_result(Applied(False, f"undecodable command: {exc}"))
        self._check_format(index, cmd)
        return encode_result(self.spool.apply(cmd))

    def _check_format(self, index: int, cmd: Command) -> None:
        inner = cmd.commands if isinstance(cmd, Batch) else (cmd,)
        for c in inner:
            if isinstance(c, SetFormat) and c.format > self.readable:
                raise FormatTooNew(
                    f"log entry {index} raises the cluster's replicated format to "
                    f"{c.format}; this version reads up to {self.readable}: upgrade it"
                )

    def snapshot(self) -> Iterable[bytes]:
        return snapshot.dump(self.spool.open_view())

    def snapshot_done(self) -> None:
        self.spool.close_view()

    def restore(self, chunks: Iterator[bytes]) -> None:
        self.spool = snapshot.load(chunks, self.spool.bodies, self.readable)
        heap.settle()


def encode_result(a: Applied) -> bytes:
    return cbor2.dumps(_result_to_wire(a))


def _result_to_wire(a: Applied) -> list[Any]:
    wire: list[Any] = [a.ok, a.detail, a.changed]
    if a.items:
        wire.append([_result_to_wire(i) for i in a.items])
    return wire


def decode_result(data: bytes) -> Applied:
    return _result_from_wire(cbor2.loads(data))


def _result_from_wire(wire: list[Any]) -> Applied:
    ok, detail, changed, *items = wire
    nested = tuple(_result_from_wire(i) for i in items[0]) if items else ()
    return Applied(bool(ok), str(detail), int(changed), nested)
