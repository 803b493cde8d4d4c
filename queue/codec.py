"""cbor2 encoding of spool commands: [type code, field, ...], nested values as lists.

Decoding checks every field's type; a malformed entry raises DecodeError and is never
half-applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2

from mailqueue.commands import (
    COMMAND_TYPES,
    Assignment,
    Command,
    OutcomeKind,
    RcptResult,
    UncertainPolicy,
)


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
    if dataclasses.is_dataclass(value):
        return [_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return value


def encode(cmd: Command) -> bytes:
    return cbor2.dumps([COMMAND_TYPES.index(type(cmd)), *_to_wire(cmd)])


def _from_wire(kind: str, v: Any, where: str) -> Any:
    if kind in _SCALARS:
        want = _SCALARS[kind]
        if type(v) is not want:
            raise DecodeError(f"{where}: expected {kind}, got {type(v).__name__}")
        return v
    if kind in _ENUMS:
        try:
            return _ENUMS[kind](v)
        except ValueError as exc:
            raise DecodeError(f"{where}: bad {kind} {v!r}") from exc
    if kind in {"NodeId", "MessageId"}:
        return _from_wire("str", v, where)
    if kind in {"tuple[str, ...]", "tuple[int, ...]", "tuple[MessageId, ...]"}:
        inner = "int" if "int" in kind else "str"
        if not isinstance(v, list):
            raise DecodeError(f"{where}: expected a list")
        return tuple(_from_wire(inner, x, where) for x in v)
    if kind in _NESTED:
        if not isinstance(v, list):
            raise DecodeError(f"{where}: expected a list")
        return tuple(_build(_NESTED[kind], x, where) for x in v)
    raise AssertionError(f"no decoder for {kind}")  # a bug in this module


def _build(cls: type, v: Any, where: str) -> Any:
    fields = dataclasses.fields(cls)
    if not isinstance(v, list) or len(v) != len(fields):
        raise DecodeError(f"{where}: {cls.__name__} needs {len(fields)} fields")
    return cls(
        *(
            _from_wire(str(f.type), x, f"{cls.__name__}.{f.name}")
            for f, x in zip(fields, v, strict=True)
        )
    )


def decode(data: bytes) -> Command:
    try:
        v = cbor2.loads(data)
    except Exception as exc:
        raise DecodeError(f"not CBOR: {exc}") from exc
    if (
        not isinstance(v, list)
        or not v
        or type(v[0]) is not int
        or not 0 <= v[0] < len(COMMAND_TYPES)
    ):
        raise DecodeError("not a spool command")
    cmd: Command = _build(COMMAND_TYPES[v[0]], v[1:], "command")
    return cmd
