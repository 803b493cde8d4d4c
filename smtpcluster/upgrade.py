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
