"""The client's two I/O threads (a reader, a dispatcher): the dispatch budget, nested
requests, idle cost, closing.

(That a stuck listener does not hold up answers from another process is
``test_requests.py::test_slow_listener_does_not_delay_answers``.)

These run in one process against a real broker (its own spawned process, real sockets): the
behaviour under test is the connection's threading, which a child process would only hide.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent

from helpers import elapsed, sync, wait_until

MiB = 1024 * 1024


def _io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ipcbus-io")]


@pytest.mark.timeout(60)
def test_budget_stops_reading_then_resumes_and_loses_nothing(broker: IpcBusBroker) -> None:
    """A listener blocked while 8 MiB arrive: reading stops at the (lowered) 1 MiB budget,
    then resumes once the listener returns; every message arrives, in order."""
    sub = IpcBusClient.create().connect(broker.address, peer_name="budget-sub")
    pub = IpcBusClient.create().connect(broker.address, peer_name="budget-pub")
    try:
        conn = sub._conn
        assert conn is not None
        conn.inbox.budget = 1 * MiB
        release, got_first = threading.Event(), threading.Event()
        seen: list[int] = []
        done = threading.Event()
        n = 2000

        def on_data(event: IpcBusEvent, i: int, blob: bytes) -> None:
            if i == 0:
                got_first.set()
                release.wait(20)
            seen.append(i)
            if i == n - 1:
                done.set()

        sub.on("data", on_data)
        sync(sub)
        blob = b"b" * 4096
        for i in range(n):
            pub.send("data", i, blob)
        assert got_first.wait(10)
        assert wait_until(lambda: conn.inbox.over_budget, timeout=10)
        queued = conn.inbox.queued_bytes
        assert 1 * MiB < queued < 4 * MiB, queued  # it stopped, a little past the budget
        release.set()
        assert done.wait(20), len(seen)
        assert seen == list(range(n))
        assert not conn.inbox.over_budget and conn.inbox.queued_bytes == 0
    finally:
        release.set()
        pub.close()
        sub.close()


@pytest.mark.timeout(60)
def test_a_nested_request_reads_its_own_answer(broker: IpcBusBroker) -> None:
    """A listener's request answered by a listener of the same client: nested dispatch,
    500 times in a row."""
    c = IpcBusClient.create().connect(broker.address, peer_name="nested")
    try:
        c.on("inner", lambda event, x: event.request.resolve(x + 1))
        out: list[Any] = []
        done = threading.Event()

        def outer(event: IpcBusEvent, x: int) -> None:
            for i in range(500):
                x = c.request("inner", 5, x).payload
            out.append(x)
            done.set()

        c.on("outer", outer)
        sync(c)
        c.send("outer", 0)
        assert done.wait(30)
        assert out == [500]
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_an_idle_connection_costs_no_cpu(broker: IpcBusBroker) -> None:
    """After traffic stops, the I/O threads sleep until something arrives: an idle second
    costs almost no CPU."""
    c = IpcBusClient.create().connect(broker.address, peer_name="idle")
    try:
        c.on("x", lambda event, *args: None)
        sync(c)
        for i in range(2000):
            c.send("x", i)
        sync(c)
        time.sleep(0.3)  # let the dispatcher's idle timeout pass: this is what is measured
        cpu0 = time.process_time()
        time.sleep(1.0)
        used = time.process_time() - cpu0
        assert used < 0.05, used  # a 1 kHz poller would cost tens of ms here
        assert len(_io_threads()) == 2
    finally:
        c.close()
    assert wait_until(lambda: not _io_threads(), timeout=5)


@pytest.mark.timeout(60)
def test_a_large_receive_buffer_is_not_kept_once_idle(broker: IpcBusBroker) -> None:
    """The buffer of a large message is kept for the next one while traffic flows, and let go
    once the connection is quiet (no 16 MiB held by an idle process)."""
    c = IpcBusClient.create().connect(broker.address, peer_name="big-idle")
    try:
        got = threading.Event()
        c.on("big", lambda event, blob: got.set())
        sync(c)
        # a large str: a large bytes argument would be received into its own object instead
        c.send("big", "z" * (4 * MiB))
        assert got.wait(10)
        conn = c._conn
        assert conn is not None

        def kept_while_busy() -> bool:
            c.send("tick")  # traffic keeps the connection from going idle
            return conn.decoder._spare is not None

        assert wait_until(kept_while_busy, timeout=5, interval=0.005)
        assert wait_until(lambda: conn.decoder._spare is None, timeout=5)
    finally:
        c.close()
    assert wait_until(lambda: not _io_threads(), timeout=5)


@pytest.mark.timeout(60)
def test_close_from_a_listener_ends_both_io_threads(broker: IpcBusBroker) -> None:
    """close() called inside a listener (on an I/O thread) returns, the on_closed handlers
    run, and both I/O threads end."""
    c = IpcBusClient.create().connect(broker.address, peer_name="self-closer")
    closed, returned = threading.Event(), threading.Event()
    c.on_closed(closed.set)

    def on_bye(event: IpcBusEvent) -> None:
        c.close(timeout=5)
        returned.set()

    c.on("bye", on_bye)
    sync(c)
    c.send("bye")
    assert returned.wait(10)
    assert closed.wait(10)
    assert wait_until(lambda: not _io_threads(), timeout=5)


@pytest.mark.timeout(60)
def test_a_slow_answer_costs_the_waiting_caller_little_cpu(broker: IpcBusBroker) -> None:
    """A caller sleeps until its answer comes: five requests answered after 0.2 s each cost
    it a few ms of CPU, not a second; fast answers come the same way."""
    server = IpcBusClient.create().connect(broker.address, peer_name="server")
    client = IpcBusClient.create().connect(broker.address, peer_name="client")
    timers: list[threading.Timer] = []

    def slow(event: IpcBusEvent, x: int) -> None:
        assert event.request is not None
        timers.append(threading.Timer(0.2, event.request.resolve, (x,)))
        timers[-1].start()

    try:
        server.on("slow", slow)
        server.on("fast", lambda event, x: event.request.resolve(x))
        sync(server)
        cpu0 = time.thread_time()
        for i in range(5):
            assert client.request("slow", 5.0, i).payload == i
        used = time.thread_time() - cpu0
        assert used < 0.05, used  # polling through the 1 s would cost about 1 s
        assert [client.request("fast", 5.0, i).payload for i in range(200)] == list(range(200))
        assert client.request("slow", 5.0, 9).payload == 9
    finally:
        for timer in timers:
            timer.join()
        client.close()
        server.close()
