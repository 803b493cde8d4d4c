"""Bad input gets a clear error, and the node keeps serving everyone else."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kvcluster import wait_for
from tests.integration.observe import scrape, value
from tests.integration.smtpnodes import SmtpCluster, running

MESSAGE = b"Subject: ok\r\n\r\nfine\r\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpCluster]:
    with running(SmtpCluster(Path(tmp_path_factory.mktemp("malformed")), n=1, idle="2s")) as c:
        yield c


class Raw:
    """A bare socket speaking (or mis-speaking) SMTP."""

    def __init__(self, c: SmtpCluster) -> None:
        node = c.nodes["n1"]
        self.sock = socket.create_connection((node.host, node.smtp_port), timeout=20)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        lines = [self.file.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self.file.readline())
        return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def still_serving(c: SmtpCluster) -> None:
    node = c.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=20) as s:
        assert s.sendmail("a@example.org", ["u@dest.example"], MESSAGE) == {}


def test_binary_junk_gets_a_5xx_and_the_session_goes_on(cluster: SmtpCluster) -> None:
    raw = Raw(cluster)
    raw.send(b"\x00\xff\xfe\x80junk\x01\r\n")
    assert raw.reply()[:1] == b"5"
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith(b"250")
    raw.close()
    still_serving(cluster)


def test_a_100_kb_line_is_refused_and_the_session_goes_on(cluster: SmtpCluster) -> None:
    raw = Raw(cluster)
    raw.send(b"EHLO " + b"a" * 100_000 + b"\r\n")
    assert raw.reply().startswith(b"500")
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith(b"250")
    raw.close()
    still_serving(cluster)


def test_a_flood_of_pipelined_commands_is_answered_in_order(cluster: SmtpCluster) -> None:
    transaction = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@dest.example>\r\nRSET\r\n"
    raw = Raw(cluster)
    raw.send(b"EHLO flood.test\r\n" + transaction * 90 + b"BOGUS\r\nNOOP\r\n")
    assert raw.reply().startswith(b"250-")
    replies = [raw.reply()[:3] for _ in range(270)]
    assert replies == [b"250"] * 270
    assert raw.reply()[:1] == b"5"
    assert raw.reply().startswith(b"250")
    raw.close()
    still_serving(cluster)


def test_a_flood_of_junk_commands_is_cut_off_at_the_junk_limit(cluster: SmtpCluster) -> None:
    raw = Raw(cluster)
    raw.send(b"EHLO junk.test\r\n" + b"NOOP\r\n" * 5000)
    assert raw.reply().startswith(b"250-")
    assert all(raw.reply().startswith(b"250") for _ in range(100))  # max_junk_commands
    assert raw.reply().startswith(b"421 4.7.0")
    wait_for("the junk sender to be cut off", lambda: raw.file.read() == b"", 20)
    raw.close()
    still_serving(cluster)


def test_a_queued_message_resets_the_junk_count(cluster: SmtpCluster) -> None:
    node = cluster.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=20) as s:
        for _ in range(3):
            for _ in range(60):
                assert s.noop()[0] == 250
            assert s.sendmail("a@example.org", ["u@dest.example"], MESSAGE) == {}


def test_a_session_is_cut_off_after_too_many_errors(cluster: SmtpCluster) -> None:
    raw = Raw(cluster)
    raw.send(b"EHLO errors.test\r\n" + b"RCPT TO:<u@dest.example>\r\n" * 30)
    assert raw.reply().startswith(b"250-")
    assert all(raw.reply().startswith(b"503") for _ in range(20))  # max_errors
    assert raw.reply().startswith(b"421 4.7.0")
    wait_for("the erring client to be cut off", lambda: raw.file.read() == b"", 20)
    raw.close()
    still_serving(cluster)


def test_a_client_that_stops_mid_data_is_cut_off_and_nothing_is_queued(
    cluster: SmtpCluster,
) -> None:
    raw = Raw(cluster)
    raw.send(b"EHLO stall.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<stalled@dest.example>\r\n")
    assert [raw.reply()[:3] for _ in range(3)] == [b"250", b"250", b"250"]
    raw.send(b"DATA\r\n")
    assert raw.reply().startswith(b"354")
    raw.send(b"Subject: half\r\n\r\nthe rest never comes")
    still_serving(cluster)  # others are served while it stalls
    wait_for("the stalled client to be cut off", lambda: raw.file.read() is not None, 30)
    raw.close()
    rcpts = {r["address"] for m in cluster.queued("n1") for r in m["recipients"]}
    assert "stalled@dest.example" not in rcpts


def test_a_client_holding_too_many_connections_gets_421_and_others_are_served(
    tmp_path: Path,
) -> None:
    """Postfix's smtpd_client_connection_count_limit: idle connections from one address
    past max_sessions_per_client are refused at once, not held open to exhaust the
    node's descriptors; a closed one makes room."""
    c = SmtpCluster(tmp_path, n=1, relay_networks='"10.0.0.0/8"')  # 127.0.0.1: an outsider
    c.set_smtp("n1", "max_sessions_per_client = 2")
    with running(c):
        held = [Raw(c), Raw(c)]
        node = c.nodes["n1"]
        with socket.create_connection((node.host, node.smtp_port), timeout=20) as sock:
            refused = sock.makefile("rb").readline()
            assert refused == b"421 4.7.0 Too many connections from 127.0.0.1\r\n"
            assert sock.recv(1) == b""  # and closed
        held[0].send(b"QUIT\r\n")
        assert held[0].reply().startswith(b"221")
        wait_for("a place again", lambda: _greeted(c), 20)
        assert value(scrape(c, "n1"), "smtpcluster_connections_refused_total") >= 1
        held[1].send(b"NOOP\r\n")
        assert held[1].reply().startswith(b"250")  # the held ones were served throughout


