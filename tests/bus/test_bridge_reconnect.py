"""Issue 17 item 6, the bridge's part, across real processes: a bridge linked with
``reconnect`` to a broker started with ``restart=True``, which is SIGKILLed while the bridge
links two pipe children (under spawn, fork and forkserver: the ``ctx`` fixture).

While the link is down the bridge's side is a bus of its own: the pipe children talk to each
other, and a request that needed the broker fails at once. Once the bridge has linked again
(its first attempt waits ``OUTAGE`` seconds, so the broker's socket clients are back first and
the outage is long enough to be seen), its side is announced to the new broker: a socket
client reaches a pipe child's listener, a request from a pipe child reaches a socket client's
listener, the group member behind the bridge gets jobs, and the service hosted by a pipe child
is callable from a socket client's proxy (which saw it stop, and is told it started again:
the bridge asks the host its status and broadcasts "start"); and a proxy on the bridge's side
of a service hosted beyond the link sees it stop at the loss and start again. A bridge without
``reconnect`` keeps its link closed, as before, and one that gives up keeps its own bus. A
peer whose id a peer of the new broker took meanwhile stays local-only, without harm to the
link; a new broker with a smaller message limit is never sent more than it takes.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusError, IpcBusRequestError,
                    IpcBusService, IpcBusServiceProxy, Reconnect)

from ipcbus import _protocol as P
from ipcbus._protocol import Kind

from helpers import Collector, pid_of, wait_until
from helpers.rawpeer import RawPeer

FAST = Reconnect(initial=0.02, maximum=0.2)  # the broker's socket clients
OUTAGE = 1.5  # the bridge's first attempt waits this long (seconds)
BRIDGE = Reconnect(initial=OUTAGE, maximum=OUTAGE)


class Calc:
    def add(self, a: int, b: int) -> int:
        return a + b


# -- the pipe children (module level, for spawn) --------------------------------------------------
def worker(conn: Any, report: Any, stop: Any) -> None:
    """Pipe child "A": answers "ping" and "local", a member of group "pool" of "jobs", and the
    host of service "calc"."""
    client = IpcBusClient.create().connect(conn, peer_name="A")
    client.on("ping", lambda event, x: event.request.resolve(["A", x]))
    client.on("local", lambda event, x: event.request.resolve(["A-local", x]))
    client.on("jobs", lambda event, x: event.request.resolve(["A-job", x]), group="pool")
    IpcBusService(client, "calc", Calc()).start()
    IpcBusService(client, "pooled", Calc(), group="g").start()  # a pool of one member
    report.put(("ready", "A", client.peer.id))
    stop.poll(60)
    client.close()


def asker(conn: Any, report: Any, stop: Any) -> None:
    """Pipe child "B": on an "ask" broadcast ``(channel, x)``, requests ``channel`` and reports
    the answer (or the error's type)."""
    client = IpcBusClient.create().connect(conn, peer_name="B")

    def ask(channel: str, x: Any) -> None:
        try:
            answer: Any = client.request(channel, 10, x).payload
        except IpcBusError as exc:
            answer = type(exc).__name__
        report.put(("answer", channel, answer))

    client.on("ask", lambda event, channel, x: threading.Thread(
        target=ask, args=(channel, x), daemon=True).start())
    report.put(("ready", "B", client.peer.id))
    stop.poll(60)
    client.close()


def relinked(bridge: IpcBusBridge) -> int:
    relinker = bridge._relinker
    return 0 if relinker is None else relinker.relinked


@pytest.mark.timeout(120)
def test_bridge_relinks_after_a_broker_restart(ctx: Any, sock_path: str, reporters: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ipcbus")
    kids, reports, q = reporters
    broker = IpcBusBroker.create(restart=True, context=ctx).connect(sock_path)
    bridge = main = local = None
    try:
        bridge = IpcBusBridge.create().connect(sock_path, reconnect=BRIDGE)
        kids.start(worker, bridge.open_pipe(), q, kids.stop)
        kids.start(asker, bridge.open_pipe(), q, kids.stop)
        ids = {reports.next("ready")[1:] for _ in range(2)}
        main = IpcBusClient.create().connect(sock_path, peer_name="main", reconnect=FAST)
        main.on("socket-side", lambda event, x: event.request.resolve(["main", x]))
        local = IpcBusClient.create().connect()  # a client of the bridge, in this process
        proxy = IpcBusServiceProxy(main, "calc")
        proxy.connect(20)
        assert proxy.call("add", 1, 2) == 3
        IpcBusService(main, "far", Calc()).start()  # hosted beyond the link, for "local"
        far = IpcBusServiceProxy(local, "far")
        far.connect(20)
        assert main.request("ping", 10, 1).payload == ["A", 1]

        pid = pid_of(broker.process)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: bridge is not None and bridge._hub is not None
                   and bridge._hub.router.upstream is None, 10)
        # The outage: the bridge's side is a bus of its own.
        local.send("ask", "local", 7)  # B asks A, through the bridge only
        assert reports.next("answer", 10)[1:] == ("local", ["A-local", 7])
        started = time.monotonic()
        with pytest.raises(IpcBusRequestError):
            local.request("socket-side", 10, 0)  # needed the broker: fails at once
        assert time.monotonic() - started < 2.0
        wait_until(lambda: not far.is_started, 5)  # the link's loss stopped it here
        assert relinked(bridge) == 0  # all of the above happened while the link was down

        main.wait_connected(30)
        wait_until(lambda: relinked(bridge) == 1, 30)
        wait_until(lambda: pid_of(broker.process) != pid, 10)
        for channel in ("ping", "ask", "jobs"):
            main.wait_for_listeners(channel, 1, 10)
        assert main.request("ping", 10, 2).payload == ["A", 2]  # socket client -> pipe child
        main.send("ask", "socket-side", 9)  # pipe child -> socket client
        assert reports.next("answer", 10)[1:] == ("socket-side", ["main", 9])
        assert main.request("jobs", 10, 3).payload == ["A-job", 3]  # the group member
        proxy.connect(20)  # told "start" once the service was claimed again
        assert proxy.is_started and proxy.call("add", 2, 3) == 5
        status = proxy.status
        assert status["host"]["name"] == "A" and "add" in status["calls"]
        assert "service 'calc' of A started again on the relinked bus" in caplog.text
        pooled = IpcBusServiceProxy(main, "pooled")  # the pool's member, started again
        pooled.connect(20)
        assert pooled.call("add", 3, 4) == 7 and pooled.status.get("group") == "g"
        assert "service 'pooled' of A started again on the relinked bus" in caplog.text
        far.connect(20)  # its host, back before the bridge, told "local"'s proxy "start"
        assert far.call("add", 4, 5) == 9
        peers = {(p["name"], p["id"]) for p in broker.query_state(5)["peers"]}
        assert ids <= peers  # the same ids
        assert local.peer.id in {p for _, p in peers}
    finally:
        for c in (main, local):
            if c is not None:
                c.close()
        if bridge is not None:
            bridge.close()
        broker.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ipcbus-bridge-relink")]


@pytest.mark.timeout(60)
def test_bridge_without_reconnect_stays_unlinked(sock_path: str) -> None:
    broker = IpcBusBroker.create(restart=True).connect(sock_path)
    bridge = IpcBusBridge.create().connect(sock_path)
    local = main = None
    try:
        local = IpcBusClient.create().connect()
        local.on("here", lambda event: event.request.resolve("local"))
        assert local.request("here", 5).payload == "local"
        pid = pid_of(broker.process)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: bridge._hub is not None and bridge._hub.router.upstream is None, 10)
        assert not [t for t in threading.enumerate()
                    if t.name.startswith("ipcbus-bridge-relink")]  # no retry thread
        assert local.request("here", 5).payload == "local"  # its own bus goes on
        wait_until(lambda: pid_of(broker.process) != pid, 20)
        main = IpcBusClient.create().connect(sock_path, timeout=10)
        main.sync(5)
        assert local.peer.id not in {p["id"] for p in broker.query_state(5)["peers"]}
        with pytest.raises(IpcBusRequestError):
            main.request("here", 5)  # nobody behind the bridge is on the new broker
    finally:
        for c in (main, local):
            if c is not None:
                c.close()
        bridge.close()
        broker.close()


