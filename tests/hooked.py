"""`smtpcluster serve` with injected faults and planted bugs, for the chaos harness and
the integration tests. They live here, not in the product, so that no environment
variable can make a production node break its own guarantees.

    python -P -m tests.hooked serve --config FILE

Each is off unless the environment names it:

SMTPCLUSTER_TEST_FSYNC_DELAY_FILE  a file holding a number of milliseconds: every
    fsync of the Raft log first waits that long (a slow disk); the harness rewrites
    the file to start and end the fault. Holding "eio", every fsync fails as a dead
    disk's does.
SMTPCLUSTER_TEST_FORMAT  a number: the node says it reads replicated formats up to it,
    as a later release would, for the rolling-upgrade tests.
SMTPCLUSTER_TEST_BUGS  comma-separated bugs, to prove the harness has teeth:
    "skip_fence"  the worker sends the final dot without committing BeginDot;
    "early_250"   the front end answers 250 before its Accept is committed.

Each patches one method of the product's classes, found by name: a rename there
fails here at start (AttributeError), and tests/chaos/test_harness.py fails in CI.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailqueue import codec
from mailqueue.commands import Accept
from raft.types import Ready
from smtpcluster import cli, node, worker

log = logging.getLogger("tests.hooked")
BUGS = ("skip_fence", "early_250")
ENV_PREFIX = "SMTPCLUSTER_TEST_"


@dataclass(frozen=True)
class Hooks:
    bugs: frozenset[str] = frozenset()
    fsync_delay_file: str = ""
    format: int = 0  # 0: the release's own (mailqueue.commands.FORMAT)

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Hooks:
        bugs = frozenset(b for b in env.get("SMTPCLUSTER_TEST_BUGS", "").split(",") if b)
        if unknown := bugs - set(BUGS):
            raise ValueError(f"SMTPCLUSTER_TEST_BUGS: unknown {sorted(unknown)}")
        fmt = int(env.get("SMTPCLUSTER_TEST_FORMAT", "0") or 0)
        return Hooks(bugs, env.get("SMTPCLUSTER_TEST_FSYNC_DELAY_FILE", ""), fmt)


def install(hooks: Hooks) -> None:
    if hooks.format:
        _replace(node, "FORMAT", hooks.format)
    init = node.Node.__init__

    def hooked_init(self: node.Node, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if hooks.fsync_delay_file:
            self.raft.persist = slow_disk(self.raft.persist, hooks.fsync_delay_file)
        if hooks.bugs:
            log.critical("PLANTED TEST BUGS %s: this node breaks its own guarantees; for "
                         "the chaos harness only", sorted(hooks.bugs))  # fmt: skip

    _replace(node.Node, "__init__", hooked_init)
    if "early_250" in hooks.bugs:
        _replace(node.Node, "submit", _early_250())
    if "skip_fence" in hooks.bugs:
        _replace(worker.Worker, "_begin_dot", _skip_fence)


def _replace(owner: object, name: str, value: object) -> None:
    getattr(owner, name)  # what is patched must exist: a rename fails here, not silently
    setattr(owner, name, value)


def _early_250() -> Callable[..., Any]:
    planted: set[asyncio.Task[bytes]] = set()  # the proposals, kept from the collector

    async def submit(self: node.Node, cmd: Accept, timeout: float, *_: Any) -> bool:
        data = codec.encode(cmd)
        task = asyncio.get_running_loop().create_task(self.raft.propose(data, timeout))
        planted.add(task)
        task.add_done_callback(done)
        return True  # before the Accept is committed, or even in a log

    def done(task: asyncio.Task[bytes]) -> None:
        planted.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: such a proposal may fail, unnoticed

    return submit


async def _skip_fence(self: worker.Worker, *_: Any) -> tuple[bool, bool]:
    return True, True  # "BeginDot committed": it was never proposed


def slow_disk(save: Callable[[Ready], None], path: str) -> Callable[[Ready], None]:
    """`save` (a storage's), delayed before each fsync as the file at `path` says."""

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


def wants_hooks(env: Mapping[str, str]) -> bool:
    return any(k.startswith(ENV_PREFIX) and v for k, v in env.items())


if __name__ == "__main__":
    install(Hooks.from_env(os.environ))
    sys.exit(cli.main())
