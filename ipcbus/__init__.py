"""ipcbus: one message bus for the processes of a Python application.

Broadcast, peer-to-peer messages, requests with timeouts, remote services and the transfer of
live pipes and sockets, between a main process, its spawned workers, pool workers and
independent processes, through one thread-safe, synchronous, EventEmitter-like API.
"""
from __future__ import annotations

from .bridge import IpcBusBridge
from ._timeouts import DEFAULT_TIMEOUT
from .broker import IpcBusBroker
from ._client.reconnect import Reconnect
from .client import (IpcBusClient, IpcBusEvent, IpcBusPeer, IpcBusProcess, IpcBusRequest,
                     IpcBusRequestResponse)
from .service import IpcBusService, IpcBusServiceProxy, IpcBusServiceWrapper
from .ecipc import client as _ecipc  # noqa: F401  (registers the "ecipc:" addresses)
from ._transport import create_channel
from .errors import (IpcBusConnectionError, IpcBusError, IpcBusProtocolError, IpcBusRequestError,
                     IpcBusRequestTimeoutError, IpcBusServiceError, IpcBusTimeoutError)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "IpcBusBridge",
    "IpcBusBroker",
    "IpcBusClient",
    "IpcBusConnectionError",
    "IpcBusError",
    "IpcBusEvent",
    "IpcBusPeer",
    "IpcBusProcess",
    "IpcBusProtocolError",
    "IpcBusRequest",
    "IpcBusRequestError",
    "IpcBusRequestResponse",
    "IpcBusRequestTimeoutError",
    "IpcBusService",
    "IpcBusServiceError",
    "IpcBusServiceProxy",
    "IpcBusServiceWrapper",
    "IpcBusTimeoutError",
    "Reconnect",
    "__version__",
    "create_channel",
]
