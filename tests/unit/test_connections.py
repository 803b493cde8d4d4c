"""The outbound client and its connection pool against a real aiosmtpd server on
loopback: reuse, per-destination limits, stale connections, and the remote's EHLO
(SIZE, SMTPUTF8, 8BITMIME) honoured."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpcluster import pki
from smtpcluster.connections import ConnectionPool, Unreachable, _Idle
from smtpcluster.smtp_client import (
    OPPORTUNISTIC,
    Outbound,
    Security,
    Timeouts,
    Transaction,
    connect,
)
from tests.chaos import nft
from tests.integration.kvcluster import free_port
from tests.integration.sinks import Pipelining


class Recorder:
    """Counts connections and the most transactions it ever saw at once."""

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold
        self.lock = threading.Lock()
        self.sessions: set[int] = set()
        self.active = 0
        self.most_active = 0
        self.mail_options: list[list[str]] = []
        self.peers: list[str] = []  # the address each MAIL came from
        self.delivered: list[bytes] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        with self.lock:
            self.peers.append(str(session.peer[0]) if session.peer else "")
            self.sessions.add(id(session))
            self.mail_options.append(options)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.hold)
        with self.lock:
            self.active -= 1
            self.delivered.append(envelope.original_content or b"")
        return "250 queued"


def serve(handler: Recorder, port: int = 0, **kw: Any) -> Iterator[tuple[Recorder, int]]:
    port = port or free_port("127.0.0.1")
    ctl = Controller(handler, hostname="127.0.0.1", port=port, **kw)
    ctl.start()
    try:
        yield handler, port
    finally:
        ctl.stop()


class PipeliningRecorder(Pipelining, Recorder):
    pass


@pytest.fixture(params=[Recorder, PipeliningRecorder], ids=["lockstep", "pipelining"])
def sink(request: pytest.FixtureRequest) -> Iterator[tuple[Recorder, int]]:
    yield from serve(request.param(), enable_SMTPUTF8=True)


def job(port: int, n: int = 0, body: bytes = b"Subject: t\r\n\r\nhi\r\n", **kw: Any) -> Outbound:
    fields: dict[str, Any] = {
        "host": "127.0.0.1", "port": port, "helo": "relay.test",
        "sender": "s@example.org", "rcpts": {0: f"r{n}@dest.example"}, "body": body,
    }  # fmt: skip
    return Outbound(**(fields | kw))


async def dot_ok(accepted: list[int]) -> bool:
    return True


def deliver_all(pool: ConnectionPool, jobs: list[Outbound]) -> list[Transaction]:
    async def run() -> list[Transaction]:
        try:
            return list(await asyncio.gather(*(pool.deliver(j, dot_ok) for j in jobs)))
        finally:
            await pool.close()

    return asyncio.run(run())


def test_sequential_messages_share_one_connection(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    pool = ConnectionPool()

    async def one_by_one() -> list[Transaction]:
        out = [await pool.deliver(job(port, n), dot_ok) for n in range(10)]
        await pool.close()
        return out

    results = asyncio.run(one_by_one())
    assert all(t.final and t.final[0] == 250 for t in results)
    assert len(rec.delivered) == 10
    assert pool.opened == 1 and len(rec.sessions) == 1


def test_a_connection_is_reused_only_for_the_security_it_was_opened_with(
    sink: tuple[Recorder, int],
) -> None:
    """One host:port can be a route with opportunistic TLS and the smarthost that wants
    a login, or two routes with different TLS levels: a connection opened for the one
    must not carry the other's mail."""
    rec, port = sink
    pool = ConnectionPool()
    other = Security("may", ca_file="/etc/ssl/certs/ca-certificates.crt")

    async def one_by_one() -> None:
        for n, security in enumerate((OPPORTUNISTIC, other, OPPORTUNISTIC, other)):
            await pool.deliver(job(port, n, security=security), dot_ok)
        await pool.close()

    asyncio.run(one_by_one())
    assert len(rec.delivered) == 4
    assert pool.opened == 2 and len(rec.sessions) == 2


