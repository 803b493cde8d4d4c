"""Rules of the layout that nothing else would catch."""

from __future__ import annotations

import ast
import importlib
import pathlib
import queue
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Modules of the pure core: no clock, no I/O, no randomness of their own.
CORE_MODULES = ["types", "codec", "log", "progress", "quorum", "core"]
FORBIDDEN = {
    "asyncio", "socket", "time", "datetime", "os", "threading", "uuid", "secrets",
    "selectors", "io", "pathlib", "subprocess", "signal",
}  # fmt: skip


def test_the_standard_queue_module_is_never_shadowed() -> None:
    assert pathlib.Path(queue.__file__).parent == pathlib.Path(ast.__file__).parent
    assert not (ROOT / "queue" / "__init__.py").exists()
    assert importlib.import_module("mailqueue").__name__ == "mailqueue"


def test_raft_core_does_no_io_and_draws_no_randomness_of_its_own() -> None:
    for name in CORE_MODULES:
        tree = ast.parse((ROOT / "raft" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                # the core may name random.Random (the injected RNG's type), never call
                # the module-level functions that share one hidden global generator
                assert node.value.id != "random" or node.attr == "Random", (name, node.attr)
                continue
            else:
                continue
            assert not mods & FORBIDDEN, f"raft/{name}.py imports {mods & FORBIDDEN}"


def test_raft_never_imports_the_layers_above_it() -> None:
    for path in (ROOT / "raft").rglob("*.py"):
        text = path.read_text()
        assert "import smtpcluster" not in text and "from smtpcluster" not in text, path
        assert "import mailqueue" not in text and "from mailqueue" not in text, path


def test_every_package_directory_is_installed() -> None:
    """A subpackage missing from pyproject's list is missing from the wheel, and an
    installed node fails at import (raft.storage once was): only editable installs,
    which the tests use, would hide it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    for top in ("raft", "smtpcluster"):
        for init in (ROOT / top).rglob("__init__.py"):
            name = ".".join(init.parent.relative_to(ROOT).parts)
            assert name in listed, f"{name} is not in pyproject.toml's packages"
    assert "mailqueue" in listed


def test_no_asyncio_wait_for_in_the_product() -> None:
    """On Python 3.11, asyncio.wait_for swallows a cancellation that arrives as the
    awaited coroutine finishes (CPython gh-86296, fixed in 3.12): the cancelled task
    goes on. A peer's sender, cancelled as its handshake failed, kept reconnecting for
    ever, and Transport.close() waited on it for ever (a unit test hung on it).
    `async with asyncio.timeout(...)` does not swallow it."""
    for top in ("raft", "queue", "smtpcluster"):
        for path in (ROOT / top).rglob("*.py"):
            assert "wait_for(" not in path.read_text(), path
