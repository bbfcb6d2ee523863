"""A client's requests in flight: what waits for an answer, and turning an answer into the
outcome its caller sees.

* :class:`SyncAnswer`: the answer of a blocking ``request()``: the part of a Future its one
  waiting caller needs (a pre-acquired lock released once it is set), without a Future's
  condition and callbacks.
* :class:`AnswerFuture`: the Future of ``request_async()`` and of the library's own requests
  (PEER_ADD, SERVICE_ADD, SPY_ADD, ``post_message``).
* :class:`Pending`: an entry of the connection's request table. Whoever takes the entry out
  of the table settles its answer; nobody else does.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

from .. import _protocol as P
from .._protocol import Kind
from .delivery import LocalClient
from .._pending import settle
from .._types import IpcBusEvent, IpcBusPeer, IpcBusRequestResponse
from ..errors import IpcBusProtocolError, IpcBusRequestError

__all__ = ["AnswerFuture", "SyncAnswer", "Pending", "settle_answer"]

_REQUEST_FAIL = int(Kind.REQUEST_FAIL)


class AnswerFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of a request, completed by a frame of its connection (or a timeout, or
    the end of the connection). :meth:`cancel` gives a user's request up: its entry leaves
    the table and its receivers are told (CANCEL)."""

    _give_up: Any = None  # set by Requests.start for user requests: (requests, client, key)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        give_up = self._give_up
        if give_up is not None:
            self._give_up = None
            requests, client, key, channel = give_up
            requests.abandon(client, key, channel, cancel=True)
        return True


class SyncAnswer:
    """The answer of a blocking request, for its one waiting caller. Set once, by whoever
    took its pending entry out of the table."""

    __slots__ = ("_done", "_result", "_exc", "_lock")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._exc: BaseException | None = None
        self._lock = threading.Lock()
        self._lock.acquire()  # released when set

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        if not self._done:
            self._result = result
            self._done = True
            self._lock.release()

    def set_exception(self, exc: BaseException) -> None:
        if not self._done:
            self._exc = exc
            self._done = True
            self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        """Wait until set (True) or for ``timeout`` seconds (False)."""
        if self._done:
            return True
        if self._lock.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._lock.release()  # a later wait() returns at once too
            return True
        return self._done

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._result


class Pending:
    """A request in flight: its answer, the client that asked (``owner``, to fail it when
    that client closes), its channel, and the timer's handle of its timeout (cancelled when
    it is answered)."""

    __slots__ = ("future", "owner", "channel", "timeout", "gathered")

    def __init__(self, owner: LocalClient, channel: str,
                 future: AnswerFuture | SyncAnswer) -> None:
        self.future = future
        self.owner = owner
        self.channel = channel
        self.timeout: list[Any] | None = None
        self.gathered: list[IpcBusRequestResponse] | None = None  # request_all: what came


def settle_answer(pending: Pending, frame: P.Frame, sender: IpcBusPeer | None) -> None:
    """Settle ``pending`` with the RESPONSE or REQUEST_FAIL ``frame``."""
    channel = pending.channel
    event = IpcBusEvent(channel, sender)
    try:
        # (decoded already: an answer from shared memory, ``ConnectionShm.answer``)
        body = frame.args if isinstance(frame, P.DecodedFrame) else P.unpack_payload(frame.body)
        if frame.kind == _REQUEST_FAIL:
            response = IpcBusRequestResponse(event, err=str(body))
            settle(pending.future, exc=IpcBusRequestError(
                f"request on {channel!r} failed: {body}", response))
        elif not (isinstance(body, list) and len(body) == 2):
            raise IpcBusProtocolError("malformed answer")
        elif body[0]:
            settle(pending.future, result=IpcBusRequestResponse(event, payload=body[1]))
        else:
            response = IpcBusRequestResponse(event, err=body[1])
            settle(pending.future, exc=IpcBusRequestError(
                f"request on {channel!r} was rejected: {body[1]}", response))
    except IpcBusProtocolError as exc:
        settle(pending.future, exc=IpcBusRequestError(
            f"request on {channel!r}: undecodable answer: {exc}",
            IpcBusRequestResponse(event, err=str(exc))))
