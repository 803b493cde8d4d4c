"""Network partitions between nodes on loopback, with nftables.

Every rule lives in one table of our own, deleted at exit, on failure and before
use (a crashed earlier run may have left it). A node's peers connect from their own
listen address (raft.transport binds it), so a node is cut off by its address and
its Raft port: SMTP, admin and sink traffic on the same addresses passes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from collections.abc import Iterable

TABLE = "smtpcluster_chaos"


class PartitionsUnavailable(Exception):
    """nft is missing or we may not use it (not root)."""


def _nft(*args: str) -> None:
    out = subprocess.run(["nft", *args], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise PartitionsUnavailable(f"nft {' '.join(args[:3])}: {out.stderr.strip()[:200]}")


def partitions_possible() -> bool:
    try:
        Partitions().close()
    except PartitionsUnavailable:
        return False
    return True


class Partitions:
    def __init__(self) -> None:
        if shutil.which("nft") is None or os.geteuid() != 0:
            raise PartitionsUnavailable("partitions need nft (Debian's nftables) and root")
        self.heal_all()
        _nft("add", "table", "inet", TABLE)
        _nft("add", "chain", "inet", TABLE, "out", "{ type filter hook output priority 0 ; }")
        atexit.register(self.heal_all)

    def isolate(self, host: str, port: int, others: Iterable[tuple[str, int]]) -> None:
        """Cut the node at host:port (its Raft listener) off from the other nodes."""
        their_ports = ", ".join(str(p) for _, p in others)
        rules = [
            f"tcp dport {port} drop",  # into its listener, and its answers
            f"tcp sport {port} drop",
            f"ip saddr {host} tcp dport {{ {their_ports} }} drop",  # its own connections
            f"ip daddr {host} tcp sport {{ {their_ports} }} drop",
        ]
        for rule in rules:
            _nft("add", "rule", "inet", TABLE, "out", *rule.split())

    def deafen(self, port: int) -> None:
        """Nothing reaches the listener on `port`, yet its node still connects out: a
        firewall that blocks one node's Raft port inbound only."""
        _nft("add", "rule", "inet", TABLE, "out", "tcp", "dport", str(port), "drop")

    def heal(self) -> None:
        _nft("flush", "chain", "inet", TABLE, "out")

    @staticmethod
    def heal_all() -> None:
        """Remove the table and every rule in it; quiet when there is none."""
        if shutil.which("nft") is not None:
            subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False,
                           capture_output=True)  # fmt: skip

    def close(self) -> None:
        self.heal_all()
        atexit.unregister(self.heal_all)
