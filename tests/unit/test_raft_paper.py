"""Scenarios from the Raft paper (Ongaro & Ousterhout, 2014), section by section."""

from __future__ import annotations

import random
from typing import Any

import pytest

from raft.core import (
    ConfChangeRefused,
    InitialState,
    LogLost,
    NotLeader,
    Raft,
    Role,
    TransferInProgress,
)
from raft.types import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    HardState,
    InstallSnapshot,
    Persisted,
    RequestVote,
    RequestVoteResponse,
)
from tests.sim.mutants import CommitsOldTermByCounting
from tests.unit.raftnet import MemNode, Net

PAPER: dict[str, Any] = {"pre_vote": False, "check_quorum": False}  # the paper's basic algorithm


def entries_with_terms(terms: list[int]) -> tuple[Entry, ...]:
    return tuple(Entry(t, i + 1, data=b"%d.%d" % (i + 1, t)) for i, t in enumerate(terms))


def net_with_logs(
    logs: dict[str, list[int]], term: int, *, core: type[Raft] = Raft, **cfg: Any
) -> Net:
    """A cluster whose nodes start from the given logs (lists of entry terms)."""
    net = Net([], **cfg)
    conf = ConfState(tuple(sorted(logs)), ())
    net.bootstrap = conf
    for nid, terms in logs.items():
        node = MemNode(nid, None)  # type: ignore[arg-type]
        node.entries = list(entries_with_terms(terms))
        node.hard_state = HardState(term, None, 0)
        init = InitialState(node.hard_state, None, tuple(node.entries), conf)
        node.core = core(net.config(nid), random.Random(nid), init, node)
        net.nodes[nid] = node
    return net


def log_terms(core: Raft) -> list[int]:
    return [
        core.log.entry(i).term for i in range(core.log.first_index(), core.log.last_index() + 1)
    ]


# ---------------------------------------------------------------- §5.2 leader election


def test_follower_times_out_and_requests_votes() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    net.tick("a", 2 * 10)  # the randomized timeout is below twice election_ticks
    a = net.core("a")
    assert a.role is Role.CANDIDATE and a.term == 1 and a.vote == "a"
    votes = [m for m in net.queue if isinstance(m, RequestVote)]
    assert sorted(m.to for m in votes) == ["b", "c"]
    assert all(m.term == 1 and not m.pre_vote for m in votes)


def test_candidate_wins_with_a_majority_and_sends_heartbeats() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    net.isolate("c")
    net.elect("a")
    assert net.core("b").lead == "a"
    net.heal()
    net.tick("a")
    net.stabilize()
    assert net.core("c").lead == "a" and net.core("c").term == 1


def test_candidate_without_majority_does_not_lead() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    net.isolate("a")
    net.campaign("a")
    net.stabilize()
    assert net.core("a").role is Role.CANDIDATE
    assert net.leaders() == []


def test_each_node_votes_at_most_once_per_term() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    b = net.core("b")
    b.step(RequestVote("a", "b", 1, 0, 0))
    b.step(RequestVote("c", "b", 1, 0, 0))
    net.persist("b")
    answers = {m.to: m.granted for m in net.queue if isinstance(m, RequestVoteResponse)}
    assert answers == {"a": True, "c": False}


def test_vote_survives_a_restart() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    net.core("b").step(RequestVote("a", "b", 1, 0, 0))
    net.persist("b")
    b = net.restart("b")
    net.queue.clear()
    b.step(RequestVote("c", "b", 1, 0, 0))
    net.persist("b")
    [answer] = [m for m in net.queue if isinstance(m, RequestVoteResponse)]
    assert answer.to == "c" and not answer.granted


def test_leader_steps_down_on_seeing_a_higher_term() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    a = net.elect("a")
    a.step(AppendEntriesResponse("b", "a", 5, 0))
    assert a.role is Role.FOLLOWER and a.term == 5


# ---------------------------------------------------------------- §5.4.1 election restriction


def test_vote_refused_to_a_candidate_with_a_stale_log() -> None:
    net = net_with_logs({"a": [1], "b": [1, 2], "c": [1, 2]}, term=2, **PAPER)
    net.campaign("a")
    net.stabilize()
    assert net.core("a").role is Role.FOLLOWER  # lost: a majority refused
    assert net.core("b").term == 3 and net.core("b").vote is None
    assert net.core("c").vote is None


