"""Channels under /ipcbus/ are reserved (issue 14, Trust): the public API refuses to send
there, at the call and before anything is written; direct channels, the hub's two queries and
listening stay open; the library's services use the private calls."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusRequestError, IpcBusService
from ipcbus import IpcBusServiceProxy
from ipcbus import _protocol as P

from helpers import Collector, sync

RESERVED = ["/ipcbus/", "/ipcbus/x", "/ipcbus/queryStateX", P.service_call_channel("clock"),
            P.service_event_channel("clock"), "/ipcbus/directory"]


def _calls(c: IpcBusClient, other: IpcBusClient) -> list[tuple[str, Callable[[str], Any]]]:
    return [
        ("send", lambda ch: c.send(ch, 1)),
        ("send_to", lambda ch: c.send_to(other.peer, ch, 1)),
        ("request", lambda ch: c.request(ch, 1.0, 1)),
        ("request_to", lambda ch: c.request_to(other.peer, ch, 1.0, 1)),
        ("request_async", lambda ch: c.request_async(ch, 1.0, 1)),
        ("post_message", lambda ch: c.post_message(ch, 1)),
        ("post_message_to", lambda ch: c.post_message_to(other.peer, ch, 1)),
    ]


@pytest.mark.parametrize("channel", RESERVED)
@pytest.mark.timeout(30)
def test_the_public_api_refuses_reserved_channels(
        broker: IpcBusBroker, sock_path: str, clients: Callable[..., IpcBusClient],
        channel: str) -> None:
    c, other = clients(sock_path), clients(sock_path)
    got = Collector()
    other.on(channel, got)  # listening is allowed
    sync(other)
    for name, call in _calls(c, other):
        for _ in range(2):  # the second time from the cache of checked names
            with pytest.raises(ValueError, match="reserved"):
                call(channel)
    sync(c)
    assert got.items == [] and c.connected


@pytest.mark.timeout(30)
def test_hub_queries_and_direct_channels_stay_open(
        broker: IpcBusBroker, sock_path: str, clients: Callable[..., IpcBusClient]) -> None:
    c, other = clients(sock_path), clients(sock_path)
    assert c.request("/ipcbus/queryState", 5.0).payload["pid"] == broker.process.pid
    assert c.request_async("/ipcbus/serviceAvailable", 5.0, "none").result(5).payload is False
    for _ in range(2):  # never remembered as open to sends
        with pytest.raises(ValueError, match="reserved"):
            c.send("/ipcbus/queryState")
    direct = other.create_direct_channel()
    got = Collector()
    other.on(direct, got)
    other.on(direct, lambda event, *a: event.request and event.request.resolve("ok"))
    sync(other)
    c.send(direct, 1)
    c.send_to(other.peer, direct, 2)
    assert c.request(direct, 5.0).payload == "ok"
    assert c.request_to(other.peer, direct, 5.0).payload == "ok"
    got.wait(4)


@pytest.mark.timeout(30)
def test_services_still_work_through_the_private_calls(
        broker: IpcBusBroker, sock_path: str, clients: Callable[..., IpcBusClient]) -> None:
    host, user = clients(sock_path), clients(sock_path)
    service = IpcBusService.create(host, "clock")
    service.register_call_handler("now", lambda: 42)
    service.start()
    proxy = IpcBusServiceProxy.create(user, "clock")
    try:
        ticks = Collector()
        proxy.connect(5.0)
        proxy.on("tick", ticks)
        assert proxy.call("now") == 42
        assert proxy.call_async("now").result(5) == 42
        proxy.send_call("now")
        service.send_event("tick", 1)
        ticks.wait(1)
        with pytest.raises(IpcBusRequestError):
            proxy.call("missing")
    finally:
        proxy.close()
        service.stop()
