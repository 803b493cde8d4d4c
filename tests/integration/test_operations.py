"""What systemd and an operator see of a node: sd_notify READY and WATCHDOG, SIGHUP
reloads, logs that carry envelope facts but never a body or a password, and an exit
code asking for a restart when the node's disk fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from smtpcluster.auth import hash_password
from tests.integration.kvcluster import free_port, wait_for
from tests.integration.observe import cli, scrape, value
from tests.integration.sinks import Sink, sink_and_cluster
from tests.integration.smtpnodes import SmtpCluster, running


def test_node_tells_systemd_ready_and_pings_the_watchdog(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        cluster = SmtpCluster(tmp_path, n=1)
        try:
            # WATCHDOG_PID names the node itself only once it runs: left out, as
            # systemd does when the service's main process is the one it started.
            cluster.start("n1", {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
            seen: list[str] = []
            while not ({"READY=1", "WATCHDOG=1"} <= set(seen)):
                seen += sock.recv(4096).decode().split("\n")
            assert any(f.startswith("STATUS=serving; leader n1") for f in seen), seen
            popen = cluster.nodes["n1"].popen
            assert popen is not None
            popen.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in seen:
                seen += sock.recv(4096).decode().split("\n")
        finally:
            cluster.stop_all()


def test_a_node_without_a_quorum_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """One node of three started alone waits for a leader before it tells systemd it
    is ready (up to 30 s); a SIGTERM meanwhile must not wait that out."""
    cluster = SmtpCluster(tmp_path, n=3)
    try:
        cluster.start("n1")  # its peers never come: no leader
        popen = cluster.nodes["n1"].popen
        assert popen is not None
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=15) == 0  # the wait for a leader is 30 s
        cluster.nodes["n1"].popen = None
        assert "signal received, draining" in (tmp_path / "n1.log").read_text()
    finally:
        cluster.stop_all()


def _relays(cluster: SmtpCluster) -> int:
    """The reply to a RCPT for an outside domain from 127.0.0.1 (a new session)."""
    node = cluster.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        s.ehlo("ops.test")
        s.mail("a@example.org")
        return s.rcpt("someone@outside.example")[0]


def test_sighup_applies_relay_networks_and_refuses_an_invalid_file(tmp_path: Path) -> None:
    cluster = SmtpCluster(tmp_path, n=1, relay_networks='"10.0.0.0/8"')
    config = cluster.nodes["n1"].config
    with running(cluster):
        popen = cluster.nodes["n1"].popen
        assert popen is not None
        log = tmp_path / "n1.log"
        assert _relays(cluster) == 554

        text = config.read_text()
        config.write_text(text.replace('"10.0.0.0/8"', '"127.0.0.0/8"'))
        popen.send_signal(signal.SIGHUP)
        wait_for("the reload", lambda: "reloaded" in log.read_text(), 30)
        assert _relays(cluster) == 250

        config.write_text(text.replace('"10.0.0.0/8"', '"not-a-network"'))
        popen.send_signal(signal.SIGHUP)
        wait_for("the refusal", lambda: "reload refused" in log.read_text(), 30)
        assert "relay_networks[0]" in log.read_text()  # it names the key
        assert _relays(cluster) == 250  # the running configuration stayed
        assert popen.poll() is None


def test_sighup_moves_delivery_to_a_new_smarthost_and_says_what_waits_for_a_restart(
    tmp_path: Path,
) -> None:
    """postfix reload for relayhost: the next delivery goes to the new smarthost, no
    restart. The concurrency limits are the one part of [delivery] that waits for one."""
    old, new = Sink(), Sink()
    port = free_port("127.0.0.1")
    controller = Controller(new, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with sink_and_cluster(tmp_path, old, n=1, relay_networks='"127.0.0.0/8"') as cluster:
            node = cluster.nodes["n1"]
            popen, log = node.popen, tmp_path / "n1.log"
            assert popen is not None

            def send(to: str) -> None:
                with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
                    s.sendmail("a@example.org", [to], "Subject: x\r\n\r\nhello\r\n")

            send("first@dest.example")
            wait_for("delivery to the first smarthost", lambda: old.received, 60)
            text = node.config.read_text()
            assert 'smarthost = "127.0.0.1:' in text
            moved = re.sub(r'smarthost = "[^"]*"', f'smarthost = "127.0.0.1:{port}"', text)
            node.config.write_text(moved)
            cluster.add_setting("n1", "delivery", "concurrency = 7")
            popen.send_signal(signal.SIGHUP)
            wait_for("the reload", lambda: "reloaded" in log.read_text(), 30)
            send("second@dest.example")
            wait_for("delivery to the new smarthost", lambda: new.received, 60)
            assert [r for r, _ in new.received] == ["second@dest.example"]
            assert [r for r, _ in old.received] == ["first@dest.example"]
            said = log.read_text()
            assert "delivery.concurrency changed: it takes effect at the next restart" in said
            assert "delivery changed" not in said  # the rest of [delivery] took effect
    finally:
        controller.stop()


def test_logs_carry_envelope_facts_and_never_a_body_or_a_password(tmp_path: Path) -> None:
    marker = "body-" + os.urandom(8).hex()
    password = "pw-" + os.urandom(8).hex()
    sink = Sink()
    cluster_dir = tmp_path / "c"
    cluster_dir.mkdir()
    with sink_and_cluster(cluster_dir, sink, submission=True) as cluster:
        users = cluster_dir / "users"
        users.write_text(users.read_text() + hash_password("bob", password) + "\n")
        node = cluster.nodes["n1"]
        popen = node.popen
        assert popen is not None
        popen.send_signal(signal.SIGHUP)  # the new user, by a reload
        wait_for("the reload", lambda: "reloaded" in (cluster_dir / "n1.log").read_text(), 30)
        with smtplib.SMTP(node.host, node.submission_port, timeout=30) as s:
            s.starttls(context=ssl._create_unverified_context())
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("bob", password + "-wrong")
            s.login("bob", password)
            s.sendmail("bob@example.org", ["r@dest.example"], f"Subject: x\r\n\r\n{marker}\r\n")
        wait_for("delivery", lambda: len(sink.received) == 1, 60)
        assert marker.encode() in sink.received[0][1]
    logs = "".join((cluster_dir / f"n{k}.log").read_text() for k in (1, 2, 3))
    smtp = [line for line in logs.splitlines() if "event=smtp " in line]
    assert len(smtp) == 1 and "rcpts=r@dest.example" in smtp[0] and "auth=bob" in smtp[0]
    assert "event=delivery " in logs and "outcome=delivered remote=127.0.0.1:" in logs
    assert marker not in logs
    assert password not in logs
    # A clean stop is not an error: no level=error line from any node. Nor is a good
    # AUTH a warning (aiosmtpd warns of its own use of a deprecated attribute).
    assert not [line for line in logs.splitlines() if "level=error" in line]
    assert "deprecated" not in logs


def test_forced_recovery_from_one_survivors_data_directory(tmp_path: Path) -> None:
    """docs/operations.md, "When a majority is lost": the survivor's data directory,
    copied to the lost nodes' ids, makes a working cluster with the whole queue."""
    cluster = SmtpCluster(tmp_path)  # deliveries parked: the mail stays queued
    with running(cluster):
        node = cluster.nodes["n2"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            for k in range(10):
                s.sendmail("a@example.org", [f"r{k}@dest.example"], b"Subject: r\r\n\r\nx\r\n")
        wait_for("n1 has it all", lambda: len(cluster.queued_ids("n1")) == 10, 30)
    for lost in ("n2", "n3"):  # lost for good: replaced by copies of n1's state
        shutil.rmtree(tmp_path / lost)
        shutil.copytree(tmp_path / "n1", tmp_path / lost)
        (tmp_path / lost / "raft" / "owner").unlink()  # as the procedure says
    with running(cluster):
        leader = cluster.leader()
        for nid in cluster.nodes:
            assert cluster.queued_rcpts(nid) == {f"r{k}@dest.example" for k in range(10)}
        node = cluster.nodes[leader]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            assert s.sendmail("a@example.org", ["after@dest.example"], b"x\r\n") == {}


def test_a_node_whose_disk_fails_exits_for_a_restart_and_the_others_carry_on(
    tmp_path: Path,
) -> None:
    cluster = SmtpCluster(tmp_path)
    disks = {nid: tmp_path / f"{nid}.disk" for nid in cluster.nodes}
    try:
        for nid, disk in disks.items():
            disk.write_text("0")
            cluster.start(nid, {"SMTPCLUSTER_TEST_FSYNC_DELAY_FILE": str(disk)})
        leader = cluster.leader()
        broken = next(n for n in sorted(cluster.nodes) if n != leader)
        popen = cluster.nodes[broken].popen
        assert popen is not None
        disks[broken].write_text("eio")  # from now on its every fsync fails
        node = cluster.nodes[leader]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["after@dest.example"], b"Subject: x\r\n\r\nx\r\n")
        # Not a zombie that keeps its SMTP port open and commits nothing: it exits with
        # an error, for systemd to restart it.
        assert popen.wait(timeout=30) == 70
        cluster.nodes[broken].popen = None
        log = (tmp_path / f"{broken}.log").read_text()
        assert "no longer takes part in the cluster" in log and "injected disk failure" in log
        assert "after@dest.example" in cluster.queued_rcpts(leader)
    finally:
        cluster.stop_all()


