"""The partitions' nftables: each process has its own table, so that a test run on the
same machine cannot delete a chaos soak's rules under it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.chaos import nft

pytestmark = pytest.mark.skipif(not nft.partitions_possible(), reason="needs root and nft")

ROOT = pathlib.Path(__file__).resolve().parents[2]
HOLD = """
import sys
from tests.chaos.nft import Partitions
p = Partitions()
p.deafen(1)
print("ready", flush=True)
sys.stdin.read()
"""


def tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], check=True, capture_output=True, text=True)
    return {ln.split()[-1] for ln in out.stdout.splitlines() if ln.startswith("table inet ")}


def test_another_runs_partitions_leave_ours_alone_and_a_dead_runs_go() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-P", "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        theirs = f"{nft.PREFIX}_{holder.pid}"
        assert theirs in tables()
        nft.Partitions().close()  # what a test run's collection does
        assert theirs in tables()  # it used to delete the one table all runs shared
        holder.kill()  # a crash: no atexit
        holder.wait()
        assert theirs in tables()
        nft.Partitions().close()
        assert theirs not in tables()
    finally:
        holder.kill()
        holder.wait()
