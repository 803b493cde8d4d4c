"""The scheduler's policy: grouping, node choice, backoff, expiry and DSNs."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

from mailqueue import policy as p
from mailqueue.commands import (
    Accept,
    Assign,
    Assignment,
    BeginDot,
    Outcome,
    OutcomeKind,
    RcptResult,
)
from mailqueue.spool import RcptState, Spool

BODY = b"From: s@example.org\r\nSubject: report\r\nMessage-ID: <x@example.org>\r\n\r\nhello\r\n"
POLICY = p.Policy()


def spool_with(*accepts: Accept) -> Spool:
    spool = Spool()
    for a in accepts:
        spool.apply(a)
    return spool


def accept(
    mid: str, *rcpts: str, by: str = "a", at: int = 0, sender: str = "s@example.org"
) -> Accept:
    return Accept(at, mid, sender, rcpts, BODY, by)


def test_due_recipients_are_grouped_by_message_and_destination() -> None:
    spool = spool_with(accept("m1", "u@x.example", "v@X.example", "w@y.example"))
    groups = p.due_groups(spool, 0, POLICY)
    assert groups == [p.Group("m1", "x.example", (0, 1)), p.Group("m1", "y.example", (2,))]
    smarthost = p.Policy(smarthost="relay.example:25")
    assert p.due_groups(spool, 0, smarthost) == [p.Group("m1", "relay.example:25", (0, 1, 2))]


def test_a_domains_route_comes_before_the_smarthost_and_covers_subdomains_by_dot() -> None:
    routes = {"inbound.test": "10.0.0.5:25", ".corp.test": "10.0.0.6:25", "x.corp.test": "h:1"}
    pol = p.Policy(smarthost="relay.isp:587", routes=routes)
    assert p.destination(pol, "u@Inbound.Test") == "10.0.0.5:25"
    assert p.destination(pol, "u@a.b.corp.test") == "10.0.0.6:25"  # by the nearest parent
    assert p.destination(pol, "u@x.corp.test") == "h:1"  # the domain's own key first
    assert p.destination(pol, "u@corp.test") == "relay.isp:587"  # ".corp.test": subdomains only
    assert p.destination(pol, "u@sub.inbound.test") == "relay.isp:587"
    assert p.destination(p.Policy(routes=routes), "u@else.example") == "else.example"  # by MX


def test_recipients_not_yet_due_wait() -> None:
    spool = spool_with(accept("m1", "u@x.example"))
    spool.apply(Assign(1, (Assignment("m1", 0, "a", 1),)))
    retry = RcptResult(0, OutcomeKind.DEFERRED, "451 later", 61_001)
    spool.apply(Outcome(2, "m1", "a", 1, (retry,)))
    assert p.due_groups(spool, 61_000, POLICY) == []
    assert p.due_groups(spool, 61_001, POLICY) == [p.Group("m1", "x.example", (0,))]


def test_the_accepting_node_is_preferred_unless_busier() -> None:
    spool = spool_with(accept("m1", "u@x.example", by="b"), accept("m2", "u@x.example", by="b"))
    [cmd] = p.assign(spool, 0, POLICY, ["a", "b", "c"])
    assert [(x.message_id, x.node, x.attempt) for x in cmd.assignments] == [
        ("m1", "b", 1),
        ("m2", "a", 1),  # b already took m1: the least loaded live node takes m2
    ]
    spool.apply(cmd)
    assert spool.load == {"a": 1, "b": 1}


def test_a_node_busy_taking_mail_yields_its_deliveries_to_a_quieter_one() -> None:
    spool = spool_with(*(accept(f"m{k}", "u@x.example", by="b") for k in range(3)))
    # b accepted 30 messages in the last second and a (the leader) replicated them all
    [cmd] = p.assign(spool, 0, POLICY, ["a", "b", "c"], {"a": 30, "b": 30})
    assert {x.node for x in cmd.assignments} == {"c"}
    # c has caught up with b's work: the accepting node is preferred again
    [cmd] = p.assign(spool, 0, POLICY, ["a", "b", "c"], {"a": 30, "b": 30, "c": 30})
    assert cmd.assignments[0].node == "b"


def deferred_by(node: str, reply: str) -> Spool:
    """m1, accepted by `node`, whose one attempt there was deferred with `reply`."""
    spool = spool_with(accept("m1", "u@x.example", by=node))
    spool.apply(Assign(1, (Assignment("m1", 0, node, 1),)))
    spool.apply(Outcome(2, "m1", node, 1, (RcptResult(0, OutcomeKind.DEFERRED, reply, 3),)))
    return spool


def test_a_retry_after_a_failure_without_a_remote_reply_goes_to_another_node() -> None:
    """b cannot reach out (its network, its resolver): the mail it accepted went back
    to it at every retry, as the accepting node, and stayed until it bounced."""
    for local in ("4.4.1 10.0.0.9:25: ConnectionRefusedError: refused",
                  "4.4.3 MX lookup for x.example failed: timeout"):  # fmt: skip
        [cmd] = p.assign(deferred_by("b", local), 3, POLICY, ["a", "b", "c"])
        assert cmd.assignments[0].node == "a", local
        # with no other node live, b tries again all the same
        [cmd] = p.assign(deferred_by("b", local), 3, POLICY, ["b"])
        assert cmd.assignments[0].node == "b"


def test_a_retry_after_a_remote_4xx_stays_on_the_node_it_came_from() -> None:
    """Greylisting keys on the client's address: another node would start it over."""
    spool = deferred_by("b", "451 4.7.1 Greylisted, try again in 60 s")
    [cmd] = p.assign(spool, 3, POLICY, ["a", "b", "c"])
    assert cmd.assignments[0].node == "b"


