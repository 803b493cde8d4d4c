"""The admin HTTP API (aiohttp): queue and cluster views, health, bearer-token auth."""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mailqueue import queries
from mailqueue.spool import RcptState

if TYPE_CHECKING:
    from smtpcluster.node import Node

NODE_KEY = web.AppKey("node", object)
RUNNER_KEY = "admin_runner"


def _node(request: web.Request) -> Node:
    node: Node = request.app[NODE_KEY]  # type: ignore[assignment]
    return node


@web.middleware
async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path != "/healthz":
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), _node(request).cfg.admin.token.encode()):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
    response: web.StreamResponse = await handler(request)
    return response


async def healthz(request: web.Request) -> web.Response:
    node = _node(request)
    if not node.frontends_up:
        return web.json_response({"ok": False, "reason": "front ends not listening"}, status=503)
    if node.raft.core.lead is None:
        return web.json_response({"ok": False, "reason": "no leader known"}, status=503)
    return web.json_response({"ok": True, "leader": node.raft.core.lead})


async def _fresh(request: web.Request) -> None:
    if request.query.get("stale") != "1":
        await _node(request).raft.read_index()  # linearizable unless asked otherwise


def _now() -> int:
    return int(time.time() * 1000)


async def queue_list(request: web.Request) -> web.Response:
    await _fresh(request)
    q = request.query
    state = RcptState[q["state"].upper()] if "state" in q else None
    flt = queries.Filter(state, q.get("domain", ""), int(q.get("min_age_s", 0)) * 1000)
    page, after = queries.list_messages(
        _node(request).spool, _now(), flt, q.get("after", ""), int(q.get("limit", 100))
    )
    return web.json_response({"messages": page, "next": after})


async def queue_show(request: web.Request) -> web.Response:
    await _fresh(request)
    spool = _node(request).spool
    mid = request.match_info["id"]
    if mid not in spool.messages:
        return web.json_response({"error": f"no message {mid} in the queue"}, status=404)
    body = request.query.get("body") == "1"
    return web.json_response(queries.show(spool, mid, _now(), body))


async def queue_stats(request: web.Request) -> web.Response:
    await _fresh(request)
    return web.json_response(queries.stats(_node(request).spool, _now()))


async def cluster_status(request: web.Request) -> web.Response:
    return web.json_response(_node(request).raft.status())


async def start(node: Node) -> None:
    app = web.Application(middlewares=[require_token])
    app[NODE_KEY] = node
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/v1/queue", queue_list),
            web.get("/v1/queue/{id}", queue_show),
            web.get("/v1/queue-stats", queue_stats),
            web.get("/v1/cluster/status", cluster_status),
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
