"""Deliberately broken cores: the simulator must catch each of them.

Each overrides one of the core's seams (see raft.core.Raft) with a classic Raft bug.
"""

from __future__ import annotations

from raft.core import Raft
from raft.types import HardState, RequestVote


class CommitsOldTermByCounting(Raft):
    """(a) Commits a previous term's entry once a majority stores it (Raft figure 8)."""

    def _can_commit(self, index: int) -> bool:
        return True


class VotesWithoutLogCheck(Raft):
    """(b) Grants votes without checking that the candidate's log is up to date."""

    def _vote_log_ok(self, m: RequestVote) -> bool:
        return True


class ForgetsToPersistVote(Raft):
    """(c) Answers votes without making the vote durable: a restart forgets it."""

    def _persisted_hard_state(self) -> HardState:
        return HardState(self.term, None, self.log.committed)


class AppliesBeforeCommit(Raft):
    """(d) Applies entries as soon as they are stored, before they are committed."""

    def _apply_limit(self) -> int:
        return self.log.handed


class CountsItsCopyBeforeItIsDurable(Raft):
    """(e) A follower counts its own copy towards a commit (Persisted) before writing it."""

    def _own_durable(self) -> int:
        return self.log.last_index()


MUTANTS: dict[str, type[Raft]] = {
    "commit-old-term": CommitsOldTermByCounting,
    "vote-without-log-check": VotesWithoutLogCheck,
    "vote-not-persisted": ForgetsToPersistVote,
    "apply-before-commit": AppliesBeforeCommit,
    "count-copy-not-durable": CountsItsCopyBeforeItIsDurable,
}
