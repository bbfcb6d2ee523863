"""Python peers on electron-common-ipc's bus (issue 19): a real Node broker and real Node clients
of electron-common-ipc 16.0.4 (tests/node), driven as subprocesses."""
from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from ipcbus import (IpcBusClient, IpcBusConnectionError, IpcBusPeer, IpcBusRequestError,
                    IpcBusService, IpcBusServiceProxy, IpcBusTimeoutError)
from ipcbus.ecipc.client import EcipcClient

from helpers.node import NodeProcess, node_client, tag, untag, wait_for
from helpers import Collector

pytestmark = pytest.mark.timeout(60)
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def node_broker() -> Iterator[str]:
    """An electron-common-ipc broker on a Unix socket; yields the "ecipc:" address."""
    d = tempfile.mkdtemp(prefix="ecb-", dir="/tmp")
    path = os.path.join(d, "bus.sock")
    broker = NodeProcess("broker", path)
    try:
        yield f"ecipc:{path}"
        assert broker.alive(), "the Node broker died during the tests"
    finally:
        broker.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node(node_broker: str) -> Iterator[NodeProcess]:
    """A Node process with one connected client named "n1"."""
    with node_client(node_broker[len("ecipc:"):]) as proc:
        yield proc


@pytest.fixture
def py(node_broker: str, clients: Callable[..., IpcBusClient]) -> Callable[..., IpcBusClient]:
    """Connected Python clients (closed at the end), by peer name."""
    return lambda name="py": clients(node_broker, peer_name=name)


def _node_peer(node: NodeProcess) -> dict[str, Any]:
    return node("connect", name="n2")["peer"]  # type: ignore[no-any-return]


def _sync(node: NodeProcess, client: IpcBusClient) -> None:
    """What both sides sent before (subscriptions included) has reached the broker: a request
    from Python that the Node process answers (one connection each way, in order)."""
    assert client.request("/ping", 5, "sync").payload == ["sync"]


VALUES: list[Any] = [None, True, False, 0, -7, 2 ** 40, -(2 ** 53), 1.5, "héllo ✓", b"\x00\xff",
                     [1, [2, "x"]], {"a": 1, "b": [True, None], "c": {"d": b"\x01"}},
                     dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)]


