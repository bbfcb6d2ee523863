"""Readiness across real processes (SPEC 0.2): ``client.sync()`` and
``client.wait_for_listeners()``.

* Readiness without a lost first message: a subscriber in another process listens on a
  fresh channel without telling anyone; the publisher waits for it with
  ``wait_for_listeners`` and sends once: that first message is received. Repeated (20 rounds
  per start method), through the broker, the bridge (pipe children) and a bridge linked to a
  broker, both ways across the link.
* ``sync()`` after sends and subscriptions: their effect is visible in the hub's state.
* Timeouts and bad arguments.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Iterator

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusTimeoutError

import helpers
from helpers import elapsed, pid_of, wait_until

ROUNDS = 20
WAIT = 20.0  # bounds every wait (a spawn child on a busy machine is slow to start)


def _subscriber(address: Any, prefix: str, rounds: int, report: Any, stop: Any) -> None:
    """Each round: listen on a fresh channel ``prefix-i`` (telling no one), wait for its first
    message, report it, stop listening."""
    import queue
    client = IpcBusClient.create().connect(address, peer_name="subscriber")
    for i in range(rounds):
        got: queue.Queue[Any] = queue.Queue()

        def listener(event: Any, *args: Any) -> None:
            got.put(list(args))

        client.on(f"{prefix}-{i}", listener)
        try:
            report.put((i, got.get(timeout=WAIT)))
        except queue.Empty:
            report.put((i, None))
            break
        client.off(f"{prefix}-{i}", listener)
    stop.poll(WAIT)
    client.close()


class Children(helpers.Children):
    def subscriber(self, address: Any, prefix: str, rounds: int = ROUNDS) -> Any:
        report = self.ctx.Queue()
        self.start(_subscriber, address, prefix, rounds, report, self.stop)
        return report


@pytest.fixture
def children(ctx: Any) -> Iterator[Children]:
    kids = Children(ctx)
    try:
        yield kids
    finally:
        kids.close()


def _publish_rounds(publisher: IpcBusClient, prefix: str, report: Any,
                    rounds: int = ROUNDS) -> None:
    for i in range(rounds):
        assert publisher.wait_for_listeners(f"{prefix}-{i}", 1, WAIT) == 1
        publisher.send(f"{prefix}-{i}", "first", i)
        assert report.get(timeout=WAIT) == (i, ["first", i]), f"round {i}"


@pytest.mark.timeout(180)
def test_no_first_message_is_lost_through_the_broker(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    report = children.subscriber(broker.address, "news")
    _publish_rounds(clients(broker.address), "news", report)


@pytest.mark.timeout(180)
def test_no_first_message_is_lost_through_the_bridge(
        children: Children, clients: Callable[..., IpcBusClient]) -> None:
    bridge = IpcBusBridge.create().connect()
    try:
        report = children.subscriber(bridge.open_pipe(), "news")
        _publish_rounds(clients(None), "news", report)
    finally:
        bridge.close()


@pytest.mark.timeout(240)
def test_no_first_message_is_lost_across_a_bridge_link(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    """A subscriber behind the bridge, a publisher at the broker; then the other way."""
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        behind = children.subscriber(bridge.open_pipe(), "up", ROUNDS // 2)
        _publish_rounds(clients(broker.address), "up", behind, ROUNDS // 2)
        at_broker = children.subscriber(broker.address, "down", ROUNDS // 2)
        _publish_rounds(clients(None), "down", at_broker, ROUNDS // 2)
    finally:
        bridge.close()


@pytest.mark.timeout(60)
def test_wait_for_listeners_counts_the_peers_of_the_bus(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        at_bridge = clients(None)
        waiter = clients(broker.address)
        a, b = clients(broker.address), clients(broker.address)
        for c in (a, b, at_bridge):
            c.on("pool", lambda event, *args: None)
        a.on("pool", lambda event, *args: None)  # a second listener of one peer: one peer
        assert waiter.wait_for_listeners("pool", 3, WAIT) == 3
        assert at_bridge.wait_for_listeners("pool", 2, WAIT) == 3  # the broker counts
        with pytest.raises(IpcBusTimeoutError):
            at_bridge.wait_for_listeners("pool", 4, 0.3)
    finally:
        bridge.close()


@pytest.mark.timeout(60)
def test_sync_makes_sends_and_subscriptions_visible(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    c = clients(broker.address)
    for round_ in range(1, 6):
        for i in range(200):  # coalesced writes included
            c.send("counted", i)
        c.on(f"sub-{round_}", lambda event, *args: None)
        c.sync()
        state = broker.query_state()
        assert state["channel_stats"]["counted"]["messages"] == 200 * round_
        assert state["channels"][f"sub-{round_}"] == 1
    c.sync(-1)  # no timeout at all
    assert broker.query_state()["pending_requests"] == 0


@pytest.mark.timeout(60)
def test_sync_through_a_linked_bridge_covers_the_broker(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        c = clients(None)
        c.on("behind", lambda event, *args: None)
        for i in range(100):
            c.send("from-behind", i)
        c.sync()
        state = broker.query_state()  # the broker's own view, asked from another connection
        assert state["channels"]["behind"] == 1
        assert state["channel_stats"]["from-behind"]["messages"] == 100
    finally:
        bridge.close()


@pytest.mark.timeout(60)
def test_wait_for_listeners_times_out_and_is_forgotten(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    c = clients(broker.address)
    with elapsed() as t, pytest.raises(IpcBusTimeoutError) as ei:
        c.wait_for_listeners("nobody", 1, 0.5)
    assert isinstance(ei.value, TimeoutError)
    assert "nobody" in str(ei.value)
    assert 0.3 <= t[0] <= 2.0, t[0]
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)
    # a wait that ends by its client leaving is forgotten too
    other = IpcBusClient.create().connect(broker.address)
    fut = other._request_async_reserved("/ipcbus/waitListeners", -1, "never", 1)
    wait_until(lambda: broker.query_state()["pending_requests"] == 1)
    other.close()
    assert fut.exception(timeout=5) is not None
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)


@pytest.mark.timeout(60)
def test_wait_for_listeners_returns_when_a_listener_comes(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    waiter, late = clients(broker.address), clients(broker.address)
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(waiter.wait_for_listeners, "late", 1, WAIT)
        wait_until(lambda: broker.query_state()["pending_requests"] == 1)
        assert not fut.done()
        t0 = time.monotonic()
        late.on("late", lambda event, *args: None)
        assert fut.result(timeout=WAIT) == 1
        assert time.monotonic() - t0 < WAIT / 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args,error", [
    (("ch", 0), ValueError), (("ch", -1), ValueError), (("ch", "1"), TypeError),
    (("ch", True), TypeError), (("", 1), ValueError), ((5, 1), TypeError)])
def test_wait_for_listeners_refuses_bad_arguments(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient], args: Any,
        error: type[Exception]) -> None:
    c = clients(broker.address)
    with pytest.raises(error):
        c.wait_for_listeners(*args)
    with pytest.raises(TypeError):
        c.sync("soon")  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_sync_times_out_while_the_hub_is_stopped(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    c = clients(broker.address)
    c.sync()
    pid = pid_of(broker.process)
    os.kill(pid, signal.SIGSTOP)
    try:
        with elapsed() as t, pytest.raises(IpcBusTimeoutError) as ei:
            c.sync(0.3)
        assert isinstance(ei.value, TimeoutError)
        assert 0.2 <= t[0] <= 2.0, t[0]
    finally:
        os.kill(pid, signal.SIGCONT)
    c.sync()  # and the connection is fine
