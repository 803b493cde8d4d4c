"""smtpcluster: a high-availability SMTP relay cluster.

Exit codes: 0 ok, 1 operation failed, 2 usage or config error, 3 node unreachable.
Admin commands find the node through --config FILE (its [admin] listen and token_file)
or --admin URL --token-file FILE. --json output is documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import os
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:  # optional: plain asyncio works, more slowly
    uvloop = None  # type: ignore[assignment]

from mailqueue.commands import FormatTooNew
from mailqueue.spool import RcptState
from raft.core import LogLost
from raft.node import NodeFailed
from raft.storage import StorageError, WrongOwner, owner_of
from smtpcluster import VERSION, cli_format, config, dev, logs, pki
from smtpcluster.admin_client import AdminClient, AdminError
from smtpcluster.auth import hash_password, valid_name
from smtpcluster.node import CannotStart, raft_dir, serve

QUEUE_ACTIONS = ("retry", "hold", "release", "delete")


class UsageError(Exception):
    exit_code = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smtpcluster", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"smtpcluster {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one node")
    serve.add_argument("--config", required=True)
    serve.add_argument("--log-level", help="overrides [log] level until a reload")
    check = sub.add_parser("check-config", help="validate a config without starting")
    check.add_argument("--config", required=True)
    hashpw = sub.add_parser("hash-password", help="a users_file line; the password on stdin")
    hashpw.add_argument("name")
    dev = sub.add_parser("dev", help="a local cluster with a capture sink, for a first run")
    dev.add_argument("--nodes", type=int, default=3)
    dev.add_argument("--dir", default="smtpcluster-dev")
    _queue_parsers(sub.add_parser("queue", help="inspect and steer the mail queue"))
    _cluster_parsers(sub.add_parser("cluster", help="members, leader, membership changes"))
    return p


def _admin_options(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--config", help="the node's config: its admin address and token")
    p.add_argument("--admin", help="admin URL, e.g. http://127.0.0.1:8025")
    p.add_argument("--token-file", help="the admin token, with --admin")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _queue_parsers(queue: argparse.ArgumentParser) -> None:
    sub = queue.add_subparsers(dest="action", required=True)
    lst = sub.add_parser("list", help="the queue, like mailq")
    _selection_options(lst)
    _admin_options(lst)
    show = sub.add_parser("show", help="one message, like postcat")
    show.add_argument("id")
    show.add_argument("--body", action="store_true")
    _admin_options(show)
    for action in QUEUE_ACTIONS:
        act = sub.add_parser(action, help=f"{action} messages")
        act.add_argument("ids", nargs="*", metavar="ID", help='"-": one ID a line on stdin')
        act.add_argument("--all", action="store_true", help="every message in the queue")
        _selection_options(act, " (without IDs: every such message)")
        _admin_options(act)
    stats = sub.add_parser("stats", help="pending recipients by domain and age, like qshape")
    _admin_options(stats)


def _selection_options(p: argparse.ArgumentParser, also: str = "") -> None:
    p.add_argument(
        "--state", choices=[s.name.lower() for s in RcptState],
        help=f"messages with a recipient in this state{also}",
    )  # fmt: skip
    p.add_argument("--domain", help=f"messages with a recipient at this domain{also}")
    p.add_argument(
        "--sender", help=f'messages from this envelope sender ("<>": bounces){also}'
    )  # fmt: skip


def _cluster_parsers(cluster: argparse.ArgumentParser) -> None:
    sub = cluster.add_subparsers(dest="action", required=True)
    init = sub.add_parser(
        "init", help="make a new cluster's key, admin token, CA and node certificates"
    )
    init.add_argument("nodes", nargs="+", metavar="ID=HOST", help="e.g. node1=10.0.0.1")
    init.add_argument("--dir", default="/etc/smtpcluster", help="where (default %(default)s)")
    init.add_argument("--hostname", required=True, help="the name clients use, e.g. the MX")
    _admin_options(sub.add_parser("status", help="members, roles, lag and the leader"))
    join = sub.add_parser("join", help="add a node (learner, catch up, then voter)")
    join.add_argument("id")
    join.add_argument("addr", help="its raft address, host:port")
    _admin_options(join)
    leave = sub.add_parser("leave", help="remove a node from the cluster")
    leave.add_argument("id")
    _admin_options(leave)
    transfer = sub.add_parser("transfer-leader", help="hand leadership to a node")
    transfer.add_argument("id")
    _admin_options(transfer)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in ("serve", "check-config"):
            return _serve_or_check(args)
        if args.command == "dev":
            return dev.run(args.dir, args.nodes)
        if args.command == "hash-password":
            return _hash_password(args.name)
        if args.command == "cluster" and args.action == "init":
            return _init(args)
        client = _client(args)
        lines = _queue(client, args) if args.command == "queue" else _cluster(client, args)
        for line in lines:
            print(line, flush=True)
        return 0
    except (AdminError, UsageError, dev.DevError, pki.PkiError) as exc:
        print(f"smtpcluster: {exc}", file=sys.stderr)
        return exc.exit_code
    except config.ConfigError as exc:
        print(f"smtpcluster: {exc}", file=sys.stderr)
        return 2
    except CannotStart as exc:
        print(f"smtpcluster: cannot start: {exc}", file=sys.stderr)
        return 71  # EX_OSERR: restarted by systemd, as a port may come free
    except WrongOwner as exc:  # at start: another node's data
        print(f"smtpcluster: {exc}", file=sys.stderr)
        return DATA_DAMAGED
    except StorageError as exc:  # at start: a damaged log or snapshot
        print(f"smtpcluster: {exc}\n{DAMAGED_ADVICE}", file=sys.stderr)
        return DATA_DAMAGED
    except LogLost as exc:  # the leader knows this node's log lost what it acknowledged
        print(f"smtpcluster: {exc}\n{DAMAGED_ADVICE}", file=sys.stderr)
        return DATA_DAMAGED
    except NodeFailed as exc:
        print(f"smtpcluster: {exc}", file=sys.stderr)
        return 70  # EX_SOFTWARE: a bug stopped the node; systemd restarts it
    except FormatTooNew as exc:  # at start, from the snapshot: a downgraded node
        print(f"smtpcluster: {exc}", file=sys.stderr)
        return 70  # restarted by systemd, and so running the new release once installed


def _check_owner(cfg: config.Config) -> None:
    """Before a cloned VM's first start, not at it: its data may be another node's.
    A data_dir this user may not read (not the service's user) is left to serve."""
    directory = raft_dir(cfg.node.data_dir)
    try:
        held = owner_of(directory)
    except (PermissionError, NotADirectoryError):
        return
    if held is not None and held != cfg.node.id:
        raise WrongOwner(directory, held, cfg.node.id)


def _serve_or_check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if args.command == "check-config":
        _check_owner(cfg)
        print(f"{args.config}: ok (node {cfg.node.id}, {len(cfg.cluster.peers)} peers)")
        return 0
    if args.log_level:
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, level=args.log_level))
    logs.setup(cfg.log.level, cfg.log.format)
    if uvloop is None:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
    return 0


