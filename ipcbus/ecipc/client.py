"""An IpcBusClient on an electron-common-ipc bus.

``IpcBusClient.create().connect("ecipc:...")`` turns the client into an :class:`EcipcClient`
(a subclass: ``isinstance(client, IpcBusClient)`` holds, and the public API is the same), which
speaks electron-common-ipc's socket protocol (:mod:`._envelope`, :mod:`._codec`) to a Node
broker. Closing it and connecting elsewhere turns it back into a plain client.

What is where:

* this module: the client (connect, close, subscriptions, sending, requests, what the
  protocol cannot do);
* :mod:`._connection`: the connection the clients of a process share, its two I/O threads
  and the dispatch of listeners (its docstring gives the thread rules);
* :mod:`._requests`: the requests in flight (the library's request table) and how an answer
  settles one;
* :mod:`._services`: the translation of ipcbus's service protocol to Node's.

What the protocol imposes:

* The broker does not send a packet back to the connection it came from: a process delivers
  its own messages to its own listeners (the sender's included), through the same encoding, so
  a listener receives what a remote one would.
* A request has no "no listener" failure and a peer that leaves sends no notice (the protocol
  has neither): requests end with their answer or their timeout.
* Node's broker has no groups, no gathering (every answer of a request), no readiness
  queries and no service pools: ``on(..., group=)``, ``request_all``, ``sync``,
  ``wait_for_listeners`` and ``IpcBusService(..., group=)`` raise NotImplementedError at
  the call, naming that limit, rather than behaving differently from an ipcbus bus.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import uuid
from typing import Any, Callable, NoReturn

from typing_extensions import Self

from .. import _protocol as P
from .. import _schemes
from .._pending import settle
from .._timeouts import DEFAULT_TIMEOUT, resolve_timeout
from .._types import IpcBusEvent, IpcBusPeer, IpcBusProcess, IpcBusRequestResponse, target_id
from .._client.reconnect import Reconnect
from ..client import IpcBusClient
from ..errors import IpcBusConnectionError, IpcBusError, IpcBusRequestError
from . import _codec as C
from . import _envelope as E
from . import _services as S
from . import parse_address
from ._connection import Connection, connections, open_connection
from ._requests import Pending

log = logging.getLogger("ipcbus")

__all__ = ["EcipcClient"]

_UNSUPPORTED_CHANNELS = ("/ipcbus/queryState", "/ipcbus/serviceAvailable")

# -- the client ---------------------------------------------------------------------------------
class EcipcClient(IpcBusClient):
    """An :class:`~ipcbus.IpcBusClient` connected to an electron-common-ipc (Node) bus.

    Made by ``IpcBusClient.connect("ecipc:...")``; see :mod:`ipcbus.ecipc` for what crosses.
    """

    _econn: Connection | None
    _peer_json: dict[str, Any]
    _headers_ec: dict[str, tuple[str, bytes]]  # broadcast headers by channel, for reuse

    @classmethod
    def adopt(cls, client: IpcBusClient) -> EcipcClient:
        """Turn a plain, unconnected client into one of this class (same object)."""
        if type(client) is not cls:
            client.__class__ = cls
            client._econn = None  # type: ignore[attr-defined]
        return client  # type: ignore[return-value]

    def connect(self, address: Any = None, *, path: str | None = None, port: int | None = None,
                host: str | None = None, peer_name: str | None = None,
                timeout: float | None = None, socket_buffer: int | None = None,
                authkey: bytes | None = None, reconnect: bool | Reconnect = False,
                shm_threshold: int = 1 << 20, shm_limit: int = 256 << 20) -> Self:
        """Join the electron-common-ipc bus at ``"ecipc:PATH"``, ``"ecipc:PORT"`` or
        ``"ecipc:HOST:PORT"``; any other address connects as a plain ipcbus client.

        ``timeout`` bounds the socket connection (there is no handshake answer to wait for);
        ``socket_buffer``, ``shm_threshold`` and ``shm_limit`` are accepted and ignored
        (large payloads go inline to Node); ``authkey`` raises ``ValueError`` (the
        protocol has no authentication); ``reconnect`` (for a plain address only) raises
        ``ValueError``: reconnection is not available on a Node bus."""
        ecipc = parse_address(address, path=path, port=port)
        if ecipc is None:
            with self._state_lock:
                if self._econn is not None and not self._econn.closed:
                    raise IpcBusConnectionError("this client is already connected")
                self.__class__ = IpcBusClient  # type: ignore[assignment]
            return IpcBusClient.connect(self, address, path=path, port=port, host=host,
                                        peer_name=peer_name, timeout=timeout,
                                        socket_buffer=socket_buffer, authkey=authkey,
                                        reconnect=reconnect, shm_threshold=shm_threshold,
                                        shm_limit=shm_limit)
        if reconnect:
            raise ValueError("reconnect is not available on an electron-common-ipc (ecipc:) bus")
        if peer_name is not None and not isinstance(peer_name, str):
            raise TypeError("peer_name must be a str")
        if authkey is not None:
            raise ValueError("electron-common-ipc has no authentication: authkey cannot be"
                             " used with an ecipc: address")
        wait = resolve_timeout(timeout)
        with self._state_lock:
            if self._econn is not None and not self._econn.closed:
                raise IpcBusConnectionError("this client is already connected")
            name = peer_name if peer_name is not None else f"python-{os.getpid()}"
            peer = IpcBusPeer(f"{os.getpid()}.{uuid.uuid4().hex[:12]}", name,
                              IpcBusProcess("socket", os.getpid()))
            self._peer_json = E.peer_json(peer)
            self._headers_ec = {}
            C.encode(self._peer_json)  # a name that cannot cross fails here, before connecting
            conn = open_connection(ecipc, wait if wait is not None else 3600.0)
            self._peer_id = peer.id
            try:
                with self._lock:  # listeners added before connect() are subscribed now
                    conn.write(E.command("HAN", self._peer_json))
                    for channel in self._listeners:
                        conn.write(E.command("LICA", self._peer_json,
                                             S.wire_channel(channel)[0]))
                    with conn.lock:
                        conn.check_usable()
                        conn.clients[peer.id] = self
                        conn.client_list = tuple(conn.clients.values())
            except BaseException:
                self._peer_id = None
                raise
            self._econn = self._conn = conn  # type: ignore[assignment]
            self._peer = peer
            self._closed_fired = False
        return self

    def close(self, timeout: float | None = None) -> None:
        """Leave the bus (its subscriptions and its peer are removed); pending requests fail.
        The last client of the process closes the connection. Idempotent."""
        wait = resolve_timeout(timeout)
        with self._state_lock:
            conn = self._econn
            if conn is None:
                return
            self._econn = None
            self._conn = None
            if conn.pid != os.getpid() or conn.forked:
                return
            with conn.lock:
                conn.clients.pop(self._peer_id or "", None)
                conn.client_list = tuple(conn.clients.values())
                last = not conn.clients
            for p in conn.requests.take_of(self):
                settle(p.future, exc=IpcBusConnectionError(
                    f"request on {p.channel!r} failed: the client was closed"))
            if not conn.closed:
                try:
                    conn.write(E.command("LIR", self._peer_json, ""))
                    conn.write(E.command("SHT", self._peer_json))
                except IpcBusError:
                    pass
            if last:
                connections.discard(conn.key, conn)
                conn.close(wait)
        self._connection_ended(conn)  # type: ignore[arg-type]

    # -- subscriptions ------------------------------------------------------------------------
    def _first_listener(self, key: str) -> None:
        self._subscription("LICA", key)

    def _last_listener(self, key: str) -> None:
        self._subscription("LICR", key)

    def _subscription(self, kind: str, channel: str) -> None:
        conn = self._econn
        if conn is not None and not conn.closed:
            try:
                conn.write(E.command(kind, self._peer_json, S.wire_channel(channel)[0]))
            except (IpcBusError, ValueError) as exc:
                log.debug("%s of %r not sent: %s", kind, channel, exc)

    # -- sending ------------------------------------------------------------------------------
    def _connection(self) -> Connection:  # type: ignore[override]
        conn = self._econn
        if conn is None:
            raise IpcBusConnectionError("the client is not connected")
        conn.check_usable()
        return conn

    def _wait(self, future: concurrent.futures.Future[Any]) -> IpcBusRequestResponse:
        conn = self._econn
        if conn is not None:
            return conn.wait(future)  # type: ignore[no-any-return]
        return future.result()  # type: ignore[no-any-return]

    def _envelope(self, channel: str, args: tuple[Any, ...]) -> tuple[str, bytes]:
        """(wire channel, encoded args): the service channels translated (see _services)."""
        P.check_channel(channel)
        if channel.startswith(S.NODE_NAMESPACE):
            raise ValueError(f"{S.NODE_NAMESPACE}... channels belong to electron-common-ipc"
                             " itself (for services, use IpcBusService / IpcBusServiceProxy)")
        wire, role = S.wire_channel(channel)
        if role == "call":
            return wire, C.encode_array(S.call_to_wire(args))
        if role == "event":
            return wire, C.encode_array(S.notice_to_wire(args))
        return wire, C.encode_array(args)

    def _post(self, channel: str, target: IpcBusPeer | str | None,  # type: ignore[override]
              args: tuple[Any, ...], request: Pending | None = None,
              rid: str | None = None) -> None:
        conn = self._connection()
        to = None if target is None else target_id(target)
        cached = self._headers_ec.get(channel) if rid is None and to is None else None
        if cached is not None:  # a broadcast on a channel this client has sent on before
            wire, head = cached
            body = C.encode_array(args)
        else:
            wire, body = self._envelope(channel, args)
        header: dict[str, Any] = {"kind": "MES", "channel": wire, "peer": self._peer_json,
                                  "isRawData": True}
        target_raw = None
        if to is not None:
            target_raw = E.target_json(to, conn.peers.get(to))
            header["target"] = target_raw
        request_raw = None
        if rid is not None:
            request_raw = {"channel": wire, "id": rid}
            header["request"] = request_raw
        if to is None or to not in conn.clients:
            if cached is None:
                head = E.message_header("MES", wire, self._peer_json, target=target_raw,
                                        request=request_raw)
                if rid is None and to is None and wire == channel:
                    if len(self._headers_ec) >= 1024:
                        self._headers_ec.clear()
                    self._headers_ec[channel] = (wire, head)
            conn.write(C.array_of([head, body]))
        if any(channel in c._listeners for c in conn.client_list):
            conn.put(E.Incoming("MES", header, memoryview(body), True))

    def send(self, channel: str, *args: Any) -> None:
        """Broadcast ``args`` to every listener of ``channel`` on the bus (ours included)."""
        self._post(channel, None, args)

    def send_to(self, target: IpcBusPeer | str, channel: str, *args: Any) -> None:
        """Send ``args`` to the listeners of ``channel`` of one peer only (an unknown peer:
        nothing happens, as on Node's bus)."""
        self._post(channel, target, args)

    def request(self, channel: str, timeout: float | None, *args: Any) -> IpcBusRequestResponse:
        """Ask every listener of ``channel``; the first answer wins. With no listener, the
        request ends at its timeout (electron-common-ipc has no "no listener" failure)."""
        return self._wait(self._request(channel, None, timeout, args))

    def request_to(self, target: IpcBusPeer | str, channel: str, timeout: float | None,
                   *args: Any) -> IpcBusRequestResponse:
        """Like :meth:`request`, to the listeners of one peer only."""
        target_id(target)
        return self._wait(self._request(channel, target, timeout, args))

    def request_async(self, channel: str, timeout: float | None, *args: Any
                      ) -> concurrent.futures.Future[IpcBusRequestResponse]:
        """Start a request; the Future gets the response or the IpcBusRequestError."""
        return self._request(channel, None, timeout, args)

    # The library's own protocols (services) send on ipcbus's reserved channels through these;
    # on electron-common-ipc's bus nothing is reserved: they are the plain calls.
    def _send_reserved(self, channel: str, *args: Any) -> None:
        self._post(channel, None, args)

    def _send_to_reserved(self, target: IpcBusPeer | str, channel: str, *args: Any) -> None:
        self._post(channel, target, args)

    def _request_reserved(self, channel: str, timeout: float | None, *args: Any
                          ) -> IpcBusRequestResponse:
        return self._wait(self._request(channel, None, timeout, args))

    def _request_async_reserved(self, channel: str, timeout: float | None, *args: Any
                                ) -> concurrent.futures.Future[IpcBusRequestResponse]:
        return self._request(channel, None, timeout, args)

    def _request(self, channel: str, target: IpcBusPeer | str | None, timeout: float | None,
                 args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        wait = resolve_timeout(timeout)
        P.check_channel(channel)
        if channel in _UNSUPPORTED_CHANNELS:
            raise IpcBusRequestError(
                f"{channel} is not available on an electron-common-ipc bus",
                IpcBusRequestResponse(IpcBusEvent(channel, None), err="not supported"))
        conn = self._connection()
        pending = Pending(self, channel)
        if channel.startswith(P.SERVICE_CALL_PREFIX) and args and args[0] == S.STATUS_CALL:
            pending.status = True
            pending.probe = S.is_status_probe(args)
            if pending.probe and wait is None:
                wait = DEFAULT_TIMEOUT  # no host: Node's bus would never tell
        rid = uuid.uuid4().hex
        conn.requests.add(rid, pending, wait)
        conn.need_reader()
        try:
            self._post(channel, target, args, pending, rid)
        except BaseException:
            conn.requests.take(rid)  # never sent: nobody else settles it, and the caller
            raise                    # gets the exception
        return pending.future

    def _notify(self, channel: str, args: list[Any], sender: IpcBusPeer | None) -> None:
        """Run this client's listeners of ``channel`` (a notice made up from an answer)."""
        event = IpcBusEvent(channel, sender)
        for listener in self._take(channel):
            try:
                listener(event, *args)
            except Exception:
                log.exception("ipcbus ecipc: listener %r of %r raised", listener, channel)

    # -- what the protocol cannot do ----------------------------------------------------------
    def post_message(self, channel: str, message: Any, ports: list[Any] | None = None) -> None:
        """Broadcast ``message``; ``ports`` cannot cross to electron-common-ipc (raises)."""
        self._no_ports(ports)
        self.send(channel, message)

    def post_message_to(self, target: IpcBusPeer | str, channel: str, message: Any,
                        ports: list[Any] | None = None) -> None:
        """Like :meth:`post_message`, to one peer."""
        self._no_ports(ports)
        self.send_to(target, channel, message)

    @staticmethod
    def _no_ports(ports: list[Any] | None) -> None:
        if ports:
            raise IpcBusConnectionError("an electron-common-ipc bus cannot carry pipes, sockets"
                                        " or descriptors; nothing was sent")

    def request_all(self, channel: str, timeout: float | None, *args: Any
                    ) -> list[IpcBusRequestResponse]:
        _unsupported("request_all (every answer of a request)")

    def sync(self, timeout: float | None = None) -> None:
        _unsupported("sync()")

    def wait_for_listeners(self, channel: str, count: int = 1,
                           timeout: float | None = None) -> int:
        _unsupported("wait_for_listeners()")

    def _group_key(self, channel: str, group: str) -> tuple[str, str]:
        _unsupported(f"groups (group={group!r})")

    def _on_reserved_group(self, channel: str, listener: Any, group: str, on: bool) -> None:
        _unsupported("a service hosted by a group")

    def _register_service(self, name: str, timeout: float | None,
                          group: str | None = None) -> None:
        """No registry on Node's bus: a name is not claimed (two hosts would both answer),
        and no pool of hosts (``group``) can share one."""
        if group is not None:
            _unsupported("a service hosted by a group")
        P.check_channel(name)
        self._connection()

    def _unregister_service(self, name: str) -> None:
        """Nothing to release on Node's bus, and no hub to tell the proxies: the host sends
        the "stop" notice itself (an ipcbus hub sends it once the name is released)."""
        self._send_reserved(P.service_event_channel(name), "stop",
                            f"service {name!r} was stopped by its host")

    def _start_spy(self, pattern: str, handler: Callable[[Any], None],
                   timeout: float | None) -> None:
        raise IpcBusConnectionError("spying is not available on an electron-common-ipc bus")

    def create_direct_channel(self) -> str:
        """A channel only this client listens to (named as electron-common-ipc names them)."""
        return f"_target_proc_{C.encode_json(self._peer_json)}_target_{uuid.uuid4().hex[:10]}"

    def __repr__(self) -> str:
        if self._peer is None:
            return "<IpcBusClient ecipc (not connected)>"
        return f"<IpcBusClient ecipc {self._peer.name!r} id={self._peer.id}>"


def _unsupported(what: str) -> NoReturn:
    raise NotImplementedError(f"{what} is not available on an electron-common-ipc bus: Node's"
                              " broker and protocol have no such thing")


def _join(client: IpcBusClient, address: Any, path: str | None, port: int | None,
          options: dict[str, Any]) -> IpcBusClient | None:
    """``IpcBusClient.connect()`` of an ``"ecipc:..."`` address (see ``ipcbus._schemes``)."""
    if parse_address(address, path=path, port=port) is None:
        return None
    return EcipcClient.adopt(client).connect(address, path=path, port=port, **options)


_schemes.register(_join)

