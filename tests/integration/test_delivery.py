"""Delivery through a smarthost: assigned by the leader, fenced at the dot, exactly once."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import threading
from collections import Counter
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.chaos.nft import Partitions, partitions_possible
from tests.integration.kvcluster import free_port, wait_for
from tests.integration.observe import cli
from tests.integration.sinks import Sink, sink_and_cluster
from tests.integration.smtpnodes import PARKED, SmtpCluster


def test_accepted_mail_is_delivered_exactly_once(tmp_path: Path, sink: tuple[Sink, int]) -> None:
    handler, port = sink
    cluster = SmtpCluster(tmp_path, smarthost=f"127.0.0.1:{port}")
    try:
        cluster.start_all()
        cluster.leader()
        rcpts = []
        for k in range(30):
            node = cluster.nodes[f"n{k % 3 + 1}"]
            rcpt = f"user{k}@dest.example"
            with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
                s.sendmail("a@example.org", [rcpt], b"Subject: %d\r\n\r\nbody %d\r\n" % (k, k))
            rcpts.append(rcpt)
        wait_for("every message delivered", lambda: len(handler.received) >= 30, 60)
        wait_for("the spools to empty", lambda: all(
            not cluster.queued(n) for n in cluster.nodes), 30)  # fmt: skip
        counts = Counter(r for r, _ in handler.received)
        assert counts == Counter(rcpts)  # each exactly once
        body = dict(handler.received)["user7@dest.example"]
        assert b"body 7" in body and body.startswith(b"Received: from")
    finally:
        cluster.stop_all()


def test_a_message_larger_than_a_frame_crosses_the_cluster_intact(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """5 MiB to a follower: its forward to the leader and the leader's AppendEntries
    go between the nodes in pieces (over raft.transport.WHOLE_MAX), cut from the parts
    of a frame never joined, and the log writes the entry from where it lies. What the
    sink gets is the message as sent, behind our Received header."""
    handler, port = sink
    cluster = SmtpCluster(tmp_path, smarthost=f"127.0.0.1:{port}", max_size=8 << 20)
    try:
        cluster.start_all()
        leader = cluster.leader()
        node = cluster.nodes[min(n for n in cluster.nodes if n != leader)]
        line = b"%07d" + b"z" * 69 + b"\r\n"
        message = b"Subject: large\r\n\r\n" + b"".join(line % k for k in range(68_000))
        assert len(message) > 5 << 20
        with smtplib.SMTP(node.host, node.smtp_port, timeout=60) as s:
            s.sendmail("a@example.org", ["big@dest.example"], message)
        wait_for("the large message delivered", lambda: len(handler.received) >= 1, 60)
        [(rcpt, body)] = handler.received
        assert rcpt == "big@dest.example" and body.endswith(message), len(body)
        assert body.startswith(b"Received: from")
    finally:
        cluster.stop_all()


class GatedSink(Sink):
    """Holds every RCPT until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        self.waiting.set()
        while not self.gate.is_set():  # the sink's own loop thread: poll, do not block it
            await asyncio.sleep(0.01)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


def test_without_quorum_the_final_dot_is_withheld(tmp_path: Path) -> None:
    handler = GatedSink()
    with sink_and_cluster(tmp_path, handler) as cluster:
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["fenced@dest.example"], b"Subject: f\r\n\r\nx\r\n")
        wait_for("a delivery attempt to reach the sink", handler.waiting.is_set, 30)
        holder = next(r["node"] for m in cluster.queued("n1") for r in m["recipients"] if r["node"])
        for nid in cluster.nodes:
            if nid != holder:
                cluster.kill(nid)  # the worker is left without a quorum to fence with
        handler.gate.set()
        # It sends the body, cannot commit BeginDot, and hangs up before the dot.
        log = tmp_path / f"{holder}.log"
        wait_for(
            "the worker to withhold the dot", lambda: b"final dot withheld" in log.read_bytes(), 60
        )
        assert handler.received == []
        for nid in cluster.nodes:
            if nid != holder:
                cluster.start(nid)
        wait_for("delivery once a quorum is back", lambda: len(handler.received) == 1, 60)
        wait_for("the spools to empty", lambda: all(
            not cluster.queued(n) for n in cluster.nodes), 30)  # fmt: skip
        assert [r for r, _ in handler.received] == ["fenced@dest.example"]


