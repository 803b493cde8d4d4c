"""The front end writes the replies it has at once, not a system call per reply line."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope

from mailqueue.commands import Accept
from smtpcluster.config import SmtpSection
from smtpcluster.frontend import AcceptRefused, FrontendSMTP, Handler, smtp_factory
from smtpcluster.smtpdata import Data


class Wire(asyncio.Transport):
    """A transport that records each write the protocol makes (a unit-test double)."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


async def until(done: Callable[[], bool], deadline_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not done():
        assert loop.time() < deadline, "no reply in time"
        await asyncio.sleep(0.001)
    for _ in range(10):  # anything still scheduled (a late write would show) runs now
        await asyncio.sleep(0)


async def converse(lines: bytes, last: bytes) -> list[bytes]:
    """The writes made for a session that connects and sends `lines` in one segment,
    once a reply line starting with `last` has been written."""
    cfg = SmtpSection(hostname="reply.test", relay_networks=())
    proto = smtp_factory(Handler(cfg, "n1", None))()  # type: ignore[arg-type]
    assert isinstance(proto, FrontendSMTP)
    wire = Wire()
    proto.connection_made(wire)
    await until(lambda: len(wire.writes) == 1)  # the greeting
    proto.data_received(lines)
    await until(lambda: any(w.split(b"\r\n")[-2].startswith(last) for w in wire.writes[1:]))
    proto.connection_lost(None)
    return wire.writes


def recorder() -> tuple[list[Accept], Callable[[Accept, float], Awaitable[bool]]]:
    """A submit that takes every Accept, and the list they go into."""
    got: list[Accept] = []

    async def accepted(cmd: Accept, timeout: float) -> bool:
        got.append(cmd)
        return True

    return got, accepted


async def relaying_session(wire: Wire, submit: Any, cfg: SmtpSection | None = None) -> FrontendSMTP:
    """A front end (by default relaying for loopback), connected to `wire`, greeting
    written."""
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    cfg = cfg or SmtpSection(hostname="reply.test", relay_networks=loopback)
    proto = smtp_factory(Handler(cfg, "n1", submit))()
    assert isinstance(proto, FrontendSMTP)
    proto.connection_made(wire)
    await until(lambda: len(wire.writes) == 1)
    return proto


def replied(wire: Wire, want: bytes) -> bool:
    """Whether the last reply line written so far starts with `want`."""
    return bool(wire.writes) and wire.writes[-1].split(b"\r\n")[-2].startswith(want)


async def send_one(proto: FrontendSMTP, wire: Wire) -> None:
    """EHLO, an envelope and DATA, then a message up to its final dot."""
    proto.data_received(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    await until(functools.partial(replied, wire, b"354"))
    proto.data_received(b"Subject: x\r\n\r\nbody\r\n.\r\n")


def test_a_multiline_ehlo_reply_is_one_write() -> None:
    writes = asyncio.run(converse(b"EHLO client.test\r\n", b"250 HELP"))
    assert writes[0] == b"220 reply.test ESMTP smtpcluster\r\n"  # no library version
    assert len(writes) == 2, writes  # the greeting, then all of EHLO's lines together
    assert writes[1].startswith(b"250-reply.test\r\n") and writes[1].endswith(b"250 HELP\r\n")
    assert b"250-PIPELINING\r\n" in writes[1]


def test_pipelined_commands_get_their_replies_in_order_in_one_write() -> None:
    writes = asyncio.run(converse(b"EHLO c.test\r\nNOOP\r\nBOGUS\r\nNOOP\r\n", b"250 2.0.0 OK"))
    assert len(writes) == 2, writes
    replies = [line[:3] for line in writes[1].split(b"\r\n") if line[3:4] == b" "]
    assert replies == [b"250", b"250", b"500", b"250"]  # EHLO, NOOP, unknown command, NOOP


def test_every_reply_but_the_greeting_and_ehlo_s_has_an_enhanced_status_code() -> None:
    """RFC 2034, for the replies aiosmtpd writes itself, which lack one."""
    session = (
        b"EHLO c.test\r\nNOOP\r\nRSET\r\nVRFY a\r\nEXPN b\r\nHELP\r\nBOGUS\r\n"
        b"RCPT TO:<c@d.test>\r\nMAIL FROM:<a@b.test> NOTIFY=NEVER\r\nHELO c.test\r\n"
        b"QUIT\r\n"
    )
    writes = asyncio.run(converse(session, b"221"))
    lines = [line.decode() for w in writes[1:] for line in w.split(b"\r\n") if line]
    assert lines[0] == "250-reply.test", lines  # EHLO's lines: exempt
    ehlo_end = lines.index("250 HELP")
    helo = [k for k, line in enumerate(lines) if line == "250 reply.test"]
    assert len(helo) == 1, lines  # HELO's one line: exempt
    rest = [line for k, line in enumerate(lines) if k > ehlo_end and k != helo[0]]
    assert [line[:3] for line in rest] == [
        "250", "250", "252", "502", "250", "500", "503", "555", "221",
    ], rest  # fmt: skip
    for line in rest:
        assert re.match(r"\d{3} [245]\.\d{1,3}\.\d{1,3} ", line), line
    assert writes[0] == b"220 reply.test ESMTP smtpcluster\r\n"  # the greeting: exempt


def test_mail_and_rcpt_with_a_control_char_or_bad_utf8_get_553_and_the_session_goes_on() -> None:
    session = (
        b"EHLO c.test\r\nMAIL FROM:<a\x00b@b.test>\r\nMAIL FROM:<caf\xe9@b.test> SMTPUTF8\r\n"
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x\x01@d.test>\r\nNOOP\r\n"
    )
    writes = asyncio.run(converse(session, b"250 2.0.0 OK"))
    replies = [line[:9] for line in writes[-1].split(b"\r\n") if line[3:4] == b" "]
    assert replies[1:] == [
        b"553 5.1.3", b"553 5.1.3", b"250 2.1.0", b"553 5.1.3", b"250 2.0.0"
    ], writes  # a control character, a byte that is not UTF-8  # fmt: skip


def test_a_unicode_address_needs_smtputf8_declared_in_mail() -> None:
    session = (
        "EHLO c.test\r\nMAIL FROM:<é@b.test>\r\nMAIL FROM:<a@b.test>\r\n"
        "RCPT TO:<é@d.test>\r\nRSET\r\nMAIL FROM:<é@b.test> SMTPUTF8\r\n"
        "RCPT TO:<é@d.test>\r\nNOOP\r\n"
    ).encode()
    writes = asyncio.run(converse(session, b"250 2.0.0 OK"))
    replies = [line[:9] for line in writes[-1].split(b"\r\n") if line[3:4] == b" "]
    assert replies[1:] == [
        b"553 5.6.7", b"250 2.1.0", b"553 5.6.7", b"250 2.0.0", b"250 2.1.0",
        b"554 5.7.1", b"250 2.0.0",  # declared: past the check, to the relay policy
    ], writes  # fmt: skip


def test_quit_is_answered_at_once() -> None:
    writes = asyncio.run(converse(b"QUIT\r\n", b"221"))
    assert writes[-1].startswith(b"221")


def test_the_end_of_data_reply_goes_out_before_the_transaction_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client waits for the 250; our log line need not be in its way."""
    wire = Wire()
    written_when_logged: list[bytes] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", "") == "smtp":
                written_when_logged.append(b"".join(wire.writes))

    async def accepted(cmd: object, timeout: float) -> bool:
        return True

    async def run() -> None:
        proto = await relaying_session(wire, accepted)
        await send_one(proto, wire)
        await until(lambda: bool(written_when_logged))
        proto.connection_lost(None)

    caplog.set_level(logging.INFO, logger="smtpcluster.frontend")
    spy = Spy()
    logging.getLogger("smtpcluster.frontend").addHandler(spy)
    try:
        asyncio.run(run())
    finally:
        logging.getLogger("smtpcluster.frontend").removeHandler(spy)
    assert (
        written_when_logged[0].endswith(b"\r\n")
        and b"250 2.0.0 Ok: queued as " in (written_when_logged[0].split(b"354", 1)[1])
    )


def test_a_bare_lf_or_cr_in_the_message_is_refused_and_the_session_goes_on() -> None:
    """aiosmtpd takes a lone LF as a line end; RFC 5321 2.3.8 does not. A lone CR we
    would pass on as it is, and a receiver that ends lines at a CR would read
    "<CR>.<CR><LF>" as the end of the data and what follows as commands: SMTP
    smuggling (SEC Consult, 2023), with our name on it."""
    wire = Wire()
    submitted, accepted = recorder()

    async def run() -> None:
        proto = await relaying_session(wire, accepted)
        proto.data_received(b"EHLO c.test\r\n")
        await until(functools.partial(replied, wire, b"250 HELP"))
        for body, want in ((b"Subject: x\r\n\r\nbare\nLF\r\n", b"550 5.6.11 Bare LF"),
                           (b"Subject: z\r\n\r\nx\r.\r\nMAIL FROM:<s@a.test>\r\n",
                            b"550 5.6.11 Bare CR"),
                           (b"Subject: y\r\n\r\nfine\r\n", b"250 2.0.0")):  # fmt: skip
            proto.data_received(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
            await until(functools.partial(replied, wire, b"354"))
            proto.data_received(body + b".\r\n")
            await until(functools.partial(replied, wire, want))
        proto.connection_lost(None)

    asyncio.run(run())
    assert len(submitted) == 1  # only the good one: the refused one was never proposed


@pytest.mark.parametrize(
    "error", [AcceptRefused("a rule of a newer spool"), ValueError("a bug")], ids=repr
)
def test_a_refused_accept_or_a_bug_gets_451_not_500_and_the_session_goes_on(
    error: Exception,
) -> None:
    """A spool refusal is answered 451. So is a bug: aiosmtpd would answer it with 500,
    a permanent failure, and the client would bounce a message that may be queued
    already (chaos seed 12 got one)."""
    wire = Wire()
    calls: list[object] = []

    async def fails_once(cmd: object, timeout: float) -> bool:
        calls.append(cmd)
        if len(calls) == 1:
            raise error
        return True

    async def run() -> None:
        proto = await relaying_session(wire, fails_once)
        await send_one(proto, wire)
        await until(functools.partial(replied, wire, b"451 4.3.0"))
        proto.data_received(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        await until(functools.partial(replied, wire, b"354"))
        proto.data_received(b"Subject: y\r\n\r\nagain\r\n.\r\n")
        await until(functools.partial(replied, wire, b"250 2.0.0"))
        proto.connection_lost(None)
        bugs.append(proto.event_handler.bugs)

    bugs: list[int] = []
    asyncio.run(run())
    assert len(calls) == 2
    # smtpcluster_internal_errors_total{part="smtp"} counts the bug, not the refusal
    assert bugs == [0 if isinstance(error, AcceptRefused) else 1]
    assert not any(line.startswith(b"500") for line in b"".join(wire.writes).split(b"\r\n"))


def test_a_shutdown_waits_for_the_reply_to_a_message_in_flight() -> None:
    """A drain's 421 must not answer a message whose Accept may still commit: the 250
    (or the 451 of a settled fate) comes first, then the 421."""
    wire = Wire()
    in_flight, commit = asyncio.Event(), asyncio.Event()

    async def slow_commit(cmd: object, timeout: float) -> bool:
        in_flight.set()
        await commit.wait()
        return True

    async def run() -> None:
        proto = await relaying_session(wire, slow_commit)
        await send_one(proto, wire)
        await asyncio.wait_for(in_flight.wait(), 5)
        shutting = asyncio.create_task(proto.shut_down())
        for _ in range(20):
            await asyncio.sleep(0)  # as far as it can go without the commit
        assert not shutting.done() and not wire.closed
        commit.set()
        await asyncio.wait_for(shutting, 5)
        proto.connection_lost(None)

    asyncio.run(run())
    replies = [line[:3] for line in b"".join(wire.writes).split(b"\r\n") if line[3:4] == b" "]
    assert replies[-2:] == [b"250", b"421"] and wire.closed


@pytest.mark.parametrize("postmaster", ["ops@example.com", ""], ids=["configured", "unset"])
def test_rcpt_postmaster_is_taken_from_anyone_and_goes_to_smtp_postmaster(postmaster: str) -> None:
    """RFC 5321 4.5.1: a relay MUST accept <postmaster> without a domain, from any
    client: a remote site writes there about abuse. It was refused as relaying."""
    cfg = SmtpSection(hostname="reply.test", relay_networks=(), postmaster=postmaster)
    got, accepted = recorder()
    wire = Wire()

    async def run() -> None:
        proto = await relaying_session(wire, accepted, cfg)
        proto.data_received(b"EHLO c.test\r\nMAIL FROM:<a@far.test>\r\nRCPT TO:<PostMaster>\r\n")
        want = b"250 2.1.5" if postmaster else b"550 5.1.1"
        await until(functools.partial(replied, wire, want))
        proto.data_received(b"RCPT TO:<u@elsewhere.test>\r\n")  # still no open relay
        await until(functools.partial(replied, wire, b"554 5.7.1"))
        if postmaster:
            proto.data_received(b"DATA\r\n")
            await until(functools.partial(replied, wire, b"354"))
            proto.data_received(b"Subject: abuse report\r\n\r\nx\r\n.\r\n")
            await until(functools.partial(replied, wire, b"250 2.0.0"))
        proto.connection_lost(None)

    asyncio.run(run())
    assert [cmd.recipients for cmd in got] == ([("ops@example.com",)] if postmaster else [])


def test_a_message_past_the_nodes_data_budget_gets_452_and_the_session_goes_on() -> None:
    """Message data held in memory is bounded over all sessions (smtp.max_data_in_memory):
    past it, 452 4.3.1 and the client tries later; a message that fits gives its bytes
    back once answered."""
    wire = Wire()
    submitted, accepted = recorder()

    async def run() -> None:
        proto = await relaying_session(wire, accepted)
        budget = proto.event_handler.data_budget
        budget.take(budget.limit - 10)  # other sessions hold nearly all of it
        await send_one(proto, wire)
        await until(functools.partial(replied, wire, b"452 4.3.1"))
        budget.give(budget.limit - 10)
        proto.data_received(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        await until(functools.partial(replied, wire, b"354"))
        proto.data_received(b"Subject: y\r\n\r\nagain\r\n.\r\n")
        await until(functools.partial(replied, wire, b"250 2.0.0"))
        assert budget.held == 0 and budget.refused == 1
        proto.connection_lost(None)

    asyncio.run(run())
    assert len(submitted) == 1  # the refused one was never proposed


def test_while_a_message_commits_the_front_end_keeps_no_copy_of_its_own() -> None:
    """A message waits for its commit as one copy, the one proposed: the data as read,
    the envelope's reference to it and the Accept built from it were each as large as
    the message, and held until the reply (a 24 MiB message cost 7-8x its size at its
    peak on the accepting node)."""
    wire = Wire()
    text = b"Subject: x\r\n\r\nbody\r\n"
    held: list[str] = []
    seen: set[str] = set()

    async def submit(cmd: Accept, timeout: float) -> bool:
        frame: FrameType | None = sys._getframe(1)  # its callers: handle_DATA and up
        while frame is not None and frame.f_code.co_name != "_handle_client":
            seen.add(frame.f_code.co_name)
            for name, value in frame.f_locals.items():
                if isinstance(value, Data) or (isinstance(value, bytes) and text in value):
                    held.append(f"{frame.f_code.co_name}: {name}")
                if isinstance(value, Envelope) and value.original_content is not None:
                    held.append(f"{frame.f_code.co_name}: {name}.original_content")
            frame = frame.f_back
        return text in cmd.body

    async def run() -> None:
        proto = await relaying_session(wire, submit)
        await send_one(proto, wire)
        await until(functools.partial(replied, wire, b"250 2.0.0"))
        proto.connection_lost(None)

    asyncio.run(run())
    assert {"handle_DATA", "_end_of_data", "smtp_DATA"} <= seen, seen
    assert held == []
