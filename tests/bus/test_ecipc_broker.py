"""Node peers on a Python broker: ``IpcBusBroker.create(ecipc=True)`` serves electron-common-ipc
16.0.4 clients (real Node processes) and ipcbus clients on one socket (issue 19, part 2)."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusRequestError,
                    IpcBusService, IpcBusServiceProxy)

from helpers.node import NodeProcess, node_client, untag, wait_for
from helpers import Collector

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def bus_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ecg-", dir="/tmp")
    path = os.path.join(d, "bus")
    broker = IpcBusBroker.create(ecipc=True).connect(path)
    try:
        yield path
    finally:
        broker.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node(bus_path: str) -> Iterator[NodeProcess]:
    """A Node process with one connected client named "n1"."""
    with node_client(bus_path) as proc:
        yield proc


@pytest.fixture
def py(bus_path: str, clients: Callable[..., IpcBusClient]) -> Callable[..., IpcBusClient]:
    """Connected Python clients (closed at the end), by peer name."""
    return lambda name="py": clients(bus_path, peer_name=name)


def _sync(client: IpcBusClient) -> Any:
    """A round trip to the Node process through the broker (its "/ping" listener): what the
    Node side sent before (subscriptions) is in the broker. Returns the Node peer."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return client.request("/ping", 5, "sync").event.sender
        except IpcBusRequestError:  # the Node peer's own subscription is not there yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_broadcasts_both_ways(node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    client = py()
    got = Collector()
    client.on("/n2p", got)
    node("on", client="n1", channel="/p2n")
    node_peer = _sync(client)
    assert node_peer.name == "n1"
    # the hub records a Node peer as such (a gateway connection), with pid 0: Node sends none
    assert (node_peer.process.type, node_peer.process.pid) == ("node", 0)
    values = [None, True, 7, -(2 ** 40), 1.5, "é", b"\x00\x01", [1, [2]], {"k": [b"\x02"]}]
    client.send("/p2n", *values)
    event = node.event()
    assert untag(event["args"]) == values
    assert event["sender"]["id"] == client.peer.id and event["sender"]["name"] == "py"
    node("send", client="n1", channel="/n2p", args=[1, "two", {"$bytes": "AQ=="}])
    ev, args = got.wait(1)[0]
    assert args == (1, "two", b"\x01") and ev.sender == node_peer


def test_send_to_and_requests_both_ways(node: NodeProcess,
                                        py: Callable[..., IpcBusClient]) -> None:
    client = py()
    client.on("/double", lambda event, x: event.request.resolve(x * 2))
    client.on("/refuse", lambda event: event.request.reject(KeyError("no")))
    direct = Collector()
    client.on("/direct", direct)
    node("on", client="n1", channel="/echo")
    node("on", client="n1", channel="/direct")
    node_peer = _sync(client)
    assert node("request", client="n1", channel="/double", timeout=3000, args=[21])[
        "payload"] == 42
    assert node("request", client="n1", channel="/refuse", timeout=3000, args=[])[
        "err"] == "KeyError: 'no'"
    started = time.monotonic()  # unlike on Node's broker, nobody listening fails at once
    assert "no listener" in node("request", client="n1", channel="/nobody", timeout=3000,
                                 args=[])["err"]
    assert time.monotonic() - started < 2
    assert client.request("/echo", 5, "hi").payload == ["hi"]
    assert client.request_to(node_peer, "/echo", 5, "only").payload == ["only"]
    node("sendTo", client="n1", target={"id": client.peer.id, "type": 1}, channel="/direct",
         args=["to py"])
    assert direct.wait(1)[0][1] == ("to py",)
    client.send_to(node_peer, "/direct", "to n1")
    seen = [(e["event"], e["args"]) for e in (node.event() for _ in range(3))]
    assert seen == [("/echo", ["hi"]), ("/echo", ["only"]), ("/direct", ["to n1"])]


def test_node_to_node_through_the_python_broker(bus_path: str, node: NodeProcess) -> None:
    other = NodeProcess("client", bus_path)
    try:
        n2 = other("connect", name="n2")["peer"]
        other("on", client="n2", channel="/nn")
        wait_for(lambda: any("/nn" in p["channels"] for p in _state(bus_path)), 10)
        node("send", client="n1", channel="/nn", args=["across", {"$bytes": "AA=="}])
        assert node("request", client="n1", channel="/nn", timeout=3000, args=[5])[
            "payload"] == [5]
        node("sendTo", client="n1", target=n2, channel="/nn", args=["direct"])
        events = [other.event() for _ in range(3)]
        assert [untag(e["args"]) for e in events] == [["across", b"\x00"], [5], ["direct"]]
        assert {e["sender"]["name"] for e in events} == {"n1"}
        with pytest.raises(AssertionError):
            other.event(timeout=0.3)  # each exactly once
    finally:
        other.close()


