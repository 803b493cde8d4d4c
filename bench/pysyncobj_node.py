"""One PySyncObj node with a replicated dict and a JSON-lines control port.

Started by bench/raft_bench.py only; the proposals are made inside this process (the
embedded path), with appendEntriesUseBatch=False as the research anchors recommend.
"""

from __future__ import annotations

import json
import socketserver
import sys
import threading
import time
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated


class KV(SyncObj):  # type: ignore[misc]
    def __init__(self, me: str, partners: list[str], conf: Any) -> None:
        super().__init__(me, partners, conf)
        self.data: dict[str, bytes] = {}

    @replicated  # type: ignore[untyped-decorator, unused-ignore]
    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value


def bench(kv: KV, n: int, concurrency: int, size: int) -> dict[str, float]:
    window = threading.Semaphore(concurrency)
    latencies: list[float] = []
    done = threading.Event()
    lock = threading.Lock()
    value = b"v" * size

    def finished(began: float, _result: Any, _err: Any) -> None:
        with lock:
            latencies.append(time.perf_counter() - began)
            if len(latencies) == n:
                done.set()
        window.release()

    start = time.perf_counter()
    for k in range(n):
        window.acquire()
        began = time.perf_counter()
        kv.put(f"b{k}", value, callback=lambda r, e, b=began: finished(b, r, e))
    done.wait(300)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "ops_per_s": n / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def main() -> None:
    me, control, journal, *partners = sys.argv[1:]
    conf = SyncObjConf(
        appendEntriesUseBatch=False, journalFile=journal, fullDumpFile=journal + ".dump"
    )
    kv = KV(me, partners, conf)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            if req["op"] == "status":
                leader = kv._getLeader()
                reply: dict[str, Any] = {"leader": str(leader) if leader else None, "self": me}
            else:
                reply = bench(kv, req["n"], req["concurrency"], req["size"])
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    host, port = control.rsplit(":", 1)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((host, int(port)), Handler) as server:
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
