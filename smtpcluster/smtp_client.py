"""One outbound SMTP transaction with a fence before the final dot.

aiosmtplib sends DATA and the final dot in one call; the delivery protocol needs a
pause between them (DESIGN, "Fencing at the final dot"): the body goes out, then
`fence()` commits BeginDot through Raft, and only if it succeeds does the dot follow.
Otherwise the connection is dropped without the dot and the remote discards the
message. aiosmtplib connects, says EHLO and does TLS and AUTH; the transaction itself
runs on its transport, read by smtpcluster.replies (aiosmtplib 5.x cannot pipeline).

Connections are opened by `connect` and may carry several transactions (the pool in
smtpcluster.connections decides); `transact` leaves `Transaction.clean` set when the
connection is ready for the next MAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiosmtplib

from smtpcluster import replies

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 section 4.5.3.2, in seconds. The body is written in one go, so its
    "data block" time is part of waiting for the reply to the final dot."""

    # The TCP handshake alone (Postfix's smtp_connect_timeout). Under the greeting's
    # bound, a host that drops SYNs cost the kernel's retries (two minutes) per
    # address before the next MX was tried, holding a delivery slot all the while.
    connect: float = 30.0
    greeting: float = 300.0  # 220, EHLO, STARTTLS
    command: float = 300.0  # MAIL, RCPT, RSET
    data_start: float = 120.0  # the 354
    data_end: float = 600.0  # the reply to the final dot


RFC_5321 = Timeouts()
# Commits BeginDot for the accepted recipients; False means "withhold the final dot".
Fence = Callable[[list[int]], Awaitable[bool]]


class StaleConnection(Exception):
    """A reused connection was closed by the remote before it answered MAIL: nothing
    was sent, so a fresh connection may try the same transaction."""


@dataclass
class Transaction:
    """What happened, per recipient: the remote's reply code and text."""

    rcpt_replies: dict[int, tuple[int, str]] = field(default_factory=dict)
    dot_sent: bool = False
    fenced_off: bool = False  # BeginDot was refused or failed: nothing was delivered
    final: tuple[int, str] | None = None  # the reply to the final dot
    clean: bool = False  # the connection may carry another transaction


def clean_reply(text: str) -> str:
    """A remote's reply text as we keep it: valid UTF-8, on one line. aiosmtplib decodes
    with surrogateescape, so a Latin-1 byte in a reply (old servers say "é" so) became a
    lone surrogate that no encoder takes: the Outcome carrying it could not be proposed,
    and the batch it rode in never answered. It also joins a multiline reply's lines
    with a bare LF, which a DSN must not carry."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(text.split())


def stuff(body: bytes) -> bytes:
    """RFC 5321 4.5.2: a dot at the start of a line is doubled. By plain byte search:
    the multiline regex that did this was a sixth of a delivering node's CPU at 100
    KiB, and most bodies have no line to stuff."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if b"\n." in body:
        body = body.replace(b"\n.", b"\n..")
    return b"." + body if body.startswith(b".") else body


@dataclass(frozen=True)
class Security:
    """TLS and AUTH towards one destination. `tls` takes Postfix's level names: "may"
    (STARTTLS when offered, any certificate: MX hosts), "encrypt" (STARTTLS required),
    "verify" (required, and the certificate must name the host and chain to `ca_file`
    or the system's CAs). `login`: user and password, sent only over TLS. `wrapper`:
    Postfix's smtp_tls_wrappermode, with "encrypt" or "verify"."""

    tls: str = "may"
    ca_file: str = ""
    login: tuple[str, str] | None = None
    wrapper: bool = False  # TLS from the first byte (port 465), not STARTTLS
    # For "verify": built once (see verified()), not for every connection: loading the
    # CA file is most of a handshake's own cost.
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def verified(self) -> Security:
        """This, with its SSLContext built now when it verifies certificates."""
        if self.tls != "verify" or self.context is not None:
            return self
        return replace(self, context=ssl.create_default_context(cafile=self.ca_file or None))


OPPORTUNISTIC = Security()


