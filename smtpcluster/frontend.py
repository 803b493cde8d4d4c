"""The SMTP front end: aiosmtpd's protocol, our policy in its handler hooks.

Relay policy lives in `handle_RCPT`; acceptance in `handle_DATA`, which answers 250
only once the Accept command has been applied through Raft (durable on a majority).
The SMTP subclass closes gaps of aiosmtpd 1.4.6 (PIPELINING and ENHANCEDSTATUSCODES
advertised, MAIL/RCPT without angle brackets refused), adds Postfix's session limits,
and does two things aiosmtpd does slowly: it reads DATA in blocks and writes the
replies it has together.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailqueue.commands import Accept
from mailqueue.policy import mail_date
from smtpcluster import logs
from smtpcluster.auth import Throttle, Users
from smtpcluster.config import SmtpSection
from smtpcluster.diskspace import NO_ROOM, DiskReserve, declared_size
from smtpcluster.dkim import Signer
from smtpcluster.ratelimit import RateLimiter
from smtpcluster.sessions import Sessions
from smtpcluster.smtpdata import Data, DataBudget, DataState, read_data
from smtpcluster.status_codes import with_status_code

log = logging.getLogger(__name__)

# Propose an Accept; returns True once applied. Raises TimeoutError when no leader
# took it in time (or its fate is still unknown at the hard cap), AcceptRefused when
# the spool applied it and refused it.
Submit = Callable[[Accept, float], Awaitable[bool]]


class AcceptRefused(Exception):
    """The spool applied the Accept and refused it: the message is not queued."""


RELAY_DENIED = "554 5.7.1 Relaying denied"
# To a client that may relay, about an address no relay should interpret (plain_domain):
# "Relaying denied" sent its operator to look at relay_networks for nothing.
ADDRESS_FORM = (
    "553 5.1.3 Address not accepted: only local@domain is relayed, without quotes, "
    "spaces, source routes or % and ! paths"
)
# RFC 3463 4.3.1, "mail system full": for now; the client tries again later.
NO_MEMORY = "452 4.3.1 Insufficient system resources, try again later"
# RFC 6531 3.4: a UTF-8 address only in a transaction whose MAIL said SMTPUTF8 (Postfix's
# reply): a receiver that lacks SMTPUTF8 must then be told, not guessed at.
UNDECLARED_UTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
QUEUED = "250 2.0.0 Ok: queued as "
_ATOM = r"[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(.*)\Z",
    re.DOTALL,
)
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_JUNK = "421 4.7.0 Too many commands without mail, closing connection"
# The greeting says "220 <hostname> ESMTP smtpcluster", as Postfix's default says
# "ESMTP Postfix"; aiosmtpd's own ("Python SMTP 1.4.6") told scanners a library version.
BANNER = "ESMTP smtpcluster"
MAX_HELD_REPLIES = 100  # a client pipelining more than this gets them written, drained
MAX_UNSENT_BYTES = 64 << 10  # replies the client has not read: stop until it does
BAD_ADDRESS_CHARS = frozenset('%!:"\\ ')
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def new_message_id(node: str) -> str:
    """Unique across the cluster: time, node and randomness."""
    return f"{time.time_ns() // 1000:x}-{os.urandom(5).hex()}-{node}"


def printable(name: str) -> str:
    """A client's word (its HELO name) as we write it in a header: control characters
    and bytes that are not UTF-8 as '?', as Postfix prints them."""
    return CONTROL_CHARS.sub("?", name).encode("utf-8", "replace").decode()


def _is_utf8(text: str) -> bool:
    """Whether aiosmtpd's decoding of `text` kept no undecodable byte (as a surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def plain_domain(address: str) -> str | None:
    """The domain of a plain local@domain address, or None for anything a relay must not
    interpret: source routes, %-hacks, !-paths, quoted local parts holding '@'."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or "@" in local or BAD_ADDRESS_CHARS & set(local):
        return None
    if BAD_ADDRESS_CHARS & set(domain) or domain.startswith("["):
        return None
    return domain.lower().rstrip(".")


@dataclass
class RelayPolicy:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    domains: frozenset[str]

    def trusted(self, peer_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def refusal(self, peer_ip: str, authenticated: bool, rcpt: str) -> str:
        """The reply refusing `rcpt` from this client, or "" to take it. An outsider
        hears "Relaying denied" for any address it may not use, whatever its form."""
        domain = plain_domain(rcpt)
        may_relay = authenticated or self.trusted(peer_ip)
        if domain is None:
            return ADDRESS_FORM if may_relay else RELAY_DENIED
        return "" if may_relay or domain in self.domains else RELAY_DENIED


class Handler:
    def __init__(
        self, cfg: SmtpSection, node_id: str, submit: Submit, users: Users | None = None,
        disk: DiskReserve | None = None,
    ) -> None:  # fmt: skip
        self.node_id = node_id
        self.submit = submit
        self.disk = disk  # None: no free-space check (unit tests)
        self.throttle = Throttle()
        self.refused = 0  # recipients refused for relaying: a metric
        self.bugs = 0  # exceptions from a command, answered 451: a metric
        self.sessions: Sessions[FrontendSMTP] = Sessions()  # open ones: limits, draining
        self.connection_rate = RateLimiter("connections")
        self.message_rate = RateLimiter("messages")
        self.data_budget = DataBudget(cfg.max_data_in_memory)
        self.signer = Signer([])  # [dkim]: set by the node, at start and on reload
        self.reconfigure(cfg, users)

    def reconfigure(self, cfg: SmtpSection, users: Users | None) -> None:
        """New limits, relay policy and users, for sessions that start from now on
        (a session reads them as it goes: a changed relay_networks applies to its next
        RCPT; AUTH checks the users of the moment)."""
        self.cfg = cfg
        self.users = users
        self.data_budget.limit = cfg.max_data_in_memory
        self.policy = RelayPolicy(cfg.relay_networks, frozenset(cfg.relay_domains))

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator for PLAIN and LOGIN (only ever after STARTTLS)."""
        peer = _peer(session)
        if self.users is None or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = data.login.decode("utf-8", "replace")
        if self.users.verify(name, data.password.decode("utf-8", "replace")):
            self.throttle.succeeded(peer)
            return AuthResult(success=True, handled=False, auth_data=name)
        self.throttle.failed(peer)
        log.warning("AUTH failed for user %r from %s", name, peer)  # never the password
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        last = responses.pop()  # "250 HELP": stays last
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    def admit(self, session: FrontendSMTP, peer: str) -> str | None:
        """None for a new connection that may go on, else the 421 to close it with."""
        cfg, trusted = self.cfg, self.policy.trusted
        limit = cfg.client_connection_rate_limit
        if limit and not trusted(peer) and not self.connection_rate.allow(peer, limit):
            return f"421 4.7.0 Too many connections from {peer}, try again later"
        limits = (cfg.max_sessions, cfg.max_sessions_per_client)
        return self.sessions.admit(session, peer, limits, trusted)

    def _message_rate_refusal(self, session: Session) -> str:
        """The 450 to refuse this MAIL with, the client being over its rate; else "".
        An authenticated session counts against its user, wherever it comes from: a
        stolen password is what this limit is mostly for."""
        limit, peer = self.cfg.client_message_rate_limit, _peer(session)
        if not limit or self.policy.trusted(peer):
            return ""
        key = f"user {_user(session)}" if session.authenticated else peer
        if self.message_rate.allow(key, limit):
            return ""
        return f"450 4.7.1 Too much mail from {key}, try again later"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        if not self._room_for(declared_size(mail_options)):
            return NO_ROOM
        if too_much := self._message_rate_refusal(session):
            return too_much
        if not (address.isascii() or envelope.smtp_utf8):
            return UNDECLARED_UTF8
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    def _room_for(self, size: int) -> bool:
        return self.disk is None or self.disk.room_for(size, self.cfg.min_free_space)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if len(envelope.rcpt_tos) >= self.cfg.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not (address.isascii() or envelope.smtp_utf8):
            return UNDECLARED_UTF8
        peer = _peer(session)
        if address.lower() == "postmaster":
            return self._postmaster(envelope, rcpt_options)
        if refusal := self.policy.refusal(peer, bool(session.authenticated), address):
            if refusal == RELAY_DENIED:
                self.refused += 1
                log.warning("relaying denied: peer=%s rcpt=<%s>", peer, address)
            else:
                log.warning("address form refused: peer=%s rcpt=<%s>", peer, address)
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _postmaster(self, envelope: Envelope, rcpt_options: list[str]) -> str:
        """RFC 5321 4.5.1: a relay MUST take <postmaster>, from anyone: a remote site
        writes there about abuse from our clients. It goes to smtp.postmaster."""
        if not self.cfg.postmaster:
            return "550 5.1.1 <postmaster>: no postmaster mailbox is configured here"
        envelope.rcpt_tos.append(self.cfg.postmaster)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception from a command: a bug. Its own answer, a
        500, tells the client to give the message up and bounce it to its sender, when
        the message may already be queued: 451 makes it try again."""
        log.error("SMTP session exception: %r", error, exc_info=error)
        self.bugs += 1
        return "451 4.3.0 Internal error, try again later"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        head = header_of(raw)
        if refusal := self._refusal(session, envelope, raw, head):
            self._log(session, envelope, "", len(raw), reply=refusal, began=time.monotonic())
            return refusal
        message_id = new_message_id(self.node_id)
        now = int(time.time() * 1000)
        trace = self._received(session, envelope, message_id, now)
        body = b"".join((trace, self._missing_headers(session, head, message_id, now), raw))
        if self._from_our_client(session) and (sig := self.signer.signature(body, now // 1000)):
            body = sig + body  # signed last: it covers the Date and Message-ID we added
        size = len(body)
        submitted = self.submit(
            Accept(now, message_id, _unbracket(envelope.mail_from), tuple(envelope.rcpt_tos),
                   body, self.node_id),
            self.cfg.accept_timeout_ms / 1000,
        )  # fmt: skip
        # From here the message's bytes live on only in what `submitted` encodes: the
        # data as read and the Accept were each a copy as large as the message, held
        # for as long as its commit took.
        envelope.content = envelope.original_content = None
        del raw, body
        began = time.monotonic()
        reply = QUEUED + message_id
        try:
            await submitted
        except TimeoutError:
            reply = "451 4.3.0 Cluster unavailable, try again later"
        except AcceptRefused as exc:
            # Nothing in the spool refuses a new Accept today; if it ever does, the
            # message is not queued, and a 4xx is the truth.
            log.error("message %s refused by the spool: %s", message_id, exc)
            reply = "451 4.3.0 Cluster unavailable, try again later"
        self._log(session, envelope, message_id, size, reply=reply, began=began)
        return reply

    def _log(
        self, session: Session, envelope: Envelope, message_id: str, size: int, *,
        reply: str, began: float,
    ) -> None:  # fmt: skip
        """One line per transaction, envelope facts only: never the body; `id` is empty
        for a message refused before it had one. Written just after the reply
        (FrontendSMTP.smtp_DATA sends it at once): the client need not wait for it."""
        level = logging.INFO if reply.startswith("250") else logging.WARNING
        asyncio.get_running_loop().call_soon(functools.partial(
            logs.event, log, "smtp", level, id=message_id,
            sender=f"<{_unbracket(envelope.mail_from)}>", rcpts=",".join(envelope.rcpt_tos),
            size=size, peer=_peer(session), auth=_user(session), tls=session.ssl is not None,
            reply=reply, took=f"{time.monotonic() - began:.3f}s",
        ))  # fmt: skip

    def __dir__(self) -> list[str]:
        # aiosmtpd's SMTP.__init__ looks through dir(handler) twice per connection
        # (inspect.getmembers for auth_*, a scan for handle_*): only these matter.
        return list(HANDLER_HOOKS)

    def _refusal(self, session: Session, envelope: Envelope, raw: bytes, head: bytes) -> str:
        """The reply that refuses this message before it is proposed, or "" to go on."""
        crlf = raw.count(b"\r\n")  # counted, not copied
        if raw.count(b"\n") != crlf:
            return "550 5.6.11 Bare LF in message: lines must end with CRLF"
        if raw.count(b"\r") != crlf:
            # Passed on as it is, "<CR>.<CR><LF>" ends the data at a receiver that ends
            # lines at a CR, and what follows is read as commands: SMTP smuggling.
            return "550 5.6.11 Bare CR in message: lines must end with CRLF"
        if (hops := count_fields(head, b"received")) > self.cfg.max_hops:
            log.warning("mail loop? %d Received headers from %s, sender <%s>: refused",
                        hops, _peer(session), _unbracket(envelope.mail_from))  # fmt: skip
            return f"554 5.4.6 Too many hops ({hops} Received headers): a mail loop?"
        if not self._room_for(len(raw)):  # MAIL's check knew at most a declared size
            return NO_ROOM
        return ""

    def _missing_headers(self, session: Session, head: bytes, message_id: str, now: int) -> bytes:
        """Message-ID and Date for mail our own clients submit without them, as Postfix
        adds them for its local clients: many receivers refuse mail without a
        Message-ID. Never for mail from elsewhere, and never one that is there."""
        cfg = self.cfg
        if not cfg.add_missing_headers or not self._from_our_client(session):
            return b""
        out = b""
        if not has_field(head, b"message-id"):
            out += f"Message-ID: <{message_id}@{cfg.hostname}>\r\n".encode()
        if not has_field(head, b"date"):
            out += f"Date: {mail_date(now)}\r\n".encode()
        return out

    def _from_our_client(self, session: Session) -> bool:
        """Authenticated, or in relay_networks: mail we send for our own, not mail
        from elsewhere that we relay in to relay_domains."""
        return bool(session.authenticated) or self.policy.trusted(_peer(session))

    def _received(self, session: Session, envelope: Envelope, message_id: str, now: int) -> bytes:
        peer = _peer(session)
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            proto += "S"
        if session.authenticated:
            proto += "A"
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        date = mail_date(now)
        # As Postfix prints it: a bare CR in the client's HELO name would end our header's
        # line at a receiver and let the client write a trace field of its own above it.
        helo = printable(session.host_name or "unknown")
        # RFC 5321's TCP-info is an address literal, which for IPv6 carries a tag (as
        # Postfix writes it too): receivers that parse trace fields expect it.
        literal = f"IPv6:{peer}" if ":" in peer else peer
        return (
            f"Received: from {helo} ([{literal}])\r\n\tby {self.cfg.hostname} (smtpcluster) "
            f"with {proto} id {message_id}{rcpt};\r\n\t{date}\r\n"
        ).encode()


HANDLER_HOOKS = tuple(n for n in vars(Handler) if n.startswith(("handle_", "auth_")))
# aiosmtpd also reads handle_EHLO's signature on every connection (to tell its old
# four-argument form from the new one); inspect.signature honours __signature__.
Handler.handle_EHLO.__signature__ = inspect.signature(Handler.handle_EHLO)  # type: ignore[attr-defined]


def header_of(raw: bytes) -> bytes:
    """The message's header in lower case, after a CRLF: every field name then follows
    a CRLF, for count_fields and has_field."""
    end = raw.find(b"\r\n\r\n")
    return b"\r\n" + (raw if end < 0 else raw[: end + 2]).lower()


def count_fields(head: bytes, name: bytes) -> int:
    """How many `name` fields (lower case) the header_of() holds. Of Received: the hops
    the message has made (RFC 5321 6.3: counting them is how loops are caught)."""
    return head.count(b"\r\n" + name + b":")


def has_field(head: bytes, name: bytes) -> bool:
    return b"\r\n" + name + b":" in head


def _peer(session: Session) -> str:
    return str(session.peer[0]) if isinstance(session.peer, tuple) else "unknown"


def _user(session: Session) -> str:
    return str(session.auth_data) if session.authenticated else ""


def _unbracket(address: str | None) -> str:
    a = (address or "").strip()
    return "" if a in ("", "<>") else a.strip("<>")


def _junk_command(name: str) -> Any:  # Any: it replaces methods of differing stub types
    """aiosmtpd's command, counted against the junk limit first; `wraps` keeps the
    syntax attributes aiosmtpd's HELP reads."""
    parent = getattr(SMTP, name)

    @functools.wraps(parent)
    async def command(self: FrontendSMTP, arg: str) -> None:
        if not await self._junk_over_limit():
            await parent(self, arg)

    return command


