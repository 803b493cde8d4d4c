"""Prometheus metrics of one node (prometheus-client), served at /metrics.

Events are counted where they happen (front end, worker, Raft's fsync); state (queue
depth, Raft role, term, lag) is read from the node when Prometheus scrapes, so it is
never stale and costs nothing between scrapes. Each node owns its registry: nothing
here is module-level state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailqueue.spool import RcptState
from raft.core import Role
from smtpcluster import VERSION

if TYPE_CHECKING:
    from smtpcluster.node import Node

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter(
            "smtpcluster_messages_accepted", "Messages this node answered 250 to", registry=r
        )
        self.outcomes = Counter(
            "smtpcluster_deliveries", "Recipients this node delivered, deferred or bounced",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.accept_seconds = Histogram(
            "smtpcluster_accept_seconds", "From the final dot to the 250 (replicated)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.delivery_seconds = Histogram(
            "smtpcluster_delivery_seconds", "One outbound SMTP transaction, fence included",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.fsync_seconds = Histogram(
            "smtpcluster_raft_fsync_seconds", "Writing and fsyncing one batch of the Raft log",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_StateCollector(node))
        # What every Prometheus client's default registry exports (process_*, python_*),
        # which dashboards and memory alerts expect; ours is per node, so add them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        yield from self._queue()
        yield from self._raft()
        info = GaugeMetricFamily(
            "smtpcluster_build_info", "1, labelled with this node's release", labels=["version"]
        )
        info.add_metric([VERSION], 1.0)
        yield info
        yield GaugeMetricFamily(
            "smtpcluster_replicated_format",
            "The replicated format the cluster writes, as applied here (raised in upgrades)",
            value=self.node.spool.format,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "smtpcluster_replicated_format_readable",
            "The newest replicated format this node's release reads",
            value=self.node.machine.readable,
        )  # fmt: skip
        up = GaugeMetricFamily("smtpcluster_frontends_up", "1 when the SMTP ports listen")
        up.add_metric([], 1.0 if self.node.frontends_up else 0.0)
        yield up
        yield CounterMetricFamily(
            "smtpcluster_recipients_refused", "Recipients refused: relaying denied",
            value=self.node.handler.refused,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "smtpcluster_smtp_sessions", "SMTP sessions open on this node (max_sessions caps)",
            value=len(self.node.handler.sessions),
        )  # fmt: skip
        yield CounterMetricFamily(
            "smtpcluster_connections_refused",
            "SMTP connections refused with 421: over max_sessions or max_sessions_per_client",
            value=self.node.handler.sessions.refused,
        )  # fmt: skip
        limited = CounterMetricFamily(
            "smtpcluster_rate_limited",
            "Connections (421) and messages (450) refused: a client over its rate limit",
            labels=["limit"],
        )
        limited.add_metric(["connection"], self.node.handler.connection_rate.refused)
        limited.add_metric(["message"], self.node.handler.message_rate.refused)
        yield limited
        yield from self._disk()
        yield GaugeMetricFamily(
            "smtpcluster_smtp_data_in_memory_bytes",
            "Message data the SMTP sessions hold now (smtp.max_data_in_memory caps)",
            value=self.node.handler.data_budget.held,
        )  # fmt: skip
        yield CounterMetricFamily(
            "smtpcluster_messages_refused_no_memory",
            "Messages refused with 452 4.3.1: the sessions held smtp.max_data_in_memory",
            value=self.node.handler.data_budget.refused,
        )  # fmt: skip
        bugs = CounterMetricFamily(
            "smtpcluster_internal_errors",
            "Unexpected exceptions, each logged with its traceback, after which the part "
            "went on: a bug",
            labels=["part"],
        )
        bugs.add_metric(["smtp"], self.node.handler.bugs)
        bugs.add_metric(["scheduler"], self.node.scheduler.bugs)
        bugs.add_metric(["delivery"], self.node.worker.bugs)
        yield bugs
        pool = self.node.worker.pool
        yield CounterMetricFamily(
            "smtpcluster_delivery_plaintext_connections",
            "Delivery connections in plaintext to a host that offered STARTTLS (opportunistic "
            "TLS after a refused STARTTLS or a failed handshake)",
            value=pool.plaintext,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "smtpcluster_delivery_hosts_untried",
            "Hosts this node leaves untried for now, its connection to them having timed out",
            value=pool.untried(),
        )  # fmt: skip
        yield CounterMetricFamily(
            "smtpcluster_gc_slow_full_collections",
            "Full garbage collections that stopped the node longer than the limit",
            value=self.node.collections.slow,
        )  # fmt: skip

    def _disk(self) -> Iterator[Metric]:
        disk = self.node.disk
        yield GaugeMetricFamily(
            "smtpcluster_data_dir_free_bytes",
            "Free space on data_dir's file system (new mail is refused under min_free_space)",
            value=disk.free(),
        )  # fmt: skip
        yield CounterMetricFamily(
            "smtpcluster_messages_refused_no_space",
            "Messages refused with 452 4.3.1: data_dir's file system under min_free_space",
            value=disk.refused,
        )  # fmt: skip

    def _queue(self) -> Iterator[Metric]:
        spool = self.node.spool
        depth = GaugeMetricFamily(
            "smtpcluster_queue_recipients", "Recipients in the queue by state", labels=["state"]
        )
        for state in RcptState:
            depth.add_metric([state.name.lower()], spool.counts.get(state, 0))
        yield depth
        yield GaugeMetricFamily(
            "smtpcluster_queue_messages", "Messages in the queue", value=len(spool.messages)
        )
        # Messages sit in the spool in the order they were accepted, so the first one
        # is the oldest (DSNs excepted): no scan of a large queue per scrape.
        first = next(iter(spool.messages.values()), None)
        age = time.time() - first.received_at / 1000 if first else 0.0
        yield GaugeMetricFamily(
            "smtpcluster_queue_oldest_message_age_seconds", "Age of the oldest message",
            value=max(age, 0.0),
        )  # fmt: skip
        yield CounterMetricFamily(
            "smtpcluster_uncertain", "Recipients that became uncertain (cluster-wide)",
            value=spool.uncertain_total,
        )  # fmt: skip
        yield CounterMetricFamily(
            "smtpcluster_queue_undecodable_commands",
            "Committed queue commands this node could not decode and refused (each logged)",
            value=self.node.machine.undecodable,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "smtpcluster_clock_behind_seconds",
            "How far this node's clock is behind the newest command time applied, which "
            "another node's clock stamped: a lower bound of the skew between them",
            value=clock_behind_s(spool.now, time.time()),
        )  # fmt: skip

    def _raft(self) -> Iterator[Metric]:
        raft = self.node.raft
        core = raft.core
        role = GaugeMetricFamily("smtpcluster_raft_role", "1 for this node's role", labels=["role"])
        for r in Role:
            role.add_metric([r.value], 1.0 if core.role is r else 0.0)
        yield role
        for name, text, value in (
            ("term", "Current Raft term", core.term),
            ("commit_index", "Highest committed log index", core.log.committed),
            ("applied_index", "Highest index applied to the spool", raft.sm_applied),
            ("snapshot_bytes", "Size of the newest snapshot", _snapshot_size(self.node)),
        ):
            yield GaugeMetricFamily(f"smtpcluster_raft_{name}", text, value=value)
        yield CounterMetricFamily(
            "smtpcluster_raft_elections", "Elections this node started", value=core.campaigns
        )
        lag = GaugeMetricFamily(
            "smtpcluster_raft_peer_lag_entries", "Entries a peer is behind (on the leader)",
            labels=["peer"],
        )  # fmt: skip
        if core.role is Role.LEADER:
            last = core.log.last_index()
            for peer, p in sorted(core.prs.items()):
                if peer != raft.cfg.id:
                    lag.add_metric([peer], last - p.match)
        yield lag
        offset = GaugeMetricFamily(
            "smtpcluster_raft_peer_clock_offset_seconds",
            "How far a peer's wall clock is ahead of this node's (negative: behind), read "
            "in the last few seconds; queue lifetimes go by what a majority of clocks say",
            labels=["peer"],
        )  # fmt: skip
        for peer, seconds in sorted(raft.clocks.offsets().items()):
            offset.add_metric([peer], seconds)
        yield offset


def clock_behind_s(spool_now_ms: int, wall_s: float) -> float:
    """Seconds this node's clock is behind the spool's newest command time, 0 if not.
    A lower bound of the skew to the fastest clock: the spool's time stands still
    between commands."""
    return max(spool_now_ms / 1000 - wall_s, 0.0)


def _snapshot_size(node: Node) -> int:
    snap = node.raft.storage.snapshot
    return snap.size if snap is not None else 0
