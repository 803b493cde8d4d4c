"""A smarthost that wants TLS and a login, as a mail provider's does (Postfix's
smtp_tls_security_level and smtp_sasl_password_maps): here another smtpcluster node's
submission port, which requires STARTTLS and then AUTH, and relays to a capture sink."""

from __future__ import annotations

import shutil
import smtplib
import ssl
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from smtpcluster import pki
from tests.integration.kvcluster import free_port, wait_for
from tests.integration.sinks import Sink
from tests.integration.smtpnodes import SmtpCluster, running


def provider(root: Path, sink_port: int) -> SmtpCluster:
    """One node whose port 587 takes alice/secret after STARTTLS, with a certificate
    for 127.0.0.1 from a CA of its own (root/pki/ca.crt)."""
    root.mkdir()
    c = SmtpCluster(root, n=1, submission=True, smarthost=f"127.0.0.1:{sink_port}")
    pki.init(root / "pki", [pki.NodeName("n1", c.nodes["n1"].host)], "smarthost.test")
    for name in ("tls.crt", "tls.key"):
        shutil.copy(root / "pki" / "n1" / name, root / name)
    return c


def relay(root: Path, smarthost: str, delivery: str, login: str = "") -> SmtpCluster:
    """One node relaying everything to `smarthost` with these [delivery] settings."""
    root.mkdir()
    c = SmtpCluster(root, n=1, smarthost=smarthost)
    if login:
        (root / "smarthost.auth").write_text(login + "\n")
        delivery += f'smarthost_auth_file = "{root / "smarthost.auth"}"\n'
    config = c.nodes["n1"].config
    config.write_text(config.read_text().replace("[delivery]\n", f"[delivery]\n{delivery}"))
    return c


def send(c: SmtpCluster, rcpt: str) -> None:
    node = c.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        s.sendmail("app@example.org", [rcpt], b"Subject: via provider\r\n\r\nhello\r\n")


def last_error(c: SmtpCluster, rcpt: str) -> str:
    for m in c.queued("n1"):
        for r in m["recipients"]:
            if r["address"] == rcpt and r["attempts"] > 0:
                return str(r["last_error"])
    return ""


