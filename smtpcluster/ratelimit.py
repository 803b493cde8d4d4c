"""How fast one client may connect or send: Postfix's anvil rate limits, per node.

Postfix counts each client's connections and messages per minute
(smtpd_client_connection_rate_limit, smtpd_client_message_rate_limit, both off by
default, mynetworks exempt) and answers a client over its limit with a 4xx, so a
runaway script or a stolen password sends only so much. Here each limit is a token
bucket per key: `limit` events a minute, in bursts of up to `limit`. Each node keeps
its own buckets: a client spread over three nodes gets up to three times the limit.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

PRUNE_AT = 10_000  # keys held before the full buckets (idle clients) are dropped
WARN_EVERY_S = 60.0


class RateLimiter:
    def __init__(self, what: str) -> None:
        self.what = what  # "connections" or "messages": for the log
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self.refused = 0  # a metric
        self._next_warning = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, limit: int, now: float | None = None) -> bool:
        """Counts one event of `key` and says whether it is within `limit` a minute
        (0: no limit)."""
        if limit <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens = self._tokens(key, limit, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self._refused(key, limit, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > PRUNE_AT:
            self._prune(limit, now)
        return True

    def _tokens(self, key: str, limit: int, now: float) -> float:
        tokens, when = self._buckets.get(key, (float(limit), now))
        return min(float(limit), tokens + (now - when) * limit / 60)

    def _prune(self, limit: int, now: float) -> None:
        """A full bucket holds nothing a new one would not: forget it."""
        full = [k for k in self._buckets if self._tokens(k, limit, now) >= limit]
        for key in full:
            del self._buckets[key]

    def _refused(self, key: str, limit: int, now: float) -> None:
        self.refused += 1
        if now >= self._next_warning:  # a flood must not flood the log
            log.warning("%s over %d %s a minute: refused with 4xx (%d refused so far)",
                        key, limit, self.what, self.refused)  # fmt: skip
            self._next_warning = now + WARN_EVERY_S
