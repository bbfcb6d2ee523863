"""A service proxy's calls: each call (:class:`ServiceCall`) and the queue that holds them
(:class:`CallQueue`), see :mod:`ipcbus.service` for the rules they follow.

A call is *queued* while the service is not started (with its deadline: the proxy's timer
fails it there), then *in flight* once its request is sent, until its answer, its request's
timeout, the service's stop or the proxy's close. Both stages are the library's one request
table (:class:`ipcbus._pending.RequestTable`), whose rule holds here: whoever takes a call out
of its table settles its future, exactly once.

Locks: the queued table is guarded by the proxy's lock (held by every caller of the
``queue*`` methods, since queueing, sending in order and the service's state change
together); the in-flight table has a lock of its own, never held while writing, so the
reader thread that completes calls never waits behind a blocked send.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from typing import Any

from ._pending import RequestTable
from ._types import IpcBusEvent, IpcBusRequestResponse
from .errors import IpcBusConnectionError, IpcBusRequestError, IpcBusRequestTimeoutError

__all__ = ["CallQueue", "ServiceCall"]

_call_ids = itertools.count(1)


class ServiceCall:
    """One call of a proxy: what to send, its deadline, and its future."""

    __slots__ = ("id", "service", "channel", "name", "args", "timeout", "deadline", "oneway",
                 "future")

    def __init__(self, service: str, channel: str, name: str, args: tuple[Any, ...],
                 timeout: float | None, oneway: bool) -> None:
        self.id = next(_call_ids)
        self.service = service  # the service's name
        self.channel = channel  # the service's call channel
        self.name = name
        self.args = args
        self.timeout = timeout  # seconds, None = forever
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.oneway = oneway  # send_call: nobody waits for an answer
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    @property
    def label(self) -> str:
        """``service.call()``, as errors name the call."""
        return f"{self.service}.{self.name}()"

    def response(self, err: str) -> IpcBusRequestResponse:
        return IpcBusRequestResponse(IpcBusEvent(self.channel, None), err=err)

    def timeout_error(self, why: str = "") -> IpcBusRequestTimeoutError:
        assert self.timeout is not None
        msg = f"{self.label} timed out after {self.timeout:g} s{why}"
        return IpcBusRequestTimeoutError(msg, self.response(msg))

    def failed(self, exc: BaseException) -> BaseException:
        """The error of this call's failed request, told as a failed call of the service."""
        if isinstance(exc, IpcBusRequestTimeoutError):
            return self.timeout_error()
        if isinstance(exc, IpcBusRequestError):
            err = exc.response.err if exc.response is not None else str(exc)
            return IpcBusRequestError(f"{self.label} failed: {err}", exc.response)
        if isinstance(exc, IpcBusConnectionError):
            return IpcBusConnectionError(f"{self.label} failed: {exc}")
        return exc


class CallQueue:
    """The calls of one proxy: queued, then in flight (see the module's docstring)."""

    def __init__(self) -> None:
        self._queued: RequestTable[int, ServiceCall] = RequestTable()
        self._inflight: RequestTable[int, ServiceCall] = RequestTable()
        self._inflight_lock = threading.Lock()

    # -- queued (the proxy's lock held) ---------------------------------------------------------
    def queue(self, call: ServiceCall) -> None:
        """Hold ``call`` until the service starts or its deadline passes."""
        self._queued.add(call.id, call, deadline=call.deadline)

    def take_queued(self) -> list[ServiceCall]:
        """Take every queued call, in the order they were made (the service started)."""
        return [call for key, call in self._queued.items() if self._queued.take(key) is not None]

    def take_expired(self, now: float) -> list[ServiceCall]:
        """Take the queued calls whose deadline is ``now`` or earlier."""
        return [call for _, call in self._queued.expired(now)]

    # -- in flight --------------------------------------------------------------------------------
    def sending(self, call: ServiceCall) -> None:
        """``call``'s request is about to be sent: it is in flight from now on (so that an
        answer that comes at once finds it)."""
        with self._inflight_lock:
            self._inflight.add(call.id, call)

    def take_inflight(self, call: ServiceCall) -> bool:
        """Take ``call`` out of flight; False if someone else has (and settles it)."""
        with self._inflight_lock:
            return self._inflight.take(call.id) is not None

    def take_all_inflight(self) -> list[ServiceCall]:
        """Take every call in flight (the service stopped)."""
        with self._inflight_lock:
            return [call for key, call in self._inflight.items() if self._inflight.take(key) is not None]

    # -- the end ----------------------------------------------------------------------------------
    def close(self, reason: str) -> list[ServiceCall]:
        """Take every call, queued then in flight (the proxy closed; the proxy's lock held)."""
        taken = [call for _, call in self._queued.close(reason)]
        with self._inflight_lock:
            taken += [call for _, call in self._inflight.close(reason)]
        return taken