class TlsRequired(aiosmtplib.SMTPException):
    """The destination must speak TLS and does not offer STARTTLS: nothing was sent."""


@dataclass(frozen=True)
class Outbound:
    host: str
    port: int
    helo: str
    sender: str
    rcpts: dict[int, str]  # recipient index in the message -> address
    body: bytes
    security: Security = OPPORTUNISTIC

    @property
    def needs_smtputf8(self) -> bool:
        return not all(a.isascii() for a in (self.sender, *self.rcpts.values()))

    @property
    def eight_bit(self) -> bool:
        return not self.body.isascii()


async def connect(
    host: str, port: int, helo: str, timeouts: Timeouts = RFC_5321,
    security: Security = OPPORTUNISTIC, *, source: tuple[str, ...] = (),
) -> aiosmtplib.SMTP:  # fmt: skip
    """A connection that has said EHLO, over TLS when the remote offers STARTTLS (or
    refused without it, as `security` says), logged in if it says so. With
    opportunistic TLS ("may"), a STARTTLS refused goes on in plaintext, and one whose
    handshake fails is given up for a new plaintext connection, as Postfix does: a
    remote whose TLS we cannot speak (TLS 1.0 only, which OpenSSL 3 refuses) got none
    of our mail before, for as long as the mail was queued. `source`: local addresses
    to connect from, one per family (delivery.source_addresses)."""
    try:
        return await _open(host, port, helo, timeouts, security, source=source)
    except _HandshakeFailed as exc:
        log.info("%s:%d: TLS handshake failed (%s): again without TLS, as \"may\" allows",
                 host, port, exc.__cause__)  # fmt: skip
        plain = replace(security, tls=PLAINTEXT)
        return await _open(host, port, helo, timeouts, plain, source=source)


PLAINTEXT = "none"  # not a level one configures: "may" after its handshake failed


class _HandshakeFailed(Exception):
    """STARTTLS was answered 220 and the handshake then failed, under "may"."""


async def _open(
    host: str, port: int, helo: str, timeouts: Timeouts, security: Security,
    *, source: tuple[str, ...],
) -> aiosmtplib.SMTP:  # fmt: skip
    wrapped = _tls_options(security) if security.wrapper else {}
    sock = await _tcp(host, port, timeouts.connect, source)
    smtp = aiosmtplib.SMTP(
        hostname=host, sock=sock, timeout=timeouts.greeting, local_hostname=helo,
        start_tls=False, use_tls=security.wrapper, **wrapped,
    )  # fmt: skip
    try:
        await smtp.connect()
    except BaseException:
        sock.close()
        raise
    try:
        await _ehlo(smtp)
        if not security.wrapper:
            await _starttls(smtp, security, f"{host}:{port}")
        if security.login is not None:
            await smtp.login(*security.login)
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _ehlo(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO where EHLO is not known (RFC 5321 3.2): such a server takes plain
    SMTP, and failing there left its mail queued until it bounced."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code not in (500, 502):  # "command unrecognized", "not implemented"
            raise
        await smtp.helo()


def starttls_declined(smtp: aiosmtplib.SMTP) -> bool:
    """The remote offers STARTTLS, yet this connection is in plaintext: under "may",
    after a refused STARTTLS or a failed handshake."""
    transport = smtp.transport
    over_tls = transport is not None and transport.get_extra_info("sslcontext") is not None
    return smtp.supports_extension("starttls") and not over_tls


async def _tcp(host: str, port: int, timeout: float, source: tuple[str, ...] = ()) -> socket.socket:
    """A TCP connection to host:port, each of its addresses in turn, `timeout` for each
    (as Postfix's smtp_connect_timeout): with one budget for all, a name whose IPv6
    address is black-holed spent it there, and its IPv4 address was never tried.
    Failures are aiosmtplib's, as when it connected by itself: SMTPConnectTimeoutError
    if an address timed out (the next attempt would wait as long), else
    SMTPConnectError."""
    loop = asyncio.get_running_loop()
    where = f"{host} on port {port}"
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise aiosmtplib.SMTPConnectTimeoutError(
            f"Timed out looking up {host} (after {timeout:g} s)"
        ) from None
    except OSError as exc:
        raise aiosmtplib.SMTPConnectError(f"Error connecting to {where}: {exc}") from None
    failures: list[str] = []
    timed_out = False
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            _bind(sock, family, source)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, addr)
            return sock
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                timed_out = True
                failures.append(f"{addr[0]} timed out (after {timeout:g} s)")
            elif isinstance(exc, OSError):
                failures.append(f"{addr[0]}: {exc}" if len(infos) > 1 else str(exc))
            else:
                raise
    if timed_out:
        raise aiosmtplib.SMTPConnectTimeoutError(
            f"Timed out connecting to {where}: {'; '.join(failures)}"
        )
    raise aiosmtplib.SMTPConnectError(f"Error connecting to {where}: {'; '.join(failures)}")


