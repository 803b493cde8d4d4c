"""The spool state machine under random command sequences (hypothesis) and by example."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailqueue import codec, snapshot
from mailqueue.commands import (
    COMMAND_TYPES,
    Accept,
    Assign,
    Assignment,
    Batch,
    BeginDot,
    Command,
    Delete,
    Expire,
    Hold,
    NodeDown,
    Outcome,
    OutcomeKind,
    RcptResult,
    Release,
    Retry,
    SetFormat,
    UncertainPolicy,
    Unhold,
)
from mailqueue.index import SpoolIndex
from mailqueue.spool import (
    FINAL,
    REPLAY_WINDOW_MS,
    MemoryBodies,
    RcptState,
    Spool,
    SpoolView,
)

IDS = [f"m{k}" for k in range(5)]
NODES = ["a", "b", "c"]


def draw_command(data: st.DataObject, spool: Spool, at: int) -> Command:
    """A command that is usually plausible for the spool as it stands (so deep states
    are reached), and sometimes stale or nonsensical (so refusals are exercised)."""
    d = data.draw
    live = sorted(spool.messages)
    pick_live = bool(live) and data.draw(st.integers(0, 4)) > 0
    mid: str = data.draw(st.sampled_from(live if pick_live else IDS))
    msg = spool.messages.get(mid)
    n = len(msg.rcpts) if msg else 2
    k = d(st.integers(0, n - 1))
    r = msg.rcpts[k] if msg else None
    node = r.node if r and r.node and d(st.booleans()) else d(st.sampled_from(NODES))
    attempt = (r.attempt if r else 0) + d(st.sampled_from([0, 0, 0, 1, -1]))
    kind = d(st.sampled_from(["accept", "accept", "assign", "assign", "assign", "dot", "dot",
                              "dot", "outcome", "outcome", "release", "down", "expire", "hold",
                              "unhold", "retry", "delete", "format"]))  # fmt: skip
    if kind == "accept":
        rcpts = tuple(f"u{j}@d{j % 2}.example" for j in range(d(st.integers(1, 3))))
        sender = d(st.sampled_from(["s@example.org", ""]))
        return Accept(at, mid, sender, rcpts, d(st.binary(max_size=20)), d(st.sampled_from(NODES)))
    if kind == "assign":  # usually the next attempt number, sometimes a stale one
        nxt = (r.attempt if r else 0) + d(st.sampled_from([1, 1, 1, 0, -1]))
        return Assign(at, (Assignment(mid, k, node, nxt),))
    if kind == "dot":
        return BeginDot(at, mid, (k,), node, attempt)
    if kind == "outcome":
        res = RcptResult(k, d(st.sampled_from(OutcomeKind)), "250 ok", at + 60_000)
        return Outcome(at, mid, node, attempt, (res,))
    if kind == "release":
        return Release(at, mid, (k,), node, attempt)
    if kind == "down":
        return NodeDown(at, node, d(st.sampled_from(UncertainPolicy)))
    if kind == "expire":
        return Expire(at, mid, "too old")
    if kind == "hold":
        return Hold(at, (mid,))
    if kind == "unhold":
        return Unhold(at, (mid,))
    if kind == "retry":
        return Retry(at, (mid,))
    if kind == "format":
        return SetFormat(at, d(st.integers(1, 3)))
    return Delete(at, (mid,))


def expected_fence(spool: Spool, cmd: Command) -> bool | None:
    if not isinstance(cmd, BeginDot):
        return None
    msg = spool.messages.get(cmd.message_id)
    if msg is None:
        return False
    return all(
        msg.rcpts[k].state in (RcptState.ASSIGNED, RcptState.SENDING)
        and (msg.rcpts[k].node, msg.rcpts[k].attempt) == (cmd.node, cmd.attempt)
        for k in cmd.rcpts
    )


def foreign_rcpts(spool: Spool, cmd: Command) -> dict[tuple[str, int], tuple[object, ...]]:
    """Recipients an Outcome or Release names but whose assignment is someone else's."""
    if not isinstance(cmd, Outcome | Release):
        return {}
    msg = spool.messages.get(cmd.message_id)
    ks = [res.rcpt for res in cmd.results] if isinstance(cmd, Outcome) else list(cmd.rcpts)
    return {
        (msg.id, k): msg.rcpts[k].key()
        for k in ks
        if msg
        and 0 <= k < len(msg.rcpts)
        and (msg.rcpts[k].node, msg.rcpts[k].attempt) != (cmd.node, cmd.attempt)
    }


