"""The Raft consensus core: a deterministic state machine with no I/O.

Inputs are `tick()`, `step(message)`, `propose(data)`, `read_index(ctx)`,
`propose_conf_change(change)`, `transfer_leader(node)` and `snapshot_taken(meta)`;
the output is a `Ready` batch (see raft.types.Ready for the runtime's contract).
Randomness comes only from the injected RNG, time only from ticks, so a run is
reproducible from its inputs.

Departures from the paper are listed in docs/raft-divergences.md.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from raft import codec, quorum
from raft.log import RaftLog
from raft.progress import Progress, ProgressState
from raft.types import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    Message,
    NodeId,
    Persisted,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteResponse,
    SnapshotChunk,
    SnapshotMeta,
    TimeoutNow,
)

_log = logging.getLogger(__name__)  # not self.log, the Raft log


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class RaftError(Exception):
    """Base of the errors the core reports to its caller."""


class LogLost(RaftError):
    """The leader knows this node held entries its log no longer has: they were lost
    after it acknowledged them (a data_dir restored from a backup, wiped, or rolled
    back). Counted in commits and votes it cannot stand behind, it must stop; etcd
    stops the same way ("Was the raft log corrupted, truncated, or lost?")."""


class NotLeader(RaftError):
    def __init__(self, leader: NodeId | None) -> None:
        super().__init__(f"not the leader; leader is {leader or 'unknown'}")
        self.leader = leader


class TransferInProgress(RaftError):
    """Proposals are refused while leadership is being handed over."""


class ConfChangeRefused(RaftError):
    """A membership change that would be unsafe now, or makes no sense."""


@dataclass(frozen=True, slots=True)
class Config:
    id: NodeId
    election_ticks: int = 10  # a follower campaigns after [election_ticks, 2*election_ticks)
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 256
    max_bytes_per_msg: int = 1 << 20
    max_inflight_msgs: int = 64
    snapshot_chunk_bytes: int = 1 << 20
    # Ask for a snapshot after `snapshot_entries` applied entries, once their bytes are
    # also `snapshot_growth` times the last snapshot's size, or after `snapshot_bytes`
    # applied bytes or `snapshot_entries_max` entries in any case. A snapshot encodes
    # the whole state: with an hour of tombstones at 500 msg/s that is ~100 MB and 2 s
    # of CPU, and by entries alone it came every 15 s, a cost that grew with the square
    # of the rate. Tied to the log's growth, snapshots write at most about as many
    # bytes as the log itself. The entry cap bounds the log's objects in memory and
    # its replay at start while small entries (a queue draining) add few bytes.
    snapshot_entries: int = 10_000
    snapshot_growth: float = 1.0
    snapshot_bytes: int = 64 << 20
    snapshot_entries_max: int = 100_000
    compaction_trailing: int = 1_000  # entries kept behind a snapshot for slow followers...
    # ...and at most this many of their bytes: 1,000 entries of 24 MiB messages stayed in
    # memory, and twenty such messages at once had a node killed for want of memory.
    compaction_trailing_bytes: int = 64 << 20
    promotion_max_lag: int = 100  # a learner is promoted only this close to the commit

    def __post_init__(self) -> None:
        assert 0 < self.heartbeat_ticks < self.election_ticks
        assert self.max_entries_per_msg > 0 and self.max_inflight_msgs > 0
        assert self.snapshot_chunk_bytes > 0 and self.snapshot_growth >= 0
        assert self.snapshot_entries <= self.snapshot_entries_max


@dataclass(frozen=True, slots=True)
class InitialState:
    """What a node recovered from its storage (all empty on a first start)."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: SnapshotMeta | None = None
    entries: tuple[Entry, ...] = ()  # the stored entries after the snapshot
    # the initial configuration, used when no snapshot carries one
    bootstrap: ConfState = field(default_factory=ConfState)


class SnapshotSource(Protocol):
    """Reads bytes of the local snapshot, so that the leader can send it in chunks."""

    def read_snapshot(self, meta: SnapshotMeta, offset: int, length: int) -> bytes: ...


@dataclass(slots=True)
class _PendingRead:
    context: bytes
    index: int
    requester: NodeId
    acks: dict[NodeId, bool] = field(default_factory=dict)


@dataclass(slots=True)
class _IncomingSnapshot:
    meta: SnapshotMeta
    next_offset: int = 0


