"""Errors of the storage layer."""

from __future__ import annotations


class StorageError(Exception):
    """The node's data directory cannot be used as it is."""


class CorruptLogError(StorageError):
    """A record in the middle of the log is damaged: start-up must stop.

    Silently skipping it could drop an acknowledged entry or vote; the operator has to
    decide (restore this node from a peer, or from a backup).
    """

    def __init__(self, path: str, offset: int, why: str) -> None:
        super().__init__(f"corrupt write-ahead log record in {path} at byte offset {offset}: {why}")
        self.path = path
        self.offset = offset
