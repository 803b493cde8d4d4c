"""Authenticated TCP between Raft peers: length-prefixed frames, one connection per
peer and direction, bounded queues, reconnect with backoff.

Authentication with a shared cluster key: at connect the server sends a random nonce,
the client answers with its id, its own nonce and an HMAC over both; the server proves
itself the same way. Both then derive a session key, and every frame carries an HMAC of
(direction, sequence number, payload): a peer without the key can neither read a frame
nor inject, replay or reorder one. (Frames are not encrypted; use a private network or
the TLS mode for confidentiality.) Nothing is decoded before authentication succeeds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cbor2

from raft import codec
from raft.codec import Pieces
from raft.types import NodeId

log = logging.getLogger(__name__)

MAGIC = b"SMTPCLUSTER-RAFT-1"
_LEN = struct.Struct("<I")
MAC_BYTES = 16
MAX_FRAME = 64 << 20  # the largest payload; larger is an attack or a bug
# A payload over WHOLE_MAX goes in pieces of PIECE_BYTES (to a peer that said it reads
# them: Transport.set_reads_pieces), and urgent payloads queued meanwhile (heartbeats,
# votes, answers) go between the pieces: behind a 40 MiB entry in one piece, a heartbeat
# arrived after the election timeout, and elections followed.
# Each piece's header says it is one (_MORE) or the last one (_LAST), under its MAC.
WHOLE_MAX = 2 << 20
PIECE_BYTES = 1 << 20
_MORE, _LAST = 1 << 31, 1 << 30
_FLAGS = _MORE | _LAST
HANDSHAKE_TIMEOUT = 5.0
READ_CHUNK = 256 << 10


class AuthError(Exception):
    """The other side does not hold the cluster key."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @staticmethod
    def parse(text: str) -> Address:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {text!r}")
        if not 0 < int(port) < 65536:
            raise ValueError(f"port {port} is out of range (1-65535) in {text!r}")
        return Address(host.strip("[]"), int(port))

    @staticmethod
    def parse_typed(text: str) -> Address:
        """An address as a person writes it (config, CLI): parse(), and an IPv6 address
        must be in brackets. "::1:2525" could be [::1]:2525, or ::1:2525 with its port
        left out. parse() stays lenient for what is already in logs and snapshots."""
        addr = Address.parse(text)
        host = text.rpartition(":")[0]
        bracketed = host.startswith("[") and host.endswith("]")
        if ":" in addr.host and not bracketed:
            raise ValueError(f"an IPv6 address goes in brackets, as [::1]:25; got {text!r}")
        if "[" in addr.host or "]" in addr.host or not addr.host:
            raise ValueError(f"expected host:port or [IPv6]:port, got {text!r}")
        return addr

    def __str__(self) -> str:
        # Bracketed, so that it parses back, and a reader can tell the port from the
        # last group of an IPv6 address.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class _Session:
    """Per-connection MAC state. Each direction has its own key and sequence."""

    def __init__(self, key: bytes, nonce_s: bytes, nonce_c: bytes, is_client: bool) -> None:
        k = hmac.new(key, b"session" + nonce_s + nonce_c, hashlib.sha256).digest()
        self._send_key = hmac.new(k, b"c2s" if is_client else b"s2c", hashlib.sha256).digest()
        self._recv_key = hmac.new(k, b"s2c" if is_client else b"c2s", hashlib.sha256).digest()
        self._send_seq = 0
        self._recv_seq = 0
        self._pieces = bytearray()  # a payload arriving in pieces, so far

    def seal(self, payload: bytes, piece: int = 0) -> bytes:
        """A frame of `payload`, whole (`piece` 0) or one piece of a larger one (_MORE,
        or _LAST for its last piece)."""
        header = _LEN.pack(len(payload) | piece)
        mac = _mac(self._send_key, self._send_seq, header if piece else b"", payload)
        self._send_seq += 1
        return header + payload + mac

    def unseal(self, buf: bytearray) -> Iterator[bytes | bytearray]:
        """The payloads of the complete frames at the start of `buf`, in order; what
        they used is removed from `buf`, a partial frame stays. Raises AuthError at the
        first frame that fails its MAC (the ones before it were good). Reading whole
        chunks and splitting them here costs one await per chunk, where three per frame
        (length, payload, MAC) were a good part of a follower's time."""
        pos = 0
        try:
            while len(buf) - pos >= _LEN.size:
                (raw,) = _LEN.unpack_from(buf, pos)
                piece, length = raw & _FLAGS, raw & ~_FLAGS
                if length > MAX_FRAME or piece == _FLAGS:
                    raise AuthError(f"frame of {length} bytes refused")
                end = pos + _LEN.size + length
                if len(buf) < end + MAC_BYTES:
                    return
                header = bytes(buf[pos : pos + _LEN.size]) if piece else b""
                payload = bytes(buf[pos + _LEN.size : end])
                mac = bytes(buf[end : end + MAC_BYTES])
                if not hmac.compare_digest(
                    mac, _mac(self._recv_key, self._recv_seq, header, payload)
                ):
                    raise AuthError("frame MAC mismatch")
                self._recv_seq += 1
                pos = end + MAC_BYTES
                if not piece:
                    yield payload
                    continue
                self._pieces += payload
                if len(self._pieces) > MAX_FRAME:
                    raise AuthError(f"frame of over {MAX_FRAME} bytes in pieces refused")
                if piece == _LAST:
                    # As it is: bytes() of it was one more copy, alive with it while
                    # it was made and then with what was decoded from it.
                    whole, self._pieces = self._pieces, bytearray()
                    yield whole
        finally:
            del buf[:pos]