def _greeting_command(name: str) -> Any:  # Any: as _junk_command's
    """aiosmtpd's HELO or EHLO, its replies left without enhanced status codes."""
    parent = getattr(SMTP, name)

    @functools.wraps(parent)
    async def command(self: FrontendSMTP, hostname: str) -> None:
        self._in_helo = True
        try:
            await parent(self, hostname)
        finally:
            self._in_helo = False

    return command


class FrontendSMTP(SMTP):
    """aiosmtpd's SMTP with the RFC 5321 syntax it lets through refused, AUTH slowed
    down for addresses that keep failing, and Postfix's two session limits: too many
    error replies, or too many commands that carry no mail, end the session."""

    def __init__(self, handler: Handler, *args: Any, implicit_tls: bool = False, **kw: Any) -> None:
        super().__init__(handler, *args, **kw)
        # Port 465: the connection is TLS from its first byte, so AUTH needs no STARTTLS
        # (aiosmtpd counts only STARTTLS as TLS, and would refuse AUTH with 538).
        self.implicit_tls = implicit_tls
        if implicit_tls:
            self._auth_require_tls = False
        self.handler = handler
        self.limits = handler.cfg
        self.errors = 0
        self.junk = 0
        self._replies: list[bytes] = []  # said, not yet written: see push()
        self.settled = asyncio.Event()  # clear from the final dot to its reply
        self.settled.set()
        self._flush_due = False
        self.refusal: str | None = None  # over a session limit: the 421 to close with
        self._greeted = False  # see _coded
        self._in_helo = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self.transport is None  # STARTTLS makes it again for the same session
        super().connection_made(transport)
        if fresh:
            assert self.session is not None  # aiosmtpd made it
            if self.implicit_tls:  # for the Received header and the transaction log
                self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
            self.refusal = self.handler.admit(self, _peer(self.session))

    async def _handle_client(self) -> None:
        if self.refusal is not None:  # instead of the greeting
            await self._hang_up(self.refusal)
            return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        self.handler.sessions.discard(self)
        super().connection_lost(error)

    async def shut_down(self) -> None:
        """RFC 5321 3.8: a server that must stop says 421 and closes, at any point but
        one: while a message's Accept is in flight its fate is not yet known, and a 421
        then could refuse a message the cluster goes on to commit. Its own reply (250,
        or 451 once the fate is settled; at most ACCEPT_HARD_CAP_S) comes first."""
        await self.settled.wait()
        await self._hang_up("421 4.3.2 Service shutting down, try another server")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL/RCPT argument with the email package's header
        # parser (and defines a class on each call): a third of a session's parsing
        # CPU. A plain <dot-atom@host.name> gives the same answer by regex; anything
        # else (quotes, literals, <>, UTF-8) still goes through aiosmtpd.
        if m := PLAIN_ADDRESS.match(arg):
            local = m.group(1).rpartition("@")[0]
            if not (self.local_part_limit and len(local) > self.local_part_limit):
                return m.group(1), m.group(2).lstrip()
        addr, rest = super()._getaddr(arg)
        if addr and (CONTROL_CHARS.search(addr) or not _is_utf8(addr)):
            # The email parser lets them through. aiosmtplib will not send a control
            # character, so such a recipient would never leave; a CR in it would end a
            # line; and bytes that are not UTF-8 (aiosmtpd keeps them as surrogates)
            # cannot be encoded into the Accept: that message got 451 at its dot, for
            # every retry. 553 at once.
            return None, None
        return addr, rest

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ scans dir(self) with getattr on every name, on every
        # connection, only to find its smtp_* and auth_* methods; over asyncio's whole
        # protocol class that scan was a quarter of a front end's CPU under load.
        return list(PROTOCOL_METHODS)

    async def push(self, status: AnyStr) -> None:
        """aiosmtpd's push, but replies are gathered and written once the session has
        nothing more to say for now (RFC 2920 lets a server do so, as Postfix does):
        a loopback write costs 50-80 us on our VMs and aiosmtpd wrote one per reply
        line, seven for an EHLO. A greeting (also STARTTLS's), 221 or 421 goes out at
        once: the connection changes or closes right after it."""
        if isinstance(status, str):
            text = self._coded(status)
            data = text.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            text, data = status.decode("ascii", "replace"), status
        self._replies.append(data + b"\r\n")
        if text[:3] in ("220", "221", "421") or self._backlogged():
            self._flush_replies()
            await self._writer.drain()  # a client that does not read is not read either
        elif not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush_replies)
        if text.startswith(QUEUED):
            self.junk = 0
        elif text[:1] in "45" and not text.startswith("421"):
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                await self._hang_up(TOO_MANY_ERRORS)

    def _coded(self, status: str) -> str:
        """`status` with an enhanced status code (smtpcluster.status_codes), but for the
        greeting (a session's first reply) and the replies to HELO and EHLO: RFC 2034
        exempts them."""
        if not self._greeted:
            self._greeted = True
            return status
        return status if self._in_helo else with_status_code(status)

    def _backlogged(self) -> bool:
        unsent = self._writer.transport.get_write_buffer_size()
        return len(self._replies) >= MAX_HELD_REPLIES or unsent > MAX_UNSENT_BYTES

    def _flush_replies(self) -> None:
        self._flush_due = False
        if not self._replies:
            return
        data = b"".join(self._replies)
        self._replies.clear()
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(data)

    async def _hang_up(self, reply: str) -> None:
        await self.push(reply)  # a 421: written at once
        if self.transport is not None:
            self.transport.close()

    async def _junk_over_limit(self) -> bool:
        self.junk += 1
        if self.junk <= self.limits.max_junk_commands:
            return False
        await self._hang_up(TOO_MANY_JUNK)
        return True

    smtp_HELO = _greeting_command("smtp_HELO")
    smtp_EHLO = _greeting_command("smtp_EHLO")
    smtp_NOOP = _junk_command("smtp_NOOP")
    smtp_RSET = _junk_command("smtp_RSET")
    smtp_VRFY = _junk_command("smtp_VRFY")
    smtp_EXPN = _junk_command("smtp_EXPN")
    smtp_HELP = _junk_command("smtp_HELP")

    @functools.wraps(SMTP.smtp_STARTTLS)
    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd said 220 to a second STARTTLS and began a handshake inside the TLS
        # session, which dropped the client; RFC 3207 4.2 refuses it (Postfix's reply).
        if self.session is not None and self.session.ssl is not None:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        handler = self.event_handler
        peer = _peer(self.session) if self.session else ""
        if isinstance(handler, Handler) and (pause := handler.throttle.delay(peer)):
            await asyncio.sleep(pause)
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if not _bracketed(arg, "FROM:"):
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the data in blocks (smtpcluster.smtpdata)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        assert self.data_size_limit  # smtp_factory always sets one
        budget = self.event_handler.data_budget
        try:
            data = await read_data(
                self._reader, self.data_size_limit, self.line_length_limit, budget
            )
        except asyncio.CancelledError:  # aiosmtpd's way of ending the session (EOF, QUIT)
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:  # the client closed mid-DATA: nothing to say
            log.info("connection lost during DATA")
            self._writer.close()
            return
        self.settled.clear()
        held, ending = data.held, self._end_of_data(data)
        del data  # its bytes go on in the envelope alone (see Handler.handle_DATA)
        try:
            await ending
        finally:
            budget.give(held)  # proposed and answered: the log has it now
            self.settled.set()
        # The end of a transaction: the client waits for this reply before it goes on
        # (RFC 2920 makes the end of data a point where it must), so the reply leaves
        # now, not after the loop's other ready work; handle_DATA's log line follows it.
        self._flush_replies()

    async def _end_of_data(self, data: Data) -> None:
        """The reply to the data, queued before `settled` lets a drain's 421 follow it."""
        assert self.envelope is not None
        state = data.state
        if state is DataState.NOMINAL:
            self.envelope.content = self.envelope.original_content = data.content
        del data  # not held while the hook waits for the commit
        if state is DataState.NOMINAL:
            status = await self._call_handler_hook("DATA")
        elif state is DataState.TOO_MUCH:
            status = "552 5.3.4 Message size exceeds fixed limit"
        elif state is DataState.NO_MEMORY:
            limit = self.event_handler.data_budget.limit
            log.warning("message refused: the sessions hold smtp.max_data_in_memory (%d "
                        "bytes) of message data already", limit)  # fmt: skip
            status = NO_MEMORY
        else:
            status = "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if not _bracketed(arg, "TO:"):
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        await super().smtp_RCPT(arg)


PROTOCOL_METHODS = tuple(n for n in dir(FrontendSMTP) if n.startswith(("smtp_", "auth_")))


def _bracketed(arg: str | None, keyword: str) -> bool:
    if arg is None or not arg.upper().startswith(keyword):
        return True  # aiosmtpd answers the other syntax errors itself
    return arg[len(keyword) :].lstrip().startswith("<")


def smtp_factory(handler: Handler, **kw: Any) -> Callable[[], SMTP]:
    def make() -> SMTP:
        cfg = handler.cfg  # read per connection: a reload applies to new sessions
        return FrontendSMTP(
            handler,
            hostname=cfg.hostname,
            ident=BANNER,
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=cfg.idle_timeout_ms / 1000,
            **kw,
        )

    return make
