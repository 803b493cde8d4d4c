"""The outside of the cluster: clients that send uniquely addressed messages to random
nodes and record each reply, and a sink that counts every final dot it answers.

A message has two recipients named by its id: m<N>@dest.example, which the cluster
sends to its smarthost, and m<N>@routed.example, which a route sends to another port
(ROUTED): two destinations, so two transactions per message. A client that cannot connect
tries the next node, as an MTA tries its next MX, and offers the same message again
later if none answers; a reply is recorded as 250, refused (4xx/5xx), or unknown (the
connection died with the transaction open: either fate is allowed).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import smtplib
import threading
import time
from collections.abc import Callable

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.integration.sinks import Pipelining

ROUTED = "routed.example"
SENDER = "load@example.org"
GREETING_S = 2.0
TRANSACTION_S = 60.0
LARGE_BYTES = 3 << 20  # --large-every: over the 2 MiB a frame carries whole


class CountingSink(Pipelining):
    """aiosmtpd handler: how many times each recipient's message reached its final
    dot. It answers after `delay_s`, as a remote MTA does: deliveries stay in flight
    long enough for faults to catch them between the dot and the recorded outcome. It
    offers PIPELINING, as remote MTAs do."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.delay_s = delay_s

    def seen(self) -> collections.Counter[str]:
        """A copy of the counts, taken while no delivery changes them (the sink's
        thread does, all along, while the checker reads)."""
        with self.lock:
            return self.counts.copy()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.counts.update(envelope.rcpt_tos)
        await asyncio.sleep(self.delay_s)
        return "250 2.0.0 Ok: counted"


class Load:
    def __init__(
        self, nodes: Callable[[], list[tuple[str, int]]], seed: int, sessions: int, rate: float,
        large_every: int = 0,
    ) -> None:  # fmt: skip
        self.nodes = nodes  # the SMTP addresses of the nodes a client may try, now
        self.seed, self.sessions, self.rate = seed, sessions, rate
        self.large_every = large_every  # every so many messages is LARGE_BYTES; 0: none
        self.accepted: dict[str, float] = {}  # rcpt -> when the 250 came
        self.refused: dict[str, int] = {}  # rcpt -> the reply code
        self.unknown: set[str] = set()
        self.sent = 0
        self.longest_wait = 0.0  # the slowest reply to a final dot a client waited for
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._next = iter(range(1 << 62))
        self.threads = [
            threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(sessions)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        """Stop the clients and wait for them; safe to call twice, or when the cluster
        failed to start and they never ran (that failure must not be masked)."""
        self.stop.set()
        for t in self.threads:
            if t.ident is not None:  # started
                t.join(120)

    def _client(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        pause = self.sessions / self.rate
        while not self.stop.is_set():
            with self.lock:
                n = next(self._next)
                self.sent += 1
            rcpts = [f"m{n}@dest.example", f"m{n}@{ROUTED}"]
            large = bool(self.large_every) and n % self.large_every == 0
            while not self.stop.is_set() and not self._offer(rng, rcpts, large):
                self.stop.wait(0.2)  # no node answered: offer it again, like a queued MTA
            self.stop.wait(pause * rng.uniform(0.5, 1.5))  # the offered rate; ends at stop

    def _offer(self, rng: random.Random, rcpts: list[str], large: bool) -> bool:
        """True once a node took the transaction (whatever its outcome)."""
        nodes = self.nodes()
        rng.shuffle(nodes)
        for host, port in nodes:
            # A node that does not greet within GREETING_S is passed over, as an MTA
            # passes over an MX that does not answer (a paused node still accepts TCP).
            s = smtplib.SMTP(timeout=GREETING_S)
            try:
                s.connect(host, port)
            except OSError:
                s.close()
                continue
            s.timeout = TRANSACTION_S
            if s.sock is not None:
                s.sock.settimeout(TRANSACTION_S)
            self._transact(s, rcpts, large)
            return True
        return False

    def _transact(self, s: smtplib.SMTP, rcpts: list[str], large: bool) -> None:
        began = time.monotonic()
        body = b"Subject: chaos\r\n\r\n" + rcpts[0].encode()
        if large:  # goes between the nodes in pieces (raft.transport.WHOLE_MAX)
            body += b"\r\n" + (b"x" * 1022 + b"\r\n") * (LARGE_BYTES // 1024)
        try:
            with s:
                refused = s.sendmail(SENDER, rcpts, body)
        except smtplib.SMTPRecipientsRefused as exc:
            for rcpt, (code, _) in exc.recipients.items():
                self._record(self.refused, [rcpt], code)
        except smtplib.SMTPResponseException as exc:
            self._record(self.refused, rcpts, exc.smtp_code)
        except (OSError, smtplib.SMTPException):
            with self.lock:
                self.unknown.update(rcpts)
        else:
            for rcpt, (code, _) in refused.items():  # RCPT refused, the others taken
                self._record(self.refused, [rcpt], code)
            self._record(self.accepted, [r for r in rcpts if r not in refused], time.monotonic())
        with self.lock:
            self.longest_wait = max(self.longest_wait, time.monotonic() - began)

    def _record(
        self, where: dict[str, float] | dict[str, int], rcpts: list[str], value: float
    ) -> None:
        with self.lock:
            for rcpt in rcpts:
                where[rcpt] = value  # type: ignore[assignment]

    def max_gap(self, since: float) -> float:
        """The longest time no client got a 250 (the unavailability clients saw)."""
        with self.lock:
            times = sorted(t for t in self.accepted.values() if t >= since)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)
