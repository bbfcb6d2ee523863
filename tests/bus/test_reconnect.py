"""Issue 17 item 6 across real processes (SPEC 0.2, "Surviving a broker restart"): a broker
started with ``restart=True`` is SIGKILLed and restarted while clients connected with
``reconnect`` hold listeners, a group membership, a service and a proxy: each works again
afterwards with the same peer ids; a pending request fails with IpcBusConnectionError; calls
while down raise it at once (a sibling client without ``reconnect`` on the same connection is
closed, as before); ``on_disconnected``/``on_reconnected`` run once each and
``on_closed`` only on ``close()``; ``give_up`` closes for good; ``connect(path, timeout=T)``
waits for a broker that starts later (and fails cleanly when none comes); a client without
``reconnect`` is closed as before; reconnections leak no descriptors.

The restart test runs under spawn, fork and forkserver (the ``ctx`` fixture: the member child
and the broker's children); the others need one start method (the parent's clients, the
default broker).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest

from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusService,
                    IpcBusServiceProxy, IpcBusTimeoutError, Reconnect)

from helpers import Collector, elapsed, pid_of, running, wait_until
from helpers.measure import fd_count, settle

FAST = Reconnect(initial=0.02, maximum=0.2)  # small steps: the tests wait for a restart


class Calc:
    def add(self, a: int, b: int) -> int:
        return a + b


class Events:
    """What a client's handlers saw, in order, and an event per kind."""

    def __init__(self, client: IpcBusClient) -> None:
        self.seen: list[Any] = []
        self.down = threading.Event()
        self.up = threading.Event()
        self.closed = threading.Event()
        client.on_disconnected(self._down)
        client.on_reconnected(self._up)
        client.on_closed(self._closed)

    def _down(self, reason: str) -> None:
        assert isinstance(reason, str) and reason
        self.seen.append("down")
        self.down.set()

    def _up(self) -> None:
        self.seen.append("up")
        self.up.set()

    def _closed(self) -> None:
        self.seen.append("closed")
        self.closed.set()


def kill(broker: IpcBusBroker) -> int:
    pid = pid_of(broker.process)
    os.kill(pid, signal.SIGKILL)
    return pid


# -- the member child (module level, for spawn) ---------------------------------------------------
def member(address: str, report: Any, stop: Any) -> None:
    """A client with reconnect: a listener on "news", a member of group "pool" on "jobs", a
    listener on "hold" that never answers, and service "calc"; it reports its peer id when
    ready and again when reconnected (once its subscriptions are routed: sync). Service
    "pooled" is hosted as a member of group "g"."""
    client = IpcBusClient.create().connect(address, peer_name="member", reconnect=FAST)
    client.on("news", lambda event, x: report.put(("news", x)))
    client.on("jobs", lambda event, x: event.request.resolve(["member", x]), group="pool")
    client.on("hold", lambda event: report.put(("held",)))
    service = IpcBusService(client, "calc", Calc()).start()
    IpcBusService(client, "pooled", Calc(), group="g").start()  # a pool of one member
    client.on_disconnected(lambda reason: report.put(("disconnected", reason)))

    def back() -> None:
        client.sync(10)
        report.put(("reconnected", client.peer.id, service.is_started))

    client.on_reconnected(back)
    report.put(("ready", client.peer.id))
    stop.poll(60)
    client.close()


