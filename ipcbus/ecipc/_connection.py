"""The connection an electron-common-ipc client process shares: its I/O threads and the dispatch
of listeners (the client on top of it: :mod:`ipcbus.ecipc.client`; its requests in flight:
:mod:`ipcbus.ecipc._requests`).

Threads and ownership:

* One :class:`Connection` per (process, address), shared by every client of the process that
  connects there, as Node's clients share theirs (kept in :data:`connections`, an
  :class:`ipcbus._registry.ConnectionRegistry`). Two *I/O threads* take turns on it: the one
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
* Reading stops while more than :data:`DISPATCH_BUDGET` (16 MiB) of messages wait for their
  listeners: a stuck listener turns into back-pressure at the broker, not into memory here.
* A caller waiting for its answer (not on the dispatch thread) first polls its future for up
  to :data:`SPIN_WAIT`, yielding the CPU, then sleeps on it: on a small VM, waking a sleeping
  thread costs more than a short answer takes (figures in ``docs/performance.md``).
* Any thread may send: a packet is written whole under the send lock, so the packets of one
  sender leave in the order of its calls.
* ``lock`` guards the clients, ``closed`` and the requests in flight (:mod:`._requests`);
  it is never held while writing, running a listener or settling a future.
* A connection belongs to the process that made it: after ``fork`` the child's copy is closed
  and using it raises :class:`~ipcbus.IpcBusConnectionError`.

The clients are reached through :class:`Member` (what the connection needs of an
:class:`~ipcbus.ecipc.client.EcipcClient`), so this module does not import the client's.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Mapping, Protocol

from .._pending import settle
from .._registry import ConnectionRegistry
from .._types import Answerer, IpcBusEvent, IpcBusPeer, IpcBusRequest, _Answered
from ..emitter import Listener
from ..errors import IpcBusConnectionError, IpcBusProtocolError
from . import _codec as C
from . import _envelope as E
from . import _services as S
from ._requests import Requests, settle_answer

log = logging.getLogger("ipcbus")

__all__ = ["Connection", "Member", "DISPATCH_BUDGET", "SPIN_WAIT", "connections",
           "open_connection"]

_STOP = object()
DISPATCH_BUDGET = 16 * 1024 * 1024
"""Bytes of received messages waiting for their listeners before the reader stops reading
(the broker then holds them: memory here stays bounded whatever a listener does)."""


def _spin_setting(environ: Mapping[str, str] = os.environ, cpus: int | None = None) -> float:
    """SPIN_WAIT in seconds: ``IPCBUS_ECIPC_SPIN_US`` (microseconds; 0 turns it off), else
    200 µs; always 0 in a process that may run on one CPU only (the answer could not come
    while it polls)."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
    value = environ.get("IPCBUS_ECIPC_SPIN_US", "")
    try:
        spin = max(0.0, float(value)) / 1e6 if value else 200e-6
    except ValueError:
        log.warning("IPCBUS_ECIPC_SPIN_US=%r is not a number of microseconds: using 200",
                    value)
        spin = 200e-6
    return spin if cpus > 1 else 0.0


SPIN_WAIT = _spin_setting()
"""How long a caller waiting for its answer polls before it sleeps (seconds)."""


class Member(Answerer, Protocol):
    """What a connection needs of the clients that share it (an ``EcipcClient``)."""

    @property
    def _peer_id(self) -> str | None: ...

    @property
    def _peer_json(self) -> dict[str, Any]: ...

    @property
    def _listeners(self) -> Mapping[str, Any]: ...

    def _take(self, key: str) -> list[Listener]: ...

    def _notify(self, channel: str, args: list[Any], sender: IpcBusPeer | None) -> None: ...

    def _connection_ended(self, conn: Any) -> None: ...

    def _connection(self) -> Connection: ...


class Connection:
    """One process's connection to one electron-common-ipc broker, shared by its clients."""

    def __init__(self, key: Any, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.pid = os.getpid()
        self.lock = threading.Lock()  # clients, closed, the requests in flight
        self.send_lock = threading.Lock()
        self.clients: dict[str, Member] = {}
        self.client_list: tuple[Member, ...] = ()
        self.requests = Requests(self.lock)  # in flight, by request id
        self.peers: dict[str, dict[str, Any]] = {}  # raw peers seen, for send_to targets
        self.closed = False
        self.close_reason = ""
        self.forked = False
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
                        if self.requests:
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
        rid = incoming.header.get("channel")
        pending = self.requests.take(rid) if isinstance(rid, str) else None
        if pending is not None:
            sender = self.peer_of(incoming.header.get("peer"))
            settle_answer(pending, incoming, sender, self.call_soon)

    def _on_lost(self, reason: str) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.close_reason = reason
        for p in self.requests.close(self.close_reason):
            settle(p.future, exc=IpcBusConnectionError(
                f"request on {p.channel!r} failed: {self.close_reason}"))
        connections.discard(self.key, self)
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
        """``future.result()``; on the dispatch thread, keep dispatching meanwhile; elsewhere
        poll for up to ``SPIN_WAIT`` before sleeping."""
        if SPIN_WAIT and not future.done() and not self.on_dispatch_thread():
            until = time.perf_counter() + SPIN_WAIT
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
            client._connection_ended(self)

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
                ev_request = EcipcRequest(
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



class EcipcRequest(IpcBusRequest):
    """``event.request`` of a request on an electron-common-ipc bus: answers as an RQR."""

    __slots__ = ("_request", "_requester_raw", "_local", "_status")

    def __init__(self, client: Member, request: dict[str, Any], requester: Any,
                 local: bool, status: bool, answered: _Answered) -> None:
        # the base class's "requester" holds the request id: electron-common-ipc keys answers
        # by it alone (the requester itself travels as the answer's target)
        super().__init__(client, request["id"], 0, str(request.get("channel", "")), answered)
        self._request = request
        self._requester_raw = requester
        self._local = local
        self._status = status

    def _answer(self, resolved: bool, value: Any) -> bool:
        client: Member = self._client  # type: ignore[assignment]
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
connections: ConnectionRegistry[str | tuple[str, int], Connection] = ConnectionRegistry()
"""This process's connections by broker address (renewed in a forked child)."""


def open_connection(address: str | tuple[str, int], timeout: float) -> Connection:
    """The process's connection to the broker at ``address``: the live one, or a new one."""
    def make() -> Connection:
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
        conn = Connection(address, sock)
        conn.start()
        return conn

    return connections.open(address, make)
