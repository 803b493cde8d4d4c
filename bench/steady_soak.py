"""Does a node's footprint stay flat when it runs for a long time? Memory, file
descriptors, threads and disk of each node, round after round of the same load.

    PYTHONPATH=. .venv/bin/python -m bench.steady_soak [--rounds 40 | --minutes 80]
        [--workload 1024:20:3000] [--transfer-every 5]

The chaos harness shows that no mail is lost or sent twice; this shows what the
operator of a node that runs for months needs: that nothing grows without bound.
Three `smtpcluster serve` nodes relay to one `smtp-sink`, as in bench.smtp_bench (no
Postfix, no root). Each round sends the workload with `smtp-source` to a follower,
waits until the queue is empty, then reads each node's RSS, open file descriptors,
threads and CPU time so far from /proc, and the bytes and files under its data
directory. Every `--transfer-every` rounds the leadership moves to the next node, so
that connections, roles and the scheduler start over as they do in a real cluster's
life. At the end it prints each figure's change from the first round after the
warm-up to the last, and over the last quarter of the rounds.

Memory is expected to grow for the first hour: each node keeps the id of every message
that left the spool for an hour (docs/spool.md, tombstones). Run `--minutes 80` or
more to see it level off.

A footprint that stays flat is the expected result; a figure that rises round after
round is a leak to look for. Not a test: it asserts nothing, and it is not run by CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cpu_bench import cpu_seconds
from bench.smtp_bench import add_workloads, sink_cluster, throughput
from smtpcluster.admin_client import AdminClient
from tests.integration.smtpnodes import SmtpCluster


@dataclass(frozen=True)
class Footprint:
    rss_mib: float
    fds: int
    threads: int
    disk_mib: float
    files: int
    cpu_s: float  # since the node started: a window's share is the difference

    def __str__(self) -> str:
        return (f"rss {self.rss_mib:6.1f} MiB  fds {self.fds:3d}  threads {self.threads:2d}  "
                f"disk {self.disk_mib:7.1f} MiB in {self.files:3d} files  "
                f"cpu {self.cpu_s:8.1f} s")  # fmt: skip


def footprint(pid: int, data_dir: Path) -> Footprint:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    return Footprint(
        rss_mib=int(status["VmRSS"].split()[0]) / 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        disk_mib=sum(p.stat().st_size for p in files) / (1 << 20),
        files=len(files),
        cpu_s=cpu_seconds(pid),
    )


class Soak:
    def __init__(self, cluster: SmtpCluster) -> None:
        self.cluster = cluster
        self.ids = sorted(cluster.nodes)

    def drained(self) -> bool:
        stats = self.cluster.admin(self.cluster.leader(), "/v1/queue-stats?stale=1")
        return bool(stats["messages"] == 0)

    def sample(self) -> dict[str, Footprint]:
        out = {}
        for nid in self.ids:
            node = self.cluster.nodes[nid]
            assert node.popen is not None
            out[nid] = footprint(node.popen.pid, self.cluster.root / nid)
        return out

    def transfer(self) -> str:
        """Leadership to the next node by name; returns the new leader."""
        leader = self.cluster.leader()
        target = self.ids[(self.ids.index(leader) + 1) % len(self.ids)]
        node = self.cluster.nodes[leader]
        admin = AdminClient(f"http://{node.host}:{node.admin_port}", self.cluster.token)
        admin.post("/v1/cluster/transfer-leader", {"id": target})
        deadline = time.monotonic() + 30
        while self.cluster.leader() != target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"leadership did not move to {target}")
            time.sleep(0.1)
        return target

    def front(self) -> tuple[str, int]:
        """A follower's SMTP address: the mail is forwarded, as in the other benches."""
        leader = self.cluster.leader()
        node = self.cluster.nodes[next(n for n in self.ids if n != leader)]
        return node.host, node.smtp_port


def growth(first: dict[str, Footprint], last: dict[str, Footprint]) -> list[str]:
    lines = []
    for nid, a in first.items():
        b = last[nid]
        lines.append(
            f"{nid}: rss {b.rss_mib - a.rss_mib:+.1f} MiB, fds {b.fds - a.fds:+d}, "
            f"threads {b.threads - a.threads:+d}, disk {b.disk_mib - a.disk_mib:+.1f} MiB, "
            f"files {b.files - a.files:+d}"
        )
    return lines


def report(samples: list[dict[str, Footprint]], warm_up: int) -> None:
    last = len(samples)
    quarter = last - max(1, last // 4)
    for first in (warm_up, quarter):
        if 0 < first < last:
            print(f"growth from round {first} to round {last}:")
            for line in growth(samples[first - 1], samples[-1]):
                print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workloads(parser, "the smtp-source workload of each round (default 1024:20:3000)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--minutes", type=float, default=0,
                        help="run rounds for this long, instead of --rounds")  # fmt: skip
    parser.add_argument("--warm-up", type=int, default=3, metavar="ROUNDS",
                        help="rounds before the baseline the growth is counted from")  # fmt: skip
    parser.add_argument("--transfer-every", type=int, default=5, metavar="ROUNDS",
                        help="move the leadership every so many rounds (0: never)")  # fmt: skip
    args = parser.parse_args()
    [(size, sessions, n)] = args.workload or [(1024, 20, 3000)]
    length = f"{args.minutes:g} minutes" if args.minutes else f"{args.rounds} rounds"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{length} of {size} B x {sessions} sessions x {n}")  # fmt: skip
    samples: list[dict[str, Footprint]] = []
    end = time.monotonic() + args.minutes * 60
    with sink_cluster("steady-soak-") as cluster:
        soak = Soak(cluster)
        cluster.start_all()
        while time.monotonic() < end if args.minutes else len(samples) < args.rounds:
            r = len(samples) + 1
            if args.transfer_every and r > 1 and (r - 1) % args.transfer_every == 0:
                print(f"leadership moved to {soak.transfer()}", flush=True)
            accepted, _ = throughput(*soak.front(), size, sessions, n, drained=soak.drained)
            samples.append(soak.sample())
            print(f"round {r} ({time.strftime('%H:%M:%S')}): {accepted:.0f} msg/s accepted")
            for nid, fp in samples[-1].items():
                print(f"  {nid}: {fp}", flush=True)
        report(samples, args.warm_up)


if __name__ == "__main__":
    main()
