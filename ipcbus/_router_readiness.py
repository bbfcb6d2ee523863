"""Readiness (SPEC 0.2): ``client.sync()`` and ``client.wait_for_listeners()``, answered by
the hub itself as requests on two reserved channels, with no frame kind of their own.

Pure, like the router. The rules:

* ``/ipcbus/sync`` (no arguments) is answered with None at once. A hub routes one
  connection's frames in order, so its answer proves that everything the client sent before
  (messages, subscriptions) has been routed.
* ``/ipcbus/waitListeners`` (arguments ``[channel, count]``) is answered with the number of
  peers of the bus listening on ``channel`` as soon as it is at least ``count``: at once if it
  is, else the request is *held* (an entry of the request table with no receiver) and
  answered when a subscription brings the number up (:meth:`ListenerWaits.ready`). A held
  request ends like any other: CANCEL (the client's timeout), its requester leaving.
* A bridge linked to a broker answers neither: it forwards both to the broker only (not to
  its own listeners of those channels), as a request the broker answers. The broker knows
  every peer of the bus and their subscriptions (a bridge forwards its peers' SUBSCRIBEs),
  the bridge does not know the broker's listeners; and since the link carries the bridge's
  frames in order, the broker's answer to ``sync`` also proves the client's earlier frames
  were routed by both hubs.

:class:`ListenerWaits` is the pure rule of held ``waitListeners`` requests: channel -> the
requests waiting on it with their counts. Entries whose request left the table (cancelled,
its requester gone) are dropped lazily.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, TypeVar

__all__ = ["SYNC_CHANNEL", "WAIT_LISTENERS_CHANNEL", "READINESS_CHANNELS", "ListenerWaits",
           "wait_arguments"]

SYNC_CHANNEL = "/ipcbus/sync"
WAIT_LISTENERS_CHANNEL = "/ipcbus/waitListeners"
READINESS_CHANNELS = frozenset({SYNC_CHANNEL, WAIT_LISTENERS_CHANNEL})
MAX_WAIT_COUNT = 1 << 31  # more peers than a bus can hold

K = TypeVar("K", bound=Hashable)
_PRUNE_MIN = 64  # stale entries tolerated before pruning them all


def wait_arguments(args: Any, max_channel: int) -> tuple[str, int] | str:
    """The ``(channel, count)`` of a ``waitListeners`` request's arguments, or why they are
    not valid."""
    if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], str)
            and type(args[1]) is int):
        return f"{WAIT_LISTENERS_CHANNEL} takes a channel name and a count"
    channel, count = args
    if not channel or len(channel.encode("utf-8", "surrogatepass")) > max_channel:
        return f"{WAIT_LISTENERS_CHANNEL}: a channel is 1 to {max_channel} bytes"
    if not 1 <= count <= MAX_WAIT_COUNT:
        return f"{WAIT_LISTENERS_CHANNEL}: the count must be 1 to {MAX_WAIT_COUNT}"
    return channel, count


class ListenerWaits(Generic[K]):
    """Held ``waitListeners`` requests: channel -> key -> (count, token). ``token`` is what
    the request table holds for the key while the request is in flight, so a stale entry is
    never mistaken for a later request that reuses its key."""

    def __init__(self) -> None:
        self._waits: dict[str, dict[K, tuple[int, object]]] = {}
        self._size = 0

    def __len__(self) -> int:
        """Entries held (stale ones included until they are pruned)."""
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def add(self, channel: str, key: K, count: int, token: object,
            alive: Callable[[K, object], bool]) -> None:
        """Hold ``key`` until ``channel`` has ``count`` listeners. ``alive(key, token)``: is
        that request still in flight (used to prune stale entries now and then)."""
        if self._size >= _PRUNE_MIN and self._size >= 2 * self._live(alive):
            self._prune(alive)
        self._waits.setdefault(channel, {})[key] = (count, token)
        self._size += 1

    def ready(self, channel: str, listeners: int, alive: Callable[[K, object], bool]
              ) -> list[K]:
        """``channel`` has ``listeners`` listeners now: take out and return, in the order
        they came, the keys still in flight whose count is reached (stale entries of the
        channel go too)."""
        waits = self._waits.get(channel)
        if not waits:
            return []
        done = [key for key, (count, token) in waits.items()
                if count <= listeners or not alive(key, token)]
        ready = []
        for key in done:
            count, token = waits.pop(key)
            self._size -= 1
            if alive(key, token):
                ready.append(key)
        if not waits:
            del self._waits[channel]
        return ready

    def _live(self, alive: Callable[[K, object], bool]) -> int:
        return sum(1 for waits in self._waits.values()
                   for key, (_, token) in waits.items() if alive(key, token))

    def _prune(self, alive: Callable[[K, object], bool]) -> None:
        for channel in list(self._waits):
            waits = self._waits[channel]
            for key in [k for k, (_, token) in waits.items() if not alive(k, token)]:
                del waits[key]
                self._size -= 1
            if not waits:
                del self._waits[channel]