def test_a_node_short_of_disk_refuses_new_mail_with_452_until_there_is_room(
    tmp_path: Path,
) -> None:
    """Postfix's queue_minfree: under min_free_space a MAIL gets 452 4.3.1 and nothing
    is queued; with room again (here: a smaller reserve, by a reload) mail is taken."""
    cluster = SmtpCluster(tmp_path, n=1)
    config = cluster.nodes["n1"].config
    text = cluster.set_smtp("n1", f"min_free_space = {1 << 62}")
    node = cluster.nodes["n1"]
    with running(cluster):
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.ehlo("disk.test")
            assert s.mail("a@example.org") == (452, b"4.3.1 Insufficient system storage")
            assert s.noop()[0] == 250  # the session goes on
        assert cluster.queued("n1") == []
        samples = scrape(cluster, "n1")
        assert value(samples, "smtpcluster_messages_refused_no_space_total") == 1
        assert value(samples, "smtpcluster_data_dir_free_bytes") > 0
        assert "refusing new mail with 452 4.3.1" in (tmp_path / "n1.log").read_text()
        human = cli("cluster", "status", "--config", str(config)).stdout
        assert "UNDER min_free_space" in human and "new mail is refused (452 4.3.1)" in human
        status, health = _healthz(cluster)
        assert status == 503 and "under min_free_space" in health["reason"]

        config.write_text(text)  # the default reserve, which this disk has
        assert node.popen is not None
        node.popen.send_signal(signal.SIGHUP)
        wait_for("the reload", lambda: "reloaded" in (tmp_path / "n1.log").read_text(), 30)
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            assert s.sendmail("a@example.org", ["r@dest.example"], b"Subject: x\r\n\r\nx\r\n") == {}
        assert cluster.queued_rcpts("n1") == {"r@dest.example"}
        assert "taking new mail again" in (tmp_path / "n1.log").read_text()
        assert _healthz(cluster) == (200, {"ok": True, "leader": "n1"})