def _mac(key: bytes, seq: int, header: bytes, payload: bytes) -> bytes:
    # A whole frame's header stays out of its MAC, as before pieces existed; a piece's is
    # in it, so that nobody can make a piece of a whole frame or the reverse.
    return hmac.digest(key, _LEN.pack(seq) + header + payload, "sha256")[:MAC_BYTES]


def _proof(key: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, role + b"".join(parts), hashlib.sha256).digest()


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, me: NodeId
) -> _Session:
    hello = await reader.readexactly(len(MAGIC) + 32)
    if not hello.startswith(MAGIC):
        raise AuthError("not a raft peer")
    nonce_s, nonce_c = hello[len(MAGIC) :], os.urandom(32)
    proof = _proof(key, b"client", nonce_s, nonce_c, me.encode())
    body = cbor2.dumps([me, nonce_c, proof])
    writer.write(_LEN.pack(len(body)) + body)
    await writer.drain()
    answer = await reader.readexactly(32)
    if not hmac.compare_digest(answer, _proof(key, b"server", nonce_c, nonce_s, me.encode())):
        raise AuthError("server does not hold the cluster key")
    return _Session(key, nonce_s, nonce_c, is_client=True)


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes
) -> tuple[NodeId, _Session]:
    nonce_s = os.urandom(32)
    writer.write(MAGIC + nonce_s)
    await writer.drain()
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > 1024:
        raise AuthError("oversized hello")
    hello = await reader.readexactly(length)
    try:
        peer, nonce_c, proof = cbor2.loads(hello)
        ok = isinstance(peer, str) and isinstance(nonce_c, bytes) and len(nonce_c) == 32
    except Exception as exc:
        raise AuthError("malformed hello") from exc
    if not ok or not hmac.compare_digest(
        proof, _proof(key, b"client", nonce_s, nonce_c, peer.encode())
    ):
        raise AuthError(f"peer claiming to be {peer!r:.40} does not hold the cluster key")
    writer.write(_proof(key, b"server", nonce_c, nonce_s, peer.encode()))
    await writer.drain()
    return peer, _Session(key, nonce_s, nonce_c, is_client=False)


def _sealed(queue: collections.deque[bytes | Pieces], session: _Session) -> list[bytes]:
    return [session.seal(codec.joined(queue.popleft())) for _ in range(len(queue))]


def _size(payload: bytes | Pieces) -> int:
    return payload.size if isinstance(payload, Pieces) else len(payload)


def _cut(payload: bytes | Pieces, n: int) -> Iterator[bytes]:
    """The payload in pieces of `n` bytes (the last one may be shorter), each copied
    from where its bytes lie: the payload itself is never joined."""
    parts = payload.parts if isinstance(payload, Pieces) else [payload]
    out: list[memoryview] = []
    have = 0
    for part in parts:
        view = memoryview(part)
        while view:
            take = view[: n - have]
            out.append(take)
            have += len(take)
            view = view[len(take) :]
            if have == n:
                yield b"".join(out)
                out, have = [], 0
    if out:
        yield b"".join(out)


class _Peer:
    def __init__(self, addr: Address, limit: int) -> None:
        self.addr = addr
        self.queue: collections.deque[bytes | Pieces] = collections.deque(maxlen=limit)
        self.urgent: collections.deque[bytes | Pieces] = collections.deque(maxlen=limit)
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.connected = False
        # Whether the peer said it reads pieces: a release before them refuses a piece's
        # header as an oversized frame, so until then a large payload goes whole.
        self.pieces = False


