"""The delivery client against Postfix's smtp-sink, a real MTA's SMTP engine: with
PIPELINING (as Postfix, Exim and the providers' servers offer it) and without."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpcluster.smtp_client import Outbound, Transaction, connect, transact
from tests.integration.kvcluster import free_port, stop_process, wait_for

BODY = b"Subject: to postfix\r\n\r\n.a line that starts with a dot\r\nend\r\n"


@pytest.fixture(params=[True, False], ids=["pipelining", "lockstep"])
def smtp_sink(request: pytest.FixtureRequest) -> Iterator[tuple[int, Path]]:
    """smtp-sink on a free port, dumping each transaction under a directory; its port."""
    with tempfile.TemporaryDirectory() as tmp:  # not under tmp_path: pytest's is 0700
        dumps = Path(tmp)
        dumps.chmod(0o777)  # smtp-sink writes as the postfix user
        yield from _run_sink(dumps, pipelining=request.param)


def _run_sink(dumps: Path, *, pipelining: bool) -> Iterator[tuple[int, Path]]:
    port = free_port("127.0.0.1")
    flags = [] if pipelining else ["-p"]  # -p: do not announce PIPELINING
    sink = subprocess.Popen(
        ["smtp-sink", *flags, "-u", "postfix", "-d", f"{dumps}/%H%M%S.", f"127.0.0.1:{port}", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for("smtp-sink to listen", lambda: socket.create_connection(("127.0.0.1", port)))
        yield port, dumps
    finally:
        stop_process(sink, 15)


def test_smtp_sink_takes_every_recipient_and_the_body(smtp_sink: tuple[int, Path]) -> None:
    port, dumps = smtp_sink
    rcpts = {k: f"r{k}@dest.example" for k in range(3)}
    job = Outbound("127.0.0.1", port, "relay.test", "s@example.org", rcpts, BODY)

    async def dot_ok(accepted: list[int]) -> bool:
        return True

    async def twice() -> list[Transaction]:
        smtp = await connect("127.0.0.1", port, "relay.test")
        try:
            return [await transact(smtp, job, dot_ok) for _ in range(2)]  # one connection
        finally:
            await smtp.quit()

    for t in asyncio.run(twice()):
        assert t.rcpt_replies == dict.fromkeys(rcpts, (250, "2.1.5 Ok"))
        assert t.final is not None and t.final[0] == 250 and t.clean
    files = wait_for(
        "two dumps",
        lambda: sorted(dumps.rglob("*.*"))[:2] if len(list(dumps.rglob("*.*"))) >= 2 else None,
    )
    for dump in files:
        text = dump.read_bytes()
        assert all(address.encode() in text for address in rcpts.values())
        assert b"\n..a line that starts with a dot" not in text  # unstuffed again there
        assert b".a line that starts with a dot" in text
