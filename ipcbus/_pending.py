"""Requests in flight: the one table the router, the client and the service proxy keep.

A :class:`RequestTable` maps a request's key to its entry (whatever its owner needs to settle
it: a future, the endpoint an answer goes to...), and optionally to the peers that may answer
it (*receivers*) and a deadline. It is pure: no threads, no clock of its own (``expired`` is
told the time), no locks — the router runs on its hub's one loop thread, and the client and
the proxy hold their own lock around each call.

One rule makes it safe to share between threads under that lock: **whoever takes an entry out
settles it**. Every way out — :meth:`take` (an answer came), :meth:`drop_receiver` and
:meth:`receiver_gone` (the last receiver failed or left), :meth:`expired` (the deadline
passed), :meth:`close` (the connection ended) — removes the entry and hands it to exactly one
caller, so a request is answered, failed or timed out once, whichever comes first.

Deadlines sit in a heap with lazy deletion: an entry taken early leaves its heap slot behind,
skipped when it surfaces; the heap is compacted when such slots are most of it. There is no
index by receiver: a peer leaving (seldom, next to requests) scans the entries, so that adding
and taking a request stay two dictionary operations.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import itertools
from typing import Any, Generic, Hashable, Iterable, Iterator, Protocol, TypeVar

__all__ = ["RequestTable", "TableClosed", "settle"]

K = TypeVar("K", bound=Hashable)
E = TypeVar("E")

_COMPACT_MIN = 512  # dead heap slots tolerated before a compaction is considered


class TableClosed(Exception):
    """The table was closed (its connection ended): no request can be added any more."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Slot(Generic[E]):
    __slots__ = ("entry", "receivers", "deadline")

    def __init__(self, entry: E, receivers: set[str], deadline: float | None) -> None:
        self.entry = entry
        self.receivers = receivers
        self.deadline = deadline


class RequestTable(Generic[K, E]):
    """Entries of requests in flight, by key, with their receivers and deadlines."""

    def __init__(self) -> None:
        self._slots: dict[K, _Slot[E]] = {}
        self._heap: list[tuple[float, int, K, _Slot[E]]] = []
        self._seq = itertools.count()
        self._dead = 0  # heap slots whose entry was taken before its deadline
        self._closed: str | None = None

    # -- reading ------------------------------------------------------------------------------
    @property
    def closed(self) -> str | None:
        """The reason given to :meth:`close`, or None while open."""
        return self._closed

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._slots))

    def get(self, key: K) -> E | None:
        slot = self._slots.get(key)
        return None if slot is None else slot.entry

    def items(self) -> list[tuple[K, E]]:
        """A snapshot of the entries (safe to iterate while taking them)."""
        return [(key, slot.entry) for key, slot in self._slots.items()]

    def receivers(self, key: K) -> frozenset[str]:
        """The receivers still expected to answer ``key`` (empty if it is not in flight)."""
        slot = self._slots.get(key)
        return frozenset() if slot is None else frozenset(slot.receivers)

    def may_answer(self, key: K, receiver: str) -> bool:
        """Whether ``receiver`` is one of those ``key`` was delivered to and still expects."""
        slot = self._slots.get(key)
        return slot is not None and receiver in slot.receivers

    def keys_of(self, receiver: str) -> frozenset[K]:
        """The requests ``receiver`` is expected to answer (a scan: peers leave seldom)."""
        return frozenset(key for key, slot in self._slots.items() if receiver in slot.receivers)

    def next_deadline(self) -> float | None:
        """The earliest deadline of an entry still in flight, or None."""
        heap = self._heap
        while heap and self._slots.get(heap[0][2]) is not heap[0][3]:
            heapq.heappop(heap)
            self._dead -= 1
        return heap[0][0] if heap else None

    # -- changing -----------------------------------------------------------------------------
    def add(self, key: K, entry: E, *, receivers: Iterable[str] = (),
            deadline: float | None = None) -> None:
        """Put a request in flight. ``KeyError`` if ``key`` already is (a reused request id),
        :class:`TableClosed` after :meth:`close`. A ``set`` of receivers is kept as it is
        (the table owns it from then on); any other iterable is copied."""
        if self._closed is not None:
            raise TableClosed(self._closed)
        slots = self._slots
        if key in slots:
            raise KeyError(key)
        slot = _Slot(entry, receivers if type(receivers) is set else set(receivers), deadline)
        slots[key] = slot
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, next(self._seq), key, slot))

    def add_receiver(self, key: K, receiver: str) -> None:
        """``receiver`` also got request ``key`` (ignored if ``key`` is not in flight)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.receivers.add(receiver)

    def take(self, key: K) -> E | None:
        """Remove ``key`` and return its entry for the caller to settle (None if it is not in
        flight: answered, failed, expired or never added)."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return None
        if slot.deadline is not None:
            self._count_dead()
        return slot.entry

    def drop_receiver(self, key: K, receiver: str) -> E | None:
        """``receiver`` will not answer ``key`` (it failed, or left). Returns the entry, taken,
        if no receiver is left; None otherwise (or if ``key`` is not in flight)."""
        slot = self._slots.get(key)
        if slot is None or receiver not in slot.receivers:
            return None
        slot.receivers.discard(receiver)
        if slot.receivers:
            return None
        return self.take(key)

    def receiver_gone(self, receiver: str) -> list[tuple[K, E]]:
        """``receiver`` left: it is dropped from every request it was expected to answer. Returns
        the entries (taken) of those it was the last receiver of, in the order they were added."""
        done: list[tuple[K, E]] = []
        for key in [k for k, slot in self._slots.items() if receiver in slot.receivers]:
            entry = self.drop_receiver(key, receiver)
            if entry is not None:
                done.append((key, entry))
        return done

    def expired(self, now: float) -> list[tuple[K, E]]:
        """Take and return the entries whose deadline is ``now`` or earlier, earliest first."""
        heap, done = self._heap, []
        while heap and heap[0][0] <= now:
            _, _, key, slot = heapq.heappop(heap)
            if self._slots.get(key) is slot:
                del self._slots[key]
                done.append((key, slot.entry))
            else:
                self._dead -= 1
        return done

    def close(self, reason: str) -> list[tuple[K, E]]:
        """Take every entry (to be failed with ``reason`` by the caller); later :meth:`add`
        calls raise :class:`TableClosed`. Closing twice keeps the first reason."""
        if self._closed is None:
            self._closed = reason
        done = [(key, slot.entry) for key, slot in self._slots.items()]
        self._slots.clear()
        self._heap.clear()
        self._dead = 0
        return done

    # -- internals ----------------------------------------------------------------------------
    def _count_dead(self) -> None:
        """An entry with a deadline was taken early: its heap slot is dead until it surfaces."""
        self._dead += 1
        if self._dead > _COMPACT_MIN and self._dead * 2 > len(self._heap):
            self._heap = [item for item in self._heap if self._slots.get(item[2]) is item[3]]
            heapq.heapify(self._heap)
            self._dead = 0


class _Settleable(Protocol):
    def set_result(self, result: Any) -> None: ...

    def set_exception(self, exception: BaseException) -> None: ...


def settle(future: _Settleable, *, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete a request's future with ``result`` or ``exc``; a future the user cancelled
    meanwhile is left as it is."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
