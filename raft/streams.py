"""Byte sources read as files by decoders: a stream of snapshot chunks, consumed
lazily; a large frame, read where it lies."""

from __future__ import annotations

import io
from collections.abc import Iterator


class ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def reader(chunks: Iterator[bytes]) -> io.BufferedReader:
    return io.BufferedReader(ChunkReader(chunks))


class ViewReader(io.RawIOBase):
    """A file-like view of `data` from `start`: a read copies only what it returns.
    (A BytesIO shares a bytes object until written to, but copies a bytearray whole.)"""

    def __init__(self, data: bytes | bytearray | memoryview, start: int = 0) -> None:
        self._view = memoryview(data)
        self._pos = start

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._view.release()
        super().close()


def view(data: bytes | bytearray | memoryview, start: int = 0) -> io.BufferedReader:
    """`data` from `start` as a file. A large read goes from the view straight into the
    bytes it returns (BufferedReader reads past its buffer with readinto)."""
    return io.BufferedReader(ViewReader(data, start))
