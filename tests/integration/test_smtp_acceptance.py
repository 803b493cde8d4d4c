"""SMTP acceptance on a 3-process cluster: 250 only when durable on a majority."""

from __future__ import annotations

import smtplib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kvcluster import wait_for
from tests.integration.smtpnodes import SmtpCluster, running

MESSAGE = b"From: a@example.org\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SmtpCluster]:
    with running(SmtpCluster(tmp_path)) as c:
        yield c


def send(c: SmtpCluster, nid: str, rcpt: str = "u@dest.example", source: str = "") -> str:
    """Send one message; returns the queue id from the 250 reply."""
    node = c.nodes[nid]
    src = (source, 0) if source else None
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30, source_address=src) as s:
        s.ehlo("client.test")
        s.mail("a@example.org")
        code, reply = s.rcpt(rcpt)
        assert code == 250, reply
        code, reply = s.data(MESSAGE)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


def send_swaks(c: SmtpCluster, nid: str) -> str:
    """Send with swaks (Debian package); returns the queue id from its 250."""
    node = c.nodes[nid]
    out = subprocess.run(
        ["swaks", "--server", node.host, "--port", str(node.smtp_port), "--helo", "swaks.test",
         "--from", "a@example.org", "--to", "u@dest.example", "--timeout", "30"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    [line] = [ln for ln in out.splitlines() if "queued as" in ln]
    assert line.startswith("<-  250 2.0.0"), line
    return line.rsplit(" ", 1)[-1]


def test_every_250_is_in_the_spool_of_every_node(cluster: SmtpCluster) -> None:
    ids = {send(cluster, nid) for nid in cluster.nodes for _ in range(5)}
    ids |= {send_swaks(cluster, nid) for nid in cluster.nodes for _ in range(2)}
    assert len(ids) == 21
    for nid in cluster.nodes:
        assert cluster.queued_ids(nid) >= ids  # linearizable read on each node


def test_kill_of_the_leader_under_load_loses_no_250(cluster: SmtpCluster) -> None:
    leader = cluster.leader()
    others = [n for n in cluster.nodes if n != leader]
    got_250: set[str] = set()  # recipients, unique per message
    refused: set[str] = set()
    reasons: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        nid = others[k % 2]  # clients of the surviving nodes keep sending through the kill
        n = 0
        while not stop.is_set():
            n += 1
            rcpt = f"c{k}-{n}@dest.example"
            try:
                send(cluster, nid, rcpt)
                outcome = got_250
            except (AssertionError, OSError, smtplib.SMTPException) as exc:
                outcome = refused
                reasons.append(repr(exc))
            with lock:
                outcome.add(rcpt)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    wait_for("100 messages accepted", lambda: len(got_250) >= 100)
    cluster.kill(leader)
    before = len(got_250)
    assert cluster.leader() != leader
    wait_for("100 more after the kill", lambda: len(got_250) >= before + 100, 60)
    stop.set()
    for t in threads:
        t.join(60)
    for nid in cluster.live():
        queued = cluster.queued_rcpts(nid)
        assert queued >= got_250  # every 250 survived the kill
        assert not queued & refused, reasons[:5]  # and nothing that was refused got in


def outsider_rcpt(cluster: SmtpCluster, rcpt: str) -> int:
    node = cluster.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=10, source_address=("127.0.0.9", 0)) as s:
        s.ehlo("outsider.test")
        s.mail("spammer@evil.example")
        code, _ = s.rcpt(rcpt)
        return code


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim@outside.example",
        "victim%outside.example@inbound.test",
        "@inbound.test:victim@outside.example",
        '"victim@outside.example"@inbound.test',
        "outside.example!victim@inbound.test",
        "VICTIM@OUTSIDE.EXAMPLE",
        "victim@outside.example.",
        "victim@inbound.test@outside.example",
    ],
)
def test_no_open_relay_for_outsiders(cluster: SmtpCluster, rcpt: str) -> None:
    assert outsider_rcpt(cluster, rcpt) in (501, 550, 553, 554)


def test_outsiders_may_send_to_our_relay_domains(cluster: SmtpCluster) -> None:
    assert outsider_rcpt(cluster, "postmaster@inbound.test") == 250
    assert outsider_rcpt(cluster, "Postmaster@INBOUND.TEST") == 250


def test_oversized_message_gets_552_and_the_session_goes_on(cluster: SmtpCluster) -> None:
    node = cluster.nodes["n2"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("a@example.org", ["SIZE=10000000"])[0] == 552
        s.mail("a@example.org")
        s.rcpt("u@dest.example")
        code, _ = s.data(b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n" * 1000 * 70)
        assert code == 552
        s.rset()
        s.mail("a@example.org")
        s.rcpt("u@dest.example")
        assert s.data(MESSAGE)[0] == 250