def test_a_worker_killed_before_its_dot_is_replaced_without_a_duplicate(tmp_path: Path) -> None:
    handler = GatedSink()
    with sink_and_cluster(tmp_path, handler) as cluster:
        node = cluster.nodes["n2"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["moved@dest.example"], b"Subject: m\r\n\r\nx\r\n")
        wait_for("a delivery attempt to reach the sink", handler.waiting.is_set, 30)
        holder = next(r["node"] for m in cluster.queued("n2") for r in m["recipients"] if r["node"])
        cluster.kill(holder)  # kill -9 in the middle of its SMTP transaction
        handler.gate.set()
        survivor = next(n for n in cluster.nodes if n != holder)
        wait_for("another node to deliver it", lambda: len(handler.received) == 1, 60)
        wait_for("the spools to empty", lambda: not cluster.queued(survivor), 30)
        assert [r for r, _ in handler.received] == ["moved@dest.example"]
        cluster.start(holder)  # the dead worker's return changes nothing
        wait_for("its spool to agree", lambda: not cluster.queued(holder), 30)
        assert len(handler.received) == 1


class PickySink(Sink):
    """Defers `later@` the first time, refuses `nobody@`, takes everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.deferred = 0
        self.senders: list[tuple[str, str]] = []  # (envelope sender, recipient) accepted

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if address.startswith("later@") and self.deferred == 0:
            self.deferred += 1
            return "451 4.2.0 try again later"
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        self.senders.append((envelope.mail_from or "", address))
        return "250 2.1.5 Ok"


def test_deferred_is_retried_and_refused_bounces_to_the_sender(tmp_path: Path) -> None:
    handler = PickySink()
    with sink_and_cluster(tmp_path, handler) as cluster:
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail(
                "sender@example.org", ["later@dest.example", "nobody@dest.example"],
                b"Subject: mixed\r\nMessage-ID: <mixed@example.org>\r\n\r\nx\r\n",
            )  # fmt: skip
        # "later" is retried after the 1 s schedule step and delivered; "nobody" bounces
        # and the DSN goes from <> back to the sender, through the same smarthost.
        wait_for("the retry and the DSN", lambda: len(handler.received) == 2, 60)
        assert handler.deferred == 1
        assert sorted(handler.senders) == [
            ("<>", "sender@example.org"),
            ("sender@example.org", "later@dest.example"),
        ]
        dsn = dict(handler.received)["sender@example.org"]
        assert b"multipart/report" in dsn and b"nobody@dest.example" in dsn
        assert b"5.1.1" in dsn and b"Message-ID: <mixed@example.org>" in dsn
        wait_for("the spools to empty", lambda: all(
            not cluster.queued(n) for n in cluster.nodes), 30)  # fmt: skip


class OldServerSink(Sink):
    """Refuses `latin@` as some old servers do: a two-line reply with a Latin-1 byte."""

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str | bytes:  # fmt: skip
        if address.startswith("latin@"):
            return b"550-5.1.1 Destinataire inconnu: caf\xe9\r\n550 5.1.1 user unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


def test_a_refusal_in_latin1_on_two_lines_bounces_with_a_clean_dsn(tmp_path: Path) -> None:
    """aiosmtplib hands that reply over with a lone surrogate and an LF in it: the
    Outcome could not be encoded, and the recipient never bounced."""
    handler = OldServerSink()
    with sink_and_cluster(tmp_path, handler, n=1) as cluster:
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("sender@example.org", ["latin@dest.example"], b"Subject: x\r\n\r\nx\r\n")
        wait_for("the DSN at the sender", lambda: handler.received, 60)
    [(rcpt, dsn)] = handler.received
    assert rcpt == "sender@example.org"
    want = "550 5.1.1 Destinataire inconnu: caf\ufffd 5.1.1 user unknown".encode()
    assert b"Diagnostic-Code: smtp; " + want + b"\r\n" in dsn, dsn
    assert dsn.count(b"\n") == dsn.count(b"\r\n")  # no bare LF from the reply's lines


class CountingGate(GatedSink):
    """A gated sink that counts the sessions waiting at RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        self.waiters += 1
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def test_a_paused_worker_cannot_deliver_what_was_reassigned(tmp_path: Path) -> None:
    handler = CountingGate()
    port = free_port("127.0.0.1")
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, smarthost=f"127.0.0.1:{port}")
    try:
        cluster.start_all()
        leader = cluster.leader()
        node = cluster.nodes[next(n for n in cluster.nodes if n != leader)]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["once@dest.example"], b"Subject: o\r\n\r\nx\r\n")
        wait_for("a delivery attempt to reach the sink", handler.waiting.is_set, 30)
        holder = next(
            r["node"] for m in cluster.queued(leader) for r in m["recipients"] if r["node"]
        )
        if holder == leader:
            pytest.skip("the leader took the assignment; this test pauses a follower")
        popen = cluster.nodes[holder].popen
        assert popen is not None
        popen.send_signal(signal.SIGSTOP)  # a partitioned worker: alive, but silent
        try:
            wait_for("the assignment to move on", lambda: handler.waiters >= 2, 60)
            handler.gate.set()  # both transactions may go on now
            wait_for("the new worker to deliver", lambda: len(handler.received) == 1, 30)
        finally:
            popen.send_signal(signal.SIGCONT)
        log = tmp_path / f"{holder}.log"
        withheld = b"final dot withheld"
        wait_for("the old worker to be fenced off", lambda: withheld in log.read_bytes(), 60)
        assert [r for r, _ in handler.received] == ["once@dest.example"]  # one final dot
    finally:
        cluster.stop_all()
        controller.stop()


