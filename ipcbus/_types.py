"""The public value types of the bus: peers, events, requests and their outcomes.

``IpcBusRequest`` answers through the client it was delivered to (the ``Answerer`` protocol),
so this module imports nothing of the package: the client and the errors import from here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

__all__ = ["IpcBusPeer", "IpcBusProcess", "IpcBusEvent", "IpcBusRequest",
           "IpcBusRequestResponse"]



class Answerer(Protocol):
    """What an :class:`IpcBusRequest` needs of the client it was delivered to."""

    @property
    def _member(self) -> Any:
        """The client's membership of the bus now (the answer goes out in its name)."""

    def _pack_answer(self, resolved: bool, value: Any) -> Any:
        """The answer's body; raises (TypeError/ValueError) if ``value`` cannot be sent."""

    def _send_answer(self, channel: str, requester: str, rid: int, body: Any,
                     member: Any) -> None:
        """Send the answer to request ``rid`` of ``requester``, as ``member``."""


def target_id(target: object) -> str:
    """The peer id a ``send_to``/``request_to`` target names: an :class:`IpcBusPeer` or an id."""
    if isinstance(target, IpcBusPeer):
        return target.id
    if isinstance(target, str) and target:
        return target
    raise TypeError(f"target must be an IpcBusPeer or a peer id, not {target!r}")


@dataclass(frozen=True)
class IpcBusProcess:
    """Where a peer runs: ``type`` is "main", "pipe", "socket" (or "node", a Node peer); ``pid``
    its process id (as the hub recorded it: 0 for a Node peer)."""

    type: str
    pid: int


@dataclass(frozen=True)
class IpcBusPeer:
    """A client on the bus. ``id`` is unique on the bus; ``name`` is free text."""

    id: str
    name: str
    process: IpcBusProcess


@dataclass(slots=True)
class IpcBusEvent:
    """What a listener receives first: where the message came from and how to answer it."""

    channel: str
    sender: Optional[IpcBusPeer]
    request: Optional[IpcBusRequest] = None
    ports: Optional[list[Any]] = None
    _lease: Any = field(default=None, repr=False, compare=False)  # zero_copy views' slots

    def retain(self) -> Any:
        """Keep the read-only memoryviews a ``zero_copy=True`` listener got valid after it
        returns: the object returned keeps them valid until its ``release()`` (or the end of
        its ``with`` block). For any other event, an object whose release does nothing."""
        if self._lease is None:
            return _NOT_HELD
        return self._lease.retain()


class _NotHeld:
    """What ``retain()`` returns for an event without shared-memory views."""

    def release(self) -> None:
        pass

    def __enter__(self) -> _NotHeld:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NOT_HELD = _NotHeld()


@dataclass
class IpcBusRequestResponse:
    """The outcome of a request: ``payload`` if resolved, ``err`` if rejected or failed."""

    event: IpcBusEvent
    payload: Any = None
    err: Any = None


class _Answered:
    """Shared by the local receivers of one request: the first answer wins (a REQUEST_ALL:
    one per receiving client, each answers once). ``cancel``: the request's cancel state,
    shared by all of them (None: not kept)."""

    __slots__ = ("lock", "done", "cancel")

    def __init__(self, cancel: _Cancel | None = None) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.cancel = cancel


class _Cancel:
    """A delivered request's cancel state (kept by ``_client/cancels.py``): whether its
    requester gave it up, the callbacks to run then, its timeout as delivered, and the
    answers still to send (at 0 the receiving table forgets it: a later cancel does
    nothing). Fired on the dispatch thread; ``add`` may be called from any thread."""

    __slots__ = ("cancelled", "callbacks", "timeout", "open", "key", "forget")

    def __init__(self, timeout: float | None, answers: int, key: Any,
                 forget: Callable[[Any], Any]) -> None:
        self.cancelled = False
        self.callbacks: list[Callable[[], Any]] = []
        self.timeout = timeout
        self.open = answers
        self.key = key
        self.forget = forget

    def add(self, callback: Callable[[], Any]) -> None:
        with _CANCEL_LOCK:
            if not self.cancelled:
                self.callbacks.append(callback)
                return
        callback()  # cancelled already: at once

    def fire(self) -> list[Callable[[], Any]]:
        """Mark it cancelled; the callbacks to run (once)."""
        with _CANCEL_LOCK:
            if self.cancelled:
                return []
            self.cancelled = True
            callbacks, self.callbacks = self.callbacks, []
        return callbacks

    def answered(self) -> None:
        """One of its receivers answered; the last one forgets it."""
        with _CANCEL_LOCK:
            self.open -= 1
            last = self.open <= 0
        if last:
            self.forget(self.key)


_CANCEL_LOCK = threading.Lock()  # held for a few operations: one for every request


class IpcBusRequest:
    """Attached to ``event.request`` of a request; answer with :meth:`resolve` or :meth:`reject`.

    Only the first answer (from any listener anywhere on the bus) reaches the requester; later
    calls are ignored and return False.
    """

    __slots__ = ("_client", "_member", "_requester", "_rid", "_channel", "_answered")

    def __init__(self, client: Answerer, requester: str, rid: int, channel: str,
                 answered: _Answered) -> None:
        self._client = client
        self._member = client._member  # the answer goes out in the name it was asked of
        self._requester = requester
        self._rid = rid
        self._channel = channel
        self._answered = answered

    @property
    def answered(self) -> bool:
        return self._answered.done

    @property
    def cancelled(self) -> bool:
        """Whether the requester gave this request up (cancelled, timed out, interrupted, or
        left the bus) since it was delivered."""
        cancel = self._answered.cancel
        return cancel is not None and cancel.cancelled

    @property
    def timeout(self) -> float | None:
        """The requester's time left when the request was delivered (seconds, None: no
        timeout): the timeout it gave, as it travelled with the request."""
        cancel = self._answered.cancel
        return None if cancel is None else cancel.timeout

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` when the requester gives this request up: on the receiving
        client's dispatch thread, or at once (on this thread) if it has already. Not run
        once the request is answered (a cancel that comes later does nothing)."""
        cancel = self._answered.cancel
        if cancel is not None:
            cancel.add(callback)

    def resolve(self, payload: Any = None) -> bool:
        """Answer with ``payload``; False if the request was answered already."""
        return self._answer(True, payload)

    def reject(self, err: Any = None) -> bool:
        """Fail the request with ``err`` (an exception is sent as "TypeName: message")."""
        if isinstance(err, BaseException):
            err = f"{type(err).__name__}: {err}"
        return self._answer(False, err)

    def _answer(self, resolved: bool, value: Any) -> bool:
        body = self._client._pack_answer(resolved, value)  # raises before anything is marked
        with self._answered.lock:
            if self._answered.done:
                return False
            self._answered.done = True
        cancel = self._answered.cancel
        if cancel is not None:
            cancel.answered()
        self._client._send_answer(self._channel, self._requester, self._rid, body,
                                  self._member)
        return True