# ---------------------------------------------------------------- §5.3 log replication


def test_entry_commits_on_a_majority_and_followers_apply_it() -> None:
    net = Net(["a", "b", "c"], **PAPER)
    net.elect("a")
    net.isolate("c")
    index, _ = net.propose("a", b"x")
    net.stabilize()
    assert net.core("a").log.committed == index
    assert b"x" in net.nodes["a"].values()
    net.tick("a")
    net.stabilize()
    assert b"x" in net.nodes["b"].values()
    assert b"x" not in net.nodes["c"].values()
    net.heal()
    net.tick("a")
    net.stabilize()
    assert net.nodes["c"].values() == [b"x"]


def test_follower_rejects_append_that_does_not_match_its_log() -> None:
    net = net_with_logs({"a": [1, 1], "b": [1]}, term=1, **PAPER)
    b = net.core("b")
    b.step(AppendEntries("a", "b", 2, 2, 1, (Entry(2, 3),), 0))
    net.persist("b")
    [resp] = net.queue
    assert isinstance(resp, AppendEntriesResponse) and resp.reject
    assert resp.hint_index == 1  # fast back-off: where our log ends
    assert b.log.last_index() == 1


@pytest.mark.parametrize(
    "follower",
    [
        [1, 1, 1, 4, 4, 5, 5, 6, 6],  # (a) missing entries
        [1, 1, 1, 4],  # (b)
        [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # (c) extra uncommitted entry
        [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # (d) extra entries of a later term
        [1, 1, 1, 4, 4, 4, 4],  # (e) missing and extra
        [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # (f) a whole run of other terms
    ],
    ids=list("abcdef"),
)
def test_figure_7_leader_brings_every_follower_log_in_line(follower: list[int]) -> None:
    leader = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
    # "v" has an empty log and votes for the leader, as in etcd's TestLeaderSyncFollowerLog.
    net = net_with_logs({"lead": leader, "f": follower, "v": []}, term=7, **PAPER)
    lead = net.elect("lead")
    assert lead.term == 8
    net.tick("lead")
    net.stabilize()
    assert log_terms(net.core("f")) == [*leader, 8]
    for i in range(1, 12):
        assert net.core("f").log.entry(i) == lead.log.entry(i)


# ---------------------------------------------------------------- a follower counts (Persisted)


def _b_forwards_x(voters: list[str], learners: tuple[str, ...] = ()) -> tuple[Net, Raft, int]:
    """`a` leads and durably appends x, which b forwarded. b's acknowledgements are lost
    and every other node is cut off: only b's own count can commit x on b."""
    net = Net(voters, learners=learners, **PAPER)
    a = net.elect("a")
    for nid in net.nodes:
        if nid not in ("a", "b"):
            net.isolate(nid)
    net.cut.add(("b", "a"))
    index, _ = a.propose(b"x", notify=["b"])
    net.persist("a")
    return net, a, index


def test_a_forwarding_follower_commits_on_the_leaders_word_and_its_own_copy() -> None:
    """Leader and follower both hold the entry durably: a majority of three. The
    follower counts that itself, before the leader has heard its acknowledgement."""
    net, a, index = _b_forwards_x(["a", "b", "c"])
    net.stabilize()
    assert a.log.committed < index
    assert net.core("b").log.committed == index and net.nodes["b"].values() == [b"x"]
    # A proposal nobody asked to be told of waits for the leader's word, as always.
    later, _ = a.propose(b"y")
    net.persist("a")
    net.stabilize()
    assert net.core("b").log.committed == index < later


def test_a_follower_counts_its_own_copy_only_once_it_is_durable() -> None:
    net, _, index = _b_forwards_x(["a", "b", "c"])
    b = net.core("b")
    for m in [m for m in net.queue if m.to == "b"]:
        b.step(m)  # the entry and the leader's word, before b's own write
    assert b.log.last_index() == index and b.log.persisted < index
    assert b.log.committed < index
    net.persist("b")  # the write, then the count
    assert b.log.committed == index and net.nodes["b"].values() == [b"x"]


def test_a_follower_counts_no_entry_of_an_earlier_term() -> None:
    """§5.4.2 holds for the follower's count too: index 2 (term 2) is on the leader and
    on this follower, but only the leader's no-op of term 3 may be committed by counting."""
    net = net_with_logs({"a": [1, 2], "b": [1, 2], "c": [1]}, term=2, **PAPER)
    a = net.campaign("a")
    while a.role is not Role.LEADER:
        assert net.deliver_one()
    net.cut.add(("b", "a"))  # b's acknowledgements are lost
    net.isolate("c")
    net.stabilize()  # b appends the no-op; the leader commits nothing
    b = net.core("b")
    assert b.lead == "a" and b.log.last_index() == 3 and b.log.committed == 0
    b.step(Persisted("a", "b", a.term, 2))
    net.persist("b")
    assert b.log.committed == 0
    b.step(Persisted("c", "b", a.term, 3))  # not the leader: not believed
    net.persist("b")
    assert b.log.committed == 0
    b.step(Persisted("a", "b", a.term, 3))
    net.persist("b")
    assert b.log.committed == 3 and a.log.committed == 0


def test_two_copies_are_not_a_majority_of_five() -> None:
    net, a, index = _b_forwards_x(["a", "b", "c", "d", "e"])
    net.stabilize()
    assert net.core("b").log.last_index() == index
    assert net.core("b").log.committed < index and a.log.committed < index


def test_a_learner_does_not_count_itself() -> None:
    net, _, index = _b_forwards_x(["a", "c"], learners=("b",))
    net.stabilize()
    assert net.core("b").log.last_index() == index and net.core("b").log.committed < index


# ------------------------------------------------------- the commit index reaches followers

QUIET = {**PAPER, "heartbeat_ticks": 5}  # a tick that is not also a heartbeat


def _commit_only_appends(net: Net, to: str) -> int:
    return sum(
        1 for m in net.queue if isinstance(m, AppendEntries) and m.to == to and not m.entries
    )


def test_a_commit_rides_on_the_next_entries_or_goes_within_a_tick() -> None:
    """No AppendEntries (and no answer to it) for a commit alone: followers hear of it
    with the next entries, or at the leader's next tick if none came."""
    net = Net(["a", "b", "c"], **QUIET)
    a = net.elect("a")
    net.tick("a", 5)  # the heartbeat that tells them the no-op committed
    net.stabilize()
    x, _ = net.propose("a", b"x")
    net.stabilize()
    assert a.log.committed == x
    assert net.core("b").log.committed < x and net.core("c").log.committed < x
    y, _ = net.propose("a", b"y")
    assert all(m.commit == x for m in net.queue if isinstance(m, AppendEntries))
    net.stabilize()
    assert net.core("b").log.committed == x and net.nodes["b"].values() == [b"x"]
    net.tick("a")
    assert _commit_only_appends(net, "b") == 1 and _commit_only_appends(net, "c") == 1
    net.stabilize()
    assert net.core("b").log.committed == net.core("c").log.committed == y
    net.tick("a")
    assert not net.queue  # told once: nothing more until something new commits


def test_a_follower_that_cannot_count_hears_of_its_proposals_commit_at_once() -> None:
    """b forwarded x and waits on it. An older release (no Persisted) cannot count the
    commit itself, nor can any follower of five voters: the leader tells b at once,
    and only b."""
    for voters, notify in ((["a", "b", "c"], ()), (["a", "b", "c", "d", "e"], ("b",))):
        net = Net(voters, **QUIET)
        a = net.elect("a")
        index, _ = a.propose(b"x", notify=notify, waiting=["b"])
        net.persist("a")
        net.stabilize()
        assert a.log.committed == index
        assert net.core("b").log.committed == index and net.nodes["b"].values() == [b"x"]
        assert net.core("c").log.committed < index


def test_a_follower_that_counts_is_not_sent_the_commit() -> None:
    net = Net(["a", "b", "c"], **QUIET)
    a = net.elect("a")
    net.tick("a", 5)
    net.stabilize()
    index, _ = a.propose(b"x", notify=["b"], waiting=["b"])
    net.persist("a")
    commit_only = 0
    while net.queue:
        commit_only += _commit_only_appends(net, "b")
        net.deliver_one()
    assert commit_only == 0
    assert net.core("b").log.committed == index  # by its own count (Persisted)
    assert net.core("c").log.committed < index


# ------------------------------------- entries go at once only where they are waited on


def _appends_to(net: Net, to: str) -> list[AppendEntries]:
    return [m for m in net.queue if isinstance(m, AppendEntries) and m.to == to and m.entries]


def _settled(voters: list[str]) -> tuple[Net, Raft]:
    net = Net(voters, **QUIET)
    a = net.elect("a")
    net.tick("a", 5)
    net.stabilize()
    return net, a


def test_a_forwarded_entry_goes_at_once_to_its_forwarder_and_to_the_rest_within_a_tick() -> None:
    """b forwarded x: the leader and b are a majority of three, so c, which nobody waits
    on, gets x with the next entries sent to it, or at the leader's next tick."""
    net, a = _settled(["a", "b", "c"])
    x, _ = a.propose(b"x", notify=["b"], waiting=["b"])
    net.persist("a")
    assert _appends_to(net, "b") and not _appends_to(net, "c")
    net.stabilize()
    assert a.log.committed == x and net.core("b").log.committed == x
    assert net.core("c").log.last_index() < x
    net.tick("a")
    assert _appends_to(net, "c")
    net.stabilize()
    assert net.core("c").log.last_index() == x
    # The leader's own entries go to everyone at once, as in the paper.
    net.propose("a", b"y")
    assert _appends_to(net, "b") and _appends_to(net, "c")


def test_a_forwarded_entry_goes_at_once_to_as_many_as_a_majority_needs() -> None:
    """Of five voters, the leader and b are two: one more follower gets x at once, the
    most up to date; the other two within a tick."""
    net, a = _settled(["a", "b", "c", "d", "e"])
    net.isolate("d")
    net.propose("a", b"d misses this")
    net.stabilize()
    net.heal()
    x, _ = a.propose(b"x", notify=["b"], waiting=["b"])
    net.persist("a")
    assert {m.to for m in net.queue if isinstance(m, AppendEntries) and m.entries} == {"b", "c"}
    net.stabilize()
    assert a.log.committed == x
    net.tick("a")
    net.stabilize()
    assert all(net.core(n).log.last_index() == x for n in "bcde")


def test_a_forwarded_entry_still_commits_when_its_forwarder_is_cut_off() -> None:
    """b forwards x and is cut off at once: c gets x at the next tick and the leader
    commits it with c. Nothing waits longer than a tick for a node that went away."""
    net, a = _settled(["a", "b", "c"])
    net.isolate("b")
    x, _ = a.propose(b"x", notify=["b"], waiting=["b"])
    net.stabilize()
    assert a.log.committed < x
    net.tick("a")
    net.stabilize()
    assert a.log.committed == x and net.core("c").log.committed < x
    net.tick("a")  # the commit reaches c within the next tick
    net.stabilize()
    assert net.core("c").log.committed == x and net.nodes["c"].values()[-1] == b"x"


def test_a_follower_far_behind_is_sent_entries_at_once_to_catch_up() -> None:
    """c missed more than one AppendEntries' worth of b's entries: it is streamed to
    as fast as it answers, not an AppendEntries a tick, until it has caught up."""
    net = Net(["a", "b", "c"], **{**PAPER, "max_entries_per_msg": 2})
    a = net.elect("a")
    net.isolate("c")
    for k in range(9):
        a.propose(b"%d" % k, notify=["b"], waiting=["b"])
        net.persist("a")
    net.stabilize()
    net.heal()
    net.tick("a")  # one tick (and heartbeat): c answers, and is sent all it lacks
    net.stabilize()
    assert net.core("c").log.last_index() == a.log.last_index()
    a.propose(b"x", notify=["b"], waiting=["b"])
    net.persist("a")
    assert not _appends_to(net, "c")  # caught up: within a tick again


# ---------------------------------------------------------------- §5.4.2 figure 8


def figure_8(core: type[Raft]) -> Net:
    """Up to figure 8 (c): s1 leads term 4 and has its term-2 entry on a majority."""
    logs = {"s1": [1, 2], "s2": [1, 2], "s3": [1], "s4": [1], "s5": [1, 3]}
    net = net_with_logs(logs, term=3, core=core, max_entries_per_msg=1, **PAPER)
    for nid in net.nodes:  # entry 1 was committed in term 1
        net.core(nid).log.commit_to(1)
    net.cut |= {("s1", "s4"), ("s1", "s5")}
    s1 = net.campaign("s1")
    while s1.role is not Role.LEADER or s1.prs["s3"].match < 2:
        assert net.deliver_one()
    assert s1.term == 4 and s1.prs["s2"].match == 3 and s1.prs["s3"].match == 2
    return net


def test_figure_8_entry_of_an_old_term_is_not_committed_by_counting() -> None:
    net = figure_8(Raft)
    assert net.core("s1").log.committed == 1  # index 2 is on 3 of 5, but of term 2
    # (d): s1 crashes; s5 wins with s3 and s4 and overwrites index 2, which is fine
    # precisely because it was never committed.
    net.isolate("s1")
    net.queue.clear()
    net.campaign("s5")  # term 4: s2 and s3 already voted for s1 in it
    net.stabilize()
    assert net.elect("s5").term == 5
    net.tick("s5")
    net.stabilize()
    for nid in ["s3", "s4", "s5"]:
        assert net.core(nid).log.term(2) == 3
    assert all(e.index != 2 or e.term == 3 for n in net.nodes.values() for e in n.applied)


def test_figure_8_counting_old_term_replicas_would_lose_a_committed_entry() -> None:
    net = figure_8(CommitsOldTermByCounting)
    assert net.core("s1").log.committed == 2  # the bug: committed by counting
    net.isolate("s1")
    net.queue.clear()
    net.campaign("s5")  # term 4: s2 and s3 already voted for s1 in it
    net.stabilize()
    assert net.elect("s5").term == 5
    net.tick("s5")
    net.stabilize()
    assert net.core("s3").log.committed >= 2 and net.core("s3").log.term(2) == 3  # lost


def test_new_leader_commits_old_entries_with_its_no_op() -> None:
    net = figure_8(Raft)
    net.heal()
    net.stabilize()
    s1 = net.core("s1")
    assert s1.log.committed == 3 and s1.log.term(2) == 2 and s1.log.term(3) == 4


# ---------------------------------------------------------------- pre-vote and check-quorum


def test_partitioned_node_does_not_inflate_its_term_with_pre_vote() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("c")
    net.tick("c", 100)
    assert net.core("c").term == a.term and net.core("c").role is Role.PRE_CANDIDATE
    net.heal()
    net.tick_all(3)
    assert a.role is Role.LEADER and a.term == 1


def test_isolated_leader_steps_down_with_check_quorum() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("a")
    net.tick("a", 2 * 10 + 1)
    assert a.role is Role.FOLLOWER


def test_follower_in_lease_ignores_a_disruptive_candidate() -> None:
    net = Net(["a", "b", "c"])
    net.elect("a")
    b = net.core("b")
    b.step(RequestVote("c", "b", 9, 100, 9, pre_vote=True))
    assert b.term == 1
    net.persist("b")
    assert not [m for m in net.queue if isinstance(m, RequestVoteResponse)]


# ---------------------------------------------------------------- §7 snapshots


def test_lagging_follower_catches_up_through_a_chunked_snapshot() -> None:
    net = Net(["a", "b", "c"], snapshot_chunk_bytes=8, compaction_trailing=0)
    net.elect("a")
    net.isolate("c")
    for k in range(20):
        net.propose("a", b"value-%d" % k)
    net.stabilize()
    meta = net.snapshot("a")
    assert net.core("a").log.offset == meta.index
    net.heal()
    chunks = 0
    net.tick("a")
    net.persist("a")
    for _ in range(10_000):
        if net.queue and isinstance(net.queue[0], InstallSnapshot):
            chunks += 1
        if not net.deliver_one():
            break
    assert chunks >= meta.size // 8
    c = net.nodes["c"]
    assert c.snapshot == meta
    assert c.values() == net.nodes["a"].values()
    assert c.core.log.committed == net.core("a").log.committed


def test_entries_kept_behind_a_snapshot_are_bounded_in_bytes_as_well_as_in_number() -> None:
    """A few entries stay behind a snapshot for a follower a little behind; counted in
    entries only, 1,000 large messages stayed in memory, and a node ran out of it."""
    net = Net(["a", "b", "c"], compaction_trailing=10, compaction_trailing_bytes=1000)
    net.elect("a")
    for k in range(20):
        net.propose("a", bytes([k]) * 300)
    net.stabilize()
    meta = net.snapshot("a")
    log = net.core("a").log
    assert meta.index - log.offset == 3  # 3 x 300 bytes fit in 1000, not 10 entries
    assert all(len(e.data) == 300 for e in log.slice(log.offset + 1, meta.index + 1))
    for _ in range(20):  # small entries: the count bounds them
        net.propose("a", b"s")
    net.stabilize()
    meta = net.snapshot("a")
    assert meta.index - net.core("a").log.offset == 10


def test_a_snapshot_waits_for_a_log_that_outweighs_the_last_one() -> None:
    """Every snapshot encodes the whole state. Due by entries alone, a large state (an
    hour of tombstones) was encoded again every 10,000 small entries, a cost that grew
    with the square of the rate. Now the entries since must also weigh as much."""

    def snapshots_after(net: Net, sizes: list[int]) -> list[int]:
        def newest() -> int:
            snap = net.nodes["a"].snapshot
            return snap.index if snap else 0

        taken = [newest()]
        for n in sizes:
            net.propose("a", b"x" * n)
            if newest() > taken[-1]:
                taken.append(newest())
        return taken[1:]

    net = Net(["a"], snapshot_entries=5, snapshot_bytes=100_000)
    net.elect("a")  # its no-op is entry 1
    assert snapshots_after(net, [300] * 4) == [5]  # the first: by entries
    first = net.nodes["a"].snapshot
    assert first is not None and first.size > 1200
    assert snapshots_after(net, [10] * 30) == []  # 300 bytes: lighter than the snapshot
    grown = snapshots_after(net, [300] * 5)
    assert len(grown) == 1 and net.core("a").log.applied - grown[0] < 5

    eager = Net(["a"], snapshot_entries=5, snapshot_bytes=100_000, snapshot_growth=0.0)
    eager.elect("a")
    assert snapshots_after(eager, [300] * 4 + [10] * 10) == [5, 10, 15]  # entries only

    capped = Net(["a"], snapshot_entries=5, snapshot_bytes=2000, snapshot_growth=100.0)
    capped.elect("a")
    assert snapshots_after(capped, [300] * 4 + [1000] * 2) == [5, 7]  # by bytes

    counted = Net(["a"], snapshot_entries=5, snapshot_entries_max=12, snapshot_growth=100.0)
    counted.elect("a")
    assert snapshots_after(counted, [300] * 4 + [10] * 20) == [5, 17]  # by entries, at most


def test_a_follower_whose_log_lost_what_it_acknowledged_stops() -> None:
    """b acknowledged entries, then came back without them (a restored backup). Left
    to run, it would vote for a candidate that lacks entries committed with b's copy,
    and they would be lost. The leader's heartbeat carries min(match, commit), which b
    can no longer reach: b stops rather than clamp it."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    for k in range(5):
        net.propose("a", b"v%d" % k)
    net.stabilize()
    b = net.nodes["b"]
    assert net.core("a").prs["b"].match == b.entries[-1].index
    b.entries = b.entries[:2]  # the backup from before the proposals
    net.restart("b")
    net.tick("a", net.core("a").cfg.heartbeat_ticks)
    with pytest.raises(LogLost, match="held the log up to index 6, but it ends at 2"):
        net.stabilize()


def test_restart_recovers_from_snapshot_and_log() -> None:
    net = Net(["a"])
    net.elect("a")
    for k in range(5):
        net.propose("a", b"%d" % k)
    net.snapshot("a")
    for k in range(5, 8):
        net.propose("a", b"%d" % k)
    before = net.nodes["a"].values()
    net.restart("a")
    net.persist("a")
    assert net.nodes["a"].values() == before


# ---------------------------------------------------------------- §6 membership


def three_with_spare() -> Net:
    net = Net(["a", "b", "c"])
    net.elect("a")
    net.add_node("d")
    return net


def test_learner_replicates_but_is_not_counted() -> None:
    net = three_with_spare()
    net.core("a").propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    net.stabilize()
    assert net.core("d").conf().learners == ("d",)
    net.isolate("b")
    net.isolate("c")
    net.cut -= {("a", "d"), ("d", "a")}
    index, _ = net.propose("a", b"x")
    net.stabilize()
    assert net.core("d").log.last_index() >= index  # the learner stored it...
    assert net.core("a").log.committed < index  # ...but a learner's copy is no quorum


def test_learner_promoted_only_once_caught_up() -> None:
    net = three_with_spare()
    a = net.core("a")
    a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    net.isolate("d")
    net.stabilize()
    for k in range(200):
        net.propose("a", b"%d" % k)
    net.stabilize()
    with pytest.raises(ConfChangeRefused, match="caught up"):
        a.propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "d"))
    net.heal()
    net.tick("a")
    net.stabilize()
    a.propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "d"))
    net.stabilize()
    assert all(net.core(n).conf().voters == ("a", "b", "c", "d") for n in "abcd")


def test_one_membership_change_at_a_time() -> None:
    net = three_with_spare()
    a = net.core("a")
    a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    with pytest.raises(ConfChangeRefused, match="in flight"):
        a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "c"))


def test_removed_voter_no_longer_counts() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "c"))
    net.stabilize()
    assert a.conf() == ConfState(("a", "b"), ())
    net.isolate("c")
    index, _ = net.propose("a", b"after")
    net.stabilize()
    assert a.log.committed >= index
    with pytest.raises(ConfChangeRefused, match="transfer first"):
        a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "a"))


def test_new_leader_commits_in_its_term_before_changing_membership() -> None:
    net = Net(["a", "b", "c"])
    a = net.campaign("a")
    while a.role is not Role.LEADER:
        assert net.deliver_one()
    with pytest.raises(ConfChangeRefused, match="committed an entry of its term"):
        a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "c"))


# ---------------------------------------------------------------- leadership transfer


def test_transfer_to_an_up_to_date_follower() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    a.transfer_leader("b")
    net.stabilize()
    assert net.leaders() == ["b"] and net.core("b").term == 2


def test_transfer_waits_for_the_target_to_catch_up() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("b")
    for k in range(5):
        net.propose("a", b"%d" % k)
    net.stabilize()
    net.heal()
    a.transfer_leader("b")
    with pytest.raises(TransferInProgress):
        a.propose(b"refused")
    net.stabilize()
    b = net.core("b")
    assert net.leaders() == ["b"]
    assert b.log.term(b.log.committed) == b.term and b.log.committed >= 7


def test_transfer_abandoned_after_an_election_timeout() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("b")
    a.transfer_leader("b")
    with pytest.raises(TransferInProgress):
        a.propose(b"refused")
    net.tick_all(10)
    assert a.role is Role.LEADER
    a.propose(b"accepted again")


# ---------------------------------------------------------------- §6.4 ReadIndex


def test_read_index_answered_after_a_quorum_confirms_leadership() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    a.read_index(b"r1")
    net.stabilize()
    assert net.nodes["a"].read_states == [(b"r1", a.log.committed)]


def test_partitioned_leader_cannot_answer_reads() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("a")
    a.read_index(b"r1")
    net.stabilize()
    assert net.nodes["a"].read_states == []


def test_follower_read_is_forwarded_to_the_leader() -> None:
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.core("b").read_index(b"rb")
    net.stabilize()
    assert net.nodes["b"].read_states == [(b"rb", a.log.committed)]


def test_read_waits_until_the_new_leader_commits_in_its_term() -> None:
    net = Net(["a", "b", "c"])
    a = net.campaign("a")
    while a.role is not Role.LEADER:
        assert net.deliver_one()
    a.read_index(b"early")
    assert a.log.term(a.log.committed) != a.term
    net.stabilize()
    assert net.nodes["a"].read_states == [(b"early", a.log.committed)]
    assert a.log.term(a.log.committed) == a.term


def test_read_without_a_known_leader_is_refused() -> None:
    net = Net(["a", "b", "c"])
    with pytest.raises(NotLeader):
        net.core("b").read_index(b"x")
