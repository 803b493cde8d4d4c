"""The admin CLI as an operator runs it (a subprocess) against a real 3-node cluster:
queue and cluster commands from any node, --json that matches the spool, exit codes."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kvcluster import free_port, wait_for
from tests.integration.observe import cli
from tests.integration.smtpnodes import SmtpCluster, SmtpNode, running

MESSAGE = b"Subject: queued\r\n\r\nwaiting for a smarthost that never answers\r\n"


def ok_json(*args: str) -> Any:
    out = cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpCluster]:
    # The default smarthost is parked: accepted mail stays in the queue to be steered.
    with running(SmtpCluster(Path(tmp_path_factory.mktemp("admin")))) as c:
        yield c


def conf(c: SmtpCluster, nid: str) -> str:
    return str(c.nodes[nid].config)


def send(c: SmtpCluster, nid: str, rcpts: list[str]) -> str:
    node = c.nodes[nid]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        s.ehlo("admin.test")
        s.mail("ops@example.org")
        for r in rcpts:
            s.rcpt(r)
        code, reply = s.data(MESSAGE)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_queue_commands_work_from_any_node_and_match_the_spool(cluster: SmtpCluster) -> None:
    ids = [send(cluster, "n1", [f"a{k}@one.example", f"b{k}@two.example"]) for k in range(3)]
    for nid in cluster.nodes:
        listed = ok_json("queue", "list", "--config", conf(cluster, nid))
        assert {m["id"] for m in listed} == cluster.queued_ids(nid) >= set(ids)
    two = ok_json("queue", "list", "--domain", "two.example", "--config", conf(cluster, "n3"))
    assert set(ids) <= {m["id"] for m in two}

    shown = ok_json("queue", "show", ids[0], "--body", "--config", conf(cluster, "n2"))
    assert shown["id"] == ids[0] and shown["sender"] == "ops@example.org"
    assert {r["address"] for r in shown["recipients"]} == {"a0@one.example", "b0@two.example"}
    assert "waiting for a smarthost" in shown["body"]
    human = cli("queue", "show", ids[0], "--config", conf(cluster, "n2"))
    assert human.returncode == 0 and "a0@one.example" in human.stdout

    assert ok_json("queue", "hold", ids[1], "--config", conf(cluster, "n3"))["changed"] == 2
    held = ok_json("queue", "list", "--state", "held", "--config", conf(cluster, "n1"))
    assert [m["id"] for m in held] == [ids[1]]
    assert all(r["state"] == "held" for r in held[0]["recipients"])
    assert ok_json("queue", "release", ids[1], "--config", conf(cluster, "n2"))["changed"] == 2
    assert ok_json("queue", "list", "--state", "held", "--config", conf(cluster, "n3")) == []
    assert cli("queue", "retry", "--all", "--config", conf(cluster, "n1")).returncode == 0

    assert ok_json("queue", "delete", ids[2], "--config", conf(cluster, "n1"))["changed"] == 2
    assert ids[2] not in cluster.queued_ids("n2")
    gone = cli("queue", "show", ids[2], "--config", conf(cluster, "n3"))
    assert gone.returncode == 1 and "no message" in gone.stderr
    missing = cli("queue", "hold", "no-such-id", "--config", conf(cluster, "n1"))
    assert missing.returncode == 1 and "no-such-id" in missing.stderr

    stats = ok_json("queue", "stats", "--config", conf(cluster, "n2"))
    assert stats["messages"] == len(cluster.queued("n2"))
    assert {"one.example", "two.example"} <= {d["domain"] for d in stats["domains"]}
    table = cli("queue", "list", "--config", conf(cluster, "n1"))
    assert table.returncode == 0 and ids[0] in table.stdout and "Requests." in table.stdout


def test_a_senders_mail_is_listed_and_deleted_by_a_pipe(cluster: SmtpCluster) -> None:
    """A stolen account's spam: queue list --sender, then the ids piped to queue delete -
    (as postqueue -j | jq | postsuper -d -)."""
    node = cluster.nodes["n2"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        for k in range(3):
            s.sendmail("Spammer@Example.org", [f"v{k}@victims.example"], MESSAGE)
        s.sendmail("", ["someone@else.example"], MESSAGE)  # a bounce: the null sender
    by_sender = ("queue", "list", "--sender", "spammer@example.org", "--config")
    spam = ok_json(*by_sender, conf(cluster, "n1"))
    assert sorted(r["address"] for m in spam for r in m["recipients"]) == [
        "v0@victims.example", "v1@victims.example", "v2@victims.example"]  # fmt: skip
    bounces = ok_json("queue", "list", "--sender", "<>", "--config", conf(cluster, "n1"))
    assert [m["recipients"][0]["address"] for m in bounces] == ["someone@else.example"]
    ids = "".join(f"{m['id']}\n" for m in spam)
    deleted = subprocess.run(
        [sys.executable, "-P", "-m", "smtpcluster.cli", "queue", "delete", "-", "--config",
         conf(cluster, "n3"), "--json"],
        input=ids, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["changed"] == 3
    assert ok_json(*by_sender, conf(cluster, "n2")) == []


def test_a_selection_steers_every_message_it_matches_in_one_command(
    cluster: SmtpCluster,
) -> None:
    """postsuper -d for a sender and postqueue -s for a site, without a pipe: the
    selection is made on the node, and touches nothing else."""
    node = cluster.nodes["n1"]
    with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
        for k in range(3):
            s.sendmail("stolen@Example.org", [f"w{k}@targets.example"], MESSAGE)
        s.sendmail("ops@example.org", ["x@site.example", "y@targets.example"], MESSAGE)
    other = send(cluster, "n1", ["z@site.example"])
    held = ok_json("queue", "hold", "--domain", "site.example", "--config", conf(cluster, "n2"))
    assert held["changed"] == 3  # both messages with a recipient there, each in full
    on_hold = ok_json("queue", "list", "--state", "held", "--config", conf(cluster, "n3"))
    assert other in {m["id"] for m in on_hold} and len(on_hold) == 2
    ok_json("queue", "release", "--state", "held", "--config", conf(cluster, "n3"))
    by_sender = ("--sender", "stolen@example.org", "--config", conf(cluster, "n3"))
    assert ok_json("queue", "delete", *by_sender)["changed"] == 3
    assert ok_json("queue", "list", *by_sender) == []
    assert other in cluster.queued_ids("n1")  # the rest is still queued
    both = cli(
        "queue", "delete", other, "--domain", "site.example", "--config", conf(cluster, "n1")
    )
    assert both.returncode == 2 and "not both" in both.stderr
    assert other in cluster.queued_ids("n1")


def test_cluster_status_and_transfer_leader_from_any_node(cluster: SmtpCluster) -> None:
    leader = cluster.leader()
    for nid in cluster.nodes:
        status = ok_json("cluster", "status", "--config", conf(cluster, nid))
        assert status["leader"] == leader
        assert status["version"] == version("smtpcluster")  # the installed release
        assert status["data_dir_free_bytes"] > status["min_free_space"] == 256 << 20
        roles = {m["id"]: m["role"] for m in status["members"]}
        assert roles == {n: "leader" if n == leader else "follower" for n in cluster.nodes}
        assert all(m["reachable"] for m in status["members"])
        assert status["format"] == status["format_readable"] == 1
    assert wait_for("each member's word to the leader", lambda: all(
        m["format"] == 1 for m in ok_json("cluster", "status", "--config",
                                          conf(cluster, "n1"))["members"]))  # fmt: skip
    human = cli("cluster", "status", "--config", conf(cluster, "n1"))
    assert human.returncode == 0 and f"leader {leader}" in human.stdout
    assert f"version {version('smtpcluster')}" in human.stdout
    assert "MiB free (new mail is refused under 256 MiB)" in human.stdout
    assert "replicated format 1 (reads up to 1)" in human.stdout and "FORMAT" in human.stdout
    assert cli("--version").stdout == f"smtpcluster {version('smtpcluster')}\n"
    target = next(n for n in cluster.nodes if n != leader)
    asker = next(n for n in cluster.nodes if n not in (leader, target))
    out = cli("cluster", "transfer-leader", target, "--config", conf(cluster, asker))
    assert out.returncode == 0, out.stderr
    assert wait_for("the new leader", lambda: cluster.leader() == target)


def takes_mail(node: SmtpNode) -> bool:
    try:
        with smtplib.SMTP(node.host, node.smtp_port, timeout=5) as s:
            return s.noop()[0] == 250
    except OSError:  # refused: nobody listens
        return False


def test_a_node_joins_and_leaves_through_the_cli(cluster: SmtpCluster) -> None:
    n4 = cluster.add_joiner("n4", "127.0.0.4")
    cluster.start("n4")
    try:
        addr = f"{n4.host}:{n4.raft_port}"
        out = cli("cluster", "join", "n4", addr, "--config", conf(cluster, "n2"))
        assert out.returncode == 0, out.stderr
        voters = ["n1", "n2", "n3", "n4"]
        wait_for("n4 to vote", lambda: all(
            (cluster.status(n) or {}).get("voters") == voters for n in cluster.nodes
        ))  # fmt: skip
        assert cluster.queued_ids("n4") == cluster.queued_ids("n1")  # it has the spool
        assert takes_mail(n4)
        out = cli("cluster", "leave", "n4", "--config", conf(cluster, "n3"))
        assert out.returncode == 0, out.stderr
        wait_for("n4 to be removed", lambda: all(
            (cluster.status(n) or {}).get("voters") == voters[:3] for n in ("n1", "n2", "n3")
        ))  # fmt: skip
        # Removed, it sends its clients elsewhere instead of relaying through a cluster
        # it no longer follows; the members go on taking mail.
        wait_for("n4 to close its SMTP ports", lambda: not takes_mail(n4))
        assert all(takes_mail(cluster.nodes[n]) for n in ("n1", "n2", "n3"))
    finally:
        cluster.kill("n4", signal.SIGTERM)
        del cluster.nodes["n4"]


def test_a_wrong_token_is_refused_with_exit_code_1(cluster: SmtpCluster, tmp_path: Path) -> None:
    node = cluster.nodes["n1"]
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token\n")
    url = f"http://{node.host}:{node.admin_port}"
    out = cli("queue", "list", "--admin", url, "--token-file", str(bad))
    assert out.returncode == 1
    assert "401" in out.stderr and "token" in out.stderr


def test_an_unreachable_node_gives_exit_code_3_and_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("whatever-token-value\n")
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    out = cli("cluster", "status", "--admin", url, "--token-file", str(token))
    assert out.returncode == 3
    assert len(out.stderr.strip().splitlines()) == 1 and "unreachable" in out.stderr


def test_usage_errors_exit_2(cluster: SmtpCluster) -> None:
    assert cli("queue", "hold", "--config", conf(cluster, "n1")).returncode == 2  # no ids
    assert cli("queue", "list").returncode == 2  # neither --config nor --admin
    assert cli("queue", "frobnicate").returncode == 2
    bogus = cli("queue", "list", "--state", "bogus", "--config", conf(cluster, "n1"))
    assert bogus.returncode == 2 and "queued" in bogus.stderr  # the states it knows


def test_a_reader_that_stops_early_ends_queue_list_quietly(cluster: SmtpCluster) -> None:
    """`queue list | head`: no traceback when head has read enough and gone."""
    send(cluster, "n1", ["early@reader.example"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        out = subprocess.run(
            [sys.executable, "-P", "-m", "smtpcluster.cli", "queue", "list", "--config",
             conf(cluster, "n1")],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert out.returncode == 141, out.stderr  # as a command killed by SIGPIPE
    assert out.stderr == ""
    # A `queue hold` of one recipient says so in the singular.
    ids = ok_json("queue", "list", "--domain", "reader.example", "--config", conf(cluster, "n2"))
    held = cli("queue", "hold", ids[0]["id"], "--config", conf(cluster, "n2"))
    assert held.returncode == 0 and held.stdout.strip() == "hold: 1 recipient changed", held


def post(c: SmtpCluster, nid: str, path: str, body: bytes) -> tuple[int, str]:
    """The status and error text of a raw POST to the admin API."""
    node = c.nodes[nid]
    req = urllib.request.Request(
        f"http://{node.host}:{node.admin_port}{path}", data=body, method="POST",
        headers={"Authorization": f"Bearer {c.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]


def test_the_api_answers_a_bad_request_with_4xx_from_any_node(cluster: SmtpCluster) -> None:
    """A JSON array for a body was a 500; a typo in join's address, or a transfer to a
    node that is not a voter, said 'cluster unavailable' (503) from a follower."""
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n != leader)
    for nid in (leader, follower):
        assert post(cluster, nid, "/v1/queue/hold", b"[]")[0] == 400
        both = post(cluster, nid, "/v1/queue/hold", b'{"ids": ["x"], "all": true}')
        assert both == (400, 'give "ids": [...] or "all": true, not both')
        narrowed = post(cluster, nid, "/v1/queue/hold", b'{"ids": ["x"], "domain": "d.example"}')
        assert narrowed == (400, 'domain narrow "all": true, not "ids"')
        bad_state = post(cluster, nid, "/v1/queue/hold", b'{"all": true, "state": "bogus"}')
        assert bad_state[0] == 400 and "use one of queued" in bad_state[1]
        code, why = post(cluster, nid, "/v1/cluster/join", b'{"id": "n9", "address": "typo"}')
        assert code == 400 and "host:port" in why, why
        code, why = post(cluster, nid, "/v1/cluster/join", b'{"id": "n9", "address": "::1:7409"}')
        assert code == 400 and "brackets" in why, why
        assert post(cluster, nid, "/v1/cluster/join", b'{"id": 5}')[0] == 400
        code, why = post(cluster, nid, "/v1/cluster/transfer-leader", b'{"id": "nobody"}')
        assert (code, why) == (409, "refused: nobody is not a voter"), (nid, why)
        # aiohttp's own refusals were plain text where docs/cli.md promises JSON
        assert post(cluster, nid, "/v1/nosuch", b"{}") == (404, "not found: POST /v1/nosuch")
        code, why = post(cluster, nid, "/v1/queue-stats", b"{}")
        assert (code, why) == (405, "method not allowed: POST /v1/queue-stats"), why
    try:
        cluster.admin(follower, "/v1/queue?state=bogus")
        raise AssertionError("an unknown state was taken")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400 and "use one of queued, assigned" in exc.read().decode()
    moved = cli("cluster", "transfer-leader", "nobody", "--config", conf(cluster, follower))
    assert moved.returncode == 1 and "nobody is not a voter" in moved.stderr


def test_a_join_of_a_member_or_at_a_members_address_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A typo: `cluster join n2 <wrong address>`. The refusal came after the address had
    been committed, so n2 was moved there in every log, and no leader reached it again."""
    with running(SmtpCluster(tmp_path)) as c:
        before = {m["id"]: m["address"] for m in ok_json("cluster", "status", "--config",
                                                          conf(c, "n1"))["members"]}  # fmt: skip
        wrong = f"127.0.0.2:{free_port('127.0.0.2')}"
        out = cli("cluster", "join", "n2", wrong, "--config", conf(c, "n3"))
        assert out.returncode == 1 and "n2 is already a member" in out.stderr, out.stderr
        after = {m["id"]: m["address"] for m in ok_json("cluster", "status", "--config",
                                                         conf(c, "n1"))["members"]}  # fmt: skip
        assert after == before and wrong not in after.values()
        # A new node at a member's address: the leader would replicate to n2 as to it.
        taken = after["n2"]
        out = cli("cluster", "join", "n9", taken, "--config", conf(c, "n3"))
        assert out.returncode == 1 and f"{taken} is the address of member n2" in out.stderr
        status = ok_json("cluster", "status", "--config", conf(c, "n1"))
        assert (status["voters"], status["learners"]) == (["n1", "n2", "n3"], [])
        assert takes_mail(c.nodes["n2"])
