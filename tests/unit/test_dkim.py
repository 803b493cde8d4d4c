"""DKIM signing checked by an independent verifier (dkimpy), on messages hypothesis
makes hard: folded fields, runs of spaces and tabs, repeated fields, trailing blank
lines. Which key signs, and which key files are refused."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpcluster.dkim import DkimKey, DkimKeyError, Signer, relaxed_body

NOW = 1_795_856_333


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    path = tmp_path_factory.mktemp("dkim") / "example.com.key"
    path.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    return DkimKey.load("Example.COM", "s2026", str(path))


def verifies(key: DkimKey, signed: bytes) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{key.selector}._domainkey.{key.domain}.".encode()
        return key.public_record().encode()

    return bool(dkimpy.verify(signed, dnsfunc=dns))


def test_a_plain_message_is_signed_and_verifies(key: DkimKey) -> None:
    msg = b"From: Ann <ann@example.com>\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
    sig = Signer([key]).signature(msg, NOW)
    assert sig.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b"d=example.com;" in sig and b"s=s2026;" in sig and b"h=from:to:subject:from;" in sig
    assert max(len(line) for line in sig.split(b"\r\n")) <= 78
    assert verifies(key, sig + msg)
    assert not verifies(key, sig + msg.replace(b"hello", b"jello"))  # the body is covered
    assert not verifies(key, sig + msg.replace(b"bob@", b"eve@"))  # and To
    # a second From added in transit breaks it (From is signed once more than present)
    assert not verifies(key, sig + b"From: eve@evil.example\r\n" + msg)


def test_the_from_domain_or_a_parent_chooses_the_key(key: DkimKey) -> None:
    signer = Signer([key])
    for sender, signed in [
        ("ann@example.com", True), ("ann@mail.Example.com", True),
        ("ann@notexample.com", False), ("ann@example.org", False), ("", False),
    ]:  # fmt: skip
        msg = f"From: {sender}\r\nSubject: x\r\n\r\nbody\r\n".encode()
        assert bool(signer.signature(msg, NOW)) is signed, sender
    assert Signer([]).signature(b"From: a@example.com\r\n\r\nx\r\n", NOW) == b""


def test_a_unicode_domain_is_signed_in_its_ascii_form(key: DkimKey, tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(key.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    unicode_key = DkimKey.load("Bücher.example", "s1", str(path))
    assert unicode_key.domain == "xn--bcher-kva.example"
    signer = Signer([unicode_key])
    for sender in ("a@bücher.example", "a@xn--bcher-kva.example", "a@mail.BÜCHER.example"):
        msg = f"From: {sender}\r\nSubject: x\r\n\r\nbody\r\n".encode()
        sig = signer.signature(msg, NOW)
        assert b"d=xn--bcher-kva.example;" in sig and sig.isascii(), sender


WSP = st.text(" \t", min_size=0, max_size=3)
VALUE_WORD = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)


@st.composite
def value(draw: st.DrawFn) -> str:
    """A field value: words between runs of WSP, sometimes folded onto a next line."""
    out = ""
    for word in draw(st.lists(VALUE_WORD, min_size=1, max_size=5)):
        gap = draw(WSP) or " "
        out += (f"\r\n{gap}" if draw(st.booleans()) and out else gap) + word
    return out + draw(WSP)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    names = st.sampled_from(["To", "Cc", "Subject", "X-Mailer", "Received", "Date", "to"])
    fields = [f"{n}:{draw(value())}" for n in draw(st.lists(names, max_size=6))]
    fields.insert(draw(st.integers(0, len(fields))), f"From:{draw(WSP)}a@example.com")
    body_line = st.builds(lambda w, x: w + x + w, WSP, st.text("ab \t.", max_size=20))
    body = "".join(f"{line}\r\n" for line in draw(st.lists(body_line, max_size=8)))
    return ("\r\n".join(fields) + "\r\n\r\n" + body + "\r\n" * draw(st.integers(0, 3))).encode()


@settings(max_examples=150, deadline=None)
@given(msg=message())
def test_whatever_the_spacing_and_folding_the_signature_verifies(key: DkimKey, msg: bytes) -> None:
    sig = Signer([key]).signature(msg, NOW)
    assert sig and verifies(key, sig + msg)


def reference_relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 as the RFC words it, a line at a time."""
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and not lines[-1]:
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.text(" \tab", max_size=6).map(str.encode), max_size=12),
    end=st.sampled_from([b"", b"\r\n"]),
    chunk=st.integers(1, 20),
)
def test_relaxed_body_in_chunks_is_the_rfcs_line_by_line(
    lines: list[bytes], end: bytes, chunk: int
) -> None:
    body = b"\r\n".join(lines) + end
    assert relaxed_body(body, chunk) == reference_relaxed_body(body)


def test_relaxed_body_canonical_form() -> None:
    # RFC 6376 3.4.6's example, and the empty body (relaxed: nothing at all)
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"
    assert relaxed_body(b"") == b"" and relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"no final line end") == b"no final line end\r\n"


def test_key_files_that_cannot_sign_are_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.key"  # cryptography will not make one so short; openssl will
    subprocess.run(
        ["openssl", "genrsa", "-out", str(short), "768"], check=True, capture_output=True
    )
    curve = tmp_path / "ec.key"
    curve.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    for path, problem in [
        (short, "768 bits: at least 1024"), (curve, "not an RSA key"),
        (junk, "not a PEM private key"), (tmp_path / "none.key", "cannot read"),
    ]:  # fmt: skip
        with pytest.raises(DkimKeyError, match=problem):
            DkimKey.load("example.com", "s", str(path))
