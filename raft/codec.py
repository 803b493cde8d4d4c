"""cbor2 encoding of entries, configurations and messages.

Each value is a CBOR array of its fields in declaration order; a message is prefixed
with its type code (its position in MESSAGE_TYPES). Decoding checks every field's type,
so a malformed or hostile frame raises DecodeError and never builds a half-valid object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import IO, Any

import cbor2

from raft.types import (
    MESSAGE_TYPES,
    AppendEntries,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    SnapshotMeta,
)

# A frame whose payload is at least this large is encoded as pieces, joined once
# (frame()); below it, cbor2 in C and one prefix copy cost less than walking the value.
LARGE = 1 << 20


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the expected value."""


def _conf_to_list(conf: ConfState) -> list[Any]:
    return [list(conf.voters), list(conf.learners)]


def _meta_to_list(meta: SnapshotMeta) -> list[Any]:
    return [meta.index, meta.term, _conf_to_list(meta.conf), meta.size]


def _entry_to_list(e: Entry) -> list[Any]:
    return [e.term, e.index, int(e.kind), e.data]


def _field_to_wire(value: Any) -> Any:
    if isinstance(value, SnapshotMeta):
        return _meta_to_list(value)
    if isinstance(value, tuple):
        return [_entry_to_list(e) for e in value]
    return value


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise DecodeError(what)


def _int(v: Any, what: str) -> int:
    _expect(type(v) is int and v >= 0, f"{what}: expected a non-negative integer")
    return int(v)


def _str_list(v: Any, what: str) -> tuple[str, ...]:
    _expect(isinstance(v, list) and all(type(x) is str for x in v), f"{what}: expected ids")
    return tuple(v)


def _conf_from(v: Any) -> ConfState:
    _expect(isinstance(v, list) and len(v) == 2, "conf: expected [voters, learners]")
    try:
        return ConfState(_str_list(v[0], "voters"), _str_list(v[1], "learners"))
    except AssertionError as exc:
        raise DecodeError(f"conf: not sorted and disjoint: {v!r}") from exc


def _meta_from(v: Any) -> SnapshotMeta:
    _expect(isinstance(v, list) and len(v) == 4, "snapshot meta: expected 4 fields")
    return SnapshotMeta(
        _int(v[0], "index"), _int(v[1], "term"), _conf_from(v[2]), _int(v[3], "size")
    )


def _entry_from(v: Any) -> Entry:
    _expect(isinstance(v, list) and len(v) == 4, "entry: expected 4 fields")
    try:
        kind = EntryKind(_int(v[2], "kind"))
    except ValueError as exc:
        raise DecodeError(f"entry: unknown kind {v[2]!r}") from exc
    _expect(type(v[3]) is bytes, "entry: data must be bytes")
    return Entry(_int(v[0], "term"), _int(v[1], "index"), kind, v[3])