def test_message_data_past_the_nodes_memory_budget_gets_452_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """Twenty clients sending 24 MiB each at once had a node killed for want of memory.
    Message data in memory is bounded over all sessions: the message that finds the
    budget spent gets 452 4.3.1 (try later), the one that holds it goes through."""
    budget = 5 << 19  # 2.5 MiB; a session's data is counted a block (256 KiB) at a time
    c = SmtpCluster(tmp_path, n=1, max_size=budget)
    c.set_smtp("n1", f"max_data_in_memory = {budget}")
    body = (b"x" * 98 + b"\r\n") * 20_000  # 2 MB: two of them do not fit
    with running(c):
        holder, late = Raw(c), Raw(c)
        for raw in (holder, late):
            raw.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n"
                     b"RCPT TO:<u@dest.example>\r\nDATA\r\n")  # fmt: skip
            assert [raw.reply()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        holder.send(body)  # and no final dot yet

        def held() -> float:
            return value(scrape(c, "n1"), "smtpcluster_smtp_data_in_memory_bytes")

        wait_for("a block of the first message's data held", lambda: held() >= 1 << 20, 20)
        late.send(body + b".\r\n")
        assert late.reply().startswith(b"452 4.3.1 ")
        holder.send(b".\r\n")
        assert holder.reply().startswith(b"250 2.0.0 ")
        late.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<v@dest.example>\r\nDATA\r\n")
        assert [late.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        late.send(body + b".\r\n")
        assert late.reply().startswith(b"250 2.0.0 ")  # room again: the client's retry
        metrics = scrape(c, "n1")
        assert value(metrics, "smtpcluster_messages_refused_no_memory_total") == 1
        assert value(metrics, "smtpcluster_smtp_data_in_memory_bytes") == 0
        assert c.queued_rcpts("n1") == {"u@dest.example", "v@dest.example"}


def _greeted(c: SmtpCluster) -> bool:
    node = c.nodes["n1"]
    with socket.create_connection((node.host, node.smtp_port), timeout=20) as sock:
        return sock.makefile("rb").readline().startswith(b"220")
