"""The wrapper a service proxy hands out: the service's calls as attributes
(:class:`IpcBusServiceWrapper`; see :mod:`ipcbus.service`).

The wrapper reaches its proxy through :class:`ServiceProxy` (what it needs of an
:class:`~ipcbus.IpcBusServiceProxy`), so this module does not import the proxy's, which
makes the wrapper.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Protocol, TypeVar

from typing_extensions import Self

from .emitter import Listener

__all__ = ["IpcBusServiceWrapper", "ServiceProxy"]


class ServiceProxy(Protocol):
    """What a wrapper needs of its proxy."""

    _status: dict[str, Any]

    @property
    def name(self) -> str: ...

    @property
    def status(self) -> dict[str, Any]: ...

    def call(self, call_name: str, *args: Any) -> Any: ...

    def on(self, event_name: str, listener: Listener) -> Any: ...

    def once(self, event_name: str, listener: Listener) -> Any: ...

    def prepend_listener(self, event_name: str, listener: Listener) -> Any: ...

    def prepend_once_listener(self, event_name: str, listener: Listener) -> Any: ...

    def off(self, event_name: str, listener: Listener) -> Any: ...

    def remove_all_listeners(self, event_name: str | None = None) -> Any: ...

    def listeners(self, event_name: str) -> list[Listener]: ...

    def listener_count(self, event_name: str) -> int: ...

    def event_names(self) -> list[str]: ...


P = TypeVar("P", bound=ServiceProxy)


class IpcBusServiceWrapper(Generic[P]):
    """The service as an object: ``wrapper.add(1, 2)`` calls ``add`` (see
    :meth:`~ipcbus.IpcBusServiceProxy.call`), and ``wrapper.on("tick", handler)`` listens to
    its events.

    Attributes are the calls the service announced (``dir(wrapper)`` lists them); another name
    raises ``AttributeError``. A call wins over the wrapper's own names: a lamp service with
    calls ``on`` and ``off`` is switched with ``lamp.on()``; its events are then listened to on
    the proxy (``proxy.on("tick", handler)``), whose emitter methods never change meaning.
    """

    _proxy: P

    def __init__(self, proxy: P) -> None:
        object.__setattr__(self, "_proxy", proxy)

    @property
    def proxy(self) -> P:
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
            proxy: ServiceProxy = object.__getattribute__(self, "_proxy")
            if attr in (proxy._status.get("calls") or ()):
                return _call_of(proxy, attr)
        return object.__getattribute__(self, attr)

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("_"):
            raise AttributeError(attr)
        proxy: ServiceProxy = object.__getattribute__(self, "_proxy")
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


def _call_of(proxy: ServiceProxy, name: str) -> Callable[..., Any]:
    """``wrapper.<name>``: a function that calls ``name`` of the service."""
    def call(*args: Any) -> Any:
        return proxy.call(name, *args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Call {name!r} of service {proxy.name!r}."
    return call
