"""The ipcbus command line (``ipcbus`` / ``python -m ipcbus``).

Rules of this module, as users of ``nats``/``busctl`` expect them:

* an ordinary failure (no bus at an address, a path in use or too long, a wrong key, a request
  that fails) is ONE line on stderr, ``ipcbus: error: <cause>``, and exit status 1; a usage
  mistake is argparse's message and exit status 2; a traceback only with ``--debug``;
* Ctrl-C ends a command with exit status 130 and no traceback (``broker`` and ``spy``, which
  run until stopped, end with 0);
* arguments of ``send``/``request``/``call`` are JSON values when they parse as JSON, else
  strings (``42`` is an int, ``'"42"'`` a str, ``hello`` a str);
* results print as text (a str as is, anything else as JSON) or, with ``--json``, as one JSON
  object per command; ``bytes`` print as ``{"$bytes": "<base64>"}``.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import threading
from typing import Any, Callable, Sequence

from . import _transport as T
from .errors import IpcBusError

PROG = "ipcbus"
ENV_AUTHKEY = "IPCBUS_AUTHKEY"
DEFAULT_CLI_TIMEOUT = 5.0
_MIB = 1024 * 1024

log = logging.getLogger("ipcbus")


class CliError(Exception):
    """A failure the command line reports as one line (exit status 1)."""


# -- values in and out ---------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A command-line argument: its JSON value when it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _plain(value: Any) -> Any:
    """``value`` with what JSON cannot hold made plain: bytes as ``{"$bytes": base64}``,
    dict keys as str."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_plain(k)): _plain(v) for k, v in value.items()}
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(_plain(value), indent=indent, sort_keys=indent is not None,
                      ensure_ascii=False)


def _print_result(value: Any, as_json: bool, record: dict[str, Any]) -> None:
    if as_json:
        print(to_json(record))
    elif isinstance(value, str):
        print(value)
    else:
        print(to_json(value))


# -- connections -----------------------------------------------------------------------------------
def _authkey(args: argparse.Namespace) -> bytes | None:
    """The key ``--authkey-env NAME`` names, or None (then ``$IPCBUS_AUTHKEY``, see
    ``_transport.default_authkey``)."""
    name: str | None = args.authkey_env
    if name is None:
        return None
    value = os.environb.get(os.fsencode(name))
    if not value:
        raise CliError(f"--authkey-env {name}: the environment variable {name} is not set"
                       " (or empty)")
    return value


def _address(text: str) -> T.Address:
    if not text:
        raise CliError("the address is empty (a Unix socket path, PORT or HOST:PORT)")
    return T.parse_address(T.parse_env_address(text))  # the API's checks and wording


def _connect(args: argparse.Namespace, peer_name: str) -> Any:
    from .client import IpcBusClient

    return IpcBusClient.create().connect(_address(args.address), peer_name=peer_name,
                                         timeout=args.timeout, authkey=_authkey(args))


# -- the commands ------------------------------------------------------------------------------
def _cmd_broker(args: argparse.Namespace) -> int:
    from .broker import HubOptions, run_broker_foreground

    address = _address(args.address)
    authkey = _authkey(args)
    if T.is_tcp(address) and authkey is None and not os.environb.get(ENV_AUTHKEY.encode()):
        raise CliError(f"a TCP broker needs a key its peers know: set {ENV_AUTHKEY}"
                       " (or --authkey-env NAME) in the environment of the broker and its peers")
    options = HubOptions(max_message=args.max_message, queue_limit=args.queue_limit,
                         slow_consumer_timeout=args.slow_consumer_timeout,
                         traffic_log=args.log, links=args.links)

    def ready(bound: T.Address) -> None:
        print(f"ipcbus broker listening on {T.format_address(bound)} (pid {os.getpid()});"
              " Ctrl-C stops it", flush=True)

    run_broker_foreground(address, options, authkey=authkey, ready=ready)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args)


def _cmd_state(args: argparse.Namespace) -> int:
    from .spy import format_state

    with _connect(args, "ipcbus-state") as client:
        state = client.request("/ipcbus/queryState", args.timeout).payload
        me = client.peer.id
    state["peers"] = [p for p in state["peers"] if p["id"] != me]
    print(to_json(state, indent=2) if args.json else format_state(state))
    return 0


