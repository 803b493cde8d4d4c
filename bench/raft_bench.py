"""Raft benchmark: our 3-process loopback cluster against PySyncObj and etcd.

    scripts/bench-raft [--trials 10] [--skip-pso] [--skip-etcd]

Workloads: proposals/s and latency p50/p99 with 1 and 64 concurrent proposers at 100 B
and 10 KiB, and leader failover (kill -9 of the leader to the next successful write)
over --trials trials. Ours and PySyncObj propose inside the leader process (the
embedded path the relay uses); etcd is driven by a gRPC client, as in
../shared/research/anchor-raft-results.md. Prints our figures over theirs as ratios
and writes everything to --out. Not a test: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc  # the benchmark's own dependency (scripts/bench-raft installs it)

from raft.kvserver import measure
from tests.integration.kvcluster import KVCluster, free_port, wait_for

WORKLOADS = [(1, 100, 2000), (64, 100, 10000), (1, 10240, 1000), (64, 10240, 5000)]
TIMEOUTS = {"heartbeat_ms": 50, "election_ms": 300}  # etcd's "fast" setting, and ours


def _name(concurrency: int, size: int) -> str:
    return f"c{concurrency}_{'10KiB' if size > 1000 else '100B'}"


async def first_success(attempt: Callable[[int], Awaitable[bool]], every_s: float = 0.01) -> float:
    """Launch an attempt every 10 ms; seconds until the first one succeeds."""
    began = time.perf_counter()
    done = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def one(k: int) -> None:
        try:
            if await attempt(k):
                done.set()
        except Exception:
            pass

    k = 0
    while not done.is_set():
        tasks.append(asyncio.create_task(one(k)))
        k += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)
    elapsed = time.perf_counter() - began
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed


# ---------------------------------------------------------------- ours


def bench_ours(root: Path, trials: int) -> dict[str, Any]:
    ticks = {"tick-ms": 25, "election-ticks": TIMEOUTS["election_ms"] // 25}
    (root / "ours").mkdir(exist_ok=True)
    cluster = KVCluster(root / "ours", ["n1", "n2", "n3"], **ticks)
    out: dict[str, Any] = {}
    try:
        cluster.start_all()
        for c, size, n in WORKLOADS:
            leader = cluster.leader()
            r = cluster.call(leader, {"op": "bench", "n": n, "concurrency": c, "size": size}, 300)
            out[_name(c, size)] = {k: r[k] for k in ("ops_per_s", "p50_ms", "p99_ms")}
            print(f"  ours {_name(c, size)}: {out[_name(c, size)]}", flush=True)
        out["failover_ms"] = [failover_ours(cluster, k) for k in range(trials)]
    finally:
        cluster.stop_all()
    return out


def failover_ours(cluster: KVCluster, trial: int) -> float:
    leader = cluster.leader()
    survivors = [n for n in cluster.live() if n != leader]

    async def attempt(k: int) -> bool:
        p = cluster.procs[survivors[k % len(survivors)]]
        reader, writer = await asyncio.open_connection(p.host, p.client_port)
        req = {"op": "put", "key": f"f{trial}-{k}", "value": "x", "timeout": 10}
        writer.write(json.dumps(req).encode() + b"\n")
        answer = json.loads(await reader.readline())
        writer.close()
        return bool(answer["ok"])

    cluster.kill(leader)
    ms = asyncio.run(first_success(attempt)) * 1000
    print(f"  ours failover {trial}: {ms:.0f} ms", flush=True)
    cluster.start(leader)
    new = cluster.leader()
    target = cluster.call(new, {"op": "status"})["commit"]
    wait_for("the restarted node to catch up",
             lambda: cluster.call(leader, {"op": "status"})["applied"] >= target, 60)  # fmt: skip
    return ms


# ---------------------------------------------------------------- PySyncObj


def bench_pso(root: Path) -> dict[str, Any]:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    raft = [f"{h}:{free_port(h)}" for h in hosts]
    control = [f"{h}:{free_port(h)}" for h in hosts]
    procs = []
    out: dict[str, Any] = {}
    node = Path(__file__).with_name("pysyncobj_node.py")
    try:
        for k in range(3):
            journal = str(root / f"pso-{k}.journal")
            partners = [r for j, r in enumerate(raft) if j != k]
            args = [sys.executable, str(node), raft[k], control[k], journal, *partners]
            log = open(root / f"pso-{k}.log", "ab")  # noqa: SIM115
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        for c, size, n in WORKLOADS:
            leader = wait_for(
                "a PySyncObj leader", lambda: _pso_call(control[0], {"op": "status"})["leader"]
            )
            lead_control = control[raft.index(leader)]
            req = {"op": "bench", "n": n, "concurrency": c, "size": size}
            out[_name(c, size)] = _pso_call(lead_control, req)
            print(f"  pysyncobj {_name(c, size)}: {out[_name(c, size)]}", flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return out


def _pso_call(control: str, req: dict[str, Any]) -> dict[str, Any]:
    host, port = control.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=300) as s:
        s.sendall(json.dumps(req).encode() + b"\n")
        answer: dict[str, Any] = json.loads(s.makefile().readline())
        return answer


# ---------------------------------------------------------------- etcd


class Etcd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        self.names = ["e1", "e2", "e3"]
        self.client = [f"{h}:{free_port(h)}" for h in self.hosts]
        self.peer = [f"{h}:{free_port(h)}" for h in self.hosts]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, k: int) -> None:
        cluster = ",".join(f"{n}=http://{p}" for n, p in zip(self.names, self.peer, strict=True))
        args = [
            "etcd", "--name", self.names[k], "--data-dir", str(self.root / self.names[k]),
            "--listen-client-urls", f"http://{self.client[k]}",
            "--advertise-client-urls", f"http://{self.client[k]}",
            "--listen-peer-urls", f"http://{self.peer[k]}",
            "--initial-advertise-peer-urls", f"http://{self.peer[k]}",
            "--initial-cluster", cluster, "--initial-cluster-token", "bench",
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(TIMEOUTS["heartbeat_ms"]),
            "--election-timeout", str(TIMEOUTS["election_ms"]),
            "--logger", "zap", "--log-level", "error",
        ]  # fmt: skip
        log = open(self.root / f"{self.names[k]}.log", "ab")  # noqa: SIM115
        self.procs[k] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def leader(self) -> int:
        def find() -> tuple[int] | None:  # a tuple: index 0 must count as found
            for k in sorted(self.procs):  # one endpoint at a time: a starting one may not answer
                out = subprocess.run(
                    ["etcdctl", "--endpoints", self.client[k], "endpoint", "status", "-w", "json"],
                    capture_output=True, text=True, timeout=10, check=False,
                    env={**os.environ, "ETCDCTL_API": "3"},
                )  # fmt: skip
                for st in json.loads(out.stdout or "[]"):
                    lead = st["Status"]["leader"]
                    if lead and lead == st["Status"]["header"]["member_id"]:
                        return (k,)
            return None

        return wait_for("an etcd leader", find, 30)[0]

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def put_request(key: bytes, value: bytes) -> bytes:
    """etcdserverpb.PutRequest{key=1, value=2}, encoded by hand: no generated stubs."""
    return b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value


async def etcd_workload(endpoint: str, n: int, concurrency: int, size: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        put = channel.unary_unary(
            "/etcdserverpb.KV/Put", request_serializer=bytes, response_deserializer=bytes
        )
        value = b"v" * size
        return await measure(
            lambda k: put(put_request(b"b%d" % k, value), timeout=30), n, concurrency
        )


def bench_etcd(root: Path, trials: int) -> dict[str, Any]:
    (root / "etcd").mkdir(exist_ok=True)
    etcd = Etcd(root / "etcd")
    out: dict[str, Any] = {}
    try:
        for k in range(3):
            etcd.start(k)
        for c, size, n in WORKLOADS:
            lead = etcd.client[etcd.leader()]
            out[_name(c, size)] = asyncio.run(etcd_workload(lead, n, c, size))
            print(f"  etcd {_name(c, size)}: {out[_name(c, size)]}", flush=True)
        out["failover_ms"] = [failover_etcd(etcd, t) for t in range(trials)]
    finally:
        etcd.stop()
    return out


def failover_etcd(etcd: Etcd, trial: int) -> float:
    leader = etcd.leader()
    survivors = [etcd.client[k] for k in etcd.procs if k != leader]

    async def attempt(k: int) -> bool:
        async with grpc.aio.insecure_channel(survivors[k % len(survivors)]) as ch:
            put = ch.unary_unary(
                "/etcdserverpb.KV/Put", request_serializer=bytes, response_deserializer=bytes
            )
            await put(put_request(b"f%d-%d" % (trial, k), b"x"), timeout=10)
        return True

    etcd.procs[leader].send_signal(signal.SIGKILL)
    etcd.procs.pop(leader).wait()
    ms = asyncio.run(first_success(attempt)) * 1000
    print(f"  etcd failover {trial}: {ms:.0f} ms", flush=True)
    etcd.start(leader)
    etcd.leader()
    return ms


# ---------------------------------------------------------------- report


def _cell(results: dict[str, Any], system: str, workload: str, fmt: str) -> str:
    w = results.get(system, {}).get(workload)
    return fmt.format(**w) if w else "-"


def report(results: dict[str, Any]) -> None:
    ours = results["ours"]
    print("\n| workload | ours | pysyncobj | etcd | ours/pso | ours/etcd |")
    print("|---|---|---|---|---|---|")
    systems = ("ours", "pso", "etcd")
    for c, size, _ in WORKLOADS:
        w = _name(c, size)
        rates = [_cell(results, s, w, "{ops_per_s:.0f}") for s in systems]
        ratios = [
            f"{ours[w]['ops_per_s'] / results[s][w]['ops_per_s']:.2f}"
            if w in results.get(s, {})
            else "-"
            for s in ("pso", "etcd")
        ]
        print(f"| {w} ops/s | {' | '.join(rates)} | {' | '.join(ratios)} |")
        lat = [_cell(results, s, w, "{p50_ms:.2f}/{p99_ms:.2f}") for s in systems]
        print(f"| {w} p50/p99 ms | {' | '.join(lat)} | | |")
    for s in ("ours", "etcd"):
        f = results.get(s, {}).get("failover_ms")
        if f:
            spread = f"{statistics.median(f):.0f} ({min(f):.0f}-{max(f):.0f})"
            print(f"| failover {s} median (min-max) ms | {spread} |")
    if results.get("etcd", {}).get("failover_ms"):
        ratio = statistics.median(ours["failover_ms"]) / statistics.median(
            results["etcd"]["failover_ms"]
        )
        print(f"failover ours/etcd (median): {ratio:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--skip-pso", action="store_true")
    p.add_argument("--skip-etcd", action="store_true")
    p.add_argument("--out", default="bench/results/raft_bench.json")
    args = p.parse_args()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"{platform.platform()}",
        "python": platform.python_version(),
        "timeouts": TIMEOUTS,
    }
    root = Path(tempfile.mkdtemp(prefix="raft-bench-"))  # kept: the nodes' logs live there
    print(f"working directory: {root}", flush=True)
    print("ours:", flush=True)
    results["ours"] = bench_ours(root, args.trials)
    if not args.skip_pso:
        print("pysyncobj:", flush=True)
        results["pso"] = bench_pso(root)
    if not args.skip_etcd:
        print("etcd:", flush=True)
        results["etcd"] = bench_etcd(root, args.trials)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
