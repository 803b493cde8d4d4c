"""One outbound SMTP transaction with a fence before the final dot.

aiosmtplib sends DATA and the final dot in one call; the delivery protocol needs a
pause between them (DESIGN, "Fencing at the final dot"): the body goes out, then
`fence()` commits BeginDot through Raft, and only if it succeeds does the dot follow.
Otherwise the connection is dropped without the dot and the remote discards the
message. This uses aiosmtplib's protocol object directly (pinned to 5.x).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib

PERIOD = re.compile(rb"(?m)^\.")


@dataclass
class Transaction:
    """What happened, per recipient: the remote's reply code and text."""

    rcpt_replies: dict[int, tuple[int, str]] = field(default_factory=dict)
    dot_sent: bool = False
    fenced_off: bool = False  # BeginDot was refused or failed: nothing was delivered
    final: tuple[int, str] | None = None  # the reply to the final dot


def stuff(body: bytes) -> bytes:
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return PERIOD.sub(b"..", body)


@dataclass(frozen=True)
class Outbound:
    host: str
    port: int
    helo: str
    sender: str
    rcpts: dict[int, str]  # recipient index in the message -> address
    body: bytes


async def send(
    job: Outbound, fence: Callable[[list[int]], Awaitable[bool]], timeout: float = 300
) -> Transaction:
    """Deliver one message. Raises aiosmtplib.SMTPException or OSError when the
    transaction fails before any recipient is decided."""
    t = Transaction()
    smtp = aiosmtplib.SMTP(
        hostname=job.host, port=job.port, timeout=timeout, local_hostname=job.helo,
        start_tls=False,
    )  # fmt: skip
    await smtp.connect()
    try:
        await smtp.ehlo()
        if smtp.supports_extension("starttls"):
            await smtp.starttls(validate_certs=False)  # opportunistic, as MTAs do
            await smtp.ehlo()
        await smtp.mail(job.sender)
        for k, address in job.rcpts.items():
            reply = await smtp.execute_command(f"RCPT TO:<{address}>".encode())
            t.rcpt_replies[k] = (reply.code, reply.message)
        accepted = [k for k, (code, _) in t.rcpt_replies.items() if 200 <= code < 300]
        if not accepted:
            await smtp.quit()
            return t
        await _data(smtp, stuff(job.body), accepted, fence=fence, t=t, timeout=timeout)
        if t.final is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await smtp.quit()
    finally:
        smtp.close()
    return t


async def _data(
    smtp: aiosmtplib.SMTP,
    stuffed: bytes,
    accepted: list[int],
    *,
    fence: Callable[[list[int]], Awaitable[bool]],
    t: Transaction,
    timeout: float,
) -> None:
    proto = smtp.protocol
    assert proto is not None and proto._command_lock is not None
    async with proto._command_lock:
        proto._response_pending = True
        proto.write(b"DATA\r\n")
        start = await proto.read_response(timeout=timeout)
        if start.code != 354:
            t.final = (start.code, start.message)
            return
        proto.write(stuffed)
        if not await fence(accepted):
            t.fenced_off = True  # closing without the dot: the remote discards it
            return
        proto._response_pending = True
        proto.write(b".\r\n")
        t.dot_sent = True
        try:
            reply = await proto.read_response(timeout=timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return  # the remote may have it: never try another exchange for this attempt
        t.final = (reply.code, reply.message)
