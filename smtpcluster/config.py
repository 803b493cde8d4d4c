"""The node's TOML configuration: parsed, validated and refused with the file and key.

The schema is ../shared/DESIGN.md's. Unknown keys are errors (a typo must not silently
fall back to a default); so are bad addresses, networks, durations and missing files.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import tomllib
from dataclasses import dataclass, field
from typing import Any

from raft.transport import MAX_FRAME, Address
from smtpcluster.auth import Users, UsersFileError
from smtpcluster.dkim import DkimKey, DkimKeyError
from smtpcluster.logs import FORMATS, LEVELS


def toml_kind(kind: type) -> str:
    """A value's type as the config file spells it: an operator does not read "int"."""
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list",
             dict: "a table", float: "a number"}  # fmt: skip
    return names.get(kind, f"a {kind.__name__}")


class ConfigError(Exception):
    """A configuration that must not be started with."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path, self.key, self.problem = path, key, problem


# A message goes between the nodes whole, in one Raft frame (at most MAX_FRAME, 64 MiB),
# with its envelope: past that, every follower refused the frame, the leader could never
# commit the Accept, elections followed, and its client waited with no reply.
# tests/unit/test_config.py checks that the largest message and envelope allowed fit.
MAX_MESSAGE_SIZE = MAX_FRAME * 3 // 4  # 48 MiB
MAX_RECIPIENTS = 10_000  # of up to 256 bytes each: 2.5 MiB (Postfix's default is 1000)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAILBOX_LOCAL = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*")


def is_hostname(text: str) -> bool:
    return all(HOST_LABEL.fullmatch(label) for label in text.removesuffix(".").split("."))


def is_mailbox(text: str) -> bool:
    """A plain local@domain (ASCII, dot-atom local part, no %, ! or quotes): an address
    this file names for us to send to."""
    local, at, domain = text.rpartition("@")
    return bool(at and MAILBOX_LOCAL.fullmatch(local)) and "." in domain and is_hostname(domain)


def parse_duration_ms(text: str) -> int:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like 100ms, 30s, 5m, 4h or 5d")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


@dataclass(frozen=True)
class NodeSection:
    id: str
    data_dir: str


@dataclass(frozen=True)
class ClusterSection:
    listen: Address
    peers: dict[str, Address]
    key: bytes
    heartbeat_ms: int = 100
    election_ms: int = 1000
    # A new node started with join = true waits, empty, to be added by
    # `smtpcluster cluster join`; its peers name the members it can reach.
    join: bool = False


@dataclass(frozen=True)
class SmtpSection:
    hostname: str
    relay_listen: tuple[Address, ...] = ()
    submission_listen: tuple[Address, ...] = ()
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    relay_domains: tuple[str, ...] = ()
    max_message_size: int = 26_214_400
    # New mail is refused (452 4.3.1) while data_dir's file system has less free; the
    # default, 256 MiB, is over 4 x the largest max_message_size. 0: no check.
    min_free_space: int = 256 << 20
    max_recipients: int = 1000
    tls_cert: str = ""
    tls_key: str = ""
    users_file: str = ""
    accept_timeout_ms: int = 120_000  # how long a client may wait for a leader, then 451
    idle_timeout_ms: int = 300_000  # a client silent this long is disconnected
    # Postfix's smtpd_hard_error_limit and smtpd_junk_command_limit: a session that
    # collects this many error replies, or sends this many NOOP/RSET/VRFY/EXPN/HELP
    # without queueing a message, is cut off with 421.
    max_errors: int = 20
    max_junk_commands: int = 100
    # Postfix's process limit and smtpd_client_connection_count_limit: sessions open at
    # once, in all and from one address (relay_networks exempt); more get 421.
    max_sessions: int = 1000
    max_sessions_per_client: int = 50
    # Port 465 (RFC 8314 "submissions"): TLS from the first byte, then AUTH, then mail.
    submissions_listen: tuple[Address, ...] = ()
    # Postfix's smtpd_client_connection_rate_limit and smtpd_client_message_rate_limit:
    # per client (an authenticated session's messages: per user), a minute, on each
    # node; relay_networks exempt; 0: no limit (Postfix's default too).
    client_connection_rate_limit: int = 0
    client_message_rate_limit: int = 0
    # A message with more Received fields is refused at its final dot (554 5.4.6): a
    # mail loop. RFC 5321 6.3 asks for a threshold of at least 100; Postfix: 50.
    max_hops: int = 100
    # Message-ID and Date added when missing, for relay_networks and authenticated
    # clients only (Postfix: for local_header_rewrite_clients).
    add_missing_headers: bool = True
    # Where RCPT TO:<postmaster> (no domain) goes, from any client: RFC 5321 4.5.1 says a
    # relay MUST accept it. Empty: it is refused, as we have no mailbox of our own.
    postmaster: str = ""
    # Message data the front end may hold in memory at once, over all sessions; past it
    # a message gets 452 4.3.1 and the client tries again later.
    max_data_in_memory: int = 256 << 20


@dataclass(frozen=True)
class DeliverySection:
    smarthost: str = ""
    nameservers: tuple[str, ...] = ()
    retry_schedule_ms: tuple[int, ...] = (
        60_000, 300_000, 900_000, 1_800_000, 3_600_000, 7_200_000, 14_400_000,
    )  # fmt: skip
    max_queue_lifetime_ms: int = 5 * 86_400_000
    on_uncertain: str = "redeliver"
    mx_port: int = 25  # the exchanges' SMTP port; only tests on loopback change it
    concurrency: int = 100  # SMTP transactions at once from this node (Postfix: 100)
    destination_concurrency: int = 20  # ... towards one host:port (Postfix: 20)
    node_down_after_ms: int = 5000  # silent this long: the leader takes its work back
    # Towards the smarthost only (MX hosts get "may"): Postfix's smtp_tls_security_level
    # and smtp_sasl_password_maps. The login is read from smarthost_auth_file.
    smarthost_tls: str = "may"
    smarthost_ca_file: str = ""
    smarthost_login: tuple[str, str] | None = None
    smarthost_tls_wrapper: bool = False  # TLS from the first byte (port 465)
    # Postfix's transport_maps: a domain's next hop "host:port", before the smarthost
    # and MX; a key ".example.com" covers every subdomain of example.com.
    routes: dict[str, str] = field(default_factory=dict)
    # Recipients in one outbound transaction (Postfix's default_destination_recipient_limit):
    # more make several, in parallel; many servers take at most 100 (RFC 5321's minimum).
    destination_recipient_limit: int = 50
    # Per route (a key of `routes`): "may" (the default), "encrypt" or "verify", as
    # smarthost_tls; Postfix's smtp_tls_policy_maps. "verify" chains to route_ca_file,
    # or to the system's CAs.
    route_tls: dict[str, str] = field(default_factory=dict)
    route_ca_file: str = ""
    # The local addresses deliveries connect from, at most one IPv4 and one IPv6
    # (Postfix's smtp_bind_address and smtp_bind_address6); empty: the kernel chooses.
    source_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminSection:
    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 8025))
    token: str = ""


@dataclass(frozen=True)
class LogSection:
    level: str = "info"  # debug, info, warning, error
    format: str = "text"  # "text" (key=value) or "json": one line per event, to stdout


@dataclass(frozen=True)
class DkimSection:
    # One per From: domain; a parent domain's key also signs its subdomains' mail.
    keys: tuple[DkimKey, ...] = ()


@dataclass(frozen=True)
class Config:
    path: str
    node: NodeSection
    cluster: ClusterSection
    smtp: SmtpSection
    delivery: DeliverySection
    admin: AdminSection
    log: LogSection = field(default_factory=LogSection)
    dkim: DkimSection = field(default_factory=DkimSection)


class _Reader:
    """Takes keys out of one TOML table; whatever is left over is an unknown key."""

    def __init__(self, path: str, prefix: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(path, prefix, "must be a table")
        self.path, self.prefix, self.table = path, prefix, dict(table)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def take(self, name: str, kind: type, default: Any = ...) -> Any:
        if name not in self.table:
            if default is ...:
                raise self.fail(name, "is required")
            return default
        value = self.table.pop(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(name, f"must be {toml_kind(kind)}, not {value!r}")
        return value

    def address(self, name: str, default: Any = ...) -> Address:
        text = self.take(name, str, default)
        if isinstance(text, Address):
            return text
        return self._parse_address(name, text)

    def _parse_address(self, name: str, text: str) -> Address:
        try:
            return Address.parse_typed(text)
        except ValueError as exc:
            raise self.fail(name, str(exc)) from None

    def addresses(self, name: str) -> tuple[Address, ...]:
        items = self.take(name, list, [])
        return tuple(
            self._parse_address(f"{name}[{k}]", _str(self, name, v)) for k, v in enumerate(items)
        )

    def duration(
        self, name: str, default_ms: int, at_least_ms: int = 0, at_most_ms: int | None = None
    ) -> int:
        text = self.take(name, str, None)
        if text is None:
            return default_ms
        try:
            ms = parse_duration_ms(text)
        except ValueError as exc:
            raise self.fail(name, str(exc)) from None
        if ms < at_least_ms:
            raise self.fail(name, f"{text!r} is less than {at_least_ms / 1000:g}s")
        if at_most_ms is not None and ms > at_most_ms:
            raise self.fail(name, f"{text!r} is more than {at_most_ms / 1000:g}s")
        return ms

    def file(self, name: str, required: bool = True) -> str:
        path = self.take(name, str, ... if required else "")
        if path and not os.path.isfile(path):
            raise self.fail(name, f"no such file: {path}")
        return str(path)

    def done(self) -> None:
        for name in sorted(self.table):
            raise self.fail(name, "unknown key")


def _str(r: _Reader, name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise r.fail(name, f"items must be strings, not {v!r}")
    return v


def _secret(path: str, r: _Reader, name: str) -> bytes:
    file = r.file(name)
    data = open(file, "rb").read().strip()  # noqa: SIM115 - one small read
    if len(data) < 16:
        raise ConfigError(path, r.key(name), f"{file} holds fewer than 16 bytes of secret")
    return data


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from None
    top = _Reader(path, "", raw)
    node = _node(path, top)
    cluster = _cluster(path, top, node)
    smtp = _smtp(path, top)
    delivery = _delivery(path, top)
    admin = _admin(path, top)
    log = _log(path, top)
    dkim = _dkim(path, top)
    top.done()
    _listeners_apart(path, [
        ("cluster.listen", cluster.listen), ("admin.listen", admin.listen),
        *((f"smtp.relay_listen[{k}]", a) for k, a in enumerate(smtp.relay_listen)),
        *((f"smtp.submission_listen[{k}]", a) for k, a in enumerate(smtp.submission_listen)),
        *((f"smtp.submissions_listen[{k}]", a) for k, a in enumerate(smtp.submissions_listen)),
    ])  # fmt: skip
    return Config(path, node, cluster, smtp, delivery, admin, log, dkim)


def _listeners_apart(path: str, listeners: list[tuple[str, Address]]) -> None:
    """Refuse two keys that would bind one port: found here, the error names both keys,
    where at start the second bind failed with 'address in use' after Raft had started."""
    for k, (key, a) in enumerate(listeners):
        for other, b in listeners[:k]:
            if a.port == b.port and _hosts_clash(a.host, b.host):
                raise ConfigError(path, key, f"{a} is also {other} ({b})")


def _hosts_clash(a: str, b: str) -> bool:
    """Whether two listeners on one port would take the same address. A wildcard takes
    every address of its own family only: the IPv6 one is bound IPV6_V6ONLY (asyncio and
    uvloop both do so), which is why a dual-stack node lists both 0.0.0.0 and [::]. A
    host name may resolve to either family, so it clashes with both wildcards."""
    ip = {h: _ip(h) for h in (a, b)}
    if ip[a] is not None and ip[a] == ip[b]:
        return True  # one address, perhaps spelt two ways (::1, 0:0:0:0:0:0:0:1)
    for wild, other in ((a, b), (b, a)):
        w, o = ip[wild], ip[other]
        if w is not None and w.is_unspecified and (o is None or o.version == w.version):
            return True
    return a == b


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _other_address(listen: Address, own: Address) -> bool:
    """Whether `listen` cannot be `own`: both IP addresses, not the same. A wildcard
    or a host name may well be the same place, and is let be."""
    try:
        a, b = ipaddress.ip_address(listen.host), ipaddress.ip_address(own.host)
    except ValueError:
        return False
    return not a.is_unspecified and (a, listen.port) != (b, own.port)


def _node(path: str, top: _Reader) -> NodeSection:
    r = _Reader(path, "node", top.take("node", dict))
    node_id = r.take("id", str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", node_id):
        raise r.fail("id", f"{node_id!r}: use letters, digits, '.', '_' or '-'")
    section = NodeSection(node_id, r.take("data_dir", str))
    r.done()
    return section


def _cluster(path: str, top: _Reader, node: NodeSection) -> ClusterSection:
    r = _Reader(path, "cluster", top.take("cluster", dict))
    listen = r.address("listen")
    peers = {
        str(n): r._parse_address(f"peers.{n}", _str(r, f"peers.{n}", a))
        for n, a in r.take("peers", dict).items()
    }
    if node.id not in peers:
        raise r.fail("peers", f"must include this node ({node.id})")
    if _other_address(listen, peers[node.id]):
        # A config copied from another node with node.id left as it was: this node would
        # stand in for that one, and the one it was meant to be would be missing.
        raise r.fail("listen", f"{listen} is not this node's address in peers "
                     f"({node.id} = {peers[node.id]}): is node.id right?")  # fmt: skip
    if "tls" in r.table:
        raise r.fail("tls", "mutual TLS between peers is not supported yet: use key_file")
    key = _secret(path, r, "key_file")
    heartbeat = r.duration("heartbeat_interval", 100)
    election = r.duration("election_timeout", 1000)
    if not 0 < heartbeat * 2 <= election:
        raise r.fail("election_timeout", "must be at least twice heartbeat_interval")
    join = r.take("join", bool, False)
    r.done()
    return ClusterSection(listen, peers, key, heartbeat, election, join)


def _smtp(path: str, top: _Reader) -> SmtpSection:
    r = _Reader(path, "smtp", top.take("smtp", dict))
    hostname = r.take("hostname", str)
    if not is_hostname(hostname):
        # It is our EHLO name to every server we deliver to, and our greeting's name.
        raise r.fail("hostname", f"{hostname!r} is not a host name like relay.example.com")
    relay, submission = r.addresses("relay_listen"), r.addresses("submission_listen")
    networks = []
    for k, text in enumerate(r.take("relay_networks", list, [])):
        try:
            net = ipaddress.ip_network(_str(r, "relay_networks", text), strict=False)
        except ValueError:
            raise r.fail(f"relay_networks[{k}]", f"{text!r} is not a network") from None
        if net.prefixlen == 0:
            raise r.fail(f"relay_networks[{k}]", f"{text!r} holds every address: it would "
                         "make this node an open relay")  # fmt: skip
        networks.append(net)
    domains = tuple(
        _domain(r, f"relay_domains[{k}]", _str(r, "relay_domains", d))
        for k, d in enumerate(r.take("relay_domains", list, []))
    )
    size = r.take("max_message_size", int, 26_214_400)
    if size < 1024:
        raise r.fail("max_message_size", "must be at least 1024 bytes")
    if size > MAX_MESSAGE_SIZE:
        raise r.fail("max_message_size", f"must be at most {MAX_MESSAGE_SIZE} bytes (48 MiB): "
                     "a message goes between the nodes in one piece")  # fmt: skip
    reserve = r.take("min_free_space", int, 256 << 20)
    if reserve < 0:
        raise r.fail("min_free_space", f"must be 0 (no check) or more bytes, not {reserve}")
    in_memory = _data_in_memory(r, size)
    rcpts = _positive(r, "max_recipients", 1000)
    if rcpts > MAX_RECIPIENTS:
        raise r.fail("max_recipients", f"must be at most {MAX_RECIPIENTS}, not {rcpts}")
    hops = _positive(r, "max_hops", 100)
    add_headers = r.take("add_missing_headers", bool, True)
    postmaster = r.take("postmaster", str, "")
    if postmaster and not is_mailbox(postmaster):
        raise r.fail("postmaster", f"{postmaster!r} is not an address like ops@example.com")
    tls_cert, tls_key = r.file("tls_cert", required=False), r.file("tls_key", required=False)
    users = r.file("users_file", required=False)
    if users:
        try:
            Users.load(users)
        except UsersFileError as exc:
            raise r.fail("users_file", str(exc)) from None
    if submission and not (tls_cert and tls_key and users):
        raise r.fail("submission_listen", "needs tls_cert, tls_key and users_file")
    submissions = r.addresses("submissions_listen")
    if submissions and not (tls_cert and tls_key and users):
        raise r.fail("submissions_listen", "needs tls_cert, tls_key and users_file")
    # A client waits 10 minutes for the reply to its final dot (RFC 5321 4.5.3.2.6): a
    # longer wait here would have it give up on a message we may then accept, and send
    # it again.
    accept = r.duration("accept_timeout", 120_000, at_least_ms=1000, at_most_ms=540_000)
    idle = r.duration("idle_timeout", 300_000, at_least_ms=1000)
    errors, junk = _positive(r, "max_errors", 20), _positive(r, "max_junk_commands", 100)
    sessions = _positive(r, "max_sessions", 1000)
    per_client = _positive(r, "max_sessions_per_client", 50)
    rates = _rate(r, "client_connection_rate_limit"), _rate(r, "client_message_rate_limit")
    r.done()
    return SmtpSection(
        hostname, relay, submission, tuple(networks), domains, size, reserve, rcpts, tls_cert,
        tls_key, users, accept, idle, errors, junk, sessions, per_client,
        submissions_listen=submissions, client_connection_rate_limit=rates[0],
        client_message_rate_limit=rates[1], max_hops=hops, add_missing_headers=add_headers,
        postmaster=postmaster, max_data_in_memory=in_memory,
    )  # fmt: skip


def _data_in_memory(r: _Reader, max_message_size: int) -> int:
    in_memory: int = r.take("max_data_in_memory", int, 256 << 20)
    if in_memory < max_message_size:
        raise r.fail("max_data_in_memory", f"{in_memory} is less than max_message_size "
                     f"({max_message_size}): a message that large is never taken")  # fmt: skip
    return in_memory


def _domain(r: _Reader, key: str, text: str) -> str:
    """A relay domain, matched exactly: a pattern such as "*.example.com" or
    ".example.com" would match no recipient at all, and mail for it be refused."""
    try:
        ascii_form = text.encode("idna").decode()  # a unicode domain is one too
    except UnicodeError:
        ascii_form = ""
    if not is_hostname(ascii_form):
        raise r.fail(key, f"{text!r} is not a domain: list each one, as example.com "
                     "(subdomains are not matched)")  # fmt: skip
    return text.lower().rstrip(".")


def _rate(r: _Reader, name: str) -> int:
    value: int = r.take(name, int, 0)
    if value < 0:
        raise r.fail(name, f"must be 0 (no limit) or a number a minute, not {value}")
    return value


def _positive(r: _Reader, name: str, default: int) -> int:
    value: int = r.take(name, int, default)
    if value < 1:
        raise r.fail(name, f"must be at least 1, not {value}")
    return value


def _delivery(path: str, top: _Reader) -> DeliverySection:
    if "delivery" not in top.table:
        return DeliverySection()
    r = _Reader(path, "delivery", top.take("delivery", dict))
    smarthost = r.take("smarthost", str, "")
    if smarthost:
        r._parse_address("smarthost", smarthost)
    nameservers = tuple(str(a) for a in r.addresses("nameservers"))
    schedule = r.take("retry_schedule", list, None)
    retry = DeliverySection().retry_schedule_ms
    if schedule is not None:
        try:
            retry = tuple(parse_duration_ms(_str(r, "retry_schedule", s)) for s in schedule)
        except ValueError as exc:
            raise r.fail("retry_schedule", str(exc)) from None
        if not retry:
            raise r.fail("retry_schedule", "must not be empty")
        if min(retry) < 1000:  # 0s: a failing destination tried at every poll
            raise r.fail("retry_schedule", "each wait must be at least 1s")
    # 0 bounced new mail before its first attempt (Postfix's 0 means "try once").
    lifetime = r.duration("max_queue_lifetime", 5 * 86_400_000, at_least_ms=1000)
    policy = r.take("on_uncertain", str, "redeliver")
    if policy not in ("redeliver", "hold"):
        raise r.fail("on_uncertain", f"{policy!r}: use 'redeliver' or 'hold'")
    mx_port = r.take("mx_port", int, 25)
    if not 0 < mx_port < 65536:
        raise r.fail("mx_port", f"{mx_port} is not a port")
    total = _positive(r, "concurrency", 100)
    per_destination = _positive(r, "destination_concurrency", 20)
    down = r.duration("node_down_after", 5000)
    if down < 1000:
        raise r.fail("node_down_after", "must be at least 1s")
    tls, ca_file, login = _smarthost_security(r, smarthost)
    wrapper = r.take("smarthost_tls_wrapper", bool, False)
    if wrapper and tls == "may":
        raise r.fail("smarthost_tls_wrapper", 'needs smarthost_tls = "encrypt" or "verify"')
    routes = _routes(r)
    route_tls, route_ca = _route_tls(r, routes)
    rcpt_limit = _positive(r, "destination_recipient_limit", 50)
    sources = _source_addresses(r)
    r.done()
    return DeliverySection(
        smarthost, nameservers, retry, lifetime, policy, mx_port, total, per_destination, down,
        tls, ca_file, login, wrapper, routes, destination_recipient_limit=rcpt_limit,
        route_tls=route_tls, route_ca_file=route_ca, source_addresses=sources,
    )  # fmt: skip


def _source_addresses(r: _Reader) -> tuple[str, ...]:
    """Each an address of this host (bound to, once, to be sure), one per family."""
    out: dict[int, str] = {}
    for k, item in enumerate(r.take("source_addresses", list, [])):
        key = f"source_addresses[{k}]"
        try:
            ip = ipaddress.ip_address(_str(r, "source_addresses", item))
        except ValueError as exc:
            raise r.fail(key, str(exc)) from None
        if ip.version in out:
            raise r.fail(key, f"a second IPv{ip.version} address: give at most one of each")
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((str(ip), 0))
        except OSError as exc:
            raise r.fail(key, f"{ip} is not an address of this host: {exc.strerror}") from None
        out[ip.version] = str(ip)
    return tuple(out.values())


def _routes(r: _Reader) -> dict[str, str]:
    routes: dict[str, str] = {}
    for domain, hop in r.take("routes", dict, {}).items():
        key = f"routes.{domain}"
        name = domain.lower().rstrip(".")
        if not name.lstrip(".") or "@" in name or " " in name:
            raise r.fail(key, "must be a domain, or .domain for its subdomains")
        r._parse_address(key, _str(r, key, hop))
        routes[name] = hop
    return routes


TLS_LEVELS = ("may", "encrypt", "verify")


def _route_tls(r: _Reader, routes: dict[str, str]) -> tuple[dict[str, str], str]:
    levels: dict[str, str] = {}
    for domain, level in r.take("route_tls", dict, {}).items():
        key = f"route_tls.{domain}"
        name = domain.lower().rstrip(".")
        if name not in routes:
            raise r.fail(key, "names no route: add it to routes")
        if (text := _str(r, key, level)) not in TLS_LEVELS:
            raise r.fail(key, f"{text!r}: use one of {', '.join(TLS_LEVELS)}")
        levels[name] = text
    ca_file = _ca_file(r, "route_ca_file")
    if ca_file and "verify" not in levels.values():
        raise r.fail("route_ca_file", 'applies to routes whose route_tls is "verify"')
    return levels, ca_file


def _ca_file(r: _Reader, name: str) -> str:
    """A CA file's path, once it proved to hold certificates; "" when not set."""
    ca_file = r.file(name, required=False)
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise r.fail(name, f"{ca_file} holds no usable certificate: {exc}") from None
    return ca_file


