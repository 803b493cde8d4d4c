"""The write-ahead log and snapshots: recovery after torn writes, corruption, power loss."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft import codec
from raft.storage import CorruptLogError, Storage, StorageError, WrongOwner, store
from raft.storage.store import OWNER_FILE, SNAPSHOT_SYNC_BYTES, scan_records
from raft.types import ConfState, Entry, HardState, Ready, SnapshotChunk, SnapshotMeta
from tests.unit.powerloss import CrashNow, PowerLossFS

CONF = ConfState(("a", "b", "c"), ())


def entries(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(term, i, data=b"entry-%d-%d" % (i, term)) for i in range(first, last + 1)]


def recovered(store: Storage) -> tuple[HardState, list[Entry]]:
    init = store.initial_state(CONF)
    return init.hard_state, list(init.entries)


def test_hard_state_and_entries_survive_a_restart(tmp_path: pathlib.Path) -> None:
    s = Storage(str(tmp_path))
    s.save(Ready(hard_state=HardState(2, "a", 3), entries=entries(1, 5, 2)))
    s.close()
    assert recovered(Storage(str(tmp_path))) == (HardState(2, "a", 3), entries(1, 5, 2))


def test_a_conflicting_suffix_is_replaced_on_replay(tmp_path: pathlib.Path) -> None:
    s = Storage(str(tmp_path))
    s.save(Ready(entries=entries(1, 5, 1)))
    s.save(Ready(entries=entries(3, 4, 2)))
    s.close()
    assert recovered(Storage(str(tmp_path)))[1] == entries(1, 2, 1) + entries(3, 4, 2)


def _one_segment(tmp_path: pathlib.Path) -> tuple[str, bytes, int]:
    s = Storage(str(tmp_path))
    s.save(Ready(hard_state=HardState(1, "a", 0), entries=entries(1, 3, 1)))
    before = s.fs.size(s._segments[-1].path)
    s.save(Ready(entries=entries(4, 4, 1)))
    s.close()
    path = os.path.join(str(tmp_path), "wal", "00000001.wal")
    return path, pathlib.Path(path).read_bytes(), before


def test_truncation_at_every_byte_of_the_last_record_recovers_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    path, data, last_start = _one_segment(tmp_path)
    for cut in range(last_start, len(data)):
        pathlib.Path(path).write_bytes(data[:cut])
        hs, got = recovered(Storage(str(tmp_path)))
        assert (hs, got) == (HardState(1, "a", 0), entries(1, 3, 1)), cut
        assert os.path.getsize(path) == last_start  # the torn tail is cut off
    pathlib.Path(path).write_bytes(data)
    assert recovered(Storage(str(tmp_path)))[1] == entries(1, 4, 1)


def test_a_torn_tail_is_cut_and_said(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Never acknowledged, so dropped, but not silently: the operator sees the crash."""
    path, data, last_start = _one_segment(tmp_path)
    pathlib.Path(path).write_bytes(data[:-3])
    Storage(str(tmp_path))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    want = f"{path}: cut {len(data) - 3 - last_start} bytes of a write torn by a crash"
    assert said == [f"{want}, at byte offset {last_start}"], said


def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path: pathlib.Path) -> None:
    path, data, _ = _one_segment(tmp_path)
    pathlib.Path(path).write_bytes(data + bytes(4096))
    assert recovered(Storage(str(tmp_path)))[1] == entries(1, 4, 1)


@pytest.mark.parametrize("record", [0, 1, 2, 3])
@pytest.mark.parametrize("byte", [0, 4, 9, -1])
def test_a_flipped_byte_in_a_middle_record_stops_start_up(
    tmp_path: pathlib.Path, record: int, byte: int
) -> None:
    path, data, _ = _one_segment(tmp_path)
    starts = [off for off, _ in scan_records(data, path, last_segment=True)[0]]
    assert len(starts) == 5  # hard state, entries 1-3, entry 4
    start, end = starts[record], starts[record + 1]
    damaged = bytearray(data)
    damaged[start + byte if byte >= 0 else end + byte] ^= 0x40
    pathlib.Path(path).write_bytes(bytes(damaged))
    with pytest.raises(CorruptLogError) as err:
        Storage(str(tmp_path))
    assert err.value.path == path and err.value.offset == start
    assert f"{path} at byte offset {start}" in str(err.value)
    assert pathlib.Path(path).read_bytes() == bytes(damaged)  # nothing was "repaired"


