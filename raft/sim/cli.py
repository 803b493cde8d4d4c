"""`raft-sim`: run the simulator over many seeds, or replay one with its trace."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterator

from raft.sim.options import SimOptions
from raft.sim.world import SimResult, run_seed


def _run(seed: int) -> SimResult:
    return run_seed(seed)


def run_many(start: int, count: int, workers: int) -> Iterator[SimResult]:
    seeds = range(start, start + count)
    if workers <= 1:
        yield from map(_run, seeds)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap_unordered(_run, seeds, chunksize=8)


def report_failure(r: SimResult) -> None:
    print(f"FAIL seed={r.seed}: {r.violation}")
    print(f"  options: {SimOptions.for_seed(r.seed).describe()}")
    print(f"  trace digest {r.digest}; replay with: raft-sim --seed {r.seed} --trace")
    for line in r.trace_tail:
        print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raft-sim", description=__doc__)
    p.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--seed", type=int, help="run just this seed")
    p.add_argument("--trace", action="store_true", help="with --seed: print the whole trace")
    args = p.parse_args(argv)

    if args.seed is not None:
        r = run_seed(args.seed, trace=args.trace)
        if args.trace:
            for line in r.trace:
                print(line)
        print(f"seed {r.seed}: {'ok' if r.ok else 'FAIL'} events={r.events} digest={r.digest}")
        print(f"  options: {SimOptions.for_seed(r.seed).describe()}")
        print(f"  stats: {dict(sorted(r.stats.items()))}")
        if not r.ok:
            report_failure(r)
        return 0 if r.ok else 1

    began = time.monotonic()
    failures: list[SimResult] = []
    events = done = 0
    for r in run_many(args.start, args.seeds, args.workers):
        done += 1
        events += r.events
        if not r.ok:
            failures.append(r)
            report_failure(r)
    elapsed = time.monotonic() - began
    print(
        f"{done} runs, {len(failures)} failed, {elapsed:.1f} s, "
        f"{done / elapsed:.1f} runs/s, {events / elapsed:.0f} events/s"
    )
    if failures:
        print(
            "failing seeds:", " ".join(str(r.seed) for r in sorted(failures, key=lambda r: r.seed))
        )
    return 1 if failures else 0


def entry() -> None:
    """Console entry point: exits quietly when its output is piped into `head`."""
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
