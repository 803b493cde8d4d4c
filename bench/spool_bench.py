"""Spool benchmark: apply rate, memory per queued message, the pause a snapshot's view
costs the event loop, snapshot and restore time.

    PYTHONPATH=. .venv/bin/python -m bench.spool_bench [--messages 100000] [--big 1000000]

Not a test: it prints figures for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Iterator

from mailqueue import codec, policy, snapshot
from mailqueue.bodies import DiskBodies
from mailqueue.commands import (
    Accept,
    Assign,
    Assignment,
    BeginDot,
    Command,
    Outcome,
    OutcomeKind,
    RcptResult,
)
from mailqueue.spool import Spool
from raft.storage import Storage
from raft.types import ConfState

BODY = (b"Subject: benchmark\r\n\r\n" + b"x" * 76 + b"\r\n") * 26  # about 2 KiB


def accept(k: int, at: int) -> Accept:
    return Accept(
        at, f"{k:016x}-bench", f"sender{k % 1000}@example.org",
        (f"user{k}@dest{k % 100}.example",), BODY, f"node{k % 3}",
    )  # fmt: skip


def lifecycle(n: int) -> Iterator[Command]:
    for k in range(n):
        at = 1_000_000 + k
        mid, node = f"{k:016x}-bench", f"node{k % 3}"
        yield accept(k, at)
        yield Assign(at, (Assignment(mid, 0, node, 1),))
        yield BeginDot(at, mid, (0,), node, 1)
        yield Outcome(at, mid, node, 1, (RcptResult(0, OutcomeKind.DELIVERED, "250 2.0.0 ok"),))


class NullBodies:
    """Keeps no bodies: memory figures then count the index alone."""

    def put(self, message_id: str, body: bytes) -> None: ...
    def get(self, message_id: str) -> bytes:
        return BODY

    def delete(self, message_id: str) -> None: ...
    def clear(self) -> None: ...


def apply_rate(n: int, root: str) -> None:
    encoded = [codec.encode(c) for c in lifecycle(n)]
    spool = Spool(DiskBodies(os.path.join(root, "rate")))
    gc.collect()
    began = time.perf_counter()
    for raw in encoded:
        spool.apply(codec.decode(raw))
    elapsed = time.perf_counter() - began
    assert not spool.messages  # every message delivered and gone
    rate = len(encoded) / elapsed
    print(f"apply (decode + apply, bodies on disk): {len(encoded)} commands in {elapsed:.2f} s"
          f" = {rate:,.0f} commands/s, {n / elapsed:,.0f} messages/s")  # fmt: skip


def memory_per_message(n: int) -> None:
    gc.collect()
    tracemalloc.start()
    spool = Spool(NullBodies())
    base = tracemalloc.get_traced_memory()[0]
    for k in range(n):
        spool.apply(accept(k, 1_000_000 + k))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"memory: {used / n:,.0f} bytes per queued message outside its body ({n} messages)")


def scheduler_pass(n: int) -> None:
    """One scheduler pass (assign, expire, bounce) and one worker's look at its work,
    over `n` deferred messages not yet due and 100 fresh ones."""
    spool = Spool(NullBodies())
    later = 1_000_000 + 3_600_000
    for k in range(n):
        mid, node = f"{k:016x}-bench", f"node{k % 3}"
        spool.apply(accept(k, 1_000_000))
        spool.apply(Assign(1_000_000, (Assignment(mid, 0, node, 1),)))
        deferred = RcptResult(0, OutcomeKind.DEFERRED, "451 4.4.1 later", later)
        spool.apply(Outcome(1_000_000, mid, node, 1, (deferred,)))
    for k in range(n, n + 100):
        spool.apply(accept(k, 1_000_001))
    pol = policy.Policy()
    began = time.perf_counter()
    assigned = policy.assign(spool, 1_000_002, pol, ["node0", "node1", "node2"])
    policy.expired(spool, 1_000_002, pol)
    policy.bounces(spool, 1_000_002, "bench.test", "node0")
    held = spool.index.held("node0")
    took = time.perf_counter() - began
    assert sum(len(a.assignments) for a in assigned) == 100 and not held
    print(f"scheduler pass over {n:,} deferred messages and 100 due: {took * 1000:.2f} ms")


def view_pause(n: int) -> None:
    """How long Spool.open_view holds the event loop at each snapshot, with `n` messages
    queued after half as many again came and went out of order, as in a real spool (a
    dict's table with holes in it can be copied by another, slower path)."""
    spool = Spool(NullBodies())
    for k in range(n + n // 2):
        spool.apply(accept(k, 1_000_000 + k))
    done = RcptResult(0, OutcomeKind.DELIVERED, "250 2.0.0 ok")
    for k in range(0, n + n // 2, 3):
        mid, node = f"{k:016x}-bench", f"node{k % 3}"
        spool.apply(Assign(2_000_000, (Assignment(mid, 0, node, 1),)))
        spool.apply(BeginDot(2_000_000, mid, (0,), node, 1))
        spool.apply(Outcome(2_000_000, mid, node, 1, (done,)))
    took = []
    for _ in range(5):
        began = time.perf_counter()
        spool.open_view()
        took.append(time.perf_counter() - began)
        spool.close_view()
    ms = ", ".join(f"{t * 1000:.1f}" for t in took)
    print(f"open_view of {len(spool.messages):,} queued messages after churn: {ms} ms")


def snapshot_restore(n: int, root: str) -> None:
    spool = Spool(DiskBodies(os.path.join(root, f"src{n}")))
    for k in range(n):
        spool.apply(accept(k, 1_000_000 + k))
    store = Storage(os.path.join(root, f"raft{n}"))
    began = time.perf_counter()
    meta = store.write_snapshot(n, 1, ConfState(("a",), ()), snapshot.dump(spool))
    took_snap = time.perf_counter() - began
    del spool
    gc.collect()
    began = time.perf_counter()
    restored = snapshot.load(store.snapshot_chunks(meta), DiskBodies(os.path.join(root, f"dst{n}")))
    took_restore = time.perf_counter() - began
    assert len(restored.messages) == n
    print(f"snapshot of {n:,} queued messages ({meta.size / 2**20:,.0f} MiB, fsynced): "
          f"{took_snap:.1f} s; restore (index and bodies): {took_restore:.1f} s")  # fmt: skip
    store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--big", type=int, default=1_000_000, help="0 to skip the large snapshot")
    args = p.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")  # fmt: skip
    root = tempfile.mkdtemp(prefix="spool-bench-")
    try:
        apply_rate(args.messages, root)
        scheduler_pass(args.messages)
        memory_per_message(args.messages)
        view_pause(args.big or args.messages)
        snapshot_restore(args.messages, root)
        if args.big:
            snapshot_restore(args.big, root)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
