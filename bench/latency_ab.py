"""The idle tail, build against build: issue 5's sequential client on fresh 3-node
clusters, two builds taking turns.

    PYTHONPATH=. .venv/bin/python -m bench.latency_ab --against REV [--rounds 4]
    PYTHONPATH=. .venv/bin/python -m bench.latency_ab --set delivery.destination_concurrency=4

"A" is this checkout as it is. "B" is git revision REV, checked out into a temporary
worktree, and/or a config with `--set SECTION.KEY=VALUE` lines added (repeatable; the
value is TOML). Each round starts a fresh cluster for each build (three `smtpcluster
serve` processes relaying to one `smtp-sink`, as in bench.smtp_bench), sends
`--messages` sequential 1 KiB messages to a follower on one SMTP session, and times the
end of DATA to the 250; the first 50 are warm-up. The builds alternate which goes
first: this VM drifts within minutes, and the second of a pair did worse more often,
whichever build it was. The figures differ from round to round by more than most
changes do, so compare medians and pairs won, never one round.

Both builds run on this checkout's virtual environment. Its editable install maps
`mailqueue` to the directory it was installed from, and `queue/` cannot be imported
under that name from a plain path: each build's node processes get a directory that
links `mailqueue` to its own `queue/` ahead of everything else, and the bench checks
where each package is imported from before a round. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.smtp_bench import latency, sink_cluster
from tests import DIRECTORIES, foreign

REPO = Path(__file__).resolve().parents[1]
WARM_UP = 50


@dataclass
class Build:
    name: str
    tree: Path  # a checkout: its raft/, queue/ and smtpcluster/ are what the nodes run
    settings: list[tuple[str, str]] = field(default_factory=list)  # (section, "key = value")
    env: dict[str, str] = field(default_factory=dict)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)

    def label(self) -> str:
        added = ", ".join(f"{s}.{line}" for s, line in self.settings)
        return f"{self.name}: {self.tree}" + (f" with {added}" if added else "")


def setting(text: str) -> tuple[str, str]:
    """`SECTION.KEY=VALUE` as (section, "KEY = VALUE")."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SECTION.KEY=VALUE")
    return section, f"{key} = {value.strip()}"


def prepare(build: Build, shims: Path) -> None:
    """The environment for `build`'s node processes, checked by importing its packages
    as a node would."""
    shim = shims / build.name
    shim.mkdir()
    (shim / "mailqueue").symlink_to(build.tree / "queue")
    build.env = {"PYTHONPATH": os.pathsep.join([str(shim), str(build.tree)])}
    names = ", ".join(DIRECTORIES)
    probe = f"import {names}; print('\\n'.join(m.__path__[0] for m in ({names})))"
    paths = subprocess.run(
        [sys.executable, "-P", "-c", probe], env={**os.environ, **build.env},
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if wrong := foreign(dict(zip(DIRECTORIES, map(Path, paths), strict=True)), build.tree):
        raise SystemExit(f"{build.name} would not run {build.tree}: {', '.join(wrong)}")


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """Revision `rev` of this repository, checked out in a temporary directory."""
    where = Path(tempfile.mkdtemp(prefix="latency-ab-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(where), rev],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                       check=False)  # fmt: skip
        shutil.rmtree(where.parent, ignore_errors=True)


def one_round(build: Build, messages: int) -> str:
    with sink_cluster("latency-ab-") as cluster:
        for nid in cluster.nodes:
            for section, line in build.settings:
                cluster.add_setting(nid, section, line)
            cluster.start(nid, env=build.env)
        leader = cluster.leader()
        front = next(node for nid, node in cluster.nodes.items() if nid != leader)
        took = sorted(latency(front.host, front.smtp_port, messages + WARM_UP)[WARM_UP:])
    p50, p99 = (took[int(len(took) * q)] * 1000 for q in (0.5, 0.99))
    build.p50.append(p50)
    build.p99.append(p99)
    return f"{build.name} p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def report(a: Build, b: Build) -> None:
    print("\n| build | p50 (ms), each round | p99 (ms), each round | median p50 | median p99 |")
    print("|---|---|---|---|---|")
    for build in (a, b):
        p50s = ", ".join(f"{v:.2f}" for v in build.p50)
        p99s = ", ".join(f"{v:.2f}" for v in build.p99)
        print(f"| {build.name} | {p50s} | {p99s} | {statistics.median(build.p50):.2f} "
              f"| {statistics.median(build.p99):.2f} |")  # fmt: skip
    won = sum(pb < pa for pa, pb in zip(a.p99, b.p99, strict=True))
    print(f"\nB had the lower p99 in {won} of {len(a.p99)} rounds.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--against", metavar="REV", help="B runs this git revision")
    parser.add_argument(
        "--set", dest="settings", action="append", type=setting, default=[],
        metavar="SECTION.KEY=VALUE", help="B's config adds this (repeatable)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4, help="rounds per build")
    parser.add_argument("--messages", type=int, default=3000, help="timed messages per round")
    args = parser.parse_args()
    if not args.against and not args.settings:
        parser.error("give --against REV, --set SECTION.KEY=VALUE, or both")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(worktree(args.against)) if args.against else REPO
        a, b = Build("A", REPO), Build("B", tree, args.settings)
        shims = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="latency-ab-")))
        for build in (a, b):
            prepare(build, shims)
            print(build.label())
        for turn in range(args.rounds):
            pair = (a, b) if turn % 2 == 0 else (b, a)
            print(f"round {turn + 1}: " + "; ".join(one_round(x, args.messages) for x in pair),
                  flush=True)  # fmt: skip
    report(a, b)


if __name__ == "__main__":
    main()
