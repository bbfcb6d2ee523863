"""The client's read/dispatch scheduling, as decisions: who reads, who dispatches, the
dispatch queue and its budget.

Pure code with an injected clock; not thread-safe (the connection holds its condition's
lock around every call). A connection has two I/O threads and two *roles*: the *reader*
reads the socket and puts what it read here; the *dispatcher* takes items out, in order, and
runs the listeners. Each role has at most one holder; an idle I/O thread asks
:meth:`Inbox.next_role`. The rules, in one place:

* **Who does what next.** An idle thread takes the dispatcher's role if items wait and no
  one dispatches, else the reader's if no one reads and reading is allowed, else it sleeps.
  The reader keeps its role while it reads; the dispatcher gives its role up when the queue
  is empty.
* **Hand-over** (``hand_over``, the one switch): a reader that has read messages while no
  one dispatches and nothing is queued runs them itself at once, holding the dispatcher's
  role, and gives the reader's role to the other thread (:meth:`read_done`). The message
  then needs no hand-off between threads (each costs a thread wake-up; the figures are in
  docs/performance.md), and a listener that blocks still holds up no answer: the other thread
  reads meanwhile. Off: one thread reads, the other dispatches.
* **Order.** Items (a batch of frames, or a callable of ``call_soon``) come out in the order
  they were put, one at a time; a batch is run by the reader that read it only when nothing
  is queued before it; a nested wait (a listener's request, by the dispatcher) takes items
  from the same queue, so the order holds across nesting.
* **When reading stops.** Bytes of frames queued and not dispatched yet are counted. Past
  ``budget`` the reader gives its role up (the hub then holds the senders: back-pressure,
  and a stuck listener becomes a "slow consumer" there instead of unbounded memory here);
  someone reads again once the dispatcher has brought the count down to half the budget
  (:meth:`release` says so). Answers wait for reading too, so a request made in a listener
  keeps dispatching while it waits, which drains the queue. Once the connection is closing,
  reading never stops again (the end of the stream must be seen); once the stream has
  ended, no one reads again.
* **When a nested wait dispatches.** While the awaited answer has not come, a waiter holding
  the dispatcher's role takes the next item like the dispatcher does; it sleeps only when
  the queue is empty (keeping the role), and stops taking items once its answer has come.
* **When the connection is idle.** After ``idle`` seconds with an empty queue, an idle
  thread is told once (:meth:`went_idle`): the connection lets its large receive buffer go.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable

__all__ = ["Inbox"]


class Inbox:
    """The dispatch queue of one connection (``clock``: seconds, monotonic)."""

    def __init__(self, budget: int, idle: float, *, hand_over: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.idle = idle
        self.hand_over = hand_over
        self.reading = False  # a thread holds the reader's role
        self.dispatching = False  # a thread holds the dispatcher's role
        self.ended = False  # the stream has ended: no one reads again
        self._clock = clock
        self._q: collections.deque[tuple[Any, int]] = collections.deque()
        self.queued_bytes = 0
        self.over_budget = False  # reading stopped until queued_bytes <= budget // 2
        self.closing = False
        self._empty_since: float | None = clock()  # None: busy, or idleness already told

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Any, size: int = 0) -> None:
        """Queue ``item`` (``size``: bytes it counts against the budget)."""
        self._q.append((item, size))
        if size:
            self.queued_bytes += size
            if self.queued_bytes > self.budget:
                self.over_budget = True
        self._empty_since = None

    def put_back(self, item: Any, size: int = 0) -> None:
        """Return an item just taken to the head of the queue (its bytes still counted)."""
        self._q.appendleft((item, size))
        self._empty_since = None

    def take(self) -> tuple[Any, int] | None:
        """The next item and its size, or None when the queue is empty. Its bytes stay
        counted until :meth:`release` (the listeners still hold them)."""
        if not self._q:
            return None
        return self._q.popleft()

    def release(self, size: int) -> bool:
        """An item of ``size`` bytes was dispatched; True if reading may resume now."""
        if not size:
            return False
        self.queued_bytes -= size
        if self.over_budget and self.queued_bytes <= self.budget // 2:
            self.over_budget = False
            return True
        return False

    @property
    def may_read(self) -> bool:
        """Whether the reader may read now (see "When reading stops")."""
        return self.closing or not self.over_budget

    def close(self) -> bool:
        """The connection is closing: reading never stops again. True if it had stopped."""
        was = not self.may_read
        self.closing = True
        return was

    # -- roles ------------------------------------------------------------------------------
    def next_role(self) -> str | None:
        """For an idle I/O thread: ``"dispatch"`` (it now holds that role), ``"read"`` (the
        same), or None: sleep until notified (or :meth:`wait_timeout`)."""
        if self._q and not self.dispatching:
            self.dispatching = True
            return "dispatch"
        if not self.reading and not self.ended and self.may_read:
            self.reading = True
            return "read"
        return None

    def read_done(self, item: Any, size: int) -> bool:
        """The reader has read ``item`` (``size`` bytes): True if it runs it itself now (it
        holds the dispatcher's role instead of the reader's; its bytes count until
        :meth:`release`), False if it was queued (it reads on while :attr:`may_read`, else
        gives its role up with :meth:`stop_reading`)."""
        if self.hand_over and not self.dispatching and not self._q:
            self.dispatching = True
            self.reading = False
            self.queued_bytes += size
            if self.queued_bytes > self.budget:
                self.over_budget = True
            self._empty_since = None
            return True
        self.put(item, size)
        return False

    def stop_reading(self, ended: bool = False) -> None:
        """The reader gives its role up (the budget is spent; ``ended``: for good)."""
        self.reading = False
        self.ended = self.ended or ended

    def stop_dispatching(self) -> None:
        """The dispatcher gives its role up (the queue is empty)."""
        self.dispatching = False

    def wait_timeout(self) -> float | None:
        """How long an idle thread may sleep before :meth:`went_idle` is due (None: until
        woken)."""
        if self._q:
            return None  # someone dispatches: it notifies when it gives its role up
        if self._empty_since is None:
            self._empty_since = self._clock()
        elif self._empty_since < 0:
            return None
        return max(0.0, self._empty_since + self.idle - self._clock())

    def went_idle(self) -> bool:
        """True once per quiet period, when the queue has stayed empty ``idle`` seconds."""
        since = self._empty_since
        if self._q or since is None or since < 0 or self._clock() - since < self.idle:
            return False
        self._empty_since = -1.0  # told; busy again at the next put
        return True
