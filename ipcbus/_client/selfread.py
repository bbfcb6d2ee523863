"""A blocking caller reading its own answer (the inbox's "self-read", one switch).

On a small VM every hand-off between threads costs a thread wake-up, once per hop of a round
trip. A caller blocked on a request (any thread but the dispatcher) that finds the reader's
role free takes it and reads the socket itself until its answer comes: it polls the socket
for up to ``SPIN_WAIT`` seconds (yielding the CPU between looks), then sleeps in ``poll``; it
settles answers (its own included) and queues messages for the listeners, which it never
runs. Meanwhile the I/O threads leave the socket alone (see ``inbox.py``).

``IPCBUS_SELF_READ=0`` turns it off (callers then sleep on their answer, which the reader
thread settles); ``IPCBUS_SPIN_US`` sets the poll (microseconds, default 200; 0: none; none
in a process that may run on one CPU only). The figures that keep it are in
docs/performance.md.

Interrupts: in the main thread the read keeps its raw result in C code (``T.recv_kept``,
into the connection's ``got``), so bytes read before an interrupt are decoded by the next
reader; an interrupt between taking that result and decoding it, or while frames already
decoded are handled, may still lose those frames (not seen in 10 000 tries).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Protocol

from .answers import SyncAnswer
from .inbox import Inbox

log = logging.getLogger("ipcbus")

__all__ = ["SELF_READ", "SPIN_WAIT", "read_own_answer"]

_READ_WAIT_MS = 10  # a caller reading for its answer looks at its deadline this often


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


SELF_READ = os.environ.get("IPCBUS_SELF_READ", "1") != "0"
SPIN_WAIT = _spin_setting()


class Reading(Protocol):
    """What a reading caller needs of its connection."""

    inbox: Inbox
    cond: threading.Condition
    got: list[Any]

    def poll(self, timeout_ms: int) -> bool: ...

    def _read_once(self) -> tuple[list[Any], int]: ...

    def _lost(self, exc: BaseException) -> None: ...


def read_own_answer(conn: Reading, answer: SyncAnswer, deadline: float | None) -> None:
    """For a caller counted by ``Inbox.caller_begins``: read until ``answer`` is set, the
    deadline (time.monotonic()) passes or reading must stop, if the reader's role is free;
    else return at once (the caller then sleeps on its answer)."""
    inbox = conn.inbox
    try:
        with conn.cond:
            if not inbox.lend(answer):
                return
        _read_until(conn, answer, deadline)
    except Exception as exc:  # the end of the connection (an interrupt propagates)
        conn._lost(exc)
    finally:  # the role is given back on every path (an interrupt's too)
        with conn.cond:
            if inbox.give_back(answer, answer.done()):
                conn.cond.notify_all()  # an I/O thread reads from now on


def _read_until(conn: Reading, answer: SyncAnswer, deadline: float | None) -> None:
    inbox = conn.inbox
    spin_end = time.perf_counter() + SPIN_WAIT if SPIN_WAIT else 0.0
    while not answer.done() and inbox.may_read and not inbox.ended:
        wait_ms = _READ_WAIT_MS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait_ms = min(_READ_WAIT_MS, int(left * 1000) + 1)
        if spin_end:
            if _spin(lambda: bool(conn.got) or conn.poll(0), spin_end):
                wait_ms = 0
            spin_end = 0.0
        if not conn.got and not conn.poll(wait_ms):
            continue
        batch, size = conn._read_once()
        if batch:
            with conn.cond:
                inbox.put(batch, size)
                conn.cond.notify_all()  # an I/O thread dispatches them


def _spin(ready: Callable[[], bool], until: float) -> bool:
    """Poll ``ready()``, yielding the CPU between looks, until true or ``until``."""
    perf_counter, yield_ = time.perf_counter, os.sched_yield
    while not ready():
        if perf_counter() >= until:
            return False
        yield_()
    return True
