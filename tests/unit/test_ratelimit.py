"""Rate limits per client: `limit` events a minute in bursts of up to `limit`, each key
on its own; over the limit a 421 at connect or a 450 at MAIL, relay_networks exempt."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from smtpcluster import ratelimit
from smtpcluster.config import SmtpSection
from smtpcluster.frontend import FrontendSMTP, Handler, smtp_factory
from smtpcluster.ratelimit import RateLimiter
from tests.unit.test_replies import Wire, until
from tests.unit.test_sessions import first_reply, greeted


def test_a_burst_up_to_the_limit_then_one_more_per_share_of_the_minute() -> None:
    r = RateLimiter("messages")
    assert [r.allow("a", 3, now=0.0) for _ in range(4)] == [True, True, True, False]
    assert r.allow("b", 3, now=0.0)  # another client has its own bucket
    assert not r.allow("a", 3, now=19.0)  # a third of a minute brings one back
    assert [r.allow("a", 3, now=40.0) for _ in range(3)] == [
        True,
        True,
        False,
    ]  # a refusal costs none
    assert [r.allow("a", 3, now=1000.0) for _ in range(4)] == [True] * 3 + [False]  # full, no more
    assert r.refused == 4


def test_no_limit_counts_nothing() -> None:
    r = RateLimiter("messages")
    assert all(r.allow("a", 0, now=0.0) for _ in range(1000))
    assert len(r) == 0 and r.refused == 0


def test_idle_clients_are_forgotten_but_limited_ones_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "PRUNE_AT", 10)
    r = RateLimiter("connections")
    for _ in range(2):
        r.allow("busy", 2, now=100.0)
    for k in range(10):
        r.allow(f"idle{k}", 2, now=float(k))  # each full again a minute after
    r.allow("last", 2, now=100.0)  # over PRUNE_AT: the full buckets go
    assert len(r) < 10
    assert not r.allow("busy", 2, now=100.0)  # its emptied bucket was kept


def cfg(trusted: bool, **limits: int) -> SmtpSection:
    networks = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
    return SmtpSection(hostname="s.test", relay_networks=networks, **limits)  # type: ignore[arg-type]


@pytest.mark.parametrize("trusted", [False, True], ids=["outsider", "relay network"])
def test_connections_over_the_rate_get_421(trusted: bool) -> None:
    handler = Handler(cfg(trusted, client_connection_rate_limit=2), "n1", None)  # type: ignore[arg-type]

    async def run() -> list[bytes]:
        made = await greeted(handler, 3)
        for proto, _ in made:
            proto.connection_lost(None)  # closed at once: the session limit is not it
        return [first_reply(w) for _, w in made]

    replies = asyncio.run(run())
    if trusted:
        assert replies == [b"220 s.tes"] * 3
    else:
        assert replies == [b"220 s.tes", b"220 s.tes", b"421 4.7.0"]
    assert handler.connection_rate.refused == (0 if trusted else 1)


def final_lines(wire: Wire) -> list[bytes]:
    """The start of each reply's last line after the greeting."""
    lines = b"".join(wire.writes[1:]).split(b"\r\n")
    return [ln[:9] for ln in lines if ln[3:4] == b" "]


@pytest.mark.parametrize("trusted", [False, True], ids=["outsider", "relay network"])
def test_messages_over_the_rate_get_450_at_mail_and_the_session_goes_on(trusted: bool) -> None:
    handler = Handler(cfg(trusted, client_message_rate_limit=2), "n1", None)  # type: ignore[arg-type]

    async def run() -> list[bytes]:
        proto = smtp_factory(handler)()
        assert isinstance(proto, FrontendSMTP)
        wire = Wire()
        proto.connection_made(wire)
        await until(lambda: len(wire.writes) == 1)
        mails = b"MAIL FROM:<a@b.test>\r\nRSET\r\n" * 3
        proto.data_received(b"EHLO c.test\r\n" + mails + b"NOOP\r\n")
        await until(lambda: len(final_lines(wire)) == 8)  # EHLO, 3 x (MAIL, RSET), NOOP
        proto.connection_lost(None)
        return final_lines(wire)

    replies = asyncio.run(run())
    mail_replies = replies[1:-1:2]  # after EHLO: MAIL, RSET, MAIL, RSET, MAIL, RSET; NOOP
    if trusted:
        assert mail_replies == [b"250 2.1.0"] * 3
    else:
        assert mail_replies == [b"250 2.1.0", b"250 2.1.0", b"450 4.7.1"]
    assert replies[-1][:3] == b"250"  # NOOP after it: the session went on
