"""SMTP acceptance benchmark on a 3-node cluster with Postfix's smtp-source.

    scripts/setup-system && PYTHONPATH=. .venv/bin/python -m bench.smtp_bench

Throughput: smtp-source sends N messages over S sessions to one node (a follower, so
every Accept is forwarded to the leader), timed from start to finish. Latency: one
sequential smtplib client, time from the end of DATA to the 250. Not yet: the same run
against Postfix (see the note on issue 5). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import platform
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.smtpnodes import SmtpCluster

WORKLOADS = [(1024, 1, 500), (1024, 20, 3000), (1024, 100, 3000), (102400, 1, 200),
             (102400, 20, 1000), (102400, 100, 1000)]  # fmt: skip


def throughput(host: str, port: int, size: int, sessions: int, n: int) -> float:
    began = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
         "-f", "bench@example.org", "-t", "sink@dest.example", f"{host}:{port}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return n / (time.perf_counter() - began)


def latency(host: str, port: int, n: int = 500) -> tuple[float, float]:
    body = b"Subject: latency\r\n\r\n" + (b"x" * 98 + b"\r\n") * 10
    took = []
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("bench.test")
        for _ in range(n):
            s.mail("bench@example.org")
            s.rcpt("sink@dest.example")
            s.putcmd("data")
            assert s.getreply()[0] == 354
            began = time.perf_counter()
            s.send(body + b".\r\n")
            code, reply = s.getreply()
            took.append(time.perf_counter() - began)
            assert code == 250, reply
    took.sort()
    return took[len(took) // 2] * 1000, took[int(len(took) * 0.99)] * 1000


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"Python {platform.python_version()}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    cluster = SmtpCluster(root, relay_networks='"127.0.0.0/8"', max_size=1 << 20)
    try:
        cluster.start_all()
        leader = cluster.leader()
        follower = next(n for n in cluster.nodes if n != leader)
        node = cluster.nodes[follower]
        for size, sessions, n in WORKLOADS:
            rate = throughput(node.host, node.smtp_port, size, sessions, n)
            print(f"ours, {size // 1024} KiB, {sessions} sessions: {rate:,.0f} messages/s")
        p50, p99 = latency(node.host, node.smtp_port)
        print(f"ours, sequential 1 KiB: DATA-to-250 p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    finally:
        cluster.stop_all()


if __name__ == "__main__":
    main()