def _loads(data: bytes | IO[bytes]) -> Any:
    # A stream (io.BytesIO) for a value that starts past the beginning of a large
    # buffer: slicing it off first would copy all of it (raft.node._after_kind).
    try:
        return cbor2.loads(data) if isinstance(data, bytes) else cbor2.load(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise DecodeError(f"not CBOR: {exc}") from exc


def encode_entry(e: Entry) -> bytes:
    return cbor2.dumps(_entry_to_list(e))


def decode_entry(data: bytes) -> Entry:
    return _entry_from(_loads(data))


def encode_hard_state(hs: HardState) -> bytes:
    return cbor2.dumps([hs.term, hs.vote, hs.commit])


def decode_hard_state(data: bytes) -> HardState:
    v = _loads(data)
    _expect(isinstance(v, list) and len(v) == 3, "hard state: expected 3 fields")
    _expect(v[1] is None or type(v[1]) is str, "hard state: vote must be an id or null")
    return HardState(_int(v[0], "term"), v[1], _int(v[2], "commit"))


def encode_conf(conf: ConfState) -> bytes:
    return cbor2.dumps(_conf_to_list(conf))


def decode_conf(data: bytes) -> ConfState:
    return _conf_from(_loads(data))


def encode_snapshot_meta(meta: SnapshotMeta) -> bytes:
    return cbor2.dumps(_meta_to_list(meta))


def decode_snapshot_meta(data: bytes) -> SnapshotMeta:
    return _meta_from(_loads(data))


def encode_conf_change(cc: ConfChange) -> bytes:
    return cbor2.dumps([int(cc.op), cc.node])


def decode_conf_change(data: bytes) -> ConfChange:
    v = _loads(data)
    _expect(isinstance(v, list) and len(v) == 2 and type(v[1]) is str, "conf change")
    try:
        return ConfChange(ConfChangeOp(_int(v[0], "op")), v[1])
    except ValueError as exc:
        raise DecodeError(f"conf change: unknown op {v[0]!r}") from exc


def encode_message(m: Message) -> bytes:
    return cbor2.dumps(_message_to_wire(m))


def frame_message(prefix: bytes, m: Message) -> bytes | Pieces:
    """`prefix + encode_message(m)`; in pieces when it carries codec.LARGE or more."""
    return frame(prefix, _message_to_wire(m), carried(m) >= LARGE)


def carried(m: Message) -> int:
    """The bytes of log or snapshot data a message carries."""
    if isinstance(m, AppendEntries):
        return sum(len(e.data) for e in m.entries)
    return len(m.data) if isinstance(m, InstallSnapshot) else 0


def _message_to_wire(m: Message) -> list[Any]:
    code, names, _ = _LAYOUT[type(m)]
    return [code, *(_field_to_wire(getattr(m, name)) for name in names)]


@dataclasses.dataclass(frozen=True, slots=True)
class Pieces:
    """A byte string not joined yet: the CBOR encoding of a value, in pieces."""

    parts: list[bytes]
    size: int


def frame(prefix: bytes, value: Any, large: bool) -> bytes | Pieces:
    """`prefix + cbor2.dumps(value)`. When `large`, as Pieces that reference the
    value's byte strings (see pieces()), for the transport to cut into its own: a
    payload of tens of MiB was copied by dumps, again by the prefix, and again by an
    outer dumps around an inner one, each copy alive at once; and once joined, a leader
    held one copy of an entry for each follower it was on its way to."""
    if not large:
        return prefix + cbor2.dumps(value)
    body = pieces(value)
    return Pieces([prefix, *body.parts], len(prefix) + body.size)


def joined(payload: bytes | Pieces) -> bytes:
    """The bytes a frame() stands for."""
    return payload if isinstance(payload, bytes) else b"".join(payload.parts)


def pieces(value: Any) -> Pieces:
    """cbor2.dumps(value), as pieces that join to the same bytes: lists and tuples are
    walked, byte strings are referenced rather than copied, and a Pieces within stands
    for the byte string it joins to; anything else is encoded by cbor2."""
    parts: list[bytes] = []
    _walk(value, parts)
    return Pieces(parts, sum(map(len, parts)))


def _walk(value: Any, parts: list[bytes]) -> None:
    if isinstance(value, list | tuple):
        parts.append(_head(_ARRAY, len(value)))
        for item in value:
            _walk(item, parts)
    elif isinstance(value, Pieces):
        parts.append(_head(_BYTES, value.size))
        parts += value.parts
    elif isinstance(value, bytes):
        parts += (_head(_BYTES, len(value)), value)
    else:
        parts.append(cbor2.dumps(value))


_UINT, _BYTES, _ARRAY = 0, 2, 4  # CBOR major types (RFC 8949 3.1)


def _head(major: int, length: int) -> bytes:
    """The head cbor2 writes before a byte string or an array of `length`: the unsigned
    integer `length`'s encoding under another major type (RFC 8949 3: every major type
    carries its argument the same way)."""
    arg = cbor2.dumps(length)
    return bytes((major << 5 | arg[0],)) + arg[1:]


Decoder = Callable[[Any], Any]


def _field_decoder(f: dataclasses.Field[Any]) -> Decoder:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    name = f.name
    if kind == "int":
        return lambda v: _int(v, name)
    if kind == "bool":
        return lambda v: _checked(v, type(v) is bool, f"{name}: expected a boolean")
    if kind in ("NodeId", "str"):
        return lambda v: _checked(v, type(v) is str, f"{name}: expected a string")
    if kind == "bytes":
        return lambda v: _checked(v, type(v) is bytes, f"{name}: expected bytes")
    if kind == "SnapshotMeta":
        return _meta_from
    if kind == "tuple[Entry, ...]":
        return lambda v: tuple(
            _entry_from(e) for e in _checked(v, isinstance(v, list), f"{name}: expected a list")
        )
    raise AssertionError(f"no decoder for field {name}: {kind}")  # a bug in this module


def _checked(v: Any, ok: bool, what: str) -> Any:
    _expect(ok, what)
    return v


# Per message type, worked out once: its code, field names and field decoders (frames
# are decoded by the thousand per second; reflecting on each one cost more than cbor2).
_LAYOUT: dict[type, tuple[int, tuple[str, ...], tuple[Decoder, ...]]] = {
    cls: (
        code,
        tuple(f.name for f in dataclasses.fields(cls)),
        tuple(_field_decoder(f) for f in dataclasses.fields(cls)),
    )
    for code, cls in enumerate(MESSAGE_TYPES)
}


def decode_message(data: bytes | IO[bytes]) -> Message:
    v = _loads(data)
    _expect(isinstance(v, list) and len(v) >= 1, "message: expected [type, fields...]")
    code = v[0]
    _expect(type(code) is int and 0 <= code < len(MESSAGE_TYPES), f"message: bad type {code!r}")
    cls = MESSAGE_TYPES[code]
    decoders = _LAYOUT[cls][2]
    _expect(len(v) == 1 + len(decoders), f"{cls.__name__}: expected {len(decoders)} fields")
    msg: Message = cls(*(d(x) for d, x in zip(decoders, v[1:], strict=True)))
    return msg


Bytes = bytes | memoryview


def loads_in_place(data: Bytes) -> Any:
    """cbor2.loads(data), except that each byte string of LARGE or more is a memoryview
    of `data` where it lies, not a copy. For a log entry that holds a large proposal in
    an envelope (raft.node): unwrapped by cbor2, the proposal was one more copy of
    itself, alive with the entry and with what the state machine decoded from it.
    Values of other types than unsigned integers, byte strings and arrays are left to
    cbor2, which then decodes the whole of `data`."""
    try:
        value, end = _in_place(data, 0)
    except _Other:
        return _loads(bytes(data))
    _expect(end == len(data), f"{len(data) - end} bytes after the value")
    return value


class _Other(Exception):
    """A CBOR value that loads_in_place leaves to cbor2."""


def _in_place(data: Bytes, pos: int) -> tuple[Any, int]:
    major, arg, pos = _head_at(data, pos)
    if major == _UINT:
        return arg, pos
    if major == _ARRAY:
        items = []
        for _ in range(arg):
            item, pos = _in_place(data, pos)
            items.append(item)
        return items, pos
    if major != _BYTES:
        raise _Other
    end = pos + arg
    _expect(end <= len(data), "byte string past the end")
    view = memoryview(data)[pos:end]
    return (view if arg >= LARGE else bytes(view)), end


def _head_at(data: Bytes, pos: int) -> tuple[int, int, int]:
    """The major type and argument of the CBOR head at data[pos], and where it ends:
    the inverse of _head. An indefinite length, or a simple value, is left to cbor2."""
    _expect(pos < len(data), "truncated")
    major, info = data[pos] >> 5, data[pos] & 31
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise _Other
    end = pos + 1 + (1 << (info - 24))
    _expect(end <= len(data), "truncated head")
    return major, int.from_bytes(data[pos + 1 : end], "big"), end
