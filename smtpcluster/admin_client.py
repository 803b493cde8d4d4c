"""The CLI's side of the admin API: HTTP calls, with failures as typed errors that map
to the CLI's exit codes (1 the operation failed, 3 the node is unreachable)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 90.0  # a join waits for the new node to catch up


class AdminError(Exception):
    """The node answered, and refused or failed the operation."""

    exit_code = 1


class Unreachable(AdminError):
    """Nothing answered at the admin address."""

    exit_code = 3


@dataclass(frozen=True)
class AdminClient:
    url: str  # e.g. http://127.0.0.1:8025
    token: str

    def get(self, path: str) -> Any:
        with self._open("GET", path) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        with self._open("POST", path, body) as resp:
            return json.loads(resp.read())

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """The lines of an NDJSON answer, decoded as they arrive."""
        with self._open("GET", path) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url.rstrip("/") + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{exc.code} {_reason(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise Unreachable(f"node at {self.url} unreachable: {why}") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)
