"""The requests this process was delivered and has not answered yet, so that a CANCEL can
reach the listeners that got them.

The hub forwards a requester's CANCEL (it gave the request up: ``cancel()``, its timeout, an
interrupt, or it left the bus) to the receivers it still expects an answer from. The
receiving connection looks the request up here by ``(requester id, rid)`` and, on its
dispatch thread, marks it cancelled (``event.request.cancelled``) and runs its ``on_cancel``
callbacks. A CANCEL that finds nothing (answered already, or never delivered here) does
nothing.

Pure and bounded: an entry leaves when its last answer is sent (``_Cancel.open`` reaches 0),
when it is cancelled (its requester leaving is a cancel too), or, past ``limit`` entries
(listeners that never answer requests that never time out), oldest first — such a request
can then no longer be told it was cancelled. Safe to share between the dispatch thread and
threads that answer: each step is one dict operation.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .._types import _Cancel

log = logging.getLogger("ipcbus")

__all__ = ["Delivered", "DEFAULT_LIMIT"]

DEFAULT_LIMIT = 16384
Key = tuple[str, int]


class Delivered:
    """Requests delivered to this process's listeners, by ``(requester id, rid)``."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._states: dict[Key, _Cancel] = {}
        self._forget: Callable[[Any], Any] = self._forget_key

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def add(self, key: Key, timeout: float | None, answers: int) -> _Cancel:
        """A request was delivered to ``answers`` receiving clients (each answers once): its
        cancel state, kept until they have answered or it is cancelled."""
        state = _Cancel(timeout, answers, key, self._forget)
        states = self._states
        if len(states) >= self.limit:
            try:
                del states[next(iter(states))]  # the oldest: it can no longer be cancelled
            except (StopIteration, KeyError, RuntimeError):  # emptied meanwhile
                pass
        states[key] = state
        return state

    def cancel(self, key: Key) -> list[Callable[[], Any]]:
        """The requester gave ``key`` up: forget it, mark it cancelled; the callbacks to run
        (none if it was not here: answered already, or never delivered)."""
        state = self._states.pop(key, None)
        return [] if state is None else state.fire()

    def _forget_key(self, key: Any) -> None:
        self._states.pop(key, None)


def run_cancel(delivered: Delivered, requester: str | None, rid: int) -> None:
    """A CANCEL came for request ``rid`` of ``requester``: run its callbacks (on the
    dispatch thread), each contained like a listener."""
    if requester is None:
        return
    for callback in delivered.cancel((requester, rid)):
        try:
            callback()
        except BaseException:  # contained: the dispatch thread is shared
            log.exception("on_cancel callback %r raised", callback)
