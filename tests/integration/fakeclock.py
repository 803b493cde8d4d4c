"""A node's wall clock moved by libfaketime (Debian package libfaketime, installed by
scripts/setup-system), its monotonic clock left alone, as NTP stepping a clock would."""

from __future__ import annotations

import glob
from pathlib import Path

# Without libfaketime's rewrite of timed condition waits, which breaks CPython's GIL
# hand-off: a thread waiting for the GIL asks for it again at once, and a node with its
# fsync thread busy ran ~15 times slower and lost elections.
QUIET = {"FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_FORCE_MONOTONIC_FIX": "0"}


def library() -> str:
    """The preloadable library, or "" when it is not installed."""
    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    return found[0] if found else ""


def offset_env(offset: str) -> dict[str, str]:
    """The environment that runs a node with its wall clock `offset` away ("+6d")."""
    return {"LD_PRELOAD": library(), "FAKETIME": offset, **QUIET}


def file_env(lib: str, path: Path) -> dict[str, str]:
    """The environment that runs a node with its wall clock offset by what `path` says,
    read again every second: a clock that can be moved while the node runs."""
    return {
        "LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(path),
        "FAKETIME_CACHE_DURATION": "1", **QUIET,
    }  # fmt: skip
