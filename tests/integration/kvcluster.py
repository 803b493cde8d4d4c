"""Real `raft.kvserver` processes on loopback, with their own data directories."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
POLL_INTERVAL_S = 0.05  # how often wait_for looks again; its deadline is what bounds it


# Below Linux's ephemeral range (32768-60999): a port the kernel handed out for bind(0)
# could be taken, before the node bound it, as the source port of some outgoing
# connection (the chaos load makes thousands): "address already in use" at start.
PORTS = range(10_000, 32_768)


def free_port(host: str, avoid: Collection[int] = ()) -> int:
    """A port nothing on `host` listens on now, below the ephemeral range."""
    while True:
        port = random.choice(PORTS)
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port


def free_ports(host: str, n: int) -> list[int]:
    """`n` distinct free ports on `host`, for one process's listeners."""
    ports: list[int] = []
    while len(ports) < n:
        ports.append(free_port(host, ports))
    return ports


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll `check` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def stop_process(popen: subprocess.Popen[bytes], sig: int) -> None:
    """Signal a node and wait for it; never leave one behind to disturb later tests."""
    popen.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
    popen.send_signal(sig)
    try:
        popen.wait(timeout=20)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=20)
        raise


@dataclass
class Proc:
    id: str
    host: str
    raft_port: int
    client_port: int
    data: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def raft_addr(self) -> str:
        return f"{self.host}:{self.raft_port}"


class KVCluster:
    def __init__(self, root: Path, ids: list[str], **opts: Any) -> None:
        self.root = root
        self.key_file = root / "cluster.key"
        self.key_file.write_bytes(os.urandom(32).hex().encode())
        self.opts = {"tick-ms": 20, "snapshot-entries": 10_000, **opts}
        self.procs: dict[str, Proc] = {}
        for k, nid in enumerate(ids):
            self.add_proc(nid, f"127.0.0.{k + 1}")
        self.initial = list(ids)

    def add_proc(self, nid: str, host: str) -> Proc:
        raft, client = free_ports(host, 2)
        p = Proc(nid, host, raft, client, self.root / nid)
        self.procs[nid] = p
        return p

    def start(self, nid: str, join: bool = False, key_file: Path | None = None) -> None:
        p = self.procs[nid]
        args = [
            sys.executable, "-P", "-m", "raft.kvserver", "--id", nid,
            "--listen", p.raft_addr, "--client", f"{p.host}:{p.client_port}",
            "--data", str(p.data), "--key-file", str(key_file or self.key_file),
        ]  # fmt: skip
        for other in self.initial:
            args += ["--peer", f"{other}={self.procs[other].raft_addr}"]
        for k, v in self.opts.items():
            args += [f"--{k}", str(v)]
        if join:
            args.append("--join")
        with open(self.root / f"{nid}.log", "ab") as log:  # the child keeps its own copy
            p.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(f"{nid} to listen", lambda: self.call(nid, {"op": "status"}).get("ok"))

    def start_all(self) -> None:
        for nid in self.initial:
            self.start(nid)

    def kill(self, nid: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[nid]
        assert p.popen is not None
        popen, p.popen = p.popen, None
        stop_process(popen, sig)

    def stop_all(self) -> None:
        for nid, p in self.procs.items():
            if p.popen is not None:
                self.kill(nid, signal.SIGTERM)

    def call(self, nid: str, req: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        p = self.procs[nid]
        with socket.create_connection((p.host, p.client_port), timeout=timeout) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            line = s.makefile().readline()
        if not line:
            raise OSError("connection closed without an answer")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def live(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.popen is not None]

    def leader(self, timeout: float = 20.0) -> str:
        """The node every live member agrees leads."""

        def agreed() -> str | None:
            views = [self.call(n, {"op": "status"}) for n in self.live()]
            leaders = {v["leader"] for v in views}
            if len(leaders) == 1 and None not in leaders:
                lead: str = leaders.pop()
                return lead if lead in self.live() else None
            return None

        return wait_for("an agreed leader", agreed, timeout)
