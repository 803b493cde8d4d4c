"""The simulator runs the real core through every fault kind and finds real bugs."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from raft.core import Raft
from raft.sim import SimOptions, run_seed
from raft.sim.world import SimResult
from tests.sim.mutants import MUTANTS

SEEDS = 2000  # the issue asks for at least 500 with every fault kind enabled
WORKERS = max(2, os.cpu_count() or 2)


def _run(seed: int) -> SimResult:
    return run_seed(seed)


def _mutant_factory(name: str) -> Callable[..., Raft]:
    cls = MUTANTS[name]

    def make(*args: Any) -> Raft:
        return cls(*args)

    return make


def _run_mutant(job: tuple[str, int]) -> SimResult:
    name, seed = job
    return run_seed(seed, factory=_mutant_factory(name))


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork"))


def test_every_fault_kind_is_exercised() -> None:
    totals: dict[str, int] = {}
    for seed in range(40):
        for k, v in run_seed(seed).stats.items():
            totals[k] = totals.get(k, 0) + v
    for kind in [
        "fault:crash", "fault:partition", "fault:one-way", "fault:isolate", "fault:bridge",
        "fault:isolate-leader", "fault:transfer", "conf:add_learner", "conf:promote",
        "conf:remove", "InstallSnapshot", "TimeoutNow", "ReadIndexRequest", "reads-answered",
        "snapshot", "elections", "net:drop", "net:duplicate", "disk:torn-write",
    ]:  # fmt: skip
        assert totals.get(kind, 0) > 0, f"{kind} never happened in 40 seeds"


def test_many_seeds_keep_every_safety_and_liveness_property() -> None:
    with _pool() as pool:
        failures = [r for r in pool.map(_run, range(SEEDS), chunksize=10) if not r.ok]
    report = "\n".join(f"seed {r.seed}: {r.violation}" for r in failures[:5])
    assert not failures, f"{len(failures)} seeds failed; replay with raft-sim --seed N\n{report}"


def test_a_seed_replays_the_identical_trace_in_another_process() -> None:
    seed = 7
    here = run_seed(seed)
    code = f"from raft.sim import run_seed; print(run_seed({seed}).digest)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashing differs across processes
    there = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert here.digest == there.stdout.strip() == run_seed(seed).digest
    assert here.events > 1000


def test_options_vary_with_the_seed() -> None:
    shapes = {SimOptions.for_seed(s).describe() for s in range(50)}
    assert len(shapes) > 40


def test_overriding_snapshot_entries_keeps_the_cap_above_it() -> None:
    for seed in range(20):
        drawn = SimOptions.for_seed(seed)
        opts = SimOptions.for_seed(seed, snapshot_entries=50_000)
        assert opts.snapshot_entries_max >= 3 * 50_000
        assert (
            opts.snapshot_entries_max // 50_000
            == drawn.snapshot_entries_max // drawn.snapshot_entries
        )
        assert opts.drop == drawn.drop  # the rest of the shape is the seed's
    assert SimOptions.for_seed(1, snapshot_entries_max=7).snapshot_entries_max == 7


# Each classic bug must be caught within this many seeds (they are found within a few
# dozen today; the margin absorbs changes to the simulator's random choices).
MUTANT_SEED_BUDGET = 400


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_checker_catches_a_planted_bug(name: str) -> None:
    jobs = [(name, seed) for seed in range(MUTANT_SEED_BUDGET)]
    with _pool() as pool:
        for r in pool.map(_run_mutant, jobs, chunksize=10):
            if not r.ok:
                pool.shutdown(cancel_futures=True)
                return
    pytest.fail(f"{name} survived {MUTANT_SEED_BUDGET} seeds")


def test_a_failing_seed_reproduces_its_violation_and_trace() -> None:
    factory = _mutant_factory("vote-without-log-check")
    first = next(r for r in (run_seed(s, factory=factory) for s in range(100)) if not r.ok)
    again = run_seed(first.seed, factory=factory)
    assert (again.ok, again.violation, again.digest) == (False, first.violation, first.digest)
    assert again.trace_tail == first.trace_tail
