"""Faults: a broker that dies, graceful close, TCP and its authkey, the Unix socket's access
rules, clients inherited through fork, stale socket files, garbage and silence on the wire.

Cross-process tests run under ``spawn`` and ``fork`` (the ``ctx`` fixture). Children are
module-level functions that report through multiprocessing queues; they are always joined with
a bound and killed in a ``finally``. Children wait for "stop" on a pipe rather than an Event:
setting an Event a SIGKILLed process was waiting on can block forever.

Times measured in a child are ``time.monotonic()`` stamps compared with the parent's: on Linux
that clock (CLOCK_MONOTONIC) is system-wide.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import socket
import stat
import threading
import time
from typing import Any, Callable

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusConnectionError
from ipcbus import _protocol as P
from ipcbus import _transport as T
from ipcbus._protocol import Kind

from helpers import Children, Collector, elapsed, sync, wait_until

READY_TIMEOUT = 30.0


# -- children (module level, so that spawn can import them) -----------------------------------
def _client_sees_broker_death(path: str, ready_q: Any, result_q: Any) -> None:
    """Connect, leave a request pending, and report what happens when the broker dies."""
    client = IpcBusClient.create().connect(path, peer_name="victim")
    closed = threading.Event()
    stamps: dict[str, Any] = {"closed_calls": 0}

    def on_closed() -> None:
        stamps["closed_calls"] += 1
        stamps.setdefault("closed_at", time.monotonic())
        closed.set()

    client.on_closed(on_closed)
    client.on("hang", lambda event, *args: None)  # receives the request, never answers
    sync(client)
    fut = client.request_async("hang", 30)
    sync(client)
    ready_q.put(os.getpid())

    report: dict[str, Any] = {}
    try:
        fut.result(timeout=20)
        report["request"] = ("answered", False)
    except BaseException as exc:
        report["request_at"] = time.monotonic()
        report["request"] = (type(exc).__name__, isinstance(exc, IpcBusConnectionError))
    report["closed"] = closed.wait(10)
    report["closed_at"] = stamps.get("closed_at")
    for name, call in (("send", lambda: client.send("x", 1)),
                       ("request", lambda: client.request("x", 1))):
        try:
            call()
            report[name] = ("no error", False)
        except BaseException as exc:
            report[name] = (type(exc).__name__, isinstance(exc, IpcBusConnectionError))
    report["closed_calls"] = stamps["closed_calls"]
    result_q.put(report)
    client.close()


def _flood_receiver(path: str, n: int, ready_q: Any, result_q: Any, stop: Any) -> None:
    client = IpcBusClient.create().connect(path, peer_name="flood-receiver")
    got: list[Any] = []
    done = threading.Event()

    def listener(event: Any, *args: Any) -> None:
        got.append(args[0] if len(args) == 1 else args)
        if len(got) >= n:
            done.set()

    client.on("flood", listener)
    sync(client)
    ready_q.put(os.getpid())
    done.wait(30)
    sync(client)
    result_q.put({"count": len(got), "in_order": got == list(range(n)),
                  "first": got[:3], "last": got[-3:]})
    stop.poll(30)
    client.close()


def _tcp_peer(address: Any, ready_q: Any, go: Any, result_q: Any, stop: Any) -> None:
    client = IpcBusClient.create().connect(tuple(address), peer_name="tcp-child")
    client.on("tcp-echo", lambda e, *a: e.request.resolve({"pid": os.getpid(), "args": list(a)}))
    sync(client)
    ready_q.put(os.getpid())
    if go.poll(30):
        try:
            r = client.request("tcp-parent", 5, "hi")
            assert r.event.sender is not None
            result_q.put(("ok", r.payload, r.event.sender.process.pid))
        except BaseException as exc:
            result_q.put(("error", repr(exc), None))
    stop.poll(30)
    client.close()


def _use_inherited_client(client: IpcBusClient, result_q: Any) -> None:
    """Fork child: try to use the parent's client object; report what each call raised."""
    out: dict[str, Any] = {}
    calls = (("send", lambda: client.send("fork-chan", "from-child")),
             ("send_to", lambda: client.send_to(client.peer, "fork-chan", "from-child")),
             ("request", lambda: client.request("fork-chan", 1, "from-child")),
             ("request_async", lambda: client.request_async("fork-chan", 1, "from-child")))
    for name, call in calls:
        try:
            call()
            out[name] = ("no error", False, "")
        except BaseException as exc:
            out[name] = (type(exc).__name__, isinstance(exc, IpcBusConnectionError), str(exc))
    result_q.put(out)


