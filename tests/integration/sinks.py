"""Sinks on loopback that stand in for the destination servers of delivery tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.integration.kvcluster import free_port
from tests.integration.smtpnodes import SmtpCluster, running


@contextlib.contextmanager
def sink_and_cluster(tmp_path: Path, handler: Sink, **opts: Any) -> Iterator[SmtpCluster]:
    """A sink on loopback as the smarthost of a running cluster; both stopped after."""
    port = free_port("127.0.0.1")
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with running(SmtpCluster(tmp_path, smarthost=f"127.0.0.1:{port}", **opts)) as cluster:
            yield cluster
    finally:
        controller.stop()


class Pipelining:
    """Says PIPELINING in its EHLO, as the MTAs a relay delivers to do (aiosmtpd 1.4.6
    takes pipelined commands but does not say so), so delivery tests take the path real
    deliveries take: the envelope in one write."""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class Sink(Pipelining):
    """A capture sink: records every message whose final dot it answered with 250."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append((rcpt, envelope.original_content or b""))
        return "250 2.0.0 Ok: captured"
