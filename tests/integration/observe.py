"""A node seen as an operator sees it: its /metrics, scraped as Prometheus does and
parsed with prometheus-client's parser, and the command-line client."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.smtpnodes import SmtpCluster

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(c: SmtpCluster, nid: str) -> Samples:
    node = c.nodes[nid]
    req = urllib.request.Request(
        f"http://{node.host}:{node.admin_port}/metrics",
        headers={"Authorization": f"Bearer {c.token}"},
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "smtpcluster.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
