"""Remote services: :class:`IpcBusService` (the host side), :class:`IpcBusServiceProxy` and the
wrapper a proxy hands out (:class:`IpcBusServiceWrapper`).

The protocol is made of ordinary bus messages on two channels per service name ``N`` (see
:func:`ipcbus._protocol.service_call_channel` and :func:`~ipcbus._protocol.service_event_channel`):

* **Calls** are requests on ``/ipcbus/service/call/N`` with the args ``[call_name, *args]``.
  The host resolves them with the handler's result, or rejects them with
  ``"TypeName: message"`` (the handler's exception), so the caller's
  :class:`~ipcbus.IpcBusRequestError` carries the remote type name and text. ``send_call`` sends
  the same args as a broadcast: the handler runs, nobody waits for an answer.
* **Status**: the call named ``"__getServiceStatus"`` (the name electron-common-ipc uses) returns
  ``{"started": bool, "calls": [names...], "host": {"id", "name", "pid"}}``. Only a *started*
  service listens on its call channel, so while none is started the status request fails at
  once (no listener): "not started". Called with the extra argument ``True``, the host also
  sends the requesting peer a ``["start", status]`` notice (``send_to`` on the event channel)
  before answering.
* **Notices** are broadcasts on ``/ipcbus/service/event/N`` whose first argument is their kind:
  ``["start", status]``, ``["stop", reason]``, ``["status", status]`` (the calls changed while
  started) and ``["event", event_name, *args]`` (``send_event``). Only the service's host may
  send them (the hub refuses anyone else's), and ``["stop", reason]`` comes from the router
  itself, when the host releases the name (``stop()``) or leaves the bus without stopping
  (closed, crashed, killed).
* The service name is claimed on the bus (the router's registry) before the host listens, so a
  second ``start()`` of the same name anywhere on the bus fails with
  :class:`IpcBusServiceError` naming the host that has it.

A proxy subscribes to the notices *first*, then asks the status with ``True``: whatever the
order in which the service and the proxy came, the proxy cannot miss a start. It learns the
state from notices only (a proxy starts "not started"; the answer itself is not used): the
notices from one host reach it in the order they were sent, through the same dispatch path,
while answers take a faster path that would overtake them. So the proxy's view is always the
latest the bus told it, never an older notice applied over a newer answer.

Proxy notifications: besides the service's own events, a proxy (and its wrapper) emits
``"service-event-start"`` with the status dict when the service becomes available, and
``"service-event-stop"`` with the reason (a str) when it stops, its host leaves the bus, or the
proxy's own connection ends (the names of electron-common-ipc; see :data:`SERVICE_EVENT_START`
and :data:`SERVICE_EVENT_STOP`). A service cannot send events under those names.

Calls and their failures:

* A call made while the service is not started is *queued* and sent when "start" arrives, still
  bound by its timeout (counted from the call); past it, it fails with
  :class:`~ipcbus.IpcBusRequestTimeoutError`. One shared timer thread expires queued calls.
* When the service stops (or its host dies), the calls in flight fail at once with
  :class:`~ipcbus.IpcBusRequestError`; the proxy queues new calls until the service starts
  again, so a restarted service is used again without a new proxy.
* Errors raised by calls: :class:`~ipcbus.IpcBusRequestError` (rejected by the handler, no such
  call, service stopped), :class:`~ipcbus.IpcBusRequestTimeoutError` (also a ``TimeoutError``),
  :class:`~ipcbus.IpcBusConnectionError` (the proxy or its client was closed). Arguments that
  cannot be serialized raise ``TypeError``/``ValueError`` at the call, before anything is sent.

Threads: every public method may be called from any thread. Call handlers run on the service
client's dispatch thread, one at a time, in arrival order; they may make bus requests and
service calls themselves (nested dispatch keeps the process answering meanwhile). A handler
that must not hold the dispatch thread may return a :class:`concurrent.futures.Future`: the
call is answered when it completes. Proxy event handlers run on the proxy client's dispatch
thread and get the event's args only (``handler(*args)``, no :class:`~ipcbus.IpcBusEvent`).
"""
from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Iterable

