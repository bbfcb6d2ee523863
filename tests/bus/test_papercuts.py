"""API papercuts of issue 16: a service whose calls are named like the wrapper's emitter
methods, and post_message to a channel (or peer) nobody listens on."""
from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestError,
                    IpcBusService, IpcBusServiceProxy, create_channel)

from helpers import Collector, sync


class Lamp:
    """A service whose calls shadow the wrapper's emitter names."""

    def __init__(self) -> None:
        self.lit = False

    def on(self) -> str:
        self.lit = True
        return "on"

    def off(self) -> str:
        self.lit = False
        return "off"

    def once(self, n: int) -> int:
        return n + 1

    def close(self) -> str:
        return "closed"

    def proxy(self) -> str:
        return "not the proxy"

    def listeners(self) -> list[int]:
        return [1, 2]


def test_service_calls_named_like_emitter_methods(ipcbus_broker: IpcBusBroker) -> None:
    address = ipcbus_broker.address
    with IpcBusClient.create().connect(address) as host, \
            IpcBusClient.create().connect(address) as user:
        impl = Lamp()
        service = IpcBusService.create(host, "lamp", impl).start()
        proxy = IpcBusServiceProxy.create(user, "lamp", call_timeout=5.0)
        lamp: Any = proxy.connect(10.0)  # a dynamic object: its calls are attributes
        assert lamp.on() == "on" and impl.lit
        assert lamp.off() == "off" and not impl.lit
        assert lamp.once(1) == 2
        assert lamp.close() == "closed"
        assert lamp.proxy() == "not the proxy"
        assert lamp.listeners() == [1, 2]
        assert {"on", "off", "once", "close"} <= set(dir(lamp))
        # The proxy's emitter keeps its meaning, and wrapper names the service lacks still work.
        ticks = Collector()
        proxy.on("tick", ticks)
        lamp.prepend_listener("tick", ticks)
        service.send_event("tick", 7)
        assert len(ticks.wait(2)) == 2
        assert lamp.listener_count("tick") == 2
        with pytest.raises(AttributeError, match="no call 'dim'"):
            lamp.dim()
        proxy.close()
        service.stop()


def test_post_message_to_nobody_raises_and_keeps_the_handles(broker: IpcBusBroker,
                                                            clients: Any) -> None:
    sender = clients(broker.address)
    mine, theirs = create_channel()
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        for ports in ([theirs, w, a], None, []):
            with pytest.raises(IpcBusRequestError, match="no listener for 'nobody'"):
                sender.post_message("nobody", {"n": 1}, ports=ports)
        # the handles are still open and still ours
        theirs.send_bytes(b"still mine")
        assert mine.recv_bytes() == b"still mine"
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
        a.sendall(b"y")
        assert b.recv(1) == b"y"
        # once someone listens, the same call is delivered
        listener = clients(broker.address)
        got = Collector()
        listener.on("nobody", got)
        sync(listener)
        sender.post_message("nobody", "now", ports=[w])
        (event, args), = got.wait(1)
        assert args == ("now",)
        for fd in event.ports:
            os.close(fd)
        sender.post_message("nobody", "plain")
        assert got.wait(2)[1][1] == ("plain",)
        with pytest.raises(IpcBusRequestError, match="has no listener for 'elsewhere'"):
            sender.post_message_to(listener.peer, "elsewhere", 1, ports=[w])
        with pytest.raises(IpcBusRequestError, match="no peer"):
            sender.post_message_to("no-such-peer", "nobody", 1)
    finally:
        for conn in (mine, theirs):
            conn.close()
        for sock in (a, b):
            sock.close()
        os.close(r)
        os.close(w)


def test_post_message_to_nobody_through_a_linked_bridge(broker: IpcBusBroker,
                                                       clients: Any) -> None:
    """The broker decides for the whole bus, counting the listeners behind the link."""
    with IpcBusBridge.create().connect(broker.address):
        local = IpcBusClient.create().connect()
        other_local = IpcBusClient.create().connect()
        remote = clients(broker.address)
        try:
            r, w = os.pipe()
            with pytest.raises(IpcBusRequestError, match="no listener"):
                local.post_message("nobody", 1, ports=[w])
            with pytest.raises(IpcBusRequestError, match="no listener"):
                remote.post_message("nobody", 1, ports=[w])
            got = Collector()
            other_local.on("here", got)          # a listener on the bridge's side only
            sync(other_local)
            local.post_message("here", "from the bridge side", ports=[w])
            remote.post_message("here", "from the broker side", ports=[w])
            items = got.wait(2)
            assert sorted(args for _, args in items) == [("from the bridge side",),
                                                         ("from the broker side",)]
            for event, _ in items:
                for fd in event.ports:
                    os.close(fd)
            os.close(r)
            os.close(w)
        finally:
            local.close()
            other_local.close()


def test_post_message_without_ports_over_tcp() -> None:
    """No handles: TCP carries it, acknowledged like the rest (and refused when nobody listens)."""
    with IpcBusBroker.create().connect(port=0) as broker:
        with IpcBusClient.create().connect(broker.address) as client:
            got = Collector()
            client.on("x", got)
            client.post_message("x", "hi")
            assert got.wait(1)[0][1] == ("hi",)
            with pytest.raises(IpcBusRequestError, match="no listener for 'nobody'"):
                client.post_message("nobody", 1)