@pytest.mark.skipif(not partitions_possible(), reason="needs root and nft (setup-system)")
def test_a_node_that_cannot_hear_the_leader_is_given_no_mail(tmp_path: Path) -> None:
    """A firewall blocks one node's Raft port inbound: it hears no leader, yet its
    pre-votes still reach the leader. Those counted as signs of life, so the scheduler
    kept assigning it mail it never learned of, for ever, and `cluster status` said it
    was reachable."""
    handler = Sink()
    with sink_and_cluster(tmp_path, handler) as cluster:
        leader = cluster.leader()
        deaf = next(n for n in cluster.nodes.values() if n.id != leader)

        def reachable() -> bool:
            status = cluster.status(leader) or {}
            return any(m["id"] == deaf.id and m["reachable"] for m in status["members"])

        cuts = Partitions()
        try:
            cuts.deafen(deaf.raft_port)
            wait_for("the leader to see the deaf node unreachable", lambda: not reachable(), 30)
            sender = cluster.nodes[leader]
            rcpts = [f"user{k}@dest.example" for k in range(12)]
            for rcpt in rcpts:
                with smtplib.SMTP(sender.host, sender.smtp_port, timeout=30) as s:
                    s.sendmail("a@example.org", [rcpt], b"Subject: d\r\n\r\nx\r\n")
            wait_for("every message delivered", lambda: len(handler.received) >= 12, 60)
            assert Counter(r for r, _ in handler.received) == Counter(rcpts)
        finally:
            cuts.close()
        wait_for("the healed node to be reachable again", reachable, 30)