from typing_extensions import Self

from . import _protocol as P
from ._timeouts import resolve_timeout
from ._timer import Timer as _Timer
from .client import IpcBusClient, IpcBusEvent, IpcBusRequest, IpcBusRequestResponse, _set
from .emitter import Emitter, Listener
from .errors import (IpcBusConnectionError, IpcBusError, IpcBusRequestError, IpcBusServiceError,
                     IpcBusRequestTimeoutError, IpcBusTimeoutError)

log = logging.getLogger("ipcbus")

__all__ = ["IpcBusService", "IpcBusServiceProxy", "IpcBusServiceWrapper", "IpcBusServiceError",
           "SERVICE_EVENT_START", "SERVICE_EVENT_STOP", "STATUS_CALL"]

STATUS_CALL = "__getServiceStatus"
"""The reserved call that answers the service's status dict."""
SERVICE_EVENT_START = "service-event-start"
"""Proxy event: the service is started; handlers get ``(status,)``."""
SERVICE_EVENT_STOP = "service-event-stop"
"""Proxy event: the service has stopped (or left the bus); handlers get ``(reason,)``."""
_RESERVED_EVENTS = frozenset({SERVICE_EVENT_START, SERVICE_EVENT_STOP})


# -- shared helpers ------------------------------------------------------------------------------
_shared_timer: _Timer | None = None
_shared_lock = threading.Lock()
# Services started per (peer id, name): the router lets one peer claim a name twice, so two
# IpcBusService objects of the same client are told apart here.
_hosted: dict[tuple[str, str], IpcBusService] = {}


def _timer() -> _Timer:
    """The process's timer for queued calls and connect() deadlines (one lazy thread)."""
    global _shared_timer
    with _shared_lock:
        if _shared_timer is None:
            _shared_timer = _Timer()
        return _shared_timer


def _after_fork_in_child() -> None:
    # The parent's timer thread does not exist here, and its locks may have been held.
    global _shared_timer, _shared_lock
    _shared_timer = None
    _shared_lock = threading.Lock()
    _hosted.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    return name


def _wait(client: IpcBusClient, future: concurrent.futures.Future[Any]) -> Any:
    """``future.result()``; on the client's dispatch thread, keep dispatching meanwhile (a call
    made by a listener or a call handler must not stop the notices it may be waiting for)."""
    return client._wait(future)


def _on_closed_weak(client: IpcBusClient, obj: Any, method: str) -> Callable[[], None]:
    """``client.on_closed`` without keeping ``obj`` alive; returns the handler (for
    ``client.off_closed``)."""
    ref = weakref.ref(obj)

    def handler() -> None:
        target = ref()
        if target is not None:
            getattr(target, method)()

    client.on_closed(handler)
    return handler


def _public_methods(impl: object) -> Iterable[tuple[str, Callable[..., Any]]]:
    """The public callables of ``impl`` (names not starting with "_"; classes excluded)."""
    for attr in dir(impl):
        if attr.startswith("_"):
            continue
        try:
            value = getattr(impl, attr)
        except Exception:  # a property that raises is not a call
            continue
        if callable(value) and not isinstance(value, type):
            yield attr, value


