"""The README's first command, end to end: `scripts/dev` brings up the dev cluster, a
message sent with swaks to any node lands in DIR/delivered/, and Ctrl-C stops it all."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.integration.kvcluster import wait_for

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
    finally:
        dev.send_signal(signal.SIGINT)
        code = dev.wait(60)
    assert code == 0
    assert "smtpcluster dev: stopped" in out.read_text()
    pattern = str(tmp_path / "cluster")
    left = subprocess.run(["pgrep", "-f", pattern], check=False, capture_output=True)
    assert left.stdout == b"", "node processes outlived Ctrl-C"