def test_a_directory_belongs_to_the_first_node_that_claims_it(tmp_path: pathlib.Path) -> None:
    """Another node's Raft state (swapped configs, a cloned VM) is refused: run on it, a
    node would vote again in its owner's terms and lack what it had acknowledged."""
    d = str(tmp_path / "raft")
    Storage(d).claim("n1")  # a fresh directory, or one from before the owner file
    Storage(d).claim("n1")  # its owner, again
    with pytest.raises(
        WrongOwner, match="holds the Raft state of node 'n1', and this node is 'n2'"
    ):
        Storage(d).claim("n2")
    assert (tmp_path / "raft" / OWNER_FILE).read_text() == "n1\n"
    with pytest.raises(WrongOwner):  # as a node opens it: before recovery touches a byte
        Storage(d, owner="n2")
    # A crash while claiming left the temporary file: the next claim replaces it.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / (OWNER_FILE + ".tmp")).write_text("n7")
    Storage(str(tmp_path / "fresh")).claim("n2")
    assert (tmp_path / "fresh" / OWNER_FILE).read_text() == "n2\n"


def test_snapshot_is_streamed_to_disk_and_read_back(tmp_path: pathlib.Path) -> None:
    s = Storage(str(tmp_path))
    s.save(Ready(entries=entries(1, 10, 1)))
    meta = s.write_snapshot(8, 1, CONF, (b"chunk-%d;" % k for k in range(100)))
    assert meta.size == sum(len(b"chunk-%d;" % k) for k in range(100))
    assert b"".join(s.snapshot_chunks(meta, 7)) == b"".join(b"chunk-%d;" % k for k in range(100))
    assert s.read_snapshot(meta, 6, 2) == b"0;"
    s.close()
    init = Storage(str(tmp_path)).initial_state(CONF)
    assert init.snapshot == meta and [e.index for e in init.entries] == [9, 10]


def test_a_snapshot_is_made_durable_as_it_is_written() -> None:
    fs = PowerLossFS()
    s = Storage("/node", fs=fs)
    chunk = b"x" * (256 << 10)
    unsynced = []

    def chunks() -> Iterator[bytes]:
        for _ in range(20):  # 5 MiB
            yield chunk
            tmp = fs.names["/node/snap/local.tmp"]  # after the write of that chunk
            unsynced.append(len(tmp.data) - len(tmp.durable))

    s.write_snapshot(8, 1, CONF, chunks())
    assert max(unsynced) < SNAPSHOT_SYNC_BYTES + len(chunk) < 5 << 20


def _open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_a_snapshot_that_fails_midway_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    """A full disk mid-snapshot: the partial file and its descriptor go at once (an
    open descriptor keeps a removed file's blocks), the previous snapshot stays in
    use, and the next attempt succeeds."""
    s = Storage(str(tmp_path))
    s.save(Ready(entries=entries(1, 20, 1)))
    first = s.write_snapshot(8, 1, CONF, [b"first"])

    def filling() -> Iterator[bytes]:
        yield b"x" * (1 << 20)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        s.write_snapshot(15, 1, CONF, filling())
    assert not [n for n in os.listdir(tmp_path / "snap") if n.endswith(".tmp")]
    assert not [f for f in _open_files() if "local.tmp" in f]
    assert s.snapshot == first and b"".join(s.snapshot_chunks(first)) == b"first"
    assert s.write_snapshot(15, 1, CONF, [b"second"]).index == 15


def test_old_segments_are_deleted_once_a_snapshot_covers_them(tmp_path: pathlib.Path) -> None:
    s = Storage(str(tmp_path), segment_bytes=200)
    for i in range(1, 41):
        s.save(Ready(hard_state=HardState(1, "a", i - 1), entries=entries(i, i, 1)))
    segments = len(os.listdir(tmp_path / "wal"))
    assert segments > 5
    s.write_snapshot(30, 1, CONF, [b"state"])
    assert len(os.listdir(tmp_path / "wal")) < segments
    s.close()
    hs, got = recovered(Storage(str(tmp_path)))
    assert hs == HardState(1, "a", 39)
    assert [e.index for e in got] == list(range(31, 41))


def test_a_missing_segment_is_refused_rather_than_a_gap_accepted(tmp_path: pathlib.Path) -> None:
    s = Storage(str(tmp_path), segment_bytes=200)
    for i in range(1, 21):
        s.save(Ready(entries=entries(i, i, 1)))
    s.close()
    names = sorted(os.listdir(tmp_path / "wal"))
    os.remove(tmp_path / "wal" / names[0])
    with pytest.raises(StorageError, match="missing"):
        Storage(str(tmp_path))


