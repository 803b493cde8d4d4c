"""Session limits: one client may hold at most max_sessions_per_client connections
(relay networks exempt), everyone together max_sessions; over a limit a connection
gets 421 instead of the greeting, and a closed session frees its place."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from smtpcluster.config import SmtpSection
from smtpcluster.frontend import FrontendSMTP, Handler, smtp_factory
from smtpcluster.sessions import Sessions
from tests.unit.test_replies import Wire, until


def connect(handler: Handler) -> tuple[FrontendSMTP, Wire]:
    proto = smtp_factory(handler)()
    assert isinstance(proto, FrontendSMTP)
    wire = Wire()  # its peer is 127.0.0.1
    proto.connection_made(wire)
    return proto, wire


async def greeted(handler: Handler, n: int) -> list[tuple[FrontendSMTP, Wire]]:
    made = [connect(handler) for _ in range(n)]
    await until(lambda: all(w.writes for _, w in made))
    return made


def first_reply(wire: Wire) -> bytes:
    return wire.writes[0][:9]


@pytest.mark.parametrize("trusted", [False, True], ids=["outsider", "relay network"])
def test_one_client_gets_421_over_its_limit_unless_in_relay_networks(trusted: bool) -> None:
    networks = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
    cfg = SmtpSection(hostname="s.test", relay_networks=networks, max_sessions_per_client=2)
    handler = Handler(cfg, "n1", None)  # type: ignore[arg-type]

    async def run() -> None:
        made = await greeted(handler, 3)
        replies = [first_reply(w) for _, w in made]
        if trusted:
            assert replies == [b"220 s.tes"] * 3 and len(handler.sessions) == 3
        else:
            assert replies == [b"220 s.tes", b"220 s.tes", b"421 4.7.0"]
            assert made[2][1].closed and len(handler.sessions) == 2
            assert b"Too many connections from 127.0.0.1" in made[2][1].writes[0]
            made[2][0].connection_lost(None)  # a refused one frees nothing it never held
            made[0][0].connection_lost(None)
            (again,) = await greeted(handler, 1)
            assert first_reply(again[1]) == b"220 s.tes"
        for proto, _ in made[1:] if not trusted else made:
            proto.connection_lost(None)

    asyncio.run(run())
    assert handler.sessions.refused == (0 if trusted else 1)


def test_over_max_sessions_everyone_gets_421() -> None:
    cfg = SmtpSection(
        hostname="s.test", relay_networks=(ipaddress.ip_network("127.0.0.0/8"),), max_sessions=2
    )
    handler = Handler(cfg, "n1", None)  # type: ignore[arg-type]

    async def run() -> None:
        made = await greeted(handler, 3)
        assert [first_reply(w) for _, w in made] == [b"220 s.tes", b"220 s.tes", b"421 4.3.2"]
        for proto, _ in made:
            proto.connection_lost(None)
        assert len(handler.sessions) == 0

    asyncio.run(run())


def test_sessions_count_per_client_and_forget_a_client_with_none_left() -> None:
    s: Sessions[str] = Sessions()

    def never(peer: str) -> bool:
        return False

    assert s.admit("a", "10.0.0.1", (10, 1), never) is None
    refusal = s.admit("b", "10.0.0.1", (10, 1), never)
    assert refusal == "421 4.7.0 Too many connections from 10.0.0.1"
    assert s.admit("c", "10.0.0.2", (10, 1), never) is None
    s.discard("a")
    s.discard("b")  # never admitted: no effect
    assert sorted(s) == ["c"] and dict(s._per_client) == {"10.0.0.2": 1}
    assert s.admit("d", "10.0.0.1", (10, 1), never) is None
