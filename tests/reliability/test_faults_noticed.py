"""Faults are noticed at once (docs/reliability.md, section 3), where the other fault tests
(test_faults.py here, and test_bridge.py, test_requests.py, test_service.py in tests/bus/)
do not reach: a linked bridge's process killed, the broker under a linked bridge killed, a
client dialing a dead broker's socket file.

Real processes and sockets, no mocked transport. Every test has a hard timeout; waits are
bounded (events, queues, ``wait_until``); children are module-level functions, joined with a
bound and killed in a ``finally``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import stat
import threading
import time
from typing import Any, Iterator

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusConnectionError,
                    IpcBusRequestError)

from helpers import elapsed, pid_of, sync, wait_until
from helpers.measure import report
from helpers.processes import READY_TIMEOUT


def hanging_pipe_child(conn: Any, ready_q: Any) -> None:
    """A pipe child of a bridge: receives "hang-pipe" requests and never answers."""
    client = IpcBusClient.create().connect(conn, peer_name="pipe-kid")
    closed = threading.Event()
    client.on_closed(closed.set)
    client.on("hang-pipe", lambda event: None)
    client.on("pipe-echo", lambda event, x: event.request.resolve(["pipe", x]))
    sync(client)
    ready_q.put(("pipe-kid", os.getpid()))
    closed.wait(60)


def linked_bridge_owner(address: str, ready_q: Any) -> None:
    """A process with a bridge linked to the broker, a main client and a pipe child, all
    holding requests they never answer; the test kills it."""
    bridge = IpcBusBridge.create().connect(address)
    main = IpcBusClient.create().connect(peer_name="bridge-main")
    main.on("hang-bridge", lambda event: None)
    sync(main)
    ctx = multiprocessing.get_context("fork")
    kid = ctx.Process(target=hanging_pipe_child, args=(bridge.open_pipe(), ready_q),
                      daemon=True)
    kid.start()
    ready_q.put(("owner", os.getpid()))
    threading.Event().wait(60)


@pytest.fixture
def links_broker(sock_path: str) -> Iterator[IpcBusBroker]:
    """A broker that accepts bridge links from any of its processes (links="any")."""
    with IpcBusBroker.create(links="any").connect(sock_path) as broker:
        yield broker


@pytest.mark.timeout(60)
def test_linked_bridge_process_killed(links_broker: IpcBusBroker, clients: Any) -> None:
    """SIGKILL of a process whose bridge is linked to the broker: the broker forgets every
    peer behind the link (main and pipe) at once, and requests pending on them fail at once."""
    ctx = multiprocessing.get_context("spawn")
    ready_q = ctx.Queue()
    owner = ctx.Process(target=linked_bridge_owner, args=(links_broker.address, ready_q))  # has a child
    kid_pid = None
    owner.start()
    try:
        ready = dict(ready_q.get(timeout=READY_TIMEOUT) for _ in range(2))
        kid_pid = ready["pipe-kid"]
        asker = clients(links_broker.address, peer_name="asker")
        wait_until(lambda: {"hang-bridge", "hang-pipe"} <= set(links_broker.query_state()["channels"]))
        assert asker.request("pipe-echo", 5.0, 1).payload == ["pipe", 1]
        futures = [asker.request_async("hang-bridge", 30.0),
                   asker.request_async("hang-pipe", 30.0)]
        wait_until(lambda: links_broker.query_state()["pending_requests"] == 2)
        killed = time.monotonic()
        os.kill(pid_of(owner), signal.SIGKILL)
        for future in futures:
            exc = future.exception(timeout=5)
            assert isinstance(exc, IpcBusRequestError) and not isinstance(exc, TimeoutError), exc
        failed_after = time.monotonic() - killed
        wait_until(lambda: [p["name"] for p in links_broker.query_state()["peers"]] == ["asker"],
                   timeout=2)
        gone_after = time.monotonic() - killed
        report("linked bridge killed", requests_failed_after_s=round(failed_after, 3),
               peers_gone_after_s=round(gone_after, 3))
        assert failed_after < 1.0 and gone_after < 1.5
        assert set(links_broker.query_state()["channels"]) == set()
    finally:
        for pid in (owner.pid, kid_pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        owner.join(5)


def hanging_socket_peer(address: str, ready_q: Any) -> None:
    client = IpcBusClient.create().connect(address, peer_name="socket-hang")
    closed = threading.Event()
    client.on_closed(closed.set)
    client.on("hang-socket", lambda event: None)
    sync(client)
    ready_q.put(("socket-hang", os.getpid()))
    closed.wait(60)


@pytest.mark.timeout(60)
def test_broker_killed_under_a_linked_bridge(sock_path: str, caplog: Any) -> None:
    """SIGKILL of the broker a bridge is linked to: a request that crossed the link fails at
    once, the bridge logs why, and the bridge's own side (a main client and a pipe child) goes
    on as a bus of its own."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    ctx = multiprocessing.get_context("spawn")
    ready_q = ctx.Queue()
    broker = IpcBusBroker.create().connect(sock_path)
    bridge = IpcBusBridge.create().connect(sock_path)
    procs = [ctx.Process(target=hanging_socket_peer, args=(sock_path, ready_q), daemon=True),
             ctx.Process(target=hanging_pipe_child, args=(bridge.open_pipe(), ready_q),
                         daemon=True)]
    main = None
    try:
        for p in procs:
            p.start()
        dict(ready_q.get(timeout=READY_TIMEOUT) for _ in procs)
        main = IpcBusClient.create().connect(peer_name="main")
        wait_until(lambda: "hang-socket" in broker.query_state()["channels"])
        assert main.request("pipe-echo", 5.0, 1).payload == ["pipe", 1]
        future = main.request_async("hang-socket", 30.0)
        wait_until(lambda: broker.query_state()["pending_requests"] == 1)
        killed = time.monotonic()
        os.kill(broker.process.pid, signal.SIGKILL)
        exc = future.exception(timeout=5)
        failed_after = time.monotonic() - killed
        assert isinstance(exc, IpcBusRequestError) and not isinstance(exc, TimeoutError), exc
        assert "link to the broker has closed" in str(exc), exc
        assert failed_after < 1.0, failed_after
        wait_until(lambda: any("link to the broker has closed" in r.getMessage()
                               for r in caplog.records), timeout=2)
        # this side is a bus of its own now
        assert main.request("pipe-echo", 5.0, 2).payload == ["pipe", 2]
        with pytest.raises(IpcBusRequestError, match="no listener"):
            main.request("hang-socket", 5.0)
        assert main.connected
        report("broker killed under a linked bridge",
               request_failed_after_s=round(failed_after, 3))
    finally:
        if main is not None:
            main.close()
        bridge.close()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        broker.close()


@pytest.mark.timeout(60)
def test_dialing_a_dead_brokers_socket_file_fails_at_once(sock_path: str) -> None:
    """A socket file left by a SIGKILLed broker: a client's connect fails at once with
    IpcBusConnectionError (connection refused), it does not wait for its timeout."""
    broker = IpcBusBroker.create().connect(sock_path)
    try:
        os.kill(broker.process.pid, signal.SIGKILL)
        broker.process.join(5)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)  # left behind
        with elapsed() as t, pytest.raises(IpcBusConnectionError, match="refused"):
            IpcBusClient.create().connect(sock_path, timeout=10.0)
        assert t[0] < 1.0, t[0]
    finally:
        broker.close()
