"""Readiness (SPEC 0.2): ``IpcBusClient.sync()`` and ``IpcBusClient.wait_for_listeners()``.

Both are requests on reserved channels answered by the hub itself (``_router_readiness``):
no frame kind of their own, and nothing on the path of a plain send or request. A hub routes
one connection's frames in order, so the answer to ``/ipcbus/sync`` proves that everything
the client sent before it has been routed; ``/ipcbus/waitListeners`` is held by the hub
until enough peers listen (no polling). Through a bridge linked to a broker, the broker
answers both (the bridge forwards them): it knows every listener of the bus.

The functions take the client as their first argument and are the client's methods
(``IpcBusClient.sync = readiness.sync``).
"""
from __future__ import annotations

from typing import Any, Protocol

from .. import _protocol as P
from .._router_readiness import MAX_WAIT_COUNT, SYNC_CHANNEL, WAIT_LISTENERS_CHANNEL
from .._timeouts import resolve_timeout
from ..errors import IpcBusRequestTimeoutError, IpcBusTimeoutError

__all__ = ["sync", "wait_for_listeners"]


class _Asker(Protocol):
    def _request_reserved(self, channel: str, timeout: float | None, *args: Any) -> Any: ...


def sync(self: _Asker, timeout: float | None = None) -> None:
    """Return once everything this client sent before the call (messages, subscriptions)
    has been routed by the hub (through a linked bridge: by the broker too).

    ``timeout`` (seconds; None or 0 = 2.0 s, negative = forever): raises
    :class:`~ipcbus.IpcBusTimeoutError` if the hub has not answered by then, and
    :class:`~ipcbus.IpcBusConnectionError` if the client is not connected."""
    wait = resolve_timeout(timeout)
    try:
        self._request_reserved(SYNC_CHANNEL, wait if wait is not None else -1)
    except IpcBusRequestTimeoutError:
        raise IpcBusTimeoutError(f"sync: the bus did not answer within {wait} s") from None


def wait_for_listeners(self: _Asker, channel: str, count: int = 1,
                       timeout: float | None = None) -> int:
    """Wait until at least ``count`` peers of the bus (this client included, if it listens)
    listen on ``channel``; return their number then.

    The hub answers as soon as the number is reached (it holds the question until a
    subscription brings it there): a message sent after this returns reaches those peers.
    ``timeout`` (seconds; None or 0 = 2.0 s, negative = forever): raises
    :class:`~ipcbus.IpcBusTimeoutError` if fewer peers listen by then. ``TypeError`` /
    ``ValueError`` for a bad channel or count (an int, 1 or more)."""
    P.check_channel(channel)
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, not {type(count).__name__}")
    if not 1 <= count <= MAX_WAIT_COUNT:
        raise ValueError(f"count must be 1 to {MAX_WAIT_COUNT}, got {count}")
    wait = resolve_timeout(timeout)
    try:
        response = self._request_reserved(WAIT_LISTENERS_CHANNEL,
                                          wait if wait is not None else -1, channel, count)
    except IpcBusRequestTimeoutError:
        raise IpcBusTimeoutError(f"fewer than {count} peer(s) listen on {channel!r} after"
                                 f" {wait} s") from None
    listeners: int = response.payload
    return listeners
