"""Errors of the storage layer."""

from __future__ import annotations


class StorageError(Exception):
    """The node's data directory cannot be used as it is."""


class WrongOwner(StorageError):
    """The directory holds another node's Raft state (swapped configs, a cloned VM).
    Started on it, this node would vote again in terms the owner voted in, and would
    lack entries the owner acknowledged: two leaders in one term, or committed mail
    lost, become possible. No restart mends it."""

    def __init__(self, directory: str, owner: str, claimant: str) -> None:
        super().__init__(
            f"{directory} holds the Raft state of node {owner!r}, and this node is "
            f"{claimant!r}: a node may only ever run on its own data. Check node.id and "
            "node.data_dir in the config"
        )


class CorruptLogError(StorageError):
    """A record in the middle of the log is damaged: start-up must stop.

    Silently skipping it could drop an acknowledged entry or vote; the operator has to
    decide (restore this node from a peer, or from a backup).
    """

    def __init__(self, path: str, offset: int, why: str) -> None:
        super().__init__(f"corrupt write-ahead log record in {path} at byte offset {offset}: {why}")
        self.path = path
        self.offset = offset
