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
from raft import streams

VERSION = 2  # 2 added the cluster's replicated format to the header; 1 is read as format 1


class SnapshotError(ValueError):
    """A snapshot this code cannot read."""


def dump(spool: SpoolView | Spool) -> Iterator[bytes]:
    """A spool's records, read lazily: from a view (Spool.open_view) when commands go on
    applying meanwhile, from the spool itself only when nothing does."""
    counts = [len(spool.messages), len(spool.finished)]
    yield cbor2.dumps([VERSION, spool.now, spool.uncertain_total, *counts, spool.format])
    for m in spool.messages.values():
        rcpts = [list(r.key()) for r in m.rcpts]
        record = [m.id, m.sender, m.size, m.received_at, m.accepted_by, m.is_bounce, rcpts]
        yield cbor2.dumps([*record, spool.bodies.get(m.id)])
    for mid, at in spool.finished.items():
        yield cbor2.dumps([mid, at])


def load(chunks: Iterator[bytes], bodies: BodyStore | None = None, readable: int = FORMAT) -> Spool:
    """Raises FormatTooNew, before anything is loaded, for the snapshot of a cluster
    whose replicated format is newer than `readable`."""
    with heap.building():
        return _load(chunks, bodies, readable)


def _load(chunks: Iterator[bytes], bodies: BodyStore | None, readable: int) -> Spool:
    decoder = cbor2.CBORDecoder(streams.reader(chunks))
    version, now, uncertain, n_messages, n_tombs, *rest = decoder.decode()
    if version not in (1, VERSION) or len(rest) != version - 1:
        raise SnapshotError(f"spool snapshot version {version}, this code reads 1 and {VERSION}")
    spool = Spool(bodies)
    spool.format = rest[0] if rest else 1
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
    for _ in range(n_tombs):
        mid, at = decoder.decode()
        spool.finished[mid] = at
    spool.rebuild_index()
    spool._finished_order.extend(sorted((at, mid) for mid, at in spool.finished.items()))
    return spool


def _rcpt(f: list[Any]) -> Rcpt:
    address, state, nxt, attempts, attempt, node, err, final_at, reply, dsn, unc = f
    return Rcpt(
        address, RcptState(state), nxt, attempts, attempt, node, err, final_at, reply, dsn, unc
    )
