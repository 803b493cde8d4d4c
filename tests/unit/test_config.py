"""A bad config is refused at start, naming the file and the key."""

from __future__ import annotations

import pathlib
import subprocess

import cbor2
import pytest

from mailqueue import codec as mailqueue_codec
from mailqueue.commands import Accept
from raft import codec as raft_codec
from raft.node import BATCH_MAX_BYTES
from raft.transport import MAX_FRAME
from raft.types import AppendEntries, Entry
from smtpcluster import pki
from smtpcluster.config import (
    MAX_MESSAGE_SIZE,
    MAX_RECIPIENTS,
    ConfigError,
    load,
    parse_duration_ms,
)

GOOD = """
[node]
id = "node1"
data_dir = "{d}/data"

[cluster]
listen = "127.0.0.1:7400"
peers = {{ node1 = "127.0.0.1:7400", node2 = "127.0.0.2:7400", node3 = "127.0.0.3:7400" }}
key_file = "{d}/cluster.key"

[smtp]
hostname = "relay.example.com"
relay_listen = ["127.0.0.1:2525"]
relay_networks = ["127.0.0.0/8", "10.0.0.0/8"]
relay_domains = ["Example.COM.", "bücher.example"]

[delivery]
retry_schedule = ["1s", "5s"]
max_queue_lifetime = "1h"
on_uncertain = "hold"

[admin]
listen = "127.0.0.1:8025"
token_file = "{d}/admin.token"
"""


def write(tmp: pathlib.Path, text: str) -> str:
    (tmp / "cluster.key").write_text("k" * 32)
    (tmp / "admin.token").write_text("t" * 32)
    path = tmp / "node.toml"
    path.write_text(text.format(d=tmp))
    return str(path)


def test_the_example_config_loads(tmp_path: pathlib.Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    assert cfg.node.id == "node1" and len(cfg.cluster.peers) == 3
    assert cfg.smtp.relay_domains == ("example.com", "bücher.example")
    assert cfg.delivery.retry_schedule_ms == (1000, 5000)
    assert cfg.delivery.max_queue_lifetime_ms == 3_600_000 and cfg.delivery.on_uncertain == "hold"
    assert cfg.admin.token == "t" * 32 and cfg.cluster.key == b"k" * 32


def test_a_smarthost_login_is_read_from_its_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "auth").write_text("relay-user:pa:ss\n")  # the password may hold a colon
    text = GOOD.replace("[delivery]", '[delivery]\nsmarthost = "10.0.0.9:587"\n'
                        'smarthost_tls = "verify"\nsmarthost_auth_file = "{d}/auth"')  # fmt: skip
    delivery = load(write(tmp_path, text)).delivery
    assert delivery.smarthost_tls == "verify" and delivery.smarthost_login == (
        "relay-user",
        "pa:ss",
    )
    assert load(write(tmp_path, GOOD)).delivery.smarthost_login is None


def test_routes_are_read_with_their_domains_in_lower_case(tmp_path: pathlib.Path) -> None:
    text = GOOD.replace(
        "[delivery]",
        '[delivery]\nroutes = {{ "Inbound.Example" = "10.0.0.5:25", ".corp" = "mx:2525" }}',
    )
    routes = load(write(tmp_path, text)).delivery.routes
    assert routes == {"inbound.example": "10.0.0.5:25", ".corp": "mx:2525"}
    tls = text.replace("[delivery]", '[delivery]\nroute_tls = {{ ".CORP." = "encrypt" }}')
    assert load(write(tmp_path, tls)).delivery.route_tls == {".corp": "encrypt"}
    unused = tls.replace("[delivery]", '[delivery]\nroute_ca_file = "{d}/ca.crt"')
    pki.self_signed(tmp_path / "ca.crt", tmp_path / "ca.key", "ca.test", days=2)
    with pytest.raises(ConfigError, match=r'route_ca_file.*route_tls is "verify"'):
        load(write(tmp_path, unused))


