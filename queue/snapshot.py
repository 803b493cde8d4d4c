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
from mailqueue.spool import BodyStore, Message, Rcpt, RcptState, Spool, SpoolView
from raft import streams

VERSION = 1


class SnapshotError(ValueError):
    """A snapshot this code cannot read."""


def dump(spool: SpoolView | Spool) -> Iterator[bytes]:
    """A spool's records, read lazily: from a view (Spool.open_view) when commands go on
    applying meanwhile, from the spool itself only when nothing does."""
    yield cbor2.dumps(
        [VERSION, spool.now, spool.uncertain_total, len(spool.messages), len(spool.finished)]
    )
    for m in spool.messages.values():
        rcpts = [list(r.key()) for r in m.rcpts]
        record = [m.id, m.sender, m.size, m.received_at, m.accepted_by, m.is_bounce, rcpts]
        yield cbor2.dumps([*record, spool.bodies.get(m.id)])
    for mid, at in spool.finished.items():
        yield cbor2.dumps([mid, at])


def load(chunks: Iterator[bytes], bodies: BodyStore | None = None) -> Spool:
    with heap.building():
        return _load(chunks, bodies)


def _load(chunks: Iterator[bytes], bodies: BodyStore | None) -> Spool:
    decoder = cbor2.CBORDecoder(streams.reader(chunks))
    version, now, uncertain, n_messages, n_tombs = decoder.decode()
    if version != VERSION:
        raise SnapshotError(f"spool snapshot version {version}, this code reads {VERSION}")
    spool = Spool(bodies)
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