def _smarthost_security(r: _Reader, smarthost: str) -> tuple[str, str, tuple[str, str] | None]:
    tls = r.take("smarthost_tls", str, "may")
    if tls not in TLS_LEVELS:
        raise r.fail("smarthost_tls", f"{tls!r}: use one of {', '.join(TLS_LEVELS)}")
    ca_file = _ca_file(r, "smarthost_ca_file")
    auth_file = r.file("smarthost_auth_file", required=False)
    for name, given in (("smarthost_tls", tls != "may"), ("smarthost_ca_file", ca_file),
                        ("smarthost_auth_file", auth_file)):  # fmt: skip
        if given and not smarthost:
            raise r.fail(name, "applies to the smarthost: set smarthost too")
    if not auth_file:
        return tls, ca_file, None
    if tls == "may":
        raise r.fail("smarthost_auth_file", 'needs smarthost_tls = "encrypt" or "verify": a '
                     "password is never sent without TLS")  # fmt: skip
    user, colon, password = open(auth_file, encoding="utf-8").read().strip().partition(":")  # noqa: SIM115
    if not (user and colon and password) or "\n" in password:
        raise r.fail("smarthost_auth_file", f"{auth_file} must hold one line, user:password")
    return tls, ca_file, (user, password)


def _admin(path: str, top: _Reader) -> AdminSection:
    if "admin" not in top.table:
        raise top.fail("admin", "is required (listen, token_file)")
    r = _Reader(path, "admin", top.take("admin", dict))
    listen = r.address("listen", "127.0.0.1:8025")
    token = _secret(path, r, "token_file").decode()
    r.done()
    return AdminSection(listen, token)


