"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller

from tests.integration.kvcluster import free_port
from tests.integration.sinks import Sink


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    """A capture sink listening on 127.0.0.1, and its port."""
    handler = Sink()
    port = free_port("127.0.0.1")
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()
