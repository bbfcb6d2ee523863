"""IpcBusClient and the per-process connection its instances share.

Threads and ownership:

* One :class:`_Connection` per (process, bus address), shared by every client of the process
  that connects there. Two *I/O threads* serve it, taking turns (leader/follower): the one
  holding the *read role* reads and decodes frames and resolves request futures itself; when
  it reads messages for listeners it gives the read role up and runs them (it holds the
  *dispatch lock*), while the other takes over the socket. A parked I/O thread looks for work
  every millisecond while the bus is busy (so giving the role away costs no wake-up) and
  sleeps until kicked after 50 ms of silence. Giving up the role is never a wait: a listener
  that blocks delays the answers other threads wait for by about a millisecond at most.
* Listeners and ``on_closed`` handlers run on an I/O thread holding the dispatch lock, in
  arrival order, never on a caller's thread. A request made *in* a listener keeps
  dispatching (and reading) while it waits (nested dispatch), so a listener may request what
  a listener of the same process answers.
* A caller blocked in :meth:`IpcBusClient.request` reads the socket itself when no one else
  does (its answer then needs no thread hand-off, which costs tens of microseconds on a
  small VM), and the I/O threads keep off the socket meanwhile; messages it reads are queued
  for the I/O threads. It polls for its answer for up to ``SPIN_WAIT`` (200 µs, yielding the
  CPU between looks) before it sleeps, because waking a sleeping vCPU costs tens of
  microseconds per hop; it watches its own timeout. Likewise an I/O thread whose process has
  just answered a request polls for the next message before it sleeps. Both stop polling
  for a while after two polls in a row found nothing (:class:`_Spin`).
* Reading stops while more than ``DISPATCH_BUDGET`` bytes (16 MiB) wait for their listeners,
  so a stuck listener turns into back-pressure at the bus (and, if it stays stuck, a
  "slow consumer" disconnect) instead of unbounded memory; answers then wait too.
* A *timer* thread fails requests whose timeout has passed (started on first use).
* Any thread may send: frames are written whole under the connection's send lock, so frames of
  one sender reach the bus in the order of their ``send`` calls.
* A connection is bound to the process that made it. After ``fork`` the child's copy is
  closed (so the bus still sees the parent's disconnect) and using it raises
  :class:`IpcBusConnectionError`.
* A client's frames carry one *membership* (:class:`_Membership`) per ``connect()``: the
  hub's record of the peer (adopted from the answer to PEER_ADD, before anything else of it
  is written) and a ``left`` flag read under the send lock, set where PEER_REMOVE is written:
  no frame in a client's name follows its PEER_REMOVE, whatever other threads do.
* Listeners and handlers may raise anything, ``SystemExit`` and ``KeyboardInterrupt``
  included: it is logged and the I/O thread goes on. Whatever ends the I/O machinery also
  shuts the socket down, so that the hub forgets the connection's peers at once.
* Interrupts (a signal handler raising in the main thread, Ctrl-C's KeyboardInterrupt): every
  role, count and pending entry a caller takes is given back on every path (try/finally),
  and an interrupted request sends CANCEL. A write that has begun is finished before the
  interrupt is raised: the main thread's writes (the only thread signal handlers run in;
  the others keep the plain calls) store their byte counts from C code (``T.send_whole``),
  so even an interrupt right after a system call finds the count; its reads keep their
  raw result the same way (``T.recv_kept``) for the next reader. ``close()`` runs all its
  steps when interrupted, then raises; an interrupted ``connect()`` leaves once the hub
  answers its PEER_ADD. What remains: an interrupt landing in the few
  bytecodes between taking that kept result and handing its bytes to the decoder, or while
  frames already decoded are being handled, may lose those frames (and, if bytes were
  taken, desynchronise the stream: the connection then ends with a protocol error). No
  such loss was seen in 10 000 interrupts of a stream of round trips of the main thread
  while another thread made round trips of its own.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from typing_extensions import Self

from . import _protocol as P
from ._decoder import FrameDecoder
from . import _transport as T
from ._protocol import Kind
from . import _schemes
from ._local import bridge_of_this_process
from ._timeouts import resolve_timeout
from ._timer import Timer as _Timer
from ._types import (IpcBusEvent, IpcBusPeer, IpcBusProcess, IpcBusRequest, IpcBusRequestResponse,
                     _Answered)
from .emitter import Callbacks, Emitter
from .errors import (IpcBusConnectionError, IpcBusError, IpcBusProtocolError, IpcBusRequestError,
                     IpcBusRequestTimeoutError)

log = logging.getLogger("ipcbus")

__all__ = ["IpcBusClient", "IpcBusPeer", "IpcBusProcess", "IpcBusEvent", "IpcBusRequest",
           "IpcBusRequestResponse"]


# -- the shared connection -------------------------------------------------------------------
_STOP = object()
_POLL = 0.001  # a parked I/O thread looks for work this often while the bus is busy...
_IDLE = 0.05  # ...until this long has passed without traffic: then it sleeps until kicked
_READ_WAIT_MS = 10  # a thread reading for its own answer looks at its future this often (ms)


def _spin_setting() -> float:
    """SPIN_WAIT from the environment (IPCBUS_SPIN_US, microseconds), else 200 µs."""
    value = os.environ.get("IPCBUS_SPIN_US", "")
    try:
        return max(0.0, float(value)) / 1e6 if value else 200e-6
    except ValueError:
        log.warning("IPCBUS_SPIN_US=%r is not a number of microseconds: using 200", value)
        return 200e-6


# A caller blocked for an answer that it reads itself polls the socket (yielding the CPU
# between looks) for up to this many seconds before it sleeps, and so does an I/O thread
# whose process has just sent an answer, for the next request. On a small VM a sleeping vCPU
# takes tens of microseconds to wake, once per hop; a process that stays awake is reached
# at once (W1 p50: about 180 -> 90 µs). The price is at most this much CPU time per request
# or answer, and less where it does not pay (_Spin). 0: off (and off in a process that may
# run on one CPU only, where it could only get in the way).
SPIN_WAIT = _spin_setting()


class _Spin:
    """When to poll instead of sleeping (see SPIN_WAIT), adaptively: after two polls in a row
    that ran out without data, the next _SPIN_SKIP chances sleep at once, so a peer that
    answers slowly (or traffic that comes in ms gaps) costs almost no polling."""

    __slots__ = ("limit", "misses", "skip")

    def __init__(self, limit: float) -> None:
        self.limit = limit  # seconds; 0: never poll
        self.misses = 0
        self.skip = 0

    def until(self, start: float) -> float:
        """The time.perf_counter() to poll until, from ``start``; 0.0: do not poll."""
        if not self.limit:
            return 0.0
        if self.skip:
            self.skip -= 1
            return 0.0
        return start + self.limit

    def outcome(self, hit: bool) -> None:
        if hit:
            self.misses = 0
        else:
            self.misses += 1
            if self.misses >= 2:
                self.skip = _SPIN_SKIP


_SPIN_SKIP = 100
DISPATCH_BUDGET = 16 * 1024 * 1024  # bytes read and not dispatched yet before reading stops
BURST_GAP = 50e-6  # seconds between two sends that makes them one burst
DEFAULT_SOCKET_BUFFER = 64 * 1024  # bytes of a burst written at once
_COALESCE_FRAME = 16 * 1024  # larger frames are written on their own, without a copy
# Kinds as plain ints for the hot paths: an IntEnum member costs ~0.15 µs to look up and
# compare, several times a message.
_SEND, _SEND_TO, _REQUEST, _RESPONSE = (int(Kind.SEND), int(Kind.SEND_TO), int(Kind.REQUEST),
                                        int(Kind.RESPONSE))
_REQUEST_FAIL, _NOTICE, _SPY_COPY = int(Kind.REQUEST_FAIL), int(Kind.NOTICE), int(Kind.SPY_COPY)
_PREFIX_PACK = P.PREFIX.pack
_DECODED = P.DecodedFrame
_RECYCLE = FrameDecoder.CHUNK  # received into a buffer of their own, which is reused
_registry_lock = threading.Lock()
_connections: dict[Any, _Connection] = {}


class _Lost(Exception):
    """The bus closed the connection (end of stream)."""


class _AnswerFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of a request: completed by a frame of its connection (or a timeout, or the
    end), so that a caller waiting for it may read the socket itself."""


