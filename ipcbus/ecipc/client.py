"""An IpcBusClient on an electron-common-ipc bus: the connection its clients share.

``IpcBusClient.create().connect("ecipc:...")`` turns the client into an :class:`EcipcClient`
(a subclass: ``isinstance(client, IpcBusClient)`` holds, and the public API is the same), which
speaks electron-common-ipc's socket protocol (:mod:`._envelope`, :mod:`._codec`) to a Node
broker. Closing it and connecting elsewhere turns it back into a plain client.

Threads and ownership (the rules of :mod:`ipcbus.client`, simplified):

* One :class:`_Connection` per (process, address), shared by every client of the process that
  connects there, as Node's clients share theirs. Two *I/O threads* take turns on it: the one
  holding the *read role* reads packets; answers complete their request's future right there;
  messages are queued in arrival order, and the thread that read them gives the read role up
  and runs their listeners itself (holding the dispatch lock), so a message needs no hand-off
  between threads. The other thread takes the role when a request is pending (so a listener
  that blocks never stops the answers other threads wait for), when work is queued, or after
  a second (so a lost connection is noticed behind a stuck listener); it is not woken for
  every message.
* Listeners run one at a time, in arrival order, on an I/O thread, never on a caller's thread.
  A listener that waits (a request, a service call) keeps running queued listeners meanwhile
  (nested dispatch), so it may wait for what a listener of the same process answers.
* Reading stops while more than ``DISPATCH_BUDGET`` (16 MiB) of messages wait for their
  listeners: a stuck listener turns into back-pressure at the broker, not into memory here.
* A caller waiting for its answer looks for it for up to ``SPIN_WAIT`` before it sleeps.
* Any thread may send: a packet is written whole under the send lock, so the packets of one
  sender leave in the order of its calls.
* The broker does not send a packet back to the connection it came from: a process delivers
  its own messages to its own listeners (the sender's included), through the same encoding, so
  a listener receives what a remote one would.
* A request has no "no listener" failure and a peer that leaves sends no notice (the protocol
  has neither): requests end with their answer or their timeout.
* A connection belongs to the process that made it: after ``fork`` the child's copy is closed
  and using it raises :class:`~ipcbus.IpcBusConnectionError`.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any, Callable

from typing_extensions import Self

from .. import _protocol as P
from .._timeouts import DEFAULT_TIMEOUT, resolve_timeout
from .._types import _Answered
from ..client import (IpcBusClient, IpcBusEvent, IpcBusPeer, IpcBusProcess, IpcBusRequest,
                      IpcBusRequestResponse, SPIN_WAIT, _cpus, _set, _target_id)
from .._timer import Timer as _Timer
from ..errors import (IpcBusConnectionError, IpcBusError, IpcBusProtocolError,
                      IpcBusRequestError, IpcBusRequestTimeoutError)
from . import _codec as C
from . import _envelope as E
from . import _services as S
from . import parse_address
from .. import _schemes

log = logging.getLogger("ipcbus")

__all__ = ["EcipcClient"]

_STOP = object()
_SPIN = SPIN_WAIT if _cpus() > 1 else 0.0  # the core client's setting (IPCBUS_SPIN_US)
DISPATCH_BUDGET = 16 * 1024 * 1024
"""Bytes of received messages waiting for their listeners before the reader stops reading
(the broker then holds them: memory here stays bounded whatever a listener does)."""
_UNSUPPORTED_CHANNELS = ("/ipcbus/queryState", "/ipcbus/serviceAvailable")


class _Pending:
    __slots__ = ("future", "client", "channel", "timeout", "status", "probe")

    def __init__(self, client: EcipcClient, channel: str) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.client = client
        self.channel = channel
        self.timeout: list[Any] | None = None
        self.status = False  # a service status call: the answer gets ipcbus's keys
        self.probe = False  # a proxy's first status call: a started answer is a start notice


class _Connection:
    """One process's connection to one electron-common-ipc broker, shared by its clients."""

    def __init__(self, key: Any, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.pid = os.getpid()
        self.lock = threading.Lock()  # clients, pending, closed
        self.send_lock = threading.Lock()
        self.clients: dict[str, EcipcClient] = {}
        self.client_list: tuple[EcipcClient, ...] = ()
        self.pending: dict[str, _Pending] = {}
        self.peers: dict[str, dict[str, Any]] = {}  # raw peers seen, for send_to targets
        self.closed = False
        self.close_reason = ""
        self.forked = False
        self.timer = _Timer()
        self.splitter = C.PacketSplitter()
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.queued = 0  # bytes of received messages in the queue
        self.budget = threading.Condition()
        self.dispatch_done = threading.Event()
        self.reader_done = threading.Event()
        self.read_role = threading.Lock()
        self.dispatch_lock = threading.Lock()
        self.dispatch_owner: int | None = None
        self.kick = threading.Condition()  # the read role is free, or work was queued
        self.workers = [threading.Thread(target=self._io_loop, daemon=True,
                                         name=f"ipcbus-ecipc-io-{i} {key}") for i in (1, 2)]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    # -- writing ------------------------------------------------------------------------------
    def check_usable(self) -> None:
        if self.forked:
            raise IpcBusConnectionError(
                f"this client was connected in process {self.pid} and inherited through fork;"
                " connect a new client in this process")
        if self.closed:
            raise IpcBusConnectionError(f"the bus connection has closed: {self.close_reason}")

    def write(self, packet: bytes) -> None:
        self.check_usable()
        try:
            with self.send_lock:
                self.sock.sendall(packet)
        except OSError as exc:
            self.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None

    # -- reading and dispatching (the two I/O threads) ----------------------------------------
    def _io_loop(self) -> None:
        """Take turns: whoever holds the read role reads; a thread that has read messages
        gives the role up and runs their listeners itself (no hand-off). The other thread
        sleeps on ``kick`` and takes the free role when someone may need it read: a request
        is pending (its answer must not wait behind a slow listener), work was queued, or a
        second has passed (a lost connection is noticed even behind a stuck listener).
        Waking it only then keeps a wake-up off the path of every message. Both sides look
        under ``kick``: no wake-up is missed."""
        while not self.reader_done.is_set():
            with self.kick:
                reading = self.read_role.acquire(blocking=False)
                if not reading and self.queue.empty():
                    self.kick.wait(1.0)
                    continue
            if reading:
                try:
                    if not self.reader_done.is_set():
                        self._read_once()
                finally:
                    with self.kick:
                        self.read_role.release()
                        if self.pending:
                            self.kick.notify()
            self._drain()
            if self.queued > DISPATCH_BUDGET:  # a listener is stuck: stop reading for now
                with self.budget:
                    while self.queued > DISPATCH_BUDGET and not self.dispatch_done.is_set():
                        self.budget.wait(0.1)
        self._drain()

    def _wake(self) -> None:
        with self.kick:
            self.kick.notify_all()

    def need_reader(self) -> None:
        """A request was registered: make sure a thread reads (for its answer)."""
        with self.kick:
            if not self.read_role.locked():
                self.kick.notify()

    def _read_once(self) -> None:
        reason = "the broker closed the connection"
        try:
            data = self.sock.recv(256 * 1024)
            if data:
                for packet in self.splitter.feed(data):
                    self._on_packet(packet)
                return
        except IpcBusProtocolError as exc:
            reason = f"protocol error from the broker: {exc}"
            log.warning("ipcbus ecipc: %s", reason)
        except OSError as exc:
            if not self.closed:
                reason = f"connection lost: {exc}"
        except Exception as exc:  # pragma: no cover - a bug: never leave the bus half alive
            log.exception("ipcbus ecipc: reader failed")
            reason = f"reader failed: {exc!r}"
        self._on_lost(reason)

    def _drain(self) -> None:
        """Run what is queued, in order, unless the other thread is at it already."""
        while self.dispatch_lock.acquire(blocking=False):
            self.dispatch_owner = threading.get_ident()
            try:
                while True:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if not self._run_one(item):
                        return
            finally:
                self.dispatch_owner = None
                self.dispatch_lock.release()
            if self.queue.empty() or self.dispatch_done.is_set():
                return  # (an item queued after our last look is run by the next _drain)

    def _on_packet(self, packet: bytes) -> None:
        try:
            incoming = E.parse(packet)
        except IpcBusProtocolError as exc:
            log.warning("ipcbus ecipc: dropped a malformed packet: %s", exc)
            return
        if incoming.kind == "RQR":
            self.on_answer(incoming)
        elif incoming.kind == "MES":
            with self.budget:
                self.queued += len(packet)
            self.queue.put((incoming, len(packet)))
        else:  # queries of Node's state and bridge commands are not for us
            log.debug("ipcbus ecipc: ignored a %r command", incoming.kind)

    def peer_of(self, raw: Any) -> IpcBusPeer | None:
        peer = E.to_peer(raw)
        if peer is not None and peer.id not in self.peers:
            if len(self.peers) >= 4096:
                self.peers.clear()
            self.peers[peer.id] = raw
        return peer

    def on_answer(self, incoming: E.Incoming) -> None:
        """An RQR (from the broker, or from a local listener): complete its request."""
        header = incoming.header
        rid = header.get("channel")
        with self.lock:
            pending = self.pending.pop(rid, None) if isinstance(rid, str) else None
        if pending is None:
            return
        if pending.timeout is not None:
            self.timer.cancel(pending.timeout)
        raw = header.get("peer")
        sender = self.peer_of(raw)
        event = IpcBusEvent(pending.channel, sender)
        request = header.get("request")
        resolved = isinstance(request, dict) and request.get("resolve") is True
        try:
            args = E.decode_args(incoming.args)
        except IpcBusProtocolError as exc:
            _set(pending.future, exc=IpcBusRequestError(
                f"request on {pending.channel!r}: undecodable answer: {exc}",
                IpcBusRequestResponse(event, err=str(exc))))
            return
        value = args[0] if args else None
        if not resolved:
            err = value if isinstance(value, str) else C.encode_json(value) \
                if isinstance(value, (dict, list)) else str(value)
            _set(pending.future, exc=IpcBusRequestError(
                f"request on {pending.channel!r} was rejected: {err}",
                IpcBusRequestResponse(event, err=err)))
            return
        if pending.status:
            host = None if sender is None else {"id": sender.id, "name": sender.name,
                                                "pid": sender.process.pid}
            value = S.status_from_wire(value, host)
            if pending.probe and isinstance(value, dict) and value.get("started"):
                name = pending.channel[len(P.SERVICE_CALL_PREFIX):]
                self.call_soon(lambda: pending.client._notify(
                    P.service_event_channel(name), ["start", value], sender))
        _set(pending.future, result=IpcBusRequestResponse(event, payload=value))

    def _on_lost(self, reason: str) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.close_reason = reason
            pending = list(self.pending.values())
            self.pending.clear()
        self.timer.stop()
        for p in pending:
            _set(p.future, exc=IpcBusConnectionError(
                f"request on {p.channel!r} failed: {self.close_reason}"))
        with _registry_lock:
            if _connections.get(self.key) is self:
                del _connections[self.key]
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
        self.reader_done.set()
        self.queue.put(_STOP)
        self._wake()

    def on_dispatch_thread(self) -> bool:
        return self.dispatch_owner == threading.get_ident()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` where listeners run, after what is queued."""
        self.put(fn)

    def put(self, item: Any) -> None:
        """Queue ``item`` for the listeners' side and wake an idle I/O thread."""
        self.queue.put(item)
        if not self.on_dispatch_thread():
            self._wake()

    def _run_one(self, item: Any) -> bool:
        if item is _STOP:
            self._finish_dispatch()
            return False
        try:
            if isinstance(item, E.Incoming):  # sent by this process
                self._deliver(item)
            elif isinstance(item, tuple):  # (message from the broker, its size)
                with self.budget:
                    self.queued -= item[1]
                    if self.queued <= DISPATCH_BUDGET // 2:
                        self.budget.notify()
                self._deliver(item[0])
            else:
                item()
        except Exception:
            log.exception("ipcbus ecipc: error while dispatching")
        return True

    def wait(self, future: concurrent.futures.Future[Any]) -> Any:
        """``future.result()``; on the dispatch thread, keep dispatching meanwhile. Another
        caller looks for its answer for up to ``SPIN_WAIT`` (yielding the CPU) before it
        sleeps: waking a sleeping thread costs tens of microseconds on a small VM."""
        if _SPIN and not future.done() and not self.on_dispatch_thread():
            until = time.perf_counter() + _SPIN
            while not future.done() and time.perf_counter() < until:
                os.sched_yield()
        if self.on_dispatch_thread():
            while not future.done() and not self.dispatch_done.is_set():
                try:
                    item = self.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if not self._run_one(item):
                    break
        return future.result()

    def _finish_dispatch(self) -> None:
        with self.lock:
            clients = list(self.clients.values())
            self.clients.clear()
            self.client_list = ()
        self.dispatch_done.set()
        for client in clients:
            client._connection_ended(self)  # type: ignore[arg-type]

    def _deliver(self, incoming: E.Incoming) -> None:
        """Run the listeners of one message (ours or the broker's)."""
        header = incoming.header
        wire = header.get("channel")
        if not isinstance(wire, str):
            return
        channel, role = S.local_channel(wire)
        target = header.get("target")
        target_id = target.get("id") if isinstance(target, dict) else None
        clients = [c for c in self.client_list
                   if (target_id is None or c._peer_id == target_id) and channel in c._listeners]
        if not clients:
            return
        raw = header.get("peer")
        sender = self.peer_of(raw)
        try:
            args = E.decode_args(incoming.args)
        except IpcBusProtocolError as exc:
            log.warning("ipcbus ecipc: dropped a message on %r: %s", wire, exc)
            return
        if role == "call":
            args = S.call_from_wire(args)
        elif role == "event":
            host = None if sender is None else {"id": sender.id, "name": sender.name,
                                                "pid": sender.process.pid}
            args = S.notice_from_wire(args, host)
            if not args:
                return
        request = header.get("request")
        answered = _Answered()
        for client in clients:
            ev_request: IpcBusRequest | None = None
            if isinstance(request, dict) and isinstance(request.get("id"), str):
                ev_request = _EcipcRequest(
                    client, request, raw, incoming.local,
                    role == "call" and bool(args) and args[0] == S.STATUS_CALL, answered)
            event = IpcBusEvent(channel, sender, ev_request)
            for listener in client._take(channel):
                try:
                    listener(event, *args)
                except Exception:
                    log.exception("ipcbus ecipc: listener %r of %r raised", listener, channel)

    # -- closing ------------------------------------------------------------------------------
    def close(self, timeout: float | None) -> None:
        """Graceful end: everything written is in the socket (sendall); end our half, let the
        broker read it all and end its half (it does at once), then the reader stops."""
        with self.lock:
            self.closed = True
            self.close_reason = self.close_reason or "the client was closed"
        try:
            with self.send_lock:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if threading.current_thread() not in self.workers and not self.reader_done.wait(timeout):
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.reader_done.wait(1.0)
        if not self.on_dispatch_thread():
            self.dispatch_done.wait(timeout)

    def after_fork_in_child(self) -> None:
        self.forked = True
        self.closed = True
        self.close_reason = "inherited through fork"
        try:
            os.close(self.sock.detach())
        except OSError:
            pass


class _EcipcRequest(IpcBusRequest):
    """``event.request`` of a request on an electron-common-ipc bus: answers as an RQR."""

    __slots__ = ("_request", "_requester_raw", "_local", "_status")

    def __init__(self, client: EcipcClient, request: dict[str, Any], requester: Any,
                 local: bool, status: bool, answered: _Answered) -> None:
        # the base class's "requester" holds the request id: electron-common-ipc keys answers
        # by it alone (the requester itself travels as the answer's target)
        super().__init__(client, request["id"], 0, str(request.get("channel", "")), answered)
        self._request = request
        self._requester_raw = requester
        self._local = local
        self._status = status

    def _answer(self, resolved: bool, value: Any) -> bool:
        client: EcipcClient = self._client  # type: ignore[assignment]
        if self._status and resolved:
            value = S.status_to_wire(value)
        args = C.encode_array([value])  # raises before anything is marked or sent
        with self._answered.lock:
            if self._answered.done:
                return False
            self._answered.done = True
        conn = client._connection()
        answer = {"channel": self._request.get("channel"), "id": self._requester,
                  "resolve": resolved}
        if self._local:
            header = {"kind": "RQR", "channel": self._requester, "peer": client._peer_json,
                      "target": self._requester_raw, "request": answer}
            conn.on_answer(E.Incoming("RQR", header, memoryview(args), True))
        else:
            conn.write(E.message("RQR", self._requester, client._peer_json, args,
                                 target=self._requester_raw, request=answer))
        return True


# -- the registry of connections -----------------------------------------------------------------
_registry_lock = threading.Lock()
_connections: dict[Any, _Connection] = {}


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for conn in list(_connections.values()):
        conn.after_fork_in_child()
    _connections.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_connection(address: str | tuple[str, int], timeout: float) -> _Connection:
    with _registry_lock:
        conn = _connections.get(address)
        if conn is not None and not conn.closed:
            return conn
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.settimeout(None)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            sock.close()
            raise IpcBusConnectionError(
                f"cannot connect to the electron-common-ipc broker at {address!r}: {exc}"
            ) from None
        conn = _Connection(address, sock)
        _connections[address] = conn
        conn.start()
        return conn


# -- the client ---------------------------------------------------------------------------------
class EcipcClient(IpcBusClient):
    """An :class:`~ipcbus.IpcBusClient` connected to an electron-common-ipc (Node) bus.

    Made by ``IpcBusClient.connect("ecipc:...")``; see :mod:`ipcbus.ecipc` for what crosses.
    """

    _econn: _Connection | None
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
                authkey: bytes | None = None) -> Self:
        """Join the electron-common-ipc bus at ``"ecipc:PATH"``, ``"ecipc:PORT"`` or
        ``"ecipc:HOST:PORT"``; any other address connects as a plain ipcbus client.

        ``timeout`` bounds the socket connection (there is no handshake answer to wait for);
        ``socket_buffer`` is accepted and ignored; ``authkey`` raises ``ValueError`` (the
        protocol has no authentication)."""
        ecipc = parse_address(address, path=path, port=port)
        if ecipc is None:
            with self._state_lock:
                if self._econn is not None and not self._econn.closed:
                    raise IpcBusConnectionError("this client is already connected")
                self.__class__ = IpcBusClient  # type: ignore[assignment]
            return IpcBusClient.connect(self, address, path=path, port=port, host=host,
                                        peer_name=peer_name, timeout=timeout,
                                        socket_buffer=socket_buffer, authkey=authkey)
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
            conn = _open_connection(ecipc, wait if wait is not None else 3600.0)
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
                mine = [k for k, p in conn.pending.items() if p.client is self]
                pending = [conn.pending.pop(k) for k in mine]
            for p in pending:
                if p.timeout is not None:
                    conn.timer.cancel(p.timeout)
                _set(p.future, exc=IpcBusConnectionError(
                    f"request on {p.channel!r} failed: the client was closed"))
            if not conn.closed:
                try:
                    conn.write(E.command("LIR", self._peer_json, ""))
                    conn.write(E.command("SHT", self._peer_json))
                except IpcBusError:
                    pass
            if last:
                with _registry_lock:
                    if _connections.get(conn.key) is conn:
                        del _connections[conn.key]
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
    def _connection(self) -> _Connection:  # type: ignore[override]
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
              args: tuple[Any, ...], request: _Pending | None = None,
              rid: str | None = None) -> None:
        conn = self._connection()
        target_id = None if target is None else _target_id(target)
        cached = self._headers_ec.get(channel) if rid is None and target_id is None else None
        if cached is not None:  # a broadcast on a channel this client has sent on before
            wire, head = cached
            body = C.encode_array(args)
        else:
            wire, body = self._envelope(channel, args)
        header: dict[str, Any] = {"kind": "MES", "channel": wire, "peer": self._peer_json,
                                  "isRawData": True}
        target_raw = None
        if target_id is not None:
            target_raw = E.target_json(target_id, conn.peers.get(target_id))
            header["target"] = target_raw
        request_raw = None
        if rid is not None:
            request_raw = {"channel": wire, "id": rid}
            header["request"] = request_raw
        if target_id is None or target_id not in conn.clients:
            if cached is None:
                head = E.message_header("MES", wire, self._peer_json, target=target_raw,
                                        request=request_raw)
                if rid is None and target_id is None and wire == channel:
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
        _target_id(target)
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
        pending = _Pending(self, channel)
        if channel.startswith(P.SERVICE_CALL_PREFIX) and args and args[0] == S.STATUS_CALL:
            pending.status = True
            pending.probe = S.is_status_probe(args)
            if pending.probe and wait is None:
                wait = DEFAULT_TIMEOUT  # no host: Node's bus would never tell
        rid = uuid.uuid4().hex
        if wait is not None:
            pending.timeout = conn.timer.call_at(time.monotonic() + wait,
                                                 lambda: self._expire(conn, rid, wait))
        with conn.lock:
            conn.check_usable()
            conn.pending[rid] = pending
        conn.need_reader()
        try:
            self._post(channel, target, args, pending, rid)
        except BaseException:
            with conn.lock:
                conn.pending.pop(rid, None)
            if pending.timeout is not None:
                conn.timer.cancel(pending.timeout)
            raise
        return pending.future

    @staticmethod
    def _expire(conn: _Connection, rid: str, timeout: float) -> None:
        with conn.lock:
            pending = conn.pending.pop(rid, None)
        if pending is None:
            return
        response = IpcBusRequestResponse(IpcBusEvent(pending.channel, None),
                                         err=f"timed out after {timeout:g} s")
        _set(pending.future, exc=IpcBusRequestTimeoutError(
            f"request on {pending.channel!r} timed out after {timeout:g} s (on an"
            " electron-common-ipc bus a request with no listener ends this way)", response))

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

    def _register_service(self, name: str, timeout: float | None) -> None:
        """No registry on Node's bus: a name is not claimed (two hosts would both answer)."""
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


def _join(client: IpcBusClient, address: Any, path: str | None, port: int | None,
          options: dict[str, Any]) -> IpcBusClient | None:
    """``IpcBusClient.connect()`` of an ``"ecipc:..."`` address (see ``ipcbus._schemes``)."""
    if parse_address(address, path=path, port=port) is None:
        return None
    return EcipcClient.adopt(client).connect(address, path=path, port=port, **options)


_schemes.register(_join)

