"""SMTP acceptance benchmark: a 3-node cluster against Postfix, in the same run.

    scripts/setup-system && sudo PYTHONPATH=. .venv/bin/python -m bench.smtp_bench

Throughput: smtp-source sends N messages over S sessions, timed from start to finish;
to a follower of ours (so every Accept is forwarded to the leader) and to a private
Postfix instance (as shipped: fsync on) that relays everything to smtp-sink. Latency:
one sequential smtplib client, from the end of DATA to the 250. Postfix needs root to
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
from pathlib import Path

from tests.integration.kvcluster import free_port, wait_for
from tests.integration.smtpnodes import SmtpCluster

WORKLOADS = [(1024, 1, 500), (1024, 20, 3000), (1024, 100, 3000), (102400, 1, 200),
             (102400, 20, 1000), (102400, 100, 1000)]  # fmt: skip


def throughput(host: str, port: int, size: int, sessions: int, n: int) -> float:
    began = time.perf_counter()
    out = subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
         "-f", "bench@example.org", "-t", "sink@dest.example", f"{host}:{port}"],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - began
    if out.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {out.stderr.strip()[:300]}")
    return n / elapsed


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

    def __init__(self, root: Path) -> None:
        self.root, self.conf = root, root / "conf"
        self.port, sink = free_port("127.0.0.1"), free_port("127.0.0.1")
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
        self.sink = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", f"127.0.0.1:{sink}", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
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

    def stop(self) -> None:
        self._postfix("stop")
        self.sink.kill()
        subprocess.run(["postconf", "-X", "alternate_config_directories"], check=True)


def run_workloads(name: str, host: str, port: int) -> dict[str, float]:
    out = {}
    for size, sessions, n in WORKLOADS:
        rate = throughput(host, port, size, sessions, n)
        out[f"{size // 1024}KiB_s{sessions}"] = rate
        print(f"{name}, {size // 1024} KiB, {sessions} sessions: {rate:,.0f} messages/s")
    p50, p99 = latency(host, port)
    out["seq_p50_ms"], out["seq_p99_ms"] = p50, p99
    print(f"{name}, sequential 1 KiB: DATA-to-250 p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"Python {platform.python_version()}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    (root / "ours").mkdir()
    cluster = SmtpCluster(root / "ours", relay_networks='"127.0.0.0/8"', max_size=1 << 20)
    try:
        cluster.start_all()
        leader = cluster.leader()
        follower = cluster.nodes[next(n for n in cluster.nodes if n != leader)]
        ours = run_workloads("ours", follower.host, follower.smtp_port)
    finally:
        cluster.stop_all()
    postfix = Postfix(root / "postfix")
    try:
        theirs = run_workloads("postfix", "127.0.0.1", postfix.port)
    finally:
        postfix.stop()
    print("\n| workload | ours | postfix | ours/postfix |\n|---|---|---|---|")
    for key, value in ours.items():
        print(f"| {key} | {value:,.2f} | {theirs[key]:,.2f} | {value / theirs[key]:.2f} |")


if __name__ == "__main__":
    main()
