"""Scheduling policy: pure functions from the spool (and the time) to commands.

The leader's scheduler calls these and proposes what they return; nothing here
changes the spool. Recipients are grouped by destination (their domain's route, else the
smarthost, else the domain), one group per message and destination so one SMTP transaction carries
them all; each group goes to the accepting node when it is live and not busier than
the others, else to the least loaded live node. A node's load is the recipients it
has in hand plus `busy`, the scheduler's measure of its other work (see
smtpcluster.scheduler): a node whose front end is taking a stream of mail, or the
leader replicating it, yields deliveries to a quieter one.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from mailqueue.commands import Accept, Assign, Assignment, Expire, MessageId, NodeId
from mailqueue.spool import Message, Rcpt, RcptState, Spool

MINUTE = 60_000


@dataclass(frozen=True, slots=True)
class Policy:
    retry_schedule_ms: tuple[int, ...] = field(
        default=(1 * MINUTE, 5 * MINUTE, 15 * MINUTE, 30 * MINUTE, 60 * MINUTE,
                 120 * MINUTE, 240 * MINUTE)
    )  # fmt: skip
    max_lifetime_ms: int = 5 * 24 * 60 * MINUTE
    smarthost: str = ""
    max_batch: int = 500  # assignments per Assign command
    routes: Mapping[str, str] = field(default_factory=dict)  # domain -> "host:port"

    def __post_init__(self) -> None:
        assert self.retry_schedule_ms and all(d > 0 for d in self.retry_schedule_ms)


def next_attempt(policy: Policy, attempts: int, now: int) -> int:
    """When to try again after `attempts` failed attempts; the last step repeats."""
    schedule = policy.retry_schedule_ms
    return now + schedule[min(max(attempts, 1), len(schedule)) - 1]


def destination(policy: Policy, address: str) -> str:
    """Where a recipient's mail goes next: its domain's route, else the smarthost, else
    the domain itself (by MX)."""
    domain = address.rpartition("@")[2].lower()
    return route(policy.routes, domain) or policy.smarthost or domain


def route(routes: Mapping[str, str], domain: str) -> str:
    """The next hop `routes` names for `domain` (see route_key); "" for none."""
    key = route_key(routes, domain)
    return routes[key] if key else ""


def route_key(routes: Mapping[str, str], domain: str) -> str:
    """The key of `routes` that covers `domain`: the domain itself, else the nearest
    ".parent" (Postfix's transport_maps); "" for none."""
    if not routes:
        return ""
    if domain in routes:
        return domain
    labels = domain.split(".")
    for k in range(1, len(labels)):
        if (parent := "." + ".".join(labels[k:])) in routes:
            return parent
    return ""


@dataclass(frozen=True, slots=True)
class Group:
    """Recipients of one message for one destination: one SMTP transaction."""

    message_id: MessageId
    destination: str
    rcpts: tuple[int, ...]


def due_groups(
    spool: Spool, now: int, policy: Policy, expiring: Collection[MessageId] = ()
) -> list[Group]:
    """Recipients due by `now`, longest due first: from the spool's index, so a backlog
    of deferred mail costs a tick nothing until it is due. Not those of the messages
    `expiring` (expired() said so, by its own time): they are bounced instead."""
    groups: list[Group] = []
    for mid in spool.index.due(now):
        msg = spool.messages[mid]
        if mid in expiring:
            continue
        by_dest: dict[str, list[int]] = {}
        for k, r in enumerate(msg.rcpts):
            if r.state is RcptState.QUEUED and r.next_attempt <= now:
                by_dest.setdefault(destination(policy, r.address), []).append(k)
        groups.extend(Group(msg.id, d, tuple(ks)) for d, ks in sorted(by_dest.items()))
    return groups


def assign(
    spool: Spool,
    now: int,
    policy: Policy,
    live: Iterable[NodeId],
    busy: Mapping[NodeId, int] | None = None,
    *,
    expiring: Collection[MessageId] = (),
) -> list[Assign]:
    """Assign due groups to live nodes, in batches of at most `max_batch` recipients."""
    nodes = sorted(set(live))
    if not nodes:
        return []
    busy = busy or {}
    load = {n: spool.load.get(n, 0) + busy.get(n, 0) for n in nodes}
    out: list[Assignment] = []
    for g in due_groups(spool, now, policy, expiring):
        msg = spool.messages[g.message_id]
        node = _choose(msg, g.rcpts, load)
        for k in g.rcpts:
            out.append(Assignment(msg.id, k, node, msg.rcpts[k].attempt + 1))
        load[node] += len(g.rcpts)
    return [
        Assign(now, tuple(out[i : i + policy.max_batch]))
        for i in range(0, len(out), policy.max_batch)
    ]


def _choose(msg: Message, ks: tuple[int, ...], load: dict[NodeId, int]) -> NodeId:
    tried = {msg.rcpts[k].node for k in ks if failed_locally(msg.rcpts[k])}
    # Another node, if there is one: else a node that cannot reach out, which took the
    # mail it accepted back at every retry, held it until it bounced.
    choice = {n: v for n, v in load.items() if n not in tried} or load
    least = min(choice, key=lambda n: (choice[n], n))
    home = msg.accepted_by
    if home in choice and choice[home] <= choice[least]:
        return home  # the body is already local there, and it is no busier
    return least


def failed_locally(r: Rcpt) -> bool:
    """Whether the recipient's last attempt failed without a word from the remote: no
    connection to any host, no DNS answer, no fence (the worker's own texts start with
    an enhanced code, "4.4.1 ..."; a remote's reply with its own, "451 ..."). That may
    be the node's fault (its network, its resolver), so the retry goes elsewhere. A
    remote's 4xx retries from the same node: greylisting keys on our address."""
    return r.state is RcptState.QUEUED and r.attempts > 0 and r.last_error.startswith("4.")


# How many messages stamped ahead of `now` (the time the clocks agree on, see the
# scheduler) one expiry walk steps over. Past them, expiry waits until that time reaches
# their stamps (a delay no longer than the other clock was ahead), so the walk costs at
# most this many per tick.
EXPIRY_SKIP_AHEAD = 1000


def expired(
    spool: Spool, now: int, policy: Policy, *, skip_ahead: int = EXPIRY_SKIP_AHEAD
) -> list[Expire]:
    """Messages past their lifetime with recipients still waiting. The spool keeps
    messages in the order they were accepted, so the walk stops at the first one still
    young: a message a little older than one before it (the nodes' clocks differ by
    their skew) expires a tick later, not never."""
    days = policy.max_lifetime_ms / (24 * 60 * MINUTE)
    waiting = (RcptState.QUEUED, RcptState.HELD, RcptState.UNCERTAIN)
    out = []
    ahead = 0
    for m in spool.messages.values():
        if m.received_at > now:
            # Stamped by a clock ahead of this one: no sign that those after it are
            # young too, and it would hold back their expiry by as long as it is ahead.
            # Only so many, though: this runs every tick, and a front end a few minutes
            # ahead with its mail piling up for a dead remote would make it walk them all.
            ahead += 1
            if ahead > skip_ahead:
                break
            continue
        if m.received_at + policy.max_lifetime_ms > now:
            break
        if any(r.state in waiting for r in m.rcpts):
            reason = f"5.4.7 delivery time expired: undelivered after {days:g} days"
            out.append(Expire(now, m.id, reason))
    return out


def bounces(spool: Spool, now: int, reporting_mta: str, by: NodeId) -> list[Accept]:
    """A DSN for every message with bounced recipients not yet reported, made by node
    `by` (the leader) and stamped `now` by its clock."""
    out = []
    for mid in spool.index.dsn_pending:
        m = spool.messages[mid]
        pending = tuple(k for k, r in enumerate(m.rcpts) if m.needs_dsn(r))
        if pending:
            out.append(dsn(spool, m, pending, now, reporting_mta, by=by))
    return out


def dsn(
    spool: Spool, msg: Message, rcpts: tuple[int, ...], now: int, mta: str, *, by: NodeId
) -> Accept:
    """An RFC 3464 delivery status notification, from the null sender, to the sender."""
    assert msg.sender and not msg.is_bounce  # never a bounce for a bounce, nor to <>
    tag = hashlib.sha256(repr(rcpts).encode()).hexdigest()[:8]
    dsn_id = f"{msg.id}.dsn-{tag}"
    body = render_dsn(spool.bodies.get(msg.id), msg, rcpts, now=now, mta=mta, dsn_id=dsn_id)
    return Accept(
        now, dsn_id, "", (msg.sender,), body, by, is_bounce=True,
        bounce_of=msg.id, bounce_rcpts=rcpts,
    )  # fmt: skip


def mail_date(ms: int) -> str:
    """An RFC 5322 date-time in UTC, as "+0000": "GMT" is the obsolete zone syntax,
    which RFC 5322 section 4 says must not be generated."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(ms // 1000, datetime.UTC))


def _status(reply: str) -> str:
    """The enhanced status code in a reply ("550 5.1.1 no such user"), or 5.0.0."""
    for word in reply.split()[:2]:
        parts = word.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245":
            return word
    return "5.0.0"


def render_dsn(
    original: bytes, msg: Message, rcpts: tuple[int, ...], *, now: int, mta: str, dsn_id: str
) -> bytes:
    boundary = f"=_{dsn_id}"
    headers = original.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    failed = "\r\n".join(f"  {msg.rcpts[k].address}: {msg.rcpts[k].reply}" for k in rcpts)
    per_rcpt = "".join(
        f"\r\nFinal-Recipient: rfc822; {msg.rcpts[k].address}\r\n"
        f"Action: failed\r\nStatus: {_status(msg.rcpts[k].reply)}\r\n"
        f"Diagnostic-Code: smtp; {msg.rcpts[k].reply}\r\n"
        f"Last-Attempt-Date: {mail_date(msg.rcpts[k].final_at or now)}\r\n"
        for k in rcpts
    )
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n"
        f"To: <{msg.sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {mail_date(now)}\r\n"
        f"Message-ID: <{dsn_id}@{mta}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"This is the mail system at {mta}.\r\n\r\n"
        "Your message could not be delivered to these recipients:\r\n\r\n"
        f"{failed}\r\n\r\n"
        f"--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {mta}\r\n"
        f"Arrival-Date: {mail_date(msg.received_at)}\r\n"
        f"{per_rcpt}\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
    )
    return text.encode() + headers + f"\r\n--{boundary}--\r\n".encode()