def test_a_snapshot_received_in_chunks_is_installed(tmp_path: pathlib.Path) -> None:
    s = Storage(str(tmp_path))
    s.save(Ready(entries=entries(1, 3, 1)))
    data = b"remote state " * 10
    meta = SnapshotMeta(50, 4, CONF, len(data))
    s.save(Ready(snapshot_chunks=[SnapshotChunk(meta, 0, data[:60], False)]))
    chunk = SnapshotChunk(meta, 60, data[60:], True)
    s.save(Ready(snapshot_chunks=[chunk], snapshot=meta, hard_state=HardState(4, None, 50)))
    s.close()
    s2 = Storage(str(tmp_path))
    init = s2.initial_state(CONF)
    assert init.snapshot == meta and init.entries == ()  # the conflicting log was dropped
    assert b"".join(s2.snapshot_chunks(meta)) == data


# ---- power loss: only fsynced bytes and names survive


def _model_after(saves: list[Ready]) -> tuple[HardState, list[Entry]]:
    hs, log = HardState(), list[Entry]()
    for rd in saves:
        if rd.hard_state:
            hs = rd.hard_state
        if rd.entries:
            log = [e for e in log if e.index < rd.entries[0].index] + rd.entries
    return hs, log


@st.composite
def save_sequences(draw: st.DrawFn) -> list[Ready]:
    saves, last, term = [], 0, 1
    for _ in range(draw(st.integers(1, 12))):
        term += draw(st.integers(0, 1))
        first = draw(st.integers(max(1, last - 3), last + 1))
        last = first + draw(st.integers(0, 4))
        hs = HardState(term, draw(st.sampled_from([None, "a", "b"])), 0)
        saves.append(Ready(hard_state=hs, entries=entries(first, last, term)))
    return saves


@settings(max_examples=150, deadline=None)
@given(save_sequences(), st.integers(0, 200), st.integers(60, 400))
def test_power_loss_keeps_every_acknowledged_save(
    saves: list[Ready], crash_after: int, segment_bytes: int
) -> None:
    fs = PowerLossFS(crash_after=crash_after)
    done = 0
    try:
        store = Storage("/data", fs=fs, segment_bytes=segment_bytes)
        for rd in saves:
            store.save(rd)
            done += 1
    except CrashNow:
        pass
    fs.crash()
    got = recovered(Storage("/data", fs=fs, segment_bytes=segment_bytes))
    # Everything acknowledged is there; the save in flight is there whole or not at all.
    assert got in (_model_after(saves[:done]), _model_after(saves[: done + 1]))


def test_a_torn_batch_never_leaves_the_commit_index_on_a_stale_entry(
    tmp_path: pathlib.Path,
) -> None:
    """Found by the simulator (seed 131954): with the hard state written first, a torn
    batch could keep commit=1 while index 1 still held the old term's entry."""
    s = Storage(str(tmp_path))
    s.save(Ready(hard_state=HardState(1, "a", 0), entries=entries(1, 1, 1)))
    start = s.fs.size(s._segments[-1].path)
    s.save(Ready(hard_state=HardState(2, None, 1), entries=entries(1, 1, 2)))
    s.close()
    path = os.path.join(str(tmp_path), "wal", "00000001.wal")
    data = pathlib.Path(path).read_bytes()
    for cut in range(start, len(data) + 1):
        pathlib.Path(path).write_bytes(data[:cut])
        hs, got = recovered(Storage(str(tmp_path)))
        committed = [e for e in got if e.index <= hs.commit]
        assert all(e.term == 2 for e in committed), cut


@pytest.mark.parametrize("size", [0, codec.LARGE - 1, codec.LARGE, 3 * codec.LARGE + 5])
def test_an_entry_in_parts_is_the_same_record(size: int) -> None:
    e = Entry(7, 12345, data=os.urandom(size))
    assert b"".join(store._entry_parts(e)) == store._entry_record(e)


def test_a_large_entry_is_written_from_where_it_lies(tmp_path: pathlib.Path) -> None:
    """An 8 MiB entry costs the write no copy of itself (it cost three: its encoding,
    the record around that, and the join with the rest of the Ready), and comes back."""
    big = Entry(1, 2, data=os.urandom(8 * codec.LARGE))
    written = [*entries(1, 1, 1), big, *entries(3, 4, 1)]
    s = Storage(str(tmp_path))
    tracemalloc.start()
    s.save(Ready(hard_state=HardState(1, "a", 0), entries=written))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    s.close()
    assert peak < len(big.data) / 4, peak
    assert recovered(Storage(str(tmp_path))) == (HardState(1, "a", 0), written)


def test_a_ready_of_small_records_is_one_write() -> None:
    """As before entries could be large: what the power-loss tests step through."""
    parts = [b"a", b"bb", b"c" * codec.LARGE, b"d", b"e"]
    assert store._writes(parts[:2]) == [b"abb"]
    assert store._writes(parts) == [b"abb", parts[2], b"de"]
    assert store._writes(parts)[1] is parts[2]