class Raft:
    """One node's consensus state. Not thread-safe; drive it from one task."""

    def __init__(
        self, cfg: Config, rng: random.Random, init: InitialState, source: SnapshotSource
    ) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self._rng = rng
        self._source = source
        snap = init.snapshot
        if snap is not None:
            self.log = RaftLog(snap.index, snap.term, snap.conf)
        else:
            self.log = RaftLog(0, 0, init.bootstrap)
        self.log.append([e for e in init.entries if e.index > self.log.offset])
        self.log.persisted = self.log.handed = self.log.last_index()
        self.log.commit_to(min(init.hard_state.commit, self.log.last_index()))
        self.snapshot = snap
        self.term = init.hard_state.term
        self.vote = init.hard_state.vote
        self.lead: NodeId | None = None
        self.campaigns = 0  # elections (pre-votes included) this node started: for metrics
        self.role = Role.FOLLOWER
        self.prs: dict[NodeId, Progress] = {}
        self.votes: dict[NodeId, bool] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = cfg.election_ticks
        self.lead_transferee: NodeId | None = None
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_reads: list[_PendingRead] = []
        self._deferred_reads: list[tuple[bytes, NodeId]] = []
        self._incoming: _IncomingSnapshot | None = None
        self._chunks: list[SnapshotChunk] = []
        self._install: SnapshotMeta | None = None
        self._need_bcast = False
        self._applied_bytes = 0
        self._prev_hs = init.hard_state
        # Early commit notices (Persisted). A leader: for each follower that asked, the
        # newest of its proposals not yet durable here. A follower: how far its log is
        # known to be the leader's in this term, and how far the leader said its own is
        # durable.
        self._notify: dict[NodeId, int] = {}
        # A leader: followers waiting on a proposal they forwarded, and its index.
        self._await_commit: dict[NodeId, int] = {}
        self._told = 0  # the newest index a Persisted sent in this term named
        self._leader_match = 0
        self._leader_persisted = 0
        self._become_follower(self.term, None)

    # ================================================================ queries

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def conf(self) -> ConfState:
        """The configuration in force: the newest one in the log, committed or not."""
        return self.log.latest_conf()

    def promotable(self) -> bool:
        return self.conf().is_voter(self.id)

    def snapshot_meta(self, index: int, size: int) -> SnapshotMeta | None:
        """The meta for a snapshot of the state machine at `index` (its applied index),
        or None if a snapshot received from the leader has already superseded it."""
        assert index <= self.log.applied, (index, self.log.applied)
        if self.snapshot is not None and index <= self.snapshot.index:
            return None
        term = self.log.term(index)
        assert term is not None
        return SnapshotMeta(index, term, self.log.conf_at(index), size)

    # ================================================================ inputs

    def tick(self) -> None:
        self.election_elapsed += 1
        if self.role is Role.LEADER:
            self._tick_leader()
        elif self.election_elapsed >= self.randomized_timeout and self.promotable():
            self.campaign()

    def campaign(self, transfer: bool = False) -> None:
        """Start an election (pre-vote first unless this answers a TimeoutNow)."""
        if not self.promotable():
            return
        self.campaigns += 1
        if self.cfg.pre_vote and not transfer:
            self._become_pre_candidate()
            self._request_votes(self.term + 1, pre_vote=True, transfer=False)
        else:
            self._become_candidate()
            self._request_votes(self.term, pre_vote=False, transfer=transfer)

    def propose(
        self, data: bytes, notify: Iterable[NodeId] = (), waiting: Iterable[NodeId] = ()
    ) -> tuple[int, int]:
        """Append `data` to the log. Returns (index, term): it is committed when the entry
        applied at `index` has `term`. Raises NotLeader or TransferInProgress.

        `notify`: followers (those that forwarded the proposal) to send a Persisted once
        this node's log holds it durably, so that they count its commit themselves.
        `waiting`: every follower that forwarded it. One that cannot count its commit
        itself is told of the commit at once, not up to a tick later (_announce_commit)."""
        index, term = self._propose_entry(EntryKind.NORMAL, data, self._prompt_for(waiting))
        notify = set(notify)
        for node in notify:
            if node != self.id and node in self.prs:
                self._notify[node] = index
        # {leader, follower} is a majority only of two or three voters.
        counts = len(self.conf().voters) <= 3
        for node in waiting:
            if node != self.id and node in self.prs and not (counts and node in notify):
                self._await_commit[node] = index
        return index, term

    def propose_conf_change(self, change: ConfChange) -> tuple[int, int]:
        """Propose a single-server membership change; it takes effect when appended."""
        return self._propose_entry(EntryKind.CONF, codec.encode_conf(self._next_conf(change)))

    def transfer_leader(self, target: NodeId) -> None:
        """Hand leadership to `target` once its log is up to date (TimeoutNow)."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if target in (self.id, self.lead_transferee):
            return
        if not self.conf().is_voter(target):
            raise ConfChangeRefused(f"{target} is not a voter")
        self.lead_transferee = target
        self.election_elapsed = 0  # the transfer is abandoned after one election timeout
        if self.prs[target].match == self.log.last_index():
            self._send(TimeoutNow(self.id, target, self.term))
        else:
            self._send_append(target)

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point; the answer comes as a ReadState in a Ready.
        `context` must be unique across the cluster."""
        if self.role is Role.LEADER:
            self._leader_read(context, self.id)
        elif self.lead is not None:
            self._send(ReadIndexRequest(self.id, self.lead, self.term, context))
        else:
            raise NotLeader(None)

    def snapshot_taken(self, meta: SnapshotMeta) -> None:
        """The runtime has durably stored a snapshot at `meta`: compact the log behind it."""
        assert meta.index <= self.log.applied, (meta.index, self.log.applied)
        assert self.log.term(meta.index) == meta.term
        assert self.log.conf_at(meta.index) == meta.conf
        if self.snapshot is not None and meta.index <= self.snapshot.index:
            return
        self.snapshot = meta
        self._applied_bytes = 0
        keep_from = self._trailing_from(meta.index)
        keep_term = self.log.term(keep_from)
        assert keep_term is not None
        self.log.compact(keep_from, keep_term)
        for pr in self.prs.values():
            if pr.state is ProgressState.SNAPSHOT:
                pr.become_snapshot(meta)  # the old snapshot may be gone: start again

    def _trailing_from(self, index: int) -> int:
        """The new log offset behind a snapshot at `index`: up to compaction_trailing
        entries stay, for a follower a little behind, within compaction_trailing_bytes."""
        lowest = max(self.log.offset, index - self.cfg.compaction_trailing)
        keep_from, kept = index, 0
        while keep_from > lowest:
            size = len(self.log.entry(keep_from).data)
            if kept + size > self.cfg.compaction_trailing_bytes:
                break
            kept += size
            keep_from -= 1
        return keep_from

    def step(self, m: Message) -> None:
        if m.term > self.term:
            if not self._step_higher_term(m):
                return
        elif m.term < self.term:
            self._step_lower_term(m)
            return
        if isinstance(m, RequestVote):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # ================================================================ output

    def has_ready(self) -> bool:
        return bool(
            self._need_bcast
            or self._msgs
            or self._read_states
            or self._chunks
            or self._install is not None
            or self.log.handed < self.log.last_index()
            or self._apply_limit() > self.log.applied
            or self._persisted_hard_state() != self._prev_hs
        )

    def ready(self) -> Ready:
        if self._need_bcast:
            self._bcast_append()
        rd = Ready()
        hs = self._persisted_hard_state()
        if hs != self._prev_hs:
            prev = self._prev_hs
            rd.term_or_vote_changed = (hs.term, hs.vote) != (prev.term, prev.vote)
            rd.hard_state = self._prev_hs = hs
        rd.entries = self.log.slice(self.log.handed + 1, self.log.last_index() + 1)
        self.log.handed = self.log.last_index()
        rd.snapshot_chunks, self._chunks = self._chunks, []
        rd.snapshot, self._install = self._install, None
        rd.messages, self._msgs = self._msgs, []
        hi = self._apply_limit()
        if hi > self.log.applied:
            rd.committed_entries = self.log.slice(self.log.applied + 1, hi + 1)
            self.log.applied = hi
            self._applied_bytes += sum(len(e.data) for e in rd.committed_entries)
        rd.read_states, self._read_states = self._read_states, []
        rd.snapshot_due = self.snapshot_due()
        return rd

    def snapshot_due(self) -> bool:
        """Whether the log has grown enough since the last snapshot to cut another."""
        last = self.snapshot
        since = self.log.applied - (last.index if last else 0)
        if self._applied_bytes >= self.cfg.snapshot_bytes or since >= self.cfg.snapshot_entries_max:
            return True
        weight = last.size * self.cfg.snapshot_growth if last else 0
        return since >= self.cfg.snapshot_entries and self._applied_bytes >= weight

    def advance(self, rd: Ready) -> None:
        """The runtime has persisted and sent everything in `rd` (it may apply the
        committed entries after)."""
        if rd.entries:
            last = rd.entries[-1]
            if self.log.term(last.index) == last.term:
                self.log.persisted = max(self.log.persisted, last.index)
        if self.role is Role.LEADER:
            if self._maybe_commit():
                self._announce_commit()
            self._send_persisted()
        else:
            self._count_commit()

    def take_notices(self) -> list[Persisted]:
        """The Persisted messages waiting for the next Ready, for a runtime that sends
        them at once: they speak of writes already done. Every other message stays."""
        notices = [m for m in self._msgs if isinstance(m, Persisted)]
        if notices:
            self._msgs = [m for m in self._msgs if not isinstance(m, Persisted)]
        return notices

    def _send_persisted(self) -> None:
        durable = self.log.persisted
        for node, index in list(self._notify.items()):
            if index <= durable:
                del self._notify[node]
                self._send(Persisted(self.id, node, self.term, durable))
                self._told = durable

    def _count_commit(self) -> None:
        """A follower counts the commit itself once the leader said its log is durable
        (Persisted): the leader's copy and its own are a majority of three, and the
        leader's word of the commit would take another round trip. The same rule as the
        leader's (§5.4.2: an entry of this term, durable on a majority), counted only
        over the part of this log known to be the leader's, in the configuration of that
        part. A leader's newer configuration, not here yet, is at most one
        single-server change away: any majority of it meets this one."""
        if self.role is not Role.FOLLOWER or self.lead is None or not self._leader_persisted:
            return
        known = self._leader_match
        durable = {
            self.id: min(self._own_durable(), known),
            self.lead: min(self._leader_persisted, known),
        }
        index = quorum.committed_index(self.log.conf_at(known).voters, lambda v: durable.get(v, 0))
        if index > self.log.committed and self._can_commit(index):
            self.log.commit_to(index)

    # Overridable seams. Tests subclass these to inject the bugs the simulator must
    # catch; production code never overrides them.

    def _persisted_hard_state(self) -> HardState:
        return self.hard_state()

    def _apply_limit(self) -> int:
        """Entries up to here may be applied: committed and handed to storage."""
        return min(self.log.committed, self.log.handed)

    def _can_commit(self, index: int) -> bool:
        """Raft §5.4.2: only an entry of the leader's own term is committed by counting."""
        return self.log.term(index) == self.term

    def _own_durable(self) -> int:
        """How far this node's log is on disk, for a follower counting a commit."""
        return self.log.persisted

    def _vote_log_ok(self, m: RequestVote) -> bool:
        return self.log.is_up_to_date(m.last_index, m.last_term)

    # ================================================================ roles

    def _reset(self, term: int) -> None:
        if term != self.term:
            # The vote is cleared only when the term changes (etcd PR #2461): clearing it
            # within a term lets a node vote twice and elect two leaders.
            self.term = term
            self.vote = None
        self.lead = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = self.cfg.election_ticks + self._rng.randrange(
            self.cfg.election_ticks
        )
        self.lead_transferee = None
        self.votes = {}
        self.prs = {}
        self._pending_reads = []
        self._deferred_reads = []
        self._need_bcast = False
        # Up to which index each follower must be sent entries at once (see _due).
        self._prompt_all = 0
        self._prompt: dict[NodeId, int] = {}
        self._notify = {}
        self._await_commit = {}
        self._told = self._leader_match = self._leader_persisted = 0

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def _become_pre_candidate(self) -> None:
        # Neither the term nor the vote changes: a pre-vote disturbs nobody.
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE
        self.votes = {self.id: True}

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id
        self.votes = {self.id: True}

    def _become_leader(self) -> None:
        assert self.role is Role.CANDIDATE
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        # One line per leadership, in every node's log: the chaos checker reads these
        # to prove Election Safety (at most one leader per term) from the outside.
        _log.info("raft: %s became leader in term %d", self.id, self.term)
        self._sync_progress()
        # A no-op of the new term lets the leader commit what earlier terms left (§5.4.2).
        self.log.append([Entry(self.term, self.log.last_index() + 1, EntryKind.NOOP)])
        self._prompt_all = self.log.last_index()
        self._need_bcast = True

    def _sync_progress(self) -> None:
        members = self.conf().members()
        for node in members:
            if node != self.id and node not in self.prs:
                self.prs[node] = Progress(next=self.log.last_index() + 1)
        for node in [n for n in self.prs if n not in members]:
            del self.prs[node]

    def _request_votes(self, term: int, *, pre_vote: bool, transfer: bool) -> None:
        if self._tally() is quorum.VoteResult.WON:  # a single-voter cluster
            self._won_election(pre_vote)
            return
        for v in self.conf().voters:
            if v != self.id:
                self._send(
                    RequestVote(
                        self.id,
                        v,
                        term,
                        self.log.last_index(),
                        self.log.last_term(),
                        pre_vote=pre_vote,
                        transfer=transfer,
                    )
                )

    def _tally(self) -> quorum.VoteResult:
        return quorum.vote_result(self.conf().voters, self.votes)

    def _won_election(self, pre_vote: bool) -> None:
        if pre_vote:
            self._become_candidate()
            self._request_votes(self.term, pre_vote=False, transfer=False)
        else:
            self._become_leader()

    # ================================================================ term handling

    def _step_higher_term(self, m: Message) -> bool:
        """Returns False if the message is to be ignored."""
        if isinstance(m, RequestVote):
            in_lease = (
                self.cfg.check_quorum
                and self.lead is not None
                and self.election_elapsed < self.cfg.election_ticks
            )
            if in_lease and not m.transfer:
                return False  # we heard from a live leader: ignore a disruptive candidate
            if m.pre_vote:
                return True  # answer without adopting the term
            self._become_follower(m.term, None)
            return True
        if isinstance(m, RequestVoteResponse) and m.pre_vote and m.granted:
            return True  # a granted pre-vote carries the term we have not yet started
        if isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
            self._become_follower(m.term, m.frm)
        else:
            self._become_follower(m.term, None)
        return True

    def _step_lower_term(self, m: Message) -> None:
        if isinstance(m, AppendEntries | Heartbeat) and (
            self.cfg.check_quorum or self.cfg.pre_vote
        ):
            # A stale leader would otherwise never learn the newer term, and with
            # pre-vote nobody would ever raise it (canonical/raft #279).
            self._send(AppendEntriesResponse(self.id, m.frm, self.term, 0))
        elif isinstance(m, RequestVote) and m.pre_vote:
            self._send(RequestVoteResponse(self.id, m.frm, self.term, False, pre_vote=True))

    def _handle_vote_request(self, m: RequestVote) -> None:
        can_vote = (
            self.vote == m.frm
            or (self.vote is None and self.lead is None)
            or (m.pre_vote and m.term > self.term)
        )
        # Learners and removed nodes answer too: the candidate may know of a promotion
        # that has not reached them yet (etcd PR #10998).
        if can_vote and self._vote_log_ok(m):
            self._send(RequestVoteResponse(self.id, m.frm, m.term, True, pre_vote=m.pre_vote))
            if not m.pre_vote:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(RequestVoteResponse(self.id, m.frm, self.term, False, pre_vote=m.pre_vote))

    # ================================================================ candidate

    def _step_candidate(self, m: Message) -> None:
        if isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif isinstance(m, RequestVoteResponse):
            if m.pre_vote != (self.role is Role.PRE_CANDIDATE):
                return  # an answer to an earlier round
            if self.conf().is_voter(m.frm):
                self.votes[m.frm] = m.granted
            result = self._tally()
            if result is quorum.VoteResult.WON:
                self._won_election(m.pre_vote)
            elif result is quorum.VoteResult.LOST:
                self._become_follower(self.term, None)

    # ================================================================ follower

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, AppendEntries):
            self._heard_from_leader(m.frm)
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            self._heard_from_leader(m.frm)
            if m.commit > self.log.last_index():
                # A heartbeat's commit never exceeds what this node acknowledged holding.
                raise LogLost(
                    f"leader {m.frm} knows {self.id} held the log up to index {m.commit}, "
                    f"but it ends at {self.log.last_index()}: entries it acknowledged are "
                    "gone (a data_dir restored from a backup, wiped, or rolled back?)"
                )
            self.log.commit_to(m.commit)
            self._send(HeartbeatResponse(self.id, m.frm, self.term, m.context))
        elif isinstance(m, InstallSnapshot):
            self._heard_from_leader(m.frm)
            self._handle_snapshot_chunk(m)
        elif isinstance(m, TimeoutNow):
            self.campaign(transfer=True)
        elif isinstance(m, ReadIndexResponse):
            self._read_states.append(ReadState(m.context, m.index))
        elif isinstance(m, Persisted) and m.frm == self.lead:
            self._leader_persisted = max(self._leader_persisted, m.index)
            self._count_commit()

    def _heard_from_leader(self, leader: NodeId) -> None:
        self.election_elapsed = 0
        self.lead = leader

    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_index < self.log.committed:
            self._send(AppendEntriesResponse(self.id, m.frm, self.term, self.log.committed))
            return
        last = self.log.maybe_append(m.prev_index, m.prev_term, m.entries)
        if last is not None:
            self._leader_match = max(self._leader_match, last)
            self.log.commit_to(min(m.commit, last))
            self._send(AppendEntriesResponse(self.id, m.frm, self.term, last))
            return
        hint, hint_term = self.log.find_conflict_by_term(
            min(m.prev_index, self.log.last_index()), m.prev_term
        )
        self._send(
            AppendEntriesResponse(
                self.id,
                m.frm,
                self.term,
                m.prev_index,
                reject=True,
                hint_index=hint,
                hint_term=hint_term,
            )
        )

    def _handle_snapshot_chunk(self, m: InstallSnapshot) -> None:
        def reply(next_offset: int, done: bool = False) -> None:
            self._send(
                InstallSnapshotResponse(self.id, m.frm, self.term, m.meta.index, next_offset, done)
            )

        if m.meta.index <= self.log.committed:
            self._incoming = None
            reply(0, done=True)  # we already have all of it
            return
        if self._incoming is None or self._incoming.meta != m.meta:
            self._incoming = _IncomingSnapshot(m.meta)
        inc = self._incoming
        if m.offset != inc.next_offset:
            reply(inc.next_offset)
            return
        self._chunks.append(SnapshotChunk(m.meta, m.offset, m.data, m.done))
        inc.next_offset += len(m.data)
        if not m.done:
            reply(inc.next_offset)
            return
        self.log.restore(m.meta)
        self.snapshot = m.meta
        self._install = m.meta
        self._incoming = None
        self._applied_bytes = 0
        reply(inc.next_offset, done=True)

    # ================================================================ leader

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat(b"")
        self._tell_commit()
        if self.election_elapsed < self.cfg.election_ticks:
            return
        self.election_elapsed = 0
        if self.cfg.check_quorum:
            voters = self.conf().voters
            active = quorum.has_quorum(
                voters, lambda v: v == self.id or (v in self.prs and self.prs[v].recent_active)
            )
            for pr in self.prs.values():
                pr.recent_active = False
            if not active:
                self._become_follower(self.term, None)
                return
        self.lead_transferee = None  # a transfer that did not finish in time is abandoned

    def _step_leader(self, m: Message) -> None:
        if isinstance(m, ReadIndexRequest):
            self._leader_read(m.context, m.frm)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if isinstance(m, AppendEntriesResponse):
            self._handle_append_response(m, pr)
        elif isinstance(m, HeartbeatResponse):
            pr.probe_sent = False
            if pr.state is ProgressState.REPLICATE and pr.is_paused(self.cfg.max_inflight_msgs):
                pr.inflight.pop(0)  # appends may have been lost: let one more go (etcd)
            if pr.state is ProgressState.SNAPSHOT:
                self._send_snapshot_chunk(m.frm, pr)
            elif pr.match < self.log.last_index():
                self._send_append(m.frm)
            if m.context:
                self._ack_read(m.context, m.frm)
        elif isinstance(m, InstallSnapshotResponse):
            self._handle_snapshot_response(m, pr)

    def _handle_append_response(self, m: AppendEntriesResponse, pr: Progress) -> None:
        if m.reject:
            probe_from = m.hint_index
            if m.hint_term > 0:
                probe_from, _ = self.log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decrease(m.index, probe_from):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.snapshot and pr.match >= pr.snapshot.index:
            pr.become_probe()
        if self._maybe_commit():
            self._announce_commit()
        else:
            while self._due(m.frm) and self._send_append(m.frm, send_empty=False):
                pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(TimeoutNow(self.id, m.frm, self.term))

    def _handle_snapshot_response(self, m: InstallSnapshotResponse, pr: Progress) -> None:
        if pr.state is not ProgressState.SNAPSHOT or pr.snapshot is None:
            return
        if m.meta_index != pr.snapshot.index:
            return
        if m.done:
            pr.maybe_update(m.meta_index)
            pr.become_probe()
            self._send_append(m.frm)
        else:
            pr.snapshot_offset = m.next_offset
            self._send_snapshot_chunk(m.frm, pr)

    def _maybe_commit(self) -> bool:
        def match(v: NodeId) -> int:
            if v == self.id:
                return self.log.persisted
            pr = self.prs.get(v)
            return pr.match if pr else 0

        index = quorum.committed_index(self.conf().voters, match)
        if index <= self.log.committed or not self._can_commit(index):
            return False
        was_current = self.log.term(self.log.committed) == self.term
        self.log.commit_to(index)
        if not was_current and self.log.term(self.log.committed) == self.term:
            deferred, self._deferred_reads = self._deferred_reads, []
            for context, requester in deferred:
                self._leader_read(context, requester)
        return True

    def _prompt_for(self, forwarders: Iterable[NodeId]) -> list[NodeId] | None:
        """The followers to send a forwarded entry at once: those that forwarded it
        (they wait on it), and as many more voters as a majority needs, the most up to
        date first. The rest get it with the next entries sent to them, or within a
        tick (_tell_commit). Sent at once to all, each entry was an AppendEntries, a
        write, an fsync and an answer on a node that had not asked for it: in the relay,
        a tenth of the cluster's CPU per message (docs/benchmarks.md, fifteenth
        session). None: everyone at once (the leader's own entries, as the paper has it)."""
        waiting = [n for n in forwarders if n != self.id and n in self.prs]
        if not waiting:
            return None
        voters = self.conf().voters
        need = len(voters) // 2 + 1 - (self.id in voters) - sum(n in voters for n in waiting)
        others = sorted(
            (n for n in voters if n != self.id and n in self.prs and n not in waiting),
            key=lambda n: (not self.prs[n].recent_active, -self.prs[n].match, n),
        )
        return waiting + others[: max(need, 0)]

    def _due(self, to: NodeId) -> bool:
        """Whether `to` is sent the entries it lacks now, rather than within a tick: it
        must have one of them at once (_prompt_for), or it is catching up (probing,
        installing a snapshot, far behind, or the target of a leadership transfer)."""
        pr = self.prs[to]
        return (
            pr.state is not ProgressState.REPLICATE
            or to == self.lead_transferee
            or self.log.last_index() - pr.match > self.cfg.max_entries_per_msg
            or pr.next <= max(self._prompt_all, self._prompt.get(to, 0))
        )

    def _propose_entry(
        self, kind: EntryKind, data: bytes, prompt: list[NodeId] | None = None
    ) -> tuple[int, int]:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee is not None:
            raise TransferInProgress(f"leadership is moving to {self.lead_transferee}")
        entry = Entry(self.term, self.log.last_index() + 1, kind, data)
        self.log.append([entry])
        if prompt is None:
            self._prompt_all = entry.index
        for node in prompt or ():
            self._prompt[node] = entry.index
        if kind is EntryKind.CONF:
            self._sync_progress()
        self._need_bcast = True
        return entry.index, entry.term

    def _next_conf(self, change: ConfChange) -> ConfState:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.log.latest_conf_index() > self.log.committed:
            raise ConfChangeRefused("another membership change is still in flight")
        if self.log.term(self.log.committed) != self.term:
            # A new leader must commit in its own term first (raft-dev 2015, braft #182).
            raise ConfChangeRefused("leader has not committed an entry of its term yet")
        conf, node = self.conf(), change.node
        voters, learners = set(conf.voters), set(conf.learners)
        if change.op is ConfChangeOp.ADD_LEARNER:
            if conf.is_member(node):
                raise ConfChangeRefused(f"{node} is already a member")
            learners.add(node)
        elif change.op is ConfChangeOp.PROMOTE:
            if node not in learners:
                raise ConfChangeRefused(f"{node} is not a learner")
            pr = self.prs.get(node)
            if pr is None or pr.match + self.cfg.promotion_max_lag < self.log.committed:
                raise ConfChangeRefused(f"{node} has not caught up yet")
            learners.discard(node)
            voters.add(node)
        else:
            if not conf.is_member(node):
                raise ConfChangeRefused(f"{node} is not a member")
            if node == self.id:
                raise ConfChangeRefused("the leader cannot remove itself: transfer first")
            voters.discard(node)
            learners.discard(node)
        return ConfState(tuple(sorted(voters)), tuple(sorted(learners)))

    # ---- sending

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _bcast_append(self) -> None:
        self._need_bcast = False
        for node in self.prs:
            if self._due(node):
                self._send_append(node)

    def _announce_commit(self) -> None:
        """A new commit index reaches followers with the next entries sent to them. An
        AppendEntries for the commit alone, and the answer to it, were 4 of the 11
        frames per accepted message in the relay. It goes at once only to a follower
        waiting on a proposal it forwarded and unable to count the commit itself; the
        others hear within a tick (_tell_commit) if no entries came first, and so does a
        waiting one whose progress is paused now."""
        for node in self.prs:
            want = self._await_commit.get(node)
            due = want is not None and want <= self.log.committed
            if due:
                del self._await_commit[node]
            if due or self._due(node):
                self._send_append(node, send_empty=due)

    def _tell_commit(self) -> None:
        """Each tick: a follower that has entries it does not know are committed hears
        of it now (its apply, its reads and its deliveries wait on it), and one that
        lacks entries not sent to it at once (_due) gets them."""
        for node, pr in self.prs.items():
            if (
                pr.told_commit < min(pr.match, self.log.committed)
                or pr.next <= self.log.last_index()
            ):
                self._send_append(node)

    def _bcast_heartbeat(self, context: bytes) -> None:
        for node, pr in self.prs.items():
            commit = min(pr.match, self.log.committed)
            self._send(Heartbeat(self.id, node, self.term, commit, context))
            pr.told_commit = max(pr.told_commit, commit)

    def _send_append(self, to: NodeId, send_empty: bool = True) -> bool:
        """Send what `to` needs next. Returns True if entries (or a chunk) were sent."""
        pr = self.prs[to]
        if pr.is_paused(self.cfg.max_inflight_msgs):
            return False
        prev_term = self.log.term(pr.next - 1)
        if prev_term is None:  # compacted away: only a snapshot can help
            assert self.snapshot is not None
            pr.become_snapshot(self.snapshot)
            self._send_snapshot_chunk(to, pr)
            return True
        hi = min(self.log.last_index() + 1, pr.next + self.cfg.max_entries_per_msg)
        entries = self.log.slice(pr.next, hi)
        size = 0
        for k, e in enumerate(entries):
            size += len(e.data)
            if k > 0 and size > self.cfg.max_bytes_per_msg:
                entries = entries[:k]
                break
        if not entries and not send_empty:
            return False
        msg = AppendEntries(
            self.id, to, self.term, pr.next - 1, prev_term, tuple(entries), self.log.committed
        )
        self._send(msg)
        pr.told_commit = self.log.committed
        if entries:
            pr.sent_entries(entries[-1].index)
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        return bool(entries)

    def _send_snapshot_chunk(self, to: NodeId, pr: Progress) -> None:
        meta = pr.snapshot
        assert meta is not None
        length = min(self.cfg.snapshot_chunk_bytes, meta.size - pr.snapshot_offset)
        data = self._source.read_snapshot(meta, pr.snapshot_offset, length)
        assert len(data) == length, (len(data), length)
        done = pr.snapshot_offset + length >= meta.size
        self._send(InstallSnapshot(self.id, to, self.term, meta, pr.snapshot_offset, data, done))

    # ---- ReadIndex (Raft thesis §6.4)

    def _leader_read(self, context: bytes, requester: NodeId) -> None:
        if self.log.term(self.log.committed) != self.term:
            # Until an entry of this term commits, our commit index may lag the cluster's.
            self._deferred_reads.append((context, requester))
            return
        # A follower may have counted a commit this leader has not heard of yet, up to
        # what it was told is durable here (Persisted): a read waits for that too.
        index = max(self.log.committed, self._told)
        read = _PendingRead(context, index, requester, {self.id: True})
        if quorum.has_quorum(self.conf().voters, read.acks.__contains__):
            self._answer_read(read)
            return
        self._pending_reads.append(read)
        self._bcast_heartbeat(context)

    def _ack_read(self, context: bytes, frm: NodeId) -> None:
        for k, read in enumerate(self._pending_reads):
            if read.context != context:
                continue
            read.acks[frm] = True
            if quorum.has_quorum(self.conf().voters, read.acks.__contains__):
                # A quorum confirmed leadership after this read arrived, and so after
                # every earlier one: all of them can be answered.
                for done in self._pending_reads[: k + 1]:
                    self._answer_read(done)
                del self._pending_reads[: k + 1]
            return

    def _answer_read(self, read: _PendingRead) -> None:
        if read.requester == self.id:
            self._read_states.append(ReadState(read.context, read.index))
        else:
            self._send(
                ReadIndexResponse(self.id, read.requester, self.term, read.context, read.index)
            )