@pytest.mark.timeout(120)
def test_clients_survive_a_broker_restart(ctx: Any, sock_path: str, reporters: Any) -> None:
    kids, reports, q = reporters
    broker = IpcBusBroker.create(restart=True, context=ctx).connect(sock_path)
    main = None
    try:
        kids.start(member, sock_path, q, kids.stop)
        _, member_id = reports.next("ready")
        main = IpcBusClient.create().connect(sock_path, peer_name="main", reconnect=FAST)
        events = Events(main)
        proxy = IpcBusServiceProxy(main, "calc")
        proxy.connect(20)
        assert proxy.call("add", 1, 2) == 3
        assert main.request("jobs", 10, 1).payload == ["member", 1]
        main_id = main.peer.id
        held = main.request_async("hold", 60)
        reports.next("held")

        first = kill(broker)
        with pytest.raises(IpcBusConnectionError):
            held.result(10)  # a pending request fails, it does not wait for its timeout
        assert events.down.wait(10)
        main.wait_connected(30)
        _, again, started = reports.next("reconnected")
        assert (again, main.peer.id) == (member_id, main_id)  # peer ids unchanged
        assert started
        wait_until(lambda: pid_of(broker.process) != first, 10)  # swapped once it is ready

        proxy.connect(20)  # the service started again; the proxy learnt it
        assert proxy.is_started and proxy.call("add", 2, 3) == 5
        pooled = IpcBusServiceProxy(main, "pooled")  # started again with its group
        pooled.connect(20)
        assert pooled.call("add", 3, 4) == 7 and pooled.get_status().get("group") == "g"
        assert main.request("jobs", 10, 2).payload == ["member", 2]  # the group member
        main.send("news", "after")
        assert reports.next("news", 10)[1] == "after"  # the listener
        peers = {p["id"] for p in broker.query_state(5)["peers"]}
        assert {member_id, main_id} <= peers
        assert events.up.wait(10)
        assert events.seen == ["down", "up"]  # once each; on_closed not yet
        main.close()
        assert events.closed.wait(5)
        assert events.seen == ["down", "up", "closed"]
    finally:
        if main is not None:
            main.close()
        broker.close()
    assert not broker.process.is_alive()  # close() stopped it, and restarts with it


@pytest.mark.timeout(60)
def test_while_down_calls_raise_at_once_and_listeners_are_replayed(sock_path: str) -> None:
    first = IpcBusBroker.create().connect(sock_path)
    second = None
    a = IpcBusClient.create().connect(sock_path, reconnect=FAST)
    holder = IpcBusClient.create().connect(sock_path, reconnect=FAST)  # same connection
    plain = IpcBusClient.create().connect(sock_path)  # same connection, without reconnect
    try:
        events, plain_events = Events(a), Events(plain)
        got = Collector()
        holder.on("hold", got)  # never answers
        holder.sync(5)
        held = a.request_async("hold", 60)
        got.wait(1, 10)
        kill(first)
        with pytest.raises(IpcBusConnectionError):
            held.result(10)
        assert events.down.wait(10) and not a.connected
        assert plain_events.closed.wait(10) and plain_events.seen == ["closed"]  # as before
        late = Collector()
        with elapsed() as took:
            for call in (lambda: a.send("x", 1), lambda: a.send_to(holder.peer, "x", 1),
                         lambda: a.request("x", 30, 1), lambda: a.request_async("x", 30),
                         lambda: a.request_all("x", 30), lambda: a.post_message("x", 1),
                         lambda: a.sync(30)):
                with pytest.raises(IpcBusConnectionError, match="down"):
                    call()
            a.on("late", late)  # registration while down: local, replayed on reconnection
            with pytest.raises(IpcBusTimeoutError):
                a.wait_connected(0.2)
        assert took[0] < 2.0  # at once (the wait_connected above is 0.2 s of it)
        with pytest.raises(IpcBusConnectionError):
            a.connect(sock_path)  # reconnecting: not a second connection
        second = IpcBusBroker.create().connect(sock_path)
        a.wait_connected(20)
        holder.wait_connected(20)
        assert a.wait_for_listeners("late", 1, 10) == 1
        a.send("late", "replayed")
        assert late.wait(1, 10)[0][1] == ("replayed",)
        assert events.up.wait(10)
        assert events.seen == ["down", "up"]
        a.close()
        assert events.closed.wait(5)  # on the dispatch thread (holder still uses it)
        assert events.seen == ["down", "up", "closed"]
        with pytest.raises(IpcBusConnectionError):
            a.wait_connected(1)
    finally:
        a.close()
        holder.close()
        plain.close()
        first.close()
        if second is not None:
            second.close()


