"""systemd's notify protocol (sd_notify(3)): READY=1, STATUS=, WATCHDOG=1.

A datagram of newline-separated KEY=VALUE fields to the unix socket named by
NOTIFY_SOCKET ("@" starts an abstract address). The protocol is a few lines, so no
library: without NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """True when systemd was told; a failure is logged, never raised: a node must
        not stop serving mail because its supervisor went away."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", fields[0].split("=")[0], exc)
            return False
        return True

    async def watchdog(self) -> None:
        """Ping twice per WatchdogSec from the event loop: if the loop wedges, the
        pings stop and systemd restarts the node."""
        if self.watchdog_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is some other process's (a parent's, say)
    return int(usec) / 2 / 1_000_000
