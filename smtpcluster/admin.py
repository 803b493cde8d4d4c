"""The admin HTTP API (aiohttp): the queue and the cluster, seen and steered from any
node; Prometheus metrics; health for load balancers. Bearer token for all but /healthz.

Reads are linearizable (a ReadIndex first) unless `?stale=1`. Writes are spool
commands proposed through Raft from whichever node is asked. Errors are JSON objects
with an "error" key and a 4xx/5xx status; the CLI turns them into exit codes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mailqueue import codec, queries
from mailqueue.commands import Command, Delete, Hold, MessageId, Retry, Unhold
from mailqueue.machine import decode_result
from mailqueue.spool import Message, RcptState, Spool
from raft.core import ConfChangeRefused, RaftError
from raft.transport import Address
from smtpcluster import VERSION, metrics

if TYPE_CHECKING:
    from smtpcluster.node import Node

NODE_KEY = web.AppKey("node", object)
RUNNER_KEY = "admin_runner"
IDS_PER_COMMAND = 1000  # keeps one log entry small when --all names a large queue
STREAM_CHUNK = 1000  # messages serialized between two yields to the event loop

ACTIONS: dict[str, Callable[[int, tuple[MessageId, ...]], Command]] = {
    "retry": Retry,
    "hold": Hold,
    "release": Unhold,
    "delete": Delete,
}


def _node(request: web.Request) -> Node:
    node: Node = request.app[NODE_KEY]  # type: ignore[assignment]
    return node


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


@web.middleware
async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path != "/healthz":
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), _node(request).cfg.admin.token.encode()):
            return _error(401, "missing or wrong bearer token")
    try:
        response: web.StreamResponse = await handler(request)
    except ConfChangeRefused as exc:  # the cluster is there and said no: not a 503
        return _error(409, f"refused: {exc}")
    except (RaftError, TimeoutError) as exc:
        return _error(503, f"cluster unavailable: {type(exc).__name__}: {exc}".strip(": "))
    except (ValueError, KeyError) as exc:
        return _error(400, f"bad request: {exc}")
    except web.HTTPError as exc:  # aiohttp's own, in plain text: no such path, method
        refused = _error(exc.status, f"{exc.reason.lower()}: {request.method} {request.path}")
        if "Allow" in exc.headers:  # a 405 says which methods the path takes
            refused.headers["Allow"] = exc.headers["Allow"]
        return refused
    return response


async def healthz(request: web.Request) -> web.Response:
    node = _node(request)
    if not node.frontends_up:
        return web.json_response({"ok": False, "reason": "front ends not listening"}, status=503)
    if node.raft.core.lead is None:
        return web.json_response({"ok": False, "reason": "no leader known"}, status=503)
    reserve = node.handler.cfg.min_free_space
    if reserve and (free := node.disk.free()) < reserve:
        # A balancer should send clients elsewhere: this node answers their MAIL 452.
        why = f"data_dir has {free >> 20} MiB free, under min_free_space: new mail is refused"
        return web.json_response({"ok": False, "reason": why}, status=503)
    return web.json_response({"ok": True, "leader": node.raft.core.lead})


async def prometheus(request: web.Request) -> web.Response:
    body = _node(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def _fresh(request: web.Request) -> None:
    if request.query.get("stale") != "1":
        await _node(request).raft.read_index()  # linearizable unless asked otherwise


def _now() -> int:
    return int(time.time() * 1000)


def _state(name: str) -> RcptState:
    try:
        return RcptState[name.upper()]
    except KeyError:
        known = ", ".join(s.name.lower() for s in RcptState)
        raise ValueError(f"no recipient state {name!r}: use one of {known}") from None


def _filter(q: Any) -> queries.Filter:
    state = _state(q["state"]) if "state" in q else None
    sender = q.get("sender")  # "<>": the null sender, as Postfix writes it
    return queries.Filter(
        state, q.get("domain", ""), int(q.get("min_age_s", 0)) * 1000,
        None if sender is None else sender.strip("<>"),
    )  # fmt: skip


async def queue_list(request: web.Request) -> web.StreamResponse:
    await _fresh(request)
    q = request.query
    if q.get("stream") == "1":
        return await _queue_stream(request, _filter(q))
    page, after = queries.list_messages(
        _node(request).spool, _now(), _filter(q), q.get("after", ""), int(q.get("limit", 100))
    )
    return web.json_response({"messages": page, "next": after})


async def _queue_stream(request: web.Request, flt: queries.Filter) -> web.StreamResponse:
    """Every matching message, one JSON object per line, written as it is serialized:
    a queue of a million messages is never held as one answer."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for batch in _batches(_node(request).spool):
        now = _now()
        lines = [json.dumps(queries.summary(m, now)) + "\n" for m in batch if flt.matches(m, now)]
        await response.write("".join(lines).encode())
    await response.write_eof()
    return response


async def _batches(spool: Spool) -> AsyncIterator[list[Message]]:
    """The queue's messages, STREAM_CHUNK at a time, yielding to the event loop between
    batches: a node walking a million messages in one go would stop serving (and
    heartbeating) for a second or more. A message gone meanwhile is skipped."""
    ids = list(spool.messages)  # references only
    for start in range(0, len(ids), STREAM_CHUNK):
        batch = [spool.messages.get(mid) for mid in ids[start : start + STREAM_CHUNK]]
        yield [m for m in batch if m is not None]
        await asyncio.sleep(0)


