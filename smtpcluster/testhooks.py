"""Faults the chaos harness injects into a node, and the bugs it must be able to see.

Off unless the environment names them; no config key turns them on.

SMTPCLUSTER_TEST_FSYNC_DELAY_FILE  a file holding a number of milliseconds: every
    fsync of the Raft log first sleeps that long (a slow disk); the harness rewrites
    the file to start and end the fault. Holding "eio", every fsync fails as a dead
    disk's does.
SMTPCLUSTER_TEST_FORMAT  a number: the node says it reads replicated formats up to it,
    as a later release would, for the rolling-upgrade tests.
SMTPCLUSTER_TEST_BUGS  comma-separated bugs, to prove the harness has teeth:
    "skip_fence"  the worker sends the final dot without committing BeginDot;
    "early_250"   the front end answers 250 before its Accept is committed.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from raft.types import Ready

BUGS = ("skip_fence", "early_250")


@dataclass(frozen=True)
class TestHooks:
    bugs: frozenset[str] = frozenset()
    fsync_delay_file: str = ""
    format: int = 0  # 0: this release's own (mailqueue.commands.FORMAT)

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> TestHooks:
        env = os.environ if env is None else env
        bugs = frozenset(b for b in env.get("SMTPCLUSTER_TEST_BUGS", "").split(",") if b)
        if unknown := bugs - set(BUGS):
            raise ValueError(f"SMTPCLUSTER_TEST_BUGS: unknown {sorted(unknown)}")
        fmt = int(env.get("SMTPCLUSTER_TEST_FORMAT", "0") or 0)
        return TestHooks(bugs, env.get("SMTPCLUSTER_TEST_FSYNC_DELAY_FILE", ""), fmt)

    @property
    def skip_fence(self) -> bool:
        return "skip_fence" in self.bugs

    @property
    def early_250(self) -> bool:
        return "early_250" in self.bugs

    def slow_disk(self, save: Callable[[Ready], None]) -> Callable[[Ready], None]:
        """`save` (a storage's), delayed before each fsync as the delay file says."""
        if not self.fsync_delay_file:
            return save
        path = self.fsync_delay_file

        def delayed(rd: Ready) -> None:
            if rd.must_sync():
                if _read(path) == "eio":
                    raise OSError(errno.EIO, "injected disk failure (test hook)")
                # In the fsync thread, as a disk would. Not time.sleep: under libfaketime
                # (the chaos harness's clock jumps) it fails with EINVAL.
                threading.Event().wait(_delay_ms(path) / 1000)
            save(rd)

        return delayed


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


def _delay_ms(path: str) -> float:
    try:
        return max(0.0, float(_read(path) or 0))
    except ValueError:
        return 0.0
