"""Group commit for the worker's spool commands.

A burst of deliveries reaches its final dots, and then its outcomes, within a few
milliseconds. Proposed one by one, each BeginDot and each Outcome cost a forward to the
leader, a queued proposal there and a decode on every node, on the same event loops
that serve acceptance. Here the commands made while one proposal is in flight wait
for it and go together, as one `Batch`, in the next; a command made while nothing is
in flight goes at once, on its own. Each caller gets its own command's result, or the
proposal's error: a batch whose fate is unknown leaves every command in it unknown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mailqueue import codec
from mailqueue.commands import Batch, Command
from mailqueue.machine import decode_result
from mailqueue.spool import Applied
from raft.core import RaftError

BATCH_MAX = 200  # commands per proposal: a few tens of KiB, far below a log entry's cap

Propose = Callable[[bytes, float], Awaitable[bytes]]


class Batcher:
    def __init__(self, propose: Propose, timeout: float) -> None:
        self._propose = propose
        self._timeout = timeout
        self._queue: list[tuple[Command, asyncio.Future[Applied]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, cmd: Command) -> Applied:
        """Commit `cmd` with whatever else is waiting; raises what propose raised."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Applied] = loop.create_future()
        self._queue.append((cmd, fut))
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                await self._commit(batch)
        finally:
            self._flushing = None

    async def _commit(self, batch: list[tuple[Command, asyncio.Future[Applied]]]) -> None:
        cmds = tuple(cmd for cmd, _ in batch)
        single = len(cmds) == 1
        cmd = cmds[0] if single else Batch(max(c.at for c in cmds), cmds)
        try:
            data = codec.encode(cmd)
        except Exception as exc:  # a bug: this used to leave every caller in the batch
            if not single:  # waiting for ever. Each alone: only the bad one fails.
                for one in batch:
                    await self._commit([one])
            elif not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        try:
            result = decode_result(await self._propose(data, self._timeout))
        except asyncio.CancelledError:  # the node is stopping: nobody waits forever,
            for _, fut in batch + self._queue:  # and nothing queued is proposed later
                fut.cancel()
            self._queue = []
            raise
        except (RaftError, TimeoutError) as exc:
            for _, fut in batch:
                if not fut.done():  # its caller may have given up (cancelled)
                    fut.set_exception(type(exc)(*exc.args))
            return
        results = (result,) if single else result.items
        for (_, fut), applied in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(applied)
