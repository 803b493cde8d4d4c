"""cbor2 encoding of spool commands: [type code, field, ...], nested values as lists.

Decoding checks every field's type; a malformed entry raises DecodeError and is never
half-applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import cbor2

from mailqueue.commands import (
    COMMAND_TYPES,
    Assignment,
    Batch,
    Command,
    OutcomeKind,
    RcptResult,
    UncertainPolicy,
)
from raft import streams


class DecodeError(ValueError):
    """Bytes that are not a valid spool command."""


_NESTED: dict[str, type] = {
    "tuple[Assignment, ...]": Assignment,
    "tuple[RcptResult, ...]": RcptResult,
}
_ENUMS: dict[str, type[OutcomeKind] | type[UncertainPolicy]] = {
    "OutcomeKind": OutcomeKind,
    "UncertainPolicy": UncertainPolicy,
}
_SCALARS: dict[str, type] = {"int": int, "str": str, "bytes": bytes, "bool": bool}


def _to_wire(value: Any) -> Any:
    code = _CODES.get(type(value))
    if code is not None:  # a command, at the top or inside a Batch
        return [code, *(_to_wire(getattr(value, name)) for name in _NAMES[type(value)])]
    names = _NAMES.get(type(value))
    if names is not None:
        return [_to_wire(getattr(value, name)) for name in names]
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return value


def encode(cmd: Command) -> bytes:
    return cbor2.dumps(_to_wire(cmd))


Decoder = Callable[[Any], Any]


def _decoder(kind: str, where: str) -> Decoder:
    """A function that checks and converts one wire value of type `kind`."""
    if kind in _SCALARS:
        want = _SCALARS[kind]

        def scalar(v: Any) -> Any:
            if type(v) is not want:
                raise DecodeError(f"{where}: expected {kind}, got {type(v).__name__}")
            return v

        return scalar
    if kind in _ENUMS:
        enum = _ENUMS[kind]

        def member(v: Any) -> Any:
            try:
                return enum(v)
            except ValueError as exc:
                raise DecodeError(f"{where}: bad {kind} {v!r}") from exc

        return member
    if kind in {"NodeId", "MessageId"}:
        return _decoder("str", where)
    if kind in {"tuple[str, ...]", "tuple[int, ...]", "tuple[MessageId, ...]"}:
        return _sequence(_decoder("int" if "int" in kind else "str", where), where)
    if kind in _NESTED:
        cls = _NESTED[kind]
        return _sequence(lambda v: _build(cls, v, where), where)
    if kind == "tuple[Command, ...]":
        return _sequence(lambda v: _command(v, where, nested=True), where)
    raise AssertionError(f"no decoder for {kind}")  # a bug in this module


def _sequence(item: Decoder, where: str) -> Decoder:
    def sequence(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list):
            raise DecodeError(f"{where}: expected a list")
        return tuple(item(x) for x in v)

    return sequence


def _build(cls: type, v: Any, where: str) -> Any:
    decoders = _DECODERS[cls]
    if not isinstance(v, list) or len(v) != len(decoders):
        raise DecodeError(f"{where}: {cls.__name__} needs {len(decoders)} fields")
    return cls(*(d(x) for d, x in zip(decoders, v, strict=True)))


_CODES: dict[type, int] = {cls: code for code, cls in enumerate(COMMAND_TYPES)}
# Worked out once per type: every node decodes every command it applies, and
# reflecting on the dataclass for each one cost more than cbor2 itself.
_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls))
    for cls in (*COMMAND_TYPES, *_NESTED.values())
}
_DECODERS: dict[type, tuple[Decoder, ...]] = {
    cls: tuple(_decoder(str(f.type), f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls))
    for cls in (*COMMAND_TYPES, *_NESTED.values())
}


def decode(data: bytes | memoryview) -> Command:
    """A command from its encoding; a view (a large one, in place in its log entry:
    raft.node.StateMachine) is read where it lies."""
    try:
        v = cbor2.loads(data) if isinstance(data, bytes) else cbor2.load(streams.view(data))
    except Exception as exc:
        raise DecodeError(f"not CBOR: {exc}") from exc
    return _command(v, "command", nested=False)


def _command(v: Any, where: str, nested: bool) -> Command:
    if (
        not isinstance(v, list)
        or not v
        or type(v[0]) is not int
        or not 0 <= v[0] < len(COMMAND_TYPES)
    ):
        raise DecodeError(f"{where}: not a spool command")
    cls = COMMAND_TYPES[v[0]]
    if nested and cls is Batch:
        raise DecodeError(f"{where}: a Batch inside a Batch")
    cmd: Command = _build(cls, v[1:], where)
    return cmd