def _bind(sock: socket.socket, family: int, source: tuple[str, ...]) -> None:
    """To the source address of this family, if one is given: the one the receiver's
    SPF record and reverse DNS name, on a host with several."""
    for address in source:
        if (":" in address) == (family == socket.AF_INET6):
            sock.bind((address, 0))
            return


async def _starttls(smtp: aiosmtplib.SMTP, security: Security, where: str) -> None:
    if security.tls == PLAINTEXT:
        return
    if not smtp.supports_extension("starttls"):
        if security.tls != "may":
            raise TlsRequired(f"4.7.0 {where} does not offer STARTTLS")
        return
    try:
        await smtp.starttls(**_tls_options(security))
    except aiosmtplib.SMTPResponseException:
        if security.tls != "may":
            raise
        return  # refused (454): the session goes on as it was, in plaintext
    except (ssl.SSLError, aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        if security.tls != "may":
            raise
        raise _HandshakeFailed from exc
    await smtp.ehlo()


def _tls_options(security: Security) -> dict[str, Any]:
    if security.tls != "verify":
        return {"validate_certs": False}  # opportunistic or merely encrypted, as MTAs do
    return {"tls_context": security.verified().context}


def refusal(smtp: aiosmtplib.SMTP, job: Outbound) -> tuple[int, str] | None:
    """A permanent reason this remote cannot take the message, read from its EHLO."""
    if job.needs_smtputf8 and not smtp.supports_extension("smtputf8"):
        return 553, "5.6.7 the message needs SMTPUTF8 and the remote server lacks it"
    limit = smtp.esmtp_extensions.get("size", "")
    if limit.isdigit() and 0 < int(limit) < len(job.body):
        return 552, f"5.3.4 message of {len(job.body)} bytes exceeds the remote's {limit}"
    return None


def mail_options(smtp: aiosmtplib.SMTP, job: Outbound) -> list[str]:
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(job.body)}")
    if job.needs_smtputf8:
        options.append("SMTPUTF8")
    if job.eight_bit and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    return options


async def transact(
    smtp: aiosmtplib.SMTP,
    job: Outbound,
    fence: Fence,
    *,
    reused: bool = False,
    timeouts: Timeouts = RFC_5321,
) -> Transaction:
    """One message on an open connection. Raises aiosmtplib.SMTPException or OSError
    when the transaction fails before any recipient is decided."""
    t = Transaction()
    if (refused := refusal(smtp, job)) is not None:
        t.rcpt_replies = dict.fromkeys(job.rcpts, refused)
        t.clean = True
        return t
    lock = None if smtp.protocol is None else smtp.protocol._command_lock
    if lock is None:
        raise StaleConnection if reused else aiosmtplib.SMTPServerDisconnected("Connection lost")
    async with lock:
        with replies.reading(smtp) as r:
            mail, rcpts, data = await _envelope(r, smtp, job, timeouts, reused=reused)
            # A refused MAIL refuses every recipient, whatever a lax server said to RCPT.
            t.rcpt_replies = rcpts if mail.code == 250 else dict.fromkeys(job.rcpts, _pair(mail))
            accepted = [k for k, (code, _) in t.rcpt_replies.items() if 200 <= code < 300]
            if not accepted:
                # A server that says 354 with no recipient (RFC 2920 says it must not)
                # waits for a body: closing without the dot ends that safely.
                if data is None or data.code != 354:
                    t.clean = await _rset(r, timeouts)
                return t
            assert data is not None
            if data.code != 354:
                t.final = (data.code, data.message)
                return t  # the envelope is still open there: this connection is not reused
            await _data(r, stuff(job.body), accepted, fence=fence, t=t, timeouts=timeouts)
    return t


