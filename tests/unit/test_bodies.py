"""Bodies on disk: read back, segments freed when their last body goes."""

from __future__ import annotations

import os
import pathlib

from mailqueue.bodies import DiskBodies


def test_bodies_are_read_back_and_segments_freed(tmp_path: pathlib.Path) -> None:
    store = DiskBodies(str(tmp_path), segment_bytes=100, cache_bytes=0)  # every read from disk
    for k in range(10):
        store.put(f"m{k}", b"%d" % k * 40)
    assert store.get("m3") == b"3" * 40 and store.get("m9") == b"9" * 40
    segments = len(os.listdir(tmp_path))
    assert segments >= 4
    for k in range(6):
        store.delete(f"m{k}")
    assert len(os.listdir(tmp_path)) < segments
    assert store.get("m7") == b"7" * 40
    store.clear()
    assert os.listdir(tmp_path) == []


def test_a_restart_starts_from_an_empty_store(tmp_path: pathlib.Path) -> None:
    DiskBodies(str(tmp_path)).put("m1", b"body")
    fresh = DiskBodies(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the snapshot and the log will re-add them
    fresh.put("m1", b"body")
    assert fresh.get("m1") == b"body"


def test_recent_bodies_are_served_from_memory_within_its_bound(tmp_path: pathlib.Path) -> None:
    store = DiskBodies(str(tmp_path), segment_bytes=1000, cache_bytes=100)
    for k in range(5):
        store.put(f"m{k}", b"%d" % k * 40)  # 200 bytes in all: the first three fall out
    assert list(store._recent) == ["m3", "m4"] and store._recent_size == 80
    assert [store.get(f"m{k}") for k in range(5)] == [b"%d" % k * 40 for k in range(5)]
    store.delete("m4")
    assert list(store._recent) == ["m3"] and store._recent_size == 40
    store.put("big", b"x" * 101)  # larger than the whole cache: disk only
    assert "big" not in store._recent and store.get("big") == b"x" * 101
    store.clear()
    assert not store._recent and store._recent_size == 0
