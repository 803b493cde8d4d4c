"""The delivery client against a scripted server: the envelope in one write when the
remote offers PIPELINING (RFC 2920), one command at a time when it does not, and the
fence before the final dot either way; the replies of a group read in order however
they arrive; a STARTTLS that fails, under opportunistic TLS and where TLS is required."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import aiosmtplib
import pytest
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

from smtpcluster import replies
from smtpcluster.smtp_client import (
    OPPORTUNISTIC,
    Fence,
    Outbound,
    Security,
    Timeouts,
    Transaction,
    connect,
    starttls_declined,
    transact,
)

T = TypeVar("T")
QUICK = Timeouts(connect=5, greeting=5, command=5, data_start=5, data_end=5)


@dataclass
class Script:
    """What the remote answers. With `pipelining` it says so in its EHLO and holds its
    replies to MAIL and RCPT until DATA: a client that waits for each reply would wait
    until its timeout."""

    pipelining: bool = True
    starttls: str = ""  # offered and then: "break" (junk for a handshake) or "refuse"
    ehlo: str = ""  # the reply to EHLO, if not its extensions
    mail: str = "250 2.1.0 ok"
    rcpts: list[str] = field(default_factory=lambda: ["250 2.1.5 ok"])
    data: str = "354 go ahead"
    final: str = "250 2.0.0 queued"
    chunks: list[bytes] = field(default_factory=list)  # as received
    connections: int = 0
    messages: list[bytes] = field(default_factory=list)  # bodies ended by the dot


class Remote(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.held: list[str] = []
        self.in_body = False
        self.rcpts = iter(script.rcpts)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.script.connections += 1
        transport.write(b"220 remote.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.script.chunks.append(data)
        self.buffer += data
        while True:
            if self.in_body:
                body, dot, rest = self.buffer.partition(b"\r\n.\r\n")
                if not dot:
                    return
                self.script.messages.append(body + b"\r\n")
                self.buffer, self.in_body = rest, False
                self.reply(self.script.final)
                continue
            line, crlf, rest = self.buffer.partition(b"\r\n")
            if not crlf:
                return
            self.buffer = rest
            self.command(line[:4].upper())

    def command(self, verb: bytes) -> None:
        s = self.script
        if verb == b"EHLO" and s.ehlo:
            return self.reply(s.ehlo)
        if verb == b"EHLO":
            extensions = ["250-PIPELINING"] if s.pipelining else []
            extensions += ["250-STARTTLS"] if s.starttls else []
            return self.reply("\r\n".join(["250-remote.test", *extensions, "250 8BITMIME"]))
        if verb == b"STAR" and s.starttls == "break":
            self.reply("220 2.0.0 go ahead")
            self.transport.write(b"this is no TLS handshake\r\n")
            return self.transport.close()
        if verb == b"STAR":
            return self.reply("454 4.7.0 TLS not available now")
        answer = {
            b"HELO": "250 remote.test",
            b"MAIL": s.mail,
            b"DATA": s.data,
            b"RSET": "250 ok",
            b"QUIT": "221 bye",
        }
        text = next(self.rcpts) if verb == b"RCPT" else answer.get(verb, "500 what?")
        self.in_body = verb == b"DATA" and text.startswith("354")
        self.held.append(text)
        if not (s.pipelining and verb in (b"MAIL", b"RCPT")):
            self.reply()

    def reply(self, text: str = "") -> None:
        self.transport.write("".join(f"{t}\r\n" for t in [*self.held, text] if t).encode())
        self.held = []


def against(
    script: Script, talk: Callable[[aiosmtplib.SMTP], Awaitable[T]],
    security: Security = OPPORTUNISTIC,
) -> T:  # fmt: skip
    async def run() -> T:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Remote(script), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            smtp = await connect("127.0.0.1", port, "relay.test", QUICK, security)
            try:
                return await asyncio.wait_for(talk(smtp), 30)
            finally:
                smtp.close()
        finally:
            server.close()

    return asyncio.run(run())


BODY = b"Subject: t\r\n\r\nhello\r\n"


def job(n_rcpts: int = 1) -> Outbound:
    rcpts = {k: f"r{k}@dest.example" for k in range(n_rcpts)}
    return Outbound("127.0.0.1", 25, "relay.test", "s@example.org", rcpts, BODY)


async def dot_ok(accepted: list[int]) -> bool:
    return True


def send(script: Script, n_rcpts: int = 1, fence: Fence = dot_ok) -> Transaction:
    return against(script, lambda smtp: transact(smtp, job(n_rcpts), fence, timeouts=QUICK))


def commands_per_chunk(script: Script) -> list[int]:
    """How many commands came in each chunk the remote received, up to DATA."""
    counts = []
    for chunk in script.chunks:
        counts.append(chunk.count(b"\r\n"))
        if b"DATA\r\n" in chunk:
            break
    return counts


def test_the_envelope_goes_in_one_write_to_a_remote_that_pipelines() -> None:
    script = Script(rcpts=["250 2.1.5 ok", "550 5.1.1 no such user", "250 2.1.5 ok"])
    t = send(script, n_rcpts=3)
    assert t.rcpt_replies == {
        0: (250, "2.1.5 ok"), 1: (550, "5.1.1 no such user"), 2: (250, "2.1.5 ok"),
    }  # fmt: skip
    assert t.dot_sent and t.final == (250, "2.0.0 queued") and t.clean
    assert script.messages == [BODY]
    # EHLO, then MAIL + 3 RCPT + DATA together (the remote held its replies till DATA)
    assert commands_per_chunk(script)[-1] == 5


def test_a_remote_without_pipelining_gets_one_command_at_a_time() -> None:
    script = Script(pipelining=False, rcpts=["250 ok", "250 ok"])
    t = send(script, n_rcpts=2)
    assert t.final == (250, "2.0.0 queued") and script.messages == [BODY]
    assert commands_per_chunk(script) == [1, 1, 1, 1, 1]  # EHLO, MAIL, RCPT, RCPT, DATA


def test_the_dot_waits_for_the_fence_on_a_pipelined_envelope() -> None:
    fenced: list[list[int]] = []

    async def refuse(accepted: list[int]) -> bool:
        fenced.append(accepted)
        return False

    script = Script(rcpts=["550 5.1.1 no", "250 ok"])
    t = send(script, n_rcpts=2, fence=refuse)
    assert fenced == [[1]]  # only the accepted recipient is fenced
    assert t.fenced_off and not t.dot_sent and not t.clean
    assert script.messages == []  # the body went out, the dot never did


def test_a_refused_mail_refuses_every_recipient_whatever_rcpt_said() -> None:
    script = Script(mail="451 4.3.0 try later", rcpts=["250 lax", "503 5.5.1 need MAIL"],
                    data="503 5.5.1 need RCPT")  # fmt: skip
    t = send(script, n_rcpts=2)
    assert t.rcpt_replies == {0: (451, "4.3.0 try later"), 1: (451, "4.3.0 try later")}
    assert not t.dot_sent and t.clean  # reset, and fit to carry the next message


def test_data_refused_for_want_of_recipients_leaves_the_connection_reusable() -> None:
    script = Script(rcpts=["550 5.1.1 no", "550 5.1.1 no"], data="554 5.5.1 no valid recipients")
    t = send(script, n_rcpts=2)
    assert [code for code, _ in t.rcpt_replies.values()] == [550, 550]
    assert not t.dot_sent and t.clean and script.messages == []


def test_a_354_with_no_recipient_is_left_without_a_dot() -> None:
    """RFC 2920 says a server must refuse DATA when no RCPT succeeded; one that says 354
    anyway waits for a body, and the only safe end is closing without the dot."""
    script = Script(rcpts=["550 5.1.1 no"])
    t = send(script)
    assert t.rcpt_replies == {0: (550, "5.1.1 no")}
    assert not t.dot_sent and not t.clean and script.messages == []


def test_refused_data_with_recipients_accepted_is_the_final_reply() -> None:
    t = send(Script(data="451 4.3.0 out of spool"))
    assert t.final == (451, "4.3.0 out of spool") and not t.dot_sent and not t.clean


def test_the_connection_carries_another_transaction_after_a_pipelined_one() -> None:
    script = Script(rcpts=["250 ok"] * 2)

    async def twice(smtp: aiosmtplib.SMTP) -> list[Transaction]:
        out = [await transact(smtp, job(), dot_ok, timeouts=QUICK) for _ in range(2)]
        await smtp.quit()  # aiosmtplib reads its own replies again afterwards
        return out

    first, second = against(script, twice)
    assert first.final == second.final == (250, "2.0.0 queued")
    assert script.messages == [BODY, BODY]


def read_all(chunks: list[bytes], n: int, *, end: bool = False) -> list[SMTPResponse]:
    """Feeds `chunks` to a ReplyReader as a transport would, then reads n replies."""

    async def run() -> list[SMTPResponse]:
        inner = SMTPProtocol()
        reader = replies.ReplyReader(inner, cast(asyncio.Transport, None))
        for chunk in chunks:
            reader.data_received(chunk)
        if end:
            reader.connection_lost(None)
        return [await reader.read(1) for _ in range(n)]

    return asyncio.run(run())


def test_replies_are_read_in_order_however_they_are_cut() -> None:
    """aiosmtplib's own protocol would keep the first and lose or strand the rest."""
    got = read_all([b"250 mail ok\r\n250-rcpt", b" one\r\n250 two\r\n354 go", b"\r\n"], 3)
    assert got == [(250, "mail ok"), (250, "rcpt one\ntwo"), (354, "go")]