# -- helpers -----------------------------------------------------------------------------------
def wait_eof(sock: socket.socket, timeout: float) -> float | None:
    """Read until the other side closes; the seconds it took, or None if it did not."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0


def echo_canary(client: IpcBusClient) -> None:
    client.on("canary", lambda e, x: e.request.resolve(["canary", x]))
    sync(client)


# -- the broker dies ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_broker_killed_client_in_this_process(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    c = clients(broker.address)
    closed_at: list[float] = []
    closed = threading.Event()
    def on_closed() -> None:
        closed_at.append(time.monotonic())
        closed.set()

    c.on_closed(on_closed)
    c.on("hang", lambda e, *a: None)
    sync(c)
    fut = c.request_async("hang", 30)
    sync(c)
    assert broker.query_state()["pending_requests"] == 1

    t_kill = time.monotonic()
    os.kill(broker.process.pid, signal.SIGKILL)
    exc = fut.exception(timeout=5)
    failed_after = time.monotonic() - t_kill
    assert isinstance(exc, IpcBusConnectionError), exc
    assert failed_after < 1.0, failed_after
    assert closed.wait(5)
    assert closed_at[0] - t_kill < 1.0, closed_at[0] - t_kill

    with pytest.raises(IpcBusConnectionError):
        c.send("x", 1)
    with pytest.raises(IpcBusConnectionError):
        c.request("x", 1)
    with pytest.raises(IpcBusConnectionError):
        c.request_async("x", 1)
    assert closed_at == closed_at[:1]  # on_closed ran once
    broker.process.join(5)


@pytest.mark.timeout(60)
def test_broker_killed_client_in_child(broker: IpcBusBroker, children: Children) -> None:
    ready_q, result_q = children.ctx.Queue(), children.ctx.Queue()
    p = children.start(_client_sees_broker_death, broker.address, ready_q, result_q)
    assert ready_q.get(timeout=READY_TIMEOUT) == p.pid
    assert broker.query_state()["pending_requests"] == 1

    t_kill = time.monotonic()
    os.kill(broker.process.pid, signal.SIGKILL)
    report = result_q.get(timeout=30)
    assert report["request"] == ("IpcBusConnectionError", True), report
    assert report["request_at"] - t_kill < 1.0, report["request_at"] - t_kill
    assert report["closed"], report
    assert report["closed_at"] - t_kill < 1.0, report["closed_at"] - t_kill
    assert report["send"] == ("IpcBusConnectionError", True), report
    assert report["request"] == ("IpcBusConnectionError", True), report
    assert report["closed_calls"] == 1, report
    p.join(10)
    assert p.exitcode == 0


# -- graceful close ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_close_delivers_everything_sent(broker: IpcBusBroker, children: Children) -> None:
    n = 5000
    ready_q, result_q = children.ctx.Queue(), children.ctx.Queue()
    p = children.start(_flood_receiver, broker.address, n, ready_q, result_q, children.stop)
    assert ready_q.get(timeout=READY_TIMEOUT) == p.pid

    sender = IpcBusClient.create().connect(broker.address, peer_name="flood-sender")
    try:
        for i in range(n):
            sender.send("flood", i)
    finally:
        sender.close()  # at once: everything above must still arrive
    report = result_q.get(timeout=30)
    assert report["count"] == n, report
    assert report["in_order"], report


@pytest.mark.timeout(30)
def test_close_fails_pending_and_unsubscribes(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    keeper = clients(broker.address, peer_name="keeper")  # shares the connection with `a`
    keeper.on("hang", lambda e, *a: None)
    flushed = Collector()
    keeper.on("flush", flushed)
    sync(keeper)

    a = IpcBusClient.create().connect(broker.address, peer_name="a")
    try:
        calls: list[int] = []
        a.on_closed(lambda: calls.append(1))
        a.on("a-chan", lambda e, *args: None)
        sync(a)
        state = broker.query_state()
        assert state["channels"].get("a-chan") == 1
        assert a.peer.id in {p["id"] for p in state["peers"]}
        fut = a.request_async("hang", 30)
        sync(a)
        assert broker.query_state()["pending_requests"] == 1

        with elapsed() as t:
            a.close()
        assert t[0] < 1.0, t[0]
        assert isinstance(fut.exception(timeout=1), IpcBusConnectionError)

        def gone() -> bool:
            s = broker.query_state()
            return ("a-chan" not in s["channels"] and s["pending_requests"] == 0
                    and a.peer.id not in {p["id"] for p in s["peers"]})
        wait_until(gone, timeout=3)

        a.close()  # idempotent
        a.close(timeout=1)
        wait_until(lambda: calls, timeout=2)
        keeper.send("flush")  # the shared dispatch thread has run everything queued before
        flushed.wait(1)
        assert calls == [1]

        for call in (lambda: a.send("x", 1),
                     lambda: a.send_to(keeper.peer, "x", 1),
                     lambda: a.request("hang", 1),
                     lambda: a.request_async("hang", 1),
                     lambda: a.request_to(keeper.peer, "hang", 1)):
            with pytest.raises(IpcBusConnectionError):
                call()
        # the rest of the process's connection is unaffected
        assert keeper.request("/ipcbus/queryState", 5).payload["pending_requests"] == 0
    finally:
        a.close()


@pytest.mark.timeout(30)
def test_close_last_client_of_the_process(broker: IpcBusBroker) -> None:
    c = IpcBusClient.create().connect(broker.address, peer_name="solo")
    try:
        calls: list[int] = []
        c.on_closed(lambda: calls.append(1))
        c.on("self-hang", lambda e, *a: None)
        sync(c)
        fut = c.request_async("self-hang", 30)
        sync(c)
        peer_id = c.peer.id
        with elapsed() as t:
            c.close()
        assert t[0] < 1.5, t[0]
        assert isinstance(fut.exception(timeout=1), IpcBusConnectionError)
        wait_until(lambda: calls, timeout=2)
        c.close()
        assert calls == [1]
        with pytest.raises(IpcBusConnectionError):
            c.send("x")
        with pytest.raises(IpcBusConnectionError):
            c.request("self-hang", 1)

        def gone() -> bool:
            s = broker.query_state()
            return (peer_id not in {p["id"] for p in s["peers"]}
                    and "self-hang" not in s["channels"] and s["pending_requests"] == 0)
        wait_until(gone, timeout=3)
        assert calls == [1]
    finally:
        c.close()


# -- TCP ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_tcp_port_zero_authkey(
        children: Children, clients: Callable[..., IpcBusClient]) -> None:
    broker = IpcBusBroker.create().connect(port=0)
    try:
        addr = broker.address
        assert isinstance(addr, tuple) and addr[0] == "127.0.0.1"
        assert isinstance(addr[1], int) and addr[1] > 0

        ready_q, result_q = children.ctx.Queue(), children.ctx.Queue()
        go_r, go_w = children.ctx.Pipe(duplex=False)
        p = children.start(_tcp_peer, addr, ready_q, go_r, result_q, children.stop)
        assert ready_q.get(timeout=READY_TIMEOUT) == p.pid

        # a wrong key is refused quickly (this process has no connection to this bus yet)
        with elapsed() as t, pytest.raises(IpcBusConnectionError) as ei:
            IpcBusClient.create().connect(addr, authkey=b"wrong")
        assert t[0] < 6.0, t[0]
        assert "auth" in str(ei.value).lower(), str(ei.value)

        c = clients(addr)  # the default authkey, inherited by the child too
        c.on("tcp-parent", lambda e, x: e.request.resolve(["parent", x]))
        sync(c)
        r = c.request("tcp-echo", 5, 1)
        assert r.payload == {"pid": p.pid, "args": [1]}
        assert r.event.sender is not None and r.event.sender.process.pid == p.pid
        assert r.event.sender.process.type == "socket"

        go_w.send_bytes(b"go")
        assert result_q.get(timeout=10) == ("ok", ["parent", "hi"], os.getpid())

        assert c.request("tcp-echo", 5, 2).payload["args"] == [2]
        assert len(broker.query_state()["peers"]) == 2
    finally:
        children.close()
        broker.close()


@pytest.mark.timeout(30)
def test_tcp_tuple_address(clients: Callable[..., IpcBusClient]) -> None:
    broker = IpcBusBroker.create().connect(("127.0.0.1", 0))
    try:
        assert isinstance(broker.address, tuple) and broker.address[1] > 0
        c = clients(broker.address)
        echo_canary(c)
        assert c.request("canary", 5, 1).payload == ["canary", 1]
    finally:
        broker.close()


# -- Unix socket access -------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_peer_uid_decision() -> None:
    allowed = T.peer_uid_allowed
    assert allowed(1000, 1000, None)
    assert allowed(1000, 1000, [])
    assert not allowed(1001, 1000, None)
    assert not allowed(1001, 1000, [])
    assert not allowed(1001, 1000, [1002])
    assert allowed(1001, 1000, [1001])
    assert allowed(1001, 1000, (1002, 1001))
    assert not allowed(0, 1000, None)  # root is not let in implicitly
    assert not allowed(0, 1000, [1001])
    assert allowed(0, 1000, [0])
    assert allowed(0, 0, None)


@pytest.mark.timeout(30)
def test_socket_file_is_owner_only(broker: IpcBusBroker) -> None:
    st = os.stat(str(broker.address))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


# -- fork ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_client_inherited_through_fork(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    c = clients(broker.address)
    got = Collector()
    c.on("fork-chan", got)
    c.on("fork-echo", lambda e, x: e.request.resolve(x))
    sync(c)

    fctx = multiprocessing.get_context("fork")
    q = fctx.Queue()
    p = fctx.Process(target=_use_inherited_client, args=(c, q), daemon=True)
    p.start()
    try:
        out = q.get(timeout=10)
        p.join(10)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(2)
    for name, (etype, is_conn_err, msg) in out.items():
        assert is_conn_err, (name, etype, msg)
        assert "fork" in msg.lower(), (name, msg)

    # the parent's connection is intact: it sends, receives and requests
    c.send("fork-chan", "after")
    got.wait(1)
    sync(c)
    assert got.args == [("after",)]  # nothing from the child reached the bus
    assert c.request("fork-echo", 5, "ok").payload == "ok"
    other = clients(broker.address)
    assert other.request("fork-echo", 5, "still").payload == "still"
    assert c.peer.id in {p["id"] for p in broker.query_state()["peers"]}


# -- stale and live socket files ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stale_socket_replaced_live_one_kept(
        sock_path: str, clients: Callable[..., IpcBusClient]) -> None:
    b1 = IpcBusBroker.create().connect(sock_path)
    b2 = b3 = None
    try:
        os.kill(b1.process.pid, signal.SIGKILL)
        b1.process.join(5)
        assert os.path.exists(sock_path)  # left behind by the dead broker

        b2 = IpcBusBroker.create().connect(sock_path)
        c = clients(sock_path)
        echo_canary(c)
        assert c.request("canary", 5, 1).payload == ["canary", 1]
        assert broker_pid(c) == b2.process.pid

        b3 = IpcBusBroker.create()
        with elapsed() as t, pytest.raises(IpcBusConnectionError):
            b3.connect(sock_path)
        assert t[0] < 10.0
        # b2 still owns the path and serves
        assert c.request("canary", 5, 2).payload == ["canary", 2]
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            raw.settimeout(2)
            raw.connect(sock_path)
        finally:
            raw.close()
        assert broker_pid(c) == b2.process.pid
    finally:
        b1.close()
        if b2 is not None:
            b2.close()
        if b3 is not None:
            b3.close()


def broker_pid(client: IpcBusClient) -> int:
    return int(client.request("/ipcbus/queryState", 5).payload["pid"])


# -- garbage and silence -------------------------------------------------------------------------------
def _hello() -> bytes:
    return P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid()))


def _huge_frame() -> bytes:
    header = P.encode_header(Kind.SEND, "x", ["raw.1", "raw", "socket", os.getpid()], None)
    return P.PREFIX.pack(len(header), 2 * 1024 ** 3, 0) + header + b"\0" * 4096


GARBAGE: dict[str, Callable[[], bytes]] = {
    "random": lambda: random.Random(20261124).randbytes(64 * 1024),
    "hello-then-garbage": lambda: _hello() + b"\xde\xad\xbe\xef" * 1024,
    "hello-then-bad-header": lambda: _hello() + P.PREFIX.pack(16, 0, 0) + b"\xc1" * 16,
    "hello-then-unknown-kind": lambda: _hello() + P.encode_frame(99, "x"),
    "hello-then-2GiB-frame": lambda: _hello() + _huge_frame(),
    "2GiB-frame-first": _huge_frame,
    "not-hello-first": lambda: P.encode_frame(Kind.SEND, "x", ["r.1", "r", "socket", 1], None,
                                             body=P.pack_payload([1])),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_drops_only_that_connection(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient], kind: str) -> None:
    canary = clients(broker.address)
    echo_canary(canary)
    assert canary.request("canary", 5, 0).payload == ["canary", 0]

    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.settimeout(5)
        raw.connect(str(broker.address))
        try:
            raw.sendall(GARBAGE[kind]())
        except OSError:
            pass  # the broker may close while we are still writing: that is the point
        took = wait_eof(raw, 3.0)
        assert took is not None, "the broker kept a connection that sent garbage"
        assert took < 2.5, took
    finally:
        raw.close()

    assert canary.request("canary", 5, 1).payload == ["canary", 1]
    wait_until(lambda: broker.query_state()["connections"] == 1, timeout=3)
    assert broker.process.is_alive()


@pytest.mark.timeout(30)
def test_silent_connection_dropped_after_handshake_deadline(
        sock_path: str, clients: Callable[..., IpcBusClient]) -> None:
    b = IpcBusBroker.create(handshake_timeout=0.5).connect(sock_path)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        canary = clients(sock_path)
        echo_canary(canary)
        silent.connect(sock_path)
        partial.connect(sock_path)
        partial.sendall(_hello()[:5])  # starts a HELLO, never finishes it
        t0 = time.monotonic()
        assert wait_eof(silent, 3.0) is not None, "a silent connection was kept"
        took = time.monotonic() - t0
        assert 0.3 <= took <= 2.0, took
        assert wait_eof(partial, 2.0) is not None, "a half-said HELLO was kept"
        assert time.monotonic() - t0 <= 2.0
        assert canary.request("canary", 5, 1).payload == ["canary", 1]
        wait_until(lambda: b.query_state()["connections"] == 1, timeout=3)
    finally:
        silent.close()
        partial.close()
        b.close()


@pytest.mark.timeout(30)
def test_wrong_authkey_is_refused_even_when_the_process_is_connected() -> None:
    """The shared TCP connection is not reused by a client that brings another key."""
    with IpcBusBroker.create().connect(port=0) as tcp_broker:
        good = IpcBusClient.create().connect(tcp_broker.address)
        try:
            with pytest.raises(IpcBusConnectionError):
                IpcBusClient.create().connect(tcp_broker.address, authkey=b"wrong")
            sync(good)
        finally:
            good.close()


def test_unsent_counts_what_the_peer_has_not_read_yet() -> None:
    """StreamTransport.unsent (SIOCOUTQ), which the broker uses to tell a slow reader from a
    stopped one: it grows with what is written and shrinks as the peer reads."""
    a, b = socket.socketpair()
    transport = T.StreamTransport(a)
    try:
        assert transport.unsent() == 0
        a.sendall(b"x" * 100_000)
        before = transport.unsent()
        assert before is not None and before >= 100_000
        received = 0
        while received < 50_000:
            received += len(b.recv(50_000 - received))
        after = transport.unsent()
        assert after is not None and after < before
    finally:
        a.close()
        b.close()
    assert transport.unsent() is None  # closed: nothing to ask
