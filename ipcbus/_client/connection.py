"""One process's connection to one bus, shared by the process's clients: its threads.

The concurrency model, whole:

* **Two I/O threads, two roles.** A connection has two I/O threads and two roles, each held
  by at most one of them at a time: the *reader* reads the socket; the *dispatcher* runs
  listeners. An idle I/O thread asks the :class:`~.inbox.Inbox` which role it takes; the
  rules (who reads next, when reading stops, the order) are there, as a pure unit.
* **Who reads.** Whoever holds the reader's role: an I/O thread, or (the *fast path*,
  ``fastpath.py``, ``IPCBUS_FAST_PATH``) a caller blocked in ``request()`` that found the
  role free: it reads until its own answer has come, then gives the role back. The reader
  decodes frames, attaches received descriptors, settles the answers of requests itself
  (RESPONSE, REQUEST_FAIL: the caller's answer is completed on the reader), handles notices,
  and hands every other frame on (a caller only queues them). While callers wait, and for
  a millisecond after one got its answer, the I/O threads keep off the socket, and an I/O
  reader that settled a caller's answer gives its role up: back-to-back requests are read
  by their callers, no thread woken on the way.
* **Who dispatches.** Frames go to the inbox, in order, and the dispatcher runs their
  listeners (``delivery.py``), ``on_closed`` handlers and ``call_soon`` callables, then gives
  its role up when the inbox is empty. *Hand-over*: a reader that has read messages while
  no one dispatches and nothing waits runs them itself, at once, taking the dispatcher's
  role and leaving the reader's to the other thread (no thread hand-off on the path of a
  message; ``IPCBUS_HAND_OVER=0`` turns it off). With the fast path the hand-over wakes
  no one: one idle thread (the *poller*) looks for work every millisecond while the
  connection is busy, and the thread that ran the listener (its process has answered)
  takes the reader's role again and polls the socket a moment (``SPIN_WAIT``) before it
  blocks in ``recv``. A listener that blocks holds up other listeners, never answers: the
  other thread reads meanwhile (within a millisecond). No listener runs on a caller's
  thread.
* **Who waits how.** A blocking ``request()`` reads its answer itself if it may (above:
  polling the socket for up to ``SPIN_WAIT``, yielding the CPU, then sleeping in ``poll``),
  else sleeps on its :class:`~.answers.SyncAnswer` (a lock the reader releases); past its
  deadline the caller expires the request itself (no timer).
  ``request_async()`` and the library's own requests get a Future, failed by the *timer*
  thread (``_timer.py``) at their deadline. A request made *in* a listener (by the thread
  holding the dispatcher's role) runs the inbox's next items while it waits (*nested
  dispatch*), so a listener may request what a listener of the same process answers.
* **When reading stops.** Past ``DISPATCH_BUDGET`` bytes read and not yet dispatched, the
  reader gives its role up until the dispatcher has brought them down to half: a stuck
  listener becomes back-pressure at the bus, not unbounded memory here.
* **Which lock guards what.** ``lock``: ``clients``, ``client_list`` (a tuple replaced, never
  mutated: the dispatcher reads it without the lock), the request table
  (``requests.pending``), ``closed``. ``cond`` (a Condition): the inbox and the roles; idle
  I/O threads and nested waits sleep on it. ``writer.lock`` (the *send lock*,
  ``writer.py``): every write. Each is held briefly and never while taking another.
* **How it ends.** Whatever ends the reading (the end of the stream, a protocol error, a
  bug) fails every pending request, shuts the socket down (so the hub forgets this
  connection's peers at once) and queues the end; the dispatcher tells the clients
  (``on_closed``; a client connected with ``reconnect`` runs ``on_disconnected`` instead and
  its retry thread opens a new connection: ``reconnecting.py``) and both threads finish. A
  connection never comes back: a reconnection is a new one. ``close()`` shuts the writing side first, lets
  the reader see the bus's end of stream, then waits for both (from a listener: for the
  reading only).
* **Interrupts** (a signal handler raising in the main thread, Ctrl-C): only callers run in
  the main thread. Every entry a caller adds to the request table, the reader's role it
  borrowed and its count as a caller are given back on every path (try/finally); an
  interrupted request sends CANCEL. Writes keep their byte counts in C code
  (``T.send_whole``): a write begun is finished before the interrupt is raised; reads in
  the main thread keep their raw result the same way (``T.recv_kept``), decoded by the next
  reader (see ``fastpath.py`` for the narrow window that remains).
* **Fork.** A connection is bound to the process that made it. After ``fork`` the child's
  copy is closed (so the bus still sees the parent's disconnect) and using it raises
  :class:`IpcBusConnectionError`.

Primitives per connection: two locks (``lock``, the send lock), one condition, two events
(``reader_done``, ``dispatch_done``), two I/O threads, one poller (``select.poll``, the
fast path's); started on first use: the writer's flusher thread (and its event) and the
timer thread.
"""
from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
from typing import Any, Callable