def test_python_broadcast_reaches_node_with_the_value_mapping(
        node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    client = py("sender")
    assert isinstance(client, IpcBusClient) and isinstance(client, EcipcClient)
    node("on", client="n1", channel="/p2n")
    _sync(node, client)
    client.send("/p2n", *VALUES)
    event = node.event()
    assert event["event"] == "/p2n"
    assert untag(event["args"]) == VALUES
    assert event["sender"]["id"] == client.peer.id
    assert event["sender"]["name"] == "sender"
    assert event["sender"]["type"] == 1


def test_node_broadcast_reaches_python(node: NodeProcess,
                                       py: Callable[..., IpcBusClient]) -> None:
    client = py()
    got = Collector()
    client.on("/n2p", got)
    _sync(node, client)
    node("send", client="n1", channel="/n2p", args=tag(VALUES))
    event, args = got.wait(1)[0]
    assert list(args) == VALUES
    assert event.channel == "/n2p" and event.request is None
    assert isinstance(event.sender, IpcBusPeer)
    assert event.sender.process.type == "node" and event.sender.name == "n1"


def test_send_to_both_ways(node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    a, b = py("a"), py("b")
    got_a, got_b = Collector(), Collector()
    a.on("/direct", got_a)
    b.on("/direct", got_b)
    n2 = _node_peer(node)
    node("on", client="n1", channel="/direct")
    node("on", client="n2", channel="/direct")
    _sync(node, a)
    node("sendTo", client="n1", target={"id": b.peer.id, "type": 1}, channel="/direct",
         args=["to b"])
    got_b.wait(1)
    a.send_to(n2["id"], "/direct", "to n2")
    event = node.event()
    assert (event["client"], event["args"]) == ("n2", ["to n2"])
    a.send_to(b.peer, "/direct", "local")  # a peer of this process: delivered here only
    got_b.wait(2)
    assert got_a.args == [] and got_b.args == [("to b",), ("local",)]


def test_requests_both_ways(node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    client = py()
    client.on("/py-answers", lambda event, *args: event.request.resolve({"got": list(args)}))
    client.on("/py-rejects", lambda event, *args: event.request.reject(ValueError("nope")))
    node("on", client="n1", channel="/node-answers")
    node("answer", channel="/node-rejects", mode="reject", value="no way")
    node("on", client="n1", channel="/node-rejects")
    _sync(node, client)
    response = client.request("/node-answers", 5, 1, "two")
    assert response.payload == [1, "two"]
    assert response.event.sender is not None and response.event.sender.process.type == "node"
    with pytest.raises(IpcBusRequestError) as info:
        client.request("/node-rejects", 5)
    assert info.value.response is not None and info.value.response.err == "no way"
    n2 = _node_peer(node)
    node("on", client="n2", channel="/node-answers")
    response = client.request_to(n2["id"], "/node-answers", 5, "only n2")
    assert response.payload == ["only n2"] and response.event.sender is not None
    assert response.event.sender.id == n2["id"]
    future = client.request_async("/node-answers", 5, b"\x01")
    assert future.result(5).payload == [b"\x01"]
    assert node("request", client="n1", channel="/py-answers", timeout=5000,
                args=[3, "x"])["payload"] == {"got": [3, "x"]}
    err = node("request", client="n1", channel="/py-rejects", timeout=5000, args=[])["err"]
    assert err == "ValueError: nope"
    for _ in range(4):
        node.event()  # the agent's listeners saw the requests


def test_no_listener_is_a_timeout(py: Callable[..., IpcBusClient]) -> None:
    client = py()
    with pytest.raises(IpcBusTimeoutError, match="electron-common-ipc"):
        client.request("/nobody-listens", 0.3)


def test_clients_of_a_process_share_one_connection(
        node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    a, b = py("a"), py("b")
    assert a._econn is b._econn  # type: ignore[attr-defined]
    assert a.peer.id != b.peer.id
    got_a, got_b = Collector(), Collector()
    a.on("/local", got_a)
    b.on("/local", got_b)
    b.on("/local-req", lambda event, x: event.request.resolve(x * 2))
    a.send("/local", (1, 2))  # the sender's own listeners too, through the codec: tuple -> list
    assert got_a.wait(1)[0][1] == ([1, 2],) and got_b.wait(1)[0][0].sender == a.peer
    assert a.request("/local-req", 5, 21).payload == 42
    node("on", client="n1", channel="/local")
    _sync(node, a)
    a.send("/local", "everyone")
    assert node.event()["args"] == ["everyone"]
    got_a.wait(2)
    got_b.wait(2)


def test_listener_may_request_what_this_process_answers(
        node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    a, b = py("a"), py("b")
    b.on("/inner", lambda event: event.request.resolve("inner answer"))
    results: list[Any] = []
    done = threading.Event()

    def outer(event: Any) -> None:
        results.append(a.request("/inner", 5).payload)  # nested dispatch: no deadlock
        node_answer = a.request("/node-echo", 5, "from a listener").payload
        results.append(node_answer)
        done.set()

    a.on("/outer", outer)
    node("on", client="n1", channel="/node-echo")
    _sync(node, a)
    a.send("/outer")
    assert done.wait(10)
    assert results == ["inner answer", ["from a listener"]]


def test_listeners_before_connect_and_off(node: NodeProcess, node_broker: str) -> None:
    client = IpcBusClient.create()
    got, marker = Collector(), Collector()
    client.on("/early", got)
    client.connect(node_broker)
    try:
        client.on("/marker", marker)
        _sync(node, client)
        node("send", client="n1", channel="/early", args=[1])
        got.wait(1)
        client.off("/early", got)
        _sync(node, client)
        node("send", client="n1", channel="/early", args=[2])  # not for us any more...
        node("send", client="n1", channel="/marker", args=[3])  # ...and this comes after it
        marker.wait(1)
        assert got.args == [(1,)]
    finally:
        client.close()


def test_what_cannot_cross_raises_at_the_call(node: NodeProcess,
                                              py: Callable[..., IpcBusClient]) -> None:
    client = py()
    node("on", client="n1", channel="/bad")
    _sync(node, client)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        client.send("/bad", 2 ** 53 + 1)
    with pytest.raises(TypeError):
        client.send("/bad", {1, 2})
    with pytest.raises(TypeError):
        client.request("/bad", 1, object())
    with pytest.raises(IpcBusConnectionError, match="descriptors"):
        a, b = socket.socketpair()
        try:
            client.post_message("/bad", "x", ports=[a])
        finally:
            a.close()
            b.close()
    with pytest.raises(IpcBusRequestError, match="not available"):
        client.request("/ipcbus/queryState", 1)
    with pytest.raises(ValueError, match="authentication"):
        IpcBusClient.create().connect(f"ecipc:{os.getpid()}", authkey=b"k")
    client.post_message("/bad", "ok")  # nothing of the above was sent: this is the first
    assert node.event()["args"] == ["ok"]


def test_python_service_and_node_proxy(node: NodeProcess,
                                       py: Callable[..., IpcBusClient]) -> None:
    class Impl:
        def mul(self, a: int, b: int) -> int:
            return a * b

        def fail(self) -> None:
            raise KeyError("missing")

    host = py("host")
    service = IpcBusService.create(host, "pysvc", Impl()).start()
    node("proxy", client="n1", name="pysvc", events=["tick"])
    assert node("call", name="pysvc", call="mul", args=[6, 7]) == {"result": 42}
    assert node("call", name="pysvc", call="fail", args=[]) == {"err": "KeyError: 'missing'"}
    assert "Function" not in str(node("call", name="pysvc", call="nope", args=[]))
    status = node("status", name="pysvc")
    assert status["started"] is True and sorted(status["callHandlers"]) == ["fail", "mul"]
    service.send_event("tick", {"n": 1}, b"\x02")
    event = node.event()
    assert (event["serviceEvent"], untag(event["args"])) == ("tick", [{"n": 1}, b"\x02"])
    service.stop()


def test_node_service_and_python_proxy(node: NodeProcess,
                                       py: Callable[..., IpcBusClient]) -> None:
    client = py("caller")
    proxy = IpcBusServiceProxy.create(client, "nsvc")  # before the service starts
    ticks = Collector()
    proxy.on("tick", lambda *args: ticks(None, *args))
    stopped = threading.Event()
    proxy.on("service-event-stop", lambda reason: stopped.set())
    _sync(node, client)  # the proxy's subscription is in the broker before the start
    node("service", client="n1", name="nsvc")
    wrapper = proxy.connect(5)
    assert proxy.is_started and sorted(proxy.status["calls"]) == ["add", "echo", "fail",
                                                                   "later"]
    assert wrapper.add(2, 3) == 5
    assert proxy.call("echo", b"\x01", [1]) == [b"\x01", [1]]
    assert proxy.call("later", 20, "late") == "late"
    with pytest.raises(IpcBusRequestError, match="Error: boom"):
        proxy.call("fail", "boom")
    with pytest.raises(IpcBusRequestError, match="Function unknown"):
        proxy.call("nope")
    node("serviceEvent", name="nsvc", event="tick", args=[1, 2])
    node("serviceEmit", name="nsvc", event="tick", args=[3])  # the impl's own emit
    assert [a for _, a in ticks.wait(2)] == [(1, 2), (3,)]
    assert proxy.get_status(5)["started"] is True
    node("serviceStop", name="nsvc")
    assert stopped.wait(5) and not proxy.is_started
    proxy.close()


def test_python_service_and_proxy_through_node_broker(py: Callable[..., IpcBusClient]) -> None:
    host, caller = py("host"), py("caller")
    service = IpcBusService.create(host, "pp").register_call_handler("inc", lambda x: x + 1)
    proxy = IpcBusServiceProxy.create(caller, "pp")
    service.start()
    proxy.connect(5)
    assert proxy.call("inc", 41) == 42
    assert proxy.status["host"]["id"] == host.peer.id
    service.stop()
    wait_for(lambda: not proxy.is_started)
    proxy.close()


def _child_peer(address: str, ready: Any) -> None:
    client = IpcBusClient.create().connect(address, peer_name="child")
    done = threading.Event()

    def answer(event: Any, x: int) -> None:
        event.request.resolve(x + 1)
        done.set()

    client.on("/child", answer)
    ready.send(client.peer.id)
    done.wait(20)
    client.close()


def test_python_processes_meet_on_the_node_bus(node_broker: str,
                                               py: Callable[..., IpcBusClient]) -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(target=_child_peer,
                                                         args=(node_broker, writer))
    child.start()
    try:
        assert reader.poll(20)
        child_id = reader.recv()
        client = py()
        response = client.request_to(child_id, "/child", 10, 1)
        assert response.payload == 2
        assert response.event.sender is not None
        sender = response.event.sender.process
        assert (sender.type, sender.pid) == ("socket", child.pid)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
        reader.close()
        writer.close()


def test_tcp_addresses_and_environment(node: NodeProcess, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = NodeProcess("broker", port)
    try:
        for address in (f"ecipc:{port}", f"ecipc:127.0.0.1:{port}"):
            a = IpcBusClient.create().connect(address)
            try:
                a.on("/tcp", lambda event: event.request.resolve("tcp ok"))
                assert a.request("/tcp", 5).payload == "tcp ok"
            finally:
                a.close()
        monkeypatch.setenv("IPCBUS_ADDRESS", f"ecipc:{port}")
        b = IpcBusClient.create().connect()
        try:
            assert isinstance(b, EcipcClient)
        finally:
            b.close()
    finally:
        broker.close()


def test_broker_death_is_noticed() -> None:
    d = tempfile.mkdtemp(prefix="ecd-", dir="/tmp")
    path = os.path.join(d, "bus.sock")
    broker = NodeProcess("broker", path)
    try:
        client = IpcBusClient.create().connect(f"ecipc:{path}")
        closed = threading.Event()
        client.on_closed(closed.set)
        future = client.request_async("/never", -1)
        broker.proc.kill()
        assert closed.wait(2)
        with pytest.raises(IpcBusConnectionError):
            future.result(2)
        with pytest.raises(IpcBusConnectionError):
            client.send("/after", 1)
        client.close()
        assert not client.connected
    finally:
        broker.close()
        shutil.rmtree(d, ignore_errors=True)


def test_close_then_connect_again(node_broker: str, sock_path: str) -> None:
    """A closed ecipc client may connect again, to the Node bus or to an ipcbus broker."""
    from ipcbus import IpcBusBroker
    client = IpcBusClient.create().connect(node_broker)
    client.close()
    client.connect(node_broker)
    client.close()
    with IpcBusBroker.create().connect(sock_path):
        client.connect(sock_path)
        try:
            assert type(client) is IpcBusClient
            client.on("/back", lambda event: event.request.resolve("plain"))
            assert client.request("/back", 5).payload == "plain"
        finally:
            client.close()


def test_the_example_runs() -> None:
    """examples/node_bus.js and examples/node_bus.py, as the README tells a user to run them."""
    import subprocess
    import sys
    from helpers.node import require_node
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = tempfile.mkdtemp(prefix="ecx-", dir="/tmp")
    path = os.path.join(d, "app.bus")
    app = subprocess.Popen([require_node(), os.path.join(root, "examples", "node_bus.js"), path],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        assert "ready" in app.stdout.readline()
        py_run = subprocess.run([sys.executable, os.path.join(root, "examples", "node_bus.py"),
                                 path], capture_output=True, text=True, timeout=30)
        assert py_run.returncode == 0, py_run.stderr
        assert "clock.add(2, 3) = 5" in py_run.stdout and "Node said bye" in py_run.stdout
        assert app.wait(10) == 0
        node_out = app.stdout.read()
        assert "py-math.hypot(3, 4) = 5" in node_out and '{"answer":42}' in node_out
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(5)
        if app.stdout is not None:
            app.stdout.close()
        shutil.rmtree(d, ignore_errors=True)


def test_slow_listener_does_not_delay_answers(node: NodeProcess,
                                              py: Callable[..., IpcBusClient]) -> None:
    client = py()
    busy, release = threading.Event(), threading.Event()

    def slow(event: Any) -> None:
        busy.set()
        release.wait(10)

    client.on("/slow", slow)
    _sync(node, client)
    node("send", client="n1", channel="/slow", args=[])
    try:
        assert busy.wait(5)
        started = time.monotonic()
        assert client.request("/ping", 5, "meanwhile").payload == ["meanwhile"]
        assert time.monotonic() - started < 2.0
    finally:
        release.set()


def test_memory_stays_bounded_behind_a_stuck_listener(node: NodeProcess,
                                                      py: Callable[..., IpcBusClient]) -> None:
    from ipcbus.ecipc._connection import DISPATCH_BUDGET
    client = py()
    release = threading.Event()
    got = Collector()
    first = threading.Event()

    def stuck(event: Any, seq: int, payload: bytes) -> None:
        first.set()
        release.wait(20)
        got(event, seq)

    client.on("/flood", stuck)
    _sync(node, client)
    count, size = 40, 1 << 20  # 40 MiB, over twice the dispatch budget
    node("flood", client="n1", channel="/flood", count=count, size=size)
    try:
        assert first.wait(10)
        conn = client._econn  # type: ignore[attr-defined]
        wait_for(lambda: conn.queued > DISPATCH_BUDGET, 10)
        time.sleep(0.3)  # reading has stopped: the queue does not grow past the budget
        assert conn.queued <= DISPATCH_BUDGET + 2 * size
    finally:
        release.set()
    assert [a for _, a in got.wait(count, 30)] == [(i,) for i in range(count)]


def test_close_from_a_listener_and_on_closed(node: NodeProcess, node_broker: str) -> None:
    client = IpcBusClient.create().connect(node_broker)
    closed = threading.Event()
    client.on_closed(closed.set)
    client.on("/close-me", lambda event: client.close())
    _sync(node, client)
    node("send", client="n1", channel="/close-me", args=[])
    assert closed.wait(5)
    with pytest.raises(IpcBusConnectionError):
        client.send("/x")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_cannot_use_the_parents_connection(
        node: NodeProcess, py: Callable[..., IpcBusClient]) -> None:
    client = py()
    pid = os.fork()
    if pid == 0:  # the child: the inherited client must refuse, not corrupt the stream
        code = 1
        try:
            client.send("/from-child", 1)
        except IpcBusConnectionError:
            code = 0
        except BaseException:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert client.request("/ping", 5, "parent").payload == ["parent"]  # still fine here


def test_a_name_that_cannot_cross_opens_nothing(node_broker: str) -> None:
    from ipcbus.ecipc._connection import connections
    before = connections.items()
    with pytest.raises(ValueError):
        IpcBusClient.create().connect(node_broker, peer_name="\ud800")
    assert connections.items() == before
