"""raft: a deterministic Raft consensus core. Knows nothing of SMTP.

The core (`raft.core.Raft`) does no I/O; a runtime drives it through `tick`, `step`,
`propose`, `read_index` and `ready`/`advance`. `raft.sim` runs it in a seeded simulator.
"""

from raft.core import (
    ConfChangeRefused,
    Config,
    InitialState,
    NotLeader,
    Raft,
    RaftError,
    Role,
    SnapshotSource,
    TransferInProgress,
)
from raft.types import (
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    ReadState,
    Ready,
    SnapshotMeta,
)

__all__ = [
    "ConfChange",
    "ConfChangeOp",
    "ConfChangeRefused",
    "ConfState",
    "Config",
    "Entry",
    "EntryKind",
    "HardState",
    "InitialState",
    "Message",
    "NotLeader",
    "Raft",
    "RaftError",
    "ReadState",
    "Ready",
    "Role",
    "SnapshotMeta",
    "SnapshotSource",
    "TransferInProgress",
]