def test_nodes_that_are_down_get_nothing() -> None:
    spool = spool_with(accept("m1", "u@x.example", by="b"))
    [cmd] = p.assign(spool, 0, POLICY, ["a", "c"])
    assert cmd.assignments[0].node == "a"
    assert p.assign(spool, 0, POLICY, []) == []


def test_backoff_follows_the_schedule_and_repeats_its_last_step() -> None:
    sched = p.Policy(retry_schedule_ms=(60_000, 300_000, 900_000))
    assert [p.next_attempt(sched, n, 1_000) for n in (1, 2, 3, 4, 9)] == [
        61_000, 301_000, 901_000, 901_000, 901_000,
    ]  # fmt: skip


def test_messages_past_their_lifetime_expire_into_bounces() -> None:
    short = p.Policy(max_lifetime_ms=10_000)
    spool = spool_with(accept("old", "u@x.example", at=0), accept("new", "u@x.example", at=5_000))
    [expire] = p.expired(spool, 10_000, short)
    assert expire.message_id == "old" and "5.4.7" in expire.reason
    assert [g.message_id for g in p.due_groups(spool, 10_000, short, {"old"})] == ["new"]
    spool.apply(expire)
    assert spool.messages["old"].rcpts[0].state is RcptState.BOUNCED


def test_a_message_stamped_by_a_clock_ahead_does_not_hold_back_expiry() -> None:
    """The walk stops at the first young message; one stamped days ahead of the
    leader's clock is not young, it is from a clock that was wrong."""
    short = p.Policy(max_lifetime_ms=10_000)
    spool = spool_with(
        accept("old", "u@x.example", at=0),
        accept("ahead", "u@x.example", at=6 * 86_400_000, by="b"),
        accept("later", "u@x.example", at=1_000),
    )
    assert [e.message_id for e in p.expired(spool, 20_000, short)] == ["old", "later"]


def test_the_expiry_walk_steps_over_a_bounded_number_of_messages_stamped_ahead() -> None:
    """It runs every tick: a pile of mail from a clock ahead must not make it walk all."""
    short = p.Policy(max_lifetime_ms=10_000)
    ahead = [accept(f"a{k}", "u@x.example", at=60_000, by="b") for k in range(3)]
    spool = spool_with(*ahead, accept("old", "u@x.example", at=0))
    assert [e.message_id for e in p.expired(spool, 20_000, short)] == ["old"]
    assert p.expired(spool, 20_000, short, skip_ahead=2) == []  # past the bound: it waits


def bounced(sender: str = "s@example.org") -> Spool:
    spool = spool_with(accept("m1", "u@x.example", "v@y.example", sender=sender))
    spool.apply(Assign(1, (Assignment("m1", 0, "a", 1), Assignment("m1", 1, "a", 1))))
    spool.apply(BeginDot(2, "m1", (0, 1), "a", 1))
    results = (
        RcptResult(0, OutcomeKind.FAILED, "550 5.1.1 <u@x.example>: no such user"),
        RcptResult(1, OutcomeKind.DELIVERED, "250 2.0.0 ok"),
    )
    spool.apply(Outcome(3_600_000, "m1", "a", 1, results))
    return spool


def test_a_bounce_produces_an_rfc_3464_report_to_the_sender() -> None:
    spool = bounced()
    [dsn] = p.bounces(spool, 3_600_000, "relay.example.com", "n2")
    assert dsn.sender == "" and dsn.recipients == ("s@example.org",) and dsn.is_bounce
    assert dsn.accepted_by == "n2"  # the leader that made it, and stamped it by its clock
    msg = email.message_from_bytes(dsn.body, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text, status, headers = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "u@x.example" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    blocks: list[Message] = status.get_payload()  # type: ignore[assignment]
    assert blocks[0]["Reporting-MTA"] == "dns; relay.example.com"
    assert blocks[1]["Final-Recipient"] == "rfc822; u@x.example"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
    assert "no such user" in blocks[1]["Diagnostic-Code"]
    assert len(blocks) == 2  # the delivered recipient is not reported
    # RFC 5322 section 4: "GMT" is obsolete zone syntax, never to be generated.
    assert msg["Date"] == "Thu, 01 Jan 1970 01:00:00 +0000"  # `now`, 3,600,000 ms
    assert blocks[1]["Last-Attempt-Date"] == msg["Date"]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <x@example.org>" in headers.get_payload(decode=True)
    spool.apply(dsn)
    assert "m1" not in spool.messages and dsn.message_id in spool.messages
    assert p.bounces(spool, 3_600_001, "relay.example.com", "a") == []  # nothing twice


def test_no_bounce_to_the_null_sender_nor_for_a_bounce() -> None:
    spool = bounced(sender="")
    assert p.bounces(spool, 3_600_000, "relay.example.com", "a") == []
    assert "m1" not in spool.messages  # nothing owed: it left the spool
    spool = Spool()
    spool.apply(Accept(0, "d1", "", ("s@example.org",), BODY, "a", is_bounce=True))
    spool.apply(Assign(1, (Assignment("d1", 0, "a", 1),)))
    spool.apply(Outcome(2, "d1", "a", 1, (RcptResult(0, OutcomeKind.FAILED, "550 gone"),)))
    assert p.bounces(spool, 3, "relay.example.com", "a") == []
