"""A Raft node serving the test key-value store: `python -m raft.kvserver --help`.

Used by the runtime's process tests and by bench/raft_bench.py. Clients speak JSON
lines on --client: {"op": "put", "key": k, "value": v}, {"op": "get", "key": k},
{"op": "status"}, {"op": "add_learner", "id": n, "addr": "h:p"}, {"op": "promote", "id": n},
{"op": "remove", "id": n}, {"op": "transfer", "id": n}, {"op": "dump"}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

try:
    import uvloop
except ImportError:  # uvloop is optional: plain asyncio works, more slowly
    uvloop = None  # type: ignore[assignment]

from raft.core import RaftError
from raft.kv import KV, put
from raft.node import NodeConfig, RaftNode
from raft.transport import Address
from raft.types import ConfChange, ConfChangeOp


async def handle(node: RaftNode, kv: KV, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "put":
        await node.propose(put(req["key"], req["value"].encode()), timeout=req.get("timeout", 10))
        return {}
    if op == "get":
        await node.read_index()
        value = kv.data.get(req["key"])
        return {"value": value.decode() if value is not None else None}
    if op == "dump":
        await node.read_index()
        return {"data": {k: v.decode() for k, v in kv.data.items()}}
    if op == "status":
        return node.status()
    if op == "add_learner":
        await node.add_learner(req["id"], Address.parse(req["addr"]))
        return {}
    if op in ("promote", "remove"):
        kind = ConfChangeOp.PROMOTE if op == "promote" else ConfChangeOp.REMOVE
        await node.change(ConfChange(kind, req["id"]))
        return {}
    if op == "bench":
        return await bench(node, req["n"], req["concurrency"], req["size"])
    if op == "transfer":
        node.transfer_leader(req["id"])
        return {}
    raise ValueError(f"unknown op {op!r}")


async def measure(
    op: Callable[[int], Awaitable[object]], n: int, concurrency: int
) -> dict[str, float]:
    """Run op(0..n-1) with `concurrency` in flight: throughput and latency percentiles."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for k in counter:
            began = time.perf_counter()
            await op(k)
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "ops_per_s": n / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


async def bench(node: RaftNode, n: int, concurrency: int, size: int) -> dict[str, float]:
    """Proposals made inside this process (the embedded path the relay uses)."""
    value = b"v" * size
    return await measure(lambda k: node.propose(put(f"bench{k}", value)), n, concurrency)


async def serve_client(
    node: RaftNode, kv: KV, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while line := await reader.readline():
            try:
                reply = {"ok": True, **await handle(node, kv, json.loads(line))}
            except (RaftError, TimeoutError, ValueError, KeyError) as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    writer.close()


async def main(args: argparse.Namespace) -> None:
    peers = dict(p.split("=", 1) for p in args.peer)
    with open(args.key_file, "rb") as f:
        key = f.read().strip()
    cfg = NodeConfig(
        id=args.id,
        listen=Address.parse(args.listen),
        peers={n: Address.parse(a) for n, a in peers.items()},
        data_dir=args.data,
        key=key,
        tick_ms=args.tick_ms,
        election_ticks=args.election_ticks,
        snapshot_entries=args.snapshot_entries,
        join=args.join,
    )
    kv = KV()
    node = RaftNode(cfg, kv)
    await node.start()
    client = Address.parse(args.client)
    server = await asyncio.start_server(
        lambda r, w: serve_client(node, kv, r, w), client.host, client.port, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {args.id}", flush=True)
    await stop.wait()
    server.close()
    await node.stop()


def run() -> None:
    p = argparse.ArgumentParser(prog="python -m raft.kvserver", description=__doc__)
    p.add_argument("--id", required=True)
    p.add_argument("--listen", required=True, help="raft peer address, host:port")
    p.add_argument("--client", required=True, help="client address, host:port")
    p.add_argument("--peer", action="append", default=[], help="id=host:port (repeat)")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--key-file", required=True)
    p.add_argument("--join", action="store_true", help="start empty; wait to be added")
    p.add_argument("--tick-ms", type=float, default=20.0)
    p.add_argument("--election-ticks", type=int, default=10)
    p.add_argument("--snapshot-entries", type=int, default=10_000)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    if uvloop is None:
        asyncio.run(main(args))
    else:
        uvloop.run(main(args))


if __name__ == "__main__":
    run()
