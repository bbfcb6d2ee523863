"""IpcBusClient: a peer on the bus, an EventEmitter of channels.

The client is the public face; the machinery behind it lives in ``ipcbus._client``:

* ``_client/connection.py``: the process's connection to one bus, shared by its clients,
  and the concurrency model (which thread reads, which dispatches, who waits how, which lock
  guards what), on one page at its top;
* ``_client/inbox.py``: the read/dispatch scheduling as a pure unit (the dispatch queue and
  its byte budget);
* ``_client/writer.py``: writing frames (the send lock, coalesced bursts, memberships);
* ``_client/requests.py`` and ``_client/answers.py``: requests in flight and their answers;
* ``_client/delivery.py``: a received frame to the listeners of this process's clients;
* ``_client/opening.py``: finding or opening the process's connection for ``connect()``;
* ``_client/readiness.py``: ``sync()`` and ``wait_for_listeners()``;
* ``_client/reconnect.py`` and ``_client/reconnecting.py``: ``on_closed``, and surviving the
  loss of the bus (``connect(reconnect=...)``, ``wait_connected()``, ``on_disconnected``,
  ``on_reconnected``): the policy as a pure unit, the retry thread.

A client's frames carry one *membership* per ``connect()`` (``writer.Membership``): the hub's
record of the peer, adopted from the answer to PEER_ADD before anything else of it is
written, and a ``left`` flag set where PEER_REMOVE is written: no frame in a client's name
follows its PEER_REMOVE. ``close()`` runs all its steps when interrupted, then raises; an
interrupted ``connect()`` leaves once the hub answers its PEER_ADD.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import threading
import time
import uuid
from typing import Any, Callable

from typing_extensions import Self

from . import _protocol as P
from . import _transport as T
from ._protocol import Kind
from . import _schemes
from ._pending import settle as _settle
from ._client import answers as _answers, connection as _connection, delivery as _delivery
from ._client import joining as _joining, opening as _opening, readiness as _readiness
from ._client import gathering as _gathering, groups as _groups, writer as _writer
from ._client import reconnect as _reconnect, reconnecting as _reconnecting
from ._client import shm as _shm
from ._client import shm_requests as _shm_requests
from ._client.reconnect import Reconnect
from ._timeouts import resolve_timeout
from ._types import (IpcBusEvent, IpcBusPeer, IpcBusProcess, IpcBusRequest,
                     IpcBusRequestResponse, target_id)
from .errors import (IpcBusConnectionError, IpcBusError, IpcBusRequestError,
                     IpcBusRequestTimeoutError)

log = logging.getLogger("ipcbus")

__all__ = ["IpcBusClient", "IpcBusPeer", "IpcBusProcess", "IpcBusEvent", "IpcBusRequest",
           "IpcBusRequestResponse"]

_SEND, _SEND_TO, _REQUEST, _RESPONSE = (int(Kind.SEND), int(Kind.SEND_TO), int(Kind.REQUEST),
                                        int(Kind.RESPONSE))
_PREFIX_PACK = P.PREFIX.pack


# Names other modules and tests know from here (the machinery moved to ipcbus._client).
_AnswerFuture = _answers.AnswerFuture
_set = _settle
_Connection = _connection.Connection
DISPATCH_BUDGET = _connection.DISPATCH_BUDGET
_rids = _connection.rids
_ports = _delivery.ports_of
_forget = _opening.forget
_open_connection = _opening.open_connection
_resolve = _opening.resolve
_Membership = _writer.Membership
_NOT_JOINED = _writer.NOT_JOINED


# -- the client ------------------------------------------------------------------------------
def _send_message(client: IpcBusClient, kind: int, channel: str, target: str | None,
                  args: tuple[Any, ...]) -> None:
    """A SEND or SEND_TO that ``P.pack_small`` did not take: large buffers through shared
    memory (``_client/shm.py``)."""
    conn = client._connection()
    threshold = client._shm_threshold
    if threshold:  # inline: this runs for every message; flat small arguments skip the arena
        for item in args:
            cls = item.__class__
            if cls is bytes or cls is bytearray:
                if len(item) >= threshold:
                    break
            elif cls is not int and cls is not str and cls is not float and item is not None:
                break
        else:
            threshold = 0
        if threshold and conn.shm.send(client._member, kind, channel, target, args, threshold,
                                       client._shm_limit):
            return
    conn.send(client._member, kind, channel, target, 0, P.pack_args(args))


def _post_and_wait(self: IpcBusClient, kind: int, channel: str, target: str | None,
                   message: Any, ports: list[Any] | None) -> None:
    """A post: a request the hub answers once every receiver has the message (or fails)."""
    body, fds = _post_body(self._connection(), message, ports)
    future = self._start_request(kind, channel, target, resolve_timeout(None), body, fds)
    try:
        self._wait(future)
    except IpcBusRequestError as exc:
        if isinstance(exc, IpcBusRequestTimeoutError):
            raise
        err = exc.response.err if exc.response is not None else str(exc)
        raise IpcBusRequestError(f"post_message on {channel!r} failed: {err}",
                                 exc.response) from None


class IpcBusClient(_reconnecting.Lifecycle, _groups.GroupedEmitter):
    """A peer on the bus: an EventEmitter of channels whose events come from other processes.

    Every method may be called from any thread. Listeners are called as
    ``listener(event, *args)`` on the connection's dispatch thread. Adding or removing
    listeners never needs the bus: before ``connect()``, or while a client connected with
    ``reconnect`` is down, the registry changes here and is subscribed on (re)joining.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conn: _Connection | None = None
        self._peer: IpcBusPeer | None = None
        self._peer_id: str | None = None
        self._spy_handler: Callable[[P.Frame], None] | None = None
        self._member = _NOT_JOINED  # who our frames say we are; see _Membership
        self._spy_pattern: str | None = None
        self._state_lock = threading.Lock()  # connect/close; never taken by the dispatch thread
        self._shm_threshold, self._shm_limit = 0, _shm.SHM_LIMIT  # see _client/shm.py

    @classmethod
    def create(cls) -> IpcBusClient:
        return cls()

    # -- connection ------------------------------------------------------------------------
    @property
    def peer(self) -> IpcBusPeer:
        if self._peer is None:
            raise IpcBusConnectionError("the client is not connected")
        return self._peer

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and conn.pid == os.getpid()

    def connect(self, address: Any = None, *, path: str | None = None, port: int | None = None,
                host: str | None = None, peer_name: str | None = None,
                timeout: float | None = None, socket_buffer: int | None = None,
                authkey: bytes | None = None, reconnect: bool | Reconnect = False,
                shm_threshold: int = _shm.SHM_THRESHOLD, shm_limit: int = _shm.SHM_LIMIT
                ) -> Self:
        """Join the bus at ``address``; return ``self`` (``with ... as client:`` closes it).

        - ``address``: a ``str`` Unix socket path; an ``int`` TCP port on 127.0.0.1; a
          ``(host, port)`` tuple (TCP); a ``Connection`` from ``IpcBusBridge.open_pipe()``
          (this client then owns it); or None (default): the bridge of this process if there
          is one, else the pipe this process joined with, else ``$IPCBUS_ADDRESS`` (a path,
          ``PORT`` or ``HOST:PORT``), else a clear error.
        - ``path``, ``port``, ``host`` (default None): the same, as keywords (``host``
          defaults to 127.0.0.1).
        - ``peer_name`` (str; default None = ``"<process name>-<pid>"``): the name other
          peers see in ``event.sender.name`` (free text, at most 4096 bytes of UTF-8; ids are
          unique, names need not be).
        - ``timeout`` (float, seconds; default None = 2.0 s, a negative value waits forever):
          how long connecting, the TCP authentication and the handshake may take. Given
          (not None) with a Unix path, ``connect()`` also waits that long for a broker to
          appear there (a path that does not exist yet; a dead broker's file fails at once).
        - ``socket_buffer`` (int, bytes; default None = 64 KiB; 0 writes every message on its
          own): the write-coalescing buffer of a new connection. Sends that follow each other
          within 50 µs are written together; a lone send is written at once, and requests,
          answers and control frames are never held back.
        - ``authkey`` (bytes; default None = ``$IPCBUS_AUTHKEY`` if set, else
          ``multiprocessing.current_process().authkey``): the key a TCP broker expects.
        - ``reconnect`` (bool or :class:`~ipcbus.Reconnect`; default False: the client is
          closed when its bus goes): survive the loss of the bus. Pending requests fail and
          calls raise IpcBusConnectionError while it is down; a retry thread joins again
          with the same peer id, listeners, groups, spy and services (``on_disconnected``,
          ``on_reconnected``, ``wait_connected()``). True = ``Reconnect(initial=0.05,
          maximum=2.0, give_up=None)``: seconds before the first attempt, doubling up to
          ``maximum``; closed for good ``give_up`` seconds after the loss (None: never).
        - ``shm_threshold`` (int, bytes; default 1 MiB; 0: off, on a first client both
          ways): larger buffers of ``send``/``send_to`` go through shared memory.
        - ``shm_limit`` (int, bytes; default 256 MiB): that arena's size (per connection;
          a new connection after a reconnection makes its own).

        Raises ``ValueError``/``TypeError`` for bad arguments (e.g. a path over 107 bytes), and
        :class:`~ipcbus.IpcBusConnectionError` when there is no bus at the address, the key is
        wrong, the handshake times out or the client is already connected.
        """
        policy = _reconnect.policy_of(reconnect)
        joined = policy is None and _schemes.join(self, address, path, port, dict(  # e.g. "ecipc:...": Node's bus
            host=host, peer_name=peer_name, timeout=timeout, socket_buffer=socket_buffer,
            authkey=authkey))
        if joined:
            return joined  # type: ignore[no-any-return]
        _check_connect_args(peer_name, socket_buffer, authkey)
        _shm.check_shm_args(shm_threshold, shm_limit)
        wait = resolve_timeout(timeout)
        with self._state_lock:
            if self._conn is not None and not self._conn.closed:
                raise IpcBusConnectionError("this client is already connected")
            limit = wait if wait is not None else 3600.0
            key, make_socket, tcp, ptype = _resolve(
                address, path, port, host, limit,
                bytes(authkey) if authkey is not None else None)
            opening: dict[str, Any] = dict(tcp=tcp, ptype=ptype, timeout=limit, socket_buffer=socket_buffer,
                           authkey=bytes(authkey) if authkey is not None else None)
            link = _reconnecting.make_link(self, policy, key, make_socket, wait, opening)
            if timeout is not None and isinstance(key, str):  # a path: wait for its broker
                conn = _opening.reopen_connection(key, _opening.waiting_socket(
                    key, time.monotonic() + limit), **opening)
            else:
                conn = _open_connection(key, make_socket, **opening)
            _joining.join(self, conn, _new_peer(peer_name, conn.ptype), wait)
            self._link = link
            self._shm_threshold, self._shm_limit = _shm.settings(conn, shm_threshold, shm_limit,
                                                                 self._member)
        return self

    def _set_peer(self, info: list[Any]) -> None:
        self._peer_id = info[0]
        self._peer = IpcBusPeer(info[0], info[1], IpcBusProcess(info[2], info[3]))

    def close(self, timeout: float | None = None) -> None:
        """Leave the bus: what was sent is delivered, pending requests fail. Idempotent."""
        wait = resolve_timeout(timeout)
        interrupted: BaseException | None = None
        if (link := self._link) is not None:
            link.close()  # before anything: a loss now is no reconnection
        with self._state_lock:
            conn = self._conn
            if conn is None:
                return
            self._conn = None
            while True:  # every step may run again: an interrupt is raised once all are done
                try:
                    ended = _joining.leave_connection(self, conn, wait)
                    break
                except Exception:
                    raise
                except BaseException as exc:  # Ctrl-C: the client is closed all the same
                    interrupted = interrupted or exc
        if ended:
            self._connection_ended(conn)
        if interrupted is not None:
            raise interrupted

    def _drop_from(self, clients: dict[str, Any]) -> None:
        """Remove this client from a connection's ``clients`` (under its lock)."""
        if clients.get(self._peer_id or "") is self:
            del clients[self._peer_id or ""]

    # -- emitter hooks: keep the bus's subscriptions in step with our listeners --------------
    def _check_key(self, key: object) -> str:
        return P.check_channel(key)

    def _first_listener(self, key: str) -> None:
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                self._write_subscription(conn, Kind.SUBSCRIBE, key, 1)
            except IpcBusError as exc:
                log.debug("subscribe to %r not sent: %s", key, exc)

    def _last_listener(self, key: str) -> None:
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                self._write_subscription(conn, Kind.UNSUBSCRIBE, key, 0)
            except IpcBusError as exc:
                log.debug("unsubscribe from %r not sent: %s", key, exc)

    def _write_subscription(self, conn: _Connection, kind: int, channel: str,
                            count: int) -> None:
        """A SUBSCRIBE or UNSUBSCRIBE that goes out once the listener registry has changed,
        even if the caller is interrupted while it waits for the send lock (the interrupt
        is raised after): the bus's subscriptions stay in step with our listeners."""
        member = self._member
        header = P.encode_header(kind, channel, member.info, None)
        conn.send_surely(member, _PREFIX_PACK(len(header), 0, count) + header)

    # -- sending -----------------------------------------------------------------------------
    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise IpcBusConnectionError("the client is not connected")
        if conn.closed:  # ended (or inherited through fork): the reason, raised
            self._down(conn)
        return conn

    def _pack_answer(self, resolved: bool, value: Any) -> Any:
        """The body of an answer (for :class:`IpcBusRequest`); raises if it cannot be sent."""
        return _shm_requests.request_body(self, (resolved, value))  # (large: through shm)

    def _send_answer(self, channel: str, requester: str, rid: int, body: Any,
                     member: _Membership) -> None:
        """Send an answer (for :class:`IpcBusRequest`), in the name of ``member``."""
        _shm_requests.send_answer(self._connection(), member, channel, requester, rid, body)

    def _send_frame(self, kind: int, channel: str, target: str | None, rid: int,
                    body: P.Body) -> None:
        self._connection().send(self._member, kind, channel, target, rid, body)

    def send(self, channel: str, *args: Any) -> None:
        """Broadcast ``args`` to every listener of ``channel`` on the bus (ours included)."""
        if channel not in _valid_channels:
            _remember_channel(channel)
        conn = self._connection()  # small flat arguments: packed in one pass, inline
        if (body := P.pack_small(args)) is None or len(body) >= self._shm_threshold > 0:
            return _send_message(self, _SEND, channel, None, args)  # large, or not flat
        conn.send(self._member, _SEND, channel, None, 0, body)

    def send_to(self, target: IpcBusPeer | str, channel: str, *args: Any) -> None:
        """Send ``args`` to the listeners of ``channel`` of one peer only."""
        target_id = _target_id(target)
        if channel not in _valid_channels:
            _remember_channel(channel)
        if (body := P.pack_small(args)) is None or len(body) >= self._shm_threshold > 0:
            return _send_message(self, _SEND_TO, channel, target_id, args)  # as in send()
        self._connection().send(self._member, _SEND_TO, channel, target_id, 0, body)

    def request(self, channel: str, timeout: float | None, *args: Any) -> IpcBusRequestResponse:
        """Ask every listener of ``channel``; return the first answer, or raise
        :class:`IpcBusRequestError` (rejected, no listener, timed out)."""
        if channel not in _valid_channels:
            _remember_channel(channel, _HUB_QUERIES)
        timeout = resolve_timeout(timeout)
        body = _shm_requests.request_body(self, args)
        return self._connection().requests.request(  # type: ignore[no-any-return]
            self, _REQUEST, channel, None, timeout, body)

    def request_to(self, target: IpcBusPeer | str, channel: str, timeout: float | None,
                   *args: Any) -> IpcBusRequestResponse:
        """Like :meth:`request`, to the listeners of one peer only."""
        target_id = _target_id(target)
        if channel not in _valid_channels:
            _remember_channel(channel, _HUB_QUERIES)
        timeout = resolve_timeout(timeout)
        body = _shm_requests.request_body(self, args)
        return self._connection().requests.request(  # type: ignore[no-any-return]
            self, _REQUEST, channel, target_id, timeout, body)

    def _wait(self, future: concurrent.futures.Future[Any]) -> IpcBusRequestResponse:
        conn = self._conn
        result = conn.requests.wait(future) if conn is not None else future.result()
        return result  # type: ignore[no-any-return]

    def request_async(self, channel: str, timeout: float | None, *args: Any
                      ) -> concurrent.futures.Future[IpcBusRequestResponse]:
        """Start a request; the Future gets the response or the IpcBusRequestError."""
        if channel not in _valid_channels:
            _remember_channel(channel, _HUB_QUERIES)
        return self._start_request(Kind.REQUEST, channel, None, resolve_timeout(timeout),
                                   _shm_requests.request_body(self, args))

    def request_all(self, channel: str, timeout: float | None, *args: Any
                    ) -> list[IpcBusRequestResponse]:
        """Ask every listener of ``channel``; every answer (resolved or rejected), once all
        answered or left, or at the timeout what came (``[]``: nobody listens)."""
        _remember_channel(channel)
        return _gathering.request_all(self, self._connection(), channel,
                                      resolve_timeout(timeout), args)

    def _start_request(self, kind: int, channel: str, target: str | None,
                       timeout: float | None, body: P.Body, fds: list[int] | None = None
                       ) -> concurrent.futures.Future[Any]:
        return self._connection().requests.start(self, kind, channel, target, timeout, body,
                                                 fds)

    # -- handles ---------------------------------------------------------------------------------
    def post_message(self, channel: str, message: Any, ports: list[Any] | None = None) -> None:
        """Broadcast ``message`` with live handles to every listener of ``channel``.

        ``ports`` holds ``multiprocessing.connection.Connection``, ``socket.socket`` or ``int``
        descriptors. Each receiving client finds its own duplicates, of the same kinds, in
        ``event.ports``, and owns them (close them). Your handles stay yours: close them when
        you no longer need them. Returns once the bus has routed the message; raises
        :class:`IpcBusConnectionError` on a TCP connection (with ports) and
        :class:`IpcBusRequestError` if no one listens on ``channel`` or a receiver cannot take
        descriptors; in every case nothing is sent and your handles stay open and yours.
        """
        if channel not in _valid_channels:
            _remember_channel(channel)
        self._post(Kind.SEND, channel, None, message, ports)

    def post_message_to(self, target: IpcBusPeer | str, channel: str, message: Any,
                        ports: list[Any] | None = None) -> None:
        """Like :meth:`post_message`, to one peer's listeners (an unknown peer, or one with no
        listener on ``channel``, raises :class:`IpcBusRequestError`)."""
        target_id = _target_id(target)
        if channel not in _valid_channels:
            _remember_channel(channel)
        self._post(Kind.SEND_TO, channel, target_id, message, ports)

    _post = _post_and_wait  # post_message(_to): the hub's acknowledgement, waited for

    # -- for IpcBusService: the library's own protocols on reserved channels ------------------
    # The public calls refuse channels under /ipcbus/ (see _remember_channel); these do not.
    def _send_reserved(self, channel: str, *args: Any) -> None:
        """:meth:`send` on any valid channel, reserved ones included."""
        P.check_channel(channel)
        self._send_frame(Kind.SEND, channel, None, 0, P.pack_args(args))

    def _send_to_reserved(self, target: IpcBusPeer | str, channel: str, *args: Any) -> None:
        """:meth:`send_to` on any valid channel, reserved ones included."""
        target_id = _target_id(target)
        P.check_channel(channel)
        self._send_frame(Kind.SEND_TO, channel, target_id, 0, P.pack_args(args))

    def _request_reserved(self, channel: str, timeout: float | None, *args: Any
                          ) -> IpcBusRequestResponse:
        """:meth:`request` on any valid channel, reserved ones included."""
        P.check_channel(channel)
        return self._connection().requests.request(  # type: ignore[no-any-return]
            self, _REQUEST, channel, None, resolve_timeout(timeout), P.pack_args(args))

    def _request_async_reserved(self, channel: str, timeout: float | None, *args: Any
                                ) -> concurrent.futures.Future[IpcBusRequestResponse]:
        """:meth:`request_async` on any valid channel, reserved ones included."""
        P.check_channel(channel)
        return self._start_request(Kind.REQUEST, channel, None, resolve_timeout(timeout),
                                   P.pack_args(args))

    def _register_service(self, name: str, timeout: float | None,
                          group: str | None = None) -> Any:
        """Claim ``name`` on the bus (``group``: join the pool of hosts that share it; the
        answer is the number of members); IpcBusRequestError if it cannot be had."""
        body = b"" if group is None else P.pack_payload(P.check_group(group))
        return self._wait(self._start_request(Kind.SERVICE_ADD, P.check_channel(name), None,
                                              resolve_timeout(timeout), body)).payload

    def _start_spy(self, pattern: str, handler: Callable[[P.Frame], None],
                   timeout: float | None) -> None:
        """Ask the router for copies of the traffic on channels matching ``pattern``."""
        self._spy_handler, self._spy_pattern = handler, pattern
        self._wait(self._start_request(Kind.SPY_ADD, pattern, None, resolve_timeout(timeout),
                                       b""))

    def _unregister_service(self, name: str) -> None:
        self._send_frame(Kind.SERVICE_REMOVE, P.check_channel(name), None, 0, b"")

    # -- readiness: requests the hub answers itself (_client/readiness.py) --------------------
    sync = _readiness.sync
    wait_for_listeners = _readiness.wait_for_listeners

    def create_direct_channel(self) -> str:
        """A channel name that only this client listens to, for private replies."""
        return f"{DIRECT_PREFIX}{self.peer.id}/{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._peer is None:
            return "<IpcBusClient (not connected)>"
        return f"<IpcBusClient {self._peer.name!r} id={self._peer.id}>"


