"""Closing and reusing clients never costs a sibling client its connection (issue 14, items
15, 16 and 21): a closed client connects again; a close racing with sends of the same client
from other threads; a listener that raises SystemExit or KeyboardInterrupt; an I/O machinery
that ends for an internal reason lets the hub see the end at once."""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import pytest

from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusEvent,
                    IpcBusRequestError)
from ipcbus import _protocol as P

from helpers import Children, Collector, elapsed, sync, wait_until


# -- item 21: close() then connect() again -----------------------------------------------------
@pytest.mark.parametrize("sibling", [False, True])
@pytest.mark.timeout(60)
def test_a_closed_client_connects_again_20_times(
        broker: IpcBusBroker, sock_path: str, clients: Callable[..., IpcBusClient],
        sibling: bool) -> None:
    y = clients(sock_path) if sibling else None
    y_got = Collector()
    if y is not None:
        y.on("to-y", y_got)
    c = IpcBusClient.create()
    own = Collector()
    c.on("to-c", own)  # kept across reconnections: subscribed again at each connect
    seen: list[str] = []
    for i in range(20):
        with elapsed() as t:
            c.connect(sock_path)
        assert t[0] < 1.0
        assert c.connected
        seen.append(c.peer.id)
        c.send("to-c", i)
        assert own.wait(i + 1)[-1][1] == (i,)
        assert c.request("/ipcbus/queryState", 5.0).payload is not None
        peers = {p["id"] for p in broker.query_state()["peers"]}
        assert c.peer.id in peers and not peers & set(seen[:-1])
        if y is not None:
            c.send("to-y", i)
            assert y_got.wait(i + 1)[-1][1] == (i,)
        c.close()
        assert not c.connected
    assert len(set(seen)) == 20
    if y is not None:
        assert y.connected
        sync(y)


@pytest.mark.timeout(30)
def test_a_closed_client_reconnects_while_it_is_being_called(
        broker: IpcBusBroker, sock_path: str, clients: Callable[..., IpcBusClient]) -> None:
    """The answers of a closed membership never go out in the new one's name."""
    asker = clients(sock_path)
    c = IpcBusClient.create()
    held: list[IpcBusEvent] = []
    c.on("hold", lambda event, *a: held.append(event))
    c.connect(sock_path)
    future = asker.request_async("hold", 5.0)
    wait_until(lambda: held)
    c.close()
    c.connect(sock_path)
    with pytest.raises(IpcBusConnectionError):
        assert held[0].request is not None
        held[0].request.resolve("late")
    with pytest.raises(IpcBusRequestError):
        future.result(5)  # its receiver left: failed at once
    sync(asker)
    assert asker.connected and c.connected
    c.close()


# -- item 16: close() racing with sends from other threads --------------------------------------
@pytest.mark.timeout(60)
def test_close_racing_with_8_sending_threads_costs_the_sibling_nothing(
        broker: IpcBusBroker, sock_path: str, clients: Callable[..., IpcBusClient]) -> None:
    y = clients(sock_path)
    received: set[tuple[int, int, int]] = set()
    lock = threading.Lock()

    def on_race(event: IpcBusEvent, r: int, t: int, i: int) -> None:
        with lock:
            received.add((r, t, i))

    y.on("race", on_race)
    sync(y)
    for r in range(10):
        x = IpcBusClient.create().connect(sock_path)
        sent: list[tuple[int, int, int]] = []
        errors: list[BaseException] = []
        go = threading.Barrier(9)

        def sender(t: int) -> None:
            go.wait()
            i = 0
            while True:
                try:
                    x.send("race", r, t, i)
                except IpcBusConnectionError:
                    return
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    return
                sent.append((r, t, i))
                i += 1

        threads = [threading.Thread(target=sender, args=(t,), daemon=True) for t in range(8)]
        for th in threads:
            th.start()
        go.wait()
        wait_until(lambda: len(sent) > 50 * (r % 4 + 1))
        x.close()
        for th in threads:
            th.join(10)
        assert not any(th.is_alive() for th in threads)
        assert not errors
        assert y.connected
        sync(y)
        expected = set(sent)
        wait_until(lambda: expected <= received, timeout=10)
        with lock:
            assert {m for m in received if m[0] == r} == expected
    assert y.connected


# -- item 15: a listener raising SystemExit or KeyboardInterrupt ---------------------------------
def raising_listener_child(address: str, exc_name: str, out: Any, stop: Any) -> None:
    c = IpcBusClient.create().connect(address, peer_name="raiser")
    closed = threading.Event()
    c.on_closed(closed.set)
    exc_type = {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}[exc_name]

    def boom(event: IpcBusEvent, *args: Any) -> None:
        raise exc_type("from a listener")

    c.on("boom", boom)
    c.on("req", lambda event, *args: event.request and event.request.resolve("alive"))
    sync(c)
    out.put("ready")
    stop.poll(30)
    out.put(("closed" if closed.is_set() else "open", c.connected))
    c.close()


@pytest.mark.parametrize("exc_name", ["SystemExit", "KeyboardInterrupt"])
@pytest.mark.timeout(60)
def test_a_listener_raising_system_exit_leaves_the_connection_usable(
        ctx: Any, children: Children, broker: IpcBusBroker, sock_path: str,
        clients: Callable[..., IpcBusClient], exc_name: str) -> None:
    out = ctx.Queue()
    children.start(raising_listener_child, sock_path, exc_name, out, children.stop)
    assert out.get(timeout=30) == "ready"
    me = clients(sock_path)
    for i in range(3):
        me.send("boom", i)
        assert me.request("req", 5.0).payload == "alive"
    children.close()
    assert out.get(timeout=10) == ("open", True)


def injected_failure_child(address: str, out: Any, stop: Any) -> None:
    """A bug in the reader (injected: frames on "crash" make it raise) ends the connection:
    the broker must see it at once."""
    c = IpcBusClient.create().connect(address, peer_name="victim")
    conn = c._conn
    assert conn is not None
    handle = conn._handle_frames

    def failing(frames: list[P.Frame]) -> Any:
        if any(f.channel == "crash" for f in frames):
            raise RuntimeError("injected")
        return handle(frames)

    conn._handle_frames = failing  # type: ignore[method-assign]
    c.on("crash", lambda event, *a: None)
    c.on("req", lambda event, *a: None)  # never answers
    sync(c)
    out.put("ready")
    stop.poll(30)


@pytest.mark.timeout(60)
def test_an_internal_end_of_the_reader_lets_the_hub_fail_requests_at_once(
        ctx: Any, children: Children, broker: IpcBusBroker, sock_path: str,
        clients: Callable[..., IpcBusClient], caplog: pytest.LogCaptureFixture) -> None:
    out = ctx.Queue()
    children.start(injected_failure_child, sock_path, out, children.stop)
    assert out.get(timeout=30) == "ready"
    me = clients(sock_path)
    future = me.request_async("req", 20.0)
    with caplog.at_level(logging.CRITICAL, logger="ipcbus"):
        me.send("crash")
        with elapsed() as t:
            with pytest.raises(IpcBusRequestError):
                future.result(20)
    assert t[0] < 3.0
    wait_until(lambda: "victim" not in {p["name"] for p in broker.query_state()["peers"]})
