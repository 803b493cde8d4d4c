"""Who may relay to which address (smtpcluster.frontend.RelayPolicy), and what a client
is told when it may not."""

from __future__ import annotations

import asyncio
import functools
import ipaddress

import pytest

from smtpcluster.frontend import ADDRESS_FORM, RELAY_DENIED, RelayPolicy
from tests.unit.test_replies import Wire, recorder, relaying_session, replied, until

POLICY = RelayPolicy((ipaddress.ip_network("10.0.0.0/8"),), frozenset({"inbound.test"}))
INSIDER, OUTSIDER = "10.1.2.3", "192.0.2.7"
# Addresses a relay must not interpret: each would route by a rule of its own.
NOT_PLAIN = [
    "",
    "a b@outside.example",
    "victim%outside.example@inbound.test",
    "@inbound.test:victim@outside.example",
    '"victim@outside.example"@inbound.test',
    "outside.example!victim@inbound.test",
    "victim@[192.0.2.1]",
]


def test_plain_addresses_go_by_client_and_domain() -> None:
    assert POLICY.refusal(INSIDER, False, "a@outside.example") == ""
    assert POLICY.refusal(OUTSIDER, True, "a@outside.example") == ""  # authenticated
    assert POLICY.refusal(OUTSIDER, False, "a@inbound.test") == ""
    assert POLICY.refusal(OUTSIDER, False, "a@INBOUND.test.") == ""
    assert POLICY.refusal(OUTSIDER, False, "a@outside.example") == RELAY_DENIED


@pytest.mark.parametrize("rcpt", NOT_PLAIN)
def test_an_outsider_is_denied_relaying_for_any_other_form(rcpt: str) -> None:
    assert POLICY.refusal(OUTSIDER, False, rcpt) == RELAY_DENIED


@pytest.mark.parametrize("rcpt", NOT_PLAIN)
@pytest.mark.parametrize(("peer", "authenticated"), [(INSIDER, False), (OUTSIDER, True)])
def test_a_client_that_may_relay_is_told_the_address_is_the_problem(
    peer: str, authenticated: bool, rcpt: str
) -> None:
    assert POLICY.refusal(peer, authenticated, rcpt) == ADDRESS_FORM
    assert ADDRESS_FORM.startswith("553 5.1.3 ")


def test_the_session_goes_on_after_a_refused_address() -> None:
    async def run() -> tuple[Wire, list[str]]:
        wire, (got, submit) = Wire(), recorder()
        proto = await relaying_session(wire, submit)
        proto.data_received(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a b@d.test>\r\n")
        await until(functools.partial(replied, wire, b"553"))
        proto.data_received(b"RCPT TO:<c@d.test>\r\nDATA\r\n")
        await until(functools.partial(replied, wire, b"354"))
        proto.data_received(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        await until(functools.partial(replied, wire, b"250 2.0.0 Ok: queued"))
        proto.connection_lost(None)
        return wire, [rcpt for cmd in got for rcpt in cmd.recipients]

    wire, rcpts = asyncio.run(run())
    assert (ADDRESS_FORM.encode() + b"\r\n") in b"".join(wire.writes)
    assert rcpts == ["c@d.test"]
