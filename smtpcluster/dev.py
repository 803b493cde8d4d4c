"""`smtpcluster dev`: a local cluster for a first run, in one command.

Generates (once, then reuses) configs, the cluster key, the admin token, a self-signed
certificate and a submission user under DIR; runs a capture sink as the smarthost,
writing each delivered message to DIR/delivered/ as an .eml file; starts each node as
its own `smtpcluster serve` process on 127.0.0.1 and restarts one that dies (as
systemd would), so killing the leader shows the cluster carrying on. Ctrl-C stops it
all.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpcluster import pki
from smtpcluster.auth import hash_password

SINK_PORT = 2500
RESTART_AFTER_S = 3.0
START_TIMEOUT_S = 60.0


class DevError(Exception):
    """The dev cluster cannot start; the message says why and what to do."""

    exit_code = 1


@dataclass(frozen=True)
class DevNode:
    id: str
    k: int  # 0-based

    @property
    def smtp(self) -> int:
        return 2525 + self.k

    @property
    def submission(self) -> int:
        return 2587 + self.k

    @property
    def admin(self) -> int:
        return 8025 + self.k

    @property
    def raft(self) -> int:
        return 7401 + self.k


# Local parts the capture sink refuses, so that a first run can show a queue, its
# retries and a bounce: with a sink that takes everything the queue was always empty.
# "defer+1@example.com" counts as "defer", to tell several such messages apart.
SINK_REFUSALS = {
    "defer": "451 4.3.0 dev sink: deferred on request (local part 'defer')",
    "bounce": "550 5.1.1 dev sink: refused on request (local part 'bounce')",
}


def sink_refusal(address: str) -> str | None:
    """The capture sink's reply to RCPT for `address`, when it refuses it."""
    local = address.rpartition("@")[0].split("+", 1)[0].lower()
    return SINK_REFUSALS.get(local)


class CaptureSink:
    """aiosmtpd handler: every message accepted and written to a directory as .eml,
    except for recipients whose local part asks for a refusal (SINK_REFUSALS)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.count = 0
        self.lock = threading.Lock()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        refusal = sink_refusal(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.count += 1
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.count:06d}.eml"
        tmp = self.where / f".{name}.tmp"
        tmp.write_bytes(envelope.original_content or b"")
        tmp.rename(self.where / name)  # a reader never sees half a message
        return "250 2.0.0 captured"


def run(directory: str, nodes: int) -> int:
    if not 1 <= nodes <= 9:
        raise DevError("--nodes must be between 1 and 9")
    root = Path(directory).resolve()
    members = [DevNode(f"node{k + 1}", k) for k in range(nodes)]
    _check_ports(members)
    _generate(root, members)
    sink = Controller(CaptureSink(root / "delivered"), hostname="127.0.0.1", port=SINK_PORT)
    sink.start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for n in members:
            procs[n.id] = _start(root, n)
        leader = _wait_for_leader(members, procs, root)
        print(_guide(root, members, procs, leader), flush=True)
        _supervise(root, members, procs, stop)
    finally:
        _stop_all(procs)
        sink.stop()
        print("smtpcluster dev: stopped", flush=True)
    return 0


def _check_ports(members: list[DevNode]) -> None:
    ports = [SINK_PORT] + [p for n in members for p in (n.smtp, n.submission, n.admin, n.raft)]
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise DevError(
                    f"port {port} on 127.0.0.1 is in use: is another `smtpcluster dev` running?"
                ) from None


def _generate(root: Path, members: list[DevNode]) -> None:
    for d in ("delivered", "logs", "secrets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    secret = root / "secrets"
    secret.chmod(0o700)
    _once(secret / "cluster.key", lambda p: p.write_text(secrets.token_hex(32) + "\n"))
    _once(secret / "admin.token", lambda p: p.write_text(secrets.token_hex(16) + "\n"))
    _once(secret / "tls.crt", lambda p: _self_signed(secret))
    password = secret / "dev-password"
    _once(password, lambda p: p.write_text(secrets.token_urlsafe(12) + "\n"))
    _once(secret / "users", lambda p: p.write_text(
        hash_password("dev", password.read_text().strip()) + "\n"
    ))  # fmt: skip
    for f in secret.iterdir():
        f.chmod(0o600)
    peers = ", ".join(f'{n.id} = "127.0.0.1:{n.raft}"' for n in members)
    for n in members:
        config = root / f"{n.id}.toml"
        if not config.exists():
            config.write_text(_config(root, n, peers))


def _once(path: Path, make: Callable[[Path], object]) -> None:
    if not path.exists():
        make(path)


def _self_signed(where: Path) -> None:
    try:
        pki.self_signed(where / "tls.crt", where / "tls.key", "localhost")
    except pki.PkiError as exc:
        raise DevError(f"{exc}: run scripts/setup-system") from None


def _config(root: Path, n: DevNode, peers: str) -> str:
    s = root / "secrets"
    return f"""# Generated by `smtpcluster dev`: a local cluster on 127.0.0.1. Edit freely.
