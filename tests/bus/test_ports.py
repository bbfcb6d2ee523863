"""Handle transfer: pipes, sockets and Connections passed between processes, without leaks."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any, Iterator

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusConnectionError,
                    IpcBusEvent, IpcBusRequestError, create_channel)

from helpers import Collector, pid_of, running, sync, wait_until


def fd_count(pid: int | None = None) -> int:
    if pid is None:
        gc.collect()  # garbage of earlier tests may hold descriptors until collected
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


# -- children ------------------------------------------------------------------------------------
def use_ports(where: Any, name: str) -> None:
    """Receives [pipe write end, socket, Connection] and uses each once."""
    client = IpcBusClient.create().connect(where, peer_name=name)
    done = threading.Event()

    def on_ports(event: IpcBusEvent, message: str) -> None:
        assert event.ports is not None
        fd, sock, conn = event.ports
        assert isinstance(fd, int) and isinstance(sock, socket.socket)
        assert isinstance(conn, multiprocessing.connection.Connection)
        os.write(fd, f"{name}:{message}".encode())
        os.close(fd)
        sock.sendall(f"{name} on a {sock.family.name} socket".encode())
        sock.close()
        conn.send_bytes(conn.recv_bytes() + f" answered by {name}".encode())
        conn.close()
        done.set()

    client.on("ports", on_ports)
    sync(client)
    client.send("ready", name)
    done.wait(20)
    client.close()


def write_name(where: Any, name: str) -> None:
    """Receives one pipe write end on a broadcast and writes its name into it."""
    client = IpcBusClient.create().connect(where, peer_name=name)
    done = threading.Event()

    def on_pipe(event: IpcBusEvent, message: str) -> None:
        assert event.ports is not None
        (fd,) = event.ports
        os.write(fd, f"{name};".encode())
        os.close(fd)
        done.set()

    client.on("pipe", on_pipe)
    sync(client)
    client.send("ready", name)
    done.wait(20)
    client.close()


def count_and_close(address: str, count: int) -> None:
    """Receives ``count`` messages with two descriptors, closes them, reports its fd count."""
    client = IpcBusClient.create().connect(address, peer_name="counter")
    received = [0]
    done = threading.Event()

    def on_loop(event: IpcBusEvent, index: int) -> None:
        assert event.ports is not None
        for port in event.ports:
            os.close(port)
        received[0] += 1
        if received[0] == count:
            done.set()

    client.on("loop", on_loop)
    sync(client)
    baseline = fd_count()
    client.send("ready", baseline)
    done.wait(60)
    client.send("counted", received[0], fd_count())
    threading.Event().wait(0.2)
    client.close()


def sit_still(address: str) -> None:
    client = IpcBusClient.create().connect(address, peer_name="sleeper")
    client.on("flood", lambda event, *args: None)
    sync(client)
    client.send("ready", os.getpid())
    threading.Event().wait(60)


# -- tests ---------------------------------------------------------------------------------------
@pytest.fixture(params=["broker", "bridge"])
def bus(request: pytest.FixtureRequest, sock_path: str) -> Iterator[tuple[str, Any]]:
    """("broker", broker) or ("bridge", bridge): where the handles travel through."""
    if request.param == "broker":
        broker = IpcBusBroker.create().connect(sock_path)
        try:
            yield "broker", broker
        finally:
            broker.close()
    else:
        bridge = IpcBusBridge.create().connect()
        try:
            yield "bridge", bridge
        finally:
            bridge.close()


def _address_for_child(kind: str, bus: Any) -> Any:
    return bus.address if kind == "broker" else bus.open_pipe()


def _main_client(kind: str, bus: Any) -> IpcBusClient:
    return IpcBusClient.create().connect(bus.address if kind == "broker" else None)


@pytest.mark.timeout(60)
def test_pipe_socket_and_channel_end_reach_a_child_and_work(bus: Any, ctx: Any) -> None:
    kind, hub = bus
    main = _main_client(kind, hub)
    try:
        ready = Collector()
        main.on("ready", ready)
        sync(main)
        child = ctx.Process(target=use_ports, args=(_address_for_child(kind, hub), "kid"))
        with running([child]):
            ready.wait(1, timeout=30)
            r, w = os.pipe()
            mine, theirs = socket.socketpair()
            near, far = create_channel()
            main.post_message("ports", "hello", ports=[w, theirs, far])
            os.close(w)  # the child has its own duplicates
            theirs.close()
            far.close()
            near.send_bytes(b"ping")
            assert os.read(r, 100) == b"kid:hello"
            assert mine.recv(100) == b"kid on a AF_UNIX socket"
            assert near.poll(10) and near.recv_bytes() == b"ping answered by kid"
            os.close(r)
            mine.close()
            near.close()
        assert child.exitcode == 0
    finally:
        main.close()


@pytest.mark.timeout(60)
def test_broadcast_gives_each_receiver_its_own_duplicate(bus: Any) -> None:
    kind, hub = bus
    ctx = multiprocessing.get_context("spawn")
    main = _main_client(kind, hub)
    try:
        ready = Collector()
        main.on("ready", ready)
        sync(main)
        names = ["a", "b", "c"]
        kids = [ctx.Process(target=write_name, args=(_address_for_child(kind, hub), n))
                for n in names]
        with running(kids):
            ready.wait(3, timeout=30)
            r, w = os.pipe()
            main.post_message("pipe", "write your name", ports=[w])
            os.close(w)
            data = b""
            deadline = time.monotonic() + 20
            while data.count(b";") < 3 and time.monotonic() < deadline:
                data += os.read(r, 100)
            os.close(r)
        assert sorted(data.decode().strip(";").split(";")) == names
        assert [k.exitcode for k in kids] == [0, 0, 0]
    finally:
        main.close()


@pytest.mark.timeout(90)
def test_1000_transfers_leak_nothing(broker: IpcBusBroker, ctx: Any) -> None:
    count = 1000
    main = IpcBusClient.create().connect(broker.address, peer_name="sender")
    try:
        ready, counted = Collector(), Collector()
        main.on("ready", ready).on("counted", counted)
        sync(main)
        child = ctx.Process(target=count_and_close, args=(broker.address, count))
        with running([child]):
            ((_, (child_baseline,)),) = ready.wait(1, timeout=30)
            sync(main)
            mine, brokers = fd_count(), fd_count(broker.process.pid)
            for i in range(count):
                r, w = os.pipe()
                main.post_message("loop", i, ports=[r, w])
                os.close(r)
                os.close(w)
            ((_, (received, child_after)),) = counted.wait(1, timeout=60)
            assert received == count
            assert child_after == child_baseline
            assert fd_count() == mine
            wait_until(lambda: fd_count(broker.process.pid) == brokers, timeout=5)
    finally:
        main.close()


@pytest.mark.timeout(60)
def test_receiver_killed_with_descriptors_in_flight(broker: IpcBusBroker) -> None:
    ctx = multiprocessing.get_context("spawn")
    main = IpcBusClient.create().connect(broker.address, peer_name="sender")
    try:
        ready = Collector()
        main.on("ready", ready)
        sync(main)
        baseline = fd_count(broker.process.pid)
        child = ctx.Process(target=sit_still, args=(broker.address,))
        with running([child]):
            ready.wait(1, timeout=30)
            os.kill(pid_of(child), signal.SIGSTOP)  # stops reading: descriptors pile up
            blob = b"x" * 65536
            for _ in range(400):  # 26 MB: past both kernel buffers (4 MiB each, doubled)
                r, w = os.pipe()
                main.post_message("flood", blob, ports=[r, w])
                os.close(r)
                os.close(w)
            sync(main)
            assert fd_count(broker.process.pid) > baseline + 2  # held for the stopped receiver
            os.kill(pid_of(child), signal.SIGKILL)
        wait_until(lambda: fd_count(broker.process.pid) == baseline, timeout=5)
        assert broker.query_state()["peers"][0]["name"] == "sender"
    finally:
        main.close()


@pytest.mark.timeout(30)
def test_tcp_refuses_descriptors_and_sends_nothing(sock_path: str) -> None:
    # a Unix broker with one TCP-less receiver and one TCP receiver is not possible (one
    # listener per broker), so: a TCP bus refuses at the call, and a Unix sender is refused
    # when a receiver sits behind a TCP link (a bridge linked over TCP).
    with IpcBusBroker.create().connect(port=0) as tcp_broker:
        client = IpcBusClient.create().connect(tcp_broker.address)
        try:
            got = Collector()
            client.on("x", got)
            sync(client)
            r, w = os.pipe()
            with pytest.raises(IpcBusConnectionError, match="cannot carry descriptors"):
                client.post_message("x", "data", ports=[w])
            client.send("x", "marker")
            assert got.wait(1)[0][1] == ("marker",)  # the refused message never arrived
            os.close(r)
            os.close(w)
        finally:
            client.close()
        with IpcBusBridge.create().connect(tcp_broker.address) as bridge:
            local = IpcBusClient.create().connect()  # Unix socketpair to the bridge
            remote = IpcBusClient.create().connect(tcp_broker.address)
            try:
                got = Collector()
                remote.on("y", got)
                sync(remote)
                r, w = os.pipe()
                with pytest.raises(IpcBusRequestError, match="cannot pass descriptors"):
                    local.post_message("y", "data", ports=[w])
                local.send("y", "marker")
                assert got.wait(1)[0][1] == ("marker",)
                os.close(r)
                os.close(w)
            finally:
                local.close()
                remote.close()
            assert bridge is not None


@pytest.mark.timeout(30)
def test_bad_ports_raise_at_the_call(broker: IpcBusBroker, clients: Any) -> None:
    client = clients(broker.address)
    got = Collector()
    client.on("x", got)
    sync(client)
    closed = socket.socket()
    closed.close()
    r, w = os.pipe()
    with pytest.raises(TypeError):
        client.post_message("x", 1, ports=[object()])
    with pytest.raises(TypeError):
        client.post_message("x", 1, ports=[True])
    with pytest.raises(TypeError):
        client.post_message("x", 1, ports=w)
    with pytest.raises(ValueError):
        client.post_message("x", 1, ports=[closed])
    with pytest.raises(ValueError):
        client.post_message("x", 1, ports=[999_999])
    with pytest.raises(ValueError, match="at most 64"):
        client.post_message("x", 1, ports=[w] * 65)
    with pytest.raises(TypeError):
        client.post_message("x", object(), ports=[w])
    with pytest.raises(IpcBusRequestError, match="no peer"):
        client.post_message_to("no-such-peer", "x", 1, ports=[w])
    client.send("x", "marker")
    assert got.wait(1)[0][1] == ("marker",)
    sync(client)
    assert len(got.items) == 1
    os.close(r)
    os.close(w)


@pytest.mark.timeout(30)
def test_post_message_to_one_peer_and_without_ports(broker: IpcBusBroker, clients: Any) -> None:
    a, b, c = (clients(broker.address, peer_name=n) for n in "abc")
    got_b, got_c = Collector(), Collector()
    b.on("p", got_b)
    c.on("p", got_c)
    sync(b)
    sync(c)
    r, w = os.pipe()
    a.post_message_to(b.peer, "p", {"k": 1}, ports=[w])
    ((event, args),) = got_b.wait(1)
    assert args == ({"k": 1},) and event.sender == a.peer
    (fd,) = event.ports
    os.write(fd, b"ok")
    os.close(fd)
    assert os.read(r, 10) == b"ok"
    a.post_message("p", "plain")  # no ports: a plain broadcast
    assert got_c.wait(1)[0][1] == ("plain",) and got_c.items[0][0].ports is None
    sync(a)
    assert len(got_c.items) == 1
    os.close(r)
    os.close(w)
