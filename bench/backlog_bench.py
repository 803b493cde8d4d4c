"""Acceptance latency while the spool holds a backlog: the queue an operator has when a
destination has been down for a while. Snapshots of that spool come every 10,000 log
entries, so this shows whether they (or anything else that grows with the queue) hold
up the 250s.

    PYTHONPATH=. .venv/bin/python -m bench.backlog_bench [--backlog 30000] [--rounds 5]

Three `smtpcluster serve` nodes on 127.0.0.1-3 whose smarthost is a closed port and
whose retry schedule is an hour: `smtp-source` (20 sessions) fills the queue, then one
smtplib client sends rounds of 2,000 sequential messages to a follower. Prints each
round's DATA-to-250 p50, p99 and worst. Not a test: figures for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.smtp_bench import latency
from tests.integration.kvcluster import free_port
from tests.integration.smtpnodes import SmtpCluster

ROUND = 2000


class BacklogCluster(SmtpCluster):
    @staticmethod
    def _delivery(smarthost: str, nameservers: str, mx_port: int, lifetime: str) -> str:
        return (
            f'[delivery]\nsmarthost = "{smarthost}"\nretry_schedule = ["1h"]\n'
            f'mx_port = {mx_port}\nmax_queue_lifetime = "5d"\n'
        )


def fill(host: str, port: int, n: int) -> float:
    began = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-s", "20", "-m", str(n), "-l", "1024", "-f", "bench@example.org",
         "-t", "sink@dest.example", f"{host}:{port}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backlog", type=int, default=30_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"{platform.node()}, Python {platform.python_version()}, backlog {args.backlog:,}")
    root = Path(tempfile.mkdtemp(prefix="backlog-bench-"))
    closed = free_port("127.0.0.1")
    cluster = BacklogCluster(
        root, relay_networks='"127.0.0.0/8"', max_size=1 << 20, smarthost=f"127.0.0.1:{closed}"
    )
    try:
        cluster.start_all()
        leader = cluster.leader()
        front = cluster.nodes[next(n for n in cluster.nodes if n != leader)]
        took = fill(front.host, front.smtp_port, args.backlog)
        print(f"queued {args.backlog:,} messages in {took:.0f} s", flush=True)
        for k in range(args.rounds):
            ms = sorted(t * 1000 for t in latency(front.host, front.smtp_port, ROUND))
            p50, p99 = ms[ROUND // 2], ms[int(ROUND * 0.99)]
            print(f"round {k}: DATA-to-250 p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                  f"worst {ms[-1]:.0f} ms", flush=True)  # fmt: skip
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