def check_invariants(spool: Spool) -> None:
    counts = dict.fromkeys(RcptState, 0)
    load: dict[str, int] = {}
    for m in spool.messages.values():
        for r in m.rcpts:
            counts[r.state] += 1  # each recipient is counted in exactly one state
            if r.state in (RcptState.ASSIGNED, RcptState.SENDING):
                load[r.node] = load.get(r.node, 0) + 1
        assert not all(r.state in FINAL and not m.needs_dsn(r) for r in m.rcpts), m.id
    assert counts == spool.counts
    assert load == spool.load
    assert spool.index.view() == rebuilt_index(spool).view()  # kept up to date by every command


def rebuilt_index(spool: Spool) -> SpoolIndex:
    fresh = Spool()
    fresh.messages = spool.messages
    fresh.rebuild_index()
    return fresh.index


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_command_sequences_keep_the_spool_consistent(data: st.DataObject) -> None:
    spool = Spool()
    commands: list[Command] = []
    finals: dict[tuple[str, int], tuple[RcptState, str]] = {}
    tokens: set[tuple[str, int, int]] = set()
    cut = data.draw(st.integers(0, 60))
    snap: list[bytes] = []
    view: SpoolView | None = None
    at = 1_000
    for step in range(data.draw(st.integers(1, 60))):
        at += data.draw(st.integers(0, 5_000))
        cmd = draw_command(data, spool, at)
        assert codec.decode(codec.encode(cmd)) == cmd
        fenced = expected_fence(spool, cmd)
        untouchable = foreign_rcpts(spool, cmd)
        result = spool.apply(cmd)
        for (mid, k), before in untouchable.items():  # outcomes of other attempts are void
            assert mid not in spool.messages or spool.messages[mid].rcpts[k].key() == before
        commands.append(cmd)
        check_invariants(spool)
        if fenced is not None:  # BeginDot passes exactly when its attempt holds them all
            assert result.ok == fenced, (cmd, result)
        for m in spool.messages.values():  # an attempt number is never handed out twice
            for k, r in enumerate(m.rcpts):
                if r.state is RcptState.ASSIGNED and (m.id, k, r.attempt) not in tokens:
                    assert all(t[2] < r.attempt for t in tokens if t[:2] == (m.id, k))
                    tokens.add((m.id, k, r.attempt))
        for m in spool.messages.values():
            for k, r in enumerate(m.rcpts):
                key = (m.id, k)
                if key in finals:  # delivered and bounced are final
                    assert (r.state, r.reply) == finals[key], (key, r.state)
                elif r.state in FINAL:
                    finals[key] = (r.state, r.reply)
        for key in [key for key in finals if key[0] not in spool.messages]:
            del finals[key]
        if step == cut:
            snap = list(snapshot.dump(spool))
            view = spool.open_view()  # a snapshot written while the rest applies

    once = Spool()
    twice = Spool()
    for cmd in commands:
        once.apply(cmd)
        twice.apply(cmd)
        twice.apply(cmd)  # a proposal committed twice changes nothing more
    assert once.state_key() == spool.state_key()  # two replicas, same commands, same spool
    assert twice.state_key() == spool.state_key()
    assert once.bodies.bodies == twice.bodies.bodies  # type: ignore[attr-defined]
    if view is not None:
        assert list(snapshot.dump(view)) == snap  # nothing applied since moved the view
        spool.close_view()
    assert spool.bodies.bodies == once.bodies.bodies  # type: ignore[attr-defined]

    restored = snapshot.load(iter(snapshot.dump(spool)), MemoryBodies(), readable=3)
    assert restored.state_key() == spool.state_key()
    assert restored.counts == spool.counts and restored.load == spool.load
    assert restored.index.view() == spool.index.view()
    assert restored.bodies.bodies == spool.bodies.bodies  # type: ignore[attr-defined]
    if snap:  # restore mid-way, replay the rest: same as having applied everything
        resumed = snapshot.load(iter(snap), MemoryBodies(), readable=3)
        for cmd in commands[cut + 1 :]:
            resumed.apply(cmd)
        assert resumed.state_key() == spool.state_key()
        assert resumed.index.view() == spool.index.view()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_batch_applies_exactly_as_its_commands_one_by_one(data: st.DataObject) -> None:
    one_by_one, batched = Spool(), Spool()
    at, pending = 1_000, []
    for _ in range(data.draw(st.integers(1, 60))):
        at += data.draw(st.integers(0, 5_000))
        cmd = draw_command(data, one_by_one, at)  # may depend on the commands before it
        pending.append((cmd, one_by_one.apply(cmd)))
        if data.draw(st.booleans()):
            continue  # the next one joins the same batch
        batch = Batch(max(c.at for c, _ in pending), tuple(c for c, _ in pending))
        assert codec.decode(codec.encode(batch)) == batch
        result = batched.apply(batch)
        assert result.items == tuple(r for _, r in pending)  # each its own result, in order
        assert result.changed == sum(r.changed for _, r in pending)
        assert batched.state_key() == one_by_one.state_key()
        pending = []