def test_mail_a_node_cannot_send_out_is_retried_from_another_node(tmp_path: Path) -> None:
    """n1 and n3 cannot reach the smarthost (their own network, say); n2 can. The mail
    n1 accepted went back to n1 at every retry, as the node that accepted it, until it
    bounced five days later, though n2 could have sent it at once."""
    handler = Sink()
    port = free_port("127.0.0.1")
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, smarthost=f"127.0.0.1:{port}")
    for nid in ("n1", "n3"):
        config = cluster.nodes[nid].config
        config.write_text(config.read_text().replace(f"127.0.0.1:{port}", PARKED))
    try:
        cluster.start("n1")
        cluster.start("n3")
        cluster.leader()
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["far@dest.example"], b"Subject: f\r\n\r\nx\r\n")
        logs = [tmp_path / f"{nid}.log" for nid in ("n1", "n3")]
        wait_for("an attempt that could not connect",
                 lambda: any(b"4.4.1 " in log.read_bytes() for log in logs), 30)  # fmt: skip
        cluster.start("n2")
        wait_for("n2 to deliver it", lambda: len(handler.received) == 1, 60)
        assert [r for r, _ in handler.received] == ["far@dest.example"]
    finally:
        cluster.stop_all()
        controller.stop()


class DeferringSink(Sink):
    """Defers every recipient but the sender's address, which receives the DSN."""

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if address != "sender@example.org":
            return "451 4.3.2 not now"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


def test_a_message_past_its_queue_lifetime_bounces(tmp_path: Path) -> None:
    handler = DeferringSink()
    with sink_and_cluster(tmp_path, handler, n=1, lifetime="3s") as cluster:
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("sender@example.org", ["stuck@dest.example"], b"Subject: s\r\n\r\nx\r\n")
        wait_for("the expiry DSN at the sender", lambda: handler.received, 60)
        [(rcpt, dsn)] = handler.received
        assert rcpt == "sender@example.org"
        assert b"5.4.7" in dsn and b"stuck@dest.example" in dsn
        wait_for("the spool to empty", lambda: not cluster.queued("n1"), 30)


def test_a_loop_through_the_relay_itself_ends_at_max_hops(tmp_path: Path) -> None:
    """The smarthost set to the node's own port 25, a classic mistake: each delivery is
    taken again with one more Received field, until max_hops refuses it (554 5.4.6); the
    bounce loops the same way and ends the same way (a DSN gets no DSN), and the queue
    empties instead of growing for ever."""
    cluster = SmtpCluster(tmp_path, n=1)
    node = cluster.nodes["n1"]
    config = node.config.read_text().replace(
        'smarthost = "127.0.0.1:9"', f'smarthost = "{node.host}:{node.smtp_port}"'
    )
    node.config.write_text(config)
    cluster.set_smtp("n1", "max_hops = 5")
    try:
        cluster.start_all()
        cluster.leader()
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["u@outside.example"], b"Subject: loop\r\n\r\nx\r\n")
        log = tmp_path / "n1.log"

        def refused() -> list[str]:  # the transaction lines of refusals: no queue id
            return [ln for ln in log.read_text().splitlines() if 'event=smtp id=""' in ln]

        wait_for("both loops caught", lambda: len(refused()) == 2, 60)
        wait_for("an empty queue", lambda: not cluster.queued("n1"), 60)
        assert all('reply="554 5.4.6 Too many hops (6 Received' in ln for ln in refused())
        assert len(refused()) == 2  # and no more: the loops ended
    finally:
        cluster.stop_all()


