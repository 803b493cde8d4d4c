"""RFC 2034: every 2xx, 4xx and 5xx reply carries an enhanced status code."""

from __future__ import annotations

import pytest

from smtpcluster.status_codes import with_status_code


@pytest.mark.parametrize(
    ("reply", "coded"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("252 Cannot VRFY user", "252 2.0.0 Cannot VRFY user"),
        ('500 Error: command "X" not recognized', '500 5.5.2 Error: command "X" not recognized'),
        ("501 Syntax: VRFY <address>", "501 5.5.4 Syntax: VRFY <address>"),
        ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("530 Must issue STARTTLS first", "530 5.7.0 Must issue STARTTLS first"),
        ("555 RCPT TO parameters not recognized", "555 5.5.4 RCPT TO parameters not recognized"),
        ("454 TLS not available", "454 4.7.0 TLS not available"),
        ("451 try later", "451 4.0.0 try later"),
        ("550 no", "550 5.0.0 no"),
        ("250-first line", "250-2.0.0 first line"),
        ("250", "250 2.0.0"),
    ],
)
def test_a_reply_without_a_code_gets_its_own_or_its_class_s(reply: str, coded: str) -> None:
    assert with_status_code(reply) == coded


@pytest.mark.parametrize(
    "reply",
    [
        "250 2.1.0 Ok",
        "554 5.7.1 Relaying denied",
        "421 4.7.0 Too many errors, closing connection",
        "250 2.0.0",
        "354 End data with <CR><LF>.<CR><LF>",  # 3xx: RFC 2034 gives them none
        "334 VXNlcm5hbWU6",
    ],
)
def test_a_reply_with_a_code_or_a_3xx_is_left_alone(reply: str) -> None:
    assert with_status_code(reply) == reply


def test_a_number_in_the_text_is_not_taken_for_a_code() -> None:
    assert with_status_code("250 1.2.3.4 is fine") == "250 2.0.0 1.2.3.4 is fine"
