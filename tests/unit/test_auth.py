"""Hashed users and the brake on repeated AUTH failures."""

from __future__ import annotations

import pathlib

import pytest

from smtpcluster.auth import Throttle, Users, UsersFileError, hash_password


def test_hashed_passwords_verify(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "users"
    path.write_text(hash_password("alice", "correct horse") + "\n# a comment\n")
    users = Users.load(str(path))
    assert users.verify("alice", "correct horse")
    assert not users.verify("alice", "wrong")
    assert not users.verify("bob", "correct horse")
    assert "correct horse" not in path.read_text()


def test_a_plain_text_password_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "users"
    path.write_text(hash_password("alice", "x") + "\nbob:hunter2\n")
    with pytest.raises(UsersFileError) as err:
        Users.load(str(path))
    assert err.value.line == 2 and "plain-text" in str(err.value)


def test_repeated_failures_slow_an_address_down_and_success_resets() -> None:
    now = [0.0]
    t = Throttle(clock=lambda: now[0])
    delays = []
    for _ in range(8):
        delays.append(t.delay("192.0.2.1"))
        t.failed("192.0.2.1")
    assert delays == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert t.delay("192.0.2.2") == 0.0  # others are not affected
    now[0] = 601.0
    assert t.delay("192.0.2.1") == 0.0  # forgotten after the window
    t.failed("192.0.2.3")
    t.failed("192.0.2.3")
    t.succeeded("192.0.2.3")
    assert t.delay("192.0.2.3") == 0.0