def _cmd_spy(args: argparse.Namespace) -> int:
    from .spy import IpcBusSpy, TrafficRecord, format_record

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

    with IpcBusSpy(show, args.channel).connect(_address(args.address), timeout=args.timeout,
                                               authkey=_authkey(args)):
        if not args.json:
            print(f"spying on {args.address} (channels {args.channel!r}); Ctrl-C stops",
                  file=sys.stderr, flush=True)
        try:
            done.wait(args.seconds)
        except KeyboardInterrupt:  # the ordinary way to stop a spy: a success
            pass
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    values = [parse_value(a) for a in args.args]
    with _connect(args, "ipcbus-send") as client:
        client.send(args.channel, *values)
    if args.json:
        print(to_json({"channel": args.channel, "args": values}))
    return 0


def _cmd_request(args: argparse.Namespace) -> int:
    from .errors import IpcBusRequestError

    values = [parse_value(a) for a in args.args]
    with _connect(args, "ipcbus-request") as client:
        try:
            response = client.request(args.channel, args.timeout, *values)
        except IpcBusRequestError as exc:
            raise CliError(f"request on {args.channel!r} failed: {_reason(exc)}") from exc
    sender = response.event.sender if response.event is not None else None
    _print_result(response.payload, args.json, {
        "channel": args.channel, "payload": response.payload,
        "sender": None if sender is None else {"id": sender.id, "name": sender.name,
                                               "type": sender.process.type,
                                               "pid": sender.process.pid}})
    return 0


def _cmd_call(args: argparse.Namespace) -> int:
    from .errors import IpcBusRequestError
    from .service import IpcBusServiceProxy

    values = [parse_value(a) for a in args.args]
    with _connect(args, "ipcbus-call") as client:
        available = client.request("/ipcbus/serviceAvailable", args.timeout, args.service)
        if not available.payload:
            raise CliError(f"no service {args.service!r} is started on the bus")
        proxy = IpcBusServiceProxy.create(client, args.service, call_timeout=args.timeout)
        try:
            proxy.connect(args.timeout)
            result = proxy.call(args.method, *values)
        except IpcBusRequestError as exc:
            raise CliError(f"{args.service}.{args.method}() failed: {_reason(exc)}") from exc
        finally:
            proxy.close()
    _print_result(result, args.json, {"service": args.service, "method": args.method,
                                      "result": result})
    return 0


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    err = getattr(response, "err", None)
    return str(err) if err else str(exc)


# -- the parser --------------------------------------------------------------------------------
DESCRIPTION = """\
Run and look into an ipcbus message bus: a broker, the state of a bus, its traffic, and
messages, requests and service calls sent from the shell.

ADDRESS is a Unix socket path, a TCP PORT on 127.0.0.1, or HOST:PORT."""

EPILOG = f"""\
environment:
  {ENV_AUTHKEY}   the key of TCP connections (bytes of the value); without it, and
                   without --authkey-env, a TCP broker refuses to start
  IPCBUS_ADDRESS   the address of connect() with no address (in programs)
  IPCBUS_LOG       the broker's traffic log (see 'ipcbus broker --help')

exit status: 0 success, 1 error (one line on stderr), 2 usage error, 130 interrupted

examples:
  ipcbus broker /tmp/app.bus
  ipcbus state /tmp/app.bus --json
  ipcbus send /tmp/app.bus greeting hello 42 '{{"n": 1}}'
  ipcbus request /tmp/app.bus add 2 3 --timeout 1.5
  ipcbus call /tmp/app.bus calc div 1 4
  {ENV_AUTHKEY}=s3cret ipcbus state 127.0.0.1:5123"""


