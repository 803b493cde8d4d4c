"""The chaos harness in CI: short runs on a few seeds find no violation, and the
harness has teeth: with a planted bug it reports the violation the bug causes.
Longer runs: `scripts/chaos --duration 1800` (docs/reliability.md)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.chaos.checker import Report, check_deliveries, check_destinations
from tests.chaos.harness import Harness, Options
from tests.chaos.nft import partitions_possible


@pytest.mark.parametrize("seed", [11, 12])
def test_no_violation_through_a_seeded_schedule_of_faults(seed: int, tmp_path: Path) -> None:
    report = Harness(Options(seed, 0, tmp_path, fault_every_s=5, faults=8)).run()
    print(report.table())
    assert report.violations == [], report.table()
    assert sum(report.faults.values()) == 8, report.table()
    assert report.accepted > 500, report.table()  # the faults met a real load


def test_a_node_short_of_disk_refuses_mail_and_loses_none(tmp_path: Path) -> None:
    opts = Options(13, 0, tmp_path, fault_every_s=5, kinds=("disk_low",), hold_s=3, faults=2)
    report = Harness(opts).run()
    assert report.violations == [], report.table()
    assert report.refused > 0, report.table()  # the fault bit: 452s while it held


def test_the_harness_sees_a_250_before_commit(tmp_path: Path) -> None:
    opts = Options(
        21, 0, tmp_path, fault_every_s=5, kinds=("kill9_leader", "partition_leader"),
        bugs=("early_250",), drain_limit_s=30, faults=4,
    )  # fmt: skip
    report = Harness(opts).run()
    assert any("never delivered" in v for v in report.violations), report.table()


@pytest.mark.skipif(not partitions_possible(), reason="partitions need root and nft")
def test_the_harness_sees_a_final_dot_without_its_fence(tmp_path: Path) -> None:
    # Cut off longer than the down detection (5 s): the leader hands the node's work
    # to others while it, unfenced, still sends the final dots it holds.
    opts = Options(
        22, 0, tmp_path, fault_every_s=10, kinds=("partition",), hold_s=8,
        bugs=("skip_fence",), drain_limit_s=30, faults=1,
    )  # fmt: skip
    report = Harness(opts).run()
    assert any("duplicates but only" in v for v in report.violations), report.table()


@pytest.mark.skipif(not partitions_possible(), reason="partitions need root and nft")
def test_no_violation_when_a_node_or_the_leader_hears_nothing_but_still_sends(
    tmp_path: Path,
) -> None:
    """The opt-in `deafen` faults: a node's Raft port blocked inbound only. Such a node
    was once given mail it never learned of, its pre-votes taken for signs of life."""
    opts = Options(
        23, 0, tmp_path, fault_every_s=5, kinds=("deafen", "deafen_leader"), faults=3,
    )  # fmt: skip
    report = Harness(opts).run()
    assert report.violations == [], report.table()
    assert sum(report.faults.values()) == 3, report.table()


def test_the_checker_sees_a_recipient_at_another_domains_host() -> None:
    """What the worker did before cc971cd with a message to two destinations: both
    recipients went to the first one's host."""
    smarthost = Counter({"m1@dest.example": 1, "m1@routed.example": 1})
    report = Report(0)
    check_destinations(report, smarthost, Counter(), "routed.example")
    assert report.violations == ["1 sent to another domain's host, e.g. m1@routed.example"]
    right = Report(0)
    check_destinations(right, Counter({"m1@dest.example": 1}), Counter({"m1@routed.example": 1}),
                       "routed.example")  # fmt: skip
    assert right.violations == []


def test_the_checker_counts_dsns_to_the_load_apart() -> None:
    """A bounced message's DSN to the load's sender read as a duplicate and as mail
    never sent; it is a bounce, which no injected fault should cause."""
    sent = {"m1@dest.example", "m2@dest.example"}
    counts = Counter({"m1@dest.example": 1, "load@example.org": 2})
    report = Report(0)
    check_deliveries(report, sent, set(), sent, counts, sender="load@example.org")
    assert (report.bounces, report.duplicates, report.delivered) == (2, 0, 1)
    assert report.violations == [
        "2 DSNs to load@example.org: messages bounced",
        "1 answered 250 never delivered, e.g. m2@dest.example",
    ]
