"""MX routing against a real dnsmasq on loopback: priority, fallback, null MX, NXDOMAIN."""

from __future__ import annotations

import contextlib
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.integration.kvcluster import free_port, wait_for
from tests.integration.sinks import Sink
from tests.integration.smtpnodes import SmtpCluster

MX_PORT_HOST = "127.0.0.10"


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[str]:
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
         f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root",
         "--mx-host=prio.test,mx1.prio.test,10", "--mx-host=prio.test,mx2.prio.test,20",
         "--host-record=mx1.prio.test,127.0.0.10", "--host-record=mx2.prio.test,127.0.0.11",
         "--mx-host=null.test,.,0", "--host-record=plain.test,127.0.0.11",
         "--local=/test/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def send(cluster: SmtpCluster, rcpt: str) -> None:
    node = cluster.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        s.sendmail("sender@prio.test", [rcpt], b"Subject: mx\r\n\r\nx\r\n")


@dataclass
class Exchanges:
    """mx1.prio.test on 127.0.0.10 and mx2.prio.test (also plain.test) on 127.0.0.11,
    and a one-node cluster that routes by MX through the test's dnsmasq."""

    mx1: Sink
    mx2: Sink
    c1: Controller
    cluster: SmtpCluster


@pytest.fixture
def exchanges(tmp_path: Path, dns: str) -> Iterator[Exchanges]:
    port = free_port("127.0.0.10")
    mx1, mx2 = Sink(), Sink()
    c1 = Controller(mx1, hostname="127.0.0.10", port=port)
    c2 = Controller(mx2, hostname="127.0.0.11", port=port)
    c1.start()
    c2.start()
    (tmp_path / "c").mkdir()
    cluster = SmtpCluster(tmp_path / "c", n=1, smarthost="", nameservers=dns, mx_port=port)
    try:
        cluster.start_all()
        cluster.leader()
        yield Exchanges(mx1, mx2, c1, cluster)
    finally:
        cluster.stop_all()
        with contextlib.suppress(Exception):  # a test may have stopped it already
            c1.stop()
        c2.stop()


def test_mx_priority_fallback_null_mx_and_nxdomain(exchanges: Exchanges) -> None:
    mx1, mx2, cluster = exchanges.mx1, exchanges.mx2, exchanges.cluster
    send(cluster, "first@prio.test")
    wait_for("delivery to the preferred MX", lambda: mx1.received, 30)
    exchanges.c1.stop()  # the preferred exchange goes away: the next one takes the mail
    send(cluster, "second@prio.test")
    wait_for("fallback to the second MX", lambda: mx2.received, 30)
    send(cluster, "implicit@plain.test")  # no MX: the domain's own address
    wait_for("the implicit MX", lambda: len(mx2.received) == 2, 30)
    assert [r for r, _ in mx1.received] == ["first@prio.test"]
    assert [r for r, _ in mx2.received] == ["second@prio.test", "implicit@plain.test"]
    send(cluster, "anyone@null.test")  # RFC 7505: bounce at once
    send(cluster, "anyone@nowhere.test")  # NXDOMAIN: bounce at once
    wait_for("two DSNs back to the sender", lambda: len(mx2.received) == 4, 30)
    dsns = b"".join(body for _, body in mx2.received[2:])
    assert b"5.1.10" in dsns and b"5.1.2" in dsns


def test_one_message_to_two_domains_goes_to_each_domains_own_mx(exchanges: Exchanges) -> None:
    """To: a@prio.test, Cc: b@plain.test is two transactions, one to each domain's MX.
    Assigned in the same pass, both recipients carry attempt 1; grouped by attempt
    alone, both went to the first recipient's MX, which had to refuse or misdeliver
    the other."""
    mx1, mx2 = exchanges.mx1, exchanges.mx2
    node = exchanges.cluster.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        rcpts = ["a@prio.test", "b@plain.test", "c@prio.test"]
        s.sendmail("sender@prio.test", rcpts, b"Subject: two domains\r\n\r\nx\r\n")
    wait_for("both deliveries", lambda: len(mx1.received) + len(mx2.received) == 3, 30)
    assert sorted(r for r, _ in mx1.received) == ["a@prio.test", "c@prio.test"]
    assert [r for r, _ in mx2.received] == ["b@plain.test"]
