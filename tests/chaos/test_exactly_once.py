"""The product's promise under faults: 2,000 messages, kill -9s and a pause during
delivery; every 250 delivered, nothing twice beyond what the cluster calls uncertain.

It found two bugs, both fixed: a transport sender task that died on uvloop's
RuntimeError and cut a restarted peer off, and SENDING recipients orphaned by a worker
that died and came back before the leader noticed. Runs about 12 s.
"""

from __future__ import annotations

import signal
import smtplib
import threading
from collections import Counter
from pathlib import Path

from aiosmtpd.controller import Controller

from tests.integration.kvcluster import free_port, wait_for
from tests.integration.sinks import Sink
from tests.integration.smtpnodes import SmtpCluster

MESSAGES = 2000
SESSIONS = 20


def send_all(cluster: SmtpCluster, accepted: set[str], stop: threading.Event) -> None:
    names = sorted(cluster.nodes)
    lock = threading.Lock()
    todo = iter(range(MESSAGES))

    def client(k: int) -> None:
        for n in todo:
            rcpt = f"m{n}@dest.example"
            # Spread over the nodes; a dead one is passed over as an MTA tries its next
            # MX, so every message is offered to the cluster however long nodes are down.
            live = cluster.live()
            order = names[(k + n) % len(names) :] + names[: (k + n) % len(names)]
            nid = next((x for x in order if x in live), names[0])
            node = cluster.nodes[nid]
            try:
                with smtplib.SMTP(node.host, node.smtp_port, timeout=60) as s:
                    s.sendmail("a@example.org", [rcpt], b"Subject: %d\r\n\r\nx\r\n" % n)
            except (OSError, smtplib.SMTPException):
                continue  # refused or cut off: not accepted, must not be delivered
            with lock:
                accepted.add(rcpt)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()


def test_exactly_once_through_kills_and_a_pause(tmp_path: Path) -> None:
    sink = Sink()
    port = free_port("127.0.0.1")
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, smarthost=f"127.0.0.1:{port}")
    accepted: set[str] = set()
    done = threading.Event()
    try:
        cluster.start_all()
        cluster.leader()
        sender = threading.Thread(target=send_all, args=(cluster, accepted, done))
        sender.start()
        wait_for("deliveries under way", lambda: len(sink.received) >= 200, 60)
        first = cluster.leader()
        cluster.kill(first)  # kill -9 of the leader during delivery
        second = next(n for n in cluster.live() if n != cluster.leader())
        cluster.kill(second)  # ...then another node, which comes back
        cluster.start(second)
        cluster.start(first)
        leader = cluster.leader()  # asked before the pause: a paused node cannot answer
        third = next(n for n in cluster.live() if n != leader)
        popen = cluster.nodes[third].popen
        assert popen is not None
        popen.send_signal(signal.SIGSTOP)  # longer than the down detection (5 s)

        def nothing_held_by_the_paused_node() -> bool:
            return not [
                r for m in cluster.queued(leader) for r in m["recipients"]
                if r["node"] == third and r["state"] in ("assigned", "sending")
            ]  # fmt: skip

        wait_for("the paused node's work to move on", nothing_held_by_the_paused_node, 60)
        popen.send_signal(signal.SIGCONT)
        sender.join(300)
        assert done.is_set()
        try:
            wait_for("every accepted message delivered",
                     lambda: accepted <= {r for r, _ in sink.received}, 240)  # fmt: skip
        except AssertionError:
            missing = accepted - {r for r, _ in sink.received}
            queued = {
                r["address"]: (r["state"], r["node"], r["last_error"][:60])
                for m in cluster.queued(cluster.leader()) for r in m["recipients"]
            }  # fmt: skip
            where = {a: queued.get(a, "NOT IN THE SPOOL") for a in sorted(missing)[:5]}
            raise AssertionError(f"{len(missing)} undelivered: {where}") from None
        try:
            wait_for("the spools to empty", lambda: all(
                not cluster.queued(n) for n in cluster.live()), 120)  # fmt: skip
        except AssertionError:
            left = cluster.queued(cluster.leader())
            raise AssertionError(f"{len(left)} left, e.g. {left[:3]}") from None
        counts = Counter(r for r, _ in sink.received)
        duplicates = sum(c - 1 for c in counts.values())
        stats = cluster.admin(cluster.leader(), "/v1/queue-stats")
        uncertain = stats["uncertain_total"]
        print(f"accepted {len(accepted)}, delivered {len(counts)}, "
              f"duplicates {duplicates}, uncertain {uncertain}")  # fmt: skip
        assert set(counts) <= {f"m{n}@dest.example" for n in range(MESSAGES)}
        assert set(counts) >= accepted
        assert duplicates <= uncertain
        assert len(accepted) > MESSAGES * 0.9
    finally:
        cluster.stop_all()
        controller.stop()
