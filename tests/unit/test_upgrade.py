"""Rolling upgrades: the cluster writes a newer replicated format only once every member
reads it, and a node that cannot read what the cluster writes stops rather than differ."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from mailqueue import snapshot
from mailqueue.codec import encode
from mailqueue.commands import Accept, Batch, FormatTooNew, Hold, SetFormat
from mailqueue.machine import SpoolMachine, decode_result
from mailqueue.spool import MemoryBodies, RcptState, Spool
from smtpcluster import cli_format
from smtpcluster.upgrade import format_to_set, holding_back


def said(**formats: int | None) -> dict[str, int | None]:
    return formats


@pytest.mark.parametrize(
    ("current", "formats", "want"),
    [
        (1, said(a=2, b=2, c=2), 2),  # everyone upgraded
        (1, said(a=2, b=2, c=1), None),  # c still runs the old release
        (1, said(a=2, b=2, c=None), None),  # c not heard from: it may come back old
        (1, said(a=3, b=2, c=3), 2),  # as far as the slowest
        (2, said(a=2, b=2, c=2), None),  # there already
        (3, said(a=2, b=2, c=2), None),  # never down
    ],
)
def test_the_format_rises_only_when_every_member_reads_it(
    current: int, formats: dict[str, int | None], want: int | None
) -> None:
    assert format_to_set(current, formats, formats.get) == want


def test_what_holds_the_format_back_is_named_while_an_upgrade_waits() -> None:
    """A rolling upgrade that waits on a member looked like one that was done."""
    waiting = said(a=2, b=None, c=1)
    assert holding_back(1, waiting, waiting.get) == ["b: not heard from", "c: reads 1"]
    assert holding_back(1, said(a=1, b=1), said(a=1, b=1).get) == []  # no upgrade under way
    status = {
        "id": "a", "role": "leader", "term": 3, "leader": "a", "commit": 9, "applied": 9,
        "snapshot_index": 0, "format": 1, "format_readable": 2,
        "members": [
            {"id": n, "role": "voter", "address": "x:1", "reachable": True, "lag": 0,
             "format": f} for n, f in waiting.items()
        ],
    }  # fmt: skip
    assert list(cli_format.cluster(status))[-1] == (
        "a member reads a newer format; the cluster waits for b: not heard from, c: reads 1"
    )


def test_set_format_raises_the_spools_format_and_never_lowers_it() -> None:
    spool = Spool()
    assert spool.format == 1
    assert spool.apply(SetFormat(1, 2)).ok and spool.format == 2
    spool.apply(SetFormat(2, 2))
    spool.apply(SetFormat(3, 1))
    assert spool.format == 2


def accept() -> bytes:
    return encode(Accept(1, "m1", "s@example.org", ("u@x.example",), b"body\r\n", "a"))


@pytest.mark.parametrize("wrap", [False, True])
def test_a_node_that_cannot_read_the_new_format_stops_before_applying_it(wrap: bool) -> None:
    old = SpoolMachine(MemoryBodies(), readable=1)
    old.apply(1, accept())
    cmd = SetFormat(2, 2)
    entry = encode(Batch(2, (Hold(2, ("m1",)), cmd)) if wrap else cmd)
    with pytest.raises(FormatTooNew, match=r"entry 2 raises .* to 2; this version reads up to 1"):
        old.apply(2, entry)
    assert old.spool.format == 1  # nothing of the entry applied, the Hold included
    assert old.spool.messages["m1"].rcpts[0].state is RcptState.QUEUED
    new = SpoolMachine(MemoryBodies(), readable=2)
    new.apply(1, accept())
    assert decode_result(new.apply(2, entry)).ok and new.spool.format == 2


def test_snapshots_carry_the_format_and_an_old_node_refuses_a_newer_one() -> None:
    new = SpoolMachine(MemoryBodies(), readable=2)
    new.apply(1, accept())
    new.apply(2, encode(SetFormat(2, 2)))
    chunks = list(new.snapshot())
    again = SpoolMachine(MemoryBodies(), readable=2)
    again.restore(iter(chunks))
    assert again.spool.state_key() == new.spool.state_key() and again.spool.format == 2
    old = SpoolMachine(MemoryBodies(), readable=1)
    with pytest.raises(FormatTooNew, match="snapshot is of replicated format 2"):
        old.restore(iter(chunks))


def test_a_snapshot_of_an_older_version_is_refused_naming_it() -> None:
    """Versions 1 and 2 stamped tombstones without the node whose clock ages them."""
    spool = Spool()
    spool.apply(Accept(1, "m1", "s@example.org", ("u@x.example",), b"body\r\n", "a"))
    records = [cbor2.loads(c) for c in snapshot.dump(spool)]
    records[0] = [2, *records[0][1:6]]  # the version-2 header: no clocks
    chunks = [cbor2.dumps(r) for r in records]
    with pytest.raises(snapshot.SnapshotError, match="version 2, this code reads 3"):
        snapshot.load(iter(chunks), MemoryBodies())


def test_cluster_status_shows_each_members_clock_and_says_when_one_is_off() -> None:
    offsets = {"a": 0.0, "b": 6 * 86400.0, "c": -0.2, "d": None}
    status: dict[str, Any] = {
        "id": "a", "role": "leader", "term": 3, "leader": "a", "commit": 9, "applied": 9,
        "snapshot_index": 0,
        "members": [
            {"id": n, "role": "voter", "address": "x:1", "reachable": True, "lag": 0,
             "format": 1, "clock_offset_s": o} for n, o in offsets.items()
        ],
    }  # fmt: skip
    lines = list(cli_format.cluster(status))
    assert [line.split()[-1] for line in lines[-5:-1]] == ["+0.0s", "+6.0d", "-0.2s", "?"]
    assert lines[-1] == (
        "clocks differ from the leader's: b +6.0d; mail expires by the time a majority of "
        "the clocks agree on"
    )
    del status["members"][1]
    assert "clocks differ" not in list(cli_format.cluster(status))[-1]
