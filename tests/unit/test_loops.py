"""Mail loops: a message that has made more than max_hops hops (Received fields) is
refused at its final dot, as RFC 5321 6.3 says to catch loops; the session goes on."""

from __future__ import annotations

import asyncio
import functools

import pytest

from smtpcluster.frontend import count_fields, header_of
from tests.unit.test_replies import Wire, relaying_session, replied, until


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"Subject: x\r\n\r\nReceived: in the body, not a hop\r\n", 0),
        (b"Received: from a\r\n\tby b; date\r\nRECEIVED: from c\r\nSubject: x\r\n\r\nx\r\n", 2),
        (b"X-Received: from a\r\nSubject: x\r\n\r\n", 0),  # another field
        (b"Received: from a\r\n", 1),  # a header and no body
    ],
)
def test_received_fields_of_the_header_are_counted(raw: bytes, want: int) -> None:
    assert count_fields(header_of(raw), b"received") == want


def test_a_message_over_the_hop_limit_is_refused_and_the_session_goes_on() -> None:
    wire = Wire()
    submitted: list[object] = []

    async def accepted(cmd: object, timeout: float) -> bool:
        submitted.append(cmd)
        return True

    hops = b"Received: from relay.test\r\n\tby relay.test; Thu, 26 Nov 2026 12:00:00 +0000\r\n"

    async def run() -> None:
        proto = await relaying_session(wire, accepted)  # max_hops: 100, the default
        proto.data_received(b"EHLO c.test\r\n")
        await until(functools.partial(replied, wire, b"250 HELP"))
        for n, want in ((101, b"554 5.4.6"), (100, b"250 2.0.0")):
            proto.data_received(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
            await until(functools.partial(replied, wire, b"354"))
            proto.data_received(hops * n + b"Subject: loop\r\n\r\nx\r\n.\r\n")
            await until(functools.partial(replied, wire, want))
        proto.connection_lost(None)

    asyncio.run(run())
    assert b"Too many hops (101 Received headers)" in b"".join(wire.writes)
    assert len(submitted) == 1  # the refused one was never proposed