from .. import _protocol as P
from .._decoder import FrameDecoder
from .. import _transport as T
from .._protocol import Kind
from ..errors import IpcBusConnectionError, IpcBusError, IpcBusProtocolError
from .._pending import settle
from .answers import settle_answer
from .answers import SyncAnswer
from .cancels import Delivered
from .gathering import gathered
from .delivery import LocalClient, PeerCache, deliver
from .fastpath import FAST_PATH, FastPath, Seat
from .inbox import Inbox
from .requests import Requests
from .shm import ConnectionShm
from .writer import Membership, Writer

log = logging.getLogger("ipcbus")

__all__ = ["Connection", "DISPATCH_BUDGET"]

DISPATCH_BUDGET = 16 * 1024 * 1024  # bytes read and not dispatched yet before reading stops
HAND_OVER = os.environ.get("IPCBUS_HAND_OVER", "1") != "0"  # see inbox.py
IDLE = 0.05  # seconds of an empty inbox after which the large receive buffer is let go
_STOP = object()  # queued when the connection has ended
_RESPONSE, _REQUEST_FAIL = int(Kind.RESPONSE), int(Kind.REQUEST_FAIL)
_NOTICE, _SPY_COPY = int(Kind.NOTICE), int(Kind.SPY_COPY)
_SHM_FIRST = int(Kind.SHM_ARENA)  # kinds from here on are shared memory's (shm.py)
_RECYCLE = FrameDecoder.CHUNK  # larger frames get a buffer of their own, which is reused
_get_ident = threading.get_ident
perf_counter = time.perf_counter
rids = itertools.count(1)  # request ids, unique in the process


def on_answer(conn: Connection, frame: P.Frame) -> None:
    """A RESPONSE or REQUEST_FAIL, on the reader: settle the request it answers (a
    ``request_all``'s gathering takes each answer: ``gathering.py``; one announced with
    slots is decoded out of them first: ``ConnectionShm.answer``)."""
    if conn.shm.pending is not None:
        frame = conn.shm.answer(frame)
    pending = conn.requests.take_answer((frame.target, frame.rid),  # type: ignore[arg-type]
                                        frame.kind)
    if frame.fds:
        T.close_fds(frame.fds)
    if pending is None or pending.future.done():
        return
    if pending.gathered is not None:
        gathered(pending, frame, conn.peer_of(frame.sender))
        return
    settle_answer(pending, frame, conn.peer_of(frame.sender))
    if pending.future.__class__ is SyncAnswer:
        conn.settled_a_caller = True  # see fastpath.py


class Lost(Exception):
    """The bus closed the connection (end of stream)."""


