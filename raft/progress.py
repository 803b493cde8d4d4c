"""The leader's view of one follower's log: how far it matches and how to feed it.

Modelled on etcd's tracker.Progress. PROBE sends one AppendEntries at a time until the
follower's match is found; REPLICATE streams optimistically with at most
`max_inflight` unacknowledged messages; SNAPSHOT sends InstallSnapshot chunks one at a
time because the entries the follower needs are compacted away.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from raft.types import SnapshotMeta


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass(slots=True)
class Progress:
    """Invariant: match < next."""

    next: int
    match: int = 0
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False  # PROBE: an append is in flight, wait for its answer
    inflight: list[int] = field(default_factory=list)  # REPLICATE: last index of each message
    recent_active: bool = True
    told_commit: int = 0  # the highest commit index sent to it (entries or heartbeat)
    snapshot: SnapshotMeta | None = None
    snapshot_offset: int = 0

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT and self.snapshot is not None:
            self.next = max(self.match + 1, self.snapshot.index + 1)
        else:
            self.next = self.match + 1
        self._reset(ProgressState.PROBE)

    def become_replicate(self) -> None:
        self.next = self.match + 1
        self._reset(ProgressState.REPLICATE)

    def become_snapshot(self, meta: SnapshotMeta) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.snapshot = meta
        self.snapshot_offset = 0

    def _reset(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.inflight.clear()
        self.snapshot = None
        self.snapshot_offset = 0

    def is_paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True

    def sent_entries(self, last: int) -> None:
        if self.state is ProgressState.REPLICATE:
            self.inflight.append(last)
            self.next = last + 1
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement that the follower's log matches ours up to `index`."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        self.inflight = [i for i in self.inflight if i > index]
        return updated

    def maybe_decrease(self, rejected: int, probe_from: int) -> bool:
        """A rejection of the append whose prev_index was `rejected`.

        Returns False for a stale rejection (one that answers an older message): acting
        on it would rewind `next` needlessly (etcd PR #1207).
        """
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, probe_from + 1), self.match + 1)
        self.probe_sent = False
        return True