def _hash_password(name: str) -> int:
    if not valid_name(name):  # its line would be refused when users_file is loaded
        raise UsageError(
            f"hash-password: {name!r}: a user name must not be empty, nor hold ':' or a space"
        )
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("hash-password: an empty password")
    print(hash_password(name, password))
    return 0


def _init(args: argparse.Namespace) -> int:
    if not config.is_hostname(args.hostname):  # as check-config would refuse it later
        raise UsageError(f"cluster init: --hostname {args.hostname!r} is not a host name "
                         "like relay.example.com")  # fmt: skip
    nodes = [pki.NodeName.parse(text) for text in args.nodes]
    where = Path(args.dir)
    for path in pki.init(where, nodes, args.hostname):
        print(f"wrote {path}")
    print(f"keep {where / 'ca.key'} off the nodes; copy to each node cluster.key, "
          "admin.token and its own tls.key/tls.crt (docs/operations.md)")  # fmt: skip
    return 0


def _client(args: argparse.Namespace) -> AdminClient:
    if args.config:
        cfg = config.load(args.config)
        return AdminClient(f"http://{cfg.admin.listen}", cfg.admin.token)
    if not (args.admin and args.token_file):
        raise UsageError("give --config FILE, or --admin URL with --token-file FILE")
    try:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    return AdminClient(args.admin, token)


