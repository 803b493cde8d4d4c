"""Rolling upgrades: when the cluster may start writing a newer replicated format.

A release that changes what goes into the Raft log or the spool's snapshots raises
mailqueue.commands.FORMAT and writes the new layout only once Spool.format, the
cluster's replicated format, has reached it. The leader raises Spool.format (SetFormat)
when every member has said at connect that it reads the new one (RaftNode.peer_formats),
as etcd raises its cluster version. A node that is not heard from holds the cluster
back: it could be an old version about to come back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from raft.types import NodeId


def format_to_set(
    current: int, members: Iterable[NodeId], format_of: Callable[[NodeId], int | None]
) -> int | None:
    """The format every member reads, when it is newer than `current`; else None."""
    said = [format_of(n) for n in members]
    if not said or any(f is None for f in said):
        return None
    newest = min(f for f in said if f is not None)
    return newest if newest > current else None


def holding_back(
    current: int, members: Iterable[NodeId], format_of: Callable[[NodeId], int | None]
) -> list[str]:
    """While some member reads a format newer than `current`, the members that keep the
    cluster at it and why ("n3: not heard from", "n2: reads 1"); else nothing."""
    said = {n: format_of(n) for n in members}
    if not any(f is not None and f > current for f in said.values()):
        return []
    return [
        f"{n}: not heard from" if f is None else f"{n}: reads {f}"
        for n, f in sorted(said.items())
        if f is None or f <= current
    ]