def _common(suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes (also before the command: ``ipcbus --debug state``)."""
    parent = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parent.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log at DEBUG level on stderr")
    parent.add_argument("--debug", action="store_true", default=default(False),
                        help="print the traceback of an error (and log at DEBUG level)")
    parent.add_argument("--authkey-env", metavar="NAME", default=default(None),
                        help=f"read the TCP authkey from environment variable NAME"
                             f" (default: ${ENV_AUTHKEY}, else the process's own key)")
    return parent


def _timeout(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--timeout", type=float, default=DEFAULT_CLI_TIMEOUT, metavar="SECONDS",
                        help=f"{what} (seconds; a negative value waits forever;"
                             " default: %(default)s)")


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS",
                        help="Unix socket path, PORT (on 127.0.0.1) or HOST:PORT")


def _json_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"{what} (default: text)")


def _broker_args(p: argparse.ArgumentParser) -> None:
    """The options of ``ipcbus broker``: the address and the hub's limits."""
    _address_arg(p)
    p.add_argument("--max-message", type=int, default=128 * _MIB, metavar="BYTES",
                   help="largest message accepted (bytes; default: %(default)s = 128 MiB)")
    p.add_argument("--queue-limit", type=int, default=64 * _MIB, metavar="BYTES",
                   help="queue of one receiver before its senders are held back"
                        " (bytes; default: %(default)s = 64 MiB)")
    p.add_argument("--slow-consumer-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long a receiver may stay over --queue-limit before it is"
                        " disconnected (seconds; default: %(default)s)")
    p.add_argument("--log", default=None, metavar="PATH",
                   help="write a row per routed message to PATH (CSV if it ends in .csv,"
                        " else JSON lines; default: $IPCBUS_LOG, else no log)")
    p.add_argument("--links", choices=["any", "none"], default="any",
                   help="who may link a bridge to this broker: any process the broker admits,"
                        " or none (default: %(default)s; a broker started from the command line"
                        " has no owner process to restrict links to)")


def build_parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, parents=[_common(suppress=False)],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int],
                description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help,
                           parents=[common])
        p.set_defaults(func=func)
        return p

    _broker_args(command("broker", "run a broker in the foreground until Ctrl-C or SIGTERM",
                         _cmd_broker))

    command("demo", "start a broker and three workers that greet each other", _cmd_demo)

    p = command("state", "print the peers, channels and services of a bus", _cmd_state)
    _address_arg(p)
    _json_arg(p, "print the state as JSON")
    _timeout(p, "how long to wait for the bus")

    p = command("spy", "print a line for every message the bus routes", _cmd_spy)
    _address_arg(p)
    p.add_argument("--channel", default="*", metavar="GLOB",
                   help="only channels matching GLOB (default: %(default)s, every channel)")
    _json_arg(p, "print one JSON object per message")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop after N messages (default: 0, never)")
    p.add_argument("--seconds", type=float, default=None, metavar="SECONDS",
                   help="stop after this long (seconds; default: never, Ctrl-C stops)")
    _timeout(p, "how long to wait for the bus")

    def verb(name: str, summary: str, func: Callable[[argparse.Namespace], int],
             description: str, positionals: list[tuple[str, str]], json_help: str,
             timeout_help: str) -> None:
        """A command that pokes a bus: ADDRESS, its own positionals, ARG..., --json, --timeout."""
        p = command(name, summary, func, description)
        _address_arg(p)
        for dest, help_text in positionals:
            p.add_argument(dest, metavar=dest.upper(), help=help_text)
        p.add_argument("args", nargs="*", metavar="ARG",
                       help="arguments: JSON values when they parse as JSON, else strings")
        _json_arg(p, json_help)
        _timeout(p, timeout_help)

    verb("send", "broadcast a message on a channel", _cmd_send,
         "Broadcast ARGS on CHANNEL to every listener of the bus (like 'nats pub');"
         " prints nothing unless --json.", [("channel", "the channel")],
         "print what was sent as JSON", "how long to wait for the bus")
    verb("request", "send a request and print the first answer", _cmd_request,
         "Send a request on CHANNEL and print the first answer's payload (like 'nats req')."
         " A request nobody listens to, rejected or unanswered within --timeout fails with"
         " exit status 1.", [("channel", "the channel")],
         "print the answer as JSON with its sender",
         "how long to wait for the bus and for the answer")
    verb("call", "call a method of a service and print its result", _cmd_call,
         "Call METHOD of SERVICE with ARGS and print the result (like 'busctl call')."
         " A missing service, a method that raises or a timeout fails with exit status 1.",
         [("service", "the service name"), ("method", "the method (call) name")],
         "print the result as JSON", "how long to wait for the bus, the service and the result")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (errors are reported here, as one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose or args.debug else logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130
    except BrokenPipeError:  # stdout closed early (``ipcbus spy ADDRESS | head``)
        _silence_stdout()
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {describe(exc)}", file=sys.stderr, flush=True)
        return 1


def describe(exc: BaseException) -> str:
    """One line naming the cause of ``exc``: its message for the errors a user meets (bus,
    OS, bad values), the type too for anything else (a bug: ``--debug`` shows where)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, IpcBusError, OSError, ValueError, TypeError)):
        return text
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
