"""The project's tests. Importing them checks first that the code under test is this
checkout's own.

A virtual environment's editable install maps `mailqueue` to the `queue/` of the
checkout it was installed from, and `queue/` cannot be imported under that name from
a plain path. A second checkout that shared the environment (a symlinked `.venv`) ran
its own `raft/` and `smtpcluster/` (pytest puts the checkout first on the path) with
the first checkout's spool, silently: its tests, chaos runs and benchmarks then
measured a mix of two trees.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTORIES = {"raft": "raft", "mailqueue": "queue", "smtpcluster": "smtpcluster"}


class ForeignTree(RuntimeError):
    """The packages under test are not (all) this checkout's."""


def foreign(found: dict[str, Path], root: Path) -> list[str]:
    """`package from path` for each package found elsewhere than in `root`."""
    return [
        f"{name} from {path}"
        for name, path in found.items()
        if path.resolve() != (root / DIRECTORIES[name]).resolve()
    ]


def check_own_tree() -> None:
    found = {name: Path(importlib.import_module(name).__path__[0]) for name in DIRECTORIES}
    if wrong := foreign(found, ROOT):
        raise ForeignTree(
            f"the code under test is not this checkout's ({ROOT}): {', '.join(wrong)}. "
            "Its .venv was installed from another checkout: give it a .venv of its own "
            "(remove a linked one, then run scripts/setup-venv)."
        )


check_own_tree()
