"""The simulated world: virtual time, network, disks, nodes, clients and faults.

One heap of (time, seq, event) drives everything; `seq` breaks ties, so the order of
events is a function of the seed alone. Node ids are iterated in sorted order only
(string hashing is randomised per process, set order is not reproducible).
"""

from __future__ import annotations

import hashlib
import heapq
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cbor2

from raft.core import (
    Config,
    InitialState,
    Raft,
    RaftError,
    Role,
)
from raft.sim.checker import Checker, LogView, Violation, chain
from raft.sim.options import SimOptions
from raft.types import (
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    NodeId,
    Ready,
    SnapshotMeta,
)

CoreFactory = Callable[[Config, random.Random, InitialState, Any], Raft]


@dataclass(slots=True)
class Disk:
    """What survives a crash: only writes whose fsync completed."""

    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    snapshot: SnapshotMeta | None = None
    snapshot_data: bytes = b""
    partial: bytearray = field(default_factory=bytearray)  # chunks of an incoming snapshot
    partial_meta: SnapshotMeta | None = None

    def view(self) -> LogView:
        snap_index = self.snapshot.index if self.snapshot else 0
        snap_term = self.snapshot.term if self.snapshot else 0
        entries = [e for e in self.entries if e.index > snap_index]
        by_index = {e.index: e.term for e in entries}
        by_index[snap_index] = snap_term
        last = entries[-1] if entries else None
        return LogView(
            snap_index,
            last.index if last else snap_index,
            last.term if last else snap_term,
            by_index.get,
        )

    def read_snapshot(self, meta: SnapshotMeta, offset: int, length: int) -> bytes:
        assert meta == self.snapshot, (meta, self.snapshot)
        return self.snapshot_data[offset : offset + length]

    def append(self, entries: list[Entry]) -> None:
        first = entries[0].index
        while self.entries and self.entries[-1].index >= first:
            self.entries.pop()
        assert not self.entries or self.entries[-1].index == first - 1
        self.entries.extend(entries)

    def install(self, meta: SnapshotMeta) -> None:
        assert self.partial_meta == meta and len(self.partial) == meta.size
        keep = any(e.index == meta.index and e.term == meta.term for e in self.entries)
        self.entries = [e for e in self.entries if e.index > meta.index] if keep else []
        self.snapshot, self.snapshot_data = meta, bytes(self.partial)
        self.partial, self.partial_meta = bytearray(), None

    def write_chunk(self, meta: SnapshotMeta, offset: int, data: bytes) -> None:
        if self.partial_meta != meta or offset == 0:
            self.partial, self.partial_meta = bytearray(), meta
        assert len(self.partial) == offset
        self.partial += data


@dataclass(slots=True)
class Register:
    """The replicated state machine: a register holding the last value written."""

    applied: int = 0
    value: bytes = b""
    fingerprint: int = 0

    def encode(self, padding: int) -> bytes:
        return cbor2.dumps([self.applied, self.value, self.fingerprint, b"p" * padding])

    @staticmethod
    def decode(data: bytes) -> Register:
        applied, value, fingerprint, _ = cbor2.loads(data)
        return Register(applied, value, fingerprint)


@dataclass(slots=True)
class SimNode:
    id: NodeId
    disk: Disk
    core: Raft | None = None
    sm: Register = field(default_factory=Register)
    incarnation: int = 0
    writing: Ready | None = None
    reads: dict[bytes, int] = field(default_factory=dict)  # context -> commit at invocation
    answered: list[tuple[bytes, int]] = field(default_factory=list)  # waiting to be applied
    led_term: int = -1
    seen_commit: int = 0


@dataclass(slots=True)
class SimResult:
    seed: int
    ok: bool
    violation: str = ""
    digest: str = ""
    events: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    trace_tail: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # the whole trace, if asked for


