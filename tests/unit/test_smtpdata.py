"""The DATA reader: the lone dot ends it, dots are unstuffed, limits hold, the rest stays."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpcluster.smtp_client import stuff
from smtpcluster.smtpdata import BLOCK, Data, DataBudget, DataState, longest_line_over, read_data

LINE_LIMIT = 1001  # aiosmtpd's


def read(
    pieces: list[bytes], max_size: int = 10_000, budget: DataBudget | None = None,
    block: int = BLOCK,
) -> tuple[Data, bytes, int]:  # fmt: skip
    """Feed `pieces` one by one (as separate arrivals); the data, what the reader still
    holds afterwards, and its limit then."""

    async def run() -> tuple[Data, bytes, int]:
        reader = asyncio.StreamReader(limit=LINE_LIMIT)

        async def feed() -> None:
            for p in pieces:
                reader.feed_data(p)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.get_running_loop().create_task(feed())
        data = await read_data(reader, max_size, LINE_LIMIT, budget or DataBudget(1 << 30), block)
        await feeder
        return data, await reader.read(), reader._limit  # type: ignore[attr-defined]

    return asyncio.run(run())


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def test_the_lone_dot_ends_the_data_and_what_follows_stays_for_the_next_command() -> None:
    data, rest, limit = read([b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"])
    assert data == Data(b"Subject: hi\r\n\r\nbody\r\n", DataState.NOMINAL)
    assert rest == b"QUIT\r\n" and limit == LINE_LIMIT


def test_empty_data_and_lines_that_merely_end_with_a_dot() -> None:
    assert read([b".\r\n"])[0] == Data(b"", DataState.NOMINAL)
    data, _, _ = read([b"Sentence.\r\n.\r\n"])
    assert data.content == b"Sentence.\r\n"


def test_leading_dots_are_unstuffed() -> None:
    data, _, _ = read([b"..hidden\r\nplain\r\n...two\r\n.\r\n"])
    assert data.content == b".hidden\r\nplain\r\n..two\r\n"


def test_the_end_may_arrive_split_over_many_reads() -> None:
    wire = b"line one.\r\n.. dotted\r\n.\r\nNOOP\r\n"
    data, rest, _ = read([bytes([b]) for b in wire])
    assert data.content == b"line one.\r\n. dotted\r\n" and rest == b"NOOP\r\n"


def test_too_much_data_is_read_to_its_end_and_thrown_away() -> None:
    body = (b"x" * 78 + b"\r\n") * 200  # 16 KB against a 10 KB limit
    data, rest, _ = read([body, b".\r\nRSET\r\n"])
    assert data == Data(b"", DataState.TOO_MUCH) and rest == b"RSET\r\n"


def test_far_too_much_data_on_one_line_is_thrown_away_as_it_comes() -> None:
    pieces = [b"y" * 65536] * 40 + [b"\r\n.\r\nRSET\r\n"]  # 2.5 MB, one line, 10 KB limit
    data, rest, _ = read(pieces)
    assert data == Data(b"", DataState.TOO_MUCH) and rest == b"RSET\r\n"


def test_a_line_over_the_limit_is_refused() -> None:
    data, rest, _ = read([b"ok\r\n" + b"z" * 1000 + b"\r\n.\r\nQUIT\r\n"])
    assert data == Data(b"", DataState.TOO_LONG) and rest == b"QUIT\r\n"
    assert read([b"z" * 999 + b"\r\n.\r\n"])[0].state is DataState.NOMINAL  # 1001 with CRLF


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"x", b"yy" * 3]), max_size=60),
    st.integers(2, 12),
)
def test_the_line_check_jumps_but_finds_what_splitting_into_lines_finds(
    parts: list[bytes], max_line: int
) -> None:
    raw = b"".join(parts)
    split = max(map(len, raw.split(b"\r\n"))) + 2 > max_line
    assert longest_line_over(raw, max_line) == split


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
             max_size=30),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
)  # fmt: skip
def test_what_the_client_stuffed_comes_back_exactly(lines: list[bytes], cuts: list[int]) -> None:
    """Cut anywhere on the wire, and read in blocks of any size (the end's CRLF may close
    one block and its dot open the next)."""
    wire = stuffed(lines) + b".\r\nNEXT\r\n"
    pieces, at = [], 0
    for k in range(len(wire)):  # cut the wire at arbitrary places
        size = cuts[k % len(cuts)]
        if at >= len(wire):
            break
        pieces.append(wire[at : at + size])
        at += size
    for block in (BLOCK, 3 + cuts[0] % 7):
        data, rest, _ = read(pieces, block=block)
        assert data == Data(b"".join(line + b"\r\n" for line in lines), DataState.NOMINAL)
        assert rest == b"NEXT\r\n"


def test_data_past_the_nodes_memory_budget_is_read_to_its_end_and_thrown_away() -> None:
    """Message data in memory is bounded across sessions (twenty 24 MiB messages at once
    had a node killed): the one that finds the budget spent gets NO_MEMORY (452), and
    what it had taken goes back at once; a message that fits holds its bytes until its
    reply, when the session gives them back."""
    budget = DataBudget(3000)
    budget.take(1000)  # another session's message
    body = (b"x" * 98 + b"\r\n") * 25  # 2500 bytes
    data, rest, _ = read([body[:1200], body[1200:], b".\r\nRSET\r\n"], budget=budget, block=64)
    assert data == Data(b"", DataState.NO_MEMORY) and rest == b"RSET\r\n"
    assert (budget.held, budget.refused) == (1000, 1)
    budget.give(1000)
    data, _, _ = read([body, b".\r\n"], budget=budget, block=64)
    assert data.state is DataState.NOMINAL and data.held == budget.held == len(body)
    # over max_size as well: the permanent refusal wins over the passing one
    data, _, _ = read([body * 5, b".\r\n"], budget=DataBudget(3000), block=64)
    assert data.state is DataState.TOO_MUCH


def test_a_client_that_hangs_up_mid_data_ends_the_read_with_nothing() -> None:
    budget = DataBudget(1 << 20)
    with pytest.raises(asyncio.IncompleteReadError):  # no lone dot, then end of stream
        read([b"Subject: half\r\n\r\nand then"], budget=budget, block=8)
    assert budget.held == 0  # what it had taken is given back


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a.b", b" .", b"\r"]), max_size=20)
)
def test_our_clients_stuffing_is_what_this_reader_undoes(parts: list[bytes]) -> None:
    """smtp_client.stuff (the delivering side) against the RFC's rule, and through the
    DATA reader (the accepting side) back to the body."""
    body = b"\r\n".join(parts)
    wire = stuff(body)
    crlf_body = body if body.endswith(b"\r\n") else body + b"\r\n"
    assert wire == re.sub(rb"(?m)^\.", b"..", crlf_body)  # a dot opening a line doubled
    if b"\n" not in body.replace(b"\r\n", b""):  # the reader refuses bare LF elsewhere
        data, _, _ = read([wire + b".\r\n"], max_size=1 << 20)
        assert data.content == crlf_body