class _SyncAnswer:
    """The answer of a blocking :meth:`IpcBusClient.request`: the part of a Future its one
    waiting caller needs, without a Future's locks. Set once, by whoever took its pending
    entry out of ``_Connection.pending`` (under that lock)."""

    __slots__ = ("_done", "_result", "_exc", "_event")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._exc: BaseException | None = None
        self._event: threading.Event | None = None  # made by a caller that must wait

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._result = result
        self._finish()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._finish()

    def _finish(self) -> None:
        self._done = True
        event = self._event  # read after _done is set: see wait()
        if event is not None:
            event.set()

    def wait(self, timeout: float | None) -> bool:
        """Wait until set (True) or for ``timeout`` seconds (False)."""
        if self._done:
            return True
        event = self._event = threading.Event()
        return self._done or event.wait(timeout)

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._result


class _Membership:
    """One joining of the bus by a client: the peer tuple its frames carry (the hub's record
    of it once PEER_ADD is answered), their cached headers, and whether its PEER_REMOVE was
    written. ``left`` is set and read under the connection's send lock: no frame of a
    membership is ever written after its PEER_REMOVE (the hub would drop the whole shared
    connection for it). A new ``connect()`` makes a new membership, so a thread still
    sending for the old one cannot write in the new one's name."""

    __slots__ = ("info", "headers", "left")

    def __init__(self, info: list[Any] | None, left: bool = False) -> None:
        self.info = info
        self.headers: dict[tuple[int, str, str | None], bytes] = {}  # frames without fds
        self.left = left


_NOT_JOINED = _Membership(None, left=True)


class _Pending:
    __slots__ = ("future", "client", "channel", "timeout")

    def __init__(self, client: IpcBusClient, channel: str,
                 future: _AnswerFuture | _SyncAnswer) -> None:
        self.future = future
        self.client = client
        self.channel = channel
        self.timeout: list[Any] | None = None  # the timer's handle, cancelled on an answer