def test_a_connection_is_retired_after_max_uses(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    pool = ConnectionPool(max_uses=3)

    async def one_by_one() -> None:
        for n in range(7):
            await pool.deliver(job(port, n), dot_ok)
        await pool.close()

    asyncio.run(one_by_one())
    assert len(rec.delivered) == 7
    assert pool.opened == 3


def test_concurrency_towards_one_destination_is_limited() -> None:
    for rec, port in serve(Recorder(hold=0.05)):
        pool = ConnectionPool(per_destination=3)
        results = deliver_all(pool, [job(port, n) for n in range(12)])
        assert all(t.final and t.final[0] == 250 for t in results)
        assert rec.most_active == 3


def test_a_connection_closed_while_idle_is_replaced(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    pool = ConnectionPool()

    async def run() -> Transaction:
        await pool.deliver(job(port, 1), dot_ok)
        for conns in pool._idle.values():
            for conn in conns:
                # The socket dies under the idle connection, unnoticed until it is used:
                # the MAIL fails, nothing was sent, and a fresh connection takes over.
                assert conn.smtp.protocol is not None and conn.smtp.protocol.transport
                conn.smtp.protocol.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        t = await pool.deliver(job(port, 2), dot_ok)
        await pool.close()
        return t

    t = asyncio.run(run())
    assert t.final and t.final[0] == 250
    assert len(rec.delivered) == 2 and pool.opened == 2


def test_a_message_over_the_remotes_size_limit_is_refused_before_sending() -> None:
    for rec, port in serve(Recorder(), data_size_limit=2048):
        big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" * 100 + b"y" * 4000 + b"\r\n"
        [t] = deliver_all(ConnectionPool(), [job(port, body=big)])
        code, text = t.rcpt_replies[0]
        assert code == 552 and "5.3.4" in text
        assert not t.dot_sent and rec.delivered == []


def test_smtputf8_mail_to_a_server_without_it_bounces_with_a_reason() -> None:
    for rec, port in serve(Recorder(), enable_SMTPUTF8=False):
        [t] = deliver_all(ConnectionPool(), [job(port, rcpts={0: "josé@dest.example"})])
        code, text = t.rcpt_replies[0]
        assert code == 553 and "SMTPUTF8" in text
        assert rec.delivered == []


def test_smtputf8_and_size_are_declared_to_a_server_that_has_them(
    sink: tuple[Recorder, int],
) -> None:
    rec, port = sink
    body = "Subject: café\r\n\r\nü\r\n".encode()
    [t] = deliver_all(ConnectionPool(), [job(port, rcpts={0: "josé@dest.example"}, body=body)])
    assert t.final and t.final[0] == 250
    [options] = rec.mail_options
    assert "SMTPUTF8" in options and f"SIZE={len(body)}" in options
    assert rec.delivered == [body]


def test_plaintext_is_counted_only_where_starttls_was_offered_and_not_used(
    tmp_path: Path,
) -> None:
    pki.init(tmp_path, [pki.NodeName("remote", "127.0.0.1")], "remote.test")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "remote" / "tls.crt", tmp_path / "remote" / "tls.key")
    for with_tls in (True, False):
        for rec, port in serve(Recorder(), tls_context=tls if with_tls else None):
            pool = ConnectionPool()
            [t] = deliver_all(pool, [job(port)])
            assert t.final and t.final[0] == 250 and len(rec.delivered) == 1
            assert pool.opened == 1 and pool.plaintext == 0, with_tls


def test_deliveries_connect_from_the_source_address_of_their_family(
    sink: tuple[Recorder, int],
) -> None:
    """Postfix's smtp_bind_address: the address the receiver's SPF record names."""
    rec, port = sink
    pool = ConnectionPool(source_addresses=("::1", "127.0.0.2"), max_uses=1)
    deliver_all(pool, [job(port, 1)])
    pool.source_addresses = ()
    deliver_all(pool, [job(port, 2)])
    assert rec.peers == ["127.0.0.2", "127.0.0.1"]


class Silent:
    """A cached connection to a host that stopped answering: its QUIT waits until the
    test lets it end (as aiosmtplib's would until its timeout)."""

    is_connected = True

    def __init__(self, release: asyncio.Event) -> None:
        self.release = release
        self.quitting = False
        self.closed = False

    async def quit(self, timeout: float | None = None) -> None:
        self.quitting = True
        await self.release.wait()

    def close(self) -> None:
        self.closed = True


def test_quits_to_a_silent_host_are_said_all_at_once_not_one_after_another() -> None:
    """Pruning stale connections held up the worker's loop (every new delivery of the
    node) for one QUIT timeout per connection, and so did closing at shutdown."""

    async def run() -> None:
        release = asyncio.Event()
        pool = ConnectionPool(idle_s=60.0)
        stale, fresh = [Silent(release) for _ in range(3)], [Silent(release) for _ in range(3)]
        now = time.monotonic()
        pool._idle[("127.0.0.1", 25, OPPORTUNISTIC)] = (
            [_Idle(cast("aiosmtplib.SMTP", c), 1, now - 120) for c in stale]
            + [_Idle(cast("aiosmtplib.SMTP", c), 1, now) for c in fresh]
        )  # fmt: skip
        pool.prune()  # returns at once: the stale ones say QUIT in the background
        closing = asyncio.get_running_loop().create_task(pool.close())
        for _ in range(100):  # loop turns, not time: none of the QUITs can end yet
            if all(c.quitting for c in stale + fresh):
                break
            await asyncio.sleep(0)
        assert all(c.quitting for c in stale + fresh)  # all six under way at once
        release.set()
        await asyncio.wait_for(closing, 10)
        assert all(c.closed for c in stale + fresh)

    asyncio.run(run())


@pytest.mark.skipif(not nft.partitions_possible(), reason="needs root and nft")
def test_a_host_that_drops_syns_is_given_up_after_the_connect_timeout() -> None:
    """A firewall that drops (not refuses) held each attempt for the kernel's SYN
    retries, about two minutes, under the greeting's five: the next MX waited as long."""
    port = free_port("127.0.0.1")
    partitions = nft.Partitions()
    partitions.deafen(port)

    async def run() -> None:
        opening = connect("127.0.0.1", port, "relay.test", Timeouts(connect=0.5))
        with pytest.raises(aiosmtplib.SMTPConnectTimeoutError, match=r"after 0\.5 s"):
            await asyncio.wait_for(opening, 60)

    try:
        asyncio.run(run())
    finally:
        partitions.close()


@pytest.mark.skipif(not nft.partitions_possible(), reason="needs root and nft")
def test_each_address_of_a_name_gets_its_own_connect_timeout(
    sink: tuple[Recorder, int],
) -> None:
    """A smarthost name with a black-holed IPv6 address and a good IPv4 one: with one
    timeout for both, the first took it all and the second was never tried."""
    rec, live = sink
    deaf = free_port("127.0.0.2")
    partitions = nft.Partitions()
    partitions.deafen(deaf)

    async def resolve(host: str, port: int, **kw: Any) -> list[Any]:
        assert host == "smarthost.test"  # a mock resolver: the two addresses of the name
        tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [(*tcp, ("127.0.0.2", deaf)), (*tcp, ("127.0.0.1", live))]

    async def run() -> Transaction:
        asyncio.get_running_loop().getaddrinfo = resolve  # type: ignore[method-assign,assignment]
        pool = ConnectionPool(timeouts=Timeouts(connect=0.5))
        try:
            return await asyncio.wait_for(pool.deliver(job(0, host="smarthost.test"), dot_ok), 60)
        finally:
            await pool.close()

    try:
        t = asyncio.run(run())
    finally:
        partitions.close()
    assert t.final and t.final[0] == 250 and len(rec.delivered) == 1


def test_a_refused_connection_is_aiosmtplibs_connect_error() -> None:
    """What the worker records as the attempt's error ("4.4.1 host:port: ...")."""
    port = free_port("127.0.0.1")  # nothing listens there

    async def run() -> None:
        with pytest.raises(aiosmtplib.SMTPConnectError, match=f"on port {port}"):
            await connect("127.0.0.1", port, "relay.test")

    asyncio.run(run())


def test_a_host_that_timed_out_is_not_tried_again_for_a_while() -> None:
    """A host that drops SYNs costs the connect timeout per attempt: every message for
    it paid that, and a dead first MX delayed each one's turn at the next. Here the
    host takes the connection and never greets, which times out alike."""
    port = free_port("127.0.0.1")
    pool = ConnectionPool(unreachable_s=3600, max_uses=1, timeouts=Timeouts(greeting=0.2))

    async def attempt() -> Transaction:
        return await pool.deliver(job(port), dot_ok)

    silent = socket.create_server(("127.0.0.1", port))  # listens, never says 220
    with silent, pytest.raises(aiosmtplib.SMTPConnectTimeoutError) as first:
        asyncio.run(attempt())
    assert not isinstance(first.value, Unreachable)

    async def host_back() -> list[Transaction]:
        with pytest.raises(Unreachable, match=r"not tried: timed out \d+ s ago: Timed out"):
            await attempt()
        pool.unreachable_s = 0  # the window has passed
        done = [await attempt()]
        pool.unreachable_s = 3600  # and a success forgot the failure
        done.append(await attempt())
        await pool.close()
        return done

    assert pool.untried() == 1
    for rec, _ in serve(Recorder(), port=port):
        assert all(t.final and t.final[0] == 250 for t in asyncio.run(host_back()))
        assert len(rec.delivered) == 2 and pool.opened == 2
    assert pool.untried() == 0


def test_hosts_left_untried_are_forgotten_once_their_time_is_up() -> None:
    """MX addresses come and go: each that once timed out stayed in memory for good."""
    pool = ConnectionPool(unreachable_s=60)
    now = time.monotonic()
    pool._unreachable = {("127.0.0.8", 25): (now - 61, "old"), ("127.0.0.9", 25): (now, "new")}
    pool.prune()  # nothing idle to close: no event loop needed
    assert list(pool._unreachable) == [("127.0.0.9", 25)] and pool.untried() == 1


def test_a_refused_connection_is_tried_again_at_once() -> None:
    """A smarthost restarting refuses for a moment: the mail after it goes out."""
    port = free_port("127.0.0.1")  # nothing listens there yet
    pool = ConnectionPool(unreachable_s=3600)

    async def attempt() -> Transaction:
        try:
            return await pool.deliver(job(port), dot_ok)
        finally:
            await pool.close()

    with pytest.raises(aiosmtplib.SMTPConnectError, match="Error connecting"):
        asyncio.run(attempt())
    for rec, _ in serve(Recorder(), port=port):
        assert (t := asyncio.run(attempt())).final and t.final[0] == 250
        assert len(rec.delivered) == 1


def test_a_host_that_greets_with_421_is_alive_and_tried_again() -> None:
    """A 421 at the greeting (too busy, too many connections) is not a dead host."""
    port = free_port("127.0.0.1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(8)
    pool = ConnectionPool(unreachable_s=3600)

    def greet_421() -> None:
        for _ in range(2):
            conn, _ = sock.accept()
            conn.sendall(b"421 4.7.0 busy, try later\r\n")
            conn.close()

    greeter = threading.Thread(target=greet_421)
    greeter.start()
    try:
        for _ in range(2):  # the second is tried too, and sees the 421 itself
            with pytest.raises(aiosmtplib.SMTPConnectResponseError, match="busy"):
                asyncio.run(pool.deliver(job(port), dot_ok))
    finally:
        greeter.join(10)
        sock.close()
