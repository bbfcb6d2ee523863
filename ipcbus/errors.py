"""The ipcbus exception hierarchy.

Every error the library raises on purpose derives from :class:`IpcBusError`, and each also
derives from the builtin it resembles, so ``except ConnectionError`` or ``except TimeoutError``
in existing code keeps working.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._types import IpcBusRequestResponse

__all__ = [
    "IpcBusError",
    "IpcBusConnectionError",
    "IpcBusTimeoutError",
    "IpcBusRequestError",
    "IpcBusRequestTimeoutError",
    "IpcBusProtocolError",
    "IpcBusServiceError",
]


class IpcBusError(Exception):
    """Base class of every ipcbus error."""


class IpcBusConnectionError(IpcBusError, ConnectionError):
    """The connection to the bus could not be made, was refused, or has ended."""


class IpcBusTimeoutError(IpcBusError, TimeoutError):
    """An operation did not complete within its timeout."""


class IpcBusRequestError(IpcBusError):
    """A request was rejected, or could not be answered.

    ``response`` is the :class:`~ipcbus.IpcBusRequestResponse` with ``err`` set to the reason:
    the responder's rejection, or the bus's own (no listener, every receiver gone, ...).
    """

    def __init__(self, message: str, response: IpcBusRequestResponse | None = None) -> None:
        super().__init__(message)
        self.response = response


class IpcBusRequestTimeoutError(IpcBusRequestError, IpcBusTimeoutError):
    """A request got no answer within its timeout (also a :class:`TimeoutError`)."""


class IpcBusProtocolError(IpcBusError, ValueError):
    """Bytes on the wire do not form a valid ipcbus frame or handshake."""


class IpcBusServiceError(IpcBusError):
    """A service could not be started (its name is taken on the bus), or is used wrongly."""
