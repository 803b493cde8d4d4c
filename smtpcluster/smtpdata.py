"""Reading the DATA section of an SMTP transaction a block at a time, not a line at a time.

aiosmtpd 1.4.6 reads DATA one line per await, with a debug-log call and bookkeeping
for each: 1,300 of them for a 100 KiB message, the largest cost of accepting it.
Here the stream is read up to each "." that ends a line; only the final one, alone on
its line, ends the data. The limits are aiosmtpd's: more than `max_size` bytes on the
wire, or a line longer than `max_line` bytes with its CRLF, and the content is thrown
away as it arrives (the client's data is still read to its end, RFC 5321 4.2.5).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

_DOT_LINE = b".\r\n"
_END = b"\r\n.\r\n"
_SLACK = 64 << 10  # the reader's limit above max_size: where collecting stops


class DataState(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "a line is too long"
    TOO_MUCH = "the data is too large"


@dataclass(frozen=True, slots=True)
class Data:
    content: bytes  # dot-unstuffed; every line ends with CRLF; empty unless NOMINAL
    state: DataState


async def read_data(reader: asyncio.StreamReader, max_size: int, max_line: int) -> Data:
    """Everything up to the lone "." line (consumed; what follows stays in `reader`)."""
    parts: list[bytes] = []
    size, state = 0, DataState.NOMINAL
    line_start = True  # the data begins at the start of a line
    # readuntil's bound (the stdlib has no setter): the line limit aiosmtpd gave the
    # reader, raised for the data, whose lines are checked once it is all in.
    old_limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = max_size + _SLACK  # type: ignore[attr-defined]
    try:
        while True:
            try:
                chunk = await reader.readuntil(_DOT_LINE)
            except asyncio.LimitOverrunError as exc:
                # Far beyond max_size without a line-final ".": drop what is buffered
                # (keeping the bytes a separator may still begin in) and read on.
                dropped = await reader.readexactly(exc.consumed)
                size += len(dropped)
                state, parts = DataState.TOO_MUCH, []
                line_start = dropped.endswith(b"\r\n")
                continue
            if (line_start and chunk == _DOT_LINE) or chunk.endswith(_END):
                body = chunk[: -len(_DOT_LINE)]
                size += len(body)
                if state is DataState.NOMINAL:
                    parts.append(body)
                break
            size += len(chunk)
            line_start = True  # every chunk ends with CRLF
            if state is DataState.NOMINAL:
                parts.append(chunk)
            if size > max_size:
                state, parts = DataState.TOO_MUCH, []
    finally:
        reader._limit = old_limit  # type: ignore[attr-defined]
    if size > max_size:
        state = DataState.TOO_MUCH
    if state is not DataState.NOMINAL:
        return Data(b"", state)
    raw = b"".join(parts)
    if max(map(len, raw.split(b"\r\n"))) + 2 > max_line:
        return Data(b"", DataState.TOO_LONG)
    # RFC 5321 4.5.2: a line that begins with "." had one more put in front by the client.
    content = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
    return Data(content, DataState.NOMINAL)