class Transport:
    """Delivers opaque payloads to peers; the node decides what they mean."""

    def __init__(
        self,
        me: NodeId,
        listen: Address,
        key: bytes,
        on_frame: Callable[[NodeId, bytes | bytearray], None],
        *,
        queue_limit: int = 4096,
        hello: bytes = b"",
    ) -> None:
        self.me = me
        # Sent first on every connection this node opens, so that a peer always has this
        # process's word, whichever of them restarted last.
        self._hello = hello
        self.listen = listen
        wildcard = listen.host in ("", "0.0.0.0", "::")
        self._source = None if wildcard else (listen.host, 0)
        self._key = key
        self._on_frame = on_frame
        self._limit = queue_limit
        self._peers: dict[NodeId, _Peer] = {}
        self._server: asyncio.Server | None = None
        self._inbound: set[asyncio.Task[None]] = set()
        self.auth_failures = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.listen.host, self.listen.port, reuse_address=True
        )

    def set_peer(self, node: NodeId, addr: Address) -> None:
        if node == self.me:
            return
        peer = self._peers.get(node)
        if peer is not None and peer.addr == addr:
            return
        if peer is not None and peer.task is not None:
            peer.task.cancel()
        peer = _Peer(addr, self._limit)
        self._peers[node] = peer
        peer.task = asyncio.get_running_loop().create_task(self._sender(node, peer))

    def peers(self) -> dict[NodeId, Address]:
        return {n: p.addr for n, p in self._peers.items()}

    def send(self, to: NodeId, payload: bytes | Pieces, *, urgent: bool = False) -> None:
        """Queue a payload. A full queue drops the oldest: Raft resends what matters.
        Payloads go in the order they were sent, except that an urgent one (no larger
        than WHOLE_MAX) may pass the others, and go between the pieces of a large one.
        A payload in Pieces (codec.frame) is cut into pieces where its parts lie."""
        peer = self._peers.get(to)
        if peer is None:
            return
        queue = peer.urgent if urgent and _size(payload) <= WHOLE_MAX else peer.queue
        if len(queue) == queue.maxlen:
            peer.dropped += 1
        queue.append(payload)
        peer.ready.set()

    def set_reads_pieces(self, node: NodeId, reads: bool) -> None:
        """What the peer said (in its hello): whether it reads payloads in pieces."""
        peer = self._peers.get(node)
        if peer is not None:
            peer.pieces = reads

    def is_connected(self, node: NodeId) -> bool:
        peer = self._peers.get(node)
        return peer is not None and peer.connected

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [p.task for p in self._peers.values() if p.task] + list(self._inbound)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # ---- outbound

    async def _sender(self, node: NodeId, peer: _Peer) -> None:
        backoff = 0.05
        while True:
            writer = None
            try:
                # From our own listen address: peers (and firewalls) see the address
                # the cluster knows this node by, not whatever the route picks.
                reader, writer = await asyncio.open_connection(
                    peer.addr.host, peer.addr.port, local_addr=self._source
                )
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    session = await client_handshake(reader, writer, self._key, self.me)
                peer.connected, backoff = True, 0.05
                await self._pump(peer, session, writer)
            except asyncio.CancelledError:
                raise
            except AuthError as exc:
                self.auth_failures += 1
                log.warning("peer %s at %s refused: %s", node, peer.addr, exc)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.debug("peer %s at %s unreachable: %s", node, peer.addr, exc)
            except Exception:
                # Whatever broke this connection, the sender must live on: a dead sender
                # task would cut this peer off for good, silently.
                log.exception("connection to peer %s at %s failed", node, peer.addr)
            finally:
                peer.connected = False
                if writer is not None:
                    writer.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _pump(self, peer: _Peer, session: _Session, writer: asyncio.StreamWriter) -> None:
        if self._hello:
            writer.write(session.seal(self._hello))
        while True:
            if not peer.queue and not peer.urgent:
                peer.ready.clear()
                await peer.ready.wait()
            # One write for everything queued: a system call per frame cost more than
            # the frames' MACs under load.
            if writer.is_closing():
                # The peer reset the connection while there was nothing to send (a
                # killed node): uvloop would refuse the write with a RuntimeError.
                raise ConnectionResetError("connection closed by the peer")
            frames = _sealed(peer.urgent, session)
            while peer.queue:
                payload = peer.queue.popleft()
                if _size(payload) <= WHOLE_MAX or not peer.pieces:
                    frames.append(session.seal(codec.joined(payload)))
                    continue
                writer.write(b"".join(frames))
                frames = []
                await self._in_pieces(peer, session, writer, payload)
            writer.write(b"".join(frames))
            await writer.drain()

    async def _in_pieces(
        self,
        peer: _Peer,
        session: _Session,
        writer: asyncio.StreamWriter,
        payload: bytes | Pieces,
    ) -> None:
        """A large payload a piece at a time, each written once the peer has read most
        of the one before, with the urgent payloads queued meanwhile in between."""
        size, sent = _size(payload), 0
        for piece in _cut(payload, PIECE_BYTES):
            if writer.is_closing():  # reset between pieces: as in _pump, not a bug
                raise ConnectionResetError("connection closed by the peer")
            sent += len(piece)
            writer.write(session.seal(piece, _LAST if sent >= size else _MORE))
            await writer.drain()
            if peer.urgent:
                writer.write(b"".join(_sealed(peer.urgent, session)))

    # ---- inbound

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inbound.add(task)
        where = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                peer, session = await server_handshake(reader, writer, self._key)
            buf = bytearray()
            while chunk := await reader.read(READ_CHUNK):
                buf += chunk
                for payload in session.unseal(buf):
                    self._on_frame(peer, payload)
        except AuthError as exc:
            self.auth_failures += 1
            log.warning("connection from %s refused: %s", where, exc)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # close() ends this connection. Ending the task normally, not cancelled:
            # Python 3.11's start_server callback calls exception() on the finished
            # task, which raises for a cancelled one and logs an ERROR at every stop.
            pass
        finally:
            self._inbound.discard(task)
            writer.close()
