"""One smtpcluster node: Raft, the spool, the SMTP front ends and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from mailqueue import codec, heap
from mailqueue.bodies import DiskBodies
from mailqueue.commands import FORMAT, Accept
from mailqueue.machine import SpoolMachine, decode_result
from mailqueue.policy import Policy
from mailqueue.spool import Spool
from raft.core import RaftError, Role
from raft.node import LeaderChanged, NodeConfig, RaftNode
from raft.transport import Address
from smtpcluster import admin, config, logs
from smtpcluster.auth import Users, UsersFileError
from smtpcluster.clock import ClusterClock
from smtpcluster.config import Config, DeliverySection, SmtpSection
from smtpcluster.diskspace import DiskReserve
from smtpcluster.dkim import Signer
from smtpcluster.frontend import AcceptRefused, Handler, smtp_factory
from smtpcluster.metrics import Metrics
from smtpcluster.route import Router
from smtpcluster.scheduler import Scheduler
from smtpcluster.sdnotify import Notifier
from smtpcluster.worker import DeliverySecurity, Worker, unreachable_window_s

log = logging.getLogger(__name__)
TICK_MS = 10.0
ATTEMPT_S = 3.0  # one proposal attempt; a stuck one is retried with the same id
ATTEMPT_MAX_S = 60.0  # each retry of an Accept waits twice as long as the one before
# How long a client may wait for an unsettled Accept: under the 10 minutes RFC 5321
# gives a client waiting for the reply to its final dot.
ACCEPT_HARD_CAP_S = 540.0
DRAIN_S = 12.0  # SIGTERM: how long open sessions and deliveries in hand may take
READY_WAIT_S = 30.0  # under systemd: how long start-up waits for a leader before READY
HEAP_TEND_S = 1.0  # how soon after a slow full collection its survivors are frozen
# A client on port 465 that connects and never completes the TLS handshake is dropped
# after this long; until then it holds a descriptor and is counted by no session limit.
TLS_HANDSHAKE_S = 10.0
MEMBERSHIP_CHECK_S = 1.0  # how soon after its removal applies a node stops taking mail


class CannotStart(Exception):
    """The node cannot start here as configured: a port taken, a data_dir it may not
    use. The message names the key."""


def _cannot(key: str, where: object, exc: OSError) -> CannotStart:
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    return CannotStart(f"{key}: {where}: {why}")


def raft_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "raft")


class Node:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        data = cfg.node.data_dir
        self.machine = SpoolMachine(DiskBodies(os.path.join(data, "bodies")), FORMAT)
        ticks = max(2, round(cfg.cluster.election_ms / TICK_MS))
        heartbeat = max(1, min(ticks - 1, round(cfg.cluster.heartbeat_ms / TICK_MS)))
        self.raft = RaftNode(
            NodeConfig(
                id=cfg.node.id,
                listen=cfg.cluster.listen,
                peers=cfg.cluster.peers,
                data_dir=raft_dir(data),
                key=cfg.cluster.key,
                tick_ms=TICK_MS,
                election_ticks=ticks,
                heartbeat_ticks=heartbeat,
                join=cfg.cluster.join,
                format=FORMAT,
            ),
            self.machine,
        )
        users = Users.load(cfg.smtp.users_file) if cfg.smtp.users_file else None
        self.disk = DiskReserve(data)
        self.handler = Handler(cfg.smtp, cfg.node.id, self.submit, users, self.disk)
        self.handler.signer = Signer(cfg.dkim.keys)
        self.tls = tls_context(cfg.smtp)
        self.policy = delivery_policy(cfg.delivery)
        self.router = Router(cfg.delivery.nameservers, cfg.delivery.mx_port)
        self.clock = ClusterClock(lambda: self.machine.spool.now)
        self.scheduler = Scheduler(self)
        self.worker = Worker(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[asyncio.Server] = []
        self.fate_unknown = 0  # Accepts answered 451 while perhaps in a log (should be 0)
        self.frontends_up = False
        self.collections = heap.FullCollections()
        self.metrics = Metrics(self)  # last: its registry reads the node's state at once
        self.raft.on_fsync = self.metrics.fsync_seconds.observe

    @property
    def spool(self) -> Spool:
        return self.machine.spool

    async def submit(
        self, cmd: Accept, timeout: float, hard_cap: float = ACCEPT_HARD_CAP_S
    ) -> bool:
        """Replicate an Accept; True once it is applied.

        The Accept is idempotent by its message id, so when an attempt's fate is unknown
        (its leader died, the answer never came) proposing it again settles the question:
        either way the message is in the spool exactly once. Before it does, the spool is
        asked whether an earlier attempt was applied after all. TimeoutError (answered 451)
        comes only when no attempt can be in any log: after `timeout` if every attempt
        was definitely refused or never reached a leader; otherwise the client waits, up
        to `hard_cap`, for a leader to settle it (DESIGN: a 4xx means "not accepted").
        AcceptRefused: the spool applied it and refused it (it is not queued).
        """
        began = time.monotonic()
        at = self.spool.stamp(cmd.accepted_by, cmd.at)
        # A copy only when the clock stepped back: this runs for every message.
        data = codec.encode(cmd if at == cmd.at else dataclasses.replace(cmd, at=at))
        # The encoded copy is the one kept for the attempts: the Accept, and the body it
        # holds, go now (the front end kept no other reference to them).
        message_id = cmd.message_id
        del cmd
        unsettled = False  # an attempt reached a leader and its fate is not known
        attempt_s = ATTEMPT_S
        while True:
            if unsettled and self._holds(message_id):
                return self._accepted(began)  # an earlier attempt committed after all
            waited = time.monotonic() - began
            limit = hard_cap if unsettled else timeout
            if waited >= limit:
                if unsettled:
                    self.fate_unknown += 1
                    log.error("message %s: fate unknown after %.0f s", message_id, waited)
                raise TimeoutError
            try:
                result = decode_result(
                    await self.raft.propose(data, timeout=min(limit - waited, attempt_s))
                )
            except LeaderChanged:
                unsettled = True  # as after a timeout, but known now: at once, not later
                continue
            except TimeoutError:
                unsettled = True  # proposing the same Accept again is always safe...
                # ...but each attempt adds a copy of the message to every log, and a
                # slow commit means a busy cluster: the next one waits twice as long.
                # Ten 24 MiB messages retried every 3 s kept a loaded cluster appending
                # copies of them for minutes, committing none.
                attempt_s = min(2 * attempt_s, ATTEMPT_MAX_S)
                continue
            except RaftError:
                # This attempt is in no log: lost, refused by a leader, or refused here
                # by a node that stopped leading as it flushed (NotLeader, which escaped
                # to aiosmtpd as a 5xx while an earlier attempt went on to commit).
                # Earlier attempts may be in a log: the loop settles that.
                await asyncio.sleep(0.05)
                continue
            if result.ok:
                return self._accepted(began)
            raise AcceptRefused(result.detail)

    def _holds(self, message_id: str) -> bool:
        """Whether an Accept of this message has been applied here (it may have been
        delivered and left since: its tombstone says so)."""
        spool = self.spool
        return message_id in spool.messages or message_id in spool.finished

    def _accepted(self, began: float) -> bool:
        self.metrics.accepted.inc()
        self.metrics.accept_seconds.observe(time.monotonic() - began)
        return True

    async def start(self) -> None:
        try:
            await self.raft.start()
        except OSError as exc:
            raise _cannot("cluster.listen", self.cfg.cluster.listen, exc) from None
        loop = asyncio.get_running_loop()
        smtp = self.cfg.smtp
        auth = {"authenticator": self.handler.authenticate, "auth_require_tls": True}
        # Port 25: STARTTLS offered when there is a certificate, AUTH only after it.
        relay = smtp_factory(self.handler, tls_context=self.tls, **auth)
        # Port 587: STARTTLS first, then AUTH, then mail.
        submission = smtp_factory(
            self.handler, tls_context=self.tls, require_starttls=True,
            auth_required=True, **auth,
        )  # fmt: skip
        listeners = [(relay, "smtp.relay_listen", a) for a in smtp.relay_listen]
        listeners += [(submission, "smtp.submission_listen", a) for a in smtp.submission_listen]
        for factory, key, addr in listeners:
            await self._listen(key, addr, factory)
        # Port 465: TLS from the first byte, then AUTH, then mail (RFC 8314).
        submissions = smtp_factory(
            self.handler, implicit_tls=True, auth_required=True, **auth
        )  # fmt: skip
        for addr in smtp.submissions_listen:
            await self._listen("smtp.submissions_listen", addr, submissions, ssl=self.tls,
                               ssl_handshake_timeout=TLS_HANDSHAKE_S)  # fmt: skip
        self.frontends_up = True
        try:
            await admin.start(self)
        except OSError as exc:
            raise _cannot("admin.listen", self.cfg.admin.listen, exc) from None
        self._tasks = [loop.create_task(self.scheduler.run()), loop.create_task(self.worker.run())]
        self._tasks.append(loop.create_task(self._tend_heap()))
        self._tasks.append(loop.create_task(self._stop_taking_mail_once_removed()))

    async def _listen(
        self, key: str, addr: Address, factory: Callable[[], asyncio.Protocol], **kw: Any
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                factory, addr.host, addr.port, reuse_address=True, **kw
            )
        except OSError as exc:
            raise _cannot(key, addr, exc) from None
        self._servers.append(server)

    async def _tend_heap(self) -> None:
        with self.collections:
            while True:
                await asyncio.sleep(HEAP_TEND_S)
                self.collections.tend()

    async def _stop_taking_mail_once_removed(self) -> None:
        """A node removed from the cluster (`cluster leave`) closes its SMTP ports, as a
        removed etcd member stops: no log reaches it any more, so it would relay through
        whichever leader it last knew, and after the next election answer every message
        451 at the end of its timeout. Closed, it sends clients to the members at once.
        It learns of its removal from the leader (RaftNode.removed), or by applying it
        when it was the leader. A node that has not yet joined is left alone: it was
        never a member."""
        me, raft = self.cfg.node.id, self.raft

        def in_conf() -> bool:
            return raft.core.log.conf_at(raft.sm_applied).is_member(me)

        while not in_conf() and not raft.removed:
            await asyncio.sleep(MEMBERSHIP_CHECK_S)
        while in_conf() and not raft.removed:
            await asyncio.sleep(MEMBERSHIP_CHECK_S)
        log.warning("node %s was removed from the cluster: it takes no more mail; stop it",
                    me)  # fmt: skip
        await self._close_frontends(DRAIN_S / 3)
        # Its spool no longer changes, so what was assigned here stays assigned in its
        # eyes: the worker would start each again every poll, to be fenced off each time.
        await self.worker.drain(DRAIN_S)

    async def _close_frontends(self, timeout: float) -> None:
        """Listeners closed; open sessions may finish their mail, then get 421."""
        self.frontends_up = False
        for server in self._servers:
            server.close()
        self._servers = []
        await self._wait(lambda: not self.handler.sessions, timeout)
        # Together: one waiting for its message's fate does not hold up the others.
        await asyncio.gather(*(s.shut_down() for s in list(self.handler.sessions)))

    def reload(self) -> bool:
        """SIGHUP: re-read the config file and apply, to sessions that start from now
        on, its [smtp] policy and limits (relay_networks, relay_domains, sizes,
        timeouts), users_file, TLS certificate, [dkim] keys and [log]; open sessions go
        on. Of [delivery], everything but the two concurrency limits: routes, smarthost
        and their TLS and login, source addresses, nameservers, the retry schedule, the
        queue lifetime, for the deliveries that start from now on. What cannot change while running
        (listeners, peers, concurrency, admin) is logged as waiting for a restart. An
        invalid file is refused, logged, and changes nothing."""
        try:
            new = config.load(self.cfg.path)
            users = Users.load(new.smtp.users_file) if new.smtp.users_file else None
            security = DeliverySecurity.of(new.delivery)
            self._reload_tls(new.smtp)
        except (config.ConfigError, UsersFileError, OSError, ssl.SSLError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return False
        for what in restart_only_changes(self.cfg, new):
            log.warning("reload: %s changed: it takes effect at the next restart", what)
        old = self.cfg.smtp
        smtp = dataclasses.replace(
            new.smtp, relay_listen=old.relay_listen, submission_listen=old.submission_listen,
            submissions_listen=old.submissions_listen,
        )  # fmt: skip
        delivery = dataclasses.replace(
            new.delivery, concurrency=self.cfg.delivery.concurrency,
            destination_concurrency=self.cfg.delivery.destination_concurrency,
        )  # fmt: skip
        self.cfg = dataclasses.replace(
            self.cfg, smtp=smtp, delivery=delivery, log=new.log, dkim=new.dkim
        )  # fmt: skip
        self.handler.reconfigure(smtp, users)
        self.handler.signer = Signer(new.dkim.keys)
        self.policy = delivery_policy(delivery)
        self.router = Router(delivery.nameservers, delivery.mx_port)
        self.worker.security = security
        self.worker.pool.unreachable_s = unreachable_window_s(self.policy)
        self.worker.pool.source_addresses = delivery.source_addresses
        logs.setup(new.log.level, new.log.format)
        log.info("reloaded %s", self.cfg.path)
        return True

    def _reload_tls(self, smtp: SmtpSection) -> None:
        """The listeners keep their SSLContext: loading the new pair into it serves
        it to every handshake from now on. Checked on a scratch context first, so a
        bad pair leaves the running one alone."""
        if self.tls is None or not (smtp.tls_cert and smtp.tls_key):
            return
        tls_context(smtp)
        self.tls.load_cert_chain(smtp.tls_cert, smtp.tls_key)

    async def wait_joined(self, timeout: float) -> bool:
        """True once this node knows a leader of its cluster."""
        await self._wait(lambda: self.raft.core.lead is not None, timeout)
        return self.raft.core.lead is not None

    async def drain(self, timeout: float = DRAIN_S) -> None:
        """SIGTERM: stop accepting (listeners closed; open sessions may finish their
        mail, then get 421), hand leadership to another voter, finish or give back
        deliveries. Bounded by about `timeout` plus a few seconds."""
        began = time.monotonic()
        await self._close_frontends(timeout / 3)
        await self._hand_over_leadership()
        left = max(1.0, timeout - (time.monotonic() - began))
        await self.worker.drain(left)
        log.info("node %s drained in %.1f s", self.cfg.node.id, time.monotonic() - began)

    async def _hand_over_leadership(self) -> None:
        raft = self.raft
        if raft.core.role is not Role.LEADER:
            return
        others = [m for m in await raft.members() if m["id"] != self.cfg.node.id]
        voters = [m for m in others if m["role"] == "follower" and m["reachable"]]
        if not voters:
            return
        target = min(voters, key=lambda m: m["lag"])["id"]
        try:
            raft.transfer_leader(target)
        except RaftError as exc:
            log.warning("drain: leadership transfer to %s refused: %s", target, exc)
            return
        await self._wait(lambda: raft.core.role is not Role.LEADER, 3.0)

    @staticmethod
    async def _wait(done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.frontends_up = False
        for t in self._tasks + list(self.worker.tasks):
            t.cancel()
        for s in self._servers:
            s.close()
        await admin.stop(self)
        await self.raft.stop()


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _status(node: Node, joined: bool) -> str:
    lead = node.raft.core.lead
    return f"serving; leader {lead}" if joined else "serving; no leader yet (no quorum)"


def _reload(node: Node, notify: Notifier) -> None:
    notify.send("RELOADING=1")
    node.reload()
    notify.send("READY=1", f"STATUS={_status(node, node.raft.core.lead is not None)}")


def tls_context(smtp: SmtpSection) -> ssl.SSLContext | None:
    if not (smtp.tls_cert and smtp.tls_key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(smtp.tls_cert, smtp.tls_key)
    return ctx


def delivery_policy(delivery: DeliverySection) -> Policy:
    """The scheduling policy the [delivery] section makes: at start and on reload."""
    return Policy(
        retry_schedule_ms=delivery.retry_schedule_ms,
        max_lifetime_ms=delivery.max_queue_lifetime_ms,
        smarthost=delivery.smarthost,
        routes=delivery.routes,
    )


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """What differs between two configs that a reload cannot apply."""
    out = [name for name in ("node", "cluster", "admin")
           if getattr(old, name) != getattr(new, name)]  # fmt: skip
    for key in ("concurrency", "destination_concurrency"):
        if getattr(old.delivery, key) != getattr(new.delivery, key):
            out.append(f"delivery.{key}")
    for key in ("relay_listen", "submission_listen", "submissions_listen"):
        if getattr(old.smtp, key) != getattr(new.smtp, key):
            out.append(f"smtp.{key}")
    if bool(old.smtp.tls_cert) != bool(new.smtp.tls_cert):
        out.append("smtp.tls_cert (STARTTLS on or off)")
    return out


async def serve(cfg: Config) -> None:
    try:
        node = Node(cfg)
    except OSError as exc:
        if not str(exc.filename or "").startswith(cfg.node.data_dir):
            raise
        raise _cannot("node.data_dir", exc.filename, exc) from None
    heap.settle()  # what start-up loaded (code, config, the restored spool) lives for good
    notify = Notifier()
    loop = asyncio.get_running_loop()
    watchdog = loop.create_task(notify.watchdog())
    await node.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, node, notify)
    log.info("node %s serving SMTP on %s", cfg.node.id, [str(a) for a in cfg.smtp.relay_listen])
    print(f"ready {cfg.node.id}", flush=True)
    # READY=1 once this node is part of a working cluster, or after READY_WAIT_S
    # without one: the first node of a new cluster must start before its peers.
    # A SIGTERM or a failure meanwhile ends the wait: a node started while its cluster
    # had no quorum took up to READY_WAIT_S to stop (systemctl stop, restart).
    await _first(node.wait_joined(READY_WAIT_S), stop.wait(), node.raft.failed.wait())
    joined = node.raft.core.lead is not None
    notify.send("READY=1", f"STATUS={_status(node, joined)}")
    await _first(stop.wait(), node.raft.failed.wait())
    if node.raft.failure is not None:
        # Draining needs consensus, which this node no longer has: stop, and exit with
        # an error so that systemd restarts it (Restart=on-failure).
        notify.send("STOPPING=1", "STATUS=failed")
        watchdog.cancel()
        with contextlib.suppress(Exception):
            await node.stop()
        raise node.raft.failure
    notify.send("STOPPING=1", "STATUS=draining")
    log.info("node %s: signal received, draining", cfg.node.id)
    try:
        await node.drain()  # the watchdog keeps pinging: a wedged drain is killed too
    finally:
        watchdog.cancel()
        with contextlib.suppress(Exception):
            await node.stop()
