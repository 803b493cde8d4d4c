"""Majority arithmetic, kept apart so that it is a pure function of its inputs."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping

from raft.types import NodeId


class VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


def majority(n_voters: int) -> int:
    return n_voters // 2 + 1


def committed_index(voters: Iterable[NodeId], match: Callable[[NodeId], int]) -> int:
    """The highest index that a majority of `voters` have durably stored."""
    acked = sorted((match(v) for v in voters), reverse=True)
    if not acked:
        return 0
    return acked[majority(len(acked)) - 1]


def vote_result(voters: tuple[NodeId, ...], votes: Mapping[NodeId, bool]) -> VoteResult:
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    need = majority(len(voters))
    if granted >= need:
        return VoteResult.WON
    if rejected > len(voters) - need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: tuple[NodeId, ...], acked: Callable[[NodeId], bool]) -> bool:
    return sum(1 for v in voters if acked(v)) >= majority(len(voters))
