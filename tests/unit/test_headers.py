"""Message-ID and Date are added to mail our own clients submit without them (many
receivers refuse mail without a Message-ID), never to mail from elsewhere, and a
header that is there is never touched."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re

import pytest

from mailqueue.commands import Accept
from smtpcluster.config import SmtpSection
from smtpcluster.frontend import FrontendSMTP, Handler, smtp_factory
from tests.unit.test_replies import Wire, replied, until


def submitted_body(
    message: bytes,
    trusted: bool,
    add: bool = True,
    helo: bytes = b"c.test",
    peer: str = "127.0.0.1",
) -> bytes:
    """The body proposed for `message`, sent from `peer` to an inbound domain."""
    networks = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
    cfg = SmtpSection(
        hostname="relay.test", relay_networks=networks, relay_domains=("inbound.test",),
        add_missing_headers=add,
    )  # fmt: skip
    got: list[Accept] = []

    async def accepted(cmd: Accept, timeout: float) -> bool:
        got.append(cmd)
        return True

    async def run() -> None:
        proto = smtp_factory(Handler(cfg, "n1", accepted))()
        assert isinstance(proto, FrontendSMTP)
        wire = Wire(peer)
        proto.connection_made(wire)
        await until(lambda: len(wire.writes) == 1)
        proto.data_received(b"EHLO " + helo + b"\r\nMAIL FROM:<a@b.test>\r\n"
                            b"RCPT TO:<u@inbound.test>\r\nDATA\r\n")  # fmt: skip
        await until(functools.partial(replied, wire, b"354"))
        proto.data_received(message + b".\r\n")
        await until(functools.partial(replied, wire, b"250 2.0.0"))
        proto.connection_lost(None)

    asyncio.run(run())
    [cmd] = got
    return cmd.body


BARE = b"From: app@example.org\r\nSubject: report\r\n\r\nbody\r\n"


def test_a_trusted_clients_message_gets_a_message_id_and_a_date() -> None:
    body = submitted_body(BARE, trusted=True)
    head = body.split(b"\r\n\r\n", 1)[0]
    [mid] = [ln for ln in head.split(b"\r\n") if ln.startswith(b"Message-ID: ")]
    assert mid.endswith(b"@relay.test>") and b"-n1@" in mid  # the queue id, our name
    [date] = [ln for ln in head.split(b"\r\n") if ln.startswith(b"Date: ")]
    assert body.endswith(BARE)  # the client's own lines as they were
    # RFC 5322 section 4: "GMT" is obsolete zone syntax, never to be generated; and the
    # trace field's date (the Received header's last line) is the same instant.
    assert re.fullmatch(rb"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", date)
    assert head.split(b"\r\n")[3] == b"\t" + date.removeprefix(b"Date: ")


@pytest.mark.parametrize("trusted", [False, True], ids=["from elsewhere", "present"])
def test_nothing_is_added_from_elsewhere_or_when_present(trusted: bool) -> None:
    message = BARE if not trusted else b"Message-ID: <x@y>\r\nDATE: Thu, 1 Jan 2026\r\n" + BARE
    body = submitted_body(message, trusted)
    assert body.startswith(b"Received: ") and body.endswith(message)
    assert body.count(b"Message-ID") == (0 if not trusted else 1)
    assert b"\r\nDate: " not in body


def test_the_operator_can_turn_it_off() -> None:
    assert b"Message-ID" not in submitted_body(BARE, trusted=True, add=False)


def test_a_control_character_in_the_helo_name_is_not_written_into_received() -> None:
    """A bare CR would end our Received line at a receiver (aiosmtplib itself turns it
    into a CRLF when it relays), and the client's own trace field would stand above it.
    A byte that is not UTF-8 made the header unencodable: 451 at every final dot."""
    body = submitted_body(BARE, trusted=True, helo=b"evil\rX-Injected: yes\x00\xe9")
    received = body.split(b"\r\n", 1)[0]
    assert received == b"Received: from evil?X-Injected: yes?? ([127.0.0.1])", received
    head = body[: body.index(b"\r\n\r\n")]
    assert head.count(b"\r") == head.count(b"\r\n") and b"\x00" not in head


@pytest.mark.parametrize(
    ("peer", "literal"),
    [("127.0.0.1", b"[127.0.0.1]"), ("2001:db8::7", b"[IPv6:2001:db8::7]")],
)
def test_the_client_address_in_received_is_an_rfc_5321_address_literal(
    peer: str, literal: bytes
) -> None:
    """RFC 5321 section 4.1.3: an IPv6 literal is tagged, "[IPv6:...]"; bare, trace
    parsers (and the people who read them) take it for a malformed IPv4 literal."""
    body = submitted_body(BARE, trusted=False, peer=peer)
    assert body.startswith(b"Received: from c.test (" + literal + b")\r\n"), body[:80]
