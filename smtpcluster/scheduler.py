"""The leader's scheduler: assigns due recipients, gives up on silent nodes, expires
old messages and sends DSNs. It only proposes; the spool decides."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from mailqueue import codec, policy
from mailqueue.commands import Command, Expire, NodeDown, SetFormat, UncertainPolicy
from raft import clocks
from raft.core import RaftError, Role
from smtpcluster import clock, upgrade

if TYPE_CHECKING:
    from smtpcluster.node import Node

log = logging.getLogger(__name__)
TICK_S = 0.1
BUSY_WINDOW_TICKS = 10  # how far back a node's front-end work counts: one second


class Scheduler:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.term = -1
        self.lead_since = 0.0
        self.format_held: list[str] = []  # what holds back a format raise, last said
        self.clock_ahead = False  # this node's clock ahead of the cluster's, last said
        self.bugs = 0  # ticks that raised: a metric
        # The spool's per-node acceptance counts at each of the last ticks.
        self.seen: collections.deque[collections.Counter[str]] = collections.deque(
            maxlen=BUSY_WINDOW_TICKS
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            core = self.node.raft.core
            if core.role is Role.LEADER:
                if core.term != self.term:
                    # A node this leader has not heard from yet is not silent yet: every
                    # member gets node_down_after from the start of this leadership.
                    self.term, self.lead_since = core.term, time.monotonic()
                    self.seen.clear()  # counts from an earlier leadership are stale
                try:
                    await self.tick()
                except (RaftError, TimeoutError) as exc:
                    log.info("scheduler paused: %s", exc)
                except Exception:
                    # A bug. Uncaught, it ended this task: nothing was assigned, expired
                    # or bounced again for as long as this node led, and nothing said so.
                    log.exception("scheduler tick failed")
                    self.bugs += 1

    def busy(self) -> collections.Counter[str]:
        """Messages each node accepted in the last second, and for this node (the
        leader, which replicates them all) every message the cluster accepted: in the
        same unit as recipients in hand, so a node busy taking mail gets fewer
        deliveries: its front end is the cluster's busiest process (docs/benchmarks.md,
        2026-11-26 third session).

        Each is capped at a node's delivery concurrency: a busy node yields at most that
        many recipients to a quiet one, and nodes that are all busy share by what they
        hold, as before. Uncapped, a leader at 300 messages/s would count as 1,200 and
        leave its delivery slots idle while slow destinations kept the followers' full."""
        now = self.node.machine.spool.accepted.copy()
        self.seen.append(now)
        busy = now - self.seen[0]  # Counter subtraction keeps only positive counts
        busy[self.node.cfg.node.id] += sum(busy.values())
        cap = self.node.cfg.delivery.concurrency
        return collections.Counter({n: min(v, cap) for n, v in busy.items()})

    def live_nodes(self) -> list[str]:
        raft = self.node.raft
        now = time.monotonic()
        members = raft.core.conf().members()
        # A node that has not answered this leader this long gets no work, and loses
        # what it had.
        down_s = self.node.cfg.delivery.node_down_after_ms / 1000
        return [
            n for n in members
            if n == raft.cfg.id
            or now - max(raft.last_answer.get(n, 0.0), self.lead_since) < down_s
        ]  # fmt: skip

    def new_format(self, now: int) -> list[Command]:
        raft, spool = self.node.raft, self.node.machine.spool
        members = raft.core.conf().members()
        fmt = upgrade.format_to_set(spool.format, members, raft.format_of)
        if fmt is None:
            # Said once per change: a rolling upgrade that waits on a member looks like
            # one that is done, and a member that died must be removed to finish it.
            held = upgrade.holding_back(spool.format, members, raft.format_of)
            if held and held != self.format_held:
                log.info("the cluster stays at replicated format %d: a member reads a newer "
                         "one, but not %s", spool.format, ", ".join(held))  # fmt: skip
            self.format_held = held
            return []
        log.info("every member reads replicated format %d: the cluster moves to it from %d, "
                 "and no member can go back to an older release", fmt, spool.format)  # fmt: skip
        return [SetFormat(now, fmt)]

    def expiring(self, wall: int) -> list[Expire]:
        """Messages to bounce for their age. That cannot be undone, so neither the
        spool's time (it follows the fastest clock: one node's clock days ahead bounced
        every queued message) nor this leader's clock alone decides it, but the time a
        majority of the voters' clocks agree on, or this clock if it is behind that: a
        leader whose clock lags bounces late, which is harmless."""
        raft = self.node.raft
        voters = raft.core.conf().voters
        peers = {n: int(w * 1000) for n, w in raft.clocks.walls().items() if n in voters}
        agreed = clock.agreed_wall(wall, peers, len(voters))
        ahead = agreed is not None and wall - agreed > clocks.WARN_S * 1000
        if ahead != self.clock_ahead:
            self.clock_ahead = ahead
            if ahead:
                assert agreed is not None
                log.warning("this node's clock is %.0f s ahead of the cluster's: mail "
                            "expires by the cluster's", (wall - agreed) / 1000)  # fmt: skip
        if agreed is None:
            return []
        return policy.expired(self.node.machine.spool, agreed, self.node.policy)

    async def tick(self) -> None:
        spool = self.node.machine.spool
        now = self.node.clock.now()  # see smtpcluster.clock: never behind the spool
        wall = int(time.time() * 1000)
        live = self.live_nodes()
        pol = self.node.policy
        commands: list[Command] = []
        on_uncertain = UncertainPolicy[self.node.cfg.delivery.on_uncertain.upper()]
        commands += [NodeDown(now, n, on_uncertain) for n in spool.load if n not in live]
        expiring = self.expiring(wall)
        gone = {e.message_id for e in expiring}
        commands += policy.assign(spool, now, pol, live, self.busy(), expiring=gone)
        commands += expiring
        me = self.node.cfg.node.id
        commands += policy.bounces(spool, spool.stamp(me, wall), self.node.cfg.smtp.hostname, me)
        commands += self.new_format(now)
        # All at once: the Ready loop appends them as one entry, one round of fsyncs,
        # where one by one each pass cost a round per command, each delaying Accepts.
        results = await asyncio.gather(
            *(self.node.raft.propose(codec.encode(cmd), timeout=5) for cmd in commands),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
