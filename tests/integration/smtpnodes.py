"""Real `smtpcluster serve` processes on 127.0.0.1-3 with generated configs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpcluster import pki
from smtpcluster.auth import hash_password
from tests import hooked
from tests.integration.kvcluster import free_ports, stop_process, wait_for

# A smarthost nobody listens on: delivery is deferred and accepted mail stays in the
# spool where acceptance tests look for it.
PARKED = "127.0.0.1:9"
REPO = str(Path(__file__).resolve().parents[2])


@dataclass
class SmtpNode:
    id: str
    host: str
    raft_port: int
    smtp_port: int
    admin_port: int
    config: Path
    submission_port: int = 0
    popen: subprocess.Popen[bytes] | None = None


class SmtpCluster:
    def __init__(
        self, root: Path, n: int = 3, *, relay_networks: str = '"127.0.0.0/30"',
        idle: str = "5m", submission: bool = False, max_size: int = 65536,
        smarthost: str = PARKED, nameservers: str = "", mx_port: int = 25,
        lifetime: str = "5d", routes: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.root = root
        (root / "cluster.key").write_text(os.urandom(24).hex())
        self.token = os.urandom(16).hex()
        (root / "admin.token").write_text(self.token)
        self.nodes: dict[str, SmtpNode] = {}
        for k in range(n):
            host = f"127.0.0.{k + 1}"
            nid = f"n{k + 1}"
            raft_p, smtp_p, admin_p, sub_p = free_ports(host, 4)
            self.nodes[nid] = SmtpNode(
                nid, host, raft_p, smtp_p, admin_p, root / f"{nid}.toml", sub_p
            )
        tls = self._submission_files(root) if submission else ""
        self._settings = (relay_networks, max_size, idle, tls)
        self._delivery_text = self._delivery(smarthost, nameservers, mx_port, lifetime)
        if routes:
            table = ", ".join(f'"{d}" = "{hop}"' for d, hop in routes.items())
            self._delivery_text += f"routes = {{ {table} }}\n"
        peers = ", ".join(f'{n.id} = "{n.host}:{n.raft_port}"' for n in self.nodes.values())
        for node in self.nodes.values():
            self._write_config(node, peers)

    def _write_config(self, node: SmtpNode, peers: str, join: bool = False) -> None:
        relay_networks, max_size, idle, tls = self._settings
        root = self.root
        node.config.write_text(
            f'[node]\nid = "{node.id}"\ndata_dir = "{root / node.id}"\n'
            f'[cluster]\nlisten = "{node.host}:{node.raft_port}"\npeers = {{ {peers} }}\n'
            f'key_file = "{root / "cluster.key"}"\njoin = {str(join).lower()}\n'
            'heartbeat_interval = "50ms"\nelection_timeout = "300ms"\n'
            f'[smtp]\nhostname = "{node.id}.relay.test"\n'
            f'relay_listen = ["{node.host}:{node.smtp_port}"]\n'
            f"relay_networks = [{relay_networks}]\n"
            f'relay_domains = ["inbound.test"]\nmax_message_size = {max_size}\n'
            f'accept_timeout = "20s"\nidle_timeout = "{idle}"\n'
            + (tls and f'submission_listen = ["{node.host}:{node.submission_port}"]\n{tls}')
            + self._delivery_text
            + f'[admin]\nlisten = "{node.host}:{node.admin_port}"\n'
            f'token_file = "{root / "admin.token"}"\n'
        )

    def set_smtp(self, nid: str, setting: str) -> str:
        """Adds a `key = value` line to the node's [smtp] section (read at its next start
        or SIGHUP); returns the config as it was, to write back."""
        return self.add_setting(nid, "smtp", setting)

    def add_setting(self, nid: str, section: str, setting: str) -> str:
        """Adds a `key = value` line to the node's [section], which is made if the
        generated config leaves it to its defaults; returns the config as it was."""
        config = self.nodes[nid].config
        before = config.read_text()
        head = f"[{section}]\n"
        text = before if head in before else before + head
        config.write_text(text.replace(head, f"{head}{setting}\n", 1))
        return before

    def add_joiner(self, nid: str, host: str) -> SmtpNode:
        """A node configured to start empty and wait for `cluster join` (not started)."""
        raft_p, smtp_p, admin_p, sub_p = free_ports(host, 4)
        node = SmtpNode(nid, host, raft_p, smtp_p, admin_p, self.root / f"{nid}.toml", sub_p)
        self.nodes[nid] = node
        peers = ", ".join(f'{n.id} = "{n.host}:{n.raft_port}"' for n in self.nodes.values())
        self._write_config(node, peers, join=True)
        return node

    @staticmethod
    def _delivery(smarthost: str, nameservers: str, mx_port: int, lifetime: str) -> str:
        servers = f'"{nameservers}"' if nameservers else ""
        return (
            f'[delivery]\nsmarthost = "{smarthost}"\nretry_schedule = ["1s"]\n'
            f'nameservers = [{servers}]\nmx_port = {mx_port}\nmax_queue_lifetime = "{lifetime}"\n'
        )

    @staticmethod
    def _submission_files(root: Path) -> str:
        """A self-signed certificate and a users file with alice / secret."""
        pki.self_signed(root / "tls.crt", root / "tls.key", "relay.test", days=2)
        (root / "users").write_text(hash_password("alice", "secret") + "\n")
        return (
            f'tls_cert = "{root / "tls.crt"}"\ntls_key = "{root / "tls.key"}"\n'
            f'users_file = "{root / "users"}"\n'
        )

    def start(self, nid: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """Start a node; `env` adds to the environment it inherits. `wait`: until its
        admin API answers."""
        node = self.nodes[nid]
        environ = {**os.environ, **(env or {})}
        main = "smtpcluster.cli"
        if hooked.wants_hooks(env or {}):  # faults and planted bugs: only through tests/
            main = "tests.hooked"
            environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, environ.get("PYTHONPATH")]))
        with open(self.root / f"{nid}.log", "ab") as log:  # the child keeps its own copy
            node.popen = subprocess.Popen(
                [sys.executable, "-P", "-m", main, "serve", "--config", str(node.config)],
                stdout=log, stderr=subprocess.STDOUT, env=environ,
            )  # fmt: skip
        if wait:
            wait_for(f"{nid}'s admin API", lambda: self.status(nid))

    def start_all(self) -> None:
        for nid in self.nodes:
            self.start(nid)

    def kill(self, nid: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[nid]
        assert node.popen is not None
        popen, node.popen = node.popen, None
        stop_process(popen, sig)

    def stop_all(self) -> None:
        """SIGTERM to every node at once (each drains), then wait for them all."""
        running = [n for n in self.nodes.values() if n.popen is not None]
        for node in running:
            assert node.popen is not None
            node.popen.send_signal(signal.SIGCONT)
            node.popen.send_signal(signal.SIGTERM)
        for node in running:
            assert node.popen is not None
            popen, node.popen = node.popen, None
            stop_process(popen, signal.SIGTERM)

    def live(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.popen is not None]

    def admin(self, nid: str, path: str) -> Any:
        node = self.nodes[nid]
        req = urllib.request.Request(
            f"http://{node.host}:{node.admin_port}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            return json.loads(resp.read())

    def status(self, nid: str) -> dict[str, Any] | None:
        try:
            s: dict[str, Any] = self.admin(nid, "/v1/cluster/status")
            return s
        except (OSError, urllib.error.URLError):
            return None

    def leader(self) -> str:
        def agreed() -> str | None:
            leaders = {(self.status(n) or {}).get("leader") for n in self.live()}
            lead = leaders.pop() if len(leaders) == 1 else None
            return lead if lead in self.live() else None

        try:
            return wait_for("an agreed leader", agreed, 30)
        except AssertionError as exc:
            views = {n: self.status(n) for n in self.live()}
            brief = {
                n: v and (v["role"], v["term"], v["leader"], v["commit"]) for n, v in views.items()
            }
            raise AssertionError(f"{exc}; the nodes say {brief}") from None

    def queued(self, nid: str) -> list[dict[str, Any]]:
        """Every message in the node's spool (a linearizable read)."""
        out: list[dict[str, Any]] = []
        after = ""
        while True:
            page = self.admin(nid, f"/v1/queue?limit=500&after={after}")
            out += page["messages"]
            after = page["next"]
            if not after:
                return out

    def queued_ids(self, nid: str) -> set[str]:
        return {m["id"] for m in self.queued(nid)}

    def queued_rcpts(self, nid: str) -> set[str]:
        return {r["address"] for m in self.queued(nid) for r in m["recipients"]}


@contextlib.contextmanager
def running(cluster: SmtpCluster) -> Iterator[SmtpCluster]:
    """Every node started and a leader agreed; every node stopped afterwards."""
    try:
        cluster.start_all()
        cluster.leader()
        yield cluster
    finally:
        cluster.stop_all()