Reply = tuple[int, str]


async def _envelope(
    r: replies.ReplyReader, smtp: aiosmtplib.SMTP, job: Outbound, timeouts: Timeouts,
    *, reused: bool,
) -> tuple[aiosmtplib.SMTPResponse, dict[int, Reply], aiosmtplib.SMTPResponse | None]:  # fmt: skip
    """Sends MAIL, a RCPT for each recipient, then DATA: all in one write when the
    remote offers PIPELINING (RFC 2920), which saves a round trip per command over a
    WAN; else one at a time, stopping where nothing could follow. Returns the replies
    to MAIL, to each RCPT sent, and to DATA (None if not sent)."""
    encoding = "utf-8" if job.needs_smtputf8 else "ascii"
    mail = _command(encoding, f"MAIL FROM:<{job.sender}>", *mail_options(smtp, job))
    rcpts = {k: _command(encoding, f"RCPT TO:<{address}>") for k, address in job.rcpts.items()}
    pipelined = smtp.supports_extension("pipelining")
    try:
        r.write(mail + b"".join(rcpts.values()) + b"DATA\r\n" if pipelined else mail)
        mail_reply = await r.read(timeouts.command)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        if reused:  # closed while idle: nothing of this transaction was taken
            raise StaleConnection from exc
        raise
    if not pipelined:
        return mail_reply, *await _one_by_one(r, rcpts, mail_reply, timeouts)
    rcpt_replies = {k: _pair(await r.read(timeouts.command)) for k in rcpts}
    return mail_reply, rcpt_replies, await r.read(timeouts.data_start)


async def _one_by_one(
    r: replies.ReplyReader, rcpts: dict[int, bytes], mail_reply: aiosmtplib.SMTPResponse,
    timeouts: Timeouts,
) -> tuple[dict[int, Reply], aiosmtplib.SMTPResponse | None]:  # fmt: skip
    """The RCPTs and DATA towards a remote that does not pipeline."""
    rcpt_replies: dict[int, Reply] = {}
    if mail_reply.code != 250:
        return rcpt_replies, None
    for k, command in rcpts.items():
        r.write(command)
        rcpt_replies[k] = _pair(await r.read(timeouts.command))
    if not any(200 <= code < 300 for code, _ in rcpt_replies.values()):
        return rcpt_replies, None
    r.write(b"DATA\r\n")
    return rcpt_replies, await r.read(timeouts.data_start)


def _pair(reply: aiosmtplib.SMTPResponse) -> Reply:
    return reply.code, reply.message


def _command(encoding: str, *words: str) -> bytes:
    line = " ".join(words)
    if "\r" in line or "\n" in line:  # an address is never trusted to end the command
        raise ValueError(f"a line break in an SMTP command: {line!r}")
    return line.encode(encoding) + b"\r\n"


async def _rset(r: replies.ReplyReader, timeouts: Timeouts) -> bool:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        r.write(b"RSET\r\n")
        return (await r.read(timeouts.command)).code == 250
    return False


async def _data(
    r: replies.ReplyReader,
    stuffed: bytes,
    accepted: list[int],
    *,
    fence: Fence,
    t: Transaction,
    timeouts: Timeouts,
) -> None:
    """After the 354: the body, the fence, and only then the final dot."""
    r.write(stuffed)
    if not await fence(accepted):
        t.fenced_off = True  # closing without the dot: the remote discards it
        return
    r.write(b".\r\n")
    t.dot_sent = True
    try:
        reply = await r.read(timeouts.data_end)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return  # the remote may have it: never try another exchange for this attempt
    t.final = (reply.code, reply.message)
    t.clean = True