def test_a_batch_inside_a_batch_is_refused() -> None:
    inner = Batch(1, (Hold(1, ("m1",)),))
    wire = cbor2.dumps([COMMAND_TYPES.index(Batch), 1, [codec._to_wire(inner)]])
    try:
        codec.decode(wire)
    except codec.DecodeError as exc:
        assert "Batch inside a Batch" in str(exc)
    else:
        raise AssertionError("a nested Batch was decoded")
    assert codec.decode(codec.encode(inner)) == inner


def accepted(*rcpts: str, sender: str = "s@example.org") -> Spool:
    spool = Spool()
    spool.apply(Accept(1000, "m1", sender, rcpts, b"Subject: hi\r\n\r\nbody\r\n", "a"))
    return spool


def test_begin_dot_is_refused_for_an_attempt_that_lost_its_assignment() -> None:
    spool = accepted("u@x.example")
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1),)))
    spool.apply(NodeDown(1002, "a"))  # a fell silent before its dot: back to the queue
    spool.apply(Assign(1003, (Assignment("m1", 0, "b", 2),)))
    stale = spool.apply(BeginDot(1004, "m1", (0,), "a", 1))
    assert not stale.ok and "no longer holds" in stale.detail
    assert spool.apply(BeginDot(1005, "m1", (0,), "b", 2)).ok
    assert spool.messages["m1"].rcpts[0].state is RcptState.SENDING


def test_a_node_that_dies_after_the_dot_leaves_the_recipient_uncertain() -> None:
    spool = accepted("u@x.example", "v@x.example")
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1), Assignment("m1", 1, "a", 1))))
    spool.apply(BeginDot(1002, "m1", (0,), "a", 1))
    spool.apply(NodeDown(1003, "a", UncertainPolicy.HOLD))
    r0, r1 = spool.messages["m1"].rcpts
    assert r0.state is RcptState.UNCERTAIN and r0.was_uncertain
    assert r1.state is RcptState.QUEUED  # never began the dot: no duplicate possible
    assert spool.uncertain_total == 1
    spool.apply(Outcome(1004, "m1", "a", 1, (RcptResult(0, OutcomeKind.DELIVERED, "250"),)))
    assert r0.state is RcptState.UNCERTAIN  # a late outcome cannot overrule the leader
    spool.apply(Retry(1005, ("m1",)))
    after = spool.messages["m1"].rcpts[0]
    assert after.state == RcptState.QUEUED and after.next_attempt == 1005


@pytest.mark.parametrize("retry_at", [0, 5000], ids=["hold", "redeliver"])
def test_a_lost_reply_to_the_dot_is_uncertain_as_a_dead_worker_is(retry_at: int) -> None:
    """The worker lived but the remote's reply to the dot never came: the same window
    (RFC 1047), counted the same, and held or queued again as the worker's policy says."""
    spool = accepted("u@x.example", "v@x.example")
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1), Assignment("m1", 1, "a", 1))))
    spool.apply(BeginDot(1002, "m1", (0,), "a", 1))
    lost = RcptResult(0, OutcomeKind.UNCERTAIN, "4.4.2 lost", retry_at)
    early = RcptResult(1, OutcomeKind.UNCERTAIN, "4.4.2 lost", retry_at)  # no dot: no doubt
    for _ in range(2):  # a repeated Outcome counts once
        spool.apply(Outcome(1003, "m1", "a", 1, (lost, early)))
    r0, r1 = spool.messages["m1"].rcpts
    assert spool.uncertain_total == 1 and r0.was_uncertain and not r1.was_uncertain
    assert r1.state is RcptState.QUEUED
    if retry_at:
        assert r0.state is RcptState.QUEUED and r0.next_attempt == 5000
    else:
        assert r0.state is RcptState.UNCERTAIN and r0.last_error == "4.4.2 lost"


def test_message_leaves_once_every_recipient_is_final_and_bounces_reported() -> None:
    spool = accepted("u@x.example", "v@y.example")
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1), Assignment("m1", 1, "a", 1))))
    spool.apply(BeginDot(1002, "m1", (0,), "a", 1))
    spool.apply(
        Outcome(
            1003, "m1", "a", 1,
            (RcptResult(0, OutcomeKind.DELIVERED, "250 ok"),
             RcptResult(1, OutcomeKind.FAILED, "550 no such user")),
        )
    )  # fmt: skip
    assert "m1" in spool.messages  # a bounce still owes the sender a DSN
    spool.apply(Accept(1004, "m1.dsn", "", ("s@example.org",), b"dsn", "a", True, "m1", (1,)))
    assert "m1" not in spool.messages and "m1" in spool.finished
    assert spool.bodies.get("m1.dsn") == b"dsn"
    spool.apply(Accept(1005, "m1", "s@example.org", ("u@x.example",), b"again", "b"))
    assert "m1" not in spool.messages  # a replayed Accept does not resurrect it