def _healthz(cluster: SmtpCluster) -> tuple[int, dict[str, Any]]:
    """GET /healthz as a load balancer does: no token."""
    node = cluster.nodes["n1"]
    try:
        with urllib.request.urlopen(
            f"http://{node.host}:{node.admin_port}/healthz", timeout=20
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_node_with_a_damaged_log_refuses_to_start_and_says_where(tmp_path: Path) -> None:
    """A corrupt record mid-log: exit 65 (the unit does not restart on it), the file and
    offset, and where the procedure is; never a traceback, never the record skipped."""
    cluster = SmtpCluster(tmp_path, n=1)
    with running(cluster):
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    [wal] = (tmp_path / "n1").glob("raft/wal/*.wal")
    data = bytearray(wal.read_bytes())
    data[10] ^= 0x40  # in the first record: valid ones follow, so not a torn tail
    wal.write_bytes(bytes(data))
    out = serve_once(node.config)
    assert out.returncode == 65, out.stderr
    assert f"corrupt write-ahead log record in {wal} at byte offset" in out.stderr
    assert "A node whose data is damaged" in out.stderr and "Traceback" not in out.stderr
    assert wal.read_bytes() == bytes(data)  # nothing was "repaired"


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "smtpcluster.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_taken_port_or_an_unusable_data_dir_is_one_line_naming_the_key(tmp_path: Path) -> None:
    """Exit 71 (systemd restarts it: a port may come free), no traceback."""
    cluster = SmtpCluster(tmp_path, n=1)
    node = cluster.nodes["n1"]
    with socket.socket() as taken:
        taken.bind((node.host, node.smtp_port))
        taken.listen()
        out = serve_once(node.config)
    assert out.returncode == 71, out.stderr
    where = f"{node.host}:{node.smtp_port}"
    assert out.stderr == f"smtpcluster: cannot start: smtp.relay_listen: {where}: " \
        "Address already in use\n", out.stderr  # fmt: skip
    shutil.rmtree(tmp_path / "n1", ignore_errors=True)  # made by the first try
    (tmp_path / "n1").write_text("a file where the data directory should be")
    out = serve_once(node.config)
    assert out.returncode == 71, out.stderr
    assert out.stderr.startswith("smtpcluster: cannot start: node.data_dir: "), out.stderr
    assert "Not a directory" in out.stderr and "Traceback" not in out.stderr


def test_a_node_started_on_another_nodes_data_refuses_to_start(tmp_path: Path) -> None:
    """A cloned VM: n3's data directory replaced by a copy of n2's. Run as n3 it would
    vote again in terms n2 voted in, and lack what n3 had acknowledged: two leaders in
    one term, or committed mail lost. It must not start, and must say why."""
    cluster = SmtpCluster(tmp_path)
    with running(cluster):
        node = cluster.nodes["n2"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    shutil.rmtree(tmp_path / "n3")
    shutil.copytree(tmp_path / "n2", tmp_path / "n3")
    for command in ("check-config", "serve"):  # check-config says so before a start
        out = cli(command, "--config", str(cluster.nodes["n3"].config))
        assert out.returncode == 65, (command, out.stderr)
        assert f"{tmp_path / 'n3' / 'raft'} holds the Raft state of node 'n2'" in out.stderr
        assert "this node is 'n3'" in out.stderr and "Traceback" not in out.stderr
    ok = cli("check-config", "--config", str(cluster.nodes["n2"].config))
    assert ok.returncode == 0 and "ok (node n2" in ok.stdout, ok.stderr


def test_a_node_restored_from_an_old_backup_stops_instead_of_voting(tmp_path: Path) -> None:
    """n3's data_dir put back from a copy taken before it acknowledged ten messages. Run
    so, it could help elect a leader that lacks them, and they would be lost. The
    leader's heartbeat tells it what it had held: it exits 65, saying why."""
    cluster = SmtpCluster(tmp_path)
    with running(cluster):
        leader = cluster.leader()
        backed_up = next(n for n in ("n3", "n2") if n != leader)
        cluster.kill(backed_up, signal.SIGTERM)
        shutil.copytree(tmp_path / backed_up, tmp_path / "backup")
        cluster.start(backed_up)
        node = cluster.nodes[leader]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            for k in range(10):
                s.sendmail("a@example.org", [f"r{k}@dest.example"], b"Subject: r\r\n\r\nx\r\n")
        wait_for(f"{backed_up} to hold them all",
                 lambda: len(cluster.queued_ids(backed_up)) == 10, 30)  # fmt: skip
        cluster.kill(backed_up, signal.SIGTERM)
        shutil.rmtree(tmp_path / backed_up)
        shutil.move(tmp_path / "backup", tmp_path / backed_up)
        cluster.start(backed_up, wait=False)
        popen = cluster.nodes[backed_up].popen
        assert popen is not None
        assert popen.wait(timeout=60) == 65
        cluster.nodes[backed_up].popen = None
        log = (tmp_path / f"{backed_up}.log").read_text()
        assert "entries it acknowledged are gone" in log, log[-2000:]
        assert "A node whose data is damaged" in log
        assert len(cluster.queued_ids(leader)) == 10  # the other two carry on
