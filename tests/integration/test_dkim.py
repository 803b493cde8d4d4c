"""DKIM signing end to end: a cluster with a key for example.org signs what its own
clients send from that domain, and the copy the destination receives verifies with an
independent verifier (dkimpy). Other domains, and mail from outside, go unsigned."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import dkim as dkimpy
from aiosmtpd.controller import Controller

from smtpcluster.dkim import DkimKey
from tests.integration.kvcluster import free_port, wait_for
from tests.integration.sinks import Sink
from tests.integration.smtpnodes import SmtpCluster, running

OUTSIDER = ("127.0.0.9", 0)  # not in the test cluster's relay_networks (127.0.0.0/30)


def message(sender: str, rcpt: str, subject: str) -> str:
    return f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nHello  there \r\n"


def test_our_clients_mail_is_signed_and_verifies_at_the_destination(tmp_path: Path) -> None:
    key_file = tmp_path / "example.org.key"
    subprocess.run(["openssl", "genrsa", "-out", str(key_file), "2048"], check=True,
                   capture_output=True)  # fmt: skip
    key = DkimKey.load("example.org", "s2026", str(key_file))
    sink, port = Sink(), free_port("127.0.0.1")
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, n=1, smarthost=f"127.0.0.1:{port}")
    section = 'dkim.keys."example.org"'
    cluster.add_setting("n1", section, f'selector = "s2026"\nkey_file = "{key_file}"')
    try:
        with running(cluster):
            node = cluster.nodes["n1"]
            with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
                s.sendmail(
                    "app@example.org",
                    ["a@dest.test"],
                    message("App <app@Example.ORG>", "a@dest.test", "ours"),
                )
                s.sendmail("app@other.test", ["b@dest.test"],
                           message("app@other.test", "b@dest.test", "no key"))  # fmt: skip
            with smtplib.SMTP(node.host, node.smtp_port, timeout=30,
                              source_address=OUTSIDER) as s:  # fmt: skip
                s.sendmail(
                    "forger@example.org",
                    ["c@inbound.test"],
                    message("forger@example.org", "c@inbound.test", "from outside"),
                )
            got = wait_for(
                "three delivered", lambda: dict(sink.received) if len(sink.received) == 3 else None
            )
    finally:
        controller.stop()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2026._domainkey.example.org."
        return key.public_record().encode()

    ours = got["a@dest.test"]
    assert ours.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert dkimpy.verify(ours, dnsfunc=dns)
    assert b"\r\nReceived: " in ours and b"\r\nDate: " in ours  # signed after we add them
    assert b"DKIM-Signature" not in got["b@dest.test"]
    assert b"DKIM-Signature" not in got["c@inbound.test"]
