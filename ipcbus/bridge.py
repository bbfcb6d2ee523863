"""IpcBusBridge: the hub of one process for its pipe children and its own clients.

The bridge runs the broker's :class:`~ipcbus._hub.Hub` (the same router, the same limits)
on a daemon thread of the process that creates it. Its endpoints are:

* pipe children: ``open_pipe()`` returns one end of a duplex ``multiprocessing`` Pipe (a Unix
  socketpair); the child joins with ``IpcBusClient.create().connect(conn)`` and is a peer of
  type ``"pipe"``;
* clients of this process: ``IpcBusClient.create().connect()`` with no address joins the bridge
  of this process through an in-process socketpair, as a peer of type ``"main"``;
* optionally a *link* to a broker (``connect(address)``): the router's upstream. Local peers
  and their subscriptions are announced on the broker as peers of the link, so the broker
  sends a message across once per bridge however many local listeners it has, and only for
  channels someone on this side listens to; broadcasts and requests from this side cross to
  the broker, which serves its side and never echoes them back. With ``reconnect`` the link
  comes back after losing the broker (``_bridge_relink.py``: the retry thread;
  ``_router_relink.py``: what the router announces to the new broker).

When the parent's copy of a pipe end is still open after the child has joined, the bridge
closes it, so that a child killed with SIGKILL is noticed at once.
"""
from __future__ import annotations

import atexit
import logging
import os
import multiprocessing
import multiprocessing.connection
import socket
import threading
import weakref
from typing import Any

from typing_extensions import Self

from . import _transport as T
from . import _local
from ._bridge_relink import Relinker
from ._client.reconnect import Reconnect, policy_of
from ._timeouts import resolve_timeout
from ._hub import Hub
from ._hub_options import HubOptions
from .client import IpcBusClient
from .errors import IpcBusConnectionError

log = logging.getLogger("ipcbus")

