"""Memory per byte of large messages being accepted: each node's peak RSS over its RSS
before, divided by the bytes sent, by the node's part (as in bench.cpu_bench).

    PYTHONPATH=. .venv/bin/python -m bench.memory_bench [--messages 1] [--mib 32] [--repeat 3]

`--messages` smtplib clients send one message of `--mib` MiB each, at once, to a
follower of a fresh 3-node cluster (one per turn) relaying to `smtp-sink`. The peak is
the kernel's VmHWM. `smtp.max_data_in_memory` bounds the bytes the front ends hold
(256 MiB by default): this shows what each held byte costs a node at its peak. Not a
test: figures for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import smtplib
import threading
import time
from pathlib import Path

from bench.cpu_bench import Roles
from bench.smtp_bench import sink_cluster


def kib(pid: int, field: str) -> int:
    """A VmXXX figure of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def turn(messages: int, mib: int) -> str:
    line = b"y" * 78 + b"\r\n"
    body = b"Subject: large\r\n\r\n" + line * (mib * (1 << 20) // len(line))
    with sink_cluster("memory-bench-", max_size=(mib + 1) << 20) as cluster:
        cluster.start_all()
        roles = Roles(cluster)
        before = {role: kib(pid, "VmRSS") for role, pid in roles.pids.items()}
        host, port = roles.front.host, roles.front.smtp_port
        codes: list[int] = []

        def send(k: int) -> None:
            with smtplib.SMTP(host, port, timeout=300) as s:
                try:
                    s.sendmail(f"a{k}@example.org", ["b@dest.example"], body)
                    codes.append(250)
                except smtplib.SMTPResponseException as exc:  # 452 past the data budget
                    codes.append(exc.smtp_code)

        clients = [threading.Thread(target=send, args=(k,)) for k in range(messages)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        while not roles.drained():  # delivered too: the peaks of all three parts
            time.sleep(0.1)
        sent = messages * mib * 1024
        growth = {r: (kib(pid, "VmHWM") - before[r]) / sent for r, pid in roles.pids.items()}
        parts = ", ".join(f"{role} {x:.2f}" for role, x in growth.items())
        taken = codes.count(250)
        return f"{messages} x {mib} MiB, {taken} taken: peak RSS growth per byte sent: {parts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1, help="clients, one message each")
    parser.add_argument("--mib", type=int, default=32, help="size of each message")
    parser.add_argument("--repeat", type=int, default=3, help="turns, each on a fresh cluster")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")  # fmt: skip
    for _ in range(args.repeat):
        print(turn(args.messages, args.mib), flush=True)


if __name__ == "__main__":
    main()
