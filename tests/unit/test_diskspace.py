"""A node short of disk refuses new mail with 452 4.3.1 and takes it again once there is
room; the session goes on, and nothing refused is proposed."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os

import pytest

from smtpcluster.config import SmtpSection
from smtpcluster.diskspace import DiskReserve, declared_size
from smtpcluster.frontend import FrontendSMTP, Handler, smtp_factory
from tests.unit.test_replies import Wire, replied, until

MIB = 1 << 20


class FakeDisk:
    """os.statvfs for a file system with `free` bytes available (a unit-test double)."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: str) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 1 << 30, 0, self.free // 4096, 0, 0, 0, 0, 255))


class Session:
    """A relaying front end with a 256 MiB reserve over `disk`, greeted and EHLO'd."""

    def __init__(self, disk: FakeDisk) -> None:
        self.wire = Wire()
        self.proposed: list[object] = []
        self.reserve = DiskReserve("/data", disk)
        self.cfg = SmtpSection(
            hostname="disk.test", relay_networks=(ipaddress.ip_network("127.0.0.0/8"),),
            max_message_size=512 * MIB, min_free_space=256 * MIB,
        )  # fmt: skip

    async def start(self) -> FrontendSMTP:
        async def submit(cmd: object, timeout: float) -> bool:
            self.proposed.append(cmd)
            return True

        proto = smtp_factory(Handler(self.cfg, "n1", submit, None, self.reserve))()
        assert isinstance(proto, FrontendSMTP)
        proto.connection_made(self.wire)
        await until(lambda: len(self.wire.writes) == 1)
        await self.say(proto, b"EHLO c.test\r\n", b"250 HELP")
        return proto

    async def say(self, proto: FrontendSMTP, line: bytes, want: bytes) -> None:
        proto.data_received(line)
        await until(functools.partial(replied, self.wire, want))


def test_mail_is_refused_under_the_reserve_and_taken_again_with_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = FakeDisk(100 * MIB)
    s = Session(disk)
    caplog.set_level(logging.INFO, logger="smtpcluster.diskspace")

    async def run() -> None:
        proto = await s.start()
        await s.say(proto, b"MAIL FROM:<a@b.test>\r\n", b"452 4.3.1 Insufficient system storage")
        await s.say(proto, b"RCPT TO:<c@d.test>\r\n", b"503")  # no transaction was begun
        disk.free = 1024 * MIB  # deliveries made room
        await s.say(proto, b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0")
        await s.say(proto, b"RCPT TO:<c@d.test>\r\n", b"250 2.1.5")
        await s.say(proto, b"DATA\r\n", b"354")
        await s.say(proto, b"Subject: x\r\n\r\nbody\r\n.\r\n", b"250 2.0.0")
        proto.connection_lost(None)

    asyncio.run(run())
    assert len(s.proposed) == 1 and s.reserve.refused == 1
    assert "min_free_space is 256 MiB: refusing new mail" in caplog.text
    assert "taking new mail again" in caplog.text


def test_a_declared_size_counts_three_times_and_the_final_size_is_checked_too() -> None:
    """SIZE= (RFC 1870) lets a big message be refused before it is sent; a message that
    did not declare one is checked again at its final dot, before it is proposed."""
    disk = FakeDisk(1024 * MIB)
    s = Session(disk)

    async def run() -> None:
        proto = await s.start()
        # 1024 - 3 x 300 MiB leaves less than the 256 MiB reserve; 3 x 200 MiB does not.
        await s.say(proto, b"MAIL FROM:<a@b.test> SIZE=314572800\r\n", b"452 4.3.1")
        await s.say(proto, b"MAIL FROM:<a@b.test> SIZE=209715200\r\n", b"250 2.1.0")
        await s.say(proto, b"RSET\r\n", b"250")
        await s.say(proto, b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0")
        await s.say(proto, b"RCPT TO:<c@d.test>\r\n", b"250 2.1.5")
        await s.say(proto, b"DATA\r\n", b"354")
        disk.free = 200 * MIB  # the disk filled while the message came in
        await s.say(proto, b"Subject: x\r\n\r\nbody\r\n.\r\n", b"452 4.3.1")
        await s.say(proto, b"NOOP\r\n", b"250")  # and the session goes on
        proto.connection_lost(None)

    asyncio.run(run())
    assert s.proposed == [] and s.reserve.refused == 2


def test_zero_turns_the_check_off_and_declared_size_reads_mail_options() -> None:
    assert DiskReserve("/data", FakeDisk(0)).room_for(10 * MIB, 0)
    assert declared_size(["BODY=8BITMIME", "SIZE=1234"]) == 1234
    assert declared_size(["BODY=8BITMIME"]) == 0
