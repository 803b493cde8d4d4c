"""The `smtpcluster` command: serve a node, check a config (more in later issues).

Exit codes: 0 ok, 1 operation failed, 2 usage or config error, 3 node unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

try:
    import uvloop
except ImportError:  # optional: plain asyncio works, more slowly
    uvloop = None  # type: ignore[assignment]

from smtpcluster import config
from smtpcluster.node import serve

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smtpcluster", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run one node")
    serve_cmd.add_argument("--config", required=True)
    serve_cmd.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a config without starting")
    check.add_argument("--config", required=True)
    args = p.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"smtpcluster: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok (node {cfg.node.id}, {len(cfg.cluster.peers)} peers)")
        return 0
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    # aiosmtpd logs every command line at INFO, AUTH credentials included: never that.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if uvloop is None:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
