"""SIGTERM drains a node: its listeners close, its open sessions finish, leadership
moves to another voter, its deliveries finish or go back to the queue. Clients of a
steady stream of mail see no 4xx, and nothing is lost or sent twice."""

from __future__ import annotations

import signal
import smtplib
import threading
from collections import Counter
from pathlib import Path

from tests.integration.kvcluster import wait_for
from tests.integration.sinks import Sink, sink_and_cluster
from tests.integration.smtpnodes import SmtpCluster


class Stream:
    """Clients that send one message per connection, round the nodes, and move on to
    the next node when one does not answer (as an MTA tries its next MX)."""

    def __init__(self, cluster: SmtpCluster, clients: int = 5) -> None:
        self.cluster = cluster
        self.accepted: set[str] = set()
        self.refused: list[tuple[str, int, bytes | str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(k,)) for k in range(clients)]
        for t in self.threads:
            t.start()

    def client(self, k: int) -> None:
        names = sorted(self.cluster.nodes)
        n = 0
        while not self.stop.is_set():
            rcpt = f"c{k}-{n}@dest.example"
            for offset in range(len(names)):
                node = self.cluster.nodes[names[(k + n + offset) % len(names)]]
                if self.send(node.host, node.smtp_port, rcpt):
                    break
            n += 1

    def send(self, host: str, port: int, rcpt: str) -> bool:
        """True when the message got an answer (250 or a refusal), False when the node
        could not be reached or dropped the connection before answering."""
        try:
            with smtplib.SMTP(host, port, timeout=30) as s:
                s.sendmail("stream@example.org", [rcpt], b"Subject: s\r\n\r\nsteady\r\n")
        except smtplib.SMTPResponseException as exc:
            with self.lock:
                self.refused.append((rcpt, exc.smtp_code, exc.smtp_error))
            return True
        except smtplib.SMTPRecipientsRefused as exc:
            with self.lock:
                for code, text in exc.recipients.values():
                    self.refused.append((rcpt, code, text))
            return True
        except (OSError, smtplib.SMTPException):
            return False
        with self.lock:
            self.accepted.add(rcpt)
        return True

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_sigterm_on_the_leader_moves_leadership_with_no_4xx_and_nothing_lost(
    tmp_path: Path,
) -> None:
    sink = Sink()
    with sink_and_cluster(tmp_path, sink) as cluster:
        old = cluster.leader()
        stream = Stream(cluster)
        try:
            wait_for("mail flowing", lambda: len(stream.accepted) >= 100, 60)
            popen = cluster.nodes[old].popen
            assert popen is not None
            popen.send_signal(signal.SIGTERM)
            code = popen.wait(30)
            cluster.nodes[old].popen = None
            new = cluster.leader()
            count = len(stream.accepted)
            wait_for("mail flowing on", lambda: len(stream.accepted) >= count + 100, 60)
        finally:
            stream.finish()
        assert code == 0
        assert new != old
        assert stream.refused == []  # no 4xx or 5xx, not even a 421
        wait_for("every accepted message delivered",
                 lambda: stream.accepted <= {r for r, _ in sink.received}, 120)  # fmt: skip
        counts = Counter(r for r, _ in sink.received)
        assert [r for r, c in counts.items() if c > 1] == []
        assert cluster.admin(new, "/v1/queue-stats")["uncertain_total"] == 0
        log = (cluster.root / f"{old}.log").read_text()
        assert f"node {old} drained" in log
