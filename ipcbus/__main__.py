"""The ipcbus command line: ``python -m ipcbus broker ADDRESS`` and ``python -m ipcbus demo``."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import _transport as T
from ._demo import run_demo
from .broker import HubOptions, run_broker_foreground


def _cmd_broker(args: argparse.Namespace) -> int:
    address = T.parse_env_address(args.address) if isinstance(args.address, str) else args.address
    options = HubOptions(max_message=args.max_message, queue_limit=args.queue_limit,
                         slow_consumer_timeout=args.slow_consumer_timeout)
    authkey = os.environb.get(b"IPCBUS_AUTHKEY")

    def ready(bound: T.Address) -> None:
        print(f"ipcbus broker listening on {T.format_address(bound)} (pid {os.getpid()});"
              " Ctrl-C stops it", flush=True)

    run_broker_foreground(address, options, authkey=authkey, ready=ready)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipcbus", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("broker", help="run a broker in the foreground")
    p.add_argument("address", help="Unix socket path, PORT or HOST:PORT")
    p.add_argument("--max-message", type=int, default=128 * 1024 * 1024)
    p.add_argument("--queue-limit", type=int, default=64 * 1024 * 1024)
    p.add_argument("--slow-consumer-timeout", type=float, default=10.0)
    p.set_defaults(func=_cmd_broker)
    p = sub.add_parser("demo", help="start a broker and three workers that greet each other")
    p.set_defaults(func=run_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
