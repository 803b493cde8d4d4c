"""The notify protocol's edges: abstract sockets, whose watchdog it is, no socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from smtpcluster.sdnotify import Notifier


def test_fields_arrive_as_one_datagram(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert Notifier({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=serving")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving"


def test_an_at_sign_names_an_abstract_socket() -> None:
    name = f"smtpcluster-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("WATCHDOG=1")
        assert sock.recv(100) == b"WATCHDOG=1"


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier({})
    assert not n.enabled and not n.send("READY=1") and n.watchdog_s is None


def test_a_gone_supervisor_is_logged_not_raised(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).send("READY=1")


def test_the_watchdog_interval_is_half_and_only_for_this_process() -> None:
    assert Notifier({"WATCHDOG_USEC": "10000000"}).watchdog_s == 5.0
    mine = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_s == 5.0
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_s is None