def delivered_at(spool: Spool, at: int) -> None:
    """m1's one recipient delivered at `at`: m1 leaves, its tombstone stays."""
    spool.apply(Assign(at, (Assignment("m1", 0, "a", 1),)))
    spool.apply(BeginDot(at, "m1", (0,), "a", 1))
    spool.apply(Outcome(at, "m1", "a", 1, (RcptResult(0, OutcomeKind.DELIVERED, "250"),)))
    assert "m1" not in spool.messages


def accept(at: int, mid: str, by: str = "a") -> Accept:
    return Accept(at, mid, "s@example.org", (f"{mid}@x.example",), b"body", by)


def test_a_replayed_accept_is_a_no_op_while_its_tombstone_lasts_then_refused() -> None:
    """A front end may propose the same Accept again (its fate was unknown) while its
    client waits: the copy must not queue the delivered message again. A tombstone
    lasts REPLAY_WINDOW_MS by the accepting node's stamps; by then a copy is refused as
    too late, so the id can be forgotten and tombstones do not grow without bound."""
    original = accept(1000, "m1")
    spool = Spool()
    spool.apply(original)
    delivered_at(spool, 2000)  # a's newest stamp is still 1000: the tombstone's
    spool.apply(accept(1000 + REPLAY_WINDOW_MS, "m2"))
    replay = spool.apply(original)  # the tombstone's last moment
    assert replay.ok and replay.detail == "already accepted" and "m1" not in spool.messages
    spool.apply(accept(1001 + REPLAY_WINDOW_MS, "m3"))
    assert "m1" not in spool.finished and list(spool.finished) == []  # forgotten...
    late = spool.apply(original)
    assert not late.ok and "too late" in late.detail  # ...and the copy refused
    assert "m1" not in spool.messages and spool.counts[RcptState.QUEUED] == 2  # m2, m3


def test_another_nodes_clock_jumping_ahead_expires_no_tombstone() -> None:
    """When tombstones lasted an hour of the spool's time, which follows the fastest
    clock, a node whose clock jumped a day ahead made every tombstone expire at once,
    and a replayed copy of a delivered message's Accept queued it again: sent twice."""
    original = accept(1000, "m1", by="a")
    spool = Spool()
    spool.apply(original)
    delivered_at(spool, 2000)
    day = 24 * 3600 * 1000
    spool.apply(accept(2000 + day, "m2", by="b"))  # b's clock is a day ahead
    assert spool.now == 2000 + day and "m1" in spool.finished
    replay = spool.apply(original)
    assert replay.detail == "already accepted" and "m1" not in spool.messages
    assert spool.apply(accept(2000, "m3", by="a")).detail == "accepted"  # a takes mail


def test_the_accepting_nodes_own_clock_jumping_ahead_refuses_its_old_copies() -> None:
    """Its tombstones go early, but every copy they could have caught is refused."""
    original = accept(1000, "m1", by="a")
    spool = Spool()
    spool.apply(original)
    delivered_at(spool, 2000)
    spool.apply(accept(1000 + 2 * REPLAY_WINDOW_MS, "m2", by="a"))
    assert list(spool.finished) == []
    late = spool.apply(original)
    assert not late.ok and "m1" not in spool.messages


def test_deferred_recipient_waits_for_its_retry_time() -> None:
    spool = accepted("u@x.example")
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1),)))
    spool.apply(Outcome(1002, "m1", "a", 1, (RcptResult(0, OutcomeKind.DEFERRED, "451", 61_002),)))
    r = spool.messages["m1"].rcpts[0]
    assert (r.state, r.next_attempt, r.attempts, r.last_error) == (
        RcptState.QUEUED,
        61_002,
        1,
        "451",
    )


def test_delivered_needs_begin_dot() -> None:
    spool = accepted("u@x.example")
    spool.apply(Assign(1001, (Assignment("m1", 0, "a", 1),)))
    spool.apply(Outcome(1002, "m1", "a", 1, (RcptResult(0, OutcomeKind.DELIVERED, "250"),)))
    assert spool.messages["m1"].rcpts[0].state is RcptState.ASSIGNED


def test_malformed_command_bytes_are_refused() -> None:
    for bad in [b"", b"\xa0", cbor2.dumps([99]), cbor2.dumps([0, 1, "m", "s"])]:
        try:
            codec.decode(bad)
        except codec.DecodeError:
            continue
        raise AssertionError(f"{bad!r} decoded")