def _state(path: str) -> list[dict[str, Any]]:
    client = IpcBusClient.create().connect(path)
    try:
        peers: list[dict[str, Any]] = client.request("/ipcbus/queryState", 5).payload["peers"]
        return peers
    finally:
        client.close()


def test_services_both_ways_on_a_python_broker(node: NodeProcess,
                                               py: Callable[..., IpcBusClient]) -> None:
    class Impl:
        def mul(self, a: int, b: int) -> int:
            return a * b

    client = py("host")
    _sync(client)
    IpcBusService.create(client, "pysvc", Impl()).start()
    node("proxy", client="n1", name="pysvc", events=["tick"])
    assert node("call", name="pysvc", call="mul", args=[6, 7]) == {"result": 42}
    node("service", client="n1", name="nsvc")
    proxy = IpcBusServiceProxy.create(py("caller"), "nsvc")
    wrapper = proxy.connect(5)
    assert wrapper.add(2, 3) == 5
    with pytest.raises(IpcBusRequestError, match="boom"):
        proxy.call("fail", "boom")
    stopped = threading.Event()
    proxy.on("service-event-stop", lambda reason: stopped.set())
    node("serviceStop", name="nsvc")
    assert stopped.wait(5)
    proxy.close()


def test_node_peers_leave_with_their_connection(bus_path: str) -> None:
    proc = NodeProcess("client", bus_path)
    try:
        proc("connect", name="leaver")
        wait_for(lambda: any(p["name"] == "leaver" for p in _state(bus_path)), 10)
    finally:
        proc.close()
    wait_for(lambda: not any(p["name"] == "leaver" for p in _state(bus_path)), 10)


def test_malformed_node_traffic_closes_only_that_connection(
        bus_path: str, node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    from ipcbus.ecipc import _codec as C
    from ipcbus.ecipc import _envelope as E
    client = py()
    for garbage in (b"[Zxx", b"[s\xff\xff\xff\xff", C.array_of([C.encode({"kind": "XYZ"})]),
                    E.message("MES", "/p2n", {"id": "never-registered", "type": 1},
                              C.encode_array([1])),
                    C.array_of([C.encode([1, 2])])):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(bus_path)
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            raw.settimeout(10)
            while raw.recv(4096):
                pass  # the broker ends the connection (or we did): never a hang
    assert _sync(client).name == "n1"  # the broker and its other peers are fine


def test_tcp_with_ecipc_is_refused() -> None:
    with pytest.raises(IpcBusConnectionError, match="Unix socket"):
        IpcBusBroker.create(ecipc=True).connect(("127.0.0.1", 0))


_kinds = st.sampled_from(["HAN", "LICA", "LICR", "LICRA", "LIR", "SHT", "MES", "RQR", "QUST",
                          "BICOO", "XYZ"])
_jsonish = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40)
                        | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_peer = st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "n1"]) | st.text(max_size=4),
                               "type": st.integers(0, 6)}) | _jsonish
_headers = st.fixed_dictionaries(
    {"kind": _kinds},
    optional={"peer": _peer, "peers": st.lists(_peer, max_size=2),
              "channel": st.sampled_from(["/ping", "/x", "/electron-ipc-bus/ipc-service/s/call",
                                          "/electron-ipc-bus/ipc-service/s/event"])
              | st.text(max_size=6) | _jsonish,
              "target": _peer, "request": st.fixed_dictionaries(
                  {"id": st.text(max_size=4), "channel": st.text(max_size=4)},
                  optional={"resolve": st.booleans()}) | _jsonish})


@pytest.mark.timeout(120)
@given(st.lists(st.tuples(_headers, st.none() | st.lists(_jsonish, max_size=3)), min_size=1,
                max_size=8))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_gateway_survives_arbitrary_node_packets(
        bus_path: str, node: NodeProcess, packets: list[tuple[dict[str, Any], Any]]) -> None:
    """Well-framed packets with any header a Node peer could send: the broker serves on."""
    from ipcbus.ecipc import _codec as C
    stream = b"".join(C.array_of([C.encode(h)] if args is None else
                                 [C.encode(h), C.encode_array(args)])
                      for h, args in packets)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(bus_path)
        raw.sendall(stream)
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(10)
        try:
            while raw.recv(65536):
                pass
        except ConnectionResetError:
            pass
    client = IpcBusClient.create().connect(bus_path)
    try:
        assert _sync(client).name == "n1"
    finally:
        client.close()
