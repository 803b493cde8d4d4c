"""Delivery over a slow link: the outbound client's transactions per second to Postfix's
smtp-sink through a proxy that delays every chunk, with PIPELINING offered and without.

    PYTHONPATH=. .venv/bin/python -m bench.wan_delivery [--rtt-ms 40] [--messages 20]

The proxy (on 127.0.0.1, like everything here) holds each chunk for half the round
trip in each direction, keeping order. One connection carries `--messages` sequential
transactions for each recipient count; the fence is a no-op, so this times the SMTP
conversation alone, not Raft. Lock-step, a transaction costs MAIL, each RCPT, DATA and
the dot: recipients + 3 round trips. Pipelined: the envelope and DATA in one, the dot
in another: 2. Postfix's smtp(8) pipelines the same way. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import subprocess
import time
from collections.abc import Iterator

from smtpcluster.smtp_client import Outbound, connect, transact
from tests.integration.kvcluster import free_port, stop_process, wait_for

BODY = b"Subject: over the WAN\r\n\r\n" + b"x" * 1000 + b"\r\n"


class DelayProxy:
    """Forwards 127.0.0.1:port to the target, each chunk `delay` seconds late."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay = target, delay

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while chunk := await reader.read(65536):
            # call_later keeps order: every chunk waits the same time
            loop.call_later(self.delay, _write, writer, chunk)
        loop.call_later(self.delay, _close, writer)


def _write(writer: asyncio.StreamWriter, chunk: bytes) -> None:
    if not writer.is_closing():
        writer.write(chunk)


def _close(writer: asyncio.StreamWriter) -> None:
    if not writer.is_closing():
        writer.close()


def smtp_sink(pipelining: bool) -> Iterator[int]:
    port = free_port("127.0.0.1")
    flags = [] if pipelining else ["-p"]
    sink = subprocess.Popen(
        ["smtp-sink", *flags, "-u", "postfix", f"127.0.0.1:{port}", "100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for("smtp-sink", lambda: socket.create_connection(("127.0.0.1", port)))
        yield port
    finally:
        stop_process(sink, 15)


async def rate(port: int, rtt: float, n_rcpts: int, messages: int) -> float:
    """Transactions per second over one connection through the delaying proxy."""
    proxy = DelayProxy(port, rtt / 2)
    via = await proxy.start()
    rcpts = {k: f"r{k}@dest.example" for k in range(n_rcpts)}
    job = Outbound("127.0.0.1", via, "bench.test", "s@example.org", rcpts, BODY)

    async def dot_ok(accepted: list[int]) -> bool:
        return True

    smtp = await connect("127.0.0.1", via, "bench.test")
    started = time.perf_counter()
    for _ in range(messages):
        t = await transact(smtp, job, dot_ok)
        assert t.final is not None and t.final[0] == 250, t
    elapsed = time.perf_counter() - started
    await smtp.quit()
    proxy.server.close()
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args()
    rtt = args.rtt_ms / 1000
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M')}, RTT {args.rtt_ms:g} ms")
    print("| recipients | lock-step msg/s | pipelined msg/s | ratio |")
    print("|---|---|---|---|")
    for n_rcpts in (1, 10, 50):
        got = {}
        for pipelining in (False, True):
            for port in smtp_sink(pipelining):
                got[pipelining] = asyncio.run(rate(port, rtt, n_rcpts, args.messages))
        ratio = got[True] / got[False]
        print(f"| {n_rcpts} | {got[False]:.2f} | {got[True]:.2f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