@pytest.mark.timeout(60)
def test_a_bridge_that_gives_up_keeps_its_own_bus(sock_path: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """No broker comes back (not restarted): past ``give_up`` the link stays closed, logged;
    the retry thread ends and the bridge's own bus goes on."""
    broker = IpcBusBroker.create().connect(sock_path)
    bridge = IpcBusBridge.create().connect(
        sock_path, reconnect=Reconnect(initial=0.05, maximum=0.1, give_up=0.5))
    local = None
    try:
        local = IpcBusClient.create().connect()
        local.on("here", lambda event: event.request.resolve("local"))
        os.kill(pid_of(broker.process), signal.SIGKILL)
        wait_until(lambda: "the link stays closed: gave up reconnecting after 0.5 s"
                   in caplog.text, 10)
        wait_until(lambda: not [t for t in threading.enumerate()
                                if t.name.startswith("ipcbus-bridge-relink")], 5)
        assert relinked(bridge) == 0
        assert local.request("here", 5).payload == "local"
    finally:
        if local is not None:
            local.close()
        bridge.close()
        broker.close()


@pytest.mark.timeout(60)
def test_an_id_taken_meanwhile_stays_local_only(sock_path: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """While the link is down a peer of the new broker takes the id of a bridge's peer "L":
    on relinking the broker refuses it, and "L" stays local-only: its frames are kept from
    the link (one would make the broker close it), the other peers are announced as usual."""
    broker = IpcBusBroker.create().connect(sock_path)
    bridge = IpcBusBridge.create().connect(sock_path, reconnect=Reconnect(initial=0.5,
                                                                          maximum=0.5))
    thief = main = None
    clients: list[IpcBusClient] = []
    try:
        local_l, local_m = (IpcBusClient.create().connect(peer_name=n) for n in "LM")
        clients += [local_l, local_m]
        got = Collector()
        local_m.on("news", got)
        local_m.on("m-here", lambda event: event.request.resolve("M"))
        os.kill(pid_of(broker.process), signal.SIGKILL)
        wait_until(lambda: bridge._hub is not None and bridge._hub.router.upstream is None, 10)
        broker.close()
        broker = IpcBusBroker.create().connect(sock_path)  # a new broker, at once
        thief = RawPeer.unix(sock_path)
        thief.handshake()
        thief.send(P.encode_frame(Kind.PEER_ADD, sender=[local_l.peer.id, "thief", "socket",
                                                         os.getpid()], rid=1))
        assert thief.expect(Kind.RESPONSE).target == local_l.peer.id
        wait_until(lambda: relinked(bridge) == 1, 20)
        wait_until(lambda: "local-only" in caplog.text, 10)
        upstream = bridge._hub.router.upstream if bridge._hub is not None else None
        assert upstream is not None
        local_l.send("news", "from L")  # to M here; not to the broker (kept from the link)
        got.wait(1, 5)
        assert got.args == [("from L",)]
        local_m.sync(5)  # the broker has seen everything the bridge sent before: still linked
        main = IpcBusClient.create().connect(sock_path)
        main.wait_for_listeners("m-here", 1, 10)
        assert main.request("m-here", 5).payload == "M"  # M was announced again
        assert bridge._hub is not None and bridge._hub.router.upstream is upstream
        assert relinked(bridge) == 1
    finally:
        for c in (main, *clients):
            if c is not None:
                c.close()
        if thief is not None:
            thief.close()
        bridge.close()
        broker.close()


@pytest.mark.timeout(60)
def test_a_new_broker_with_a_smaller_limit_is_not_sent_more(sock_path: str) -> None:
    """The new broker takes smaller messages than the first: the relinked link refuses a
    larger one from this side (the request fails at once) and stays up."""
    broker = IpcBusBroker.create().connect(sock_path)
    bridge = IpcBusBridge.create().connect(sock_path, reconnect=Reconnect(initial=0.2,
                                                                          maximum=0.2))
    local = main = None
    try:
        local = IpcBusClient.create().connect()
        os.kill(pid_of(broker.process), signal.SIGKILL)
        wait_until(lambda: bridge._hub is not None and bridge._hub.router.upstream is None, 10)
        broker.close()
        broker = IpcBusBroker.create(max_message=1 << 20).connect(sock_path)
        main = IpcBusClient.create().connect(sock_path)
        main.on("big", lambda event, data: event.request.resolve(len(data)))
        main.on("small", lambda event, data: event.request.resolve(len(data)))
        wait_until(lambda: relinked(bridge) == 1, 20)
        local.wait_for_listeners("big", 1, 10)
        with pytest.raises(IpcBusRequestError):
            local.request("big", 10, b"x" * (2 << 20))
        assert local.request("small", 10, b"x" * 1000).payload == 1000
        assert relinked(bridge) == 1  # the link was never dropped
    finally:
        for c in (main, local):
            if c is not None:
                c.close()
        bridge.close()
        broker.close()
