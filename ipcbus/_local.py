"""The bridge of this process, if one is connected: set by ``IpcBusBridge.connect()`` and
``close()``, read by ``IpcBusClient.connect()`` with no address. A module of its own, so that
the client needs nothing of the bridge (and the bridge may use the client)."""
from __future__ import annotations

import threading
from typing import Any, Protocol


class LocalHub(Protocol):
    """What a client of this process needs of the bridge: a socket to join it."""

    @property
    def closed(self) -> bool: ...

    def attach_local(self) -> Any: ...


_current: LocalHub | None = None
lock = threading.Lock()  # held while a bridge registers or leaves


def bridge_of_this_process() -> LocalHub | None:
    """The connected bridge of this process, or None."""
    bridge = _current
    return bridge if bridge is not None and not bridge.closed else None


def register(bridge: LocalHub | None) -> None:
    """Make ``bridge`` the bridge of this process (None: none); the caller holds ``lock``."""
    global _current
    _current = bridge


def is_current(bridge: LocalHub) -> bool:
    return _current is bridge
