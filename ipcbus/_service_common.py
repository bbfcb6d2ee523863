"""What the service host and the service proxy share: the reserved names, the name check,
the process's timer, waiting on a future without stopping dispatch, and a weak
``on_closed`` subscription (see :mod:`ipcbus.service` for the protocol)."""
from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref
from typing import Any, Callable

from ._timer import Timer
from .client import IpcBusClient

__all__ = ["STATUS_CALL", "SERVICE_EVENT_START", "SERVICE_EVENT_STOP", "RESERVED_EVENTS",
           "check_name", "on_closed_weak", "on_reconnection_weak", "timer", "wait"]

STATUS_CALL = "__getServiceStatus"
"""The reserved call that answers the service's status dict."""
SERVICE_EVENT_START = "service-event-start"
"""Proxy event: the service is started; handlers get ``(status,)``."""
SERVICE_EVENT_STOP = "service-event-stop"
"""Proxy event: the service has stopped (or left the bus); handlers get ``(reason,)``."""
RESERVED_EVENTS = frozenset({SERVICE_EVENT_START, SERVICE_EVENT_STOP})
"""Event names a service cannot send (the proxies' own notifications)."""

_timer: Timer | None = None
_timer_lock = threading.Lock()


def timer() -> Timer:
    """The process's timer for queued calls and connect() deadlines (one lazy thread)."""
    global _timer
    with _timer_lock:
        if _timer is None:
            _timer = Timer()
        return _timer


def _after_fork_in_child() -> None:
    # The parent's timer thread does not exist here, and its lock may have been held.
    global _timer, _timer_lock
    _timer = None
    _timer_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_name(name: object, what: str) -> str:
    """``name`` if it is a non-empty str; TypeError or ValueError naming ``what`` if not."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    return name


def wait(client: IpcBusClient, future: concurrent.futures.Future[Any]) -> Any:
    """``future.result()``; on the client's dispatch thread, keep dispatching meanwhile (a call
    made by a listener or a call handler must not stop the notices it may be waiting for)."""
    return client._wait(future)


def on_closed_weak(client: IpcBusClient, obj: Any, method: str) -> Callable[[], None]:
    """``client.on_closed`` without keeping ``obj`` alive; returns the handler (for
    ``client.off_closed``)."""
    ref = weakref.ref(obj)

    def handler() -> None:
        target = ref()
        if target is not None:
            getattr(target, method)()

    client.on_closed(handler)
    return handler


def on_reconnection_weak(client: IpcBusClient, obj: Any) -> None:
    """``client.on_disconnected`` / ``on_reconnected`` calling ``obj._on_bus_lost(reason)`` /
    ``obj._on_bus_back()``, without keeping ``obj`` alive (a client connected with
    ``reconnect``: the services follow it, README "Surviving a broker restart")."""
    ref = weakref.ref(obj)

    def lost(reason: str) -> None:
        target = ref()
        if target is not None:
            target._on_bus_lost(reason)

    def back() -> None:
        target = ref()
        if target is not None:
            target._on_bus_back()

    client.on_disconnected(lost)
    client.on_reconnected(back)
