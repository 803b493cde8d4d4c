"""Every message, entry and piece of state survives a cbor2 round trip exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft import codec
from raft.types import (
    MESSAGE_TYPES,
    AppendEntries,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    SnapshotMeta,
)

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
nat = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def confs(draw: st.DrawFn) -> ConfState:
    members = draw(st.lists(ids, unique=True, max_size=6))
    k = draw(st.integers(0, len(members)))
    return ConfState(tuple(sorted(members[:k])), tuple(sorted(members[k:])))


entries = st.builds(Entry, nat, nat, st.sampled_from(EntryKind), st.binary(max_size=64))
metas = st.builds(SnapshotMeta, nat, nat, confs(), nat)


def field_strategy(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    return {
        "int": nat,
        "bool": st.booleans(),
        "NodeId": ids,
        "bytes": st.binary(max_size=64),
        "SnapshotMeta": metas,
        "tuple[Entry, ...]": st.lists(entries, max_size=4).map(tuple),
    }[str(f.type)]


def messages() -> st.SearchStrategy[Message]:
    return st.one_of(
        [
            st.builds(cls, *(field_strategy(f) for f in dataclasses.fields(cls)))
            for cls in MESSAGE_TYPES
        ]
    )


@given(messages())
def test_every_message_round_trips(m: Message) -> None:
    assert codec.decode_message(codec.encode_message(m)) == m


@given(entries)
def test_entry_round_trips(e: Entry) -> None:
    assert codec.decode_entry(codec.encode_entry(e)) == e


@given(st.builds(HardState, nat, st.none() | ids, nat))
def test_hard_state_round_trips(hs: HardState) -> None:
    assert codec.decode_hard_state(codec.encode_hard_state(hs)) == hs


@given(confs())
def test_conf_round_trips(conf: ConfState) -> None:
    assert codec.decode_conf(codec.encode_conf(conf)) == conf


@given(metas)
def test_snapshot_meta_round_trips(meta: SnapshotMeta) -> None:
    assert codec.decode_snapshot_meta(codec.encode_snapshot_meta(meta)) == meta


@given(st.builds(ConfChange, st.sampled_from(ConfChangeOp), ids))
def test_conf_change_round_trips(cc: ConfChange) -> None:
    assert codec.decode_conf_change(codec.encode_conf_change(cc)) == cc


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xff\xff",
        cbor2.dumps([99]),
        cbor2.dumps([2, "a", "b", 1, 0, 0, [], 0, "extra"]),
        cbor2.dumps([2, "a", "b", -1, 0, 0, [], 0]),
        cbor2.dumps([2, "a", "b", 1, 0, 0, [[1, 1, 7, b""]], 0]),
        cbor2.dumps([0, "a", "b", 1, 0, 0, "yes", False]),
    ],
    ids=["empty", "not-cbor", "unknown-type", "extra-field", "negative", "bad-kind", "bad-bool"],
)
def test_malformed_frames_are_refused_with_a_decode_error(frame: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_message(frame)


def test_append_entries_encoding_is_compact() -> None:
    m = AppendEntries("n1", "n2", 3, 10, 3, (Entry(3, 11, data=b"x" * 100),), 9)
    assert len(codec.encode_message(m)) < 140


# Byte strings around each boundary of CBOR's length encoding (RFC 8949 3.1).
edges = st.sampled_from([0, 1, 23, 24, 255, 256, 65535, 65536]).map(lambda n: b"x" * n)
wire_values = st.recursive(
    st.integers(-(2**64), 2**64) | st.text(max_size=30) | st.booleans() | st.none()
    | st.binary(max_size=300) | edges,
    lambda inner: st.lists(inner, max_size=30) | st.tuples(inner, inner),
    max_leaves=60,
)  # fmt: skip


@given(st.binary(max_size=4), wire_values)
def test_a_frame_joined_from_pieces_is_the_bytes_cbor2_makes(prefix: bytes, value: Any) -> None:
    assert codec.joined(codec.frame(prefix, value, True)) == prefix + cbor2.dumps(value)


@given(wire_values, wire_values)
def test_pieces_within_pieces_stand_for_their_joined_byte_string(outer: Any, inner: Any) -> None:
    """The shape of a forwarded proposal: [request id, cbor2.dumps([...])]."""
    nested = [outer, codec.pieces([inner, b"data" * 100])]
    want = cbor2.dumps([outer, cbor2.dumps([inner, b"data" * 100])])
    assert codec.joined(codec.frame(b"F", nested, True)) == b"F" + want


def test_a_large_entry_is_framed_as_encode_message_frames_it() -> None:
    big = Entry(3, 7, EntryKind.NORMAL, b"m" * (codec.LARGE + 5))
    m = AppendEntries("n1", "n2", 3, 6, 2, (big, Entry(3, 8, EntryKind.NORMAL, b"a")), 7)
    assert codec.carried(m) >= codec.LARGE
    assert codec.joined(codec.frame_message(b"R", m)) == b"R" + codec.encode_message(m)
    assert codec.decode_message(codec.joined(codec.frame_message(b"", m))) == m


def test_a_large_frame_refers_to_its_entrys_data() -> None:
    """A leader holds an AppendEntries for each follower the entry is on its way to:
    joined, each held one more copy of the entry."""
    big = Entry(3, 7, EntryKind.NORMAL, b"m" * (codec.LARGE + 5))
    m = AppendEntries("n1", "n2", 3, 6, 2, (big,), 7)
    framed = codec.frame_message(b"R", m)
    assert isinstance(framed, codec.Pieces) and any(p is big.data for p in framed.parts)
    small = AppendEntries("n1", "n2", 3, 6, 2, (Entry(3, 7, EntryKind.NORMAL, b"m"),), 7)
    assert isinstance(codec.frame_message(b"R", small), bytes)


large_bytes = st.integers(codec.LARGE, codec.LARGE + 300).map(lambda n: b"L" * n)


@settings(max_examples=30)
@given(
    st.recursive(wire_values | large_bytes, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
)
def test_a_value_loaded_in_place_is_the_value_cbor2_loads(value: Any) -> None:
    data = cbor2.dumps(value)
    assert codec.loads_in_place(data) == cbor2.loads(data)


def test_a_large_byte_string_is_loaded_as_a_view_where_it_lies() -> None:
    """The shape of a log entry's envelope: [kind, proposal, [tag, request]]."""
    big = b"P" * (codec.LARGE + 1)
    data = cbor2.dumps([0, big, [b"boot-tag", 300]])
    kind, proposal, origin = codec.loads_in_place(data)
    assert (kind, origin) == (0, [b"boot-tag", 300]) and type(origin[0]) is bytes
    assert isinstance(proposal, memoryview) and proposal.obj is data and proposal == big
    batch = cbor2.dumps([2, [cbor2.dumps([0, b"s"]), data]])
    envs = codec.loads_in_place(batch)[1]
    assert type(envs[0]) is bytes and isinstance(envs[1], memoryview)
    assert codec.loads_in_place(envs[1])[1] == big  # an envelope within a batch, in place


@pytest.mark.parametrize("cut", [1, 3, 10, codec.LARGE])
def test_a_truncated_value_is_refused_with_a_decode_error(cut: int) -> None:
    data = cbor2.dumps([0, b"P" * (codec.LARGE + 1)])
    with pytest.raises(codec.DecodeError):
        codec.loads_in_place(data[:-cut])
    with pytest.raises(codec.DecodeError):
        codec.loads_in_place(data + b"\x00")
