"""Durable storage for a Raft node: a segmented write-ahead log and snapshot files."""

from raft.storage.errors import CorruptLogError, StorageError, WrongOwner
from raft.storage.fs import FileSystem, OsFileSystem
from raft.storage.store import Storage, owner_of

__all__ = [
    "CorruptLogError", "FileSystem", "OsFileSystem", "Storage", "StorageError", "WrongOwner",
    "owner_of",
]  # fmt: skip
