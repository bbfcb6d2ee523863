"""Ctrl-C in a thread blocked in the library (issue 14, item 20): the KeyboardInterrupt
surfaces in that thread as itself, and the connection stays usable by every other client
and thread of the process — with real SIGINTs, delivered to the main thread of a real child
process while it waits for an answer that never comes, and in the middle of a stream of fast
round trips."""
from __future__ import annotations

import os
import signal
import time
import threading
from typing import Any, Callable

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent

from helpers import Children, wait_until

ROUNDS = 50


def _interrupter(how: str, delay: float) -> threading.Timer:
    main = threading.main_thread().ident
    assert main is not None

    def fire() -> None:
        if how == "thread":
            signal.pthread_kill(main, signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(delay, fire)
    timer.daemon = True
    return timer


def _interrupted_rounds(rounds: int, step: float, work: Callable[[int], None],
                        report: dict[str, Any]) -> None:
    """``rounds`` times: ``work(i)`` until a SIGINT comes (after ``(i % 11) * step`` s, to
    this thread or to the process, in turn), counting the KeyboardInterrupts and anything
    else that surfaces."""
    for i in range(rounds):
        timer = _interrupter("thread" if i % 2 else "process", (i % 11) * step)
        try:
            timer.start()
            work(i)
            timer.join()  # pragma: no cover - the interrupt comes first
        except KeyboardInterrupt:
            report["interrupts"] += 1
        except BaseException as exc:
            report["unexpected"].append(repr(exc))
        finally:
            try:
                timer.join(5)
            except KeyboardInterrupt:  # pragma: no cover - landed late
                report["interrupts"] += 1


def interrupted_requester(address: str, mode: str, out: Any, busy: bool = False) -> None:
    """In the child's main thread: ROUNDS requests interrupted by SIGINT, then checks."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report: dict[str, Any] = {"interrupts": 0, "unexpected": [], "answers": 0}
    c = IpcBusClient.create().connect(address, peer_name="interrupted")
    sibling = IpcBusClient.create().connect(address, peer_name="sibling")

    def work(i: int) -> None:
        if mode == "stream":
            for _ in range(100_000):  # ends with the interrupt
                c.request("fast", 10.0, i)
                report["answers"] += 1
        else:
            c.request("never", 30.0, i)

    stop = threading.Event()
    failures: list[str] = []

    def meanwhile() -> None:  # another thread's round trips, through the same connection
        k = 0
        while not stop.is_set():
            try:
                assert sibling.request("fast", 5.0, k).payload == k
            except BaseException as exc:  # pragma: no cover - reported
                failures.append(repr(exc))
            k += 1

    other_thread = threading.Thread(target=meanwhile, daemon=True)
    if busy:
        other_thread.start()
    try:
        _interrupted_rounds(ROUNDS if mode == "waiting" else 4 * ROUNDS, 0.0005, work, report)
        stop.set()
        if busy:
            other_thread.join(20)
        report["unexpected"] += [f"meanwhile: {f}" for f in failures]
        # The connection is usable by this thread, another thread, both clients, a new one.
        for i in range(20):
            assert c.request("fast", 5.0, i).payload == i
            assert sibling.request("fast", 5.0, i).payload == i
        other: list[Any] = []

        def from_another_thread() -> None:
            try:
                other.extend(c.request("fast", 5.0, k).payload for k in range(20))
            except BaseException as exc:  # pragma: no cover - reported
                other.append(repr(exc))

        t = threading.Thread(target=from_another_thread)
        t.start()
        t.join(20)
        report["other_thread"] = other == list(range(20))
        late = IpcBusClient.create().connect(address, peer_name="late", timeout=5)
        report["late"] = late.request("fast", 5.0, "late").payload == "late"
        late.close()
        report["connected"] = c.connected and sibling.connected
        conn = c._conn
        assert conn is not None
        # Nothing an interrupted caller took is left behind.
        report["left_behind"] = len(conn.requests.table)
    except BaseException as exc:
        report["unexpected"].append(f"after the rounds: {exc!r}")
    finally:
        out.put(report)
        sibling.close()
        c.close()


@pytest.mark.parametrize("mode", ["waiting", "stream", "stream, another thread too"])
@pytest.mark.timeout(120)
def test_sigint_during_requests_surfaces_as_itself_and_leaves_the_connection_usable(
        ctx: Any, children: Children, broker: IpcBusBroker, sock_path: str,
        clients: Callable[..., IpcBusClient], mode: str) -> None:
    server = clients(sock_path, peer_name="server")

    def fast(event: IpcBusEvent, value: Any) -> None:
        assert event.request is not None
        event.request.resolve(value)

    server.on("fast", fast)
    server.on("never", lambda event, *a: None)
    server.request("/ipcbus/queryState", 5.0)
    out = ctx.Queue()
    children.start(interrupted_requester, sock_path, mode.partition(",")[0], out, "," in mode)
    report = out.get(timeout=100)
    assert report["unexpected"] == []
    assert report["interrupts"] == (ROUNDS if mode == "waiting" else 4 * ROUNDS)
    assert report["other_thread"] and report["late"] and report["connected"]
    assert report["left_behind"] == 0
    assert server.connected
    if mode != "waiting":
        assert report["answers"] > 0


def interrupted_sender(address: str, rounds: int, out: Any) -> None:
    """In the child's main thread: large broadcasts to a slow receiver (so that writes block
    under back-pressure), interrupted by SIGINT; then the connection must still work."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report: dict[str, Any] = {"interrupts": 0, "unexpected": [], "sent": 0}
    c = IpcBusClient.create().connect(address, peer_name="sender")
    payload = b"x" * (256 * 1024)

    def work(i: int) -> None:
        for _ in range(100_000):  # ends with the interrupt
            c.send("sink", payload)
            report["sent"] += 1

    try:
        _interrupted_rounds(rounds, 0.001, work, report)
        for i in range(20):
            assert c.request("fast", 5.0, i).payload == i
        report["connected"] = c.connected
    except BaseException as exc:
        report["unexpected"].append(f"after the rounds: {exc!r}")
    finally:
        out.put(report)
        c.close()