_valid_channels: set[str] = set()  # valid, and open to every call of the public API
RESERVED_PREFIX = "/ipcbus/"  # the bus's own channels: the hub's and the library's protocols
DIRECT_PREFIX = "/ipcbus/direct/"  # made by create_direct_channel(): anyone's to use
_HUB_QUERIES = frozenset({"/ipcbus/queryState", "/ipcbus/serviceAvailable"})  # requests only
_NO_EXCEPTIONS: frozenset[str] = frozenset()


def _remember_channel(channel: object, allowed: frozenset[str] = _NO_EXCEPTIONS) -> None:
    """Validate a channel name given to the public API once; later calls on it skip the
    check. Reserved channels raise ValueError, except direct channels and ``allowed``
    (answered by the hub: not remembered, since a send there is refused)."""
    P.check_channel(channel)
    assert isinstance(channel, str)
    if channel.startswith(RESERVED_PREFIX) and not channel.startswith(DIRECT_PREFIX):
        if channel in allowed:
            return
        raise ValueError(f"channel {channel!r} is reserved: channels under {RESERVED_PREFIX}"
                         f" belong to the bus (listening there is allowed; requests on"
                         f" {', '.join(sorted(_HUB_QUERIES))} too)")
    if len(_valid_channels) >= 4096:
        _valid_channels.clear()
    _valid_channels.add(channel)