async def queue_show(request: web.Request) -> web.Response:
    await _fresh(request)
    spool = _node(request).spool
    mid = request.match_info["id"]
    if mid not in spool.messages:
        return _error(404, f"no message {mid} in the queue")
    body = request.query.get("body") == "1"
    return web.json_response(queries.show(spool, mid, _now(), body))


async def queue_stats(request: web.Request) -> web.Response:
    """qshape, added up a batch of messages at a time."""
    await _fresh(request)
    spool = _node(request).spool
    shape = queries.Shape(_now())
    async for batch in _batches(spool):
        for m in batch:
            shape.add(m)
    return web.json_response(shape.result(spool))


SELECTION = ("state", "domain", "sender", "min_age_s")  # as for queue_list


async def queue_action(request: web.Request) -> web.Response:
    """POST {"ids": [...]} or {"all": true}: retry, hold, release or delete. With "all",
    "state", "domain", "sender" and "min_age_s" narrow it as they narrow a listing:
    postqueue -s site, or every message of a sender whose password was stolen."""
    action = request.match_info["action"]
    if action not in ACTIONS:
        return _error(404, f"no queue action {action!r}: use one of {sorted(ACTIONS)}")
    args = await _json_object(request)
    every, listed = args.get("all") is True, args.get("ids")
    has_ids = isinstance(listed, list) and bool(listed)
    if every == has_ids or (every and "ids" in args):  # neither, or both
        return _error(400, 'give "ids": [...] or "all": true, not both')
    if has_ids and (narrowing := [k for k in SELECTION if k in args]):
        return _error(400, f'{", ".join(narrowing)} narrow "all": true, not "ids"')
    flt = _filter(args) if every else None
    node = _node(request)
    await node.raft.read_index()
    spool = node.spool
    ids = await _matching(spool, flt) if flt is not None else [str(i) for i in listed or ()]
    missing = [i for i in ids if i not in spool.messages]
    present = [i for i in ids if i in spool.messages]
    changed = 0
    for k in range(0, len(present), IDS_PER_COMMAND):
        cmd = ACTIONS[action](_now(), tuple(present[k : k + IDS_PER_COMMAND]))
        changed += decode_result(await node.raft.propose(codec.encode(cmd), timeout=20)).changed
    return web.json_response({"action": action, "changed": changed, "missing": missing})


async def _matching(spool: Spool, flt: queries.Filter) -> list[str]:
    """The ids of the messages `flt` matches, read a batch at a time."""
    now = _now()
    return [m.id async for batch in _batches(spool) for m in batch if flt.matches(m, now)]


async def _json_object(request: web.Request) -> dict[str, Any]:
    args = await request.json()
    if not isinstance(args, dict):
        raise ValueError(f"a JSON object expected, not {type(args).__name__}")
    return args


async def cluster_status(request: web.Request) -> web.Response:
    node = _node(request)
    status = node.raft.status()
    status["version"] = VERSION
    status["data_dir_free_bytes"] = node.disk.free()
    status["min_free_space"] = node.handler.cfg.min_free_space
    status["format"] = node.spool.format
    status["format_readable"] = node.machine.readable
    try:
        status["members"] = await node.raft.members()
    except (RaftError, TimeoutError) as exc:
        status["members"] = None  # this node cannot reach a leader: say what it knows
        status["members_error"] = f"{type(exc).__name__}: {exc}"
    return web.json_response(status)


async def cluster_change(request: web.Request) -> web.Response:
    """POST join {"id", "address"}, leave {"id"}, transfer-leader {"id"}."""
    op = {"join": "join", "leave": "leave", "transfer-leader": "transfer"}.get(
        request.match_info["op"]
    )
    if op is None:
        return _error(404, "use join, leave or transfer-leader")
    args = await _json_object(request)
    target, address = args.get("id"), args.get("address", "")
    if not isinstance(target, str) or not target or not isinstance(address, str):
        return _error(400, 'give "id" (and for join "address") as strings')
    if op == "join":
        Address.parse_typed(address)  # a typo is a 400 here, not the leader's refusal
    await _node(request).raft.membership(op, target, address)
    return web.json_response({"ok": True, "op": request.match_info["op"], "id": target})


async def start(node: Node) -> None:
    app = web.Application(middlewares=[require_token])
    app[NODE_KEY] = node
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/metrics", prometheus),
            web.get("/v1/queue", queue_list),
            web.get("/v1/queue/{id}", queue_show),
            web.post("/v1/queue/{action}", queue_action),
            web.get("/v1/queue-stats", queue_stats),
            web.get("/v1/cluster/status", cluster_status),
            web.post("/v1/cluster/{op}", cluster_change),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addr = node.cfg.admin.listen
    await web.TCPSite(runner, addr.host, addr.port, reuse_address=True).start()
    node.__dict__[RUNNER_KEY] = runner


async def stop(node: Node) -> None:
    runner = node.__dict__.get(RUNNER_KEY)
    if runner is not None:
        await runner.cleanup()
