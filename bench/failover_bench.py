"""The pause a client sees when the leader dies: the longest wait for a 250, on a
follower, around a kill -9 of the leader.

    PYTHONPATH=. .venv/bin/python -m bench.failover_bench [--rounds 5] [--production-timeouts]

Each round starts three nodes relaying to `smtp-sink` (heartbeat 50 ms, election 300
ms, as in the tests; with `--production-timeouts` the config's defaults, 100 ms and
1 s), has one smtplib client send 1 KiB messages one after another to a follower,
kills the leader with SIGKILL after 2 s, and goes on sending for 8 s more. It prints
the longest time from a final dot to its reply from half a second before the kill on,
and every reply code seen (a 4xx would show here). Not a test: figures for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import smtplib
import statistics
import threading
import time

from bench.smtp_bench import sink_cluster

BODY = b"Subject: failover\r\n\r\n" + (b"y" * 98 + b"\r\n") * 10


TEST_TIMEOUTS = 'heartbeat_interval = "50ms"\nelection_timeout = "300ms"\n'
DEFAULT_TIMEOUTS = 'heartbeat_interval = "100ms"\nelection_timeout = "1s"\n'


def one_round(production: bool) -> tuple[float, set[int]]:
    with sink_cluster("failover-bench-") as cluster:
        if production:
            for node in cluster.nodes.values():
                text = node.config.read_text()
                assert TEST_TIMEOUTS in text
                node.config.write_text(text.replace(TEST_TIMEOUTS, DEFAULT_TIMEOUTS))
        cluster.start_all()
        leader = cluster.leader()
        front = cluster.nodes[min(n for n in cluster.nodes if n != leader)]
        replies: list[tuple[float, float, int]] = []  # sent at, took, code
        stop = threading.Event()

        def client() -> None:
            with smtplib.SMTP(front.host, front.smtp_port, timeout=120) as s:
                s.ehlo("failover.test")
                while not stop.is_set():
                    s.mail("a@example.org")
                    s.rcpt("b@dest.example")
                    s.putcmd("data")
                    s.getreply()
                    began = time.monotonic()
                    s.send(BODY + b".\r\n")
                    code, _ = s.getreply()
                    replies.append((began, time.monotonic() - began, code))

        sender = threading.Thread(target=client)
        sender.start()
        time.sleep(2)
        killed_at = time.monotonic()
        popen = cluster.nodes[leader].popen
        assert popen is not None
        popen.send_signal(signal.SIGKILL)
        time.sleep(8)
        stop.set()
        sender.join()
        around = [(took, code) for at, took, code in replies if at >= killed_at - 0.5]
        return max(took for took, _ in around), {code for _, code in around}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--production-timeouts", action="store_true",
                        help="heartbeat 100 ms, election 1 s (the config's defaults)")  # fmt: skip
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")  # fmt: skip
    pauses = []
    for _ in range(args.rounds):
        pause, codes = one_round(args.production_timeouts)
        pauses.append(pause)
        print(f"longest reply around the kill: {pause:.3f} s; codes {sorted(codes)}", flush=True)
    print(f"median {statistics.median(pauses):.3f} s, max {max(pauses):.3f} s")


if __name__ == "__main__":
    main()
