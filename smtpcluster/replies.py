"""The replies to SMTP commands a client sent together (RFC 2920 pipelining), in order.

aiosmtplib's protocol keeps one reply at a time. It drops bytes that arrive while a
parsed reply waits to be read, and a second reply already in its buffer stays there
unread until more bytes come. A server answering a pipelined group causes both. So for
one transaction the connection's transport is handed to a ReplyReader, which keeps every
byte in order, and then handed back (`reading`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

MAX_LINE = 8192  # aiosmtplib's own limits, so a reply is refused alike on either path
MAX_REPLY = 4 * MAX_LINE


class ReplyReader(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol: keeps the bytes, and passes on the events
    that protocol must still see (a lost connection, flow control)."""

    def __init__(self, inner: SMTPProtocol, transport: asyncio.Transport) -> None:
        self.inner = inner
        self.transport = transport
        self.buffer = bytearray()
        self.arrived = asyncio.Event()
        self.ended = False

    def write(self, data: bytes) -> None:
        if self.ended or self.transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def read(self, timeout: float) -> SMTPResponse:
        """The next reply. Raises aiosmtplib's errors for a timeout, a closed
        connection and a malformed or overlong reply, as its own reads do."""
        try:
            async with asyncio.timeout(timeout):
                while (reply := take_reply(self.buffer)) is None:
                    if self.ended:
                        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        return reply

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        self.arrived.set()

    def eof_received(self) -> bool:
        self.ended = True
        self.arrived.set()
        return bool(self.inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.arrived.set()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


@contextlib.contextmanager
def reading(smtp: aiosmtplib.SMTP) -> Iterator[ReplyReader]:
    """The connection's replies, read by a ReplyReader until the block ends. Callers
    hold the protocol's command lock, so no aiosmtplib command interleaves."""
    inner = smtp.protocol
    transport = None if inner is None else inner.transport
    if inner is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    reader = ReplyReader(inner, cast(asyncio.Transport, transport))
    transport.set_protocol(reader)
    try:
        yield reader
    finally:
        transport.set_protocol(inner)


def take_reply(buffer: bytearray) -> SMTPResponse | None:
    """The first complete reply in `buffer`, removed from it; None while incomplete.
    Lines are joined with LF, as aiosmtplib does."""
    lines: list[bytes] = []
    start = 0
    while (end := buffer.find(b"\n", start)) != -1:
        line = bytes(buffer[start : end + 1])
        start = end + 1
        if len(line) > MAX_LINE:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        if not line[:3].isdigit():
            text = line.decode("utf-8", "ignore")
            raise aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            del buffer[:start]
            return SMTPResponse(int(line[:3]), b"\n".join(lines).decode("utf-8", "surrogateescape"))
    if len(buffer) > MAX_REPLY:
        raise aiosmtplib.SMTPResponseException(-1, "Response too long")
    return None
