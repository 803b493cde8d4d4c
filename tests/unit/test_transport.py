"""Peer authentication and frame integrity on real loopback sockets."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from raft import codec, transport
from raft.transport import (
    _LAST,
    _MORE,
    MAC_BYTES,
    MAGIC,
    PIECE_BYTES,
    Address,
    AuthError,
    Transport,
    _cut,
    _Session,
    client_handshake,
    server_handshake,
)
from tests.integration.kvcluster import free_port


async def _eventually(cond: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _pair(
    key_a: bytes, key_b: bytes
) -> tuple[Transport, Transport, list[tuple[str, bytes | bytearray]]]:
    got: list[tuple[str, bytes | bytearray]] = []
    a = Transport("a", Address("127.0.0.1", free_port("127.0.0.1")), key_a, lambda p, f: None)
    b = Transport(
        "b", Address("127.0.0.1", free_port("127.0.0.1")), key_b, lambda p, f: got.append((p, f))
    )
    await a.start()
    await b.start()
    a.set_peer("b", b.listen)
    return a, b, got


def test_frames_flow_between_peers_with_the_same_key() -> None:
    async def run() -> None:
        a, b, got = await _pair(b"k" * 32, b"k" * 32)
        for k in range(100):
            a.send("b", b"frame-%d" % k)
        await _eventually(lambda: len(got) == 100)
        assert got == [("a", b"frame-%d" % k) for k in range(100)]
        await a.close()
        await b.close()

    asyncio.run(run())


def _collect(
    into: list[tuple[str, bytes | bytearray]],
) -> Callable[[str, bytes | bytearray], None]:
    return lambda peer, frame: into.append((peer, frame))


def test_the_hello_comes_first_on_every_connection_the_peer_opens() -> None:
    """A node's word (the entry format it reads) must reach a peer again after either
    of them restarts, before anything else the node sends on that connection."""

    async def run() -> None:
        key = b"k" * 32
        a = Transport(
            "a", Address("127.0.0.1", free_port("127.0.0.1")), key, lambda p, f: None, hello=b"hi"
        )
        port = free_port("127.0.0.1")
        await a.start()
        for _ in range(2):  # b restarts: a connects again and says hello again
            got: list[tuple[str, bytes | bytearray]] = []
            b = Transport("b", Address("127.0.0.1", port), key, _collect(got))
            await b.start()
            a.set_peer("b", b.listen)
            deadline = asyncio.get_running_loop().time() + 10
            while not any(f == b"frame" for _, f in got):  # the old connection ate some
                assert asyncio.get_running_loop().time() < deadline, got
                a.send("b", b"frame")
                await asyncio.sleep(0.05)
            assert got[0] == ("a", b"hi")
            await b.close()
        await a.close()

    asyncio.run(run())


def test_a_peer_with_another_key_is_refused_and_delivers_nothing() -> None:
    async def run() -> None:
        a, b, got = await _pair(b"right" * 8, b"wrong" * 8)
        a.send("b", b"append entries, please")
        await _eventually(lambda: b.auth_failures > 1)  # refused, and again on retry
        assert got == []
        await a.close()
        await b.close()

    asyncio.run(run())


def test_a_tampered_frame_closes_the_connection_undelivered() -> None:
    async def run() -> None:
        got: list[tuple[str, bytes | bytearray]] = []
        b = Transport(
            "b",
            Address("127.0.0.1", free_port("127.0.0.1")),
            b"k" * 32,
            lambda p, f: got.append((p, f)),
        )
        await b.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", b.listen.port)
        session = await client_handshake(reader, writer, b"k" * 32, "a")
        good = session.seal(b"first")
        bad = bytearray(session.seal(b"second"))
        bad[6] ^= 1  # flip a payload bit: the MAC no longer matches
        writer.write(good + bytes(bad) + session.seal(b"third"))
        await writer.drain()
        await _eventually(lambda: b.auth_failures == 1)
        assert got == [("a", b"first")]
        assert len(good) == 4 + len(b"first") + MAC_BYTES
        writer.close()
        await b.close()

    asyncio.run(run())


def test_garbage_instead_of_a_handshake_is_refused() -> None:
    async def run() -> None:
        got: list[tuple[str, bytes | bytearray]] = []
        b = Transport(
            "b",
            Address("127.0.0.1", free_port("127.0.0.1")),
            b"k" * 32,
            lambda p, f: got.append((p, f)),
        )
        await b.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", b.listen.port)
        assert (await reader.readexactly(len(MAGIC) + 32)).startswith(MAGIC)
        writer.write(b"\x10\x00\x00\x00" + b"x" * 16)
        await writer.drain()
        await _eventually(lambda: b.auth_failures == 1)
        assert got == [] and await reader.read() == b""
        writer.close()
        await b.close()

    asyncio.run(run())


@pytest.mark.parametrize("text", ["127.0.0.1", "host:port", ":25"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        Address.parse(text)


def test_an_ipv6_address_is_written_in_brackets_and_read_back() -> None:
    """A peer's address is replicated as str(Address) and parsed on every node."""
    a = Address("2001:db8::7", 7400)
    assert str(a) == "[2001:db8::7]:7400"
    assert Address.parse(str(a)) == Address.parse_typed(str(a)) == a
    # What older builds wrote without brackets still reads back from a log or snapshot.
    assert Address.parse("2001:db8::7:7400") == a
    with pytest.raises(ValueError, match="brackets"):
        Address.parse_typed("2001:db8::7:7400")


