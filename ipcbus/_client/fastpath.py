"""The wake-free round trip: one unit, one switch (``IPCBUS_FAST_PATH``, on by default).

On a small VM a thread that sleeps takes tens of microseconds to wake, once per hop of a
round trip. With the fast path a request/response round trip through the bus costs no
thread wake-up in the requester's process nor in the responder's:

* **The caller reads its own answer.** A blocking ``request()`` (any thread but the
  dispatcher) counts itself as a *caller* before it sends (``Inbox.caller_begins``) and, if
  the reader's role is free, borrows it (``Inbox.lend``): once its request is written it
  reads the socket itself until its answer has come: it polls the socket for up to
  ``SPIN_WAIT`` (yielding the CPU between looks), then sleeps in ``poll`` (looking at its
  deadline every ``_READ_WAIT_MS``). It settles the answers it reads (its own included) and
  queues messages for the listeners, which it never runs. It gives the role back before it
  sleeps on its answer (deadline, budget) or once done (:class:`Seat`). Meanwhile, and for
  ``Inbox.give_way`` seconds after it got its answer, the I/O threads keep off the socket,
  so back-to-back requests keep it; if an I/O thread held the role, the caller sleeps on its
  answer, which that thread settles.
* **An I/O reader leaves the socket to the callers.** An I/O thread that has settled the
  answer of a blocking caller gives the reader's role up at once (its next request is then
  read by its caller), and so it does, between two reads, while a caller waits for its turn.
* **The responder stays awake.** A reader that runs what it read itself (the hand-over,
  ``inbox.py``) does not wake the other I/O thread, which looks for work every
  ``Inbox.give_way`` seconds while the bus is busy; once it has run the listener (and its
  process has answered), the same thread takes the reader's role again and polls the socket
  for up to ``SPIN_WAIT`` before it blocks in ``recv``: the next request finds it awake.
* Both polls are adaptive (:class:`Spin`): after two in a row that ran out without data, the
  next ``_SPIN_SKIP`` chances sleep at once. ``IPCBUS_SPIN_US`` sets ``SPIN_WAIT``
  (microseconds, default 200; 0: no poll); a process that may run on one CPU only never
  polls.

``IPCBUS_FAST_PATH=0``: callers sleep on their answer, which the reader thread settles, and
idle threads are woken at once when the reader's role is handed over.

Interrupts: a caller reading in the main thread keeps each read's raw result in C code
(``T.recv_kept``, into :attr:`FastPath.got`), so bytes read before an interrupt are decoded by
the next reader, whatever its thread; an interrupt between taking that result and decoding
it, or while frames already decoded are handled, may still lose those frames.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any, Protocol

from .. import _transport as T
from .answers import SyncAnswer
from .inbox import Inbox

log = logging.getLogger("ipcbus")

__all__ = ["FAST_PATH", "SPIN_WAIT", "FastPath", "Seat", "Spin", "read_own_answer"]

_READ_WAIT_MS = 10  # a caller reading for its answer looks at its deadline this often
_SPIN_SKIP = 100


def _spin_setting() -> float:
    value = os.environ.get("IPCBUS_SPIN_US", "")
    try:
        spin = max(0.0, float(value)) / 1e6 if value else 200e-6
    except ValueError:
        log.warning("IPCBUS_SPIN_US=%r is not a number of microseconds: using 200", value)
        spin = 200e-6
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return spin if cpus > 1 else 0.0


FAST_PATH = os.environ.get("IPCBUS_FAST_PATH", "1") != "0"
SPIN_WAIT = _spin_setting()


class Spin:
    """When to poll instead of sleeping, adaptively: after two polls in a row that ran out
    without data, the next ``_SPIN_SKIP`` chances sleep at once."""

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


class FastPath:
    """A connection's part of the fast path: the poller, the two polls, the kept read."""

    def __init__(self, transport: T.StreamTransport, enabled: bool = FAST_PATH) -> None:
        self.enabled = enabled
        self.transport = transport
        self.got: list[Any] = []  # a read's raw result an interrupt left behind
        self.main_ident = threading.main_thread().ident  # the thread signal handlers run in
        self._poll = select.poll()
        self._poll.register(transport.fileno(), select.POLLIN)
        spin = SPIN_WAIT if enabled else 0.0
        self.caller_spin = Spin(spin)  # a caller, right after it sent its request
        self.reader_spin = Spin(spin)  # an I/O reader, right after its process answered
        self.answered_at = 0.0  # perf_counter() of the last answer this process sent

    def readable(self, timeout_ms: int) -> bool:
        return bool(self.got) or bool(self._poll.poll(timeout_ms))

    def spin(self, until: float) -> bool:
        """Poll the socket, yielding the CPU between looks, until it is readable (True) or
        time.perf_counter() reaches ``until`` (False)."""
        poll, perf_counter, yield_ = self._poll.poll, time.perf_counter, os.sched_yield
        while not self.got and not poll(0):
            if perf_counter() >= until:
                return False
            yield_()
        return True

    def before_read(self) -> None:
        """An I/O reader, before a blocking read: if its process has just answered, poll a
        moment for the next request instead of sleeping in ``recv``."""
        at = self.answered_at
        if at:
            self.answered_at = 0.0
            until = self.reader_spin.until(at)
            if until > time.perf_counter():
                self.reader_spin.outcome(self.spin(until))

    def recv(self, buf: memoryview) -> tuple[int, list[int]]:
        """One read into ``buf``: (nbytes, fds). The main thread keeps the raw result where
        an interrupt cannot lose it (:attr:`got`); the next reader takes a kept one first."""
        got = self.got
        if got or threading.get_ident() == self.main_ident:
            if not got:
                T.recv_kept(self.transport, buf, got)
            return T.recv_result(got.pop())
        return self.transport.recv_into(buf)

    def drop(self) -> None:
        """The connection has ended: close the descriptors of a kept read."""
        for raw in self.got:
            try:
                T.close_fds(T.recv_result(raw)[1])
            except Exception:  # closed by recv_result
                pass
        self.got.clear()