class IpcBusBridge:
    """The hub of this process: pipe children and local clients, optionally linked to a broker.

    Options are the broker's limits (``max_message``, ``max_fds``, ``queue_limit``,
    ``slow_consumer_timeout``, ``handshake_timeout``). One bridge per process at a time.
    """

    def __init__(self, **options: Any) -> None:
        self._options = HubOptions(**options)
        if self._options.federation is not None:
            raise ValueError("federation= is an option of IpcBusBroker (a bridge joins a"
                             " federated bus through its broker)")
        self._hub: Hub | None = None
        self._lock = threading.Lock()
        self._link_address: T.Address | None = None
        self._handed_out: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._probe_client: Any = None
        self._relinker: Relinker | None = None

    @classmethod
    def create(cls, **options: Any) -> IpcBusBridge:
        """A bridge (not started yet: :meth:`connect` starts it). Its options are the broker's
        limits, as keywords, with their defaults and units:

        - ``max_message`` (int, bytes; default 134217728 = 128 MiB): the largest frame.
        - ``max_fds`` (int, descriptors per message; default 64, at most 253).
        - ``queue_limit`` (int, bytes per receiver; default 67108864 = 64 MiB): back-pressure
          on the senders that feed a receiver past it.
        - ``slow_consumer_timeout`` (float, seconds; default 10.0): a receiver over
          ``queue_limit`` this long is disconnected ("slow consumer").
        - ``handshake_timeout`` (float, seconds; default 5.0): a pipe child that has not said
          hello by then is dropped.

        Bad values raise ``ValueError``/``TypeError`` here.
        """
        return cls(**options)

    @property
    def closed(self) -> bool:
        return self._hub is None

    @property
    def address(self) -> T.Address | None:
        """The address of the broker this bridge is linked to, if any."""
        return self._link_address

    def connect(self, address: Any = None, *, path: str | None = None, port: int | None = None,
                host: str | None = None, timeout: float | None = None,
                authkey: bytes | None = None, reconnect: bool | Reconnect = False) -> Self:
        """Start the hub on a thread of this process; with an address, also link it to the
        broker there. Returns ``self`` (``with IpcBusBridge.create().connect() as bridge:``
        closes it at the end). One bridge per process at a time.

        - ``address``: None (default) for a bridge of its own (pipe children and clients of
          this process only); else the broker's address, as ``IpcBusClient.connect`` takes it:
          a ``str`` Unix socket path, an ``int`` TCP port on 127.0.0.1, or ``(host, port)``.
        - ``path``, ``port``, ``host`` (default None): the same, as keywords.
        - ``timeout`` (float, seconds; default None = 2.0 s, a negative value waits forever):
          how long connecting to the broker and its handshake may take.
        - ``authkey`` (bytes; default None = ``$IPCBUS_AUTHKEY`` if set, else
          ``multiprocessing.current_process().authkey``): the key of a TCP link.

        - ``reconnect`` (bool or :class:`~ipcbus.Reconnect`; default False): what happens
          when the link is lost. False: it stays closed, and this process and its pipe
          children go on as a bus of their own, without the remote part. True (the default
          policy) or a ``Reconnect``: the same meanwhile (requests that needed the broker fail
          at once), and the bridge links again with the policy's backoff; on relinking it
          announces its side to the new broker again: every local peer with the same id (one
          the broker refuses as taken is logged and stays local-only), its subscriptions and
          groups, and its services, claimed again, whose proxies across the bus see them
          start (the bridge asks each host its status and broadcasts "start" in the host's
          name); this side's proxies of services beyond the link see them stop at the loss
          and start again. Past ``give_up`` the link stays closed (logged). ``ValueError``
          without an address, ``TypeError`` for another type.

        Raises :class:`~ipcbus.IpcBusConnectionError` if a bridge is already connected in this
        process or the broker cannot be reached or refuses the link (the first link is not
        retried: ``reconnect`` is about losing it later).
        """
        linked = any(a is not None for a in (address, path, port))
        addr = T.parse_address(address, path=path, port=port, host=host) if linked else None
        wait = resolve_timeout(timeout)
        policy = policy_of(reconnect)
        if policy is not None and addr is None:
            raise ValueError("reconnect needs the address of a broker")
        with self._lock, _local.lock:
            if self._hub is not None:
                raise IpcBusConnectionError("this bridge is already connected")
            if _local.bridge_of_this_process() is not None:
                raise IpcBusConnectionError("a bridge is already connected in this process")
            options = self._options
            if addr is not None:
                sock = T.connect_socket(addr, wait if wait is not None else 3600.0)
                try:
                    _, decoder, welcome = T.client_handshake(
                        sock, tcp=T.is_tcp(addr), authkey=authkey,
                        timeout=wait if wait is not None else 3600.0, relay=True,
                        max_message=options.max_message)
                except BaseException:
                    sock.close()
                    raise
                # One limit on both sides of the link: local senders are told the smaller
                # one, so a message legal here is legal at the broker (and back).
                limit = min(options.max_message, int(welcome["max_message"]))
                options = HubOptions(**{**options.to_dict(), "max_message": limit})
            hub = Hub(options, authkey=authkey)
            if addr is not None:
                hub.router.upstream = hub.add_endpoint(
                    sock, f"link to {T.format_address(addr)}", ptype="socket", relay=True,
                    ready=True, decoder=decoder)
                self._link_address = addr
                if policy is not None:
                    self._relinker = Relinker(hub, addr, policy, authkey=authkey,
                                              timeout=wait if wait is not None else 3600.0)
            hub.on_drop = self._on_drop
            hub.start_thread(f"ipcbus-bridge {T.format_address(addr) if addr else 'local'}")
            self._hub = hub
            _local.register(self)
            # At exit, close before brokers and daemon children are torn down (atexit runs
            # last-registered first), so the link ends as a close, not as a lost broker.
            atexit.register(self.close)
        return self

    def _on_drop(self, label: str, reason: str, was_upstream: bool) -> None:
        if not was_upstream or self._hub is None:  # not when the bridge itself is closing
            return
        if self._relinker is not None:
            self._relinker.lost(reason)
        else:
            log.warning("bridge: the link to the broker has closed (%s); this process and its"
                        " pipe children go on as a bus of their own", reason)

    def open_pipe(self) -> multiprocessing.connection.Connection:
        """A Connection for one child: pass it in ``Process`` args (or through another pipe);
        the child joins with ``IpcBusClient.create().connect(conn)``."""
        hub = self._require_hub()
        mine, theirs = multiprocessing.Pipe(duplex=True)
        sock = socket.socket(fileno=os.dup(mine.fileno()))
        mine.close()
        hub.owned.add(sock)
        self._handed_out[sock.fileno()] = theirs
        hub.call_soon(lambda: self._admit_pipe(hub, sock))
        return theirs

    def _admit_pipe(self, hub: Hub, sock: socket.socket) -> None:
        fd = sock.fileno()
        theirs = self._handed_out.get(fd)
        ep = hub.add_endpoint(sock, "pipe", ptype="pipe")  # its pid: the HELLO's
        if theirs is not None:
            # Once the child has said HELLO it holds its own copy: close ours, or a child
            # killed with SIGKILL would never look closed.
            ep.on_ready = lambda: _close_quietly(theirs)

    def attach_local(self) -> socket.socket:
        """A socket for a client of this process (``IpcBusClient.connect()``)."""
        hub = self._require_hub()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hub.owned.add(mine)

        def admit() -> None:
            hub.add_endpoint(mine, "main", ptype="main", pid=os.getpid(), cred_pid=os.getpid())

        hub.call_soon(admit)
        return theirs

    def query_state(self, timeout: float | None = None) -> dict[str, Any]:
        """The bus as this bridge knows it: its own router's state, or, when linked to a
        broker, the broker's view of the whole bus (the same answer as
        ``/ipcbus/queryState`` from any client)."""
        hub = self._require_hub()
        if hub.router.upstream is not None:
            state: dict[str, Any] = self._probe().request(
                "/ipcbus/queryState", timeout).payload
            return state
        done = threading.Event()
        result: dict[str, Any] = {}

        def read() -> None:
            result.update(hub.router.state())
            done.set()

        hub.call_soon(read)
        if not done.wait(resolve_timeout(timeout)):
            raise IpcBusConnectionError("the bridge did not answer in time")
        return result

    def is_service_available(self, name: str, timeout: float | None = None) -> bool:
        """Is a service of this name started anywhere on the bus?"""
        if not isinstance(name, str):
            raise TypeError("service name must be a str")
        return name in self.query_state(timeout)["services"]

    def _probe(self) -> Any:
        """A client of this bridge for asking the broker (a "main" peer named ipcbus-bridge)."""
        with self._lock:
            if self._probe_client is None:
                self._probe_client = IpcBusClient.create().connect(
                    peer_name=f"ipcbus-bridge-{os.getpid()}")
            return self._probe_client

    def _require_hub(self) -> Hub:
        hub = self._hub
        if hub is None:
            raise IpcBusConnectionError("the bridge is not connected")
        return hub

    def close(self, timeout: float | None = None) -> None:
        """Close every pipe, every local client connection and the link. Idempotent."""
        atexit.unregister(self.close)
        relinker, self._relinker = self._relinker, None
        if relinker is not None:
            relinker.close()
        with self._lock:
            probe, self._probe_client = self._probe_client, None
        if probe is not None:
            probe.close()
        with self._lock:
            hub, self._hub = self._hub, None
            if hub is None:
                return
            with _local.lock:
                if _local.is_current(self):
                    _local.register(None)
            hub.call_soon(hub.stop)
            if hub.thread is not None and hub.thread is not threading.current_thread():
                hub.thread.join(resolve_timeout(timeout))
            for conn in list(self._handed_out.values()):
                _close_quietly(conn)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        link = f" linked to {T.format_address(self._link_address)}" if self._link_address else ""
        return f"<IpcBusBridge{link} {'closed' if self._hub is None else 'running'}>"


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except OSError:
        pass
