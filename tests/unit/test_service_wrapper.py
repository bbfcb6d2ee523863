"""The wrapper a service proxy hands out (``ipcbus._service_wrapper``), on a fake proxy: the
service's calls as attributes, a call shadowing the wrapper's own names, and the emitter
surface passed through."""
from __future__ import annotations

from typing import Any

import pytest

from ipcbus._service_wrapper import IpcBusServiceWrapper
from ipcbus.emitter import Emitter, Listener


class FakeProxy(Emitter[str]):
    """What the wrapper needs of a proxy: its name, its last status and ``call``."""

    def __init__(self, calls: list[Any]) -> None:
        super().__init__()
        self.name = "lamp"
        self._status: dict[str, Any] = {"started": True, "calls": calls, "host": None}
        self.made: list[tuple[str, tuple[Any, ...]]] = []

    @property
    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def call(self, call_name: str, *args: Any) -> Any:
        self.made.append((call_name, args))
        return f"{call_name} done"


def test_an_announced_call_is_an_attribute() -> None:
    proxy = FakeProxy(["dim"])
    wrapper = IpcBusServiceWrapper(proxy)
    assert wrapper.dim(30) == "dim done"
    assert proxy.made == [("dim", (30,))]
    assert wrapper.dim.__name__ == "dim" and "lamp" in (wrapper.dim.__doc__ or "")
    assert "dim" in dir(wrapper)


def test_another_name_raises_attribute_error_listing_the_calls() -> None:
    wrapper = IpcBusServiceWrapper(FakeProxy(["dim", "blink"]))
    with pytest.raises(AttributeError, match=r"service 'lamp' has no call 'glow' \(its calls:"
                                             r" dim, blink\)"):
        wrapper.glow()
    with pytest.raises(AttributeError, match="none announced"):
        IpcBusServiceWrapper(FakeProxy([])).glow()
    with pytest.raises(AttributeError):
        wrapper._secret  # private names are never calls


def test_a_call_shadows_the_wrappers_own_name_but_not_the_proxys() -> None:
    proxy = FakeProxy(["on", "off"])
    wrapper = IpcBusServiceWrapper(proxy)
    # (getattr: to a type checker, wrapper.on is the emitter method it shadows)
    assert getattr(wrapper, "on")() == "on done" and getattr(wrapper, "off")() == "off done"
    assert proxy.made == [("on", ()), ("off", ())]
    got: list[Any] = []
    listener: Listener = got.append
    proxy.on("tick", listener)  # the proxy's emitter methods never change meaning
    assert proxy.listener_count("tick") == 1


def test_the_emitter_surface_reaches_the_proxy_and_chains() -> None:
    proxy = FakeProxy(["dim"])
    wrapper = IpcBusServiceWrapper(proxy)
    seen: list[Any] = []

    def listener(*args: Any) -> None:
        seen.append(args)

    assert wrapper.on("tick", listener).once("tock", listener) is wrapper
    assert proxy.listener_count("tick") == 1 and wrapper.listener_count("tock") == 1
    assert sorted(wrapper.event_names()) == ["tick", "tock"]
    assert wrapper.listeners("tick") == [listener]
    wrapper.off("tick", listener).remove_all_listeners()
    assert proxy.event_names() == []
    assert wrapper.proxy is proxy


def test_the_wrapper_is_read_only() -> None:
    wrapper = IpcBusServiceWrapper(FakeProxy(["dim"]))
    with pytest.raises(AttributeError, match="read-only"):
        wrapper.dim = lambda: None