class Reading(Protocol):
    """What a reading caller needs of its connection."""

    inbox: Inbox
    cond: threading.Condition
    fast: FastPath

    def _read_once(self) -> tuple[list[Any], int]: ...

    def _lost(self, exc: BaseException) -> None: ...


class Seat:
    """The blocking callers' side of the fast path on one connection."""

    def __init__(self, conn: Reading) -> None:
        self.conn = conn

    def begins(self, caller: SyncAnswer) -> None:
        """A blocking caller (``caller``: its answer) is about to send its request: it is
        counted, and borrows the reader's role now if it is free (one lock taken, not two)."""
        conn = self.conn
        inbox = conn.inbox
        if inbox.fast:
            with conn.cond:
                inbox.caller_begins(caller)
                inbox.lend(caller)

    def ends(self, caller: SyncAnswer) -> None:
        """...and is done with it, whatever the outcome (an interrupt's too): the role it
        borrowed is given back, its count too."""
        conn = self.conn
        inbox = conn.inbox
        if inbox.lent_to is caller or caller in inbox.callers:
            with conn.cond:
                if inbox.give_back(caller, caller.done()):
                    conn.cond.notify_all()  # an I/O thread reads from now on

    def read_own(self, answer: SyncAnswer, deadline: float | None) -> None:
        read_own_answer(self.conn, answer, deadline)


def read_own_answer(conn: Reading, answer: SyncAnswer, deadline: float | None) -> None:
    """For a caller that borrowed the reader's role (:meth:`Seat.begins`), its request
    sent: read until ``answer`` is set, the deadline (time.monotonic()) passes or reading
    must stop; else return at once (the caller then sleeps on its answer). Without its
    answer it gives the role back before it sleeps; else (and if interrupted)
    :meth:`Seat.ends` does."""
    inbox = conn.inbox
    if inbox.lent_to is not answer:
        return
    try:
        _read_until(conn, answer, deadline)
    except Exception as exc:  # the end of the connection (an interrupt propagates)
        conn._lost(exc)
    if not answer.done():  # it will sleep: someone else reads meanwhile
        with conn.cond:
            if inbox.give_back(answer, False):
                conn.cond.notify_all()


def _read_until(conn: Reading, answer: SyncAnswer, deadline: float | None) -> None:
    inbox, fast = conn.inbox, conn.fast
    spin_end = fast.caller_spin.until(time.perf_counter())
    while not answer.done() and inbox.may_read and not inbox.ended:
        wait_ms = _READ_WAIT_MS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait_ms = min(_READ_WAIT_MS, int(left * 1000) + 1)
        if spin_end:
            ready = fast.spin(spin_end)
            fast.caller_spin.outcome(ready)
            spin_end = 0.0
            if not ready and not fast.readable(wait_ms):
                continue
        elif not fast.readable(wait_ms):
            continue
        batch, size = conn._read_once()
        if batch:
            with conn.cond:
                inbox.put(batch, size)
                conn.cond.notify_all()  # an I/O thread dispatches them