def _dkim(path: str, top: _Reader) -> DkimSection:
    """[dkim.keys."example.com"] selector = "s2026", key_file = "...": each key loaded
    now, so one that cannot sign is refused at start, naming it."""
    if "dkim" not in top.table:
        return DkimSection()
    r = _Reader(path, "dkim", top.take("dkim", dict))
    keys = []
    for domain, table in r.take("keys", dict, {}).items():
        k = _Reader(path, f"dkim.keys.{domain}", table)
        name = _domain(r, f"keys.{domain}", domain)
        selector = k.take("selector", str)
        if not is_hostname(selector):  # it is a name's first labels in DNS
            raise k.fail("selector", f"{selector!r} is not a selector (letters, digits, -, .)")
        key_file = k.take("key_file", str)
        try:
            keys.append(DkimKey.load(name, selector, key_file))
        except DkimKeyError as exc:
            raise k.fail("key_file", str(exc)) from None
        k.done()
    r.done()
    return DkimSection(tuple(keys))


def _log(path: str, top: _Reader) -> LogSection:
    if "log" not in top.table:
        return LogSection()
    r = _Reader(path, "log", top.take("log", dict))
    level = r.take("level", str, "info").lower()
    if level not in LEVELS:
        raise r.fail("level", f"{level!r}: use one of {', '.join(LEVELS)}")
    fmt = r.take("format", str, "text")
    if fmt not in FORMATS:
        raise r.fail("format", f"{fmt!r}: use 'text' (key=value) or 'json'")
    r.done()
    return LogSection(level, fmt)