class Connection:
    """One process's connection to one bus, shared by its clients."""

    def __init__(self, key: Any, transport: T.StreamTransport, decoder: FrameDecoder,
                 welcome: dict[str, Any], ptype: str, coalesce: int = 0) -> None:
        self.key = key
        self.pid = os.getpid()
        self.transport = transport
        self.decoder = decoder
        decoder.direct_bytes = True  # large bytes arguments arrive in their own object
        self.welcome = welcome
        self.ptype = ptype
        self.max_message: int = welcome["max_message"]
        self.can_pass_fds = bool(welcome.get("fds")) and transport.can_pass_fds
        self.writer = Writer(transport, coalesce, self.max_message)
        self.send_lock = self.writer.lock
        self.fd_queue: list[int] = []  # received descriptors not attached to a frame yet
        self.lock = threading.Lock()  # clients, client_list, requests.pending, closed
        self.clients: dict[str, LocalClient] = {}
        self.client_list: tuple[LocalClient, ...] = ()  # snapshot of clients, for dispatch
        self.closed = False
        self.close_reason = ""
        self.forked = False
        self.requests = Requests(self, self.lock, rids)
        self.peer_of = PeerCache()  # sender tuples -> IpcBusPeer
        self.delivered = Delivered()  # requests delivered here and not answered (cancels.py)
        self.cond = threading.Condition(threading.Lock())  # the inbox
        self.inbox = Inbox(DISPATCH_BUDGET, IDLE, hand_over=HAND_OVER, fast=FAST_PATH)
        self.fast = FastPath(transport)  # see fastpath.py
        self.seat = Seat(self)  # where blocking callers read their own answers
        self._refuse = functools.partial(refuse_request, self)
        self.settled_a_caller = False  # the last read settled a blocking caller's answer
        self.dispatch_owner: int | None = None  # the thread holding the dispatcher's role
        self.reader_done = threading.Event()  # the connection has ended
        self.dispatch_done = threading.Event()  # ...and everything queued was dispatched
        self.forget: Callable[[], None] = _nothing  # drops it from the process's registry
        self.exit_flush: Any = None  # a multiprocessing.util.Finalize, cancelled at the end
        self.shm = ConnectionShm(self)  # large payloads through shared memory (shm.py)
        self._threads = [threading.Thread(target=self._io_loop, daemon=True,
                                          name=f"ipcbus-io-{i} {key}") for i in (1, 2)]

    def start(self) -> None:
        batch, size = self._handle_frames(self.decoder.frames())  # read with the WELCOME
        if batch:
            self.inbox.put(batch, size)
        for thread in self._threads:
            thread.start()

    def check_usable(self) -> None:
        if self.forked:  # set in the child by the at-fork hook: no getpid() per call
            raise IpcBusConnectionError(
                f"this client was connected in process {self.pid} and inherited through fork;"
                " connect a new client in this process")
        if self.closed:
            raise IpcBusConnectionError(f"the bus connection has closed: {self.close_reason}")

    # -- writing ----------------------------------------------------------------------------
    def send(self, member: Membership, kind: int, channel: str, target: str | None, rid: int,
             body: P.Body, fds: list[int] | None = None, timeout: float | None = None) -> None:
        """Write one frame in the name of ``member`` (see ``writer.py``)."""
        if self.forked or self.closed:
            self.check_usable()
        try:
            self.writer.frame(member, kind, channel, target, rid, body, fds, timeout)
        except OSError as exc:
            self._write_failed(exc)
        if kind == _RESPONSE:
            self.fast.answered_at = perf_counter()  # the reader polls for what comes next

    def send_surely(self, member: Membership, data: bytes) -> None:
        """Write a frame even if interrupted while waiting (see ``Writer.write_surely``)."""
        self.check_usable()
        try:
            self.writer.write_surely(data, member)
        except OSError as exc:
            self._write_failed(exc)

    def leave(self, member: Membership) -> None:
        """Write the PEER_REMOVE of ``member``; no frame in its name follows."""
        self.check_usable()
        try:
            self.writer.leave(member)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        self.check_usable()
        raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None

    # -- the I/O threads ----------------------------------------------------------------------
    def _io_loop(self) -> None:
        """An I/O thread: take a role (see ``inbox.py``), play it, again, until the end."""
        try:
            while (role := self._take_role()) is not None:
                if role == "read":
                    self._read_turn()
                else:
                    self._dispatch_turn(0)
        except BaseException as exc:  # pragma: no cover - a bug: report it, end it all
            log.exception("ipcbus I/O thread failed")
            self._on_lost(f"internal error in an I/O thread: {exc!r}")
            self._finish_dispatch()

    def _take_role(self) -> str | None:
        """Wait until this thread may read or dispatch (its role), or the end (None)."""
        inbox, me = self.inbox, _get_ident()
        with self.cond:
            while not self.dispatch_done.is_set():
                role = inbox.next_role()
                if role is not None:
                    if role == "dispatch":
                        self.dispatch_owner = me
                    return role
                self.cond.wait(inbox.wait_timeout(me))
                inbox.woke(me)
                if inbox.went_idle():
                    self.decoder.drop_spare()  # quiet: no large buffer kept meanwhile
        return None

    def _read_turn(self) -> None:
        """Holding the reader's role: read until this thread runs what it read itself
        (hand-over), the budget is spent, or the stream ends."""
        inbox, fast = self.inbox, self.fast
        mine = False
        try:
            while True:
                fast.before_read()
                self.settled_a_caller = False
                batch, size = self._read_once()
                if not batch:
                    if self.settled_a_caller or inbox.callers:
                        with self.cond:
                            if inbox.reader_gives_way(self.settled_a_caller):
                                break  # the socket is the callers' (fastpath.py)
                    continue
                with self.cond:
                    mine = inbox.read_done(batch, size)
                    if mine:
                        self.dispatch_owner = _get_ident()
                    elif not inbox.may_read:
                        inbox.stop_reading()
                    elif self.settled_a_caller or inbox.callers:
                        inbox.reader_gives_way(self.settled_a_caller)
                    if not mine or inbox.wake_other:
                        self.cond.notify_all()  # the other thread: read, or dispatch
                if mine or not inbox.reading:
                    break
        except BaseException as exc:
            self._lost(exc)
            return
        if mine:
            self._run(batch, size)
            self._dispatch_turn(size)

    def _read_once(self) -> tuple[list[P.Frame], int]:
        """One read: the frames it completed for the dispatcher, and their size."""
        nbytes, fds = self.fast.recv(self.decoder.get_buffer())  # interrupt-safe
        if fds:
            self.fd_queue.extend(fds)
        if nbytes == 0:
            raise Lost("the bus closed the connection")
        self.decoder.buffer_updated(nbytes)
        return self._handle_frames(self.decoder.frames())

    def _handle_frames(self, frames: list[P.Frame]) -> tuple[list[P.Frame], int]:
        """Attach descriptors; settle answers, handle notices; return the frames left for
        the dispatcher and their size."""
        batch: list[P.Frame] = []
        size = 0
        shm = self.shm
        try:
            for frame in frames:
                if frame.nfds:
                    if len(self.fd_queue) < frame.nfds:
                        raise IpcBusProtocolError("a frame arrived without its descriptors")
                    frame.fds = self.fd_queue[:frame.nfds]
                    del self.fd_queue[:frame.nfds]
                kind = frame.kind
                if kind == _RESPONSE or kind == _REQUEST_FAIL:
                    self._on_answer(frame)
                elif kind == _NOTICE:
                    T.close_fds(frame.fds)
                    self.close_reason = notice_closing(frame) or self.close_reason
                elif kind >= _SHM_FIRST or shm.pending is not None:  # see shm.py
                    for one in shm.on_frame(frame):
                        batch.append(one)
                        size += len(one.raw)
                else:
                    batch.append(frame)
                    size += len(frame.raw)
        except BaseException:
            for frame in batch:  # never dispatched: their descriptors are ours to close
                if frame.fds:
                    T.close_fds(frame.fds)
            raise
        return batch, size

    _on_answer = on_answer  # settling answers on the reader (below)

    def _lost(self, exc: BaseException) -> None:
        self._on_lost(lost_reason(exc, self.closed))

    def _on_lost(self, reason: str) -> None:
        """The end of the reader, whatever the cause: fail what is pending, let the hub see
        the end at once, tell the dispatcher."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.close_reason = self.close_reason or reason
            pending = self.requests.close(self.close_reason)
        if self.exit_flush is not None:
            self.exit_flush.cancel()
        for p in pending:
            settle(p.future, exc=IpcBusConnectionError(
                f"request on {p.channel!r} failed: {self.close_reason}"))
        T.close_fds(self.fd_queue)
        self.fd_queue.clear()
        self.shm.close()
        self.fast.drop()
        self.transport.shutdown()
        self.writer.stop()
        self.forget()
        self.reader_done.set()
        with self.cond:
            self.inbox.stop_reading(ended=True)
            self.inbox.put(_STOP)
            self.cond.notify_all()

    # -- dispatching --------------------------------------------------------------------------
    def _dispatch_turn(self, done_size: int) -> None:
        """Holding the dispatcher's role (having run an item of ``done_size`` bytes): run
        what is queued, in order, then give the role up."""
        size = done_size
        while (got := self._next(size, None)) is not None:
            item, size = got
            if item is _STOP:
                self._finish_dispatch()
                return
            self._run(item, size)

    def _next(self, done_size: int, awaited: Any) -> tuple[Any, int] | None:
        """Account for the item just run (``done_size`` bytes), then take the next one.
        None: the queue is empty and the role was given up, or (a nested wait: ``awaited``
        is its future) the answer came; a nested wait sleeps until one or the other."""
        inbox = self.inbox
        with self.cond:
            if inbox.release(done_size):
                self.cond.notify_all()  # reading may resume
            while True:
                if awaited is not None and awaited.done():
                    return None
                got = inbox.take()
                if got is not None:
                    return got
                if awaited is None:
                    inbox.stop_dispatching()
                    self.dispatch_owner = None
                    return None
                self.cond.wait()

    def _run(self, item: Any, size: int) -> None:
        """Run one item of the inbox: a batch of frames, or a callable."""
        if item.__class__ is list:
            for frame in item:
                try:
                    deliver(frame, self.client_list, self.peer_of, self._refuse,
                            self.delivered)
                except BaseException:  # a listener's SystemExit too: see delivery.py
                    log.exception("ipcbus: error while dispatching")
                if size > _RECYCLE and frame.kind != _SPY_COPY:
                    self.decoder.recycle(frame)
        else:
            try:
                item()
            except BaseException:
                log.exception("ipcbus: error while dispatching")

    def _finish_dispatch(self) -> None:
        with self.lock:
            clients = list(self.clients.values())
            self.clients.clear()
            self.client_list = ()
        for client in clients:
            client._connection_ended(self)
        self.dispatch_done.set()
        with self.cond:
            self.cond.notify_all()  # the other thread ends too

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the dispatch thread, after what is queued."""
        with self.cond:
            self.inbox.put(fn)
            self.cond.notify_all()

    def on_dispatch_thread(self) -> bool:
        """Whether the calling thread holds the dispatcher's role (runs listeners)."""
        return _get_ident() == self.dispatch_owner

    def set_clients(self, update: Callable[[dict[str, LocalClient]], Any]) -> Any:
        """Change ``clients`` under the lock (``update`` gets the dict); the dispatcher's
        snapshot follows."""
        with self.lock:
            result = update(self.clients)
            self.client_list = tuple(self.clients.values())
        return result

    # -- waiting -----------------------------------------------------------------------------
    def nested_wait(self, future: concurrent.futures.Future[Any]) -> None:
        """On the dispatch thread: run what arrives until ``future`` is done."""
        def wake(_: Any) -> None:
            with self.cond:
                self.cond.notify_all()

        future.add_done_callback(wake)
        size = 0
        while True:
            got = self._next(size, future)
            if got is None:
                return
            item, size = got
            if item is _STOP:  # the end: the outer loop finishes it
                with self.cond:
                    self.inbox.put_back(item)
                return
            self._run(item, size)

    # -- the end -----------------------------------------------------------------------------
    def close(self, timeout: float | None) -> None:
        """Graceful end: no more writes, let the bus read everything, wait for its EOF."""
        self.writer.end(shutdown_write=True)
        with self.cond:
            if self.inbox.close():
                self.cond.notify_all()  # a reader held by the budget reads to the end
        if not self.reader_done.wait(timeout):
            self.transport.shutdown()
            self.reader_done.wait(1.0)
        if not self.on_dispatch_thread():
            self.dispatch_done.wait(timeout)
        self.transport.close()

    def after_fork_in_child(self) -> None:
        self.forked = True
        self.closed = True
        self.close_reason = "inherited through fork"
        self.writer.ended = True
        try:
            fd = self.transport.sock.detach()
            os.close(fd)
        except OSError:
            pass