def test_a_lost_connection_ends_reading_after_the_replies_that_came() -> None:
    reply, missing = read_all([b"250 ok\r\n"], 1, end=True), None
    assert reply == [(250, "ok")]
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        missing = read_all([b"250 ok\r\n"], 2, end=True)
    assert missing is None


@pytest.mark.parametrize(
    "junk", [b"hello there\r\n", b"2x0 ok\r\n", b"250-" + b"x" * 9000 + b"\r\n"]
)
def test_a_malformed_reply_is_an_error_not_a_hang(junk: bytes) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException):
        read_all([junk], 1)


def deliver(smtp: aiosmtplib.SMTP) -> Awaitable[Transaction]:
    return transact(smtp, job(), dot_ok, timeouts=QUICK)


def test_a_failed_handshake_under_may_goes_on_in_plaintext_on_a_new_connection() -> None:
    """A remote whose TLS we cannot speak (TLS 1.0 only) took none of our mail, ever."""
    script = Script(starttls="break")

    async def noted(smtp: aiosmtplib.SMTP) -> tuple[Transaction, bool]:
        return await deliver(smtp), starttls_declined(smtp)

    t, declined = against(script, noted)
    assert t.final == (250, "2.0.0 queued") and script.messages == [BODY]
    assert script.connections == 2 and declined  # counted by the pool, for a metric


