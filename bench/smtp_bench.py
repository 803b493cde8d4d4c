"""SMTP acceptance and end-to-end benchmark: a 3-node cluster against Postfix, same run.

    scripts/setup-system && sudo PYTHONPATH=. .venv/bin/python -m bench.smtp_bench

Both relay everything to one smtp-sink: ours through `smarthost`, a private Postfix
instance (as shipped: fsync on) through `relayhost`. Throughput: smtp-source sends N
messages over S sessions; "accept" is timed until smtp-source has its last 250, "end
to end" until the queue is empty again (every message delivered to the sink). Ours
gets the mail on a follower, so every Accept is forwarded to the leader. Latency: one
sequential smtplib client, from the end of DATA to the 250; `--under-load S` times it
also beside S smtp-source sessions sending all the while. Both run side by side and
take turns (`--repeat` each, medians), the other one paused meanwhile. Postfix needs
root to start. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import shutil
import signal
import smtplib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
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


def latency(host: str, port: int, n: int = 500) -> list[float]:
    """Seconds from the end of DATA to the 250, for `n` messages in one session."""
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
    return took


def loaded_latency(
    host: str, port: int, sessions: int, *, drained: Callable[[], bool], n: int = 300
) -> list[float]:
    """`latency` while smtp-source keeps `sessions` other sessions sending 1 KiB
    messages to the same system, as a relay sees it at work; the first 50 samples,
    taken while the load is ramping up, are dropped. Then the queue drains."""
    load = subprocess.Popen(
        ["smtp-source", "-s", str(sessions), "-m", "10000000", "-l", "1024",
         "-f", "bench@example.org", "-t", "sink@dest.example", f"{host}:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        took = latency(host, port, n + 50)[50:]
    finally:
        load.terminate()
        load.wait()
    wait_for("the queue to drain", drained, 600)
    return took


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


class System:
    """One system under test: where to send, how to tell its queue is empty, and how
    to keep it off the CPU while the other one is measured."""

    def __init__(self, name: str, host: str, port: int, drained: Callable[[], bool]) -> None:
        self.name, self.host, self.port, self.drained = name, host, port, drained

    def pause(self) -> None: ...
    def resume(self) -> None: ...


class Ours(System):
    def __init__(self, cluster: SmtpCluster) -> None:
        self.cluster = cluster
        self.leader = cluster.leader()
        follower = cluster.nodes[next(n for n in cluster.nodes if n != self.leader)]

        def drained() -> bool:
            stats = cluster.admin(self.leader, "/v1/queue-stats?stale=1")
            return bool(stats["messages"] == 0)

        super().__init__("ours", follower.host, follower.smtp_port, drained)

    def pause(self) -> None:
        # SIGSTOP: an idle cluster still ticks and heartbeats; frozen, it takes no CPU
        # from Postfix's turn. All nodes stop and resume together (no election).
        for node in self.cluster.nodes.values():
            assert node.popen is not None
            node.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for node in self.cluster.nodes.values():
            assert node.popen is not None
            node.popen.send_signal(signal.SIGCONT)
        if self.cluster.leader() != self.leader:
            raise RuntimeError("the leader changed across a pause: the figures would mix")


class Turns:
    """Each workload `repeat` times per system, the systems taking turns (this VM's
    speed drifts over minutes: turns keep a slow spell from landing on one system
    only), the others paused meanwhile; the median of each figure. Latency: 500
    sequential messages per turn, p50 and p99 over all turns' samples."""

    def __init__(self, systems: list[System]) -> None:
        self.systems = systems
        self.runs: dict[str, dict[str, list[float]]] = {s.name: {} for s in systems}
        # Latency samples, one list per turn: pooled for the figures, and each turn's p99
        # printed too, since one p99 of a few hundred samples moves a lot between runs.
        self.samples: dict[str, list[list[float]]] = {s.name: [] for s in systems}
        self.loaded: dict[str, list[list[float]]] = {s.name: [] for s in systems}

    def turn(self, system: System, job: Callable[[System], None]) -> None:
        others = [o for o in self.systems if o is not system]
        for other in others:
            other.pause()
        try:
            job(system)
        finally:
            for other in others:
                other.resume()

    def throughput(self, system: System, workload: Workload) -> None:
        size, sessions, n = workload
        accept, e2e = throughput(
            system.host, system.port, size, sessions, n, drained=system.drained
        )
        key = f"{size // 1024}KiB_s{sessions}"
        self.runs[system.name].setdefault(f"{key}_accept", []).append(accept)
        self.runs[system.name].setdefault(f"{key}_e2e", []).append(e2e)
        print(f"{system.name}, {size // 1024} KiB, {sessions} sessions: accepted {accept:,.0f}"
              f" messages/s, end to end {e2e:,.0f}", flush=True)  # fmt: skip

    def latency(self, system: System) -> None:
        self.samples[system.name].append(latency(system.host, system.port))

    def loaded_latency(self, system: System, sessions: int) -> None:
        took = loaded_latency(system.host, system.port, sessions, drained=system.drained)
        self.loaded[system.name].append(took)

    def run(
        self, workloads: list[Workload], repeat: int, load: int = 0
    ) -> dict[str, dict[str, float]]:
        for workload in workloads:
            for _ in range(repeat):
                for system in self.systems:
                    self.turn(system, functools.partial(self.throughput, workload=workload))
        for _ in range(repeat):
            for system in self.systems:
                self.turn(system, self.latency)
                if load:
                    self.turn(system, functools.partial(self.loaded_latency, sessions=load))
        return {system.name: self.figures(system.name, load) for system in self.systems}

    def figures(self, name: str, load: int) -> dict[str, float]:
        out = {k: statistics.median(v) for k, v in self.runs[name].items()}
        out.update(_percentiles(name, "seq", self.samples[name], "sequential 1 KiB"))
        if load:
            what = f"sequential 1 KiB beside {load} loading sessions"
            out.update(_percentiles(name, f"load{load}", self.loaded[name], what))
        return out


