"""The ipcbus command line: ``broker ADDRESS``, ``demo``, ``state ADDRESS``, ``spy ADDRESS``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from . import _transport as T
from ._demo import run_demo
from .broker import HubOptions, run_broker_foreground
from .spy import IpcBusSpy, TrafficRecord, format_record, format_state


def _cmd_broker(args: argparse.Namespace) -> int:
    address = T.parse_env_address(args.address) if isinstance(args.address, str) else args.address
    options = HubOptions(max_message=args.max_message, queue_limit=args.queue_limit,
                         slow_consumer_timeout=args.slow_consumer_timeout,
                         traffic_log=args.log)
    authkey = os.environb.get(b"IPCBUS_AUTHKEY")

    def ready(bound: T.Address) -> None:
        print(f"ipcbus broker listening on {T.format_address(bound)} (pid {os.getpid()});"
              " Ctrl-C stops it", flush=True)

    run_broker_foreground(address, options, authkey=authkey, ready=ready)
    return 0


def _address(text: str) -> T.Address:
    return T.parse_env_address(text)


def _cmd_state(args: argparse.Namespace) -> int:
    from .client import IpcBusClient

    with IpcBusClient.create().connect(_address(args.address), peer_name="ipcbus-state",
                                       timeout=args.timeout) as client:
        state = client.request("/ipcbus/queryState", args.timeout).payload
        me = client.peer.id
    state["peers"] = [p for p in state["peers"] if p["id"] != me]
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(format_state(state))
    return 0


def _cmd_spy(args: argparse.Namespace) -> int:
    done = threading.Event()
    seen = [0]
    lock = threading.Lock()

    def show(record: TrafficRecord) -> None:
        with lock:
            if done.is_set():
                return
            print(format_record(record, args.json), flush=True)
            seen[0] += 1
            if args.count and seen[0] >= args.count:
                done.set()

    with IpcBusSpy(show, args.channel).connect(_address(args.address), timeout=args.timeout):
        if not args.json:
            print(f"spying on {args.address} (channels {args.channel!r}); Ctrl-C stops",
                  file=sys.stderr, flush=True)
        try:
            done.wait(args.seconds)
        except KeyboardInterrupt:
            pass
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
    p.add_argument("--log", default=None, metavar="PATH",
                   help="write a row per routed message (.csv, else JSON lines);"
                        " default $IPCBUS_LOG")
    p.set_defaults(func=_cmd_broker)
    p = sub.add_parser("demo", help="start a broker and three workers that greet each other")
    p.set_defaults(func=run_demo)
    p = sub.add_parser("state", help="print the peers, channels and services of a bus")
    p.add_argument("address", help="Unix socket path, PORT or HOST:PORT")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_state)
    p = sub.add_parser("spy", help="print a line for every message the bus routes")
    p.add_argument("address", help="Unix socket path, PORT or HOST:PORT")
    p.add_argument("--channel", default="*", help="only channels matching this glob")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=0, help="stop after this many messages")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_spy)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