def test_a_refused_starttls_under_may_goes_on_in_plaintext() -> None:
    script = Script(starttls="refuse")
    t = against(script, deliver)
    assert t.final == (250, "2.0.0 queued") and script.connections == 1


@pytest.mark.parametrize("how", ["break", "refuse"])
def test_a_failed_starttls_sends_nothing_where_tls_is_required(how: str) -> None:
    script = Script(starttls=how)
    with pytest.raises((aiosmtplib.SMTPException, OSError)):
        against(script, deliver, Security("encrypt"))
    assert script.connections == 1 and script.messages == []
    assert not any(b"MAIL FROM" in chunk for chunk in script.chunks)


def test_a_server_that_does_not_know_ehlo_is_greeted_with_helo() -> None:
    script = Script(pipelining=False, ehlo="502 5.5.2 command not recognized")
    t = against(script, deliver)
    assert t.final == (250, "2.0.0 queued") and script.messages == [BODY]
    assert commands_per_chunk(script) == [1, 1, 1, 1, 1]  # EHLO, HELO, MAIL, RCPT, DATA


def test_an_ehlo_refused_for_policy_is_not_retried_as_helo() -> None:
    script = Script(ehlo="554 5.7.1 go away")
    with pytest.raises(aiosmtplib.SMTPHeloError):
        against(script, deliver)
    assert not any(b"HELO" in chunk for chunk in script.chunks)
