"""The open SMTP sessions of a node, and whether one more may start.

Postfix caps its smtpd processes (default_process_limit, 100) and one client's share of
them (smtpd_client_connection_count_limit, 50, relay networks exempt). An asyncio front
end has no processes to run out of, but it has file descriptors and memory: one client
holding tens of thousands of idle connections would exhaust the descriptors the node
needs for its Raft log, its peers and its body files, and stop it. Over a limit the new
connection gets 421 and is closed; the client tries again later or elsewhere.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

WARN_EVERY_S = 60.0
S = TypeVar("S")


class Sessions(Generic[S]):
    def __init__(self) -> None:
        self._peer: dict[S, str] = {}
        self._per_client: collections.Counter[str] = collections.Counter()
        self.refused = 0  # connections refused over a limit: a metric
        self._next_warning = 0.0

    def __len__(self) -> int:
        return len(self._peer)

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._peer))

    def admit(
        self, session: S, peer: str, limits: tuple[int, int], exempt: Callable[[str], bool]
    ) -> str | None:
        """Adds `session` from `peer` and returns None, or returns the 421 to close it
        with. `limits`: sessions in all, sessions per client (unless `exempt(peer)`)."""
        total, per_client = limits
        if len(self._peer) >= total:
            return self._refuse(peer, "421 4.3.2 Too many connections, try again later")
        if self._per_client[peer] >= per_client and not exempt(peer):
            return self._refuse(peer, f"421 4.7.0 Too many connections from {peer}")
        self._peer[session] = peer
        self._per_client[peer] += 1
        return None

    def discard(self, session: S) -> None:
        peer = self._peer.pop(session, None)
        if peer is None:
            return
        self._per_client[peer] -= 1
        if not self._per_client[peer]:
            del self._per_client[peer]

    def _refuse(self, peer: str, reply: str) -> str:
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_warning:  # a flood of connections must not flood the log
            log.warning("connection from %s refused: %s (%d refused so far)", peer, reply,
                        self.refused)  # fmt: skip
            self._next_warning = now + WARN_EVERY_S
        return reply
