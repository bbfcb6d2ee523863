"""The host side of a service: :class:`IpcBusService` (see :mod:`ipcbus.service` for the
protocol it speaks).

The service name is claimed on the bus (the router's registry) before the host listens; the
router lets one peer claim a name twice, so two :class:`IpcBusService` objects of one client
are told apart here, in :data:`_hosted` (renewed in a forked child).
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
from typing import Any, Callable, Iterable

from typing_extensions import Self

from . import _protocol as P
from ._service_common import (RESERVED_EVENTS, STATUS_CALL, check_name, on_closed_weak,
                              on_reconnection_weak)
from ._types import IpcBusEvent, IpcBusRequest
from .client import IpcBusClient
from .errors import (IpcBusError, IpcBusRequestError, IpcBusRequestTimeoutError,
                     IpcBusServiceError, IpcBusTimeoutError)

log = logging.getLogger("ipcbus")

__all__ = ["IpcBusService"]

# Services started per (peer id, name): the router lets one peer claim a name twice, so two
# IpcBusService objects of the same client are told apart here.
_hosted: dict[tuple[str, str], IpcBusService] = {}
_hosted_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The parent's services are not this process's; its lock may have been held.
    global _hosted_lock
    _hosted_lock = threading.Lock()
    _hosted.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


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



class IpcBusService:
    """A named service hosted by ``client``: call handlers other processes reach through
    :class:`IpcBusServiceProxy`, and events sent to every proxy.

    ``impl``'s public methods (names not starting with "_") become call handlers. Handlers are
    called as ``handler(*args)`` on the client's dispatch thread; their return value is the
    call's result (any msgpack value, or a :class:`concurrent.futures.Future` of one), and an
    exception they raise reaches the caller as "TypeName: message".

    ``group``: host the service as a member of a pool. Every host that starts the same name
    with the same group shares its calls: each call goes to ONE member (the one with the
    fewest calls in progress, ties in turn), the service is started while at least one
    member hosts it, and its proxies are told "stop" only when the last member leaves. Any
    member's ``send_event`` reaches the proxies. Without a group the service is exclusive (a
    second host is refused); mixing the two, or another group, on one name is refused.
    """

    def __init__(self, client: IpcBusClient, name: str, impl: object = None, *,
                 group: str | None = None) -> None:
        if not isinstance(client, IpcBusClient):
            raise TypeError(f"client must be an IpcBusClient, not {type(client).__name__}")
        check_name(name, "service name")
        P.check_channel(P.service_call_channel(name))  # the name fits in a channel
        self._client = client
        self._name = name
        self._call_channel = P.service_call_channel(name)
        self._event_channel = P.service_event_channel(name)
        self._lock = threading.Lock()  # handlers
        self._state_lock = threading.RLock()  # start / stop
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._group = None if group is None else P.check_group(group)
        self._started = False
        self._watching = False
        if impl is not None:
            for call_name, method in _public_methods(impl):
                self._handlers[call_name] = method

    @classmethod
    def create(cls, client: IpcBusClient, name: str, impl: object = None, *,
               group: str | None = None) -> IpcBusService:
        return cls(client, name, impl, group=group)

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
    def group(self) -> str | None:
        """The pool this host belongs to (None: an exclusive service)."""
        return self._group

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
        status: dict[str, Any] = {"started": self._started, "calls": self.calls, "host": host}
        if self._group is not None:
            status["group"] = self._group
        return status

    # -- handlers ---------------------------------------------------------------------------
    def register_call_handler(self, call_name: str, handler: Callable[..., Any]) -> Self:
        """Serve ``call_name`` with ``handler(*args)`` (replacing any previous handler)."""
        check_name(call_name, "call name")
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
        client) has started a service of that name (for a group: if the name is hosted
        without a group or by another group); :class:`~ipcbus.IpcBusTimeoutError` if the
        bus does not answer within ``timeout``.
        """
        with self._state_lock:
            if self._started:
                return self
            client = self._client
            peer = client.peer  # IpcBusConnectionError if not connected
            key = (peer.id, self._name)
            with _hosted_lock:
                other = _hosted.get(key)
                if other is not None and other is not self:
                    raise IpcBusServiceError(
                        f"cannot start service {self._name!r}: another IpcBusService of this"
                        f" client {peer.name!r} ({peer.id}) has started it")
                _hosted[key] = self
            try:
                client._register_service(self._name, timeout, self._group)
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
                on_closed_weak(client, self, "_on_client_closed")
                on_reconnection_weak(client, self)  # see _on_bus_back
                self._watching = True
            self._started = True
            try:
                self._listen(True)
                client._send_reserved(self._event_channel, "start", self.get_status())
            except BaseException:
                self._started = False
                self._listen(False)
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
            self._listen(False)  # later calls are refused at once
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

    def _listen(self, on: bool) -> None:
        """Listen (or stop listening) on the call channel: plainly for an exclusive service,
        as a member of the pool's group for a service hosted by a group (the hub hands each
        call to one member)."""
        client = self._client
        if self._group is not None:
            client._on_reserved_group(self._call_channel, self._on_call, self._group, on)
        elif on:
            client.on(self._call_channel, self._on_call)
        else:
            client.off(self._call_channel, self._on_call)

    def _release(self, key: tuple[str, str]) -> None:
        with _hosted_lock:
            if _hosted.get(key) is self:
                del _hosted[key]

    def _on_client_closed(self) -> None:
        # The router has already told the proxies (it broadcasts "stop" for a host that left).
        with self._state_lock:
            if self._started:
                self._started = False
                self._listen(False)
                with _hosted_lock:
                    for key in [k for k, v in _hosted.items() if v is self]:
                        del _hosted[key]

    # -- reconnection (a client connected with reconnect: README "Surviving a broker restart") --
    def _on_bus_lost(self, reason: str) -> None:
        """The bus is down: the service stays started here and starts again on the bus once
        the client is back (``_on_bus_back``); its proxies see it stopped meanwhile."""
        log.debug("service %r: the bus is down (%s)", self._name, reason)

    def _on_bus_back(self) -> None:
        """The client joined the bus again (on its dispatch thread): the new bus knows no
        service, so claim the name again and tell every proxy (a proxy that joins later asks
        for the status, as always). Another peer holding the name by now stops this one."""
        with self._state_lock:
            if not self._started:
                return
            try:
                self._client._register_service(self._name, None, self._group)
                if self._group is not None:  # the pool's membership, once the name is ours
                    self._client._rejoin_reserved_group(self._call_channel, self._group)
                self._client._send_reserved(self._event_channel, "start", self.get_status())
            except IpcBusError as exc:
                log.warning("service %r not started again after reconnection: %s",
                            self._name, exc)
                self._on_client_closed()  # stopped here (the bus never knew it started)
                return
            log.debug("service %r started again after reconnection", self._name)

    # -- events -----------------------------------------------------------------------------
    def send_event(self, event_name: str, *args: Any) -> bool:
        """Send ``event_name`` with ``args`` to every proxy's listeners of that name.

        Returns False (and sends nothing) while the service is not started, so a stopped or
        refused service never speaks for the one that holds the name.
        """
        check_name(event_name, "event name")
        if event_name in RESERVED_EVENTS:
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
