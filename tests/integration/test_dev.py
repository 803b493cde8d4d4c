"""The README's first command, end to end: `scripts/dev` brings up the dev cluster, a
message sent with swaks to any node lands in DIR/delivered/, mail the capture sink
refuses on request shows a queue and a bounce, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from smtpcluster.dev import sink_refusal
from tests.integration.kvcluster import wait_for
from tests.integration.observe import cli

REPO = Path(__file__).resolve().parents[2]


def test_scripts_dev_delivers_a_swaks_message_into_the_capture_directory(
    tmp_path: Path,
) -> None:
    out = tmp_path / "dev.out"
    with open(out, "wb") as log:
        dev = subprocess.Popen(
            [str(REPO / "scripts" / "dev"), "--dir", str(tmp_path / "cluster")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for("the dev cluster", lambda: "ready" in out.read_text(), 120)
        guide = out.read_text()
        assert "swaks --server 127.0.0.1:2525" in guide and "delivered" in guide
        sent = subprocess.run(
            ["swaks", "--server", "127.0.0.1:2527", "--from", "first@example.org",
             "--to", "someone@example.com", "--body", "hello from the README"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0 and "queued as" in sent.stdout, sent.stdout
        delivered = tmp_path / "cluster" / "delivered"
        [eml] = wait_for("the message in delivered/", lambda: list(delivered.glob("*.eml")), 30)
        assert b"hello from the README" in eml.read_bytes()
        deferred_and_bounced(tmp_path / "cluster")
    finally:
        dev.send_signal(signal.SIGINT)
        code = dev.wait(60)
    assert code == 0
    assert "smtpcluster dev: stopped" in out.read_text()
    pattern = str(tmp_path / "cluster")
    left = subprocess.run(["pgrep", "-f", pattern], check=False, capture_output=True)
    assert left.stdout == b"", "node processes outlived Ctrl-C"


def swaks(to: str) -> None:
    sent = subprocess.run(
        ["swaks", "--server", "127.0.0.1:2526", "--from", "first@example.org", "--to", to],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == 0 and "queued as" in sent.stdout, sent.stdout


def deferred_and_bounced(root: Path) -> None:
    """The guide's promise: defer@ waits in the queue, bounce@ comes back to the sender."""
    swaks("defer@example.com")
    swaks("bounce@example.com")
    config = str(root / "node3.toml")

    def deferred() -> list[dict[str, object]]:
        listed = cli("queue", "list", "--json", "--config", config)
        assert listed.returncode == 0, listed.stderr
        return [
            r for m in json.loads(listed.stdout) for r in m["recipients"]
            if r["address"] == "defer@example.com" and "deferred on request" in r["last_error"]
        ]  # fmt: skip

    [rcpt] = wait_for("defer@ deferred in the queue", deferred, 30)
    assert rcpt["state"] == "queued" and rcpt["attempts"] == 1

    def bounce() -> list[Path]:
        return [
            p for p in (root / "delivered").glob("*.eml")
            if b"bounce@example.com" in p.read_bytes() and b"first@example.org" in p.read_bytes()
        ]  # fmt: skip

    [dsn] = wait_for("the bounce in delivered/", bounce, 30)
    assert b"dev sink: refused on request" in dsn.read_bytes()


@pytest.mark.parametrize(
    ("address", "code"),
    [("defer@example.com", "451"), ("Defer+2@example.com", "451"), ("bounce@x.test", "550"),
     ("someone@example.com", None), ("deferred@example.com", None), ("x@defer", None)],
)  # fmt: skip
def test_the_capture_sink_refuses_only_the_local_parts_it_names(
    address: str, code: str | None
) -> None:
    refusal = sink_refusal(address)
    assert (refusal[:3] if refusal else None) == code