def test_dkim_keys_are_loaded_and_a_bad_one_is_refused_naming_it(tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "signing.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key_file), "2048"], check=True,
                   capture_output=True)  # fmt: skip
    section = '\n[dkim.keys."Example.ORG"]\nselector = "s2026"\nkey_file = "{d}/signing.pem"\n'
    [key] = load(write(tmp_path, GOOD + section)).dkim.keys
    assert (key.domain, key.selector, key.key.key_size) == ("example.org", "s2026", 2048)
    assert load(write(tmp_path, GOOD)).dkim.keys == ()
    for change, name, problem in [
        (("signing.pem", "none.pem"), "key_file", "cannot read"),
        (('"s2026"', '"s_2026"'), "selector", "is not a selector"),
        (('selector = "s2026"', 'selector = "s2026"\nalgorithm = "ed25519"'), "algorithm",
         "unknown"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load(write(tmp_path, GOOD + section.replace(*change)))
        assert err.value.key == f"dkim.keys.Example.ORG.{name}"
        assert problem in err.value.problem


def test_source_addresses_are_read(tmp_path: pathlib.Path) -> None:
    text = GOOD.replace("[delivery]", '[delivery]\nsource_addresses = ["127.0.0.2"]')
    assert load(write(tmp_path, text)).delivery.source_addresses == ("127.0.0.2",)
    assert load(write(tmp_path, GOOD)).delivery.source_addresses == ()


def test_min_free_space_defaults_to_room_for_the_largest_messages(tmp_path: pathlib.Path) -> None:
    assert load(write(tmp_path, GOOD)).smtp.min_free_space == 256 << 20
    big = GOOD.replace("[smtp]", f"[smtp]\nmax_message_size = {MAX_MESSAGE_SIZE}")
    assert load(write(tmp_path, big)).smtp.min_free_space == 256 << 20 > 4 * MAX_MESSAGE_SIZE
    off = GOOD.replace("[smtp]", "[smtp]\nmin_free_space = 0")
    assert load(write(tmp_path, off)).smtp.min_free_space == 0


@pytest.mark.parametrize(
    ("listen", "own"),
    [("0.0.0.0:7400", "127.0.0.1:7400"), ("[::]:7401", "127.0.0.1:7400"),
     ("127.0.0.1:7400", "node1.internal:7400")],
)  # fmt: skip
def test_a_listen_address_that_may_be_the_peers_entry_is_let_be(
    tmp_path: pathlib.Path, listen: str, own: str
) -> None:
    """Only two IP addresses that differ are refused: a wildcard, or a name for the
    peer entry (behind NAT or DNS), may be the same place."""
    text = GOOD.replace('listen = "127.0.0.1:7400"', f'listen = "{listen}"')
    text = text.replace('node1 = "127.0.0.1:7400"', f'node1 = "{own}"')
    assert load(write(tmp_path, text)).cluster.peers["node1"].port == 7400


def test_a_dual_stack_node_lists_both_wildcards(tmp_path: pathlib.Path) -> None:
    """asyncio and uvloop bind [::] IPV6_V6ONLY, so [::]:25 alone takes no IPv4 mail:
    the IPv4 wildcard must be listed too, and that is not one port bound twice."""
    both = '["0.0.0.0:25", "[::]:25"]'
    text = GOOD.replace('relay_listen = ["127.0.0.1:2525"]', f"relay_listen = {both}")
    listen = load(write(tmp_path, text)).smtp.relay_listen
    assert [str(a) for a in listen] == ["0.0.0.0:25", "[::]:25"]
    assert [a.host for a in listen] == ["0.0.0.0", "::"]


def test_a_postmaster_address_is_read(tmp_path: pathlib.Path) -> None:
    assert load(write(tmp_path, GOOD)).smtp.postmaster == ""  # unset: <postmaster> refused
    text = GOOD.replace("[smtp]", '[smtp]\npostmaster = "abuse+relay@ops.example.com"')
    assert load(write(tmp_path, text)).smtp.postmaster == "abuse+relay@ops.example.com"


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (("[smtp]", "[smtp]\nrelay_network = []"), "smtp.relay_network", "unknown key"),
        (
            ("[smtp]", "[smtp]\nmax_message_size = 104857600"),
            "smtp.max_message_size",
            "at most 50331648 bytes",
        ),
        (("[smtp]", "[smtp]\nmax_recipients = 100000"), "smtp.max_recipients", "at most 10000"),
        (
            (
                'on_uncertain = "hold"',
                'on_uncertain = "hold"\nroute_tls = {{ "x.example" = "verify" }}',
            ),
            "delivery.route_tls.x.example",
            "names no route",
        ),
        (
            (
                'on_uncertain = "hold"',
                'on_uncertain = "hold"\nroutes = {{ "x.example" = "h:25" }}\n'
                'route_tls = {{ "x.example" = "always" }}',
            ),
            "delivery.route_tls.x.example",
            "use one of may, encrypt, verify",
        ),
        (
            (
                'on_uncertain = "hold"',
                'on_uncertain = "hold"\nroutes = {{ "x.example" = "h:25" }}\n'
                'route_ca_file = "{d}/cluster.key"',
            ),
            "delivery.route_ca_file",
            "holds no usable certificate",
        ),
        (('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1"'), "cluster.listen", "host:port"),
        (
            ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:74000"'),
            "cluster.listen",
            "port 74000 is out of range",
        ),
        (
            ("[delivery]", '[delivery]\nsmarthost = "10.0.0.9:0"'),
            "delivery.smarthost",
            "port 0 is out of range",
        ),
        (('"10.0.0.0/8"', '"0.0.0.0/0"'), "smtp.relay_networks[1]", "open relay"),
        (
            ('max_queue_lifetime = "1h"', 'max_queue_lifetime = "0s"'),
            "delivery.max_queue_lifetime",
            "'0s' is less than 1s",
        ),
        (
            ('retry_schedule = ["1s", "5s"]', 'retry_schedule = ["0s", "5s"]'),
            "delivery.retry_schedule",
            "at least 1s",
        ),
        (("[smtp]", '[smtp]\nidle_timeout = "0s"'), "smtp.idle_timeout", "less than 1s"),
        (
            ("[smtp]", '[smtp]\naccept_timeout = "20m"'),
            "smtp.accept_timeout",
            "'20m' is more than 540s",
        ),
        (
            ('"Example.COM."', '"Example.COM.", "*.example.org"'),
            "smtp.relay_domains[1]",
            "not a domain: list each one",
        ),
        (('"10.0.0.0/8"', '"::/0"'), "smtp.relay_networks[1]", "open relay"),
        (
            ('hostname = "relay.example.com"', 'hostname = "relay example"'),
            "smtp.hostname",
            "not a host name",
        ),
        (
            ('hostname = "relay.example.com"', 'hostname = "-relay.example.com"'),
            "smtp.hostname",
            "not a host name",
        ),
        (
            ('listen = "127.0.0.1:8025"', 'listen = "127.0.0.1:7400"'),
            "admin.listen",
            "127.0.0.1:7400 is also cluster.listen",
        ),
        (
            ('relay_listen = ["127.0.0.1:2525"]', 'relay_listen = ["0.0.0.0:8025"]'),
            "smtp.relay_listen[0]",
            "is also admin.listen (127.0.0.1:8025)",
        ),
        (
            (
                'relay_listen = ["127.0.0.1:2525"]',
                'relay_listen = ["127.0.0.1:25", "127.0.0.1:25"]',
            ),
            "smtp.relay_listen[1]",
            "127.0.0.1:25 is also smtp.relay_listen[0]",
        ),
        (('"10.0.0.0/8"', '"10.0.0/8x"'), "smtp.relay_networks[1]", "not a network"),
        (
            ('max_queue_lifetime = "1h"', 'max_queue_lifetime = "1 hour"'),
            "delivery.max_queue_lifetime",
            "not a duration",
        ),
        (("{d}/cluster.key", "{d}/missing.key"), "cluster.key_file", "no such file"),
        (('hostname = "relay.example.com"\n', ""), "smtp.hostname", "is required"),
        (('on_uncertain = "hold"', 'on_uncertain = "maybe"'), "delivery.on_uncertain", "maybe"),
        (("node1 = ", "nodeX = "), "cluster.peers", "must include this node"),
        (
            (
                'relay_listen = ["127.0.0.1:2525"]',
                'relay_listen = ["127.0.0.1:2525"]\nsubmission_listen = ["127.0.0.1:2587"]',
            ),
            "smtp.submission_listen",
            "tls_cert",
        ),
        (
            ("[smtp]", '[smtp]\nsubmissions_listen = ["127.0.0.1:2465"]'),
            "smtp.submissions_listen",
            "needs tls_cert, tls_key and users_file",
        ),
        (("[admin]", "[admin]\nport = 1"), "admin.port", "unknown key"),
        (('id = "node1"', "id = 7"), "node.id", "must be a string"),
        (
            ("[smtp]", '[smtp]\nadd_missing_headers = "yes"'),
            "smtp.add_missing_headers",
            "true or false",
        ),
        (
            ('retry_schedule = ["1s", "5s"]', 'retry_schedule = "1s"'),
            "delivery.retry_schedule",
            "must be a list",
        ),
        (("[smtp]", "[smtp]\nmax_errors = 0"), "smtp.max_errors", "at least 1"),
        (("[smtp]", "[smtp]\nmin_free_space = -1"), "smtp.min_free_space", "0 (no check)"),
        (("[smtp]", "[smtp]\nmax_sessions = 0"), "smtp.max_sessions", "at least 1"),
        (
            ("[delivery]", '[delivery]\nroutes = {{ "Example.com" = "mailstore" }}'),
            "delivery.routes.Example.com",
            "host:port",
        ),
        (
            ("[delivery]", '[delivery]\nroutes = {{ "a@b.test" = "10.0.0.5:25" }}'),
            "delivery.routes.a@b.test",
            "must be a domain",
        ),
        (
            ("[delivery]", '[delivery]\nsmarthost = "10.0.0.9:587"\nsmarthost_tls = "always"'),
            "delivery.smarthost_tls",
            "'always': use one of may, encrypt, verify",
        ),
        (
            ("[delivery]", '[delivery]\nsmarthost_tls = "verify"'),
            "delivery.smarthost_tls",
            "set smarthost too",
        ),
        (
            (
                "[delivery]",
                '[delivery]\nsmarthost = "10.0.0.9:587"\nsmarthost_auth_file = "{d}/admin.token"',
            ),
            "delivery.smarthost_auth_file",
            "never sent without TLS",
        ),
        (
            (
                "[delivery]",
                '[delivery]\nsmarthost = "10.0.0.9:587"\nsmarthost_tls = "encrypt"\n'
                'smarthost_auth_file = "{d}/admin.token"',
            ),
            "delivery.smarthost_auth_file",
            "one line, user:password",
        ),
        (
            (
                "[delivery]",
                '[delivery]\nsmarthost = "10.0.0.9:587"\nsmarthost_ca_file = "{d}/none.crt"',
            ),
            "delivery.smarthost_ca_file",
            "no such file",
        ),
        (
            (
                "[delivery]",
                '[delivery]\nsmarthost = "10.0.0.9:587"\nsmarthost_ca_file = "{d}/cluster.key"',
            ),
            "delivery.smarthost_ca_file",
            "holds no usable certificate",
        ),
        (
            ("[delivery]", '[delivery]\nsmarthost = "10.0.0.9:465"\nsmarthost_tls_wrapper = true'),
            "delivery.smarthost_tls_wrapper",
            "needs smarthost_tls",
        ),
        (("[smtp]", "[smtp]\nmax_sessions_per_client = 0"), "smtp.max_sessions_per_client", "1"),
        (("[smtp]", '[smtp]\nmin_free_space = "1G"'), "smtp.min_free_space", "must be an integer"),
        (("[admin]", '[log]\nlevel = "loud"\n[admin]'), "log.level", "loud"),
        (("[admin]", '[log]\nformat = "xml"\n[admin]'), "log.format", "'json'"),
        (("[admin]", "[log]\ncolour = true\n[admin]"), "log.colour", "unknown key"),
        (
            ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.3:7400"'),
            "cluster.listen",
            "not this node's address in peers (node1 = 127.0.0.1:7400): is node.id right?",
        ),
        (("[smtp]", '[smtp]\npostmaster = "root"'), "smtp.postmaster", "like ops@example.com"),
        (("[smtp]", '[smtp]\npostmaster = "a%b@x.example"'), "smtp.postmaster", "'a%b@"),
        (("[smtp]", '[smtp]\npostmaster = "ops@[10.0.0.1]"'), "smtp.postmaster", "an address"),
        (
            ('relay_listen = ["127.0.0.1:2525"]', 'relay_listen = ["::1:2525"]'),
            "smtp.relay_listen[0]",
            "goes in brackets, as [::1]:25; got '::1:2525'",
        ),
        (
            ("[delivery]", '[delivery]\nsmarthost = "2001:db8::25"'),
            "delivery.smarthost",
            "got '2001:db8::25'",
        ),
        (("[delivery]", '[delivery]\nsmarthost = "[]:25"'), "delivery.smarthost", "[IPv6]:port"),
        (
            ('relay_listen = ["127.0.0.1:2525"]', 'relay_listen = ["[::]:25", "[::1]:25"]'),
            "smtp.relay_listen[1]",
            "[::1]:25 is also smtp.relay_listen[0] ([::]:25)",
        ),
        (
            ('relay_listen = ["127.0.0.1:2525"]', 'relay_listen = ["0.0.0.0:25", "10.1.2.3:25"]'),
            "smtp.relay_listen[1]",
            "is also smtp.relay_listen[0]",
        ),
        (
            ('relay_listen = ["127.0.0.1:2525"]', 'relay_listen = ["[::1]:25", "[0::1]:25"]'),
            "smtp.relay_listen[1]",
            "is also smtp.relay_listen[0]",
        ),
        (
            ('relay_listen = ["127.0.0.1:2525"]', 'relay_listen = ["[::]:25", "mx.internal:25"]'),
            "smtp.relay_listen[1]",
            "is also smtp.relay_listen[0]",
        ),
        (
            ("[delivery]", '[delivery]\nsource_addresses = ["127.0.0.2", "127.0.0.3"]'),
            "delivery.source_addresses[1]",
            "a second IPv4 address",
        ),
        (
            ("[delivery]", '[delivery]\nsource_addresses = ["127.0.0.2:25"]'),
            "delivery.source_addresses[0]",
            "does not appear to be an IPv4 or IPv6 address",
        ),
        (  # TEST-NET-1: never this host's (only bound to, nothing is sent)
            ("[delivery]", '[delivery]\nsource_addresses = ["192.0.2.1"]'),
            "delivery.source_addresses[0]",
            "192.0.2.1 is not an address of this host",
        ),
    ],
)
def test_bad_configs_are_refused_naming_the_key(
    tmp_path: pathlib.Path, change: tuple[str, str], key: str, problem: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert err.value.key == key and problem in err.value.problem
    assert str(tmp_path / "node.toml") in str(err.value)


def test_broken_toml_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, GOOD + "\n[smtp\n"))


