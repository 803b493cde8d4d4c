"""A hand-driven network of Raft cores for scenario tests (no randomness, no time).

Messages wait in a queue until the test delivers them; `stabilize()` delivers until
nothing moves, like etcd's rafttest `stabilize`. Every node keeps an in-memory
"disk" so that tests can restart it, and a list of applied entries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import cbor2

from raft.core import Config, InitialState, Raft, Role
from raft.types import ConfState, Entry, EntryKind, HardState, Message, Ready, SnapshotMeta


@dataclass
class MemNode:
    id: str
    core: Raft
    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    snapshot: SnapshotMeta | None = None
    snapshot_data: bytes = b""
    partial: bytearray = field(default_factory=bytearray)
    applied: list[Entry] = field(default_factory=list)  # the state machine: applied entries
    read_states: list[tuple[bytes, int]] = field(default_factory=list)

    def read_snapshot(self, meta: SnapshotMeta, offset: int, length: int) -> bytes:
        return self.snapshot_data[offset : offset + length]

    def values(self) -> list[bytes]:
        return [e.data for e in self.applied if e.kind is EntryKind.NORMAL]


class Net:
    def __init__(self, voters: list[str], *, learners: tuple[str, ...] = (), **cfg: Any) -> None:
        self.cfg = cfg
        self.bootstrap = ConfState(tuple(sorted(voters)), tuple(sorted(learners)))
        self.nodes: dict[str, MemNode] = {}
        self.queue: list[Message] = []
        self.cut: set[tuple[str, str]] = set()
        for nid in [*voters, *learners]:
            self.add_node(nid, self.bootstrap)

    def config(self, nid: str) -> Config:
        return Config(id=nid, **self.cfg)

    def add_node(self, nid: str, bootstrap: ConfState | None = None) -> MemNode:
        """A node with an empty log (and no configuration unless given): a new server."""
        node = MemNode(nid, None)  # type: ignore[arg-type]
        init = InitialState(bootstrap=bootstrap or ConfState())
        node.core = Raft(self.config(nid), random.Random(nid), init, node)
        self.nodes[nid] = node
        return node

    def restart(self, nid: str) -> Raft:
        """A crash and restart: only what reached the in-memory disk survives."""
        old = self.nodes[nid]
        init = InitialState(old.hard_state, old.snapshot, tuple(old.entries), self.bootstrap)
        old.core = Raft(self.config(nid), random.Random(nid + "'"), init, old)
        old.applied = decode_applied(old.snapshot_data) if old.snapshot else []
        return old.core

    def core(self, nid: str) -> Raft:
        return self.nodes[nid].core

    # ---- driving

    def isolate(self, nid: str) -> None:
        for other in self.nodes:
            if other != nid:
                self.cut |= {(nid, other), (other, nid)}

    def heal(self) -> None:
        self.cut.clear()

    def persist(self, nid: str) -> None:
        """Take the node's Ready, make it 'durable', queue its messages, apply."""
        node = self.nodes[nid]
        while node.core.has_ready():
            rd = node.core.ready()
            self._write(node, rd)
            self.queue.extend(rd.messages)
            node.applied.extend(rd.committed_entries)
            node.read_states.extend((r.context, r.index) for r in rd.read_states)
            node.core.advance(rd)
            if rd.snapshot_due:
                self.snapshot(nid)

    def _write(self, node: MemNode, rd: Ready) -> None:
        for c in rd.snapshot_chunks:
            if c.offset == 0:
                node.partial = bytearray()
            node.partial += c.data
        if rd.snapshot is not None:
            node.snapshot, node.snapshot_data = rd.snapshot, bytes(node.partial)
            node.entries = [e for e in node.entries if e.index > rd.snapshot.index]
            node.applied = decode_applied(node.snapshot_data)
        if rd.hard_state is not None:
            node.hard_state = rd.hard_state
        if rd.entries:
            first = rd.entries[0].index
            node.entries = [e for e in node.entries if e.index < first] + rd.entries

    def snapshot(self, nid: str) -> SnapshotMeta:
        node = self.nodes[nid]
        data = encode_applied(node.applied)
        meta = node.core.snapshot_meta(node.core.log.applied, len(data))
        assert meta is not None
        node.snapshot, node.snapshot_data = meta, data
        node.core.snapshot_taken(meta)
        return meta

    def deliver_one(self) -> bool:
        while self.queue:
            m = self.queue.pop(0)
            if (m.frm, m.to) in self.cut or m.to not in self.nodes:
                continue
            self.nodes[m.to].core.step(m)
            self.persist(m.to)
            return True
        return False

    def stabilize(self, limit: int = 100_000) -> None:
        for nid in self.nodes:
            self.persist(nid)
        for _ in range(limit):
            if not self.deliver_one():
                return
        raise AssertionError("the network did not settle")

    def tick(self, nid: str, n: int = 1) -> None:
        for _ in range(n):
            self.core(nid).tick()
        self.persist(nid)

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for nid in self.nodes:
                self.tick(nid)
            self.stabilize()

    def campaign(self, nid: str) -> Raft:
        core = self.core(nid)
        core.campaign()
        self.persist(nid)
        return core

    def elect(self, nid: str) -> Raft:
        core = self.campaign(nid)
        self.stabilize()
        assert core.role is Role.LEADER, (nid, core.role)
        return core

    def propose(self, nid: str, data: bytes) -> tuple[int, int]:
        result = self.core(nid).propose(data)
        self.persist(nid)
        return result

    def leaders(self) -> list[str]:
        return [n for n, x in self.nodes.items() if x.core.role is Role.LEADER]


def encode_applied(applied: list[Entry]) -> bytes:
    return cbor2.dumps([[e.term, e.index, int(e.kind), e.data] for e in applied])


def decode_applied(data: bytes) -> list[Entry]:
    return [Entry(t, i, EntryKind(k), d) for t, i, k, d in cbor2.loads(data)]
