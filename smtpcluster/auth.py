"""Submission users: scrypt-hashed passwords, and a brake on repeated failures.

users_file holds one `name:scrypt$N$r$p$salt$hash` line per user (base64 salt and
hash); `smtpcluster hash-password NAME` prints such a line. A plain-text password is
refused at start, naming the file and the line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_NAME = r"[^:\s]+"  # a users_file line is name:hash, so a name holds no colon nor space
_LINE = re.compile(
    rf"^({_NAME}):scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$"
)
N, R, P = 2**14, 8, 1


class UsersFileError(ValueError):
    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}: line {line}: {problem}")
        self.path, self.line = path, line


def valid_name(name: str) -> bool:
    return re.fullmatch(_NAME, name) is not None


def hash_password(name: str, password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P)
    b64 = base64.b64encode
    return f"{name}:scrypt${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


@dataclass(frozen=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


class Users:
    def __init__(self, hashes: dict[str, _Hash]) -> None:
        self._hashes = hashes

    @staticmethod
    def load(path: str) -> Users:
        hashes: dict[str, _Hash] = {}
        with open(path, encoding="utf-8") as f:
            for k, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                m = _LINE.match(line)
                if m is None:
                    raise UsersFileError(path, k, "not name:scrypt$N$r$p$salt$hash "
                                         "(plain-text passwords are refused)")  # fmt: skip
                name, n, r, p, salt, digest = m.groups()
                hashes[name] = _Hash(
                    int(n), int(r), int(p), base64.b64decode(salt), base64.b64decode(digest)
                )
        return Users(hashes)

    def verify(self, name: str, password: str) -> bool:
        h = self._hashes.get(name)
        if h is None:
            return False
        got = hashlib.scrypt(password.encode(), salt=h.salt, n=h.n, r=h.r, p=h.p, maxmem=2**26)
        return hmac.compare_digest(got, h.digest)


@dataclass
class Throttle:
    """Delays AUTH from an address that keeps failing: 0.5 s after the second failure,
    doubling to `max_delay_s`; forgotten after `window_s` without failures."""

    max_delay_s: float = 10.0
    window_s: float = 600.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def delay(self, peer: str) -> float:
        count, last = self._failures.get(peer, (0, 0.0))
        if count < 2 or self.clock() - last > self.window_s:
            return 0.0
        return float(min(0.5 * 2 ** (count - 2), self.max_delay_s))

    def failed(self, peer: str) -> None:
        count, last = self._failures.get(peer, (0, 0.0))
        if self.clock() - last > self.window_s:
            count = 0
        self._failures[peer] = (count + 1, self.clock())
        if len(self._failures) > 100_000:  # bounded: forget the oldest half
            for key in sorted(self._failures, key=lambda k: self._failures[k][1])[:50_000]:
                del self._failures[key]

    def succeeded(self, peer: str) -> None:
        self._failures.pop(peer, None)