def _percentiles(name: str, key: str, turns: list[list[float]], what: str) -> dict[str, float]:
    took = sorted(t for turn in turns for t in turn)
    p50, p99 = _at(took, 0.5), _at(took, 0.99)
    each = ", ".join(f"{_at(sorted(turn), 0.99):.2f}" for turn in turns)
    print(f"{name}, {what}, {len(took)} messages: DATA-to-250 p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms (turns: {each}), max {took[-1] * 1000:.2f} ms")  # fmt: skip
    return {f"{key}_p50_ms": p50, f"{key}_p99_ms": p99}


def _at(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in milliseconds."""
    return ordered[int(len(ordered) * q)] * 1000


def _workload(text: str) -> Workload:
    size, sessions, n = map(int, text.split(":"))
    return size, sessions, n


def add_workloads(parser: argparse.ArgumentParser, text: str) -> None:
    """`--workload SIZE:SESSIONS:N`, repeatable, into `workload` (None when not given)."""
    parser.add_argument(
        "--workload", action="append", type=_workload, metavar="SIZE:SESSIONS:N", help=text
    )


def start_sink() -> tuple[subprocess.Popen[bytes], int]:
    """Postfix's smtp-sink on a free port of 127.0.0.1, and that port: where the systems
    under test relay to."""
    port = free_port("127.0.0.1")
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "postfix", f"127.0.0.1:{port}", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return sink, port


@contextlib.contextmanager
def sink_cluster(prefix: str, max_size: int = 1 << 22) -> Iterator[SmtpCluster]:
    """Three nodes (not started yet) relaying to a fresh smtp-sink, in a directory of
    their own; all of it stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    sink, sink_port = start_sink()
    cluster = SmtpCluster(
        root, relay_networks='"127.0.0.0/8"', max_size=max_size, smarthost=f"127.0.0.1:{sink_port}"
    )
    try:
        yield cluster
    finally:
        cluster.stop_all()
        sink.kill()
        sink.wait()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workloads(parser, "run only these, e.g. 1024:20:3000 (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="turns per system (median)")
    parser.add_argument(
        "--latency-only", action="store_true", help="only the sequential client's turns"
    )
    parser.add_argument(
        "--under-load", type=int, default=0, metavar="SESSIONS",
        help="also time the sequential client while smtp-source keeps SESSIONS sending",
    )  # fmt: skip
    args = parser.parse_args()
    workloads = [] if args.latency_only else args.workload or WORKLOADS
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"Python {platform.python_version()}, {args.repeat} turns each")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    (root / "ours").mkdir()
    sink, sink_port = start_sink()
    cluster = SmtpCluster(
        root / "ours", relay_networks='"127.0.0.0/8"', max_size=1 << 20,
        smarthost=f"127.0.0.1:{sink_port}",
    )  # fmt: skip
    postfix = None
    try:
        cluster.start_all()
        postfix = Postfix(root / "postfix", sink_port)
        theirs = System("postfix", "127.0.0.1", postfix.port, postfix.drained)
        results = Turns([Ours(cluster), theirs]).run(workloads, args.repeat, args.under_load)
    finally:
        if postfix is not None:
            postfix.stop()
        cluster.stop_all()
        sink.kill()
    ours, theirs_ = results["ours"], results["postfix"]
    print("\n| workload | ours | postfix | ours/postfix |\n|---|---|---|---|")
    for key, value in ours.items():
        print(f"| {key} | {value:,.2f} | {theirs_[key]:,.2f} | {value / theirs_[key]:.2f} |")


if __name__ == "__main__":
    main()