def interrupted_waiter(path: str, out: Any) -> None:
    """In a child's main thread: SIGINTs while ``wait_connected()`` waits for a bus that is
    down leave the client reconnecting; once a broker is back it joins it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    assert main is not None
    broker = IpcBusBroker.create().connect(path)
    client = IpcBusClient.create().connect(path, reconnect=FAST)
    events = Events(client)
    kill(broker)
    events.down.wait(10)
    seen = []
    for i in range(5):
        timer = threading.Timer(0.01 * (i + 1), signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        try:
            client.wait_connected(-1)
            seen.append("returned")
        except KeyboardInterrupt:
            seen.append("interrupted")
        timer.join()
    broker.close()
    second = IpcBusBroker.create().connect(path)
    client.wait_connected(20)
    client.sync(5)
    client.close()
    second.close()
    out.put((seen, events.seen))


@pytest.mark.timeout(60)
def test_an_interrupted_wait_leaves_the_client_reconnecting(sock_path: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # the parent's start method is not the point
    out = ctx.Queue()
    with running([ctx.Process(target=interrupted_waiter, args=(sock_path, out))]):
        seen, events = out.get(timeout=40)
    assert seen == ["interrupted"] * 5
    assert events == ["down", "up", "closed"]


@pytest.mark.timeout(60)
def test_give_up_closes_for_good(sock_path: str) -> None:
    broker = IpcBusBroker.create().connect(sock_path)
    client = IpcBusClient.create().connect(
        sock_path, reconnect=Reconnect(initial=0.05, maximum=0.1, give_up=0.5))
    try:
        events = Events(client)
        kill(broker)
        assert events.down.wait(10)
        with pytest.raises(IpcBusConnectionError, match="gave up"):
            client.wait_connected(10)
        assert events.closed.wait(5)
        assert events.seen == ["down", "closed"]
        with pytest.raises(IpcBusConnectionError):
            client.send("x", 1)
        assert not client.connected
    finally:
        client.close()
        broker.close()
    assert events.seen == ["down", "closed"]  # close() after giving up: no second on_closed


@pytest.mark.timeout(60)
def test_connect_waits_for_a_broker_that_starts_later(sock_path: str) -> None:
    brokers: list[IpcBusBroker] = []

    def start_later() -> None:
        time.sleep(0.3)  # the client is waiting already: the path does not exist yet
        brokers.append(IpcBusBroker.create().connect(sock_path))

    assert not os.path.exists(sock_path)
    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        with elapsed() as took:
            client = IpcBusClient.create().connect(sock_path, timeout=30)
        assert took[0] >= 0.3
        client.sync(5)
        client.close()
    finally:
        starter.join(30)
        for b in brokers:
            b.close()


@pytest.mark.timeout(30)
def test_connect_to_no_broker_fails_cleanly(sock_path: str) -> None:
    before = fd_count()
    with elapsed() as took:
        with pytest.raises(IpcBusConnectionError, match="no broker listened there in time"):
            IpcBusClient.create().connect(sock_path, timeout=0.3)
    assert 0.3 <= took[0] < 3.0
    with elapsed() as took:  # without a timeout: at once, as before
        with pytest.raises(IpcBusConnectionError):
            IpcBusClient.create().connect(sock_path)
    assert took[0] < 0.5
    assert fd_count() == before


@pytest.mark.timeout(30)
def test_a_client_without_reconnect_is_closed_as_before(sock_path: str) -> None:
    broker = IpcBusBroker.create().connect(sock_path)
    client = IpcBusClient.create().connect(sock_path)
    try:
        events = Events(client)
        kill(broker)
        assert events.closed.wait(10)
        assert events.seen == ["closed"]
        with pytest.raises(IpcBusConnectionError, match="closed"):
            client.send("x", 1)
        with pytest.raises(IpcBusConnectionError):
            client.wait_connected(1)
    finally:
        client.close()
        broker.close()


def test_reconnect_is_refused_where_it_cannot_work(sock_path: str) -> None:
    with pytest.raises(TypeError):
        IpcBusClient.create().connect(sock_path, reconnect="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ecipc"):
        IpcBusClient.create().connect("ecipc:" + sock_path, reconnect=True)
    with pytest.raises(TypeError):
        IpcBusBroker.create(restart=1)


@pytest.mark.timeout(90)
def test_no_descriptor_leak_across_reconnections(sock_path: str) -> None:
    broker = IpcBusBroker.create(restart=True).connect(sock_path)
    client = IpcBusClient.create().connect(sock_path, reconnect=FAST)
    try:
        got = Collector()
        client.on("echo", got)
        client.send("echo", 0)
        got.wait(1, 10)
        settle()
        before = fd_count()
        for cycle in range(1, 4):
            events = Events(client)
            kill(broker)
            assert events.down.wait(10)
            client.wait_connected(30)
            client.send("echo", cycle)
            got.wait(cycle + 1, 10)
            wait_until(lambda: events.up.is_set(), 10)
        settle()
        wait_until(lambda: fd_count() == before, 5)  # the old children's pipes are let go
    finally:
        client.close()
        broker.close()
