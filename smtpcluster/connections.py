"""Outbound SMTP connections: reused across messages, limited per destination.

Opening a connection costs a TCP handshake, a greeting, EHLO and often TLS; a busy
relay sends many messages to the same few servers, so after a clean transaction the
connection waits here for the next message to the same host, as Postfix's connection
cache does. A connection is reused at most `max_uses` times and never kept idle
longer than `idle_s`. At most `per_destination` transactions run at once towards one
host:port, so one slow destination cannot take every delivery slot. A host whose
connection timed out is not tried again for `unreachable_s` (see `_connect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiosmtplib

from smtpcluster import smtp_client
from smtpcluster.smtp_client import (
    RFC_5321,
    Fence,
    Outbound,
    StaleConnection,
    Timeouts,
    Transaction,
)

log = logging.getLogger(__name__)
Destination = tuple[str, int]
# A cached connection is reused only for the same security: one opened for a route with
# opportunistic TLS and no login must not carry a job that wants the host verified, or a
# login, to the same host:port.
_Cached = tuple[str, int, smtp_client.Security]


class Unreachable(aiosmtplib.SMTPConnectError):
    """Not tried: connecting to this host timed out a moment ago. A connection error
    still, so the worker defers and an MX route moves on to the next host."""


@dataclass
class _Idle:
    smtp: aiosmtplib.SMTP
    uses: int
    since: float


class ConnectionPool:
    def __init__(
        self, *, per_destination: int = 20, max_uses: int = 100, idle_s: float = 5.0,
        timeouts: Timeouts = RFC_5321, unreachable_s: float = 60.0,
        source_addresses: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.per_destination = per_destination
        self.source_addresses = source_addresses  # to connect from: see smtp_client.connect
        self.unreachable_s = unreachable_s
        self._unreachable: dict[Destination, tuple[float, str]] = {}  # since, why
        self.max_uses = max_uses
        self.idle_s = idle_s
        self.timeouts = timeouts
        self._idle: dict[_Cached, list[_Idle]] = {}
        self._limits: dict[Destination, asyncio.Semaphore] = {}
        self._closing: set[asyncio.Task[None]] = set()  # QUITs said in the background
        self.opened = 0  # connections opened, for metrics and tests
        self.plaintext = 0  # of those, in plaintext where STARTTLS was offered: a metric

    async def deliver(self, job: Outbound, fence: Fence) -> Transaction:
        """One transaction to job.host:job.port, on a cached connection when one is
        ready. Raises like smtp_client.transact."""
        dest, key = (job.host, job.port), (job.host, job.port, job.security)
        limit = self._limits.setdefault(dest, asyncio.Semaphore(self.per_destination))
        async with limit:
            cached = self._take(key)
            if cached is not None:
                try:
                    return await self._run(key, cached, job, fence)
                except StaleConnection:
                    pass  # closed while idle: nothing was sent, open a fresh one
            smtp = await self._connect(job)
            self.opened += 1
            self.plaintext += smtp_client.starttls_declined(smtp)
            return await self._run(key, _Idle(smtp, 0, 0.0), job, fence)

    async def _connect(self, job: Outbound) -> aiosmtplib.SMTP:
        """A new connection, unless connecting to this host timed out (no TCP
        connection, or no greeting) less than unreachable_s ago: Unreachable then, at
        once. A host that drops SYNs costs the connect timeout, 30 s, per attempt:
        without this every message for it paid that, holding a slot, and a dead first
        MX put that wait before each message's turn at the next MX. Postfix's qmgr
        suspends a dead destination likewise. A refused connection costs a round trip,
        and a host that answers, if only with a 421, is alive: neither is counted, so
        mail after a smarthost's restart is not held back."""
        dest = (job.host, job.port)
        if (mark := self._unreachable.get(dest)) is not None:
            ago = time.monotonic() - mark[0]
            if ago < self.unreachable_s:
                raise Unreachable(f"not tried: timed out {ago:.0f} s ago: {mark[1]}")
            del self._unreachable[dest]
        try:
            smtp = await smtp_client.connect(
                job.host, job.port, job.helo, self.timeouts, job.security,
                source=self.source_addresses,
            )  # fmt: skip
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            if dest not in self._unreachable and self.unreachable_s > 0:
                log.warning("%s:%d timed out (%s): deliveries to it are deferred without "
                            "trying it for %g s", *dest, exc, self.unreachable_s)  # fmt: skip
            self._unreachable[dest] = (time.monotonic(), str(exc))
            raise
        self._unreachable.pop(dest, None)
        return smtp

    def untried(self) -> int:
        """Hosts left untried now, their connection having timed out: a metric."""
        now = time.monotonic()
        return sum(now - since < self.unreachable_s for since, _ in self._unreachable.values())

    async def _run(
        self, key: _Cached, conn: _Idle, job: Outbound,
        fence: Fence,
    ) -> Transaction:  # fmt: skip
        reused = conn.uses > 0
        try:
            t = await smtp_client.transact(
                conn.smtp, job, fence, reused=reused, timeouts=self.timeouts
            )
        except BaseException:
            conn.smtp.close()
            raise
        conn.uses += 1
        if t.clean and conn.uses < self.max_uses:
            conn.since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
        else:
            await self._close(conn.smtp, polite=t.clean)
        return t

    def _take(self, key: _Cached) -> _Idle | None:
        idle = self._idle.get(key, [])
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.smtp.is_connected and time.monotonic() - conn.since < self.idle_s:
                return conn
            conn.smtp.close()
        return None

    def prune(self) -> None:
        """Let go of connections idle for longer than idle_s, each saying QUIT in the
        background. Awaited one by one, a host that stopped answering (its network
        gone, no reset) held up the worker's loop, and every new delivery of the
        node, for the QUIT's timeout once per idle connection to it. Forgets the hosts
        left untried whose time is up: MX addresses come and go, and each once timed
        out would stay for good."""
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if c.smtp.is_connected and now - c.since < self.idle_s]
            self._idle[key] = keep
            for conn in idle:
                if conn not in keep:
                    self._close_later(conn.smtp)
        marks = self._unreachable.items()
        self._unreachable = {d: m for d, m in marks if now - m[0] < self.unreachable_s}

    def _close_later(self, smtp: aiosmtplib.SMTP) -> None:
        close = self._close(smtp, polite=smtp.is_connected)
        task = asyncio.get_running_loop().create_task(close)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Say QUIT on every idle connection, all at once: one by one, at shutdown, a
        silent host cost the QUIT's timeout per connection, past systemd's stop timeout."""
        idle, self._idle = self._idle, {}
        polite = (self._close(c.smtp, polite=True) for conns in idle.values() for c in conns)
        await asyncio.gather(*polite, *self._closing)

    async def _close(self, smtp: aiosmtplib.SMTP, *, polite: bool) -> None:
        if polite:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await smtp.quit(timeout=5)
        smtp.close()
