"""The tests refuse to run another checkout's code (tests/__init__.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mailqueue
import tests
from tests import ROOT, ForeignTree, check_own_tree, foreign


def test_this_checkout_runs_its_own_packages() -> None:
    check_own_tree()  # what importing the tests already did
    found = {name: ROOT / directory for name, directory in tests.DIRECTORIES.items()}
    assert foreign(found, ROOT) == []


def test_a_package_from_another_checkout_is_named(tmp_path: Path) -> None:
    other = tmp_path / "other-checkout"
    found = {
        "raft": ROOT / "raft",
        "mailqueue": other / "queue",
        "smtpcluster": ROOT / "smtpcluster",
    }
    assert foreign(found, ROOT) == [f"mailqueue from {other / 'queue'}"]


def test_a_spool_from_another_checkout_stops_the_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an editable install made from another checkout maps it.
    monkeypatch.setattr(mailqueue, "__path__", [str(tmp_path / "queue")])
    with pytest.raises(ForeignTree, match=r"mailqueue from .*queue"):
        check_own_tree()