def _nothing() -> None:
    pass


def refuse_request(conn: Connection, frame: P.Frame, reason: str | None = None,
                   client: LocalClient | None = None) -> None:
    """Fail a request delivered here with REQUEST_FAIL (see ``delivery.Refuse``): no listener
    of this process takes it (``reason`` None), or every local receiver's listener raised."""
    if client is None:
        with conn.lock:
            client = next(iter(conn.clients.values()), None)
    if client is None or frame.sender_id is None:
        return
    if reason is None:
        reason = f"no listener for {frame.channel!r}"
    try:
        conn.send(client._member, Kind.REQUEST_FAIL, frame.channel, frame.sender_id,
                  frame.rid, P.pack_payload(reason))
    except IpcBusError:
        pass


def notice_closing(frame: P.Frame) -> str | None:
    """What a NOTICE says: logged; the reason the bus gives for closing us, if it does."""
    try:
        body = P.unpack_control(frame.body)
    except IpcBusProtocolError:
        return None
    if not isinstance(body, dict):
        return None
    if "closing" in body:
        reason = f"disconnected by the bus: {body['closing']}"
        log.warning("%s", reason)
        return reason
    if "error" in body:
        log.warning("bus: %s", body["error"])
    return None


def lost_reason(exc: BaseException, closed: bool) -> str:
    """Why reading ended, from what ended it (logged if it is an error)."""
    if isinstance(exc, Lost):
        return str(exc)
    if isinstance(exc, IpcBusProtocolError):
        reason = f"protocol error from the bus: {exc}"
        log.error("%s", reason)
        return reason
    if isinstance(exc, OSError):
        return "the bus closed the connection" if closed else \
            f"connection to the bus lost: {exc}"
    log.error("ipcbus reader failed", exc_info=exc)  # a bug: report it, fail everything
    return f"internal error in the reader: {exc!r}"