def test_mail_goes_through_a_verified_tls_smarthost_that_wants_a_login(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    handler, port = sink
    smarthost = provider(tmp_path / "provider", port)
    host = f"{smarthost.nodes['n1'].host}:{smarthost.nodes['n1'].submission_port}"
    ca = tmp_path / "provider" / "pki" / "ca.crt"
    verify = f'smarthost_tls = "verify"\nsmarthost_ca_file = "{ca}"\n'
    ours = relay(tmp_path / "ours", host, verify, "alice:secret")
    with running(smarthost), running(ours):
        send(ours, "someone@far.example")
        wait_for("the sink to have it", lambda: len(handler.received) == 1, 60)
        rcpt, body = handler.received[0]
        assert rcpt == "someone@far.example" and b"hello" in body
        # The provider's Received line: it took the message over TLS, logged in as alice.
        assert b"with ESMTPSA" in body and b"by n1.relay.test" in body


@pytest.mark.parametrize(
    ("security", "login", "why"),
    [
        ('smarthost_tls = "encrypt"\n', "", "does not offer STARTTLS"),  # a plain sink
        ('smarthost_tls = "verify"\n', "", "CERTIFICATE_VERIFY_FAILED"),  # not the system's CAs
        ('smarthost_tls = "encrypt"\n', "alice:wrong", "535"),
    ],
    ids=["no STARTTLS", "unverified certificate", "wrong password"],
)
def test_a_smarthost_that_fails_the_security_asked_for_gets_nothing_and_mail_waits(
    tmp_path: Path, sink: tuple[Sink, int], security: str, login: str, why: str
) -> None:
    handler, port = sink
    if why == "does not offer STARTTLS":
        target, others = f"127.0.0.1:{port}", []  # the sink itself: no TLS there
    else:
        smarthost = provider(tmp_path / "provider", port)
        node = smarthost.nodes["n1"]
        target, others = f"{node.host}:{node.submission_port}", [smarthost]
    ours = relay(tmp_path / "ours", target, security, login)
    for c in others:
        c.start_all()
    try:
        with running(ours):
            send(ours, "someone@far.example")
            wait_for("a deferral", lambda: last_error(ours, "someone@far.example"), 60)
            assert why in last_error(ours, "someone@far.example")
            assert handler.received == []
    finally:
        for c in others:
            c.stop_all()


def test_a_port_465_smarthost_gets_tls_from_the_first_byte(tmp_path: Path) -> None:
    """smarthost_tls_wrapper (Postfix's smtp_tls_wrappermode): the provider's port
    speaks TLS at once and offers no STARTTLS; it wants a login too."""
    handler, logins = Sink(), []

    def authenticator(server: object, session: object, envelope: object, mechanism: str,
                      data: LoginPassword) -> AuthResult:  # fmt: skip
        logins.append((data.login, data.password))
        return AuthResult(success=(data.login, data.password) == (b"relay", b"pw"))

    pki.init(tmp_path / "pki", [pki.NodeName("provider", "127.0.0.1")], "smarthost.test")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(
        tmp_path / "pki" / "provider" / "tls.crt", tmp_path / "pki" / "provider" / "tls.key"
    )
    port = free_port("127.0.0.1")
    # auth_require_tls=False: aiosmtpd counts only STARTTLS as TLS; this port is all TLS.
    provider = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=tls,
                          authenticator=authenticator, auth_require_tls=False)  # fmt: skip
    provider.start()
    try:
        wrapper = (f'smarthost_tls = "verify"\nsmarthost_tls_wrapper = true\n'
                   f'smarthost_ca_file = "{tmp_path / "pki" / "ca.crt"}"\n')  # fmt: skip
        ours = relay(tmp_path / "ours", f"127.0.0.1:{port}", wrapper, "relay:pw")
        with running(ours):
            send(ours, "someone@far.example")
            wait_for("the provider to have it", lambda: len(handler.received) == 1, 60)
        assert logins == [(b"relay", b"pw")]
    finally:
        provider.stop()


class TlsSink(Sink):
    """A sink that offers STARTTLS, and notes whether each message came over TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.over_tls: list[bool] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.over_tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("with_ca", [True, False], ids=["our CA", "system CAs"])
def test_a_route_gets_the_tls_its_route_tls_says(tmp_path: Path, with_ca: bool) -> None:
    """Postfix's smtp_tls_policy_maps: an internal server behind a route, whose
    certificate comes from the company's own CA. With route_tls "verify" and that CA
    the mail goes over verified TLS; against the system's CAs it waits, and nothing is
    sent in the clear."""
    pki.init(tmp_path / "pki", [pki.NodeName("internal", "127.0.0.1")], "internal.test")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(
        tmp_path / "pki" / "internal" / "tls.crt", tmp_path / "pki" / "internal" / "tls.key"
    )
    handler, port = TlsSink(), free_port("127.0.0.1")
    internal = Controller(handler, hostname="127.0.0.1", port=port, tls_context=tls)
    internal.start()
    try:
        ca = f'route_ca_file = "{tmp_path / "pki" / "ca.crt"}"\n' if with_ca else ""
        route = (f'routes = {{ ".corp.example" = "127.0.0.1:{port}" }}\n'
                 f'route_tls = {{ ".corp.example" = "verify" }}\n{ca}')  # fmt: skip
        ours = relay(tmp_path / "ours", "127.0.0.1:9", route)
        with running(ours):
            send(ours, "someone@hq.corp.example")
            if with_ca:
                wait_for("the internal server to have it", lambda: len(handler.received) == 1)
                assert handler.over_tls == [True]
            else:
                wait_for("a deferral", lambda: last_error(ours, "someone@hq.corp.example"))
                assert "CERTIFICATE_VERIFY_FAILED" in last_error(ours, "someone@hq.corp.example")
                assert handler.received == []
    finally:
        internal.stop()