class _Connection:
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
        self.fd_queue: list[int] = []
        # The raw result of a read (see T.recv_kept): normally taken at once; left here when
        # an interrupt (Ctrl-C in the main thread, reading its own answer) came right after
        # the system call, for the next reader to take first.
        self.got: list[Any] = []
        self.main_ident = threading.main_thread().ident  # the thread signal handlers run in
        self.send_lock = threading.Lock()
        self.coalesce = coalesce  # bytes of a burst buffered before an inline write; 0: off
        self.out: list[bytes] = []  # a burst's frames, not written yet (under send_lock)
        self.out_size = 0
        self.last_write = 0.0
        self.flusher: threading.Thread | None = None
        self.flush_wanted = threading.Event()
        self.exit_flush: Any = None  # a multiprocessing.util.Finalize, cancelled at the end
        self.lock = threading.Lock()  # clients, pending, closed
        self.clients: dict[str, IpcBusClient] = {}
        self.client_list: tuple[IpcBusClient, ...] = ()  # snapshot of clients, for dispatch
        self.pending: dict[tuple[str, int], _Pending] = {}
        self.closed = False
        self.close_reason = ""
        self.forked = False
        self.peers: dict[str, IpcBusPeer] = {}
        self.timer = _Timer()
        # Reading and dispatching (see "Threads" in the module docstring): whoever holds
        # read_role reads the socket; whoever holds dispatch_lock runs listeners, in order,
        # from dispatch_q. Two I/O threads take turns; a caller waiting for its answer may
        # read too.
        self.read_role = threading.Lock()
        self.dispatch_lock = threading.Lock()
        self.dispatch_owner: int | None = None
        self.dispatch_q: collections.deque[Any] = collections.deque()
        self.queued_bytes = 0  # of the frames in dispatch_q
        self.over_budget = False  # reading stopped until dispatch_q is half drained
        self.budget = DISPATCH_BUDGET
        self.qlock = threading.Lock()  # queued_bytes, over_budget, parking counts
        self.cond = threading.Condition()  # a dispatcher waiting for a nested answer
        self.nested_waiting = 0
        self.sync_waiters = 0  # callers blocked on an answer, which a reader hands over
        self.self_readers = 0  # callers about to read their own answer: I/O threads keep off
        self.kick = threading.Event()  # wakes parked I/O threads
        self.pollers = 0
        self.deep_parked = 0
        self.last_activity = time.monotonic()
        self.poller = select.poll()
        self.poller.register(transport.fileno(), select.POLLIN)
        spin = SPIN_WAIT if SPIN_WAIT and _cpus() > 1 else 0.0
        self.caller_spin = _Spin(spin)  # a caller waiting for its answer
        self.reader_spin = _Spin(spin)  # an I/O thread, right after its process answered
        self.answered_at = 0.0  # perf_counter() of the last answer this process sent
        self.workers = [threading.Thread(target=self._io_loop, daemon=True,
                                         name=f"ipcbus-io-{i} {key}") for i in (1, 2)]
        self.reader_done = threading.Event()  # the connection has ended
        self.dispatch_done = threading.Event()  # ...and everything queued was dispatched

    def start(self) -> None:
        batch, size, _ = self._handle_frames(self.decoder.frames())  # read with the WELCOME
        if batch:
            self._enqueue((batch, size), size)
        for worker in self.workers:
            worker.start()

    # -- writing --------------------------------------------------------------------------
    def check_usable(self) -> None:
        if self.forked:  # set in the child by the at-fork hook: no getpid() per call
            raise IpcBusConnectionError(
                f"this client was connected in process {self.pid} and inherited through fork;"
                " connect a new client in this process")
        if self.closed:
            raise IpcBusConnectionError(f"the bus connection has closed: {self.close_reason}")

    def write(self, buffers: list[bytes], fds: list[int] | None, urgent: bool,
              member: _Membership) -> None:
        """Write one frame. ``urgent=False`` (broadcasts, peer-to-peer sends) lets it join a
        burst: a send that follows the previous one within BURST_GAP seconds is buffered and
        written with its neighbours (inline every ``coalesce`` bytes, else by the flusher
        thread right after the burst); a lone send is written at once. Urgent frames flush
        what is buffered first, so order is kept."""
        if self.forked or self.closed:
            self.check_usable()
        try:
            with self.send_lock:
                if member.left:
                    _raise_left()
                if urgent or fds or not self.coalesce or len(buffers) > 1 \
                        or len(buffers[0]) > _COALESCE_FRAME:
                    if self.out:
                        self._flush_locked()
                    _send_whole(self.transport.sock, buffers, fds or ())
                    return
                self._burst_locked(buffers[0])
        except OSError as exc:
            self.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None

    def write_burst(self, data: bytes, member: _Membership) -> None:
        """:meth:`write` of one small frame that may join a burst (``urgent=False``)."""
        if self.forked or self.closed:
            self.check_usable()
        try:
            with self.send_lock:
                if member.left:
                    _raise_left()
                if self.coalesce:
                    self._burst_locked(data)
                else:
                    _send_whole(self.transport.sock, (data,))
        except OSError as exc:
            self.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None

    def _burst_locked(self, data: bytes) -> None:
        now = time.monotonic()
        if self.out:
            self.out.append(data)
            self.out_size += len(data)
            if self.out_size >= self.coalesce:
                self._flush_locked()
        elif now - self.last_write < BURST_GAP:
            self.out.append(data)
            self.out_size = len(data)
            self._wake_flusher()
        elif _get_ident() == self.main_ident:
            _send_whole(self.transport.sock, (data,))
        else:
            self.transport.sock.sendall(data)
        self.last_write = now

    def write_now(self, data: bytes, member: _Membership) -> None:
        """:meth:`write` of one urgent frame without descriptors (requests, answers): the
        path of every round trip, kept short."""
        if self.forked or self.closed:
            self.check_usable()
        try:
            with self.send_lock:
                if member.left:
                    _raise_left()
                if self.out:
                    self._flush_locked()
                if _get_ident() == self.main_ident:
                    _send_whole(self.transport.sock, (data,))
                else:
                    self.transport.sock.sendall(data)
        except OSError as exc:
            self.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None

    def write_surely(self, data: bytes, member: _Membership) -> None:
        """:meth:`write_now`, except that an interrupt while waiting for the send lock is
        raised only once the frame is written."""
        self.check_usable()
        interrupted: BaseException | None = None
        acquired: list[bool] = []
        while not acquired:
            try:  # (the result is stored by C code: see T.send_whole)
                acquired.extend(map(self.send_lock.acquire, (True,)))
            except Exception:
                raise
            except BaseException as exc:
                interrupted = interrupted or exc
        try:
            if member.left:
                _raise_left()
            if self.out:
                self._flush_locked()
            _send_whole(self.transport.sock, (data,))
        except OSError as exc:
            self.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None
        finally:
            self.send_lock.release()
        if interrupted is not None:
            raise interrupted

    def leave(self, member: _Membership) -> None:
        """Write the PEER_REMOVE of ``member``, after what its burst left buffered; from
        then on, every write in its name raises (see :class:`_Membership`)."""
        self.check_usable()
        try:
            with self.send_lock:
                if member.left:
                    return
                if self.out:
                    self._flush_locked()
                try:  # (an interrupt before this point: the caller may call leave() again)
                    _send_whole(self.transport.sock,
                                (P.encode_frame(Kind.PEER_REMOVE, sender=member.info),))
                finally:
                    member.left = True
        except OSError as exc:
            self.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None

    def _flush_locked(self) -> None:
        out, self.out, self.out_size = self.out, [], 0
        _send_whole(self.transport.sock, (b"".join(out),))

    def flush(self) -> None:
        """Write whatever a burst left buffered (the flusher does it on its own too)."""
        with self.send_lock:
            if self.out and not self.closed:
                self._flush_locked()

    def flush_at_exit(self) -> None:
        """The process is ending (normal exit, or a multiprocessing child returning): write
        the tail of a burst, within a bound, so that nothing sent is lost."""
        if self.forked or self.closed or not self.send_lock.acquire(timeout=1.0):
            return
        try:
            if self.out:
                self.transport.sock.settimeout(2.0)
                self._flush_locked()
        except OSError as exc:
            log.warning("could not write the last messages at exit: %s", exc)
        finally:
            self.send_lock.release()

    def _wake_flusher(self) -> None:
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                            name="ipcbus-flusher")
            self.flusher.start()
        self.flush_wanted.set()

    def _flush_loop(self) -> None:
        while True:
            self.flush_wanted.wait()
            self.flush_wanted.clear()
            while not self.closed:
                time.sleep(BURST_GAP)  # let the burst go on; its sender flushes full buffers
                with self.send_lock:
                    if not self.out or self.closed:
                        break
                    if time.monotonic() - self.last_write >= BURST_GAP:
                        try:
                            self._flush_locked()
                        except OSError as exc:
                            log.debug("flush failed: %s", exc)
                        break
            if self.closed:
                return

    # -- reading ---------------------------------------------------------------------------
    def _io_loop(self) -> None:
        """An I/O thread: dispatch what is queued if no one does, else read if no one does,
        else park."""
        try:
            while not self.dispatch_done.is_set():
                if self.dispatch_q and self.dispatch_lock.acquire(False):
                    self._drain()
                elif (self.reader_done.is_set() or self.over_budget or self.self_readers
                      or not self.read_role.acquire(False)):
                    self._park()
                elif self._read_turn():
                    self._park(give_way=True)
        except BaseException as exc:  # pragma: no cover - a bug: report it, fail everything
            log.exception("ipcbus I/O thread failed")
            self._on_lost(f"internal error in the reader: {exc!r}")

    def _park(self, give_way: bool = False) -> None:
        """Sleep until kicked; while the bus is busy, look again every _POLL seconds (one
        thread does, so that the role given up for a dispatch is taken without a wake-up).
        ``give_way``: the read role was just left to a caller; look again in _POLL."""
        with self.qlock:
            poll = give_way or (self.pollers == 0 and not self.over_budget
                                and time.monotonic() - self.last_activity < _IDLE)
            if poll:
                self.pollers += 1
            else:
                self.deep_parked += 1
        if not poll:
            self.decoder.drop_spare()  # quiet or stuck: no large buffer kept meanwhile
        try:
            if not give_way and ((self.dispatch_q and not self.dispatch_lock.locked())
                                 or not (self.read_role.locked() or self.over_budget
                                         or self.self_readers or self.reader_done.is_set())):
                return  # work appeared while registering: no sleep
            if self.kick.wait(_POLL if poll else None):
                self.kick.clear()
        finally:
            with self.qlock:
                if poll:
                    self.pollers -= 1
                else:
                    self.deep_parked -= 1

    def _give_up_role(self) -> None:
        """Release the read role; wake a parked I/O thread if none will look by itself."""
        self.read_role.release()
        if self.deep_parked and not self.pollers:
            self.kick.set()

    def _spin_for_data(self, until: float, for_caller: bool = True) -> bool:
        """Poll the socket, yielding the CPU between looks, until it is readable (True) or
        time.perf_counter() reaches ``until`` (False). See SPIN_WAIT. An I/O thread
        (``for_caller`` False) also stops when a caller wants to read its own answer."""
        poll = self.poller.poll
        while not poll(0):
            if time.perf_counter() >= until or (not for_caller and self.self_readers):
                return False
            os.sched_yield()
        return True

    def _read_turn(self) -> bool:
        """Read, holding the read role, until this thread has something to dispatch, the
        dispatch budget is spent, or a waiting caller was handed its answer: it may then
        read its next answer itself, without a hand-off (returns True: give way a moment)."""
        while True:
            if self.answered_at:  # this process just answered: the next request may be near
                spin_end = self.reader_spin.until(self.answered_at)
                self.answered_at = 0.0
                if spin_end > time.perf_counter():
                    hit = self._spin_for_data(spin_end, for_caller=False)
                    if not hit and self.self_readers:  # a caller will read: leave it the socket
                        self._give_up_role()
                        return False
                    self.reader_spin.outcome(hit)
            read = self._read_or_end()
            if read is None:
                return False
            batch, size, woke, full = read
            if batch:
                if size <= _RECYCLE and not self.dispatch_q \
                        and self.dispatch_lock.acquire(False):
                    # Decided while this thread still reads: frames read after the role is
                    # given up are queued behind this batch, never before it.
                    if self.dispatch_q:  # queued by call_soon() meanwhile: keep the order
                        self._enqueue((batch, size), size)
                        self._give_up_role()
                        self._drain()
                    else:
                        self._give_up_role()  # someone else may read while we dispatch
                        self._dispatch_now(batch)
                    return False
                self._enqueue((batch, size), size)
                if self.dispatch_lock.acquire(False):
                    self._give_up_role()  # someone else may read while we dispatch
                    self._drain()
                    return False
                if self.over_budget:
                    break
            if woke and not full:
                break
        self._give_up_role()
        return woke

    def _read_or_end(self) -> tuple[list[P.Frame], int, bool, bool] | None:
        """:meth:`_read_once`; if the connection ends, release the read role, fail what is
        pending and return None. A KeyboardInterrupt (or another BaseException raised by a
        signal handler in the main thread) is not the end of the connection: it propagates,
        and the caller gives up the read role (see :meth:`_caller_wait`)."""
        try:
            return self._read_once()
        except Exception as exc:
            self.read_role.release()
            self._lost(exc)
            return None

    def _read_once(self) -> tuple[list[P.Frame], int, bool, bool]:
        """One read by the holder of the read role: answers and notices are handled here;
        returns the frames to dispatch, their size, whether a waiting caller got its answer
        and whether the read filled the buffer (more is likely waiting)."""
        got = self.got
        if got or _get_ident() == self.main_ident:  # see "Interrupts" at the top
            room = 0  # of the buffer read into; 0: a read an interrupt cut short, in got
            if not got:
                buf = self.decoder.get_buffer()
                room = len(buf)
                T.recv_kept(self.transport, buf, got)
            nbytes, fds = T.recv_result(got.pop())
        else:  # only the main thread runs signal handlers
            buf = self.decoder.get_buffer()
            room = len(buf)
            nbytes, fds = self.transport.recv_into(buf)
        if fds:
            self.fd_queue.extend(fds)
        if nbytes == 0:
            raise _Lost("the bus closed the connection")
        self.last_activity = time.monotonic()
        self.decoder.buffer_updated(nbytes)
        batch, size, woke = self._handle_frames(self.decoder.frames())
        return batch, size, woke, nbytes == room

    def _lost(self, exc: BaseException) -> None:
        if isinstance(exc, _Lost):
            reason = str(exc)
        elif isinstance(exc, IpcBusProtocolError):
            reason = f"protocol error from the bus: {exc}"
            log.error("%s", reason)
        elif isinstance(exc, OSError):
            reason = "the bus closed the connection" if self.closed else \
                f"connection to the bus lost: {exc}"
        else:  # pragma: no cover - a bug: report it, fail everything
            reason = f"internal error in the reader: {exc!r}"
            log.error("ipcbus reader failed", exc_info=exc)
        self._on_lost(reason)

    def _handle_frames(self, frames: list[P.Frame]) -> tuple[list[P.Frame], int, bool]:
        batch: list[P.Frame] = []
        size = 0
        woke = False
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
                    woke = woke or self.sync_waiters > 0
                elif kind == _NOTICE:
                    self._on_notice(frame)
                else:
                    batch.append(frame)
                    size += len(frame.raw)
        except BaseException:
            for frame in batch:  # never dispatched: their descriptors are ours to close
                if frame.fds:
                    T.close_fds(frame.fds)
            raise
        return batch, size, woke

    def _enqueue(self, item: Any, size: int = 0) -> None:
        """Queue a batch of frames (or a callable) for the dispatcher, in order."""
        self.dispatch_q.append(item)
        if size:
            with self.qlock:
                self.queued_bytes += size
                if self.queued_bytes > self.budget:
                    self.over_budget = True
        if self.nested_waiting:
            with self.cond:
                self.cond.notify_all()

    def _ensure_dispatcher(self) -> None:
        """Something was queued by a thread that may not dispatch: wake an I/O thread."""
        if not self.dispatch_lock.locked():
            self.kick.set()

    def _on_answer(self, frame: P.Frame) -> None:
        key = (frame.target, frame.rid)
        with self.lock:
            pending = self.pending.pop(key, None)  # type: ignore[arg-type]
        if frame.fds:
            T.close_fds(frame.fds)
        if pending is None:
            return
        if pending.timeout is not None:
            self.timer.cancel(pending.timeout)
        if pending.future.done():
            return
        sender = self.peer_of(frame.sender)
        event = IpcBusEvent(pending.channel, sender)
        try:
            body = P.unpack_payload(frame.body)
            if frame.kind == _REQUEST_FAIL:
                response = IpcBusRequestResponse(event, err=str(body))
                _set(pending.future, exc=IpcBusRequestError(
                    f"request on {pending.channel!r} failed: {body}", response))
            elif not (isinstance(body, list) and len(body) == 2):
                raise IpcBusProtocolError("malformed answer")
            elif body[0]:
                _set(pending.future, result=IpcBusRequestResponse(event, payload=body[1]))
            else:
                response = IpcBusRequestResponse(event, err=body[1])
                _set(pending.future, exc=IpcBusRequestError(
                    f"request on {pending.channel!r} was rejected: {body[1]}", response))
        except IpcBusProtocolError as exc:
            _set(pending.future, exc=IpcBusRequestError(
                f"request on {pending.channel!r}: undecodable answer: {exc}",
                IpcBusRequestResponse(event, err=str(exc))))

    def _on_notice(self, frame: P.Frame) -> None:
        T.close_fds(frame.fds)
        try:
            body = P.unpack_control(frame.body)
        except IpcBusProtocolError:
            return
        if not isinstance(body, dict):
            return
        if "closing" in body:
            self.close_reason = f"disconnected by the bus: {body['closing']}"
            log.warning("%s", self.close_reason)
        elif "error" in body:
            log.warning("bus: %s", body["error"])

    def peer_of(self, info: Any) -> IpcBusPeer | None:
        if info is None:
            return None
        peer = self.peers.get(info[0])
        if peer is None:
            if len(self.peers) > 4096:
                self.peers.clear()
            peer = IpcBusPeer(info[0], info[1], IpcBusProcess(info[2], info[3]))
            self.peers[info[0]] = peer
        return peer

    def _on_lost(self, reason: str) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.close_reason = self.close_reason or reason
            pending = list(self.pending.values())
            self.pending.clear()
        self.timer.stop()
        if self.exit_flush is not None:
            self.exit_flush.cancel()
        for p in pending:
            _set(p.future, exc=IpcBusConnectionError(
                f"request on {p.channel!r} failed: {self.close_reason}"))
        T.close_fds(self.fd_queue)
        self.fd_queue.clear()
        for raw in self.got:
            try:
                T.close_fds(T.recv_result(raw)[1])
            except IpcBusProtocolError:
                pass  # closed by recv_result
        self.got.clear()
        # Whatever ended it (EOF, a protocol error, a bug in an I/O thread), the hub must see
        # the end too: it then forgets this connection's peers and fails the requests waiting
        # for them at once.
        self.transport.shutdown()
        with _registry_lock:
            if _connections.get(self.key) is self:
                del _connections[self.key]
        self.reader_done.set()
        self._enqueue(_STOP)
        self.kick.set()

    # -- dispatching ---------------------------------------------------------------------------
    def _drain(self) -> None:
        """Run what is queued; the caller holds dispatch_lock, which this releases."""
        me = threading.get_ident()
        while True:
            self.dispatch_owner = me
            try:
                self._run_queued(None)
            finally:
                self.dispatch_owner = None
                self.dispatch_lock.release()
            if not self.dispatch_q or self.dispatch_done.is_set() \
                    or not self.dispatch_lock.acquire(False):
                return

    def _dispatch_now(self, batch: list[P.Frame]) -> None:
        """Run the listeners of frames just read, without queueing them (nothing else is
        queued, and the caller holds dispatch_lock, which this releases)."""
        self.dispatch_owner = threading.get_ident()
        try:
            for frame in batch:
                try:
                    self._dispatch_frame(frame)
                except BaseException:  # a listener's SystemExit too: see _dispatch_frame
                    log.exception("ipcbus: error while dispatching")
        finally:
            self.dispatch_owner = None
            self.dispatch_lock.release()
        if self.dispatch_q and not self.dispatch_done.is_set() \
                and self.dispatch_lock.acquire(False):
            self._drain()

    def _run_queued(self, until: concurrent.futures.Future[Any] | None) -> None:
        """Dispatch queued items, in order, until the queue is empty or ``until`` is done."""
        q = self.dispatch_q
        while q and not self.dispatch_done.is_set():
            if until is not None and until.done():
                return
            item = q.popleft()
            if item.__class__ is tuple:
                batch, size = item
                with self.qlock:
                    self.queued_bytes -= size
                    resume = self.over_budget and self.queued_bytes <= self.budget // 2
                    if resume:
                        self.over_budget = False
                if resume:
                    self.kick.set()
                for frame in batch:
                    try:
                        self._dispatch_frame(frame)
                    except BaseException:  # a listener's SystemExit too: see _dispatch_frame
                        log.exception("ipcbus: error while dispatching")
                    if size > _RECYCLE and frame.kind != _SPY_COPY:
                        self.decoder.recycle(frame)
            elif item is _STOP:
                self._finish_dispatch()
                return
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
        self.kick.set()
        with self.cond:
            self.cond.notify_all()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the dispatch thread, after what is queued."""
        self._enqueue(fn)
        self._ensure_dispatcher()

    def _dispatch_frame(self, frame: P.Frame) -> None:
        kind, channel = frame.kind, frame.channel
        clients = self.client_list  # a snapshot, replaced (never mutated) under self.lock
        if kind == _SPY_COPY:
            for client in clients:
                if client._peer_id == frame.target and client._spy_handler is not None:
                    try:
                        client._spy_handler(frame)
                    except BaseException:
                        log.exception("spy handler raised")
            return
        if kind == _SEND or frame.target is None:
            receivers = [c for c in clients if channel in c._listeners]
        else:
            receivers = [c for c in clients if c._peer_id == frame.target
                         and channel in c._listeners]
        if not receivers:
            if frame.fds:
                T.close_fds(frame.fds)
            if kind == _REQUEST:
                # Our listeners went away after the router sent it: say so at once.
                self._refuse_request(frame)
            return
        info = frame.sender
        sender = self.peers.get(info[0]) if info is not None else None
        if sender is None:
            sender = self.peer_of(info)
        if kind != _REQUEST and not frame.nfds:  # the common case, perhaps a run of frames
            if frame.count > 1:
                bodies: Any = frame.bodies()
            elif frame.__class__ is _DECODED:
                bodies = (frame.args,)
            else:
                bodies = (memoryview(frame.raw)[frame.body_offset:],)
            for body in bodies:
                if body.__class__ is list:
                    args = body
                else:
                    try:
                        args = P.unpack_payload(body)
                    except IpcBusProtocolError as exc:
                        log.error("dropped a message on %r from %s: %s", channel,
                                  frame.sender_id, exc)
                        continue
                if args.__class__ is not list:
                    args = [args]
                for client in receivers:
                    listeners = client._take(channel)
                    if listeners:
                        event = IpcBusEvent(channel, sender, None, None)
                        for listener in listeners:
                            try:
                                listener(event, *args)
                            except BaseException:  # see below
                                log.exception("listener %r of channel %r raised", listener,
                                              channel)
            return
        # The frame owns its descriptors until a listener's ``ports`` takes them: every
        # other path, an exception included, closes them here.
        fds = frame.fds
        try:
            try:
                body = P.unpack_payload(memoryview(frame.raw)[frame.body_offset:])
                kinds: list[str] | None = None
                if frame.nfds:
                    if not (isinstance(body, list) and len(body) == 2
                            and isinstance(body[0], list) and isinstance(body[1], list)
                            and len(body[1]) == frame.nfds
                            and all(isinstance(k, str) and k in T.PORT_KINDS
                                    for k in body[1])):
                        raise IpcBusProtocolError("malformed list of port kinds")
                    body, kinds = body
            except IpcBusProtocolError as exc:
                log.error("dropped a message on %r from %s: %s", channel, frame.sender_id, exc)
                return
            args = body if body.__class__ is list else [body]
            answered = _Answered() if kind == _REQUEST else None
            takers = [(client, listeners) for client in receivers
                      if (listeners := client._take(channel))]
            for i, (client, listeners) in enumerate(takers):
                request = None
                if answered is not None and sender is not None:
                    request = IpcBusRequest(client, sender.id, frame.rid, channel, answered)
                ports = None
                if kinds is not None:  # duplicates for all but the last taker, who gets ours
                    if i == len(takers) - 1:
                        given, fds = fds, []
                        ports = _ports(given, kinds, dup=False)
                    else:
                        ports = _ports(fds, kinds, dup=True)
                event = IpcBusEvent(channel, sender, request, ports)
                for listener in listeners:
                    # Whatever a listener raises, SystemExit and KeyboardInterrupt included,
                    # is logged and goes no further: listeners run on an I/O thread of the
                    # connection, which the other clients and threads of the process share.
                    try:
                        listener(event, *args)
                    except BaseException:
                        log.exception("listener %r of channel %r raised", listener, channel)
        finally:
            T.close_fds(fds)  # descriptors no listener took

    def _refuse_request(self, frame: P.Frame) -> None:
        with self.lock:
            any_client = next(iter(self.clients.values()), None)
        if any_client is None or frame.sender_id is None:
            return
        try:
            any_client._send_frame(Kind.REQUEST_FAIL, frame.channel, frame.sender_id, frame.rid,
                                   P.pack_payload(f"no listener for {frame.channel!r}"))
        except IpcBusError:
            pass

    def on_dispatch_thread(self) -> bool:
        return threading.get_ident() == self.dispatch_owner

    # -- requests --------------------------------------------------------------------------
    def add_pending(self, key: tuple[str, int], pending: _Pending) -> None:
        with self.lock:
            if self.closed:
                raise IpcBusConnectionError(
                    f"the bus connection has closed: {self.close_reason}")
            self.pending[key] = pending

    def expire(self, key: tuple[str, int], timeout: float) -> None:
        with self.lock:
            pending = self.pending.pop(key, None)
        if pending is None or pending.future.done():
            return
        response = IpcBusRequestResponse(IpcBusEvent(pending.channel, None),
                                         err=f"timed out after {timeout:g} s")
        _set(pending.future, exc=IpcBusRequestTimeoutError(
            f"request on {pending.channel!r} timed out after {timeout:g} s", response))
        try:
            pending.client._send_frame(Kind.CANCEL, pending.channel, None, key[1], b"")
        except IpcBusError:
            pass

    def wait(self, future: concurrent.futures.Future[Any]) -> Any:
        """Wait for a future. A listener keeps dispatching meanwhile (nested dispatch); any
        other caller reads the socket itself while no one else does, so that its answer
        needs no hand-off between threads."""
        if not future.done():
            if self.on_dispatch_thread():
                self._nested_wait(future)
            else:
                self._caller_wait(future)
        return future.result()

    def _caller_wait(self, future: concurrent.futures.Future[Any] | _SyncAnswer,
                     self_reader: bool = False, deadline: float | None = None) -> None:
        """Read until ``future`` is done if no one else reads, else wait for the reader to
        hand the answer over; give up at ``deadline`` (time.monotonic()), if any.
        ``self_reader``: the caller counted itself in ``self_readers`` (see
        :meth:`request`); the count is given back here, before any hand-off wait, so that
        the I/O threads read again."""
        cls = future.__class__
        try:
            if ((cls is _SyncAnswer or cls is _AnswerFuture) and not future.done()
                    and not self.reader_done.is_set() and not self.over_budget
                    and self.read_role.acquire(False)):
                held = True  # the read role: given up on every path, an interrupt's too
                try:
                    poll = self.poller.poll
                    spin_end = self.caller_spin.until(time.perf_counter())
                    while not future.done() and not self.over_budget:
                        wait_ms = _READ_WAIT_MS
                        if deadline is not None:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                break
                            wait_ms = min(_READ_WAIT_MS, int(left * 1000) + 1)
                        if spin_end:  # see SPIN_WAIT
                            ready = self._spin_for_data(spin_end)
                            self.caller_spin.outcome(ready)
                            spin_end = 0.0
                            if ready:
                                wait_ms = -1  # readable: no need to ask again
                        if wait_ms >= 0 and not self.got and not poll(wait_ms):
                            continue
                        read = self._read_or_end()
                        if read is None:
                            held = False  # released by _read_or_end
                            return
                        if read[0]:
                            self._enqueue((read[0], read[1]), read[1])
                            self._ensure_dispatcher()  # listeners never on a caller's thread
                    if self_reader:
                        self_reader = False
                        self._leave_self_read()
                finally:
                    if held:
                        self._give_up_role()
        finally:
            if self_reader:
                self._leave_self_read()
        if not future.done():
            with self.qlock:
                self.sync_waiters += 1
            try:
                if isinstance(future, _SyncAnswer):
                    future.wait(None if deadline is None
                                else max(0.0, deadline - time.monotonic()))
                else:
                    future.exception()  # waits; the result or error is taken by wait()
            except concurrent.futures.CancelledError:
                pass
            finally:
                with self.qlock:
                    self.sync_waiters -= 1

    def _enter_self_read(self) -> None:
        """A caller is about to send a request and read its answer itself: the I/O threads
        leave the socket alone meanwhile, so that they do not take the answer from under it
        (each such hand-off costs a thread wake-up)."""
        with self.qlock:
            self.self_readers += 1

    def _leave_self_read(self) -> None:
        with self.qlock:
            self.self_readers -= 1
            wake = not self.self_readers and self.deep_parked and not self.pollers
        if wake:
            self.kick.set()

    def request(self, client: IpcBusClient, kind: int, channel: str, target: str | None,
                timeout: float | None, body: P.Body) -> Any:
        """A blocking request from ``client``. The caller reads its answer itself when no
        one else is reading, and watches its own timeout (no Future, no timer: each costs
        microseconds on every request). A listener's request dispatches while it waits
        instead (:meth:`wait`)."""
        if self.on_dispatch_thread():
            return self.wait(client._start_request(kind, channel, target, timeout, body))
        answer = _SyncAnswer()
        pending = _Pending(client, channel, answer)
        peer_id = client._peer_id
        assert peer_id is not None
        key = (peer_id, next(_rids))
        deadline = time.monotonic() + timeout if timeout is not None else None
        self._enter_self_read()
        try:
            self.add_pending(key, pending)
            client._write(self, kind, channel, target, key[1], body)
        except BaseException as exc:
            self._leave_self_read()
            self.abandon(client, key, channel, cancel=not isinstance(exc, Exception))
            raise
        try:
            self._caller_wait(answer, self_reader=True, deadline=deadline)
            if not answer.done():
                assert timeout is not None
                self.expire(key, timeout)
                answer.wait(None)  # set by expire(), or by whoever took the entry just before
        except BaseException:  # an interrupt (Ctrl-C): this request is given up
            self.abandon(client, key, channel, cancel=True)
            raise
        return answer.result()

    def abandon(self, client: IpcBusClient, key: tuple[str, int], channel: str,
                cancel: bool) -> None:
        """Forget a request whose caller gave up (an interrupt, or its frame could not be
        written); ``cancel``: its frame may have gone out, tell the receivers (best effort).
        An answer that comes later is dropped."""
        with self.lock:
            pending = self.pending.pop(key, None)
        if pending is None:
            return  # answered (or failed) meanwhile
        if pending.timeout is not None:
            self.timer.cancel(pending.timeout)
        if cancel:
            try:
                client._write(self, Kind.CANCEL, channel, None, key[1], b"")
            except Exception:
                pass

    def _nested_wait(self, future: concurrent.futures.Future[Any]) -> None:
        """On the dispatch thread: run what arrives meanwhile, and read if no one does."""
        def wake(_: Any) -> None:
            with self.cond:
                self.cond.notify_all()

        future.add_done_callback(wake)
        while not future.done() and not self.dispatch_done.is_set():
            if self.dispatch_q:
                self._run_queued(future)
                continue
            if not (self.reader_done.is_set() or self.over_budget) \
                    and self.read_role.acquire(False):
                if self.got or self.poller.poll(_READ_WAIT_MS):
                    read = self._read_or_end()
                    if read is None:
                        continue
                    if read[0]:
                        self._enqueue((read[0], read[1]), read[1])
                self._give_up_role()
                continue
            with self.cond:
                self.nested_waiting += 1
                try:
                    if not self.dispatch_q and not future.done():
                        self.cond.wait(_POLL * 10)
                finally:
                    self.nested_waiting -= 1

    # -- closing -----------------------------------------------------------------------------
    def close(self, timeout: float | None) -> None:
        """Graceful end: no more writes, let the bus read everything, wait for its EOF."""
        with self.send_lock:
            if self.out:
                try:
                    self._flush_locked()
                except OSError:
                    pass
            self.transport.shutdown_write()
        self.flush_wanted.set()  # let the flusher see the end
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
        try:
            fd = self.transport.sock.detach()
            os.close(fd)
        except OSError:
            pass


_send_whole = T.send_whole  # see there: a frame is written whole even when interrupted
_get_ident = threading.get_ident


def _raise_left() -> None:
    raise IpcBusConnectionError("the client was closed")


def _leave_if_joined(conn: _Connection, member: _Membership,
                     future: concurrent.futures.Future[Any]) -> None:
    """A ``connect()`` was interrupted before the hub answered its PEER_ADD: if the answer
    is yes, leave (the peer would otherwise stay on the bus until the connection ends)."""
    if future.cancelled() or future.exception() is not None:
        member.left = True
    else:
        _leave(conn, member)


def _leave(conn: _Connection, member: _Membership) -> None:
    try:
        conn.leave(member)
    except IpcBusError:
        member.left = True


def _ports(fds: list[int], kinds: list[str], dup: bool) -> list[Any]:
    """Received descriptors as the kinds of handle the sender posted: duplicates of ``fds``
    (``dup``), or ``fds`` themselves, which this call then owns (closed if it fails)."""
    own = T.dup_fds(fds) if dup else list(fds)
    ports: list[Any] = []
    try:
        for fd, kind in zip(own, kinds):
            ports.append(T.port_from_descriptor(fd, kind))
        return ports
    except BaseException:
        for port in ports:
            if isinstance(port, int):
                T.close_fds([port])
            else:
                port.close()
        T.close_fds(own[len(ports) + 1:])  # port_from_descriptor closed the failing one
        raise


def _cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _set(future: concurrent.futures.Future[Any] | _SyncAnswer, *, result: Any = None,
         exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by the user meanwhile


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for conn in list(_connections.values()):
        conn.after_fork_in_child()
    _connections.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_connection(key: Any, make_socket: Callable[[], socket.socket], *, tcp: bool,
                     ptype: str, timeout: float, authkey: bytes | None,
                     socket_buffer: int | None) -> _Connection:
    """The process's connection for ``key``: the existing one, or a new one (handshake done)."""
    with _registry_lock:
        conn = _connections.get(key)
        if conn is not None and not conn.closed:
            return conn
        sock = make_socket()
        T.tune_socket(sock)
        try:
            transport, decoder, welcome = T.client_handshake(
                sock, tcp=tcp, authkey=authkey, timeout=timeout)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        coalesce = DEFAULT_SOCKET_BUFFER if socket_buffer is None else socket_buffer
        decoder.merge_runs = True
        conn = _Connection(key, transport, decoder, welcome, ptype, coalesce)
        # Run at interpreter exit and by multiprocessing's own exit path in its children
        # (which skips atexit): a burst sent just before the end still goes out.
        conn.exit_flush = multiprocessing.util.Finalize(conn, conn.flush_at_exit,
                                                        exitpriority=10)
        _connections[key] = conn
        conn.start()
        return conn