def test_a_peer_that_dies_is_unreachable_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A peer killed outright resets the connection; uvloop then refuses the next write
    with a RuntimeError. That is a dead peer to retry, not a failure with a traceback
    at ERROR (it was logged so at every kill -9 of a node)."""

    async def run() -> None:
        key = b"k" * 32
        handshakes: list[bool] = []

        async def doomed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server_handshake(reader, writer, key)
            handshakes.append(True)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # close with a reset, as a killed process's kernel may

        server = await asyncio.start_server(doomed, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        a = Transport("a", Address("127.0.0.1", free_port("127.0.0.1")), key, lambda p, f: None)
        await a.start()
        a.set_peer("b", Address("127.0.0.1", port))
        await _eventually(lambda: handshakes)
        await asyncio.sleep(0.2)  # the reset arrives while the sender has nothing to send
        for _ in range(5):
            a.send("b", b"into the void")
            await asyncio.sleep(0.05)
        server.close()
        await a.close()

    with caplog.at_level(logging.DEBUG, logger="raft.transport"):
        uvloop.run(run())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("parts", [False, True], ids=["bytes", "Pieces"])
def test_a_large_payload_goes_in_pieces_and_urgent_ones_pass_it(
    parts: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a 40 MiB entry sent in one piece, a heartbeat arrived after the election
    timeout. A large payload now goes in pieces; an urgent payload passes it, and the
    others keep their order behind it. A payload in codec.Pieces arrives as the bytes
    it joins to, and is never joined on its way."""
    joined: list[int] = []
    join = codec.joined

    def counted(payload: bytes | codec.Pieces) -> bytes:
        joined.append(transport._size(payload))
        return join(payload)

    monkeypatch.setattr(codec, "joined", counted)

    async def run() -> None:
        a, b, got = await _pair(b"k" * 32, b"k" * 32)
        await _eventually(lambda: a.is_connected("b"))
        a.set_reads_pieces("b", True)
        big = os.urandom(5 * PIECE_BYTES + 12345)
        cuts = [0, 7, PIECE_BYTES, PIECE_BYTES + 1, 4 * PIECE_BYTES, len(big)]
        sent = codec.Pieces([big[i:j] for i, j in itertools.pairwise(cuts)], len(big))
        a.send("b", sent if parts else big)
        a.send("b", b"after")
        a.send("b", b"heartbeat", urgent=True)
        await _eventually(lambda: len(got) == 3)
        assert [f for _, f in got] == [b"heartbeat", big, b"after"]
        assert max(joined) < len(big), joined
        # Handed on as it was put together: bytes() of it was one more copy.
        assert isinstance(got[1][1], bytearray)
        await a.close()
        await b.close()

    asyncio.run(run())


