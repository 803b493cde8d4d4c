"""What a DKIM signature costs the node that takes a message: smtpcluster.dkim against
dkimpy (pure-Python RSA), by message size, on the event loop's thread.

    PYTHONPATH=. .venv/bin/python -m bench.dkim_bench

Bodies of 78-byte lines with runs of spaces and tabs in them (the canonicalization's
worst ordinary case). Not a test: it prints figures.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpcluster.dkim import SIGNED, DkimKey, Signer

HEAD = b"From: app@example.com\r\nTo: someone@example.net\r\nSubject: bench\r\n\r\n"


def per_call_ms(fn: Callable[[], object], budget_s: float = 1.0) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget_s or calls < 3:
        fn()
        calls += 1
    return elapsed / calls * 1000


def main() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.pem").write_bytes(pem)
        signer = Signer([DkimKey.load("example.com", "s", str(Path(tmp) / "k.pem"))])
    headers = [h.encode() for h in SIGNED]
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M')}, RSA 2048")
    print("| message | smtpcluster.dkim ms | dkimpy ms |")
    print("|---|---|---|")
    for size in (1 << 10, 100 << 10, 1 << 20, 10 << 20):
        msg = HEAD + (b"x  y\t" * 15 + b"x\r\n") * (size // 78)
        ours = per_call_ms(lambda: signer.signature(msg, 1))  # noqa: B023
        theirs = per_call_ms(
            lambda: dkimpy.sign(msg, b"s", b"example.com", pem, include_headers=headers)  # noqa: B023
        )
        print(f"| {size >> 10} KiB | {ours:.2f} | {theirs:.2f} |")


if __name__ == "__main__":
    main()
