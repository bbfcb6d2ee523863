"""The caller side of a service: :class:`IpcBusServiceProxy` and its calls (see
:mod:`ipcbus.service` for the protocol and the rules of queued and in-flight calls).

Its calls are :class:`~ipcbus._service_calls.ServiceCall` objects in a
:class:`~ipcbus._service_calls.CallQueue`: *queued* while the service is not started (sent, in
order, when "start" arrives; failed by the timer at their deadline), then *in flight* (a bus
request; its answer, its timeout, the service's stop or the proxy's close settles it).
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from typing import Any, Callable, Iterable

from typing_extensions import Self

from . import _protocol as P
from ._pending import settle
from ._service_calls import CallQueue, ServiceCall
from ._service_common import (SERVICE_EVENT_START, SERVICE_EVENT_STOP, STATUS_CALL, check_name,
                              on_closed_weak, on_reconnection_weak, timer, wait)
from ._service_wrapper import IpcBusServiceWrapper
from ._timeouts import resolve_timeout
from ._types import IpcBusEvent
from .client import IpcBusClient
from .emitter import Emitter
from .errors import (IpcBusConnectionError, IpcBusError, IpcBusRequestError,
                     IpcBusRequestTimeoutError, IpcBusTimeoutError)

log = logging.getLogger("ipcbus")

__all__ = ["IpcBusServiceProxy"]

class IpcBusServiceProxy(Emitter[str]):
    """The client side of service ``name``: calls, status, and the service's events.

    Created at any time, before or after the service starts: it learns the service's state at
    once and follows it (``is_started``). ``call_timeout`` bounds every call (None or 0: 2 s;
    negative: no limit), counted from the call, queueing included.

    As an emitter, ``proxy.on(event_name, handler)`` receives the service's events as
    ``handler(*args)``, plus :data:`SERVICE_EVENT_START` and :data:`SERVICE_EVENT_STOP`.
    """

    def __init__(self, client: IpcBusClient, name: str, call_timeout: float | None = None
                 ) -> None:
        super().__init__()
        if not isinstance(client, IpcBusClient):
            raise TypeError(f"client must be an IpcBusClient, not {type(client).__name__}")
        check_name(name, "service name")
        P.check_channel(P.service_call_channel(name))
        self._client = client
        self._name = name
        self._call_timeout = resolve_timeout(call_timeout)
        self._call_channel = P.service_call_channel(name)
        self._event_channel = P.service_event_channel(name)
        # _lock orders sends and state changes, and guards the queued calls (see CallQueue).
        self._lock = threading.RLock()
        self._started = False
        self._closed = False
        self._close_reason = ""
        self._status: dict[str, Any] = {"started": False, "calls": [], "host": None}
        self._calls = CallQueue()
        self._start_waiters: list[concurrent.futures.Future[Any]] = []
        self._wrapper: IpcBusServiceWrapper[IpcBusServiceProxy] = IpcBusServiceWrapper(self)
        if not client.connected:
            raise IpcBusConnectionError("the proxy's client is not connected")
        self._closed_handler = on_closed_weak(client, self, "_on_client_closed")
        on_reconnection_weak(client, self)  # see _on_bus_lost, _on_bus_back
        # Notices first, then the status: a start can never fall in between. A started host
        # answers with a "start" notice to this peer; with none, the request fails at once.
        client.on(self._event_channel, self._on_notice)
        try:
            client._request_async_reserved(self._call_channel, -1, STATUS_CALL, True)
        except BaseException:
            client.off(self._event_channel, self._on_notice)
            raise

    @classmethod
    def create(cls, client: IpcBusClient, name: str, call_timeout: float | None = None
               ) -> IpcBusServiceProxy:
        return cls(client, name, call_timeout)

    # -- state ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def client(self) -> IpcBusClient:
        return self._client

    @property
    def is_started(self) -> bool:
        """Whether the service is started, as the bus last told this proxy."""
        return self._started

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def status(self) -> dict[str, Any]:
        """The last status the service announced (no round trip; see :meth:`get_status`)."""
        return dict(self._status)

    @property
    def wrapper(self) -> IpcBusServiceWrapper[IpcBusServiceProxy]:
        """The wrapper (also returned by :meth:`connect`)."""
        return self._wrapper

    def connect(self, timeout: float | None = None
                ) -> IpcBusServiceWrapper[IpcBusServiceProxy]:
        """Wait until the service is started (at most ``timeout``); return the wrapper.

        Raises :class:`~ipcbus.IpcBusTimeoutError` if it does not start in time.
        """
        limit = resolve_timeout(timeout)
        with self._lock:
            self._check_open()
            if self._started:
                return self._wrapper
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._start_waiters.append(future)
        if limit is not None:
            timer().call_at(time.monotonic() + limit, lambda: settle(future, exc=IpcBusTimeoutError(
                f"service {self._name!r} did not start within {limit:g} s")))
        try:
            wait(self._client, future)
        finally:
            with self._lock:
                if future in self._start_waiters:
                    self._start_waiters.remove(future)
        return self._wrapper

    def get_status(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the service its status now: ``{"started", "calls", "host"}`` (``started`` False,
        with no calls, when no service of that name is started on the bus)."""
        self._check_open()
        try:
            response = self._client._request_reserved(self._call_channel, timeout, STATUS_CALL)
        except IpcBusRequestTimeoutError:
            raise
        except IpcBusRequestError:
            return {"started": False, "calls": [], "host": None}
        status = response.payload
        if not isinstance(status, dict):
            raise IpcBusRequestError(f"service {self._name!r} answered a malformed status",
                                     response)
        return status

    def _check_open(self) -> None:
        if self._closed:
            raise IpcBusConnectionError(f"the proxy of service {self._name!r} is closed"
                                        f" ({self._close_reason})")

    # -- calls ------------------------------------------------------------------------------
    def call(self, call_name: str, *args: Any) -> Any:
        """Call ``call_name(*args)`` on the service and return its result (blocks)."""
        return wait(self._client, self._submit(call_name, args, False).future)

    def apply(self, call_name: str, args: Iterable[Any] = ()) -> Any:
        """Like :meth:`call`, with the arguments as one sequence."""
        if isinstance(args, (str, bytes, bytearray, dict)):
            raise TypeError(f"apply() takes the arguments as a list or tuple, not"
                            f" {type(args).__name__}")
        return wait(self._client, self._submit(call_name, tuple(args), False).future)

    def call_async(self, call_name: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Start a call; the Future gets its result or its error."""
        return self._submit(call_name, args, False).future

    def send_call(self, call_name: str, *args: Any) -> None:
        """Run ``call_name(*args)`` on the service without waiting for (or getting) an answer.

        Queued like a call while the service is not started, and dropped (with a logged
        warning) if it does not start within the call timeout."""
        self._submit(call_name, args, True)

    def _submit(self, call_name: str, args: tuple[Any, ...], oneway: bool) -> ServiceCall:
        check_name(call_name, "call name")
        call = ServiceCall(self._name, self._call_channel, call_name, args, self._call_timeout,
                           oneway)
        with self._lock:
            self._check_open()
            if self._started:
                self._send(call, direct=True)
                return call
            self._check_bus()
            P.pack_payload([call_name, *args])  # bad arguments raise now, nothing is queued
            self._calls.queue(call)
        if call.deadline is not None:
            timer().call_at(call.deadline, self._expire_queued)
        return call

    def _send(self, call: ServiceCall, direct: bool) -> None:
        """Send ``call`` now (with ``_lock`` held, so calls leave in order). ``direct``: raise
        argument and connection errors to the caller instead of failing the future."""
        timeout: float = -1.0
        if call.deadline is not None:
            timeout = call.deadline - time.monotonic()
            if timeout <= 0:
                settle(call.future, exc=call.timeout_error())
                return
        try:
            if call.oneway:
                self._client._send_reserved(self._call_channel, call.name, *call.args)
                settle(call.future, result=None)
                return
            self._calls.sending(call)
            inner = self._client._request_async_reserved(self._call_channel, timeout,
                                                         call.name, *call.args)
        except Exception as exc:
            if not call.oneway and not self._calls.take_inflight(call):
                return  # the service's stop took it meanwhile, and failed it
            if direct:
                raise
            settle(call.future, exc=call.failed(exc))
            return
        inner.add_done_callback(functools.partial(self._on_answer, call))

    def _on_answer(self, call: ServiceCall, inner: concurrent.futures.Future[Any]) -> None:
        """The request of ``call`` is done (on the reader or timer thread: no sends here)."""
        if not self._calls.take_inflight(call):
            return  # failed meanwhile by the service's stop or the proxy's close
        if inner.cancelled():
            call.future.cancel()
            return
        exc = inner.exception()
        if exc is None:
            settle(call.future, result=inner.result().payload)
        else:
            settle(call.future, exc=call.failed(exc))

    def _expire_queued(self) -> None:
        """Timer: fail the calls still queued at their deadline (the service did not start)."""
        with self._lock:
            due = self._calls.take_expired(time.monotonic())
        why = f": service {self._name!r} did not start"
        for call in due:
            if call.oneway:
                log.warning("send_call %s dropped: service %r did not start within %g s",
                            call.label, self._name, call.timeout)
            settle(call.future, exc=call.timeout_error(why))

    # -- notices (on the dispatch thread) ---------------------------------------------------
    def _on_notice(self, event: IpcBusEvent, *args: Any) -> None:
        if not args or not isinstance(args[0], str):
            return
        kind = args[0]
        if kind == "event":
            if len(args) >= 2 and isinstance(args[1], str):
                self._emit(args[1], *args[2:])
        elif kind == "start":
            status = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
            self._set_started(status)
        elif kind == "stop":
            reason = str(args[1]) if len(args) > 1 else f"service {self._name!r} stopped"
            self._set_stopped(reason)
        elif kind == "status":
            if len(args) > 1 and isinstance(args[1], dict):
                with self._lock:
                    if self._started:
                        self._status = {**args[1], "started": True}

    def _set_started(self, status: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            was = self._started
            self._started = True
            self._status = {**status, "started": True}
            for call in self._calls.take_queued():  # in order, before any new call
                if not call.future.done():
                    self._send(call, direct=False)
            waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            settle(waiter, result=True)
        if not was:
            log.debug("proxy: service %r started", self._name)
            self._emit(SERVICE_EVENT_START, dict(self._status))

    def _set_stopped(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            was = self._started
            self._started = False
            self._status = {**self._status, "started": False}
            inflight = self._calls.take_all_inflight()
        self._fail(inflight, lambda call: IpcBusRequestError(f"{call.label} failed: {reason}",
                                                             call.response(reason)))
        if was:
            log.debug("proxy: service %r stopped: %s", self._name, reason)
            self._emit(SERVICE_EVENT_STOP, reason)

    def _fail(self, calls: list[ServiceCall], error: Callable[[ServiceCall], BaseException]
              ) -> None:
        for call in calls:
            if not call.future.done():
                settle(call.future, exc=error(call))

    def _emit(self, key: str, *args: Any) -> None:
        for listener in self._take(key):
            try:
                listener(*args)
            except Exception:
                log.exception("handler %r of event %r of service %r raised", listener, key,
                              self._name)

    # -- reconnection (a client connected with reconnect: README "Surviving a broker restart") --
    def _check_bus(self) -> None:
        """A call while the client's bus is down raises at once (not queued: nothing waits
        for a bus that may not come back)."""
        if not self._client.connected:
            raise IpcBusConnectionError(f"cannot call service {self._name!r}: the bus is down")

    def _on_bus_lost(self, reason: str) -> None:
        """The bus is down: the service is stopped as far as this proxy knows (calls in
        flight have failed with IpcBusConnectionError already, with the bus's requests)."""
        self._set_stopped(f"the bus connection was lost: {reason}")

    def _on_bus_back(self) -> None:
        """The client joined the bus again: ask for the status as a new proxy does (a started
        host answers with a "start" notice; a host that starts later broadcasts one)."""
        if self._closed:
            return
        try:
            self._client._request_async_reserved(self._call_channel, -1, STATUS_CALL, True)
        except IpcBusError as exc:
            log.debug("proxy of %r: status not asked after reconnection: %s", self._name, exc)

    # -- closing ----------------------------------------------------------------------------
    def _shutdown(self, reason: str) -> bool:
        """Fail everything pending with IpcBusConnectionError(reason); True if it was open."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._close_reason = reason
            was = self._started
            self._started = False
            self._status = {**self._status, "started": False}
            pending = self._calls.close(reason)
            waiters, self._start_waiters = self._start_waiters, []
        self._fail(pending, lambda call: IpcBusConnectionError(f"{call.label} failed: {reason}"))
        for waiter in waiters:
            settle(waiter, exc=IpcBusConnectionError(
                f"waiting for service {self._name!r}: {reason}"))
        if was:
            self._emit(SERVICE_EVENT_STOP, reason)
        return True

    def _on_client_closed(self) -> None:
        self._shutdown("the bus connection has closed")

    def close(self) -> None:
        """Stop following the service: pending and queued calls fail with
        :class:`~ipcbus.IpcBusConnectionError`, later calls raise it. Idempotent."""
        if self._shutdown("the proxy was closed"):
            self._client.off(self._event_channel, self._on_notice)
            self._client.off_closed(self._closed_handler)
            self.remove_all_listeners()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_key(self, key: object) -> str:
        return check_name(key, "event name")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._started else "not started"
        return f"<IpcBusServiceProxy {self._name!r} {state}>"