def _pipe_socket(pipe: multiprocessing.connection.Connection) -> Callable[[], socket.socket]:
    def make() -> socket.socket:
        if pipe.closed:
            raise IpcBusConnectionError("this Connection is closed (a client that connected"
                                        " with it took it over; connect() with no address"
                                        " joins the same bus)")
        sock = socket.socket(fileno=os.dup(pipe.fileno()))
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise IpcBusConnectionError("not a bridge pipe: use IpcBusBridge.open_pipe()")
        pipe.close()  # the client owns the pipe from now on
        return sock
    return make


def _resolve(address: Any, path: str | None, port: int | None, host: str | None,
             timeout: float, authkey: bytes | None
             ) -> tuple[Any, Callable[[], socket.socket], bool, str]:
    """(registry key, socket maker, tcp, peer type) for the arguments of ``connect()``."""
    if isinstance(address, multiprocessing.connection.Connection):
        return ("pipe", address), _pipe_socket(address), False, "pipe"
    if address is None and path is None and port is None:
        bridge = bridge_of_this_process()
        if bridge is not None:
            return ("bridge", bridge), bridge.attach_local, False, "main"
        with _registry_lock:
            for key, conn in _connections.items():
                if conn.ptype == "pipe" and not conn.closed:
                    return key, _no_socket, False, "pipe"  # the pipe this process joined with
    addr = T.parse_address(address, path=path, port=port, host=host)
    tcp = T.is_tcp(addr)
    # A TCP connection is shared only by clients that proved the same key.
    key = (addr, authkey if authkey is not None else T.default_authkey()) if tcp else addr
    return key, lambda: T.connect_socket(addr, timeout), tcp, "socket"


