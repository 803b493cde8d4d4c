"""A node whose wall clock is wrong, on real processes: libfaketime moves one node's
wall clock and nothing else's (tests/integration/fakeclock.py)."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from tests.integration import fakeclock
from tests.integration.kvcluster import wait_for
from tests.integration.observe import cli, scrape, value
from tests.integration.smtpnodes import SmtpCluster

DAY_S = 86400


def send(cluster: SmtpCluster, nid: str, rcpt: str) -> None:
    node = cluster.nodes[nid]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        s.sendmail("sender@example.org", [rcpt], b"Subject: clocks\r\n\r\nx\r\n")


def attempts(cluster: SmtpCluster, nid: str, rcpt: str) -> int:
    return sum(
        r["attempts"] for m in cluster.queued(nid) for r in m["recipients"] if r["address"] == rcpt
    )


def behind(cluster: SmtpCluster, nid: str) -> float:
    """How far the spool's time is ahead of `nid`'s clock, in seconds."""
    return value(scrape(cluster, nid), "smtpcluster_clock_behind_seconds")


def test_a_node_whose_clock_runs_six_days_ahead_bounces_nothing(tmp_path: Path) -> None:
    """The spool's time follows the fastest clock, so that mail from a node ahead is
    not held back. It once decided queue lifetimes too: a node started with its clock
    six days ahead carried that time in with its first command, and the leader bounced
    every queued message in the cluster as five days old."""
    cluster = SmtpCluster(tmp_path)  # the smarthost is parked: every attempt defers
    try:
        cluster.start("n1")
        cluster.start("n2")
        leader = cluster.leader()  # n1 or n2: the leader's clock is right
        send(cluster, "n1", "early@dest.example")
        wait_for("a deferral", lambda: attempts(cluster, leader, "early@dest.example") >= 1)
        cluster.start("n3", env=fakeclock.offset_env("+6d"))
        send(cluster, "n3", "ahead@dest.example")
        wait_for("the spool's time six days ahead", lambda: behind(cluster, leader) > 5 * DAY_S)
        # Stamped six days ahead, `ahead` is due only by the spool's time: once it has
        # been tried, the scheduler has also judged `early` by that time.
        wait_for(
            "a try of n3's message", lambda: attempts(cluster, leader, "ahead@dest.example") >= 1
        )
        states = {r["address"]: r["state"] for m in cluster.queued(leader) for r in m["recipients"]}
        # No bounce, and so no DSN to sender@example.org: both are still being tried.
        assert set(states) == {"early@dest.example", "ahead@dest.example"}
        assert set(states.values()) <= {"queued", "assigned", "sending"}
    finally:
        cluster.stop_all()


def test_deferred_mail_is_retried_after_a_clock_ahead_is_set_right(tmp_path: Path) -> None:
    """A node ran six days ahead and stamped the spool's time; then its clock was set
    right (here: restarted without the offset). No clock is past that stamp any more,
    so the spool's time stood still, and a recipient deferred until a second after it
    waited six days. The scheduler's time now goes on from the stamp at the rate of
    real time: the retries go on, a second apart as configured."""
    cluster = SmtpCluster(tmp_path)  # the smarthost is parked: every attempt defers
    try:
        cluster.start("n1")
        cluster.start("n2")
        leader = cluster.leader()
        send(cluster, "n1", "early@dest.example")
        wait_for("a deferral", lambda: attempts(cluster, leader, "early@dest.example") >= 1)
        cluster.start("n3", env=fakeclock.offset_env("+6d"))
        wait_for("the spool's time six days ahead", lambda: behind(cluster, leader) > 5 * DAY_S)
        cluster.kill("n3", signal.SIGTERM)
        cluster.start("n3")
        tried = attempts(cluster, leader, "early@dest.example")
        wait_for(
            "two more tries", lambda: attempts(cluster, leader, "early@dest.example") >= tried + 2
        )
    finally:
        cluster.stop_all()


def test_a_leader_whose_clock_runs_six_days_ahead_bounces_nothing(tmp_path: Path) -> None:
    """The leader judges queue lifetimes. With its own clock alone, a leader six days
    ahead bounced every queued message at its first pass. It now goes by the time a
    majority of the clocks agree on, read from its peers, and says that it does."""
    cluster = SmtpCluster(tmp_path)  # the smarthost is parked: every attempt defers
    try:
        cluster.start("n1")
        cluster.start("n2")
        send(cluster, "n1", "early@dest.example")
        wait_for(
            "a deferral", lambda: attempts(cluster, cluster.leader(), "early@dest.example") >= 1
        )
        cluster.start("n3", env=fakeclock.offset_env("+6d"))
        config = str(cluster.nodes["n1"].config)

        def moved() -> bool:  # refused while n3 still catches up: asked until it takes over
            return cli("cluster", "transfer-leader", "n3", "--config", config).returncode == 0

        wait_for("n3 to take over", moved)
        assert cluster.leader() == "n3"
        tried = attempts(cluster, "n3", "early@dest.example")
        wait_for(
            "n3 to try it twice more",
            lambda: attempts(cluster, "n3", "early@dest.example") >= tried + 2,
        )
        states = {r["address"]: r["state"] for m in cluster.queued("n3") for r in m["recipients"]}
        assert states.keys() == {"early@dest.example"}  # no bounce, so no DSN either
        assert states["early@dest.example"] in {"queued", "assigned", "sending"}
        shown = cli("cluster", "status", "--config", str(cluster.nodes["n3"].config))
        assert shown.stdout.splitlines()[-1].startswith(
            "clocks differ from the leader's: n1 -6.0d, n2 -6.0d;"
        ), shown.stdout
    finally:
        cluster.stop_all()
