"""A node's durable state: a segmented write-ahead log plus snapshot files.

Layout of the data directory:

    wal/00000001.wal ...      segments of records: u32 length, u32 CRC32C, cbor payload
    snap/<index>-<term>.snap  snapshot data, then a trailer (meta, CRC of the data)
    snap/incoming.tmp         a snapshot being received from the leader

Records are a hard state, an entry, or a "snapshot installed" marker. Replay keeps the
last hard state; an entry at an index already seen replaces that entry and everything
after it (the core truncated a conflicting suffix). Every new segment starts with the
current hard state and snapshot marker, so a segment whose entries a snapshot covers
can be deleted without losing either.

One `save(ready)` writes all of a Ready's records and fsyncs once: group commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import cbor2
import crc32c

from raft import codec
from raft.core import InitialState
from raft.storage.errors import CorruptLogError, StorageError, WrongOwner
from raft.storage.fs import AppendFile, FileSystem, OsFileSystem
from raft.types import ConfState, Entry, EntryKind, HardState, Ready, SnapshotMeta

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<II")  # payload length, CRC32C of the payload
_TRAILER = struct.Struct("<III4s")  # meta length, data CRC32C, reserved, magic
_MAGIC = b"RSN1"
_HS, _ENTRY, _SNAP_MARK = 0, 1, 2
MAX_RECORD = 256 << 20  # a length field beyond this is damage, not a record
# A snapshot is fsynced as it is written, this much at a time (as a received one is, a
# chunk at a time). Synced only at its end, all of it would sit dirty in the page cache
# and then go to disk at once (GiB for a large spool) with every log fsync queued
# behind it: commits would stall (CockroachDB's finding, cockroachdb/cockroach#20279).
SNAPSHOT_SYNC_BYTES = 1 << 20
OWNER_FILE = "owner"  # the id of the node whose state this is


def _record(payload: list[object]) -> bytes:
    body = cbor2.dumps(payload)
    return _HEADER.pack(len(body), crc32c.crc32c(body)) + body


def _entry_record(e: Entry) -> bytes:
    return _record([_ENTRY, e.term, e.index, int(e.kind), e.data])


def _entry_parts(e: Entry) -> list[bytes]:
    """_entry_record(e), as parts that join to it: for an entry of codec.LARGE or more,
    whose data is written from where it lies. Encoded, framed and joined with the rest
    of its Ready, it was copied three times, all alive at once beside the entry."""
    if len(e.data) < codec.LARGE:
        return [_entry_record(e)]
    body = codec.pieces([_ENTRY, e.term, e.index, int(e.kind), e.data])
    crc = 0
    for part in body.parts:
        crc = crc32c.crc32c(part, crc)
    return [_HEADER.pack(body.size, crc), *body.parts]


def _writes(parts: list[bytes]) -> list[bytes]:
    """`parts` as few writes: each run of small parts joined into one, and each large
    part on its own (a Ready of small records stays one write, as it always was)."""
    out: list[bytes] = []
    run: list[bytes] = []
    for part in parts:
        if len(part) < codec.LARGE:
            run.append(part)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(part)
    if run:
        out.append(b"".join(run))
    return out


def _hs_record(hs: HardState) -> bytes:
    return _record([_HS, hs.term, hs.vote, hs.commit])


def _mark_record(meta: SnapshotMeta) -> bytes:
    return _record([_SNAP_MARK, meta.index, meta.term])


@dataclass(slots=True)
class _Segment:
    seq: int
    path: str
    size: int = 0
    max_index: int = 0


@dataclass(slots=True)
class _Replay:
    """The log as the segments describe it."""

    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)

    def add_entry(self, e: Entry) -> None:
        while self.entries and self.entries[-1].index >= e.index:
            self.entries.pop()
        if self.entries and e.index != self.entries[-1].index + 1:
            raise StorageError(f"log gap: entry {e.index} after {self.entries[-1].index}")
        self.entries.append(e)

    def install(self, index: int, term: int) -> None:
        keep = any(e.index == index and e.term == term for e in self.entries)
        self.entries = [e for e in self.entries if e.index > index] if keep else []


def scan_records(
    data: bytes, path: str, last_segment: bool
) -> tuple[list[tuple[int, object]], int]:
    """Decode the records of one segment, with their offsets, and the length of the
    valid prefix. Damage after which no valid record follows, in the last segment, is
    a write cut short by a crash: the scan ends there. Damage anywhere else raises
    CorruptLogError naming the file and offset."""
    records: list[tuple[int, object]] = []
    off = 0
    while off < len(data):
        why = _damage(data, off)
        if why is None:
            length, _ = _HEADER.unpack_from(data, off)
            body = data[off + _HEADER.size : off + _HEADER.size + length]
            records.append((off, cbor2.loads(body)))
            off += _HEADER.size + length
            continue
        if last_segment and not _valid_record_after(data, off + 1):
            return records, off
        raise CorruptLogError(path, off, why)
    return records, off


def _damage(data: bytes, off: int) -> str | None:
    if len(data) - off < _HEADER.size:
        return "truncated record header"
    length, crc = _HEADER.unpack_from(data, off)
    if length == 0 or length > MAX_RECORD:
        return f"impossible record length {length}"
    end = off + _HEADER.size + length
    if end > len(data):
        return "record runs past the end of the file"
    if crc32c.crc32c(data[off + _HEADER.size : end]) != crc:
        return "checksum mismatch"
    try:
        cbor2.loads(data[off + _HEADER.size : end])
    except Exception:
        return "checksum matches but the payload does not decode"
    return None


def _valid_record_after(data: bytes, start: int) -> bool:
    """Is there any intact record at or after `start`? Only a torn write leaves none:
    a damaged record with intact ones after it is corruption, not a crash."""
    limit = len(data) - _HEADER.size
    for p in range(start, limit + 1):
        length, crc = _HEADER.unpack_from(data, p)
        if 0 < length <= limit - p and crc32c.crc32c(data[p + 8 : p + 8 + length]) == crc:
            return True
    return False


def owner_of(directory: str) -> str | None:
    """The node id that claimed a data directory (Storage.claim); None: unclaimed."""
    try:
        with open(os.path.join(directory, OWNER_FILE), "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None


class Storage:
    """Not thread-safe: one runtime task (or its executor thread) uses it at a time."""

    def __init__(
        self, directory: str, fs: FileSystem | None = None, segment_bytes: int = 64 << 20,
        owner: str | None = None,
    ) -> None:  # fmt: skip
        self.dir = directory
        self.fs = fs or OsFileSystem()
        self.segment_bytes = segment_bytes
        self.wal_dir = os.path.join(directory, "wal")
        self.snap_dir = os.path.join(directory, "snap")
        self.fs.makedirs(self.wal_dir)
        self.fs.makedirs(self.snap_dir)
        self.hard_state = HardState()
        self.snapshot: SnapshotMeta | None = None
        self._segments: list[_Segment] = []
        self._file: AppendFile | None = None
        self._incoming: AppendFile | None = None
        self._incoming_meta: SnapshotMeta | None = None
        self._incoming_crc = 0
        self._recovered: list[Entry] = []
        # save() and a snapshot being published may run in two worker threads at once.
        self._lock = threading.Lock()
        if owner is not None:
            self.claim(owner)  # before recovery, which may cut a torn tail: not in another's
        self._recover()

    def claim(self, owner: str) -> None:
        """Bind this directory to node `owner` for good, or refuse it if another node's
        id is written there (etcd keeps its member id in the WAL for the same reason).
        A directory from before this file existed is claimed by its first runner."""
        path = os.path.join(self.dir, OWNER_FILE)
        if self.fs.exists(path):
            held = self.fs.read(path).decode("utf-8", "replace").strip()
            if held != owner:
                raise WrongOwner(self.dir, held, owner)
            return
        tmp = path + ".tmp"
        if self.fs.exists(tmp):
            self.fs.remove(tmp)  # a crash while claiming
        f = self.fs.open_append(tmp)
        try:
            f.write(owner.encode() + b"\n")
            f.sync()
        finally:
            f.close()
        self.fs.rename(tmp, path)
        self.fs.sync_dir(self.dir)

    # ---- recovery

    def _recover(self) -> None:
        self.snapshot = self._latest_snapshot()
        replay = _Replay()
        names = [n for n in self.fs.listdir(self.wal_dir) if n.endswith(".wal")]
        for k, name in enumerate(names):
            path = os.path.join(self.wal_dir, name)
            data = self.fs.read(path)
            last = k == len(names) - 1
            records, valid = scan_records(data, path, last)
            if valid < len(data):
                # A write a crash cut short: never acknowledged, so dropped; but said.
                log.warning("%s: cut %d bytes of a write torn by a crash, at byte offset %d",
                            path, len(data) - valid, valid)  # fmt: skip
                self.fs.truncate(path, valid)  # before appending
            seg = _Segment(int(name[:-4]), path, valid)
            for offset, rec in records:
                self._replay_one(replay, rec, seg, path, offset)
            self._segments.append(seg)
        self.hard_state = replay.hard_state
        snap_index = self.snapshot.index if self.snapshot else 0
        entries = [e for e in replay.entries if e.index > snap_index]
        if entries and entries[0].index > snap_index + 1:
            raise StorageError(
                f"{self.dir}: the log starts at {entries[0].index} but the newest snapshot "
                f"ends at {snap_index}: entries in between are missing (hashicorp/raft #85)"
            )
        self._recovered = entries
        fresh = not self._segments
        if fresh:
            self._new_segment()
        self._file = self.fs.open_append(self._segments[-1].path)
        if fresh:
            self.fs.sync_dir(self.wal_dir)  # a new file's name is durable only now

    def _replay_one(
        self, replay: _Replay, rec: object, seg: _Segment, path: str, offset: int
    ) -> None:
        if not isinstance(rec, list) or not rec:
            raise CorruptLogError(path, offset, f"record of unknown shape {rec!r:.60}")
        kind = rec[0]
        if kind == _HS and len(rec) == 4:
            replay.hard_state = HardState(rec[1], rec[2], rec[3])
        elif kind == _ENTRY and len(rec) == 5:
            e = Entry(rec[1], rec[2], EntryKind(rec[3]), rec[4])
            replay.add_entry(e)
            seg.max_index = max(seg.max_index, e.index)
        elif kind == _SNAP_MARK and len(rec) == 3:
            replay.install(rec[1], rec[2])
        else:
            raise CorruptLogError(path, offset, f"unknown record kind {kind!r}")

    def initial_state(self, bootstrap: ConfState) -> InitialState:
        return InitialState(self.hard_state, self.snapshot, tuple(self._recovered), bootstrap)

    # ---- the write path

    def save(self, rd: Ready) -> None:
        """Make a Ready durable: chunks, snapshot install, entries, hard state; one fsync."""
        with self._lock:
            self._save(rd)

    def _save(self, rd: Ready) -> None:
        for chunk in rd.snapshot_chunks:
            self._write_chunk(chunk.meta, chunk.offset, chunk.data)
        if rd.snapshot_chunks and self._incoming is not None:
            self._incoming.sync()  # each chunk is acknowledged only once durable
        parts: list[bytes] = []
        if rd.snapshot is not None:
            self._install_incoming(rd.snapshot)
            parts.append(_mark_record(rd.snapshot))
        seg = self._segments[-1]
        for e in rd.entries:
            parts += _entry_parts(e)
            seg.max_index = e.index
        if rd.hard_state is not None:  # after the entries: see Ready's contract
            parts.append(_hs_record(rd.hard_state))
            self.hard_state = rd.hard_state
        if parts:
            assert self._file is not None
            for blob in _writes(parts):
                self._file.write(blob)
                seg.size += len(blob)
            if rd.must_sync():
                self._file.sync()
            if seg.size >= self.segment_bytes:
                self._rotate()

    def _new_segment(self) -> _Segment:
        seq = self._segments[-1].seq + 1 if self._segments else 1
        seg = _Segment(seq, os.path.join(self.wal_dir, f"{seq:08d}.wal"))
        self._segments.append(seg)
        return seg

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        seg = self._new_segment()
        self._file = self.fs.open_append(seg.path)
        # The new segment restates what older ones said, so those can be deleted.
        head = _hs_record(self.hard_state)
        if self.snapshot is not None:
            head = _mark_record(self.snapshot) + head
        self._file.write(head)
        self._file.sync()
        self.fs.sync_dir(self.wal_dir)
        seg.size = len(head)

    def _compact_segments(self) -> None:
        assert self.snapshot is not None
        while len(self._segments) > 1 and self._segments[0].max_index <= self.snapshot.index:
            if self._segments[1].size == 0:
                break
            self.fs.remove(self._segments.pop(0).path)
        self.fs.sync_dir(self.wal_dir)

    # ---- snapshots

    def _snap_path(self, meta: SnapshotMeta) -> str:
        return os.path.join(self.snap_dir, f"{meta.index:020d}-{meta.term:020d}.snap")

    def _latest_snapshot(self) -> SnapshotMeta | None:
        names = sorted(n for n in self.fs.listdir(self.snap_dir) if n.endswith(".snap"))
        for name in reversed(names):
            path = os.path.join(self.snap_dir, name)
            meta = self._read_trailer(path)
            if meta is not None:
                return meta
        return None

    def _read_trailer(self, path: str) -> SnapshotMeta | None:
        size = self.fs.size(path)
        if size < _TRAILER.size:
            return None
        meta_len, _, _, magic = self._trailer_fields(path, size)
        if magic != _MAGIC or meta_len > size - _TRAILER.size:
            raise StorageError(f"{path}: not a complete snapshot file")
        raw = self.fs.read_range(path, size - _TRAILER.size - meta_len, meta_len)
        meta = codec.decode_snapshot_meta(raw)
        if meta.size != size - _TRAILER.size - meta_len:
            raise StorageError(f"{path}: snapshot data is {size} bytes, meta says {meta.size}")
        return meta

    def _trailer_fields(self, path: str, size: int) -> tuple[int, int, int, bytes]:
        raw = self.fs.read_range(path, size - _TRAILER.size, _TRAILER.size)
        fields: tuple[int, int, int, bytes] = _TRAILER.unpack(raw)
        return fields

    def _trailer(self, meta: SnapshotMeta, crc: int) -> bytes:
        raw = codec.encode_snapshot_meta(meta)
        return raw + _TRAILER.pack(len(raw), crc, 0, _MAGIC)

    def write_snapshot(
        self, index: int, term: int, conf: ConfState, chunks: Iterable[bytes]
    ) -> SnapshotMeta:
        """Stream a state machine snapshot to disk: temporary file, fsync, rename, fsync
        the directory. Returns its meta (with the size) for `Raft.snapshot_taken`."""
        tmp = os.path.join(self.snap_dir, "local.tmp")
        if self.fs.exists(tmp):
            self.fs.remove(tmp)
        f = self.fs.open_append(tmp)
        try:
            size, crc, synced = 0, 0, 0
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
                crc = crc32c.crc32c(chunk, crc)
                if size - synced >= SNAPSHOT_SYNC_BYTES:
                    f.sync()
                    synced = size
            meta = SnapshotMeta(index, term, conf, size)
            f.write(self._trailer(meta, crc))
            f.sync()
        except BaseException:
            # Most often a full disk: the partial file goes at once, not at the next
            # attempt, and so does its descriptor (an open file keeps its blocks).
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                self.fs.remove(tmp)
            raise
        f.close()
        with self._lock:
            self._publish(tmp, meta)
        return meta

    def _write_chunk(self, meta: SnapshotMeta, offset: int, data: bytes) -> None:
        tmp = os.path.join(self.snap_dir, "incoming.tmp")
        if offset == 0 or self._incoming_meta != meta:
            if self._incoming is not None:
                self._incoming.close()
            if self.fs.exists(tmp):
                self.fs.remove(tmp)
            self._incoming = self.fs.open_append(tmp)
            self._incoming_meta = meta
            self._incoming_crc = 0
        assert self._incoming is not None
        self._incoming.write(data)
        self._incoming_crc = crc32c.crc32c(data, self._incoming_crc)

    def _install_incoming(self, meta: SnapshotMeta) -> None:
        assert self._incoming is not None and self._incoming_meta == meta
        self._incoming.write(self._trailer(meta, self._incoming_crc))
        self._incoming.sync()
        self._incoming.close()
        self._incoming = self._incoming_meta = None
        self._publish(os.path.join(self.snap_dir, "incoming.tmp"), meta)

    def _publish(self, tmp: str, meta: SnapshotMeta) -> None:
        final = self._snap_path(meta)
        self.fs.rename(tmp, final)
        self.fs.sync_dir(self.snap_dir)
        self.snapshot = meta
        # Keep the previous snapshot too: a transfer to a follower may still be reading
        # it until the core learns of the new one.
        names = sorted(n for n in self.fs.listdir(self.snap_dir) if n.endswith(".snap"))
        for name in names[:-2]:
            self.fs.remove(os.path.join(self.snap_dir, name))
        self._compact_segments()

    def read_snapshot(self, meta: SnapshotMeta, offset: int, length: int) -> bytes:
        """SnapshotSource for the core: a chunk of the snapshot's data."""
        return self.fs.read_range(self._snap_path(meta), offset, length)

    def snapshot_chunks(self, meta: SnapshotMeta, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Stream a snapshot's data, checking its CRC at the end."""
        path = self._snap_path(meta)
        size = self.fs.size(path)
        _, crc, _, _ = self._trailer_fields(path, size)
        got = 0
        for off in range(0, meta.size, chunk_bytes):
            chunk = self.fs.read_range(path, off, min(chunk_bytes, meta.size - off))
            got = crc32c.crc32c(chunk, got)
            yield chunk
        if got != crc:
            raise StorageError(f"{path}: snapshot data checksum mismatch")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None