_target_id = target_id  # (its home is _types.py)


def _process_name() -> str:
    return multiprocessing.current_process().name


def _check_connect_args(peer_name: object, socket_buffer: object, authkey: object) -> None:
    """TypeError/ValueError for arguments of ``connect()`` the hub or the socket refuse."""
    if peer_name is not None and not isinstance(peer_name, str):
        raise TypeError("peer_name must be a str")
    if peer_name is not None and (problem := P.check_peer_name(peer_name)) is not None:
        raise ValueError(problem)  # the hub would refuse it (and drop the connection)
    if socket_buffer is not None and (isinstance(socket_buffer, bool)
                                      or not isinstance(socket_buffer, int)
                                      or socket_buffer < 0):
        raise ValueError("socket_buffer must be an int >= 0 (bytes; 0 = no coalescing)")
    if authkey is not None and not isinstance(authkey, (bytes, bytearray)):
        raise TypeError("authkey must be bytes")


def _new_peer(peer_name: str | None, ptype: str) -> list[Any]:
    """The peer tuple a client declares in its PEER_ADD: [id, name, type, pid]."""
    name = peer_name if peer_name is not None else f"{_process_name()}-{os.getpid()}"
    if P.check_peer_name(name) is not None:  # a process name the hub would refuse
        name = f"process-{os.getpid()}"
    return [f"{os.getpid()}.{uuid.uuid4().hex[:12]}", name, ptype, os.getpid()]


def _post_body(conn: _Connection, message: Any, ports: list[Any] | None
               ) -> tuple[bytes, list[int]]:
    """The body and descriptors of a ``post_message``; raises, sending nothing, for ports
    the bus cannot carry."""
    if ports is None:
        ports = []  # no handles: still routed and acknowledged (no listener raises)
    if not isinstance(ports, (list, tuple)):
        raise TypeError(f"ports must be a list, not {type(ports).__name__}")
    limit = min(int(conn.welcome.get("max_fds", P.DEFAULT_MAX_FDS)), P.MAX_FDS)
    if len(ports) > limit:
        raise ValueError(f"{len(ports)} ports in one message; the bus takes at most {limit}")
    described = [T.port_descriptor(port) for port in ports]
    body = P.pack_payload([[message], [kind_ for _, kind_ in described]] if ports
                          else [message])
    if ports and not conn.can_pass_fds:
        raise IpcBusConnectionError("this bus connection (TCP) cannot carry descriptors;"
                                    " nothing was sent")
    return body, [fd for fd, _ in described]