def test_durations() -> None:
    texts = ["100ms", "30s", "5m", "4h", "5d", "1.5s"]
    assert [parse_duration_ms(t) for t in texts] == [
        100, 30_000, 300_000, 14_400_000, 432_000_000, 1500,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ms("5 minutes")


def test_the_largest_message_allowed_fits_in_one_raft_frame_with_room_to_spare() -> None:
    """A message goes between the nodes whole, in one frame: a 70 MiB one (allowed
    then) was refused by every follower, and the leader never committed it. The worst
    case: the largest body, the most recipients at the longest an address may be, in an
    AppendEntries that also carries a batch's other proposals and the next entry."""
    address = "x" * 64 + "@" + "d" * 189  # 254 bytes: RFC 5321's longest path
    accept = Accept(
        1, "m" * 40, address, (address,) * MAX_RECIPIENTS,
        b"x" * (MAX_MESSAGE_SIZE + 64 * 1024), "n1",  # and the headers the front end adds
    )  # fmt: skip
    batch = cbor2.dumps([2, [[0, mailqueue_codec.encode(accept)], [0, b"y" * BATCH_MAX_BYTES]]])
    entries = (Entry(1, 5, data=batch), Entry(1, 6, data=b"z" * (1 << 20)))
    frame = raft_codec.encode_message(AppendEntries("n1", "n2", 1, 4, 1, entries, 4))
    assert len(frame) + 1024 < MAX_FRAME  # the frame kind, the MAC, the length
