"""CPU per accepted message on each node of a 3-node cluster, by the node's part in it:
where issue 5's tail and the 100 KiB gap come from. On 2 cores, a message's latency
is mostly the wait for CPU the other processes hold, so this is the figure to cut.

    PYTHONPATH=. .venv/bin/python -m bench.cpu_bench [--workload 102400:20:1000] [--sequential 3000]

Three `smtpcluster serve` nodes relaying to one `smtp-sink`, as in bench.smtp_bench
(no Postfix, no root). The mail goes to a follower. Each node's user and system CPU
(from /proc/PID/stat) over the workload is divided by the messages sent. The roles:
"leader"; "taking", the follower the clients send to (it forwards each Accept); and
"third", the other follower, which the scheduler gives most deliveries. "Sequential"
is one smtplib client, as in smtp_bench's latency turns; its p50 and p99 are printed
too. Not a test: figures for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from bench.smtp_bench import add_workloads, latency, sink_cluster, throughput
from tests.integration.smtpnodes import SmtpCluster


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Roles:
    """The nodes of a running cluster by their part in accepting mail."""

    def __init__(self, cluster: SmtpCluster) -> None:
        self.cluster = cluster
        leader = cluster.leader()
        taking, third = sorted(n for n in cluster.nodes if n != leader)
        self.front = cluster.nodes[taking]
        self.pids: dict[str, int] = {}
        for role, nid in (("leader", leader), ("taking", taking), ("third", third)):
            popen = cluster.nodes[nid].popen
            assert popen is not None
            self.pids[role] = popen.pid
        self.leader = leader

    def drained(self) -> bool:
        stats = self.cluster.admin(self.leader, "/v1/queue-stats?stale=1")
        return bool(stats["messages"] == 0)

    def measure(self, n: int, run: Callable[[], str]) -> str:
        """`run()`'s own figures, then each role's CPU per message in ms."""
        before = {role: cpu_seconds(pid) for role, pid in self.pids.items()}
        figures = run()
        per = {role: (cpu_seconds(p) - before[role]) / n * 1000 for role, p in self.pids.items()}
        roles = ", ".join(f"{role} {ms:.2f}" for role, ms in per.items())
        return f"{figures}; CPU ms/message: {roles}, all {sum(per.values()):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workloads(parser, "smtp-source workloads (repeatable; default 1024:20:3000 and "
                  "102400:20:1000)")  # fmt: skip
    parser.add_argument("--sequential", type=int, default=3000, metavar="N",
                        help="messages for the sequential client (0: none)")  # fmt: skip
    args = parser.parse_args()
    workloads = args.workload or [(1024, 20, 3000), (102400, 20, 1000)]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")  # fmt: skip
    with sink_cluster("cpu-bench-") as cluster:
        cluster.start_all()
        roles = Roles(cluster)
        host, port = roles.front.host, roles.front.smtp_port
        for size, sessions, n in workloads:

            def run(size: int = size, sessions: int = sessions, n: int = n) -> str:
                accepted, _ = throughput(host, port, size, sessions, n, drained=roles.drained)
                return f"{size} B x {sessions} sessions x {n}: {accepted:.0f} msg/s accepted"

            print(roles.measure(n, run), flush=True)
        if args.sequential:

            def sequential() -> str:
                ms = sorted(t * 1000 for t in latency(host, port, args.sequential))
                p50, p99 = ms[len(ms) // 2], ms[int(len(ms) * 0.99)]
                return f"sequential x {args.sequential}: p50 {p50:.2f} ms, p99 {p99:.2f} ms"

            print(roles.measure(args.sequential, sequential), flush=True)


if __name__ == "__main__":
    main()
