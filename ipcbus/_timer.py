"""A timer thread: calls functions at deadlines (request timeouts, queued service calls).

One lazily started daemon thread per :class:`Timer`; answered requests cancel their entry, so
the thread does not wake once per request to find nothing to do.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("ipcbus")

__all__ = ["Timer"]


class Timer:
    """Calls ``fn()`` at deadlines, on one lazily started daemon thread.

    ``call_at`` returns a handle for ``cancel``: a request answered in time cancels its
    timeout, so that the thread does not wake once per request to find nothing to do.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []  # [deadline, seq, fn or None when cancelled]
        self._cancelled = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def call_at(self, deadline: float, fn: Callable[[], None]) -> list[Any]:
        entry = [deadline, next(self._seq), fn]
        with self._cond:
            if self._stopped:
                return entry
            notify = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ipcbus-timer",
                                                daemon=True)
                self._thread.start()
            elif notify:
                self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """Forget a call; cancelled entries are dropped lazily (the heap stays small)."""
        with self._cond:
            if entry[2] is None:
                return
            entry[2] = None
            self._cancelled += 1
            heap = self._heap
            if self._cancelled > 512 and self._cancelled * 2 > len(heap):
                heap[:] = [e for e in heap if e[2] is not None]
                heapq.heapify(heap)
                self._cancelled = 0

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cancelled = 0
            self._cond.notify()

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while not self._stopped:
                    while heap and heap[0][2] is None:
                        heapq.heappop(heap)
                        self._cancelled -= 1
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        break
                    self._cond.wait(heap[0][0] - now if heap else None)
                if self._stopped:
                    return
                fn = heapq.heappop(heap)[2]
            try:
                fn()
            except BaseException:  # pragma: no cover - a bug, but never kill the timer
                log.exception("ipcbus timer callback failed")
