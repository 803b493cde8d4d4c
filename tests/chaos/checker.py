"""The product's promise, checked from outside once the faults stop and the queue
drains: every 250 delivered, duplicates no more than the cluster's `uncertain`
count, nothing refused delivered, at most one leader per term."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from pathlib import Path

LEADER_LINE = re.compile(r"raft: (\S+) became leader in term (\d+)")


@dataclass
class Report:
    seed: int
    sent: int = 0
    accepted: int = 0
    refused: int = 0
    unknown: int = 0
    delivered: int = 0
    bounces: int = 0  # DSNs delivered to the load's sender
    duplicates: int = 0
    uncertain: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    max_unavailable_s: float = 0.0  # the longest time no client got a 250
    longest_wait_s: float = 0.0  # the longest one transaction waited for its answer
    healthy_after_last_fault_s: float = 0.0
    elections: int = 0
    violations: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("seed", self.seed), ("messages offered", self.sent),
            ("recipients accepted (250)", self.accepted),
            ("recipients refused (4xx/5xx)", self.refused),
            ("recipients without a reply", self.unknown),
            ("recipients delivered", self.delivered),
            ("bounces (DSNs to the load's sender)", self.bounces),
            ("duplicates (recipients)", self.duplicates),
            ("uncertain (cluster's count)", self.uncertain),
            ("leaderships", self.elections),
            ("max unavailability seen by clients", f"{self.max_unavailable_s:.1f} s"),
            ("longest wait for one reply", f"{self.longest_wait_s:.1f} s"),
            ("healthy after the last fault", f"{self.healthy_after_last_fault_s:.1f} s"),
        ]  # fmt: skip
        rows += [(f"faults: {k}", v) for k, v in sorted(self.faults.items())]
        rows += [("violations", len(self.violations))]
        width = max(len(k) for k, _ in rows)
        lines = [f"| {k:<{width}} | {v} |" for k, v in rows]
        return "\n".join(lines + [f"VIOLATION (seed {self.seed}): {v}" for v in self.violations])


def check_deliveries(
    report: Report,
    accepted: set[str],
    refused: set[str],
    offered: set[str],
    counts: collections.Counter[str],
    *,
    sender: str = "",
) -> None:
    """`counts`: deliveries per recipient. DSNs to `sender` (the load's) are counted
    apart: no fault the harness injects should bounce a message, and counted as
    deliveries they showed up as duplicates and as mail never sent, which said less."""
    counts = collections.Counter(counts)
    report.bounces = counts.pop(sender, 0)
    if report.bounces:
        report.violations.append(f"{report.bounces} DSNs to {sender}: messages bounced")
    delivered = set(counts)
    report.delivered = len(delivered)
    report.duplicates = sum(c - 1 for c in counts.values())
    if lost := accepted - delivered:
        report.violations.append(f"{len(lost)} answered 250 never delivered, e.g. {min(lost)}")
    if wrongly := refused & delivered:
        report.violations.append(f"{len(wrongly)} refused yet delivered, e.g. {min(wrongly)}")
    if foreign := delivered - offered:
        report.violations.append(f"{len(foreign)} delivered never sent, e.g. {min(foreign)}")
    if report.duplicates > report.uncertain:
        report.violations.append(
            f"{report.duplicates} duplicates but only {report.uncertain} uncertain"
        )


def check_destinations(
    report: Report,
    smarthost: collections.Counter[str],
    routed: collections.Counter[str],
    domain: str,
) -> None:
    """Each recipient reached its own domain's destination: the route's for `domain`,
    the smarthost's for the rest, though one message had one of each."""
    wrong = {r for r in smarthost if r.endswith("@" + domain)}
    wrong |= {r for r in routed if not r.endswith("@" + domain)}
    if wrong:
        report.violations.append(f"{len(wrong)} sent to another domain's host, e.g. {min(wrong)}")


def check_leaders(report: Report, logs: list[Path]) -> None:
    """Election Safety from every node's log: never two leaders in one term."""
    leaders: dict[int, set[str]] = collections.defaultdict(set)
    for path in logs:
        for node, term in LEADER_LINE.findall(path.read_text(errors="replace")):
            leaders[int(term)].add(node)
    report.elections = len(leaders)
    for term, nodes in sorted(leaders.items()):
        if len(nodes) > 1:
            report.violations.append(f"term {term} had leaders {sorted(nodes)}")
