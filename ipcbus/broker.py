"""IpcBusBroker: a hub run in a child process, and the parent's handle on it.

:class:`IpcBusBroker` is the handle the parent keeps: it starts :func:`run_broker_child` in a
``multiprocessing`` child (``spawn`` by default) and talks to it over a Connection pipe (the
bound address, ``query_state``, ``close``; each ask carries a number its answer repeats).
The child runs a :class:`~ipcbus._hub.Hub` (the loop, its connections, back-pressure: see
``_hub.py``) until the parent asks it to stop or goes. :func:`run_broker_foreground` runs
one in this process (``python -m ipcbus broker``).

The hub's names stay importable from here (``Hub``, ``HubOptions``, ``MAX_AUTHENTICATIONS``...).
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import sys
import threading
import time
import weakref
from typing import Any, Callable

import msgpack
from typing_extensions import Self

from . import _broker_restart, _transport as T
from ._handshake import LINK_POLICIES
# The hub's names, reachable from here as before (_Endpoint, _READ, _WRITE: for tests).
from ._hub import _READ as _READ, _WRITE as _WRITE
from ._hub import CLOSING_GRACE, HARD_LIMIT_FACTOR, Hub
from ._hub_auth import MAX_AUTHENTICATIONS
from ._hub_endpoint import HubEndpoint
from ._hub_options import DEFAULT_QUEUE_LIMIT, DEFAULT_SLOW_CONSUMER_TIMEOUT, HubOptions
from ._timeouts import DEFAULT_TIMEOUT, resolve_timeout
from .errors import IpcBusConnectionError, IpcBusError, IpcBusTimeoutError

__all__ = ["IpcBusBroker", "Hub", "HubOptions", "run_broker_child", "run_broker_foreground",
           "MAX_AUTHENTICATIONS", "CLOSING_GRACE", "HARD_LIMIT_FACTOR", "DEFAULT_QUEUE_LIMIT",
           "DEFAULT_SLOW_CONSUMER_TIMEOUT", "LINK_POLICIES", "ENV_LOG"]

log = logging.getLogger("ipcbus")

_Endpoint = HubEndpoint  # the name tests knew
ENV_LOG = "IPCBUS_LOG"  # a broker writes its traffic log there (.csv, or JSON lines)


# -- the broker process -------------------------------------------------------------------------
def _child_logging() -> None:
    logger = logging.getLogger("ipcbus")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"ipcbus broker[{os.getpid()}] %(levelname)s:"
                                               " %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def _ctl_send(ctl: multiprocessing.connection.Connection, *msg: Any) -> None:
    ctl.send_bytes(msgpack.packb(list(msg), use_bin_type=True))


def _ctl_recv(ctl: multiprocessing.connection.Connection) -> list[Any]:
    msg = msgpack.unpackb(ctl.recv_bytes(), raw=False, strict_map_key=False)
    assert isinstance(msg, list)
    return msg


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
BROKER_MALLOC_KEEP = 64 * 1024 * 1024


def _keep_large_buffers() -> None:
    """In the broker's own process (glibc only): serve frames under 64 MiB from the heap and
    keep up to 64 MiB of freed memory, instead of an mmap/munmap pair and fresh page faults
    for every large frame. A 16 MiB message cost the broker 10 ms of system time a message
    before, 6 ms after (W4 16 MiB: ~1.0 -> ~1.5 GB/s, with the client's buffer reuse). The
    peak RSS is unchanged; RSS may stay up to 64 MiB above its floor after large traffic."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, BROKER_MALLOC_KEEP)
    mallopt(_M_TRIM_THRESHOLD, BROKER_MALLOC_KEEP)


def run_broker_child(address: Any, options: dict[str, Any], authkey: bytes,
                     ctl: multiprocessing.connection.Connection,
                     owner_pid: int | None = None) -> None:
    """Entry point of the broker process (module level, so ``spawn`` can import it).
    ``owner_pid``: the process that started it (with forkserver, not the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _child_logging()
    _keep_large_buffers()
    address = tuple(address) if isinstance(address, list) else address
    if options.get("traffic_log") is None and os.environ.get(ENV_LOG):
        options = {**options, "traffic_log": os.environ[ENV_LOG]}
    hub = Hub(HubOptions(**options), authkey=authkey, owner_pid=owner_pid)
    try:
        bound = hub.listen(address)
        link = start_federation(hub)
    except Exception as exc:
        _ctl_send(ctl, "error", str(exc))
        return

    def on_ctl(key: selectors.SelectorKey, mask: int) -> None:
        try:
            msg = _ctl_recv(ctl)
        except (EOFError, OSError):
            hub.stop()  # the parent is gone: so is its bus
            return
        if msg[0] == "state":
            seq = msg[1] if len(msg) > 1 else None  # the parent drops answers to older asks
            try:
                _ctl_send(ctl, "state", hub.router.state(), seq)
            except (TypeError, ValueError, OverflowError) as exc:
                _ctl_send(ctl, "error", f"the state cannot be encoded: {exc}", seq)
        elif msg[0] == "close":
            hub.stop()

    hub.selector.register(ctl.fileno(), selectors.EVENT_READ, on_ctl)
    _ctl_send(ctl, "ready", T.format_address(bound), list(bound) if not isinstance(bound, str)
              else bound)
    try:
        hub.serve_forever()
    finally:
        if link is not None:
            link.close()
        try:
            _ctl_send(ctl, "closed")
        except OSError:
            pass


def start_federation(hub: Hub) -> Any:
    """Link ``hub`` to the other brokers of its bus over NATS (``federation=``), or None."""
    options = hub.options
    if options.federation is None:
        return None
    try:
        from ._federation_link import FederationLink
        import nats  # noqa: F401  (the ipcbus[nats] extra)
    except ImportError:
        raise IpcBusConnectionError("federation needs nats-py: pip install 'ipcbus[nats]'"
                                    ) from None
    link = FederationLink(options.federation, options.bus, options.federation_options)
    link.start(hub)
    return link


def run_broker_foreground(address: T.Address, options: HubOptions,
                          authkey: bytes | None = None,
                          ready: Callable[[T.Address], None] | None = None) -> None:
    """Run a broker in this process until SIGINT/SIGTERM (``python -m ipcbus broker``)."""
    if options.traffic_log is None and os.environ.get(ENV_LOG):
        options.traffic_log = os.environ[ENV_LOG]
    hub = Hub(options, authkey=authkey)
    bound = hub.listen(address)

    def stop(signum: int, frame: Any) -> None:
        hub.call_soon(hub.stop)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if ready is not None:
        ready(bound)
    hub.serve_forever()


class IpcBusBroker:
    """A bus broker running in a child process; this object is the parent's handle on it.

    Options (keyword arguments of the constructor / :meth:`create`): ``max_message`` (bytes,
    128 MiB), ``max_fds`` (per message, 64), ``queue_limit`` (per receiver, 64 MiB),
    ``slow_consumer_timeout`` (s, 10), ``handshake_timeout`` (s, 5), ``allowed_uids`` (extra
    uids let in on a Unix socket), ``traffic_log`` (a path: a row per routed message, CSV if
    it ends in ``.csv``, else JSON lines; default ``$IPCBUS_LOG``), ``ecipc`` (also serve
    electron-common-ipc clients on the Unix socket: :mod:`ipcbus.ecipc.gateway`), and ``context`` (a multiprocessing context or start method
    name; ``"spawn"`` by default, since a process with threads must not fork).
    """

    def __init__(self, *, context: Any = None, restart: bool = False, **options: Any) -> None:
        if not isinstance(restart, bool):
            raise TypeError("restart must be a bool")
        self._restart = restart
        self._supervisor: _broker_restart.Supervisor | None = None
        self._authkey = b""
        self._options = HubOptions(**options)
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context or "spawn")
        self._context = context
        self._process: Any = None
        self._ctl: multiprocessing.connection.Connection | None = None
        self._lock = threading.Lock()
        self._address: T.Address | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._seq = 0  # of the asks over the control pipe

    @classmethod
    def create(cls, **options: Any) -> IpcBusBroker:
        """A broker handle (not started yet: :meth:`connect` starts it). Every option is a
        keyword, with its default and unit:

        - ``max_message`` (int, bytes; default 134217728 = 128 MiB): the largest frame; a
          client's larger send raises ``ValueError`` before anything is sent, a peer announcing
          a larger frame is disconnected.
        - ``max_fds`` (int, descriptors per message; default 64, at most 253).
        - ``queue_limit`` (int, bytes per receiver; default 67108864 = 64 MiB): past it the broker
          stops reading from the senders that feed that receiver (back-pressure).
        - ``slow_consumer_timeout`` (float, seconds; default 10.0): a receiver that stays over
          ``queue_limit`` this long is disconnected with the reason "slow consumer".
        - ``handshake_timeout`` (float, seconds; default 5.0): a connection that has not said
          hello (and, on TCP, authenticated) by then is dropped.
        - ``allowed_uids`` (list of int; default None = only the broker's own uid): more uids
          let in on a Unix socket.
        - ``traffic_log`` (str path; default ``$IPCBUS_LOG``, else None): a row per routed
          message, CSV if the path ends in ``.csv``, else JSON lines.
        - ``links`` (str; default ``"owner"``): who may link an ``IpcBusBridge`` to this broker.
          ``"owner"``: on the Unix socket only the process that called :meth:`connect` (the
          kernel's credentials tell), on TCP whoever proved the authkey; ``"any"``: every
          connection the broker admits; ``"none"``: nobody. A link speaks for the peers of a
          whole side and is not paused like an ordinary sender, so the broker grants the role;
          a bridge refused it gets ``IpcBusConnectionError`` naming this option.
        - ``ecipc`` (bool; default False): also serve electron-common-ipc (Node/Electron)
          clients on the same Unix socket; the first byte of a connection tells the protocols
          apart (``ipcbus.ecipc.gateway``). Not with a TCP address.
        - ``federation`` (str URL; default None): ``"nats://[USER:PASSWORD@]HOST:PORT"``
          (or ``nats://TOKEN@HOST:PORT``, ``tls://...``): link this broker over NATS to the
          other brokers of the same ``bus``, on any host (``pip install 'ipcbus[nats]'``;
          see docs/federation.md). NATS unreachable or refusing the credentials:
          :meth:`connect` raises ``IpcBusConnectionError`` naming the cause.
        - ``bus`` (str; default ``"default"``): the federated bus's name (brokers of other
          names on the same NATS server never see each other's traffic).
          Several URLs separated by commas: the servers of a NATS cluster.
        - ``federation_options`` (dict; default None): more nats-py ``connect()`` options
          (``user``, ``password``, ``token``, ``user_credentials`` (a .creds path),
          ``nkeys_seed`` (a path)...), and ``tls_ca``, ``tls_cert``, ``tls_key`` (paths)
          for TLS.
        - ``context`` (a multiprocessing context or a start method name; default ``"spawn"``):
          how the broker's child process is started.
        - ``restart`` (bool; default False): restart a broker child that dies, on the same
          address (:attr:`process` is the live child; each restart is logged; :meth:`close`
          stops restarting). Clients connected with ``reconnect`` come back to it.

        Bad values raise ``ValueError``/``TypeError`` here.
        """
        return cls(**options)

    @property
    def process(self) -> Any:
        """The ``multiprocessing.Process`` running the broker (None before connect)."""
        return self._process

    @property
    def address(self) -> T.Address | None:
        """Where the broker listens (with the real port if port 0 was asked)."""
        return self._address

    @property
    def closed(self) -> bool:
        return self._ctl is None

    def connect(self, address: Any = None, *, path: str | None = None, port: int | None = None,
                host: str | None = None, timeout: float | None = None,
                authkey: bytes | None = None) -> Self:
        """Start the broker process listening on ``address``; return ``self`` once it accepts
        peers (``with IpcBusBroker.create().connect(path) as broker:`` stops it at the end).

        - ``address``: a ``str`` Unix socket path (at most 107 bytes; created owner-only; a
          stale file of a dead broker is replaced, a live broker's never), an ``int`` TCP port
          on 127.0.0.1 (``0``: a free one, see :attr:`address`), or a ``(host, port)`` tuple.
          Default None: use ``path``/``port``/``host``.
        - ``path``, ``port``, ``host`` (default None): the same, as keywords (``host`` defaults
          to 127.0.0.1).
        - ``timeout`` (float, seconds; default None = 2.0 s, a negative value waits forever):
          how long the child may take to start, never less than 10 s, since starting a
          ``spawn`` child takes a while on a busy machine.
        - ``authkey`` (bytes; default None = ``$IPCBUS_AUTHKEY`` if set, else
          ``multiprocessing.current_process().authkey``): the key TCP peers must prove.

        Raises ``ValueError`` for a bad address, :class:`~ipcbus.IpcBusConnectionError` if the
        broker cannot listen there (e.g. "a bus is already listening on ..."), and
        :class:`~ipcbus.IpcBusTimeoutError` if its process does not start in time.
        """
        addr = T.parse_address(address, path=path, port=port, host=host)
        wait = resolve_timeout(timeout)
        if wait is not None:
            wait = max(wait, 10.0)  # starting a spawn child takes a while on a busy machine
        with self._lock:
            if self._ctl is not None:
                raise IpcBusConnectionError("this broker is already running")
            key = bytes(authkey) if authkey is not None else T.default_authkey()
            proc, parent, bound = self._start_child(addr, key, wait)
            self._address = bound if isinstance(bound, str) else (bound[0], bound[1])
            self._process, self._ctl, self._authkey = proc, parent, key
            if self._restart:
                self._supervisor = _broker_restart.Supervisor(self)
                self._supervisor.start()
            self._finalizer = weakref.finalize(self, _stop_child, proc, parent, DEFAULT_TIMEOUT,
                                               self._supervisor)
        return self

    def _start_child(self, addr: Any, key: bytes, wait: float | None = 10.0
                     ) -> tuple[Any, multiprocessing.connection.Connection, Any]:
        """Start a broker child listening on ``addr``: (process, control pipe, bound
        address) once it accepts peers; raises as :meth:`connect` says."""
        parent, child = self._context.Pipe(duplex=True)
        proc = self._context.Process(
            target=run_broker_child, name=f"ipcbus-broker {T.format_address(addr)}",
            args=(addr, self._options.to_dict(), key, child, os.getpid()), daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(wait):
                raise IpcBusTimeoutError("the broker process did not start in time")
            msg = _ctl_recv(parent)
        except (EOFError, OSError) as exc:
            proc.join(1.0)
            parent.close()
            raise IpcBusConnectionError(f"the broker process died while starting"
                                        f" (exit code {proc.exitcode}): {exc}") from None
        except BaseException:
            proc.kill()
            parent.close()
            raise
        if msg[0] != "ready":
            proc.join(5.0)
            parent.close()
            raise IpcBusConnectionError(f"the broker could not start: {msg[1]}")
        return proc, parent, msg[2]

    def _replace_child(self, dead: Any, proc: Any, ctl: multiprocessing.connection.Connection,
                       bound: Any) -> bool:
        """The supervisor's swap (``restart=True``): ``proc`` in place of ``dead``; False
        (and ``proc`` stopped) if the broker was closed meanwhile."""
        with self._lock:
            old = self._ctl
            if old is None or self._process is not dead:
                _stop_child(proc, ctl)
                return False
            if self._finalizer is not None:
                self._finalizer.detach()
            old.close()
            self._process, self._ctl = proc, ctl
            self._finalizer = weakref.finalize(self, _stop_child, proc, ctl, DEFAULT_TIMEOUT,
                                               self._supervisor)
        return True

    def _ask(self, timeout: float | None, what: str) -> list[Any]:
        """Ask the broker process; its answer, as ``[what, value, seq]``. Each ask carries
        a number the answer repeats: an answer that comes after its ask timed out is
        dropped by the next ask, never taken for that one's."""
        wait = resolve_timeout(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            ctl = self._ctl
            if ctl is None:
                raise IpcBusConnectionError("the broker is not running")
            self._seq += 1
            try:
                _ctl_send(ctl, what, self._seq)
                while True:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not ctl.poll(left):
                        raise IpcBusTimeoutError(f"the broker did not answer {what!r} in time")
                    reply = _ctl_recv(ctl)
                    if reply[-1] == self._seq:
                        break
            except (EOFError, OSError) as exc:
                if isinstance(exc, IpcBusTimeoutError):
                    raise
                raise IpcBusConnectionError(f"the broker process has gone: {exc}") from None
        if reply[0] == "error":
            raise IpcBusError(f"the broker could not answer {what!r}: {reply[1]}")
        return reply

    def query_state(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's view of the bus: pid, peers, channels with subscriber counts, groups
        (channel -> group -> member ids), services (name -> host id, or the members' ids of
        a service hosted by a group)."""
        reply = self._ask(timeout, "state")
        state: dict[str, Any] = reply[1]
        return state

    def is_service_available(self, name: str, timeout: float | None = None) -> bool:
        if not isinstance(name, str):
            raise TypeError("service name must be a str")
        return name in self.query_state(timeout)["services"]

    def close(self, timeout: float | None = None) -> None:
        """Stop the broker process and remove its socket file. Idempotent."""
        with self._lock:
            ctl, self._ctl = self._ctl, None
            if ctl is None:
                return
            if self._supervisor is not None:
                self._supervisor.stop()  # no restart from now on
            if self._finalizer is not None:
                self._finalizer.detach()
            _stop_child(self._process, ctl, resolve_timeout(timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = T.format_address(self._address) if self._address is not None else "-"
        state = "closed" if self._ctl is None else f"pid {self._process.pid}"
        return f"<IpcBusBroker {where} {state}>"


def _stop_child(proc: Any, ctl: multiprocessing.connection.Connection,
                timeout: float | None = DEFAULT_TIMEOUT,
                supervisor: _broker_restart.Supervisor | None = None) -> None:
    if supervisor is not None:  # restart=True: first no more restarts (at exit too)
        supervisor.stop()
    try:
        _ctl_send(ctl, "close")
        if ctl.poll(timeout if timeout is not None else None):
            try:
                _ctl_recv(ctl)
            except (EOFError, OSError):
                pass
    except (OSError, ValueError):
        pass
    proc.join(timeout if timeout is not None else None)
    if proc.is_alive():
        proc.kill()
        proc.join(1.0)
    ctl.close()