def _no_socket() -> socket.socket:
    raise IpcBusConnectionError("the pipe connection of this process has closed")


# -- the client ------------------------------------------------------------------------------
_rids = itertools.count(1)


class IpcBusClient(Emitter[str]):
    """A peer on the bus: an EventEmitter of channels whose events come from other processes.

    Every method may be called from any thread. Listeners are called as
    ``listener(event, *args)`` on the connection's dispatch thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conn: _Connection | None = None
        self._peer: IpcBusPeer | None = None
        self._peer_id: str | None = None
        self._spy_handler: Callable[[P.Frame], None] | None = None
        self._member = _NOT_JOINED  # who our frames say we are; see _Membership
        self._closed_handlers = Callbacks()
        self._closed_fired = False
        self._fire_lock = threading.Lock()
        self._state_lock = threading.Lock()  # connect/close; never taken by the dispatch thread

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
                authkey: bytes | None = None) -> Self:
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
          how long connecting, the TCP authentication and the handshake may take.
        - ``socket_buffer`` (int, bytes; default None = 64 KiB; 0 writes every message on its
          own): the write-coalescing buffer of a new connection. Sends that follow each other
          within 50 µs are written together; a lone send is written at once, and requests,
          answers and control frames are never held back.
        - ``authkey`` (bytes; default None = ``$IPCBUS_AUTHKEY`` if set, else
          ``multiprocessing.current_process().authkey``): the key a TCP broker expects.

        Raises ``ValueError``/``TypeError`` for bad arguments (e.g. a path over 107 bytes), and
        :class:`~ipcbus.IpcBusConnectionError` when there is no bus at the address, the key is
        wrong, the handshake times out or the client is already connected.
        """
        joined = _schemes.join(self, address, path, port, dict(  # e.g. "ecipc:...": Node's bus
            host=host, peer_name=peer_name, timeout=timeout, socket_buffer=socket_buffer,
            authkey=authkey))
        if joined is not None:
            return joined  # type: ignore[no-any-return]
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
        wait = resolve_timeout(timeout)
        with self._state_lock:
            if self._conn is not None and not self._conn.closed:
                raise IpcBusConnectionError("this client is already connected")
            limit = wait if wait is not None else 3600.0
            key, make_socket, tcp, ptype = _resolve(
                address, path, port, host, limit,
                bytes(authkey) if authkey is not None else None)
            conn = _open_connection(key, make_socket, tcp=tcp, ptype=ptype, timeout=limit,
                                    authkey=bytes(authkey) if authkey is not None else None,
                                    socket_buffer=socket_buffer)
            name = peer_name if peer_name is not None else \
                f"{_process_name()}-{os.getpid()}"
            if P.check_peer_name(name) is not None:  # a process name the hub would refuse
                name = f"process-{os.getpid()}"
            peer_id = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
            info = [peer_id, name, conn.ptype, os.getpid()]
            self._join(conn, info, wait)
        return self

    def _join(self, conn: _Connection, info: list[Any], wait: float | None) -> None:
        """PEER_ADD, and once the hub has answered it (never before: through a linked bridge
        the peer exists only then), SUBSCRIBE for the listeners added before ``connect()``.
        The answer may carry the hub's record of this peer (``{"pid": ..., "peer": [id,
        name, type, pid]}``): every later frame carries exactly that."""
        member = self._member = _Membership(info)
        self._set_peer(info)
        self._closed_fired = False
        with conn.lock:
            conn.clients[info[0]] = self
            conn.client_list = tuple(conn.clients.values())
        future: _AnswerFuture | None = _AnswerFuture()
        try:
            try:
                self._start_request(Kind.PEER_ADD, "", None, wait, b"", conn=conn,
                                    future=future)
            except Exception:
                future = None  # not written
                raise
            assert future is not None
            response = conn.wait(future)
            self._adopt(conn, member, response.payload)
            with self._lock:  # ordered with _first_listener/_last_listener
                self._conn = conn  # joined: sends and subscriptions go out from now on
                for channel in self._listeners:
                    self._write(conn, Kind.SUBSCRIBE, channel, None, 1, b"")
        except BaseException as exc:
            self._conn = None
            with conn.lock:
                if conn.clients.get(self._peer_id or "") is self:
                    del conn.clients[self._peer_id or ""]
                conn.client_list = tuple(conn.clients.values())
            if future is None or (future.done() and future.exception() is not None):
                member.left = True  # never joined (or PEER_ADD not known to be written)
            elif future.done():
                _leave(conn, member)  # joined, but what followed failed
            else:  # interrupted while the hub decides: leave if it says yes
                future.add_done_callback(lambda f: _leave_if_joined(conn, member, f))
            self._peer = None
            if isinstance(exc, IpcBusRequestError):
                raise IpcBusConnectionError(f"the bus refused this peer: {exc}") from None
            raise

    def _set_peer(self, info: list[Any]) -> None:
        self._peer_id = info[0]
        self._peer = IpcBusPeer(info[0], info[1], IpcBusProcess(info[2], info[3]))

    def _adopt(self, conn: _Connection, member: _Membership, payload: Any) -> None:
        """Take the hub's record of this peer, from the answer to PEER_ADD (an older hub
        answers with its pid only: the declared tuple stands)."""
        peer = payload.get("peer") if isinstance(payload, dict) else None
        if not (isinstance(peer, list) and len(peer) == 4 and isinstance(peer[0], str)
                and peer[0] and isinstance(peer[1], str) and isinstance(peer[2], str)
                and isinstance(peer[3], int)) or peer == member.info:
            return
        old = self._peer_id
        with conn.lock:
            if conn.clients.get(old or "") is self:
                del conn.clients[old or ""]
            conn.clients[peer[0]] = self
            conn.client_list = tuple(conn.clients.values())
        member.info = list(peer)
        member.headers.clear()
        self._set_peer(member.info)

    def close(self, timeout: float | None = None) -> None:
        """Leave the bus: what was sent is delivered, pending requests fail. Idempotent."""
        wait = resolve_timeout(timeout)
        interrupted: BaseException | None = None
        with self._state_lock:
            conn = self._conn
            if conn is None:
                return
            self._conn = None
            while True:  # every step may run again: an interrupt is raised once all are done
                try:
                    ended = self._leave_connection(conn, wait)
                    break
                except Exception:
                    raise
                except BaseException as exc:  # Ctrl-C: the client is closed all the same
                    interrupted = interrupted or exc
        if ended:
            self._connection_ended(conn)
        if interrupted is not None:
            raise interrupted

    def _leave_connection(self, conn: _Connection, wait: float | None) -> bool:
        """The steps of :meth:`close`, each of which may be run again; False if the
        connection is not this process's."""
        member = self._member
        if conn.pid != os.getpid() or conn.forked:
            member.left = True
            return False
        with conn.lock:
            if conn.clients.get(self._peer_id or "") is self:
                del conn.clients[self._peer_id or ""]
            conn.client_list = tuple(conn.clients.values())
            last = not conn.clients
            mine = [k for k, p in conn.pending.items() if p.client is self]
            pending = [conn.pending.pop(k) for k in mine]
        for p in pending:
            _set(p.future, exc=IpcBusConnectionError(
                f"request on {p.channel!r} failed: the client was closed"))
        # Sends racing with this close from other threads are written before the
        # PEER_REMOVE (and routed), or raise IpcBusConnectionError: never after it.
        _leave(conn, member)
        if last:
            with _registry_lock:
                if _connections.get(conn.key) is conn:
                    del _connections[conn.key]
            conn.close(wait)
        return True

    def on_closed(self, handler: Callable[[], None]) -> Self:
        """Call ``handler()`` (on the dispatch thread) when this client's connection ends."""
        self._closed_handlers.add(handler)
        return self

    def off_closed(self, handler: Callable[[], None]) -> Self:
        """Forget a handler given to :meth:`on_closed`."""
        self._closed_handlers.remove(handler)
        return self

    def _connection_ended(self, conn: _Connection) -> None:
        with self._fire_lock:  # never held while waiting: safe from the dispatch thread
            if self._closed_fired:
                return
            self._closed_fired = True
        # self._conn stays: later calls then raise IpcBusConnectionError with the reason

        def fire() -> None:
            for handler in self._closed_handlers.snapshot():
                try:
                    handler()
                except BaseException:  # like a listener's (see _dispatch_frame)
                    log.exception("on_closed handler %r raised", handler)

        if conn.on_dispatch_thread() or conn.dispatch_done.is_set():
            fire()
        else:
            conn.call_soon(fire)

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
        conn.write_surely(_PREFIX_PACK(len(header), 0, count) + header, member)

    # -- sending -----------------------------------------------------------------------------
    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise IpcBusConnectionError("the client is not connected")
        conn.check_usable()
        return conn

    def _write(self, conn: _Connection, kind: int, channel: str, target: str | None, rid: int,
               body: P.Body, fds: list[int] | None = None,
               member: _Membership | None = None) -> None:
        if member is None:
            member = self._member  # one membership throughout: see _Membership
        size = len(body) if body.__class__ is bytes else P.body_size(body)
        if size > conn.max_message:
            raise ValueError(f"message of {size} bytes exceeds the bus limit of"
                             f" {conn.max_message} bytes")
        if fds:
            header = P.encode_header(kind, channel, member.info, target, len(fds))
        else:
            key = (kind, channel, target)
            headers = member.headers
            header = headers.get(key)  # type: ignore[assignment]
            if header is None:
                header = P.encode_header(kind, channel, member.info, target)
                if len(headers) >= 1024:
                    headers.clear()
                headers[key] = header
        prefix = _PREFIX_PACK(len(header), size, rid)
        if body.__class__ is not bytes:  # large arguments, written in place
            conn.write([prefix + header, *body], fds, True, member)
        elif fds or size > _COALESCE_FRAME:
            conn.write([prefix + header, body], fds, True, member)
        elif kind == _SEND or kind == _SEND_TO:
            conn.write_burst(prefix + header + body, member)
        else:
            conn.write_now(prefix + header + body, member)

    def _pack_answer(self, resolved: bool, value: Any) -> P.Body:
        """The body of an answer (for :class:`IpcBusRequest`); raises if it cannot be sent."""
        return P.pack_args([resolved, value])

    def _send_answer(self, channel: str, requester: str, rid: int, body: P.Body,
                     member: _Membership) -> None:
        """Send an answer (for :class:`IpcBusRequest`), in the name of ``member``."""
        conn = self._connection()
        self._write(conn, _RESPONSE, channel, requester, rid, body, None, member)
        conn.answered_at = time.perf_counter()

    def _send_frame(self, kind: int, channel: str, target: str | None, rid: int,
                    body: P.Body) -> None:
        self._write(self._connection(), kind, channel, target, rid, body)

    def send(self, channel: str, *args: Any) -> None:
        """Broadcast ``args`` to every listener of ``channel`` on the bus (ours included)."""
        if channel not in _valid_channels:
            _remember_channel(channel)
        self._write(self._connection(), _SEND, channel, None, 0, P.pack_args(args))

    def send_to(self, target: IpcBusPeer | str, channel: str, *args: Any) -> None:
        """Send ``args`` to the listeners of ``channel`` of one peer only."""
        target_id = _target_id(target)
        if channel not in _valid_channels:
            _remember_channel(channel)
        self._send_frame(Kind.SEND_TO, channel, target_id, 0, P.pack_args(args))

    def request(self, channel: str, timeout: float | None, *args: Any) -> IpcBusRequestResponse:
        """Ask every listener of ``channel``; return the first answer, or raise
        :class:`IpcBusRequestError` (rejected, no listener, timed out)."""
        if channel not in _valid_channels:
            _remember_channel(channel, _HUB_QUERIES)
        timeout = resolve_timeout(timeout)
        body = P.pack_args(args)
        return self._connection().request(  # type: ignore[no-any-return]
            self, _REQUEST, channel, None, timeout, body)

    def request_to(self, target: IpcBusPeer | str, channel: str, timeout: float | None,
                   *args: Any) -> IpcBusRequestResponse:
        """Like :meth:`request`, to the listeners of one peer only."""
        target_id = _target_id(target)
        if channel not in _valid_channels:
            _remember_channel(channel, _HUB_QUERIES)
        timeout = resolve_timeout(timeout)
        body = P.pack_args(args)
        return self._connection().request(  # type: ignore[no-any-return]
            self, _REQUEST, channel, target_id, timeout, body)

    def _wait(self, future: concurrent.futures.Future[Any]) -> IpcBusRequestResponse:
        conn = self._conn
        result = conn.wait(future) if conn is not None else future.result()
        return result  # type: ignore[no-any-return]

    def request_async(self, channel: str, timeout: float | None, *args: Any
                      ) -> concurrent.futures.Future[IpcBusRequestResponse]:
        """Start a request; the Future gets the response or the IpcBusRequestError."""
        if channel not in _valid_channels:
            _remember_channel(channel, _HUB_QUERIES)
        return self._start_request(Kind.REQUEST, channel, None, resolve_timeout(timeout),
                                   P.pack_args(args))

    def _start_request(self, kind: int, channel: str, target: str | None,
                       timeout: float | None, body: P.Body, fds: list[int] | None = None,
                       conn: _Connection | None = None, future: _AnswerFuture | None = None
                       ) -> concurrent.futures.Future[Any]:
        if conn is None:
            conn = self._connection()
        assert self._peer_id is not None
        rid = next(_rids)
        key = (self._peer_id, rid)
        if future is None:
            future = _AnswerFuture()
        pending = _Pending(self, channel, future)
        if timeout is not None:  # armed first: the answer may come before _write returns
            pending.timeout = conn.timer.call_at(time.monotonic() + timeout,
                                                 lambda: conn.expire(key, timeout))
        try:
            conn.add_pending(key, pending)
            self._write(conn, kind, channel, target, rid, body, fds)
        except BaseException as exc:
            if isinstance(exc, Exception):  # not written
                conn.abandon(self, key, channel, cancel=False)
            elif kind != Kind.PEER_ADD:  # an interrupt, once the frame went out: cancel it
                conn.abandon(self, key, channel, cancel=True)
            # (an interrupted PEER_ADD stays pending: see _join)
            raise
        return future

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

    def _post(self, kind: int, channel: str, target: str | None, message: Any,
              ports: list[Any] | None) -> None:
        if ports is None:
            ports = []  # no handles: still routed and acknowledged (no listener raises)
        if not isinstance(ports, (list, tuple)):
            raise TypeError(f"ports must be a list, not {type(ports).__name__}")
        conn = self._connection()
        limit = min(int(conn.welcome.get("max_fds", P.DEFAULT_MAX_FDS)), P.MAX_FDS)
        if len(ports) > limit:
            raise ValueError(f"{len(ports)} ports in one message; the bus takes at most {limit}")
        described = [T.port_descriptor(port) for port in ports]
        body = P.pack_payload([[message], [kind_ for _, kind_ in described]] if ports
                              else [message])
        if ports and not conn.can_pass_fds:
            raise IpcBusConnectionError("this bus connection (TCP) cannot carry descriptors;"
                                        " nothing was sent")
        future = self._start_request(kind, channel, target, resolve_timeout(None), body,
                                     [fd for fd, _ in described])
        try:
            self._wait(future)
        except IpcBusRequestError as exc:
            if isinstance(exc, IpcBusRequestTimeoutError):
                raise
            err = exc.response.err if exc.response is not None else str(exc)
            raise IpcBusRequestError(f"post_message on {channel!r} failed: {err}",
                                     exc.response) from None

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
        return self._connection().request(  # type: ignore[no-any-return]
            self, _REQUEST, channel, None, resolve_timeout(timeout), P.pack_args(args))

    def _request_async_reserved(self, channel: str, timeout: float | None, *args: Any
                                ) -> concurrent.futures.Future[IpcBusRequestResponse]:
        """:meth:`request_async` on any valid channel, reserved ones included."""
        P.check_channel(channel)
        return self._start_request(Kind.REQUEST, channel, None, resolve_timeout(timeout),
                                   P.pack_args(args))

    def _register_service(self, name: str, timeout: float | None) -> None:
        """Claim ``name`` on the bus; IpcBusRequestError if another peer has started it."""
        self._wait(self._start_request(Kind.SERVICE_ADD, P.check_channel(name), None,
                                       resolve_timeout(timeout), b""))

    def _start_spy(self, pattern: str, handler: Callable[[P.Frame], None],
                   timeout: float | None) -> None:
        """Ask the router for copies of the traffic on channels matching ``pattern``."""
        self._spy_handler = handler
        self._wait(self._start_request(Kind.SPY_ADD, pattern, None, resolve_timeout(timeout),
                                       b""))

    def _unregister_service(self, name: str) -> None:
        self._send_frame(Kind.SERVICE_REMOVE, P.check_channel(name), None, 0, b"")

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


def _target_id(target: object) -> str:
    if isinstance(target, IpcBusPeer):
        return target.id
    if isinstance(target, str) and target:
        return target
    raise TypeError(f"target must be an IpcBusPeer or a peer id, not {target!r}")


def _process_name() -> str:
    return multiprocessing.current_process().name