def test_a_routed_domain_goes_to_its_host_and_the_rest_to_the_smarthost(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """[delivery] routes, Postfix's transport_maps: the inbound domain to its mail store,
    everything else to the smarthost; one message with both kinds of recipient."""
    smarthost, smarthost_port = sink
    store = Sink()
    port = free_port("127.0.0.1")
    controller = Controller(store, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, n=1, smarthost=f"127.0.0.1:{smarthost_port}")
    node = cluster.nodes["n1"]
    routes = f'routes = {{ "inbound.test" = "127.0.0.1:{port}" }}\n'
    node.config.write_text(node.config.read_text().replace("[delivery]\n", f"[delivery]\n{routes}"))
    try:
        cluster.start_all()
        cluster.leader()
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            rcpts = ["a@inbound.test", "b@outside.example"]
            s.sendmail("x@example.org", rcpts, b"Subject: both\r\n\r\nx\r\n")
        wait_for("both delivered", lambda: store.received and smarthost.received, 30)
        assert [r for r, _ in store.received] == ["a@inbound.test"]
        assert [r for r, _ in smarthost.received] == ["b@outside.example"]
    finally:
        cluster.stop_all()
        controller.stop()


class SilentAfterDot(Sink):
    """Takes the message, then drops the connection instead of answering the final dot
    (until `answer` is set): the RFC 1047 window, with the worker alive."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if not self.answer.is_set():
            assert server.transport is not None
            server.transport.close()
        return reply


def test_a_lost_reply_to_the_dot_is_uncertain_and_held_under_hold(tmp_path: Path) -> None:
    """No reply to the dot means the remote may have the message. Under on_uncertain =
    "hold" it waits for an operator, as after a worker's death, instead of going out
    again on its own; retried by the operator, it goes out once more."""
    remote = SilentAfterDot()
    port = free_port("127.0.0.1")
    controller = Controller(remote, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, n=1, smarthost=f"127.0.0.1:{port}")
    config = cluster.nodes["n1"].config
    config.write_text(
        config.read_text().replace("[delivery]\n", '[delivery]\non_uncertain = "hold"\n')
    )
    try:
        cluster.start_all()
        cluster.leader()
        node = cluster.nodes["n1"]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", ["u@dest.example"], b"Subject: lost\r\n\r\nx\r\n")
        [msg] = wait_for("an uncertain recipient", lambda: [
            m for m in cluster.queued("n1")
            if m["recipients"][0]["state"] == "uncertain"])  # fmt: skip
        assert cluster.admin("n1", "/v1/queue-stats")["uncertain_total"] == 1
        assert len(remote.received) == 1  # and it stays held: nothing goes out on its own
        remote.answer.set()
        shown = cli("queue", "show", msg["id"], "--config", str(config))
        assert "uncertain" in shown.stdout and "the remote may have the message" in shown.stdout
        retry = cli("queue", "retry", msg["id"], "--config", str(config))  # the operator's call
        assert retry.returncode == 0, retry.stderr
        wait_for("the operator's retry delivered", lambda: len(remote.received) == 2, 30)
        wait_for("an empty queue", lambda: not cluster.queued("n1"), 30)
    finally:
        cluster.stop_all()
        controller.stop()


class FiftyPerTransaction(Sink):
    """Takes at most 50 recipients per transaction, as many servers cap them (Gmail at
    100); counts what it had to refuse and the size of each transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self.sizes: list[int] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if len(envelope.rcpt_tos) >= 50:
            self.refused += 1
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sizes.append(len(envelope.rcpt_tos))
        return await super().handle_DATA(server, session, envelope)


def test_a_long_recipient_list_goes_out_in_transactions_of_50(tmp_path: Path) -> None:
    """120 recipients of one domain: three transactions (50, 50, 20), as Postfix's
    default_destination_recipient_limit makes them, so nothing waits for a retry."""
    remote = FiftyPerTransaction()
    port = free_port("127.0.0.1")
    controller = Controller(remote, hostname="127.0.0.1", port=port)
    controller.start()
    cluster = SmtpCluster(tmp_path, n=1, smarthost=f"127.0.0.1:{port}")
    try:
        cluster.start_all()
        cluster.leader()
        node = cluster.nodes["n1"]
        rcpts = [f"u{k}@list.example" for k in range(120)]
        with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
            s.sendmail("a@example.org", rcpts, b"Subject: to many\r\n\r\nx\r\n")
        wait_for("all 120 delivered", lambda: len(remote.received) == 120, 30)
        assert sorted(remote.sizes) == [20, 50, 50] and remote.refused == 0
        assert sorted(r for r, _ in remote.received) == sorted(rcpts)
    finally:
        cluster.stop_all()
        controller.stop()
