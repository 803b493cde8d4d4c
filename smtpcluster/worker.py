"""The delivery worker: every node delivers what the leader assigned to it.

For each (message, attempt) assigned here it runs one SMTP transaction, fenced at the
final dot by BeginDot, then commits the Outcome (retried until applied: it is
idempotent). Destinations come from the smarthost, or from MX records in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import aiosmtplib

from mailqueue import policy
from mailqueue.commands import (
    BeginDot,
    Command,
    NodeDown,
    Outcome,
    OutcomeKind,
    RcptResult,
    UncertainPolicy,
)
from mailqueue.spool import Message, RcptState
from raft.core import RaftError
from raft.transport import Address
from smtpcluster import logs, smtp_client
from smtpcluster.batcher import Batcher
from smtpcluster.config import DeliverySection
from smtpcluster.connections import ConnectionPool
from smtpcluster.route import RouteTemporaryFailure, Undeliverable

if TYPE_CHECKING:
    from smtpcluster.node import Node

log = logging.getLogger(__name__)
POLL_S = 0.05
PROPOSE_TIMEOUT_S = 10.0


# An SMTP transaction: message, attempt, destination, chunk (see Worker._transactions).
Job = tuple[str, int, str, int]

OUTCOME_LABELS = {
    OutcomeKind.DELIVERED: "delivered",
    OutcomeKind.DEFERRED: "deferred",
    OutcomeKind.FAILED: "bounced",
    OutcomeKind.UNCERTAIN: "uncertain",
}


def _kind(code: int) -> OutcomeKind:
    if 200 <= code < 300:
        return OutcomeKind.DELIVERED
    return OutcomeKind.FAILED if code >= 500 else OutcomeKind.DEFERRED


@dataclass(frozen=True, slots=True)
class DeliverySecurity:
    """How to secure connections to the smarthost and to each route's host: built at
    start and on each reload (loading a CA file can fail: a reload is refused then)."""

    smarthost: smtp_client.Security
    routes: dict[str, smtp_client.Security]

    @classmethod
    def of(cls, delivery: DeliverySection) -> DeliverySecurity:
        smarthost = smtp_client.Security(
            delivery.smarthost_tls, delivery.smarthost_ca_file, delivery.smarthost_login,
            delivery.smarthost_tls_wrapper,
        ).verified()  # fmt: skip
        routes = {
            key: smtp_client.Security(level, delivery.route_ca_file).verified()
            for key, level in delivery.route_tls.items()
        }
        return cls(smarthost, routes)


def unreachable_window_s(schedule: policy.Policy) -> float:
    """How long this node leaves a host it could not reach untried (see
    ConnectionPool._connect): never past the schedule's first retry, which is as long
    as the operator chose to leave mail waiting, and at most a minute."""
    return min(schedule.retry_schedule_ms[0] / 1000, 60.0)


class Worker:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.me = node.cfg.node.id
        self.inflight: set[Job] = set()  # being delivered: one SMTP transaction each
        # The recipients those transactions carry. A reload that changes routes or
        # destination_recipient_limit groups recipients anew: a transaction of the new
        # grouping must not take one still in flight in an old one, whose BeginDot
        # (same attempt) the spool would accept twice, and the mail would go out twice.
        self.sending: set[tuple[str, int, int]] = set()  # (message, attempt, recipient)
        delivery = node.cfg.delivery
        self.slots = asyncio.Semaphore(delivery.concurrency)
        self.pool = ConnectionPool(
            per_destination=delivery.destination_concurrency,
            unreachable_s=unreachable_window_s(node.policy),
            source_addresses=delivery.source_addresses,
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.bugs = 0  # polls and attempts that raised unexpectedly: a metric
        self.batcher = Batcher(node.raft.propose, PROPOSE_TIMEOUT_S)
        self.security = DeliverySecurity.of(delivery)

    async def run(self) -> None:
        # A previous run of this node may have died between BeginDot and Outcome, and if
        # it came back quickly the leader never saw it down: declare it down ourselves,
        # before taking any new work (so this cannot touch an attempt of ours).
        on_uncertain = UncertainPolicy[self.node.cfg.delivery.on_uncertain.upper()]
        await self._commit(NodeDown(_now(), self.me, on_uncertain))
        try:
            while True:
                try:
                    self.dispatch()
                except Exception:  # a bug: said, and the next poll tries again
                    log.exception("delivery dispatch failed")
                    self.bugs += 1
                await asyncio.sleep(POLL_S)
                self.pool.prune()
        finally:
            await self.pool.close()

    async def drain(self, timeout: float) -> None:
        """SIGTERM: start nothing new, let the deliveries in hand finish (up to
        `timeout`), then give back everything still assigned here by declaring this
        node down: the leader reassigns it at once instead of after the down-detection
        time. A delivery cut off after its BeginDot becomes uncertain, as it must."""
        self.draining = True
        deadline = time.monotonic() + timeout
        core = self.node.raft.core
        # Without a leader nothing in hand can finish (its Outcome cannot commit): when
        # the whole cluster is being stopped, the last node must not wait for nothing.
        while self.tasks and time.monotonic() < deadline and core.lead is not None:
            await asyncio.wait(list(self.tasks), timeout=0.1)
        for task in list(self.tasks):
            task.cancel()
        on_uncertain = UncertainPolicy[self.node.cfg.delivery.on_uncertain.upper()]
        try:
            if core.lead is None:
                raise TimeoutError
            # Only a shortcut (the leader notices the silence anyway): kept short, as
            # when a whole cluster stops the last node has no quorum to commit it.
            async with asyncio.timeout(1):
                await self._commit(NodeDown(_now(), self.me, on_uncertain))
        except TimeoutError:
            log.warning("drain: could not hand back this node's assignments; the leader "
                        "will, after the down-detection time")  # fmt: skip
        await self.pool.close()

    def dispatch(self) -> None:
        if self.draining:
            return
        spool = self.node.machine.spool
        for mid in spool.index.held(self.me):  # not the whole spool: see mailqueue.index
            msg = spool.messages[mid]
            for job, ks in self._transactions(msg).items():
                if job in self.inflight:  # each poll, for every transaction under way
                    continue
                carried = {(mid, job[1], k) for k in ks}
                if not carried.isdisjoint(self.sending):
                    continue
                self.inflight.add(job)
                self.sending |= carried
                task = asyncio.get_running_loop().create_task(self.deliver(job, ks))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def _transactions(self, msg: Message) -> dict[Job, list[int]]:
        """This node's assigned recipients of `msg`, by the SMTP transaction that will
        carry them: one per attempt, destination (recipients assigned in the same pass
        share an attempt, and each domain has its own exchanges) and chunk of at most
        destination_recipient_limit. A recipient's chunk is its rank among all the
        message's recipients for that destination, so it never moves to another chunk
        while one is in flight: two tasks must never hold the same recipient. (A reload
        of the routes or the limit can regroup them all the same: see `sending`.)"""
        limit = self.node.cfg.delivery.destination_recipient_limit
        one_chunk = len(msg.rcpts) <= limit  # the usual case: no ranks to count
        ranks: collections.Counter[str] = collections.Counter()
        groups: dict[Job, list[int]] = {}
        for k, r in enumerate(msg.rcpts):
            mine = r.state is RcptState.ASSIGNED and r.node == self.me
            if one_chunk and not mine:
                continue  # this runs every poll for every message held here
            dest = policy.destination(self.node.policy, r.address)
            chunk = 0 if one_chunk else ranks[dest] // limit
            ranks[dest] += 1
            if mine:
                groups.setdefault((msg.id, r.attempt, dest, chunk), []).append(k)
        return groups

    async def deliver(self, job: Job, ks: list[int]) -> None:
        mid, attempt, _, _ = job
        fenced: list[bool] = []  # the fence passed: the final dot may have gone out
        try:
            async with self.slots:
                began = time.monotonic()
                results, remote = await self._attempt(mid, attempt, ks, fenced)
            results = [replace(r, reply=smtp_client.clean_reply(r.reply)) for r in results]
            if results:
                self._record(mid, attempt, results, remote, time.monotonic() - began)
                await self._commit(Outcome(_now(), mid, self.me, attempt, tuple(results)))
        except Exception as exc:
            log.exception("delivery of %s attempt %d failed unexpectedly", mid, attempt)
            self.bugs += 1
            await self._failed(mid, attempt, ks, exc, dot_may_have_gone=bool(fenced))
        finally:
            self.inflight.discard(job)
            self.sending -= {(mid, attempt, k) for k in ks}

    async def _failed(
        self, mid: str, attempt: int, ks: list[int], exc: Exception, *, dot_may_have_gone: bool
    ) -> None:
        """Settle an attempt that failed unexpectedly (a bug, or a recipient the client
        library will not send): left assigned, it was tried again at every poll, 20
        times a second, a traceback each, for as long as the message lived. Deferred, it
        waits its turn in the retry schedule and expires as any other would."""
        if dot_may_have_gone:
            results = [self._crossed_dot(mid, k) for k in ks]
        else:
            results = self._defer(mid, ks, f"4.3.0 internal error: {type(exc).__name__}")
        await self._commit(Outcome(_now(), mid, self.me, attempt, tuple(results)))

    def _record(
        self, mid: str, attempt: int, results: list[RcptResult], remote: str, took: float
    ) -> None:
        metrics = self.node.metrics
        metrics.delivery_seconds.observe(took)
        msg = self.node.machine.spool.messages.get(mid)
        for r in results:
            metrics.outcomes.labels(OUTCOME_LABELS[r.kind]).inc()
            logs.event(
                log, "delivery", id=mid, attempt=attempt,
                rcpt=f"<{msg.rcpts[r.rcpt].address}>" if msg else "?",
                outcome=OUTCOME_LABELS[r.kind], remote=remote, reply=r.reply,
                took=f"{took:.3f}s",
            )  # fmt: skip

    async def _attempt(
        self, mid: str, attempt: int, ks: list[int], fenced: list[bool]
    ) -> tuple[list[RcptResult], str]:
        """The recipients' results, and the last host:port tried ("" for none). Appends
        to `fenced` once the fence has passed, before the final dot is sent."""
        spool = self.node.machine.spool
        msg = spool.messages.get(mid)
        if msg is None:
            return [], ""
        try:
            targets, security = await self._targets(msg.rcpts[ks[0]].address)
        except Undeliverable as exc:
            return [RcptResult(k, OutcomeKind.FAILED, str(exc)) for k in ks], ""
        except RouteTemporaryFailure as exc:
            return self._defer(mid, ks, str(exc)), ""
        rcpts = {k: msg.rcpts[k].address for k in ks}
        body = spool.bodies.get(mid)

        refused: list[bool] = []  # the spool itself said no: the attempt is not ours

        async def fence(accepted: list[int]) -> bool:
            ok, definite = await self._begin_dot(mid, accepted, attempt)
            if ok:
                fenced.append(True)
            elif definite:
                refused.append(True)
            return ok

        error = "4.4.1 no exchange to try"
        for target in targets:  # in MX order: the next one when one cannot be reached
            job = smtp_client.Outbound(
                target.host, target.port, self.node.cfg.smtp.hostname, msg.sender, rcpts, body,
                security,
            )  # fmt: skip
            try:
                t = await self.pool.deliver(job, fence)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                error = f"4.4.1 {target}: {type(exc).__name__}: {exc}"
                continue
            if t.fenced_off:
                # The dot was withheld and the connection dropped: the remote discards
                # the message. If the spool refused the BeginDot, the attempt belongs to
                # nobody here: nothing to report. If its fate is unknown (the leader
                # died, no quorum) it may have committed all the same, leaving the
                # recipients "sending" on this live node, which nobody would ever
                # settle: defer them, which is true either way.
                log.info("fenced off: %s attempt %d, final dot withheld", mid, attempt)
                if refused:
                    return [], str(target)
                why = "4.4.0 final dot withheld: fence not confirmed"
                return self._defer(mid, ks, why), str(target)
            return self._results(mid, ks, t), str(target)
        return self._defer(mid, ks, error), str(targets[-1]) if targets else ""

    async def _targets(self, address: str) -> tuple[list[Address], smtp_client.Security]:
        """The hosts to try, in order, and how to secure the connections: a route's
        host as its route_tls says, the smarthost as its own settings say, MX hosts with
        opportunistic TLS."""
        delivery = self.node.cfg.delivery
        domain = address.rpartition("@")[2].lower()
        if key := policy.route_key(delivery.routes, domain):
            security = self.security.routes.get(key, smtp_client.OPPORTUNISTIC)
            return [Address.parse(delivery.routes[key])], security
        if delivery.smarthost:
            return [Address.parse(delivery.smarthost)], self.security.smarthost
        return await self.node.router.exchanges(domain), smtp_client.OPPORTUNISTIC

    def _results(self, mid: str, ks: list[int], t: smtp_client.Transaction) -> list[RcptResult]:
        out = []
        for k in ks:
            code, text = t.rcpt_replies.get(k, (0, ""))
            if 200 <= code < 300 and t.final is None and t.dot_sent:
                out.append(self._crossed_dot(mid, k))
                continue
            if 200 <= code < 300:
                code, text = t.final or (451, "4.4.2 connection lost before the final dot")
            kind = _kind(code)
            retry = self._retry_at(mid, k) if kind is OutcomeKind.DEFERRED else 0
            out.append(RcptResult(k, kind, f"{code} {text}", retry))
        return out

    def _crossed_dot(self, mid: str, k: int) -> RcptResult:
        """The dot went out, its reply never came: the remote may have the message
        (RFC 1047). Uncertain, then queued again or held, as on_uncertain says."""
        why = "4.4.2 connection lost after the final dot: the remote may have the message"
        redeliver = self.node.cfg.delivery.on_uncertain == "redeliver"
        return RcptResult(k, OutcomeKind.UNCERTAIN, why, self._retry_at(mid, k) if redeliver else 0)

    def _defer(self, mid: str, ks: list[int], why: str) -> list[RcptResult]:
        return [RcptResult(k, OutcomeKind.DEFERRED, why, self._retry_at(mid, k)) for k in ks]

    def _retry_at(self, mid: str, k: int) -> int:
        msg = self.node.machine.spool.messages.get(mid)
        attempts = msg.rcpts[k].attempts + 1 if msg else 1
        # By the time the scheduler counts in: from a clock behind it, the retry would
        # come early by the difference.
        return policy.next_attempt(self.node.policy, attempts, self.node.clock.now())

    async def _begin_dot(self, mid: str, ks: list[int], attempt: int) -> tuple[bool, bool]:
        """(applied with success, the answer is definite). No quorum or a lost leader
        is not definite: the BeginDot may still commit."""
        cmd = BeginDot(_now(), mid, tuple(ks), self.me, attempt)
        try:
            applied = await self.batcher.submit(cmd)
        except (RaftError, TimeoutError):
            return False, False  # no quorum to fence with: do not send the dot
        return applied.ok, True

    async def _commit(self, cmd: Command) -> None:
        """Propose until applied: an Outcome must not be lost, and it is idempotent."""
        delay = 0.05
        while True:
            try:
                await self.batcher.submit(cmd)
                return
            except (RaftError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _now() -> int:
    return int(time.time() * 1000)
