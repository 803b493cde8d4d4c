"""Network partitions between nodes on loopback, with nftables.

Every rule lives in a table of this process's own, deleted at exit and on failure;
the tables of processes that are gone (a crashed earlier run) are deleted before use.
One table for all once let a test run on the same machine (its collection alone, by
partitions_possible) delete a chaos soak's rules under it, which ended the soak. A
node's peers connect from their own listen address (raft.transport binds it), so a
node is cut off by its address and its Raft port: SMTP, admin and sink traffic on the
same addresses passes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from collections.abc import Iterable

PREFIX = "smtpcluster_chaos"


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


def _table() -> str:
    return f"{PREFIX}_{os.getpid()}"


def _stale_tables() -> list[str]:
    """Our tables whose process is gone, and the one all runs shared before."""
    out = subprocess.run(["nft", "list", "tables"], check=False, capture_output=True, text=True)
    names = [ln.split()[-1] for ln in out.stdout.splitlines() if ln.startswith("table inet ")]
    return [n for n in names if n == PREFIX or _gone(n.removeprefix(PREFIX + "_"))]


def _delete(table: str) -> None:
    """Remove `table` and every rule in it; quiet when there is none."""
    subprocess.run(["nft", "delete", "table", "inet", table], check=False, capture_output=True)


def _gone(pid: str) -> bool:
    return pid.isdigit() and not os.path.exists(f"/proc/{pid}")


class Partitions:
    def __init__(self) -> None:
        if shutil.which("nft") is None or os.geteuid() != 0:
            raise PartitionsUnavailable("partitions need nft (Debian's nftables) and root")
        for stale in _stale_tables():
            _delete(stale)
        self.heal_all()
        _nft("add", "table", "inet", _table())
        _nft("add", "chain", "inet", _table(), "out", "{ type filter hook output priority 0 ; }")
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
            _nft("add", "rule", "inet", _table(), "out", *rule.split())

    def deafen(self, port: int) -> None:
        """Nothing reaches the listener on `port`, yet its node still connects out: a
        firewall that blocks one node's Raft port inbound only."""
        _nft("add", "rule", "inet", _table(), "out", "tcp", "dport", str(port), "drop")

    def heal(self) -> None:
        _nft("flush", "chain", "inet", _table(), "out")

    @staticmethod
    def heal_all() -> None:
        """Remove this process's table and every rule in it; quiet when there is none."""
        if shutil.which("nft") is not None:
            _delete(_table())

    def close(self) -> None:
        self.heal_all()
        atexit.unregister(self.heal_all)
