"""Read-only views of the spool for the admin API: mailq, postcat and qshape.

Listing pages by message id (a cursor), so a queue of a million messages is never
turned into one answer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from mailqueue.commands import MessageId
from mailqueue.spool import Message, RcptState, Spool

AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's default buckets
SCAN_LIMIT = 10_000  # messages one page request may look at


@dataclass(frozen=True, slots=True)
class Filter:
    state: RcptState | None = None  # messages with at least one recipient in this state
    domain: str = ""  # ...or addressed to this domain
    min_age_ms: int = 0
    sender: str | None = None  # ...from this envelope sender ("" for the null sender)

    def matches(self, m: Message, now: int) -> bool:
        # Only when asked: a message a node with its clock ahead took is "younger than
        # 0", and was missing from every listing on the nodes with a right clock.
        if self.min_age_ms and now - m.received_at < self.min_age_ms:
            return False
        if self.sender is not None and m.sender.lower() != self.sender.lower():
            return False
        if self.state is not None and all(r.state is not self.state for r in m.rcpts):
            return False
        return not self.domain or any(
            m.domain(k) == self.domain.lower() for k in range(len(m.rcpts))
        )


def summary(m: Message, now: int) -> dict[str, Any]:
    return {
        "id": m.id,
        "sender": m.sender,
        "size": m.size,
        "age_s": (now - m.received_at) // 1000,
        "accepted_by": m.accepted_by,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.name.lower(),
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_error": r.last_error,
                "node": r.node,
                "reply": r.reply,
                "uncertain": r.was_uncertain,
            }
            for r in m.rcpts
        ],
    }


def list_messages(
    spool: Spool,
    now: int,
    flt: Filter,
    after: MessageId = "",
    limit: int = 100,
    *,
    scan: int = SCAN_LIMIT,
) -> tuple[list[dict[str, Any]], MessageId]:
    """One page of matching messages in id order, and the cursor for the next page
    ("" when there is none). At most `scan` messages are looked at per call, so a
    filter that matches little in a big queue cannot hold the node up: the page may
    then be short (even empty) with a cursor to go on from."""
    page: list[dict[str, Any]] = []
    looked, last = 0, after
    for mid in spool.index.ids.irange(minimum=after or None, inclusive=(not after, True)):
        if looked == scan:
            return page, last
        looked, last = looked + 1, mid
        m = spool.messages[mid]
        if flt.matches(m, now):
            if len(page) == limit:
                return page, page[-1]["id"]
            page.append(summary(m, now))
    return page, ""


def show(spool: Spool, message_id: MessageId, now: int, body: bool = False) -> dict[str, Any]:
    m = spool.messages[message_id]
    out = summary(m, now)
    out["received_at"] = m.received_at
    out["is_bounce"] = m.is_bounce
    if body:
        out["body"] = spool.bodies.get(message_id).decode("utf-8", "replace")
    return out


class Shape:
    """Pending recipients by destination domain and age, like Postfix's qshape, added
    up a batch of messages at a time (the admin API yields between batches)."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.by_domain: dict[str, list[int]] = {}

    def add(self, m: Message) -> None:
        age_min = (self.now - m.received_at) / 60_000
        bucket = bisect.bisect_left(AGE_BUCKETS_MIN, age_min)
        for k, r in enumerate(m.rcpts):
            if r.state in (RcptState.DELIVERED, RcptState.BOUNCED):
                continue
            row = self.by_domain.setdefault(m.domain(k), [0] * (len(AGE_BUCKETS_MIN) + 1))
            row[bucket] += 1

    def result(self, spool: Spool) -> dict[str, Any]:
        rows = sorted(self.by_domain.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        return {
            "buckets_min": list(AGE_BUCKETS_MIN),
            "domains": [{"domain": d, "total": sum(c), "by_age": c} for d, c in rows],
            "states": {s.name.lower(): n for s, n in spool.counts.items()},
            "messages": len(spool.messages),
            "uncertain_total": spool.uncertain_total,
        }
