"""The bridge: pipe-only children, main-process clients, the link to a broker, pools, deaths."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusConnectionError,
                    IpcBusEvent, IpcBusRequestError)

from helpers import Collector, pid_of, running, sync, wait_until


@pytest.fixture
def bridge() -> Iterator[IpcBusBridge]:
    b = IpcBusBridge.create().connect()
    try:
        yield b
    finally:
        b.close()


# -- children (module level, for spawn) ---------------------------------------------------------
def pipe_child(conn: Any, name: str) -> None:
    """Answers "who" requests, greets on "hello" broadcasts, asks the main process, then waits."""
    client = IpcBusClient.create().connect(conn, peer_name=name)
    done = threading.Event()

    def on_hello(event: IpcBusEvent, text: str) -> None:
        assert event.sender is not None
        client.send_to(event.sender, "hello-back", name, text)

    client.on("who", lambda event: event.request.resolve(name))
    client.on("hello", on_hello)
    client.on("private", lambda event, text: client.send("echo-private", name, text))
    client.once("bye", lambda event: done.set())
    sync(client)
    answer = client.request("main-ask", 5.0, name).payload
    client.send("ready", name, client.peer.process.type, client.peer.process.pid, answer)
    done.wait(30)
    client.close()


def ordered_sender(conn: Any, count: int) -> None:
    client = IpcBusClient.create().connect(conn, peer_name="pipe-sender")
    go = threading.Event()
    client.once("go", lambda event: go.set())
    sync(client)
    client.send("sender-ready")
    go.wait(30)
    for i in range(count):
        client.send("seq", i)
    client.close()


def socket_peer(address: str, name: str) -> None:
    client = IpcBusClient.create().connect(address, peer_name=name)
    done = threading.Event()
    client.on("who", lambda event: event.request.resolve(name))
    client.once("bye", lambda event: done.set())
    sync(client)
    answer = client.request("pipe-ask", 5.0, name).payload
    client.send("ready", name, client.peer.process.type, client.peer.process.pid, answer)
    done.wait(30)
    client.close()


def hang_on_request(conn: Any) -> None:
    client = IpcBusClient.create().connect(conn, peer_name="hanger")
    client.on("hang", lambda event: None)  # never answers
    sync(client)
    client.send("ready", "hanger", "pipe", os.getpid(), None)
    threading.Event().wait(60)


def bridge_owner(start_method: str, report: Any) -> None:
    """A 'main' process with a bridge and two pipe children; the test kills it."""
    ctx: Any = multiprocessing.get_context(start_method)
    bridge = IpcBusBridge.create().connect()
    kids = [ctx.Process(target=orphan, args=(bridge.open_pipe(), report), daemon=False)
            for _ in range(2)]
    for kid in kids:
        kid.start()
    report.put(("owner", os.getpid()))
    threading.Event().wait(60)


def orphan(conn: Any, report: Any) -> None:
    client = IpcBusClient.create().connect(conn)
    closed = threading.Event()
    client.on_closed(closed.set)
    client.on("never", lambda event: None)  # receives the request below, never answers
    sync(client)
    future = client.request_async("never", -1)  # would wait forever
    report.put(("ready", os.getpid()))
    closed.wait(30)
    noticed = time.monotonic()
    try:
        future.result(5)
        outcome = "answered?"
    except Exception as exc:
        outcome = type(exc).__name__
    try:
        client.send("x")
        later = "sent?"
    except IpcBusConnectionError:
        later = "IpcBusConnectionError"
    report.put(("closed", os.getpid(), noticed, outcome, later))


# -- bridge alone ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_pipe_children_and_main_client(bridge: IpcBusBridge, ctx: Any) -> None:
    main = IpcBusClient.create().connect(peer_name="main")
    try:
        assert main.peer.process.type == "main"
        ready, hello_back, private = Collector(), Collector(), Collector()
        main.on("ready", ready).on("hello-back", hello_back).on("echo-private", private)
        main.on("main-ask", lambda event, name: event.request.resolve(f"welcome {name}"))
        sync(main)
        names = ["kid-0", "kid-1", "kid-2"]
        procs = [ctx.Process(target=pipe_child, args=(bridge.open_pipe(), n)) for n in names]
        with running(procs):
            got = ready.wait(3, timeout=30)
            by_name = {args[0]: args for _, args in got}
            assert sorted(by_name) == names
            for name, proc in zip(names, procs):
                assert by_name[name][1:] == ("pipe", proc.pid, f"welcome {name}")
            peers = {args[0]: event.sender for event, args in got}
            # broadcast main -> children, answered peer-to-peer
            main.send("hello", "hi all")
            assert sorted(a for _, a in hello_back.wait(3)) == [(n, "hi all") for n in names]
            # send_to one child only
            main.send_to(peers["kid-1"], "private", "psst")
            assert private.wait(1)[0][1] == ("kid-1", "psst")
            # request: first answer wins; request_to: that child
            assert main.request("who", 5.0).payload in names
            assert main.request_to(peers["kid-2"], "who", 5.0).payload == "kid-2"
            state = bridge.query_state()
            assert sorted(p["name"] for p in state["peers"]) == sorted(["main", *names])
            main.send("bye")
        assert [p.exitcode for p in procs] == [0, 0, 0]
        sync(main)
        assert len(private.items) == 1
        wait_until(lambda: [p["name"] for p in bridge.query_state()["peers"]] == ["main"])
    finally:
        main.close()


@pytest.mark.timeout(30)
def test_pipe_child_killed_disappears(bridge: IpcBusBridge) -> None:
    ctx = multiprocessing.get_context("spawn")
    main = IpcBusClient.create().connect(peer_name="main")
    try:
        ready = Collector()
        main.on("ready", ready)
        sync(main)
        proc = ctx.Process(target=hang_on_request, args=(bridge.open_pipe(),))
        with running([proc]):
            ready.wait(1, timeout=20)
            future = main.request_async("hang", 30.0)
            wait_until(lambda: bridge.query_state()["pending_requests"] == 1)
            killed = time.monotonic()
            os.kill(pid_of(proc), signal.SIGKILL)
            with pytest.raises(IpcBusRequestError, match="left the bus"):
                future.result(5)
            assert time.monotonic() - killed < 1.0
            wait_until(lambda: "hang" not in bridge.query_state()["channels"], timeout=2)
    finally:
        main.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn", "fork", "forkserver"])
def test_bridge_process_killed_children_notice(start_method: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    owner = ctx.Process(target=bridge_owner, args=(start_method, report))
    kids: list[int] = []
    with running([owner]):
        # The owner and its two children report on one queue: a forked child may come first.
        first = sorted((report.get(timeout=30) for _ in range(3)), key=lambda r: r[0] != "owner")
        assert [r[0] for r in first] == ["owner", "ready", "ready"], first
        kids.extend(pid for _, pid in first[1:])
        killed = time.monotonic()
        os.kill(pid_of(owner), signal.SIGKILL)
        results = [report.get(timeout=10) for _ in kids]
    for kind, pid, noticed, outcome, later in results:
        assert kind == "closed" and pid in kids
        assert noticed - killed < 1.0
        assert outcome == "IpcBusConnectionError"
        assert later == "IpcBusConnectionError"


# -- bridge linked to a broker -----------------------------------------------------------------
@pytest.fixture
def linked(broker: IpcBusBroker) -> Iterator[tuple[IpcBusBroker, IpcBusBridge]]:
    b = IpcBusBridge.create().connect(broker.address)
    try:
        yield broker, b
    finally:
        b.close()


@pytest.mark.timeout(60)
def test_pipe_child_and_socket_peer_request_each_other(linked: Any, ctx: Any) -> None:
    broker, bridge = linked
    main = IpcBusClient.create().connect(peer_name="main")
    try:
        ready = Collector()
        main.on("ready", ready)
        main.on("main-ask", lambda event, name: event.request.resolve(f"main greets {name}"))
        main.on("pipe-ask", lambda event, name: event.request.resolve(f"bridge greets {name}"))
        sync(main)
        procs = [ctx.Process(target=pipe_child, args=(bridge.open_pipe(), "piper")),
                 ctx.Process(target=socket_peer, args=(broker.address, "socketeer"))]
        with running(procs):
            got = {args[0]: args for _, args in ready.wait(2, timeout=30)}
            assert got["piper"][1:] == ("pipe", procs[0].pid, "main greets piper")
            assert got["socketeer"][1:] == ("socket", procs[1].pid, "bridge greets socketeer")
            # the broker sees the bridge's peers with their types
            peers = {p["name"]: p for p in broker.query_state()["peers"]}
            assert peers["piper"]["type"] == "pipe" and peers["main"]["type"] == "main"
            assert peers["socketeer"]["type"] == "socket"
            # requests across the link, both ways, and request_to across it
            sock_client = IpcBusClient.create().connect(broker.address, peer_name="outsider")
            try:
                assert sock_client.request_to(peers["piper"]["id"], "who", 5.0).payload == "piper"
                assert main.request_to(peers["socketeer"]["id"], "who", 5.0).payload == \
                    "socketeer"
                with pytest.raises(IpcBusRequestError, match="no listener"):
                    sock_client.request("nobody-anywhere", 5.0)
                with pytest.raises(IpcBusRequestError, match="no listener"):
                    main.request("nobody-anywhere", 5.0)
                # queryState through the bridge is the broker's whole-bus view
                state = main.request("/ipcbus/queryState", 2.0).payload
                assert state["pid"] == broker.process.pid
                assert {"piper", "socketeer", "main", "outsider"} <= \
                    {p["name"] for p in state["peers"]}
            finally:
                sock_client.close()
            main.send("bye")
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        main.close()


@pytest.mark.timeout(60)
def test_order_of_10000_messages_across_the_link(linked: Any, ctx: Any) -> None:
    broker, bridge = linked
    count = 10_000
    receiver = IpcBusClient.create().connect(broker.address, peer_name="socket-receiver")
    main = IpcBusClient.create().connect(peer_name="main")
    try:
        seq, sender_ready = Collector(), Collector()
        receiver.on("seq", seq)
        main.on("sender-ready", sender_ready)
        sync(receiver)
        sync(main)
        proc = ctx.Process(target=ordered_sender, args=(bridge.open_pipe(), count))
        with running([proc]):
            sender_ready.wait(1, timeout=30)
            main.send("go")
            items = seq.wait(count, timeout=40)
        assert [args[0] for _, args in items] == list(range(count))
        assert items[0][0].sender.process.type == "pipe"
    finally:
        main.close()
        receiver.close()


@pytest.mark.timeout(30)
def test_listeners_on_both_sides_get_each_message_once(linked: Any) -> None:
    broker, bridge = linked
    main_a = IpcBusClient.create().connect(peer_name="main-a")
    main_b = IpcBusClient.create().connect(peer_name="main-b")
    sock_a = IpcBusClient.create().connect(broker.address, peer_name="sock-a")
    sock_b = IpcBusClient.create().connect(broker.address, peer_name="sock-b")
    clients = [main_a, main_b, sock_a, sock_b]
    try:
        got = [Collector() for _ in clients]
        for client, collector in zip(clients, got):
            client.on("both", collector)
        for client in clients:
            sync(client)
        # the broker holds one subscription per bridge-side peer: the link subscribes only to
        # channels its side listens to
        channels = broker.query_state()["channels"]
        assert channels["both"] == 4 and "unheard" not in channels
        main_a.send("both", "from main")
        sock_a.send("both", "from socket")
        for collector in got:
            collector.wait(2)
        for client in clients:
            sync(client)
        for collector in got:
            assert sorted(a for _, a in collector.items) == [("from main",), ("from socket",)]
    finally:
        for client in clients:
            client.close()


# -- pools -------------------------------------------------------------------------------------------
_pool_client: IpcBusClient | None = None


def pool_init(address: str) -> None:
    """The recipe: a pool initializer connects one client per worker process."""
    global _pool_client
    _pool_client = IpcBusClient.create().connect(address, peer_name=f"pool-{os.getpid()}")


def pool_task(index: int) -> tuple[int, int, Any]:
    assert _pool_client is not None
    _pool_client.send("progress", os.getpid(), index)
    work = _pool_client.request("get-work", 10.0, index).payload
    return os.getpid(), index, work


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor"])
def test_spawn_pools_share_the_bus(linked: Any, kind: str) -> None:
    broker, bridge = linked
    ctx = multiprocessing.get_context("spawn")
    main = IpcBusClient.create().connect(peer_name="main")  # through the bridge
    try:
        progress = Collector()
        main.on("progress", progress)
        main.on("get-work", lambda event, i: event.request.resolve(i * 10))
        sync(main)
        tasks = list(range(12))
        if kind == "Pool":
            with ctx.Pool(3, initializer=pool_init, initargs=(broker.address,)) as pool:
                results = pool.map(pool_task, tasks)
        else:
            with concurrent.futures.ProcessPoolExecutor(
                    3, mp_context=ctx, initializer=pool_init,
                    initargs=(broker.address,)) as executor:
                results = list(executor.map(pool_task, tasks))
        assert [(i, w) for _, i, w in results] == [(i, i * 10) for i in tasks]
        workers = {pid for pid, _, _ in results}
        assert 1 <= len(workers) <= 3
        items = progress.wait(len(tasks))
        assert sorted(args[1] for _, args in items) == tasks
        assert {event.sender.process.type for event, _ in items} == {"socket"}
    finally:
        main.close()


def test_bridge_arguments_and_lifecycle() -> None:
    bridge = IpcBusBridge.create()
    with pytest.raises(IpcBusConnectionError):
        bridge.open_pipe()
    bridge.connect()
    try:
        with pytest.raises(IpcBusConnectionError, match="already"):
            bridge.connect()
        with pytest.raises(IpcBusConnectionError, match="already"):
            IpcBusBridge.create().connect()
        conn = bridge.open_pipe()
        conn.close()
        with pytest.raises(IpcBusConnectionError, match="closed"):
            IpcBusClient.create().connect(conn)
    finally:
        bridge.close()
    bridge.close()
    assert bridge.closed


EXIT_SCRIPT = """
import sys
from ipcbus import IpcBusBroker, IpcBusBridge, IpcBusClient
if __name__ == "__main__":
    broker = IpcBusBroker.create().connect(sys.argv[1])
    socket_client = IpcBusClient.create().connect(sys.argv[1])
    socket_client.on("x", lambda event, *args: None)
    bridge = IpcBusBridge.create().connect(sys.argv[1])
    main = IpcBusClient.create().connect()
    main.on("y", lambda event, *args: None)
    for i in range(1000):
        main.send("x", i)
    pending = socket_client.request_async("x", 30.0)
    print("exiting")
"""


@pytest.mark.timeout(60)
def test_exit_with_everything_still_connected_is_quiet(tmp_path: Any, sock_path: str) -> None:
    script = tmp_path / "leave.py"
    script.write_text(EXIT_SCRIPT)
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(script), sock_path], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout == "exiting\n" and out.stderr == ""
    assert time.monotonic() - started < 10
    assert not os.path.exists(sock_path)  # the broker was stopped and cleaned up
