"""The front end's fast path for MAIL/RCPT addresses gives exactly aiosmtpd's answer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from smtpcluster.config import SmtpSection
from smtpcluster.frontend import FrontendSMTP, Handler, smtp_factory

CASES = [
    "<a@b.c>", "<a@b.c> SIZE=10 BODY=8BITMIME", "<first.last+tag@sub.example.org>",
    "<a%b@c>", "<a!b@c.d>", '<"q@x"@c.d>', "<a@[1.2.3.4]>", "<>", "<@a:b@c>", "<A@B.C.>",
    "<a..b@c>", "<a@-b.c>", "<josé@x.y>", "<a@b.c>junk", "<a@b_c.d>", "<a@b.c>  ",
    "<" + "x" * 70 + "@long.example>", "a@b.c", "<a@b.c", "<a@b.c>>",
]  # fmt: skip


def session() -> FrontendSMTP:
    cfg = SmtpSection(hostname="parse.test")
    made = smtp_factory(Handler(cfg, "n1", None))()  # type: ignore[arg-type]
    assert isinstance(made, FrontendSMTP)
    return made


def outcome(parse: Callable[[str], object], arg: str) -> object:
    """The answer, or the kind of exception (aiosmtpd raises on some junk, e.g. '<')."""
    try:
        return parse(arg)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("arg", CASES)
def test_known_shapes_parse_as_aiosmtpd_parses_them(arg: str) -> None:
    s = session()
    assert s._getaddr(arg) == SMTP._getaddr(s, arg)


@given(st.text(alphabet='<>@.a-_%!"[]: =+Zé', max_size=30))
def test_any_argument_parses_as_aiosmtpd_parses_it(arg: str) -> None:
    s = session()
    assert outcome(s._getaddr, arg) == outcome(lambda a: SMTP._getaddr(s, a), arg)


@pytest.mark.parametrize(
    "arg", ["<a\x00b@c.d>", "<a@b\x01.c>", '<"a\rb"@c.d>', "<a\x7f@b.c>", "<caf\udce9@c.d>"]
)
def test_an_address_holding_a_control_character_is_malformed(arg: str) -> None:
    """aiosmtpd takes them; aiosmtplib will not send them, so such a recipient would
    never leave the queue (and a CR in it would end a line): MAIL and RCPT get 553.
    So does a byte that is not UTF-8, which aiosmtpd keeps as a lone surrogate."""
    assert session()._getaddr(arg) == (None, None)