# -- the host side ----------------------------------------------------------------------------
class IpcBusService:
    """A named service hosted by ``client``: call handlers other processes reach through
    :class:`IpcBusServiceProxy`, and events sent to every proxy.

    ``impl``'s public methods (names not starting with "_") become call handlers. Handlers are
    called as ``handler(*args)`` on the client's dispatch thread; their return value is the
    call's result (any msgpack value, or a :class:`concurrent.futures.Future` of one), and an
    exception they raise reaches the caller as "TypeName: message".
    """

    def __init__(self, client: IpcBusClient, name: str, impl: object = None) -> None:
        if not isinstance(client, IpcBusClient):
            raise TypeError(f"client must be an IpcBusClient, not {type(client).__name__}")
        _check_name(name, "service name")
        P.check_channel(P.service_call_channel(name))  # the name fits in a channel
        self._client = client
        self._name = name
        self._call_channel = P.service_call_channel(name)
        self._event_channel = P.service_event_channel(name)
        self._lock = threading.Lock()  # handlers
        self._state_lock = threading.RLock()  # start / stop
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._started = False
        self._watching = False
        if impl is not None:
            for call_name, method in _public_methods(impl):
                self._handlers[call_name] = method

    @classmethod
    def create(cls, client: IpcBusClient, name: str, impl: object = None) -> IpcBusService:
        return cls(client, name, impl)

    @property
    def name(self) -> str:
        return self._name

    @property
    def client(self) -> IpcBusClient:
        return self._client

    @property
    def is_started(self) -> bool:
        return self._started

    @property
    def calls(self) -> list[str]:
        """The names of the registered call handlers, sorted."""
        with self._lock:
            return sorted(self._handlers)

    def get_status(self) -> dict[str, Any]:
        """What the status call answers: ``{"started", "calls", "host"}``."""
        peer = self._client._peer
        host = None if peer is None else {"id": peer.id, "name": peer.name,
                                          "pid": peer.process.pid}
        return {"started": self._started, "calls": self.calls, "host": host}

    # -- handlers ---------------------------------------------------------------------------
    def register_call_handler(self, call_name: str, handler: Callable[..., Any]) -> Self:
        """Serve ``call_name`` with ``handler(*args)`` (replacing any previous handler)."""
        _check_name(call_name, "call name")
        if call_name == STATUS_CALL:
            raise ValueError(f"{STATUS_CALL!r} is reserved for the service's status")
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        with self._lock:
            new = call_name not in self._handlers
            self._handlers[call_name] = handler
        if new:
            self._announce_calls()
        return self

    def unregister_call_handler(self, call_name: str) -> Self:
        """Stop serving ``call_name``; later calls of it fail with "no call"."""
        with self._lock:
            removed = self._handlers.pop(call_name, None) is not None
        if removed:
            self._announce_calls()
        return self

    def _announce_calls(self) -> None:
        """Tell proxies the new list of calls (their wrappers list them)."""
        if self._started:
            try:
                self._client._send_reserved(self._event_channel, "status", self.get_status())
            except IpcBusError as exc:
                log.debug("service %r: status update not sent: %s", self._name, exc)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> Self:
        """Claim the name on the bus, listen for calls and tell every proxy. Idempotent.

        Raises :class:`IpcBusServiceError` if another peer (or another service object of this
        client) has started a service of that name; :class:`~ipcbus.IpcBusTimeoutError` if the
        bus does not answer within ``timeout``.
        """
        with self._state_lock:
            if self._started:
                return self
            client = self._client
            peer = client.peer  # IpcBusConnectionError if not connected
            key = (peer.id, self._name)
            with _shared_lock:
                other = _hosted.get(key)
                if other is not None and other is not self:
                    raise IpcBusServiceError(
                        f"cannot start service {self._name!r}: another IpcBusService of this"
                        f" client {peer.name!r} ({peer.id}) has started it")
                _hosted[key] = self
            try:
                client._register_service(self._name, timeout)
            except IpcBusRequestTimeoutError as exc:
                self._release(key)
                raise IpcBusTimeoutError(
                    f"cannot start service {self._name!r}: the bus did not answer: {exc}"
                ) from None
            except IpcBusRequestError as exc:
                self._release(key)
                err = exc.response.err if exc.response is not None else str(exc)
                raise IpcBusServiceError(f"cannot start service {self._name!r}: {err}") from None
            except BaseException:
                self._release(key)
                raise
            if not self._watching:
                _on_closed_weak(client, self, "_on_client_closed")
                self._watching = True
            self._started = True
            try:
                client.on(self._call_channel, self._on_call)
                client._send_reserved(self._event_channel, "start", self.get_status())
            except BaseException:
                self._started = False
                client.off(self._call_channel, self._on_call)
                self._release(key)
                raise
            log.debug("service %r started by %s", self._name, peer.name)
        return self

    def stop(self) -> None:
        """Stop serving: proxies see it stopped at once (their calls in flight fail) and queue
        new calls until a ``start()``. The name is released. Idempotent."""
        with self._state_lock:
            if not self._started:
                return
            client = self._client
            client.off(self._call_channel, self._on_call)  # later calls are refused at once
            self._started = False
            peer = client._peer
            if peer is not None:
                self._release((peer.id, self._name))
            if client.connected:
                try:
                    # the hub broadcasts ["stop", reason] once the name is released
                    client._unregister_service(self._name)
                except IpcBusError as exc:
                    log.debug("service %r: stop not announced: %s", self._name, exc)
            log.debug("service %r stopped", self._name)

    def _release(self, key: tuple[str, str]) -> None:
        with _shared_lock:
            if _hosted.get(key) is self:
                del _hosted[key]

    def _on_client_closed(self) -> None:
        # The router has already told the proxies (it broadcasts "stop" for a host that left).
        with self._state_lock:
            if self._started:
                self._started = False
                self._client.off(self._call_channel, self._on_call)
                with _shared_lock:
                    for key in [k for k, v in _hosted.items() if v is self]:
                        del _hosted[key]

    # -- events -----------------------------------------------------------------------------
    def send_event(self, event_name: str, *args: Any) -> bool:
        """Send ``event_name`` with ``args`` to every proxy's listeners of that name.

        Returns False (and sends nothing) while the service is not started, so a stopped or
        refused service never speaks for the one that holds the name.
        """
        _check_name(event_name, "event name")
        if event_name in _RESERVED_EVENTS:
            raise ValueError(f"{event_name!r} is reserved for the proxies' notifications")
        if not self._started:
            return False
        self._client._send_reserved(self._event_channel, "event", event_name, *args)
        return True

    # -- calls ------------------------------------------------------------------------------
    def _on_call(self, event: IpcBusEvent, *args: Any) -> None:
        """A call (request) or a ``send_call`` (broadcast), on the dispatch thread."""
        request = event.request
        if not args or not isinstance(args[0], str):
            if request is not None:
                request.reject(f"ValueError: malformed call to service {self._name!r}")
            return
        call_name, call_args = args[0], args[1:]
        if call_name == STATUS_CALL:
            status = self.get_status()
            if call_args[:1] == (True,) and status["started"] and event.sender is not None:
                # A new proxy: tell it in the notices' order (see the module's docstring).
                try:
                    self._client._send_to_reserved(event.sender, self._event_channel, "start",
                                                   status)
                except IpcBusError as exc:
                    log.debug("service %r: start notice not sent: %s", self._name, exc)
            if request is not None:
                request.resolve(status)
            return
        with self._lock:
            handler = self._handlers.get(call_name)
        if handler is None:
            if request is not None:
                request.reject(f"service {self._name!r} has no call {call_name!r}"
                               f" (its calls: {', '.join(self.calls) or 'none'})")
            else:
                log.warning("service %r: send_call of unknown call %r", self._name, call_name)
            return
        try:
            result = handler(*call_args)
        except Exception as exc:
            if request is None:
                log.warning("service %r: send_call %r raised", self._name, call_name,
                            exc_info=True)
            else:
                log.debug("service %r: call %r raised %r", self._name, call_name, exc)
                self._answer(request, call_name, False, exc)
            return
        if request is None:
            return
        if isinstance(result, concurrent.futures.Future):
            result.add_done_callback(functools.partial(self._answer_future, request, call_name))
        else:
            self._answer(request, call_name, True, result)

    def _answer_future(self, request: IpcBusRequest, call_name: str,
                       future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            self._answer(request, call_name, False, "CancelledError: the call was cancelled")
            return
        exc = future.exception()
        if exc is not None:
            self._answer(request, call_name, False, exc)
        else:
            self._answer(request, call_name, True, future.result())

    def _answer(self, request: IpcBusRequest, call_name: str, ok: bool, value: Any) -> None:
        try:
            try:
                if ok:
                    request.resolve(value)
                else:
                    request.reject(value)
            except (TypeError, ValueError) as exc:  # a result msgpack cannot carry
                request.reject(f"{type(exc).__name__}: the result of {self._name}.{call_name}()"
                               f" cannot be sent: {exc}")
        except IpcBusError as exc:  # the connection has gone: nobody to answer
            log.debug("service %r: answer to %r not sent: %s", self._name, call_name, exc)

    # -- misc -------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<IpcBusService {self._name!r} {state} calls={self.calls}>"


# -- the proxy side ---------------------------------------------------------------------------
_call_ids = itertools.count(1)


class _Call:
    """One call of a proxy: queued, in flight, or done (its future)."""

    __slots__ = ("id", "name", "args", "timeout", "deadline", "oneway", "future")

    def __init__(self, name: str, args: tuple[Any, ...], timeout: float | None,
                 oneway: bool) -> None:
        self.id = next(_call_ids)
        self.name = name
        self.args = args
        self.timeout = timeout  # seconds, None = forever
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.oneway = oneway
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


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
        _check_name(name, "service name")
        P.check_channel(P.service_call_channel(name))
        self._client = client
        self._name = name
        self._call_timeout = resolve_timeout(call_timeout)
        self._call_channel = P.service_call_channel(name)
        self._event_channel = P.service_event_channel(name)
        # _lock orders sends and state changes; _inflight_lock is never held while writing,
        # so the reader thread (which completes calls) never waits behind a blocked send.
        self._lock = threading.RLock()
        self._inflight_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._close_reason = ""
        self._status: dict[str, Any] = {"started": False, "calls": [], "host": None}
        self._queue: dict[int, _Call] = {}
        self._inflight: dict[int, _Call] = {}
        self._start_waiters: list[concurrent.futures.Future[Any]] = []
        self._wrapper = IpcBusServiceWrapper(self)
        if not client.connected:
            raise IpcBusConnectionError("the proxy's client is not connected")
        self._closed_handler = _on_closed_weak(client, self, "_on_client_closed")
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
    def wrapper(self) -> IpcBusServiceWrapper:
        """The wrapper (also returned by :meth:`connect`)."""
        return self._wrapper

    def connect(self, timeout: float | None = None) -> IpcBusServiceWrapper:
        """Wait until the service is started (at most ``timeout``); return the wrapper.

        Raises :class:`~ipcbus.IpcBusTimeoutError` if it does not start in time.
        """
        wait = resolve_timeout(timeout)
        with self._lock:
            self._check_open()
            if self._started:
                return self._wrapper
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._start_waiters.append(future)
        if wait is not None:
            _timer().call_at(time.monotonic() + wait, lambda: _set(future, exc=IpcBusTimeoutError(
                f"service {self._name!r} did not start within {wait:g} s")))
        try:
            _wait(self._client, future)
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
        return _wait(self._client, self._submit(call_name, args, False).future)

    def apply(self, call_name: str, args: Iterable[Any] = ()) -> Any:
        """Like :meth:`call`, with the arguments as one sequence."""
        if isinstance(args, (str, bytes, bytearray, dict)):
            raise TypeError(f"apply() takes the arguments as a list or tuple, not"
                            f" {type(args).__name__}")
        return _wait(self._client, self._submit(call_name, tuple(args), False).future)

    def call_async(self, call_name: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Start a call; the Future gets its result or its error."""
        return self._submit(call_name, args, False).future

    def send_call(self, call_name: str, *args: Any) -> None:
        """Run ``call_name(*args)`` on the service without waiting for (or getting) an answer.

        Queued like a call while the service is not started, and dropped (with a logged
        warning) if it does not start within the call timeout."""
        self._submit(call_name, args, True)

    def _submit(self, call_name: str, args: tuple[Any, ...], oneway: bool) -> _Call:
        _check_name(call_name, "call name")
        call = _Call(call_name, args, self._call_timeout, oneway)
        with self._lock:
            self._check_open()
            if self._started:
                self._send(call, direct=True)
                return call
            P.pack_payload([call_name, *args])  # bad arguments raise now, nothing is queued
            self._queue[call.id] = call
        if call.deadline is not None:
            _timer().call_at(call.deadline, functools.partial(self._expire_queued, call))
        return call

    def _label(self, call: _Call) -> str:
        return f"{self._name}.{call.name}()"

    def _response(self, err: str) -> IpcBusRequestResponse:
        return IpcBusRequestResponse(IpcBusEvent(self._call_channel, None), err=err)

    def _timeout_error(self, call: _Call, why: str = "") -> IpcBusRequestTimeoutError:
        assert call.timeout is not None
        msg = f"{self._label(call)} timed out after {call.timeout:g} s{why}"
        return IpcBusRequestTimeoutError(msg, self._response(msg))

    def _send(self, call: _Call, direct: bool) -> None:
        """Send ``call`` now (with ``_lock`` held, so calls leave in order). ``direct``: raise
        argument and connection errors to the caller instead of failing the future."""
        timeout: float = -1.0
        if call.deadline is not None:
            timeout = call.deadline - time.monotonic()
            if timeout <= 0:
                _set(call.future, exc=self._timeout_error(call))
                return
        try:
            if call.oneway:
                self._client._send_reserved(self._call_channel, call.name, *call.args)
                _set(call.future, result=None)
                return
            inner = self._client._request_async_reserved(self._call_channel, timeout, call.name,
                                               *call.args)
        except Exception as exc:
            if direct:
                raise
            _set(call.future, exc=self._wrap_error(call, exc))
            return
        with self._inflight_lock:
            self._inflight[call.id] = call
        inner.add_done_callback(functools.partial(self._on_answer, call))

    def _on_answer(self, call: _Call, inner: concurrent.futures.Future[Any]) -> None:
        """The request of ``call`` is done (on the reader or timer thread: no sends here)."""
        with self._inflight_lock:
            self._inflight.pop(call.id, None)
        if inner.cancelled():
            return
        exc = inner.exception()
        if exc is None:
            _set(call.future, result=inner.result().payload)
        else:
            _set(call.future, exc=self._wrap_error(call, exc))

    def _wrap_error(self, call: _Call, exc: BaseException) -> BaseException:
        """The error of a failed request, told as a failed call of this service."""
        if isinstance(exc, IpcBusRequestTimeoutError):
            return self._timeout_error(call)
        if isinstance(exc, IpcBusRequestError):
            err = exc.response.err if exc.response is not None else str(exc)
            return IpcBusRequestError(f"{self._label(call)} failed: {err}", exc.response)
        if isinstance(exc, IpcBusConnectionError):
            return IpcBusConnectionError(f"{self._label(call)} failed: {exc}")
        return exc

    def _expire_queued(self, call: _Call) -> None:
        """Timer: ``call`` is still queued at its deadline (the service did not start)."""
        with self._lock:
            if self._queue.pop(call.id, None) is None:
                return
        why = f": service {self._name!r} did not start"
        if call.oneway:
            log.warning("send_call %s dropped: service %r did not start within %g s",
                        self._label(call), self._name, call.timeout)
        _set(call.future, exc=self._timeout_error(call, why))

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
            queued = list(self._queue.values())
            self._queue.clear()
            for call in queued:  # in the order they were made, before any new call
                if not call.future.done():
                    self._send(call, direct=False)
            waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            _set(waiter, result=True)
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
            with self._inflight_lock:
                inflight = list(self._inflight.values())
                self._inflight.clear()
        self._fail(inflight, lambda call: IpcBusRequestError(
            f"{self._label(call)} failed: {reason}", self._response(reason)))
        if was:
            log.debug("proxy: service %r stopped: %s", self._name, reason)
            self._emit(SERVICE_EVENT_STOP, reason)

    def _fail(self, calls: list[_Call], error: Callable[[_Call], BaseException]) -> None:
        for call in calls:
            if not call.future.done():
                _set(call.future, exc=error(call))

    def _emit(self, key: str, *args: Any) -> None:
        for listener in self._take(key):
            try:
                listener(*args)
            except Exception:
                log.exception("handler %r of event %r of service %r raised", listener, key,
                              self._name)

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
            pending = list(self._queue.values())
            self._queue.clear()
            with self._inflight_lock:
                pending += self._inflight.values()
                self._inflight.clear()
            waiters, self._start_waiters = self._start_waiters, []
        self._fail(pending, lambda call: IpcBusConnectionError(
            f"{self._label(call)} failed: {reason}"))
        for waiter in waiters:
            _set(waiter, exc=IpcBusConnectionError(
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
        return _check_name(key, "event name")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._started else "not started"
        return f"<IpcBusServiceProxy {self._name!r} {state}>"


class IpcBusServiceWrapper:
    """The service as an object: ``wrapper.add(1, 2)`` calls ``add`` (see
    :meth:`IpcBusServiceProxy.call`), and ``wrapper.on("tick", handler)`` listens to its events.

    Attributes are the calls the service announced (``dir(wrapper)`` lists them); another name
    raises ``AttributeError``. A call wins over the wrapper's own names: a lamp service with
    calls ``on`` and ``off`` is switched with ``lamp.on()``; its events are then listened to on
    the proxy (``proxy.on("tick", handler)``), whose emitter methods never change meaning.
    """

    _proxy: IpcBusServiceProxy

    def __init__(self, proxy: IpcBusServiceProxy) -> None:
        object.__setattr__(self, "_proxy", proxy)

    @property
    def proxy(self) -> IpcBusServiceProxy:
        return self._proxy

    # emitter surface (returns the wrapper, for chaining)
    def on(self, event_name: str, listener: Listener) -> Self:
        self._proxy.on(event_name, listener)
        return self

    add_listener = on

    def once(self, event_name: str, listener: Listener) -> Self:
        self._proxy.once(event_name, listener)
        return self

    def prepend_listener(self, event_name: str, listener: Listener) -> Self:
        self._proxy.prepend_listener(event_name, listener)
        return self

    def prepend_once_listener(self, event_name: str, listener: Listener) -> Self:
        self._proxy.prepend_once_listener(event_name, listener)
        return self

    def off(self, event_name: str, listener: Listener) -> Self:
        self._proxy.off(event_name, listener)
        return self

    remove_listener = off

    def remove_all_listeners(self, event_name: str | None = None) -> Self:
        self._proxy.remove_all_listeners(event_name)
        return self

    def listeners(self, event_name: str) -> list[Listener]:
        return self._proxy.listeners(event_name)

    def listener_count(self, event_name: str) -> int:
        return self._proxy.listener_count(event_name)

    def event_names(self) -> list[str]:
        return self._proxy.event_names()

    # calls as attributes
    def __getattribute__(self, attr: str) -> Any:
        # A call the service announced shadows the wrapper's own attribute of the same name
        # (``on``, ``off``, ``once``, ``proxy``...); private names are never calls.
        if attr[:1] != "_":
            proxy: IpcBusServiceProxy = object.__getattribute__(self, "_proxy")
            if attr in (proxy._status.get("calls") or ()):
                return _call_of(proxy, attr)
        return object.__getattribute__(self, attr)

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("_"):
            raise AttributeError(attr)
        proxy: IpcBusServiceProxy = object.__getattribute__(self, "_proxy")
        calls = proxy.status.get("calls") or []
        if attr not in calls:
            raise AttributeError(f"service {proxy.name!r} has no call {attr!r} (its calls:"
                                 f" {', '.join(map(str, calls)) or 'none announced'})")
        return _call_of(proxy, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError("the wrapper's attributes are the service's calls (read-only)")

    def __dir__(self) -> list[str]:
        calls = [c for c in self._proxy.status.get("calls") or [] if isinstance(c, str)]
        return sorted(set(super().__dir__()) | set(calls))

    def __repr__(self) -> str:
        return f"<IpcBusServiceWrapper of {object.__getattribute__(self, '_proxy')!r}>"


def _call_of(proxy: IpcBusServiceProxy, name: str) -> Callable[..., Any]:
    """``wrapper.<name>``: a function that calls ``name`` of the service."""
    def call(*args: Any) -> Any:
        return proxy.call(name, *args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Call {name!r} of service {proxy.name!r}."
    return call
