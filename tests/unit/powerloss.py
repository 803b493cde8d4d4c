"""An in-memory FileSystem that forgets, on `crash()`, everything not made durable.

File contents become durable on sync(); names (creations, renames, removals) become
durable on sync_dir() of their directory, as on a POSIX file system after power loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class CrashNow(Exception):
    """Raised by the file system to simulate power failing at that instant."""


@dataclass
class _Inode:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class _File:
    def __init__(self, fs: PowerLossFS, inode: _Inode) -> None:
        self.fs, self.inode = fs, inode

    def write(self, data: bytes) -> None:
        self.fs.step()
        self.inode.data += data

    def sync(self) -> None:
        self.fs.step()
        self.inode.durable = bytes(self.inode.data)

    def close(self) -> None:
        pass


class PowerLossFS:
    def __init__(self, crash_after: int | None = None) -> None:
        self.names: dict[str, _Inode] = {}
        self.durable_names: dict[str, _Inode] = {}
        self.dirs: set[str] = set()
        self.ops = 0
        self.crash_after = crash_after

    def step(self) -> None:
        self.ops += 1
        if self.crash_after is not None and self.ops > self.crash_after:
            raise CrashNow

    def crash(self) -> None:
        self.names = dict(self.durable_names)
        for inode in self.names.values():
            inode.data = bytearray(inode.durable)
        self.crash_after = None

    # ---- FileSystem

    def makedirs(self, path: str) -> None:
        self.dirs.add(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.path.basename(p) for p in self.names if os.path.dirname(p) == path)

    def read(self, path: str) -> bytes:
        return bytes(self.names[path].data)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        return bytes(self.names[path].data[offset : offset + length])

    def open_append(self, path: str) -> _File:
        self.step()
        if path not in self.names:
            self.names[path] = _Inode()
        return _File(self, self.names[path])

    def truncate(self, path: str, size: int) -> None:
        inode = self.names[path]
        del inode.data[size:]
        inode.durable = bytes(inode.data)

    def rename(self, src: str, dst: str) -> None:
        self.step()
        self.names[dst] = self.names.pop(src)

    def remove(self, path: str) -> None:
        self.step()
        del self.names[path]

    def sync_dir(self, path: str) -> None:
        self.step()
        for name in [n for n in self.durable_names if os.path.dirname(n) == path]:
            del self.durable_names[name]
        for name, inode in self.names.items():
            if os.path.dirname(name) == path:
                self.durable_names[name] = inode

    def size(self, path: str) -> int:
        return len(self.names[path].data)

    def exists(self, path: str) -> bool:
        return path in self.names
