"""Port 587: STARTTLS first, then AUTH (PLAIN or LOGIN), then mail. Port 465: TLS from
the first byte (RFC 8314), then AUTH, then mail."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kvcluster import free_ports, wait_for
from tests.integration.observe import scrape, value
from tests.integration.smtpnodes import SmtpCluster, running

OUTSIDER = ("127.0.0.9", 0)  # not in relay_networks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpCluster]:
    root = Path(tmp_path_factory.mktemp("submission"))
    c = SmtpCluster(root, n=1, submission=True)
    host = c.nodes["n1"].host
    c.set_smtp("n1", f'submissions_listen = ["{host}:{free_ports(host, 1)[0]}"]')
    with running(c):
        yield c


def submissions_port(c: SmtpCluster) -> int:
    found = re.search(r'submissions_listen = \["[\d.]+:(\d+)"\]', c.nodes["n1"].config.read_text())
    assert found is not None
    return int(found.group(1))


def implicit_tls_client(c: SmtpCluster) -> smtplib.SMTP_SSL:
    node = c.nodes["n1"]
    s = smtplib.SMTP_SSL(
        node.host, submissions_port(c), timeout=20, source_address=OUTSIDER, context=insecure()
    )
    s.ehlo("laptop.test")
    return s


def client(c: SmtpCluster) -> smtplib.SMTP:
    node = c.nodes["n1"]
    s = smtplib.SMTP(node.host, node.submission_port, timeout=20, source_address=OUTSIDER)
    s.ehlo("laptop.test")
    return s


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
    return ctx


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_authenticated_submission_may_relay_anywhere(cluster: SmtpCluster, mechanism: str) -> None:
    with client(cluster) as s:
        s.starttls(context=insecure())
        s.ehlo("laptop.test")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        s.user, s.password = "alice", "secret"
        code, _ = s.auth(mechanism, getattr(s, f"auth_{mechanism.lower()}"))
        assert code == 235
        rcpt = f"friend-{mechanism.lower()}@outside.example"
        assert s.sendmail("alice@example.org", [rcpt], b"Subject: hi\r\n\r\nx\r\n") == {}
    queued = cluster.queued("n1")
    [msg] = [m for m in queued if m["recipients"][0]["address"] == rcpt]
    shown = cluster.admin("n1", f"/v1/queue/{msg['id']}?body=1")
    assert "with ESMTPSA" in shown["body"]  # the Received header records TLS and AUTH


def test_auth_before_starttls_is_refused(cluster: SmtpCluster) -> None:
    with client(cluster) as s:
        assert "auth" not in s.esmtp_features  # not even offered
        token = base64.b64encode(b"\0alice\0secret").decode()
        code, _ = s.docmd("AUTH", f"PLAIN {token}")
        assert code >= 500


def test_mail_before_starttls_and_before_auth_is_refused(cluster: SmtpCluster) -> None:
    with client(cluster) as s:
        assert s.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530
        s.starttls(context=insecure())
        s.ehlo("laptop.test")
        assert s.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530


def test_a_wrong_password_is_refused(cluster: SmtpCluster) -> None:
    with client(cluster) as s:
        s.starttls(context=insecure())
        s.ehlo("laptop.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "guess")


def test_a_session_counts_once_against_its_clients_limit_across_starttls(
    tmp_path: Path,
) -> None:
    """STARTTLS makes the session's connection anew. Counted twice, a TLS session would
    leave one place taken when it ends, and a client would be locked out for good
    after max_sessions_per_client of them."""
    c = SmtpCluster(tmp_path, n=1, submission=True)
    c.set_smtp("n1", "max_sessions_per_client = 2")
    with running(c):
        for k in range(2):
            with client(c) as s:
                s.starttls(context=insecure())
                s.ehlo("laptop.test")
                s.login("alice", "secret")
                assert s.sendmail("alice@example.org", [f"x{k}@outside.example"], b"b\r\n") == {}
        # Both ended: two places again, and no more.
        wait_for(
            "the sessions' ends", lambda: value(scrape(c, "n1"), "smtpcluster_smtp_sessions") == 0
        )
        held = [client(c), client(c)]
        with pytest.raises(smtplib.SMTPConnectError) as third:
            client(c)
        assert third.value.smtp_code == 421
        for s in held:
            s.close()


def test_port_465_is_tls_from_the_first_byte_then_auth_then_mail(cluster: SmtpCluster) -> None:
    with implicit_tls_client(cluster) as s:
        assert "starttls" not in s.esmtp_features  # already encrypted
        assert "PLAIN" in s.esmtp_features["auth"]
        assert s.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530  # AUTH first
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "guess")
        assert s.login("alice", "secret")[0] == 235
        rcpt = "friend-465@outside.example"
        assert s.sendmail("alice@example.org", [rcpt], b"Subject: hi\r\n\r\nx\r\n") == {}
    [msg] = [m for m in cluster.queued("n1") if m["recipients"][0]["address"] == rcpt]
    shown = cluster.admin("n1", f"/v1/queue/{msg['id']}?body=1")
    assert "with ESMTPSA" in shown["body"]  # the Received header records TLS and AUTH


def test_swaks_submits_on_port_465(cluster: SmtpCluster) -> None:
    """A real client's implicit TLS (swaks --tls-on-connect), AUTH PLAIN."""
    node = cluster.nodes["n1"]
    out = subprocess.run(
        ["swaks", "--server", node.host, "--port", str(submissions_port(cluster)),
         "--tls-on-connect", "--auth", "PLAIN", "--auth-user", "alice",
         "--auth-password", "secret", "--from", "alice@example.org",
         "--to", "swaks-465@outside.example", "--helo", "laptop.test", "--timeout", "30"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0 Authentication successful" in out.stdout
    assert "swaks-465@outside.example" in cluster.queued_rcpts("n1")


def test_plain_text_on_port_465_gets_nowhere_and_others_are_served(cluster: SmtpCluster) -> None:
    node = cluster.nodes["n1"]
    with socket.create_connection((node.host, submissions_port(cluster)), timeout=20) as raw:
        raw.sendall(b"EHLO laptop.test\r\nMAIL FROM:<a@example.org>\r\n")
        try:
            answer = raw.recv(4096)  # no greeting: the TLS handshake fails, and it ends
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"2"), answer
    with implicit_tls_client(cluster) as s:
        assert s.noop()[0] == 250


def test_a_users_messages_are_limited_wherever_it_connects_from(tmp_path: Path) -> None:
    """client_message_rate_limit counts an authenticated session's messages against its
    user: a stolen password used from many addresses still sends only so much."""
    c = SmtpCluster(tmp_path, n=1, submission=True)
    c.set_smtp("n1", "client_message_rate_limit = 2")
    node = c.nodes["n1"]
    replies = []
    with running(c):
        for source in ("127.0.0.9", "127.0.0.10", "127.0.0.11"):
            with smtplib.SMTP(node.host, node.submission_port, timeout=20,
                              source_address=(source, 0)) as s:  # fmt: skip
                s.ehlo("laptop.test")
                s.starttls(context=insecure())
                s.ehlo("laptop.test")
                s.login("alice", "secret")
                replies.append(s.docmd("MAIL", "FROM:<alice@example.org>"))
        counted = value(scrape(c, "n1"), "smtpcluster_rate_limited_total", limit="message")
    assert [code for code, _ in replies] == [250, 250, 450]
    assert b"4.7.1 Too much mail from user alice" in replies[2][1]
    assert counted == 1


def test_starttls_inside_tls_is_refused_and_the_session_goes_on(cluster: SmtpCluster) -> None:
    """RFC 3207 4.2: it was answered 220, and a handshake begun inside the session
    dropped the client. On 465 too, where the session is TLS from the start."""
    with client(cluster) as s:
        s.starttls(context=insecure())
        s.ehlo("laptop.test")
        assert s.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        s.user, s.password = "alice", "secret"
        assert s.auth("PLAIN", s.auth_plain)[0] == 235  # the same session, still usable
    with implicit_tls_client(cluster) as s:
        assert s.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        assert s.noop()[0] == 250
