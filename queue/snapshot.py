"""Streaming snapshots of the spool: the index and the bodies, one record at a time.

A snapshot is a CBOR sequence: a header, one record per message (with its body), one
per tombstone. It is produced and consumed as a stream of chunks, so neither side ever
holds the whole of it (raft.storage writes the chunks straight to disk).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2

from mailqueue import heap
from mailqueue.commands import FORMAT, FormatTooNew
from mailqueue.spool import BodyStore, Message, Rcpt, RcptState, Spool, SpoolView
from mailqueue.tombstones import Tombstones
from raft import streams

# 2 added the cluster's replicated format to the header; 3 each node's clock (Spool.clocks)
# and a tombstone's node, by whose clock it is forgotten. No release wrote 1 or 2.
VERSION = 3


class SnapshotError(ValueError):
    """A snapshot this code cannot read."""


def dump(spool: SpoolView | Spool) -> Iterator[bytes]:
    """A spool's records, read lazily: from a view (Spool.open_view) when commands go on
    applying meanwhile, from the spool itself only when nothing does."""
    counts = [len(spool.messages), len(spool.finished)]
    header = [VERSION, spool.now, spool.uncertain_total, *counts, spool.format, spool.clocks]
    yield cbor2.dumps(header)
    for m in spool.messages.values():
        rcpts = [list(r.key()) for r in m.rcpts]
        record = [m.id, m.sender, m.size, m.received_at, m.accepted_by, m.is_bounce, rcpts]
        yield cbor2.dumps([*record, spool.bodies.get(m.id)])
    for mid, (origin, stamp) in spool.finished.items():
        yield cbor2.dumps([mid, origin, stamp])


def load(chunks: Iterator[bytes], bodies: BodyStore | None = None, readable: int = FORMAT) -> Spool:
    """Raises FormatTooNew, before anything is loaded, for the snapshot of a cluster
    whose replicated format is newer than `readable`."""
    with heap.building():
        return _load(chunks, bodies, readable)


def _load(chunks: Iterator[bytes], bodies: BodyStore | None, readable: int) -> Spool:
    decoder = cbor2.CBORDecoder(streams.reader(chunks))
    version, now, uncertain, n_messages, n_tombs, *rest = decoder.decode()
    if version != VERSION or len(rest) != 2:
        raise SnapshotError(f"spool snapshot version {version}, this code reads {VERSION}")
    spool = Spool(bodies)
    spool.format, spool.clocks = rest
    if spool.format > readable:
        raise FormatTooNew(
            f"the snapshot is of replicated format {spool.format}; this version reads up "
            f"to {readable}: upgrade it"
        )
    spool.bodies.clear()
    spool.now, spool.uncertain_total = now, uncertain
    for _ in range(n_messages):
        mid, sender, size, received, by, is_bounce, rcpts, body = decoder.decode()
        msg = Message(mid, sender, size, received, by, is_bounce, [_rcpt(r) for r in rcpts])
        spool.messages[mid] = msg
        spool.bodies.put(mid, body)
        for r in msg.rcpts:
            spool.counts[r.state] += 1
            if r.state in (RcptState.ASSIGNED, RcptState.SENDING):
                spool.load[r.node] = spool.load.get(r.node, 0) + 1
    spool.finished = Tombstones.load(decoder.decode() for _ in range(n_tombs))
    spool.rebuild_index()
    return spool


def _rcpt(f: list[Any]) -> Rcpt:
    address, state, nxt, attempts, attempt, node, err, final_at, reply, dsn, unc = f
    return Rcpt(
        address, RcptState(state), nxt, attempts, attempt, node, err, final_at, reply, dsn, unc
    )