@pytest.mark.timeout(120)
def test_sigint_during_writes_under_back_pressure_keeps_frames_whole(
        ctx: Any, children: Children, sock_path: str,
        clients: Callable[..., IpcBusClient]) -> None:
    with IpcBusBroker.create(queue_limit=1 << 20).connect(sock_path):
        server = clients(sock_path, peer_name="server")
        received = []

        def sink(event: IpcBusEvent, payload: bytes) -> None:
            received.append(len(payload))
            time.sleep(0.0005)  # a slow receiver: the sender's writes block

        def fast(event: IpcBusEvent, value: Any) -> None:
            assert event.request is not None
            event.request.resolve(value)

        server.on("sink", sink)
        server.on("fast", fast)
        server.request("/ipcbus/queryState", 5.0)
        out = ctx.Queue()
        children.start(interrupted_sender, sock_path, 30, out)
        report = out.get(timeout=100)
        assert report["unexpected"] == []
        assert report["interrupts"] == 30 and report["connected"]
        assert server.connected
        assert set(received) == {256 * 1024}


def interrupted_joiner(address: str, rounds: int, out: Any) -> None:
    """In the child's main thread: connect() and close() of new clients, interrupted by
    SIGINT at varying points, while a sibling client keeps the connection open."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report: dict[str, Any] = {"interrupts": 0, "unexpected": [], "joined": 0}
    sibling = IpcBusClient.create().connect(address, peer_name="sibling")
    made: list[IpcBusClient] = []

    def work(i: int) -> None:
        for _ in range(100_000):  # ends with the interrupt
            c = IpcBusClient.create()
            made.append(c)
            c.on("x", lambda event, *a: None)
            c.connect(address, peer_name="flaky")
            report["joined"] += 1
            c.close()

    try:
        _interrupted_rounds(rounds, 0.0002, work, report)
        for c in made:
            c.close()  # those an interrupt caught inside connect() or close()
        for i in range(20):
            assert sibling.request("fast", 5.0, i).payload == i
        late = IpcBusClient.create().connect(address, peer_name="late", timeout=5)
        report["late"] = late.request("fast", 5.0, "late").payload == "late"
        late.close()
        report["connected"] = sibling.connected
    except BaseException as exc:
        report["unexpected"].append(f"after the rounds: {exc!r}")
    finally:
        out.put(report)
        sibling.request("/ipcbus/queryState", 5.0)  # everything above has been routed
        out.put("routed")
        sibling.close()


@pytest.mark.timeout(120)
def test_sigint_during_connect_and_close_leaves_no_peer_behind(
        ctx: Any, children: Children, broker: IpcBusBroker, sock_path: str,
        clients: Callable[..., IpcBusClient]) -> None:
    server = clients(sock_path, peer_name="server")
    server.on("fast", lambda event, value: event.request and event.request.resolve(value))
    server.request("/ipcbus/queryState", 5.0)
    out = ctx.Queue()
    children.start(interrupted_joiner, sock_path, 60, out)
    report = out.get(timeout=100)
    assert out.get(timeout=20) == "routed"
    assert report["unexpected"] == []
    assert report["interrupts"] == 60 and report["joined"] > 0
    assert report["late"] and report["connected"]

    def nothing_left() -> bool:  # no peer (nor its subscription) left behind by an interrupt
        state = broker.query_state()
        return "flaky" not in [p["name"] for p in state["peers"]] \
            and "x" not in state["channels"]

    wait_until(nothing_left, timeout=5)  # (a PEER_REMOVE may follow a late PEER_ADD answer)


def interrupted_subscriber(address: str, rounds: int, out: Any, back: Any) -> None:
    """In the child's main thread: on() and off() that wait for the send lock (held by
    another thread, as a long write under back-pressure would) when SIGINT comes."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report: dict[str, Any] = {"interrupts": 0, "unexpected": [], "registered": []}
    c = IpcBusClient.create().connect(address, peer_name="subscriber")
    conn = c._conn
    assert conn is not None

    def listener(event: IpcBusEvent, *args: Any) -> None:
        pass

    def hold_the_send_lock(held: threading.Event) -> None:
        with conn.send_lock:
            held.set()
            time.sleep(0.02)  # a long write, as seen by the other threads

    try:
        for op in ("on", "off"):
            for i in range(rounds):
                held = threading.Event()
                holder = threading.Thread(target=hold_the_send_lock, args=(held,))
                holder.start()
                held.wait(5)
                timer = _interrupter("thread", 0.005)
                try:
                    timer.start()
                    getattr(c, op)(f"ch{i}", listener)
                    timer.join()
                except KeyboardInterrupt:
                    report["interrupts"] += 1
                finally:
                    timer.join(5)
                    holder.join(5)
            report["registered"].append(sorted(c.event_names()))
            c.request("/ipcbus/queryState", 5.0)  # the (un)subscriptions have been routed
            out.put(op)
            back.get(timeout=20)  # the parent has looked
    except BaseException as exc:
        report["unexpected"].append(repr(exc))
    finally:
        out.put(report)
        c.close()


@pytest.mark.timeout(60)
def test_sigint_while_on_or_off_waits_for_the_send_lock_keeps_the_bus_in_step(
        ctx: Any, children: Children, broker: IpcBusBroker, sock_path: str) -> None:
    out, back = ctx.Queue(), ctx.Queue()
    rounds = 10
    children.start(interrupted_subscriber, sock_path, rounds, out, back)
    names = {f"ch{i}" for i in range(rounds)}
    assert out.get(timeout=30) == "on"
    assert names <= set(broker.query_state()["channels"])  # each on() did subscribe
    back.put("next")
    assert out.get(timeout=30) == "off"
    assert not names & set(broker.query_state()["channels"])  # each off() unsubscribed
    back.put("next")
    report = out.get(timeout=30)
    assert report["unexpected"] == []
    assert report["interrupts"] == 2 * rounds
    assert report["registered"] == [sorted(names), []]
