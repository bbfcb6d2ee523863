"""The client's two I/O threads: taking turns, the dispatch budget, idle cost, closing.

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

import ipcbus.client as client_module
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
        conn.budget = 1 * MiB
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
        assert wait_until(lambda: conn.over_budget, timeout=10)
        queued = conn.queued_bytes
        assert 1 * MiB < queued < 4 * MiB, queued  # it stopped, a little past the budget
        release.set()
        assert done.wait(20), len(seen)
        assert seen == list(range(n))
        assert not conn.over_budget and conn.queued_bytes == 0
    finally:
        release.set()
        pub.close()
        sub.close()


@pytest.mark.timeout(60)
def test_a_nested_request_reads_its_own_answer(broker: IpcBusBroker) -> None:
    """A listener's request answered by a listener of the same client: nested dispatch,
    500 times in a row, with the listener's I/O thread reading for itself."""
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
    """After traffic stops, the parked I/O thread stops looking for work every millisecond
    (within 50 ms): an idle second costs almost no CPU."""
    c = IpcBusClient.create().connect(broker.address, peer_name="idle")
    try:
        c.on("x", lambda event, *args: None)
        sync(c)
        for i in range(2000):
            c.send("x", i)
        sync(c)
        time.sleep(0.3)  # let the poller go to sleep: this is what is being measured
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
            c.send("tick")  # traffic keeps the I/O threads from going to sleep
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
    """A caller reading its own answer polls for it for at most SPIN_WAIT (200 µs), then
    sleeps: five requests answered after 0.2 s each cost it a few ms of CPU, not a second.
    With the spin turned off the answers come the same way."""
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
        conn = client._conn
        assert conn is not None and conn.caller_spin.limit == client_module.SPIN_WAIT > 0
        cpu0 = time.thread_time()
        for i in range(5):
            assert client.request("slow", 5.0, i).payload == i
        used = time.thread_time() - cpu0
        assert used < 0.05, used  # polling through the 1 s would cost about 1 s
        conn.caller_spin.limit = conn.reader_spin.limit = 0.0
        assert [client.request("fast", 5.0, i).payload for i in range(200)] == list(range(200))
        assert client.request("slow", 5.0, 9).payload == 9
    finally:
        for timer in timers:
            timer.join()
        client.close()
        server.close()


@pytest.mark.parametrize("value,expected", [("", 200e-6), ("0", 0.0), ("50", 50e-6),
                                            ("-5", 0.0), ("fast", 200e-6)])
def test_spin_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                           expected: float) -> None:
    monkeypatch.setenv("IPCBUS_SPIN_US", value)
    assert client_module._spin_setting() == pytest.approx(expected)


def test_spin_stops_after_two_polls_in_vain_and_tries_again_later() -> None:
    spin = client_module._Spin(200e-6)
    assert spin.until(10.0) == pytest.approx(10.0 + 200e-6)
    spin.outcome(False)
    assert spin.until(10.0) > 0  # one miss: still polls
    spin.outcome(True)
    spin.outcome(False)  # a hit in between: the misses start over
    assert spin.until(10.0) > 0
    spin.outcome(False)  # two in a row
    assert [spin.until(10.0) for _ in range(client_module._SPIN_SKIP)] == \
        [0.0] * client_module._SPIN_SKIP
    assert spin.until(10.0) > 0  # tries again
    assert client_module._Spin(0.0).until(10.0) == 0.0


def _spin_server(address: str, ready: Any, stop: Any) -> None:
    """A child that echoes, and reports its reader's polling state on "spin-state"."""
    server = IpcBusClient.create().connect(address, peer_name="spin-server")
    conn = server._conn
    assert conn is not None
    server.on("echo", lambda event, x: event.request.resolve(x))
    server.on("spin-state", lambda event: event.request.resolve(
        [conn.reader_spin.limit, conn.reader_spin.misses, conn.reader_spin.skip]))
    sync(server)
    ready.set()
    stop.poll(30)
    server.close()


@pytest.mark.timeout(60)
def test_a_listener_answering_requests_far_apart_stops_polling(broker: IpcBusBroker,
                                                              children: Any) -> None:
    """After it answers, a process polls for its next request for up to SPIN_WAIT, but only
    while that pays: with requests 30 ms apart, two polls run out and the next ones are
    skipped."""
    ready = children.ctx.Event()
    children.start(_spin_server, broker.address, ready, children.stop)
    assert ready.wait(30)
    client = IpcBusClient.create().connect(broker.address, peer_name="client")
    try:
        for i in range(200):
            assert client.request("echo", 5.0, i).payload == i
        for i in range(6):
            time.sleep(0.03)  # the gap between requests is what is being tested
            assert client.request("echo", 5.0, i).payload == i
        limit, misses, skip = client.request("spin-state", 5.0).payload
        assert limit > 0 and misses >= 2 and skip > 0, (limit, misses, skip)
    finally:
        client.close()
