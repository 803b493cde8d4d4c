"""SMTP acceptance and end-to-end benchmark: a 3-node cluster against Postfix, same run.

    scripts/setup-system && sudo PYTHONPATH=. .venv/bin/python -m bench.smtp_bench

Both relay everything to one smtp-sink: ours through `smarthost`, a private Postfix
instance (as shipped: fsync on) through `relayhost`. Throughput: smtp-source sends N
messages over S sessions; "accept" is timed until smtp-source has its last 250, "end
to end" until the queue is empty again (every message delivered to the sink). Ours
gets the mail on a follower, so every Accept is forwarded to the leader. Latency: one
sequential smtplib client, from the end of DATA to the 250. Postfix needs root to
start. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.kvcluster import free_port, wait_for
from tests.integration.smtpnodes import SmtpCluster

Workload = tuple[int, int, int]  # message size, sessions, messages
WORKLOADS: list[Workload] = [(1024, 1, 500), (1024, 20, 3000), (1024, 100, 3000), (102400, 1, 200),
             (102400, 20, 1000), (102400, 100, 1000)]  # fmt: skip


def throughput(
    host: str, port: int, size: int, sessions: int, n: int, *, drained: Callable[[], bool]
) -> tuple[float, float]:
    """Messages/s accepted, and messages/s delivered (until `drained()`)."""
    began = time.perf_counter()
    out = subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
         "-f", "bench@example.org", "-t", "sink@dest.example", f"{host}:{port}"],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    accepted = time.perf_counter() - began
    if out.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {out.stderr.strip()[:300]}")
    wait_for("the queue to drain", drained, 600)
    return n / accepted, n / (time.perf_counter() - began)


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


def _greets(host: str, port: int) -> bool:
    try:
        with smtplib.SMTP(host, port, timeout=5) as s:
            return s.noop()[0] == 250
    except OSError:
        return False


class Postfix:
    """A private Postfix instance on 127.0.0.1, relaying to an smtp-sink."""

    def __init__(self, root: Path, sink: int) -> None:
        self.root, self.conf = root, root / "conf"
        self.port = free_port("127.0.0.1")
        for d in ("conf", "spool", "data"):
            (root / d).mkdir(parents=True)
        root.parent.chmod(0o755)  # mkdtemp's 0700 would keep Postfix's own user out
        for f in ("main.cf", "master.cf"):
            shutil.copy(f"/etc/postfix/{f}", self.conf / f)
        self._postconf(
            f"queue_directory = {root / 'spool'}", f"data_directory = {root / 'data'}",
            "meta_directory = /etc/postfix", "mynetworks = 127.0.0.0/8",
            f"relayhost = [127.0.0.1]:{sink}", "inet_interfaces = 127.0.0.1",
            "myhostname = bench.test", "mydestination =",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"maillog_file_prefixes = {root}", f"maillog_file = {root / 'maillog'}",
        )  # fmt: skip
        master = (self.conf / "master.cf").read_text()
        smtpd = "smtp      inet  n       -       y       -       -       smtpd"
        assert smtpd in master
        (self.conf / "master.cf").write_text(
            master.replace(smtpd, f"127.0.0.1:{self.port} inet n - n - - smtpd")
        )
        subprocess.run(
            ["postconf", "-e", f"alternate_config_directories = {self.conf}"], check=True
        )
        shutil.chown(root / "data", "postfix")
        self._postfix("set-permissions")
        self._postfix("start")
        wait_for("postfix to listen", lambda: _greets("127.0.0.1", self.port), 30)

    def _postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), "-e", *settings], check=True)

    def _postfix(self, verb: str) -> None:
        # postfix(1) reports its errors only to a terminal or syslog: give it a terminal.
        cmd = f"postfix -c {self.conf} {verb}"
        out = subprocess.run(
            ["script", "-qc", cmd, "/dev/null"], check=False, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"{cmd}: {out.stdout}{out.stderr}")

    def drained(self) -> bool:
        out = subprocess.run(
            ["postqueue", "-c", str(self.conf), "-j"], check=True, capture_output=True
        )
        return not out.stdout.strip()

    def stop(self) -> None:
        self._postfix("stop")
        subprocess.run(["postconf", "-X", "alternate_config_directories"], check=True)


def run_workloads(
    name: str, host: str, port: int, drained: Callable[[], bool], workloads: list[Workload]
) -> dict[str, float]:
    out = {}
    for size, sessions, n in workloads:
        accept, e2e = throughput(host, port, size, sessions, n, drained=drained)
        key = f"{size // 1024}KiB_s{sessions}"
        out[f"{key}_accept"], out[f"{key}_e2e"] = accept, e2e
        print(f"{name}, {size // 1024} KiB, {sessions} sessions: accepted {accept:,.0f}"
              f" messages/s, delivered end to end {e2e:,.0f} messages/s")  # fmt: skip
    p50, p99 = latency(host, port)
    out["seq_p50_ms"], out["seq_p99_ms"] = p50, p99
    print(f"{name}, sequential 1 KiB: DATA-to-250 p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return out


def run_ours(root: Path, sink_port: int, workloads: list[Workload]) -> dict[str, float]:
    cluster = SmtpCluster(
        root, relay_networks='"127.0.0.0/8"', max_size=1 << 20,
        smarthost=f"127.0.0.1:{sink_port}",
    )  # fmt: skip
    try:
        cluster.start_all()
        leader = cluster.leader()
        follower = cluster.nodes[next(n for n in cluster.nodes if n != leader)]

        def drained() -> bool:
            return bool(cluster.admin(leader, "/v1/queue-stats?stale=1")["messages"] == 0)

        return run_workloads("ours", follower.host, follower.smtp_port, drained, workloads)
    finally:
        cluster.stop_all()


def _workload(text: str) -> Workload:
    size, sessions, n = map(int, text.split(":"))
    return size, sessions, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--workload", action="append", type=_workload, metavar="SIZE:SESSIONS:N",
        help="run only these, e.g. 1024:20:3000 (repeatable)",
    )  # fmt: skip
    workloads = parser.parse_args().workload or WORKLOADS
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"Python {platform.python_version()}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    (root / "ours").mkdir()
    sink_port = free_port("127.0.0.1")
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "postfix", f"127.0.0.1:{sink_port}", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ours = run_ours(root / "ours", sink_port, workloads)
        postfix = Postfix(root / "postfix", sink_port)
        try:
            theirs = run_workloads("postfix", "127.0.0.1", postfix.port, postfix.drained, workloads)
        finally:
            postfix.stop()
    finally:
        sink.kill()
    print("\n| workload | ours | postfix | ours/postfix |\n|---|---|---|---|")
    for key, value in ours.items():
        print(f"| {key} | {value:,.2f} | {theirs[key]:,.2f} | {value / theirs[key]:.2f} |")


if __name__ == "__main__":
    main()
