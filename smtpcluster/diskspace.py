"""Room for more mail on the data directory's file system (Postfix's queue_minfree).

Below `min_free_space` a node refuses new mail with 452 4.3.1 and goes on delivering,
which frees space. Without it a node stops at its first failed write to a full disk,
and since every node holds the same data their disks fill together: the cluster would
stop delivering too, and only an operator could make room.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

NO_ROOM = "452 4.3.1 Insufficient system storage"
# A message takes its size about three times on a node: in the Raft log, as a body
# file, and in the next snapshot.
COPIES = 3
MIB = 1 << 20
WARN_EVERY_S = 60.0


class DiskReserve:
    def __init__(self, path: str, statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self.path = path
        self.statvfs = statvfs  # a unit test's file system double
        self.refused = 0  # messages refused for want of room: a metric
        self.refusing = False  # the last message checked was refused
        self._next_warning = 0.0  # monotonic time of the next warning while refusing

    def free(self) -> int:
        st = self.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def room_for(self, size: int, reserve: int) -> bool:
        """Whether a message of `size` bytes (0 when not yet known) leaves `reserve`
        bytes free; a refusal is counted and logged. 0 turns the check off."""
        if reserve <= 0:
            return True
        free = self.free()
        if free - COPIES * size >= reserve:
            if self.refusing:
                log.info("%s has %d MiB free: taking new mail again", self.path, free // MIB)
            self.refusing = False
            return True
        self.refused += 1
        self._warn(free, size, reserve)
        return False

    def _warn(self, free: int, size: int, reserve: int) -> None:
        # When refusing starts, then at most once a minute: not a line per message.
        now = time.monotonic()
        if not self.refusing or now >= self._next_warning:
            log.warning("%s has %d MiB free, min_free_space is %d MiB: refusing new mail "
                        "with 452 4.3.1 (this one declared %d bytes; %d refused so far)",
                        self.path, free // MIB, reserve // MIB, size, self.refused)  # fmt: skip
            self._next_warning = now + WARN_EVERY_S
        self.refusing = True


def declared_size(mail_options: list[str]) -> int:
    """MAIL FROM's SIZE= (RFC 1870), 0 if absent; aiosmtpd has checked it is digits."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0
