"""Three (and four) real node processes on 127.0.0.1-3, killed and restarted for real."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kvcluster import KVCluster, wait_for


async def _put_many(
    cluster: KVCluster, keys: list[str], nodes: list[str] | None, workers: int = 16
) -> set[str]:
    """Puts through persistent connections spread over `nodes` (default: the live
    ones); returns the keys that were acknowledged."""
    acked: set[str] = set()
    todo = list(keys)
    live = nodes or cluster.live()

    async def worker(k: int) -> None:
        p = cluster.procs[live[k % len(live)]]
        reader, writer = await asyncio.open_connection(p.host, p.client_port)
        while todo:
            key = todo.pop()
            req = {"op": "put", "key": key, "value": key.upper()}
            writer.write(json.dumps(req).encode() + b"\n")
            answer = json.loads(await reader.readline())
            if answer["ok"]:
                acked.add(key)
        writer.close()

    await asyncio.gather(*(worker(k) for k in range(workers)))
    return acked


def put_many(cluster: KVCluster, keys: list[str], nodes: list[str] | None = None) -> set[str]:
    return asyncio.run(_put_many(cluster, keys, nodes))


def dump(cluster: KVCluster, nid: str) -> dict[str, str]:
    answer = cluster.call(nid, {"op": "dump"})
    assert answer["ok"], answer
    data: dict[str, str] = answer["data"]
    return data


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[KVCluster]:
    opts = getattr(request, "param", {})
    c = KVCluster(tmp_path, ["n1", "n2", "n3"], **opts)
    try:
        yield c
    finally:
        c.stop_all()


def test_replication_failover_and_full_restart(cluster: KVCluster) -> None:
    cluster.start_all()
    first = cluster.leader()

    keys = [f"a{k}" for k in range(1000)]
    assert put_many(cluster, keys) == set(keys)
    for nid in cluster.live():
        assert len(dump(cluster, nid)) == 1000

    cluster.kill(first)  # kill -9 of the leader
    second = cluster.leader()
    assert second != first
    term = cluster.call(second, {"op": "status"})["term"]
    more = [f"b{k}" for k in range(200)]
    assert put_many(cluster, more) == set(more)
    data = dump(cluster, second)
    assert all(data[k] == k.upper() for k in keys + more)  # nothing acknowledged was lost
    assert term > 1

    cluster.start(first)  # the old leader comes back and catches up
    wait_for("the old leader to catch up", lambda: len(dump(cluster, first)) == 1200)

    cluster.stop_all()  # a full-cluster restart restores everything from disk
    cluster.start_all()
    cluster.leader()
    for nid in cluster.live():
        restored = dump(cluster, nid)
        assert len(restored) == 1200 and all(restored[k] == k.upper() for k in keys + more)


@pytest.mark.parametrize("cluster", [{"snapshot-entries": 20}], indirect=True)
def test_new_node_joins_through_a_snapshot_is_promoted_and_a_node_is_removed(
    cluster: KVCluster,
) -> None:
    cluster.start_all()
    keys = [f"k{k}" for k in range(500)]
    assert put_many(cluster, keys) == set(keys)
    leader = cluster.leader()
    wait_for("a snapshot", lambda: cluster.call(leader, {"op": "status"})["snapshot_index"] > 0)
    written = cluster.call(leader, {"op": "status"})["applied"]  # concurrent puts share entries

    n4 = cluster.add_proc("n4", "127.0.0.1")
    cluster.start("n4", join=True)
    answer = cluster.call(leader, {"op": "add_learner", "id": "n4", "addr": n4.raft_addr})
    assert answer["ok"], answer
    status = wait_for(
        "n4 to catch up",
        lambda: (s := cluster.call("n4", {"op": "status"}))["applied"] >= written and s,
    )
    assert status["snapshot_index"] > 0  # it arrived as a snapshot, not entry by entry
    assert status["learners"] == ["n4"]
    assert len(dump(cluster, "n4")) == 500

    assert cluster.call(leader, {"op": "promote", "id": "n4"})["ok"]
    wait_for(
        "n4 to vote",
        lambda: cluster.call("n4", {"op": "status"})["voters"] == ["n1", "n2", "n3", "n4"],
    )

    victim = next(n for n in ["n1", "n2", "n3"] if n != leader)
    assert cluster.call(leader, {"op": "remove", "id": victim})["ok"]
    remaining = sorted({"n1", "n2", "n3", "n4"} - {victim})
    wait_for(
        "the removal to apply",
        lambda: all(cluster.call(n, {"op": "status"})["voters"] == remaining for n in remaining),
    )
    cluster.kill(victim)
    more = [f"m{k}" for k in range(50)]
    assert put_many(cluster, more) == set(more)


def test_a_peer_without_the_cluster_key_can_neither_vote_nor_append(
    cluster: KVCluster, tmp_path: Path
) -> None:
    cluster.start_all()
    leader = cluster.leader()
    assert put_many(cluster, ["before"]) == {"before"}
    term = cluster.call(leader, {"op": "status"})["term"]
    impostor = next(n for n in ["n1", "n2", "n3"] if n != leader)
    cluster.kill(impostor)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"not-the-cluster-key")
    cluster.start(impostor, key_file=wrong)

    def refused() -> bool:
        logs = [(tmp_path / f"{n}.log").read_text() for n in ["n1", "n2", "n3"]]
        return all("refused" in text for text in logs)

    wait_for("both sides to refuse the impostor", refused)
    honest = [n for n in ["n1", "n2", "n3"] if n != impostor]
    assert put_many(cluster, ["after"], honest) == {"after"}
    for nid in honest:
        s = cluster.call(nid, {"op": "status"})
        assert s["term"] == term and s["leader"] == leader
    fake = cluster.call(impostor, {"op": "status"})
    assert (
        fake["leader"] is None and fake["commit"] < cluster.call(leader, {"op": "status"})["commit"]
    )
    cluster.kill(impostor, signal.SIGTERM)
