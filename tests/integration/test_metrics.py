"""/metrics scraped like Prometheus does and parsed with prometheus-client's parser: the
counters move as mail flows, and the Raft and queue gauges describe the cluster."""

from __future__ import annotations

import smtplib
from importlib.metadata import version
from pathlib import Path

from tests.integration.kvcluster import wait_for
from tests.integration.observe import scrape, value
from tests.integration.sinks import Sink, sink_and_cluster
from tests.integration.smtpnodes import SmtpCluster


def delivered(c: SmtpCluster) -> float:
    return sum(
        value(scrape(c, n), "smtpcluster_deliveries_total", outcome="delivered") for n in c.nodes
    )


def test_counters_move_as_mail_flows_and_gauges_describe_the_cluster(tmp_path: Path) -> None:
    sink = Sink()
    with sink_and_cluster(tmp_path, sink) as cluster:
        before = scrape(cluster, "n2")
        start_delivered = delivered(cluster)
        node = cluster.nodes["n2"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            for k in range(5):
                s.sendmail("m@example.org", [f"r{k}@dest.example"], b"Subject: m\r\n\r\nx\r\n")
        after = scrape(cluster, "n2")
        accepted = "smtpcluster_messages_accepted_total"
        assert value(after, accepted) - value(before, accepted) == 5
        assert value(after, "smtpcluster_accept_seconds_count") >= 5
        assert ("smtpcluster_gc_slow_full_collections_total", ()) in after
        # the process figures every Prometheus client exports, for memory alerts
        assert value(after, "process_resident_memory_bytes") > 10 << 20
        assert value(after, "process_open_fds") > 0
        assert value(after, "process_cpu_seconds_total") > 0
        assert ("python_gc_collections_total", (("generation", "2"),)) in after
        assert any(name == "python_info" for name, _ in after)
        wait_for("5 deliveries counted", lambda: delivered(cluster) - start_delivered == 5)
        assert len(sink.received) == 5

        leader = cluster.leader()
        views = {n: scrape(cluster, n) for n in cluster.nodes}
        leaders = [n for n, v in views.items() if value(v, "smtpcluster_raft_role", role="leader")]
        assert leaders == [leader]
        terms = {value(v, "smtpcluster_raft_term") for v in views.values()}
        assert len(terms) == 1 and terms.pop() >= 1
        lead = views[leader]
        assert value(lead, "smtpcluster_raft_commit_index") >= 5
        assert value(lead, "smtpcluster_raft_fsync_seconds_count") > 0
        lags = {
            dict(labels)["peer"]
            for (name, labels) in lead
            if name == "smtpcluster_raft_peer_lag_entries"
        }
        assert lags == set(cluster.nodes) - {leader}
        assert ("smtpcluster_queue_recipients", (("state", "queued"),)) in lead
        assert value(lead, "smtpcluster_frontends_up") == 1
        release = (("version", version("smtpcluster")),)
        assert all(v.get(("smtpcluster_build_info", release)) == 1 for v in views.values())
        assert all(value(v, "smtpcluster_replicated_format") == 1 for v in views.values())
        assert all(value(v, "smtpcluster_replicated_format_readable") == 1 for v in views.values())
        assert all(value(v, "smtpcluster_data_dir_free_bytes") > 0 for v in views.values())
        assert all(value(v, "smtpcluster_connections_refused_total") == 0 for v in views.values())
        for zero in ("smtpcluster_delivery_plaintext_connections_total",  # the sink has no TLS
                     "smtpcluster_delivery_hosts_untried"):  # fmt: skip
            assert all((zero, ()) in v and value(v, zero) == 0 for v in views.values())
        assert all(("smtpcluster_smtp_sessions", ()) in v for v in views.values())
        no_room = "smtpcluster_messages_refused_no_space_total"
        assert all((no_room, ()) in v and value(v, no_room) == 0 for v in views.values())
        bugs = "smtpcluster_internal_errors_total"
        parts = [(("part", p),) for p in ("smtp", "scheduler", "delivery")]
        assert all(v[(bugs, part)] == 0 for v in views.values() for part in parts)
        undecodable = "smtpcluster_queue_undecodable_commands_total"
        assert all((undecodable, ()) in v and value(v, undecodable) == 0 for v in views.values())
        # one machine, one clock: no node is behind the commands' times
        assert all(value(v, "smtpcluster_clock_behind_seconds") == 0 for v in views.values())

        def offsets() -> dict[tuple[str, str], float]:
            return {
                (n, dict(labels)["peer"]): seconds
                for n in cluster.nodes
                for (name, labels), seconds in scrape(cluster, n).items()
                if name == "smtpcluster_raft_peer_clock_offset_seconds"
            }

        pairs = {(a, b) for a in cluster.nodes for b in cluster.nodes if a != b}
        wait_for("each node to read each other's clock", lambda: set(offsets()) == pairs)
        assert all(abs(seconds) < 1 for seconds in offsets().values())  # the same clock