[node]
id = "{n.id}"
data_dir = "{root / "data" / n.id}"

[cluster]
listen = "127.0.0.1:{n.raft}"
peers = {{ {peers} }}
key_file = "{s / "cluster.key"}"

[smtp]
hostname = "{n.id}.smtpcluster.localhost"
relay_listen = ["127.0.0.1:{n.smtp}"]
submission_listen = ["127.0.0.1:{n.submission}"]
relay_networks = ["127.0.0.0/8"]
tls_cert = "{s / "tls.crt"}"
tls_key = "{s / "tls.key"}"
users_file = "{s / "users"}"

[delivery]
smarthost = "127.0.0.1:{SINK_PORT}"   # the capture sink: mail lands in {root / "delivered"}
retry_schedule = ["10s", "1m", "5m"]

[admin]
listen = "127.0.0.1:{n.admin}"
token_file = "{s / "admin.token"}"
"""


def _start(root: Path, n: DevNode) -> subprocess.Popen[bytes]:
    log = open(root / "logs" / f"{n.id}.log", "ab")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "smtpcluster.cli", "serve", "--config", str(root / f"{n.id}.toml")]
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _healthy(n: DevNode) -> str | None:
    """The leader's id once this node answers /healthz with one."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{n.admin}/healthz", timeout=2) as r:
            leader = json.loads(r.read()).get("leader")
            return str(leader) if leader else None
    except OSError:
        return None


def _wait_for_leader(
    members: list[DevNode], procs: dict[str, subprocess.Popen[bytes]], root: Path
) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for n in members:
            if procs[n.id].poll() is not None:
                raise DevError(f"{n.id} exited at start: see {root / 'logs' / n.id}.log")
        leaders = {_healthy(n) for n in members}
        if len(leaders) == 1 and None not in leaders:
            return str(leaders.pop())
        time.sleep(0.2)
    raise DevError(f"no leader within {START_TIMEOUT_S:.0f} s: see {root / 'logs'}")


def _supervise(
    root: Path, members: list[DevNode], procs: dict[str, subprocess.Popen[bytes]],
    stop: threading.Event,
) -> None:  # fmt: skip
    died: dict[str, float] = {}
    while not stop.wait(0.5):
        for n in members:
            code = procs[n.id].poll()
            if code is not None and n.id not in died:
                died[n.id] = time.monotonic()
                print(f"smtpcluster dev: {n.id} exited ({code}); restarting it in "
                      f"{RESTART_AFTER_S:.0f} s", flush=True)  # fmt: skip
            if n.id in died and time.monotonic() - died[n.id] >= RESTART_AFTER_S:
                del died[n.id]
                procs[n.id] = _start(root, n)
                print(f"smtpcluster dev: {n.id} restarted (pid {procs[n.id].pid})", flush=True)


def _stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


def _guide(
    root: Path, members: list[DevNode], procs: dict[str, subprocess.Popen[bytes]], leader: str
) -> str:
    here = Path(sys.executable).parent / "smtpcluster"
    cli = str(here) if here.exists() else "smtpcluster"
    first = members[0]
    rows = "\n".join(
        f"    {n.id}  SMTP 127.0.0.1:{n.smtp}  submission 127.0.0.1:{n.submission}  "
        f"admin http://127.0.0.1:{n.admin}  pid {procs[n.id].pid}"
        + ("  (leader)" if n.id == leader else "")
        for n in members
    )
    return f"""smtpcluster dev: ready, {len(members)} nodes in {root}

  Nodes (each its own process; logs in {root / "logs"}):
{rows}

  Send a message to any node (127.0.0.0/8 may relay without AUTH on the SMTP port):
    swaks --server 127.0.0.1:{first.smtp} --from you@example.org --to someone@example.com
  Submission needs STARTTLS and AUTH: user dev, password in {root / "secrets" / "dev-password"}

  Watch the queue and the cluster:
    {cli} queue list --config {root / f"{first.id}.toml"}
    {cli} cluster status --config {root / f"{first.id}.toml"}

  Delivered mail lands in {root / "delivered"}/ as .eml files (the capture sink is
  every node's smarthost). Kill the leader (kill -9 <pid>) while sending: the mail
  still arrives, and this command restarts the node after {RESTART_AFTER_S:.0f} s.

  The sink answers 451 to defer@... (the message waits in the queue for its next
  retry: try queue show, hold, retry, delete) and 550 to bounce@... (the sender gets
  a bounce, which lands in delivered/ too).

  Ctrl-C stops everything.
"""
