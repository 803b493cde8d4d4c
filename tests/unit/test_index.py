"""The spool's derived indexes: what is due, what each node holds, what needs a DSN."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mailqueue import policy
from mailqueue.commands import (
    Accept,
    Assign,
    Assignment,
    BeginDot,
    NodeDown,
    Outcome,
    OutcomeKind,
    RcptResult,
    Release,
    UncertainPolicy,
)
from mailqueue.spool import Spool
from tests.unit.test_spool import check_invariants

MINUTE = 60_000


def one(spool: Spool, mid: str = "m1", at: int = 1000, node: str = "a") -> None:
    spool.apply(Accept(at, mid, "s@example.org", ("u@d.example",), b"body\r\n", node))


def test_a_recipient_is_due_while_queued_and_held_while_assigned() -> None:
    spool = Spool()
    one(spool)
    assert list(spool.index.due(1000)) == ["m1"] and spool.index.held("a") == []
    spool.apply(Assign(1001, (Assignment("m1", 0, "b", 1),)))
    assert list(spool.index.due(9999)) == [] and spool.index.held("b") == ["m1"]
    spool.apply(Release(1002, "m1", (0,), "b", 1))  # given back: due again at once
    assert list(spool.index.due(1002)) == ["m1"] and spool.index.held("b") == []
    check_invariants(spool)


def test_a_deferred_recipient_is_due_only_at_its_retry_time() -> None:
    spool = Spool()
    one(spool)
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1),)))
    spool.apply(BeginDot(1002, "m1", (0,), "a", 1))
    retry = 1003 + 5 * MINUTE
    spool.apply(Outcome(1003, "m1", "a", 1, (RcptResult(0, OutcomeKind.DEFERRED, "451", retry),)))
    assert list(spool.index.due(retry - 1)) == []
    assert list(spool.index.due(retry)) == ["m1"]
    check_invariants(spool)


def test_node_down_returns_what_the_node_held_and_nothing_else() -> None:
    spool = Spool()
    for k, node in enumerate(["a", "b", "a"]):
        one(spool, f"m{k}")
        spool.apply(Assign(1001, (Assignment(f"m{k}", 0, node, 1),)))
    spool.apply(NodeDown(1002, "a", UncertainPolicy.REDELIVER))
    assert sorted(spool.index.due(1002)) == ["m0", "m2"]
    assert spool.index.held("a") == [] and spool.index.held("b") == ["m1"]
    check_invariants(spool)


def test_a_bounce_is_pending_until_its_dsn_is_accepted_and_the_message_then_leaves() -> None:
    spool = Spool()
    one(spool)
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1),)))
    spool.apply(Outcome(1002, "m1", "a", 1, (RcptResult(0, OutcomeKind.FAILED, "550 no"),)))
    assert list(spool.index.dsn_pending) == ["m1"]
    (dsn,) = policy.bounces(spool, 1003, "relay.test", "a")
    spool.apply(dsn)
    assert "m1" not in spool.messages and "m1" not in spool.index.dsn_pending
    check_invariants(spool)


class Watched(dict[str, Any]):
    """The spool's message table, counting how many messages a caller walked over."""

    walked = 0

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        for v in super().values():
            self.walked += 1
            yield v

    def __iter__(self) -> Iterator[str]:
        for k in super().__iter__():
            self.walked += 1
            yield k


def test_a_scheduler_pass_over_a_deferred_backlog_looks_only_at_what_is_due() -> None:
    spool = Spool()
    backlog = 10_000
    retry = 1000 + 60 * MINUTE
    for k in range(backlog):
        one(spool, f"old{k}")
        spool.apply(Assign(1001, (Assignment(f"old{k}", 0, "a", 1),)))
        res = RcptResult(0, OutcomeKind.DEFERRED, "451 later", retry)
        spool.apply(Outcome(1002, f"old{k}", "a", 1, (res,)))
    one(spool, "new", at=2000)
    spool.messages = watched = Watched(spool.messages)
    pol = policy.Policy()
    assigned = policy.assign(spool, 2000, pol, ["a", "b"])
    assert [a.message_id for cmd in assigned for a in cmd.assignments] == ["new"]
    assert policy.expired(spool, 2000, pol) == [] and policy.bounces(spool, 2000, "r", "a") == []
    assert watched.walked <= 2, watched.walked  # not the 10,000 waiting for their retry
    assert len(list(spool.index.due(retry))) == backlog + 1
