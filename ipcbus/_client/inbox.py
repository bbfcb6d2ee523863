"""The client's read/dispatch scheduling, as decisions: the dispatch queue and its budget.

Pure code with an injected clock; not thread-safe (the connection holds its condition's
lock around every call). The connection's reader thread puts what it read here; its dispatch
thread takes it out, in order, and runs the listeners. The rules, in one place:

* **Order.** Items (a batch of frames, or a callable of ``call_soon``) come out in the order
  they were put, one at a time; a nested wait (a listener's request, on the dispatch thread)
  takes them from the same queue, so the order holds across nesting.
* **When reading stops.** Bytes of frames queued and not dispatched yet are counted. Past
  ``budget`` the reader stops reading (the hub then holds the senders: back-pressure, and a
  stuck listener becomes a "slow consumer" there instead of unbounded memory here); it reads
  again once the dispatcher has brought the count down to half the budget. Answers wait for
  reading too, so a request made in a listener keeps dispatching while it waits,
  which drains the queue. Once the connection is closing, reading never
  stops again (the end of the stream must be seen).
* **When a nested wait dispatches.** While the awaited answer has not come, a waiter on the
  dispatch thread takes the next item like the dispatcher does; it sleeps only when the
  queue is empty, and stops taking items once its answer has come.
* **When the connection is idle.** After ``idle`` seconds with an empty queue, the dispatcher
  is told once (:meth:`went_idle`): the connection lets its large receive buffer go.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable

__all__ = ["Inbox"]


class Inbox:
    """The dispatch queue of one connection (``clock``: seconds, monotonic)."""

    def __init__(self, budget: int, idle: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.idle = idle
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

    def wait_timeout(self) -> float | None:
        """How long an idle dispatcher may sleep before :meth:`went_idle` is due (None:
        until woken)."""
        if self._q:
            return 0.0
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