def test_a_peer_that_has_not_said_it_reads_pieces_gets_a_large_payload_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release before pieces refuses a piece's header as an oversized frame, and
    with it the connection: until the peer's hello says "pieces", it gets whole frames."""
    pieces: list[int] = []
    seal = _Session.seal

    def counted(self: _Session, payload: bytes, piece: int = 0) -> bytes:
        pieces.append(piece)
        return seal(self, payload, piece)

    monkeypatch.setattr(_Session, "seal", counted)

    async def run() -> None:
        a, b, got = await _pair(b"k" * 32, b"k" * 32)
        await _eventually(lambda: a.is_connected("b"))
        big = os.urandom(3 * PIECE_BYTES)
        a.send("b", big)
        await _eventually(lambda: len(got) == 1)
        assert got == [("a", big)] and not any(pieces)
        a.set_reads_pieces("b", True)
        a.send("b", big)
        await _eventually(lambda: len(got) == 2)
        assert got[1] == ("a", big) and sum(1 for p in pieces if p) == 3
        await a.close()
        await b.close()

    asyncio.run(run())


def _sessions() -> tuple[_Session, _Session]:
    nonce_s, nonce_c = os.urandom(32), os.urandom(32)
    key = b"k" * 32
    return _Session(key, nonce_s, nonce_c, True), _Session(key, nonce_s, nonce_c, False)


def test_a_whole_frame_cannot_pass_for_a_piece_nor_a_piece_for_a_whole_frame() -> None:
    # The flags are the length's top bits (its last byte): whole -> first piece, first
    # piece -> last piece, last piece -> whole.
    for piece, flip in ((0, 0x80), (_MORE, 0xC0), (_LAST, 0x40)):
        sender, receiver = _sessions()
        frame = bytearray(sender.seal(b"payload", piece))
        frame[3] ^= flip
        with pytest.raises(AuthError, match="MAC"):
            list(receiver.unseal(frame))


def test_pieces_are_put_together_between_whole_frames() -> None:
    sender, receiver = _sessions()
    buf = bytearray(
        sender.seal(b"one ", _MORE) + sender.seal(b"urgent") + sender.seal(b"two", _LAST)
        + sender.seal(b"next")
    )  # fmt: skip
    assert list(receiver.unseal(buf)) == [b"urgent", b"one two", b"next"]
    assert buf == b""


def test_pieces_adding_up_past_the_largest_frame_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "MAX_FRAME", 10)
    sender, receiver = _sessions()
    buf = bytearray(sender.seal(b"x" * 8, _MORE) + sender.seal(b"x" * 8, _LAST))
    with pytest.raises(AuthError, match="in pieces refused"):
        list(receiver.unseal(buf))


def test_close_ends_a_sender_cancelled_as_its_handshake_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancel and the handshake's AuthError land in the same turn of the loop. With
    asyncio.wait_for (Python 3.11) the AuthError won: the sender counted a refusal,
    slept and connected again, for ever, and close() never returned."""

    async def run() -> None:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        began = asyncio.Event()

        async def handshake(*_: object) -> transport._Session:
            began.set()
            await failed  # the peer is about to refuse us
            raise AssertionError("unreachable")

        monkeypatch.setattr(transport, "client_handshake", handshake)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        a = Transport("a", Address("127.0.0.1", free_port("127.0.0.1")), b"k" * 32, print)
        a.set_peer("b", Address("127.0.0.1", port))
        await began.wait()
        failed.set_exception(AuthError("refused"))
        async with asyncio.timeout(5):  # no hang: a failure instead
            await a.close()
        assert a.auth_failures == 0  # cancelled, not counted and retried
        server.close()

    asyncio.run(run())


@given(st.lists(st.binary(max_size=50), max_size=8), st.integers(1, 40))
def test_a_payload_is_cut_into_pieces_of_the_size_asked(parts: list[bytes], n: int) -> None:
    payload = codec.Pieces(parts, sum(map(len, parts)))
    cut = list(_cut(payload, n))
    assert b"".join(cut) == b"".join(parts) and all(cut)
    assert all(len(piece) == n for piece in cut[:-1]) and all(len(p) <= n for p in cut)
    assert list(_cut(b"".join(parts), n)) == cut