class World:
    def __init__(self, seed: int, opts: SimOptions, factory: CoreFactory, trace: bool) -> None:
        self.seed = seed
        self.opts = opts
        self.factory = factory
        self.now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, str, Any]] = []
        self.net_rng = random.Random(f"{seed}:net")
        self.disk_rng = random.Random(f"{seed}:disk")
        self.client_rng = random.Random(f"{seed}:client")
        self.fault_rng = random.Random(f"{seed}:fault")
        self.ids = [f"n{i + 1}" for i in range(opts.nodes)]
        self.bootstrap = ConfState(tuple(self.ids[: opts.initial_voters]), ())
        self.nodes = {nid: SimNode(nid, Disk()) for nid in self.ids}
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.drop, self.duplicate = opts.drop, opts.duplicate
        self.checker = Checker(self.log_views, self.disk_views)
        self.faulting = True
        self.stats: dict[str, int] = {}
        self.trace: list[tuple[Any, ...]] = []
        self.full_trace = trace
        self.details: dict[int, Message] = {}
        self.events = 0
        self._counter = 0
        self.heal_proposal: tuple[NodeId, int, int] | None = None

    # ---- scheduling and tracing

    def at(self, delay: float, kind: str, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, self._seq, kind, payload))

    def note(self, *what: Any) -> None:
        self.trace.append((round(self.now, 3), *what))

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def log_views(self) -> dict[NodeId, LogView]:
        views = {}
        for n in self.nodes.values():
            if n.core is not None:
                log = n.core.log
                views[n.id] = LogView(log.offset, log.last_index(), log.last_term(), log.term)
            else:
                views[n.id] = n.disk.view()
        return views

    def disk_views(self) -> dict[NodeId, LogView]:
        return {n.id: n.disk.view() for n in self.nodes.values()}

    def cores(self) -> dict[NodeId, Raft]:
        return {n.id: n.core for n in self.nodes.values() if n.core is not None}

    # ---- nodes

    def start(self, node: SimNode) -> None:
        d = node.disk
        init = InitialState(d.hard_state, d.snapshot, tuple(d.entries), self.bootstrap)
        cfg = Config(
            id=node.id,
            election_ticks=self.opts.election_ticks,
            heartbeat_ticks=self.opts.heartbeat_ticks,
            pre_vote=self.opts.pre_vote,
            check_quorum=self.opts.check_quorum,
            max_entries_per_msg=self.opts.max_entries_per_msg,
            max_inflight_msgs=self.opts.max_inflight_msgs,
            snapshot_entries=self.opts.snapshot_entries,
            snapshot_growth=self.opts.snapshot_growth,
            snapshot_entries_max=self.opts.snapshot_entries_max,
            snapshot_chunk_bytes=self.opts.snapshot_chunk_bytes,
            compaction_trailing=self.opts.compaction_trailing,
        )
        node.incarnation += 1
        rng = random.Random(f"{self.seed}:{node.id}:{node.incarnation}")
        node.core = self.factory(cfg, rng, init, d)
        node.sm = Register.decode(d.snapshot_data) if d.snapshot else Register()
        node.writing, node.reads, node.answered = None, {}, []
        self.checker.node_restarted(node.id, node.core)
        self.at(self.net_rng.uniform(0, self.opts.tick_ms), "tick", (node.id, node.incarnation))
        self.note("start", node.id, node.incarnation)

    def crash(self, node: SimNode) -> None:
        rd = node.writing
        if rd is not None and self.disk_rng.random() < self.opts.torn_tail:
            self._write_prefix(node.disk, rd)
            self.count("disk:torn-write")
        node.core, node.writing = None, None
        self.note("crash", node.id)
        self.count("fault:crash")

    def _write_prefix(self, disk: Disk, rd: Ready) -> None:
        """A crash mid-write: some leading records of the batch reached the disk."""
        records: list[Callable[[], None]] = []
        for c in rd.snapshot_chunks:
            records.append(partial(disk.write_chunk, c.meta, c.offset, c.data))
        if rd.snapshot is not None:
            records.append(partial(disk.install, rd.snapshot))
        records.extend(partial(disk.append, rd.entries[: k + 1]) for k in range(len(rd.entries)))
        if rd.hard_state is not None:
            records.append(partial(setattr, disk, "hard_state", rd.hard_state))
        for rec in records[: self.disk_rng.randrange(len(records) + 1)]:
            rec()

    def pump(self, node: SimNode) -> None:
        """Hand the node's next Ready to its disk, unless a write is in flight."""
        core = node.core
        if core is None or node.writing is not None or not core.has_ready():
            return
        rd = core.ready()
        node.writing = rd
        latency = self.disk_rng.uniform(0, self.opts.disk_max_ms) if rd.must_sync() else 0.0
        self.at(latency, "persisted", (node.id, node.incarnation))

    def persisted(self, node: SimNode) -> None:
        core, rd = node.core, node.writing
        assert core is not None and rd is not None
        node.writing = None
        disk = node.disk
        for c in rd.snapshot_chunks:
            disk.write_chunk(c.meta, c.offset, c.data)
        if rd.snapshot is not None:
            disk.install(rd.snapshot)
            node.sm = Register.decode(disk.snapshot_data)
            self.checker.restored(node.id, node.sm.applied, node.sm.fingerprint)
        if rd.entries:
            disk.append(rd.entries)
        if rd.hard_state is not None:
            disk.hard_state = rd.hard_state
        for m in rd.messages:
            self.send(m)
        for e in rd.committed_entries:
            self.apply(node, e)
        for rs in rd.read_states:
            invoked = node.reads.pop(rs.context, None)
            if invoked is not None:
                self.checker.read_answered(node.id, invoked, rs.index)
                self.count("reads-answered")
                node.answered.append((rs.context, rs.index))
        node.answered = [(c, i) for c, i in node.answered if i > node.sm.applied]
        core.advance(rd)
        if rd.snapshot_due:
            self.take_snapshot(node, core)

    def apply(self, node: SimNode, e: Entry) -> None:
        self.checker.applied(node.id, node.sm.applied, e)
        sm = node.sm
        sm.applied = e.index
        sm.fingerprint = chain(sm.fingerprint, e)
        if e.kind is EntryKind.NORMAL:
            sm.value = e.data
        self.count("applied")

    def take_snapshot(self, node: SimNode, core: Raft) -> None:
        data = node.sm.encode(padding=self.disk_rng.randrange(200))
        meta = core.snapshot_meta(node.sm.applied, len(data))
        if meta is None:
            return
        node.disk.snapshot, node.disk.snapshot_data = meta, data
        keep_from = meta.index - self.opts.compaction_trailing
        node.disk.entries = [e for e in node.disk.entries if e.index > keep_from]
        core.snapshot_taken(meta)
        self.count("snapshot")

    # ---- network

    def send(self, m: Message) -> None:
        if (m.frm, m.to) in self.blocked:
            return
        if self.net_rng.random() < self.drop:
            self.count("net:drop")
            return
        copies = 1
        if self.net_rng.random() < self.duplicate:
            copies = 2
            self.count("net:duplicate")
        for _ in range(copies):
            delay = self.net_rng.uniform(self.opts.delay_min_ms, self.opts.delay_max_ms)
            self.at(delay, "deliver", m)

    def deliver(self, m: Message) -> None:
        node = self.nodes[m.to]
        if node.core is None or (m.frm, m.to) in self.blocked:
            return
        self.note("recv", m.frm, m.to, type(m).__name__, m.term)
        if self.full_trace:  # details for the reader; the digest covers the short form
            self.details[len(self.trace) - 1] = m
        self.count(type(m).__name__)
        node.core.step(m)
        self.after_input(node)

    def after_input(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        committed = core.log.committed
        self.checker.observe(node.id, core)
        if core.role is Role.LEADER:
            self._buggify_leader(node, core, committed > node.seen_commit)
        node.seen_commit = committed
        self.pump(node)

    def _buggify_leader(self, node: SimNode, core: Raft, committed: bool) -> None:
        """Fault leaders at the moments where bugs hide: just elected, just committed."""
        elected = node.led_term != core.term
        node.led_term = core.term
        if elected:
            self.count("elections")
        if not self.faulting:
            return
        r = self.fault_rng
        delay = self.opts.delay_max_ms
        if elected and r.random() < self.opts.leader_crash:
            # long enough for a round or two of appends
            self.at(r.uniform(0, 4 * delay), "crash", (node.id, node.incarnation))
        elif elected and r.random() < self.opts.leader_isolate:
            self.at(r.uniform(0, delay), "isolate", node.id)
        elif committed and r.random() < self.opts.commit_crash:
            self.at(r.uniform(0, delay), "crash", (node.id, node.incarnation))

    # ---- clients

    def client(self) -> None:
        self.at(self.client_rng.expovariate(1 / self.opts.client_interval_ms), "client")
        if not self.faulting and self.heal_proposal is not None:
            return  # after the heal, load stops: liveness asks for one commit, not throughput
        up = [n for n in self.nodes.values() if n.core is not None]
        if not up:
            return
        node = self.client_rng.choice(up)
        core = node.core
        assert core is not None
        notify: tuple[NodeId, ...] = ()
        if core.lead is not None and self.client_rng.random() < 0.5:
            leader = self.nodes[core.lead]  # a client that follows the redirect
            if leader.core is not None:
                # As a node's runtime forwards it: the follower asked is told (Persisted).
                notify = (node.id,)
                node, core = leader, leader.core
        self._counter += 1
        try:
            if self.client_rng.random() < 0.75:
                index, term = core.propose(b"v%d" % self._counter, notify, notify)
                self.note("propose", node.id, index, term)
                self.count("proposed")
                if not self.faulting and self.heal_proposal is None:
                    self.heal_proposal = (node.id, index, term)
            else:
                context = b"%s:%d" % (node.id.encode(), self._counter)
                node.reads[context] = len(self.checker.committed)
                core.read_index(context)
                self.count("reads")
        except RaftError:
            pass
        self.after_input(node)

    # ---- faults

    def fault(self) -> None:
        if not self.faulting:
            return
        self.at(self.fault_rng.expovariate(1 / self.opts.fault_interval_ms), "fault")
        kinds = ["heal"]
        if self.opts.partitions:
            kinds += ["partition", "one-way", "isolate", "bridge"]
        if self.opts.crashes:
            kinds += ["crash", "crash"]
        if self.opts.membership:
            kinds += ["membership", "membership"]
        if self.opts.transfers:
            kinds += ["transfer"]
        kind = self.fault_rng.choice(kinds)
        self.note("fault", kind)
        getattr(self, "fault_" + kind.replace("-", "_"))()

    def fault_heal(self) -> None:
        self.blocked.clear()

    def _block_between(self, a: list[NodeId], b: list[NodeId]) -> None:
        for x in a:
            for y in b:
                self.blocked.add((x, y))
                self.blocked.add((y, x))

    def fault_partition(self) -> None:
        ids = self.ids[:]
        self.fault_rng.shuffle(ids)
        cut = self.fault_rng.randrange(1, len(ids))
        self._block_between(ids[:cut], ids[cut:])
        self.count("fault:partition")

    def fault_one_way(self) -> None:
        a, b = self.fault_rng.sample(self.ids, 2)
        self.blocked.add((a, b))
        self.count("fault:one-way")

    def fault_isolate(self) -> None:
        a = self.fault_rng.choice(self.ids)
        self._block_between([a], [x for x in self.ids if x != a])
        self.count("fault:isolate")

    def fault_bridge(self) -> None:
        # Two halves that only one node can hear both sides of (OpenRaft #2080).
        ids = self.ids[:]
        self.fault_rng.shuffle(ids)
        bridge, rest = ids[0], ids[1:]
        cut = max(1, len(rest) // 2)
        self.blocked.clear()
        self._block_between(rest[:cut], rest[cut:])
        self.note("bridge", bridge)
        self.count("fault:bridge")

    def fault_crash(self) -> None:
        up = [n for n in self.nodes.values() if n.core is not None]
        if not up:
            return
        node = self.fault_rng.choice(up)
        self.crash(node)
        self.at(self.fault_rng.uniform(20, self.opts.restart_max_ms), "restart", node.id)

    def leader(self) -> SimNode | None:
        leaders = [n for n in self.nodes.values() if n.core and n.core.role is Role.LEADER]
        if not leaders:
            return None
        return max(leaders, key=lambda n: n.core.term if n.core else 0)

    def fault_membership(self) -> None:
        node = self.leader()
        if node is None or node.core is None:
            return
        conf = node.core.conf()
        outsiders = [i for i in self.ids if not conf.is_member(i)]
        choices: list[ConfChange] = [ConfChange(ConfChangeOp.ADD_LEARNER, i) for i in outsiders]
        choices += [ConfChange(ConfChangeOp.PROMOTE, i) for i in conf.learners]
        choices += [ConfChange(ConfChangeOp.REMOVE, i) for i in conf.learners]
        if len(conf.voters) > 3:
            choices += [ConfChange(ConfChangeOp.REMOVE, i) for i in conf.voters if i != node.id]
        if not choices:
            return
        change = self.fault_rng.choice(choices)
        try:
            node.core.propose_conf_change(change)
            self.note("conf", node.id, change.op.name, change.node)
            self.count(f"conf:{change.op.name.lower()}")
        except RaftError:
            self.count("conf:refused")
        self.after_input(node)

    def fault_transfer(self) -> None:
        node = self.leader()
        if node is None or node.core is None:
            return
        others = [v for v in node.core.conf().voters if v != node.id]
        if not others:
            return
        target = self.fault_rng.choice(others)
        try:
            node.core.transfer_leader(target)
            self.note("transfer", node.id, target)
            self.count("fault:transfer")
        except RaftError:
            pass
        self.after_input(node)

    def heal(self) -> None:
        self.faulting = False
        self.blocked.clear()
        self.drop = self.duplicate = 0.0
        for node in self.nodes.values():
            if node.core is None:
                self.start(node)
        self.note("heal")

    # ---- liveness

    def live(self) -> bool:
        """One leader that every voter follows, and a post-heal proposal committed."""
        leader = self.leader()
        if leader is None or leader.core is None or self.heal_proposal is None:
            return False
        core = leader.core
        _, index, term = self.heal_proposal
        if len(self.checker.committed) < index or self.checker.committed[index - 1][0] != term:
            if core.log.term(index) != term:
                self.heal_proposal = None  # the leader lacks it: lost, propose again
            return False
        voters = core.conf().voters
        applied = 0
        for voter in voters:
            other = self.nodes[voter].core
            if other is None or other.lead != leader.id or other.term != core.term:
                return False
            applied += self.nodes[voter].sm.applied >= index
        # A majority suffices: a voter that was down for long may still be catching up
        # one entry per round trip, which is throughput, not liveness.
        return applied > len(voters) // 2

    # ---- the loop

    def tick(self, payload: tuple[NodeId, int]) -> None:
        node = self.nodes[payload[0]]
        if node.core is None or node.incarnation != payload[1]:
            return
        self.at(self.opts.tick_ms, "tick", payload)
        node.core.tick()
        self.after_input(node)

    def run(self) -> None:
        for node in self.nodes.values():
            self.start(node)
        self.at(0, "client")
        self.at(self.opts.fault_interval_ms, "fault")
        self.at(self.opts.safety_ms, "heal")
        deadline = self.opts.safety_ms + self.opts.liveness_budget_ms
        while self._heap:
            self.now, _, kind, payload = heapq.heappop(self._heap)
            if self.now > deadline:
                raise Violation(
                    "liveness",
                    f"no stable leader with a new commit {self.opts.liveness_budget_ms} ms "
                    "after the faults healed",
                )
            self.events += 1
            self.dispatch(kind, payload)
            if self.events % 256 == 0:
                self.checker.log_matching(self.cores())
            if not self.faulting and kind == "persisted" and self.live():
                self.stats["liveness-ms"] = int(self.now - self.opts.safety_ms)
                break
        self.checker.log_matching(self.cores())

    def dispatch(self, kind: str, payload: Any) -> None:
        if kind == "deliver":
            self.deliver(payload)
        elif kind == "tick":
            self.tick(payload)
        elif kind == "persisted":
            node = self.nodes[payload[0]]
            if node.core is not None and node.incarnation == payload[1]:
                self.persisted(node)
                self.after_input(node)
        elif kind == "client":
            self.client()
        elif kind == "fault":
            self.fault()
        elif kind == "restart":
            node = self.nodes[payload]
            if node.core is None:
                self.start(node)
        elif kind == "crash":
            node = self.nodes[payload[0]]
            if node.core is not None and node.incarnation == payload[1] and self.faulting:
                self.crash(node)
                self.at(self.fault_rng.uniform(20, self.opts.restart_max_ms), "restart", node.id)
        elif kind == "isolate" and self.faulting:
            self._block_between([payload], [x for x in self.ids if x != payload])
            self.at(self.fault_rng.uniform(50, 400), "rejoin", payload)
            self.count("fault:isolate-leader")
        elif kind in ("rejoin", "isolate"):
            self.blocked = {(a, b) for a, b in self.blocked if payload not in (a, b)}
        elif kind == "heal":
            self.heal()
        else:
            raise AssertionError(kind)

    def digest(self) -> str:
        return hashlib.sha256(repr(self.trace).encode()).hexdigest()[:16]


def default_factory(cfg: Config, rng: random.Random, init: InitialState, source: Any) -> Raft:
    return Raft(cfg, rng, init, source)


def run_seed(
    seed: int,
    opts: SimOptions | None = None,
    factory: CoreFactory = default_factory,
    trace: bool = False,
) -> SimResult:
    world = World(seed, opts or SimOptions.for_seed(seed), factory, trace)
    try:
        world.run()
    except Exception as exc:  # an assertion inside the core is a failure of the run too
        what = str(exc) if isinstance(exc, Violation) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Violation):
            what += "\n" + "".join(traceback.format_exception(exc)[-6:])
        tail = [" ".join(map(str, t)) for t in world.trace[-60:]]
        result = SimResult(seed, False, what, world.digest(), world.events, world.stats, tail)
    else:
        result = SimResult(seed, True, "", world.digest(), world.events, world.stats)
    if trace:
        result.trace = [
            " ".join(map(str, t)) + (f"  {world.details[k]}" if k in world.details else "")
            for k, t in enumerate(world.trace)
        ]
    return result
