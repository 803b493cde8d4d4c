"""A rolling upgrade on real processes: the cluster writes a newer replicated format only
once every node runs a release that reads it, and a node taken back to an older release
afterwards stops rather than apply what it cannot read.

"The newer release" is this code told by SMTPCLUSTER_TEST_FORMAT that it reads format 2
(tests/hooked.py): to the cluster it looks the same as a release that does."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from tests.integration.kvcluster import wait_for
from tests.integration.observe import cli
from tests.integration.smtpnodes import SmtpCluster, running

NEWER = {"SMTPCLUSTER_TEST_FORMAT": "2"}


def send(cluster: SmtpCluster, nid: str, tag: str) -> None:
    node = cluster.nodes[nid]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=60) as s:
        s.sendmail("a@example.org", [f"{tag}@outside.example"], f"Subject: {tag}\r\n\r\nx\r\n")


def formats(cluster: SmtpCluster) -> dict[str, int]:
    """Each live node's view of the cluster's replicated format."""
    return {n: (cluster.status(n) or {}).get("format", 0) for n in cluster.live()}


def said(cluster: SmtpCluster) -> dict[str, int | None]:
    """What the leader has heard each member say it reads."""
    members = (cluster.status(cluster.leader()) or {}).get("members") or []
    return {m["id"]: m["format"] for m in members}


def restart(cluster: SmtpCluster, nid: str, env: dict[str, str]) -> None:
    cluster.kill(nid, signal.SIGTERM)  # drains; a leader hands over first
    cluster.start(nid, env)
    cluster.leader()


def test_a_rolling_upgrade_raises_the_format_last_and_a_downgrade_stops(tmp_path: Path) -> None:
    cluster = SmtpCluster(tmp_path)
    with running(cluster):
        first = cluster.leader()
        order = [n for n in cluster.nodes if n != first] + [first]  # the leader last
        for k, nid in enumerate(order):
            restart(cluster, nid, NEWER)
            upgraded = set(order[: k + 1])
            want = {n: 2 if n in upgraded else 1 for n in cluster.nodes}
            wait_for(f"the leader to hear {want}", lambda w=want: said(cluster) == w)  # type: ignore[misc]
            send(cluster, nid, f"during{k}")  # mail is taken throughout
            if k < len(order) - 1:  # one node still old: the cluster stays at format 1
                assert set(formats(cluster).values()) == {1}
                leader = cluster.nodes[cluster.leader()]
                out = cli("cluster", "status", "--config", str(leader.config)).stdout
                assert "the cluster waits for" in out and f"{order[-1]}: reads 1" in out, out
        wait_for("format 2 everywhere", lambda: set(formats(cluster).values()) == {2})
        status = cli("cluster", "status", "--config", str(cluster.nodes[first].config))
        assert "replicated format 2 (reads up to 2)" in status.stdout, status.stdout

        old = next(n for n in cluster.nodes if n != cluster.leader())
        cluster.kill(old, signal.SIGTERM)
        cluster.start(old, {}, wait=False)  # this release as it is: reads format 1 only
        popen = cluster.nodes[old].popen
        assert popen is not None
        assert popen.wait(timeout=60) == 70
        cluster.nodes[old].popen = None
        log = (tmp_path / f"{old}.log").read_text()
        assert "format to 2; this version reads up to 1: upgrade it" in log or (
            "snapshot is of replicated format 2" in log
        ), log[-3000:]
        rest = [n for n in cluster.nodes if n != old]
        send(cluster, rest[0], "after")  # the two others carry on, still a majority
        assert all(f == 2 for f in formats(cluster).values())
        restart_env = NEWER  # upgraded again, it catches up and takes part
        cluster.start(old, restart_env)
        wait_for(f"{old} back at format 2", lambda: formats(cluster).get(old) == 2)