def _queue(client: AdminClient, args: argparse.Namespace) -> Iterable[str]:
    query = {k: v for k in ("state", "domain", "sender") if (v := getattr(args, k, None))}
    if args.action == "list":
        messages = client.stream("/v1/queue?" + urllib.parse.urlencode(query | {"stream": 1}))
        return _json_array(messages) if args.json else cli_format.queue_list(messages)
    if args.action == "show":
        m = client.get(f"/v1/queue/{urllib.parse.quote(args.id)}" + ("?body=1" * args.body))
        return [json.dumps(m, indent=2)] if args.json else cli_format.message(m)
    if args.action == "stats":
        s = client.get("/v1/queue-stats")
        return [json.dumps(s, indent=2)] if args.json else cli_format.stats(s)
    every = args.all or bool(query)
    if bool(args.ids) == every:
        raise UsageError(
            f"queue {args.action}: give message IDs, or --all or --state/--domain/--sender, "
            "not both"
        )  # fmt: skip
    ids = args.ids
    if ids == ["-"]:  # as postsuper -d -: queue list --json ... | jq ... | queue delete -
        ids = [line.strip() for line in sys.stdin if line.strip()]
    body: dict[str, Any] = {"all": True} | query if every else {"ids": ids}
    result = client.post(f"/v1/queue/{args.action}", body)
    if args.json:
        print(json.dumps(result))
        if result["missing"]:
            raise AdminError(f"not in the queue: {' '.join(result['missing'])}")
        return []
    if result["missing"]:
        raise AdminError(
            f"{args.action}: {_recipients(result['changed'])} changed; "
            f"not in the queue: {' '.join(result['missing'])}"
        )
    return [f"{args.action}: {_recipients(result['changed'])} changed"]


def _recipients(n: int) -> str:
    return "1 recipient" if n == 1 else f"{n} recipients"


def _cluster(client: AdminClient, args: argparse.Namespace) -> Iterable[str]:
    if args.action == "status":
        s = client.get("/v1/cluster/status")
        return [json.dumps(s, indent=2)] if args.json else cli_format.cluster(s)
    body = {"id": args.id, "address": getattr(args, "addr", "")}
    result = client.post(f"/v1/cluster/{args.action}", body)
    return [json.dumps(result)] if args.json else [f"{args.action} {args.id}: done"]


def _json_array(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    """A JSON array written an element at a time: valid JSON, yet streamed."""
    first = True
    for item in items:
        yield ("[" if first else ",") + json.dumps(item)
        first = False
    yield "[]" if first else "]"


DAMAGED_ADVICE = (
    "smtpcluster: this node's data cannot be trusted, so it does not run; the others "
    "carry on. Replace it: docs/operations.md, 'A node whose data is damaged'"
)
DATA_DAMAGED = 65  # EX_DATAERR; the systemd unit does not restart on it: no restart mends it
# What a shell sees of a command killed by SIGPIPE, as `mailq | head` leaves mailq.
READER_GONE = 128 + 13


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped (`queue list | head`): end quietly, not with a traceback
        # and a second one when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = READER_GONE
    sys.exit(code)


if __name__ == "__main__":
    entry()
