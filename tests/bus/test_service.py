"""Services: IpcBusService, IpcBusServiceProxy and the wrapper, across real processes.

Cross-process tests run under ``spawn`` and ``fork`` (the ``ctx`` fixture). Children are
module-level functions; they report through multiprocessing queues, take orders from a queue
(the service host) and are always joined with a bound and killed in a ``finally``.
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusError,
                    IpcBusEvent, IpcBusRequestError, IpcBusRequestTimeoutError, IpcBusService,
                    IpcBusServiceProxy, IpcBusTimeoutError)
from ipcbus.service import SERVICE_EVENT_START, SERVICE_EVENT_STOP, IpcBusServiceError

from helpers import Collector, running, sync, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
READY = 30.0  # bound for a child to come up (spawn imports take a while on a busy machine)


# -- the service's implementation and the children (module level, for spawn) ----------------
class Calc:
    """The implementation a host serves: its public methods become calls."""

    def __init__(self, client: IpcBusClient) -> None:
        self._client = client
        self._notes: list[Any] = []

    def add(self, a: int, b: int) -> int:
        return a + b

    def div(self, a: float, b: float) -> float:
        return a / b

    def echo(self, *args: Any) -> list[Any]:
        return list(args)

    def fail(self, text: str) -> None:
        raise KeyError(text)

    def pid(self) -> int:
        return os.getpid()

    def slow(self, seconds: float) -> float:
        """Answers later without holding the dispatch thread (a Future result)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        threading.Timer(seconds, future.set_result, (seconds,)).start()
        return future  # type: ignore[return-value]

    def note(self, value: Any) -> None:
        self._notes.append(value)

    def notes(self) -> list[Any]:
        return self._notes

    def ask_main(self, x: int) -> int:
        """A handler that makes a bus request of its own."""
        return int(self._client.request("main-ask", 5.0, x).payload) + 1

    def call_helper(self, x: int) -> int:
        """A handler that calls another service."""
        with IpcBusServiceProxy.create(self._client, "helper") as helper:
            return int(helper.connect(5.0).double(x))


def service_host(address: Any, name: str, autostart: bool, cmd_q: Any, report_q: Any) -> None:
    """Hosts service ``name`` and obeys orders: start, stop, events, quit."""
    client = IpcBusClient.create().connect(address, peer_name=f"host-{name}")
    service = IpcBusService.create(client, name, Calc(client))
    if autostart:
        service.start()
    report_q.put(("host-ready", os.getpid()))
    while True:
        try:
            cmd = cmd_q.get(timeout=60)
        except queue.Empty:
            break
        op = cmd[0]
        if op == "start":
            try:
                service.start()
                report_q.put(("started",))
            except IpcBusError as exc:
                report_q.put(("start-failed", type(exc).__name__, str(exc)))
        elif op == "stop":
            service.stop()
            report_q.put(("stopped",))
        elif op == "events":
            for i in range(cmd[1]):
                service.send_event("tick", i, f"t{i}")
            report_q.put(("sent",))
        elif op == "quit":
            break
    client.close()


def proxy_child(address: Any, name: str, n_events: int, use_wrapper: bool,
                report_q: Any) -> None:
    """Connects a proxy, listens to "tick" (on the wrapper or the proxy), reports the ticks."""
    client = IpcBusClient.create().connect(address, peer_name=f"proxy-{os.getpid()}")
    proxy = IpcBusServiceProxy.create(client, name)
    ticks: list[list[Any]] = []
    got = threading.Event()

    def on_tick(*args: Any) -> None:
        ticks.append(list(args))
        if len(ticks) >= n_events:
            got.set()

    wrapper = proxy.connect(READY)
    (wrapper if use_wrapper else proxy).on("tick", on_tick)
    report_q.put(("proxy-ready", os.getpid(), wrapper.add(2, 3)))
    got.wait(20)
    report_q.put(("ticks", os.getpid(), ticks))
    proxy.close()
    client.close()


def clash_child(address: Any, name: str, report_q: Any) -> None:
    """Tries to start a service whose name another process holds."""
    client = IpcBusClient.create().connect(address, peer_name="usurper")
    try:
        IpcBusService.create(client, name, Calc(client)).start()
        report_q.put(("started?",))
    except IpcBusError as exc:
        report_q.put(("refused", type(exc).__name__, isinstance(exc, IpcBusServiceError),
                      str(exc)))
    client.close()


# -- helpers ------------------------------------------------------------------------------------
class Reports:
    """Reads a report queue, keeping what a test has not asked for yet."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.backlog: list[tuple[Any, ...]] = []

    def get(self, kind: str, timeout: float = READY) -> tuple[Any, ...]:
        for i, item in enumerate(self.backlog):
            if item[0] == kind:
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} report within {timeout} s"
                                     f" (got {self.backlog})")
            try:
                item = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if item[0] == kind:
                return tuple(item)
            self.backlog.append(tuple(item))


def host(ctx: Any, address: Any, name: str, autostart: bool = True) -> tuple[Any, Any, Reports]:
    cmd_q, report_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=service_host, args=(address, name, autostart, cmd_q, report_q))
    return proc, cmd_q, Reports(report_q)


class Notes:
    """Records a proxy's start/stop notifications."""

    def __init__(self, proxy: IpcBusServiceProxy) -> None:
        self.starts: list[dict[str, Any]] = []
        self.stops: list[str] = []
        proxy.on(SERVICE_EVENT_START, self.starts.append)
        proxy.on(SERVICE_EVENT_STOP, self.stops.append)


def fails_within(future: concurrent.futures.Future[Any], seconds: float) -> BaseException:
    """The exception ``future`` fails with, asserting it comes within ``seconds``."""
    start = time.monotonic()
    concurrent.futures.wait([future], timeout=seconds + 4)
    took = time.monotonic() - start
    assert future.done(), f"the call is still pending after {took:.2f} s"
    exc = future.exception()
    assert exc is not None, f"the call succeeded: {future.result()!r}"
    assert took < seconds, f"failed after {took:.2f} s: {exc}"
    return exc


# -- calls --------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_calls_apply_errors_and_nested_calls(broker: IpcBusBroker, sock_path: str,
                                             ctx: Any) -> None:
    proc, cmd_q, reports = host(ctx, sock_path, "calc")
    main = IpcBusClient.create().connect(sock_path, peer_name="main")
    try:
        with running([proc]):
            host_pid = reports.get("host-ready")[1]
            # what the host's handlers ask of this process: a request and a service call
            main.on("main-ask", lambda event, x: event.request.resolve(x * 10))
            helper = IpcBusService.create(main, "helper")
            helper.register_call_handler("double", lambda x: 2 * x).start()

            proxy = IpcBusServiceProxy.create(main, "calc", call_timeout=5.0)
            wrapper = proxy.connect(READY)
            assert proxy.is_started
            assert wrapper.add(1, 2) == 3
            assert wrapper.pid() == host_pid
            assert proxy.call("echo", "a", [1, 2], {"k": b"v"}, None) == ["a", [1, 2],
                                                                          {"k": b"v"}, None]
            assert proxy.apply("add", (20, 22)) == 42
            assert proxy.apply("div", [1, 4]) == 0.25
            with pytest.raises(TypeError):
                proxy.apply("echo", "abc")
            futures = [proxy.call_async("add", i, i) for i in range(20)]
            assert [f.result(10) for f in futures] == [2 * i for i in range(20)]
            proxy.send_call("note", "fire")
            proxy.send_call("note", "and forget")
            assert wrapper.notes() == ["fire", "and forget"]  # same sender: in order

            calls = {"add", "div", "echo", "fail", "pid", "slow", "note", "notes", "ask_main",
                     "call_helper"}
            assert set(proxy.status["calls"]) == calls
            assert calls <= set(dir(wrapper))
            status = proxy.get_status()
            assert status["started"] and set(status["calls"]) == calls
            assert status["host"]["pid"] == host_pid

            # handlers that make requests and service calls of their own
            assert wrapper.ask_main(4) == 41
            assert wrapper.call_helper(21) == 42

            # the remote exception's type and text
            with pytest.raises(IpcBusRequestError) as err:
                wrapper.div(1, 0)
            assert "ZeroDivisionError" in str(err.value) and "division by zero" in str(err.value)
            assert err.value.response is not None
            assert err.value.response.err == "ZeroDivisionError: division by zero"
            with pytest.raises(IpcBusRequestError, match="KeyError: 'the key'"):
                proxy.call("fail", "the key")
            future = proxy.call_async("fail", "async")
            with pytest.raises(IpcBusRequestError, match="KeyError: 'async'"):
                future.result(10)
            # unknown calls
            with pytest.raises(IpcBusRequestError, match="has no call 'nope'"):
                proxy.call("nope", 1)
            with pytest.raises(AttributeError, match="has no call 'nope'"):
                wrapper.nope
            # a call timeout is a TimeoutError
            quick = IpcBusServiceProxy.create(main, "calc", call_timeout=0.3)
            quick.connect(READY)
            start = time.monotonic()
            with pytest.raises(IpcBusRequestTimeoutError) as timed_out:
                quick.call("slow", 3.0)
            assert isinstance(timed_out.value, TimeoutError)
            assert "timed out after 0.3 s" in str(timed_out.value)
            assert time.monotonic() - start < 2.0
            # arguments that cannot travel raise at the call
            with pytest.raises(TypeError):
                proxy.call("echo", object())
            with pytest.raises(TypeError):
                proxy.call(42)  # type: ignore[arg-type]
            assert wrapper.add(1, 1) == 2  # still fine
            quick.close()
            proxy.close()
            cmd_q.put(("quit",))
    finally:
        main.close()


# -- events -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_events_reach_several_proxies(broker: IpcBusBroker, sock_path: str, ctx: Any) -> None:
    proc, cmd_q, reports = host(ctx, sock_path, "clock")
    kids = [ctx.Process(target=proxy_child, args=(sock_path, "clock", 5, use_wrapper,
                                                  reports.q))
            for use_wrapper in (True, False)]
    main = IpcBusClient.create().connect(sock_path, peer_name="main")
    try:
        with running([proc, *kids]):
            reports.get("host-ready")
            proxy = IpcBusServiceProxy.create(main, "clock")
            mine: list[tuple[Any, ...]] = []
            done = threading.Event()

            def on_tick(*args: Any) -> None:
                mine.append(args)
                if len(mine) == 5:
                    done.set()

            wrapper = proxy.connect(READY)
            wrapper.on("tick", on_tick)
            for _ in kids:
                assert reports.get("proxy-ready")[2] == 5
            cmd_q.put(("events", 5))
            reports.get("sent")
            assert done.wait(10)
            assert mine == [(i, f"t{i}") for i in range(5)]  # the args only, in order
            pids = set()
            for _ in kids:
                _, pid, ticks = reports.get("ticks")
                pids.add(pid)
                assert ticks == [[i, f"t{i}"] for i in range(5)]
            assert pids == {k.pid for k in kids}
            cmd_q.put(("quit",))
            proxy.close()
    finally:
        main.close()


# -- lifecycle ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_queued_calls_stop_and_restart(broker: IpcBusBroker, sock_path: str, ctx: Any) -> None:
    proc, cmd_q, reports = host(ctx, sock_path, "calc", autostart=False)
    main = IpcBusClient.create().connect(sock_path, peer_name="main")
    try:
        with running([proc]):
            reports.get("host-ready")
            proxy = IpcBusServiceProxy.create(main, "calc", call_timeout=20.0)
            quick = IpcBusServiceProxy.create(main, "calc", call_timeout=0.4)
            notes = Notes(proxy)
            assert not proxy.is_started and not proxy.get_status()["started"]
            with pytest.raises(IpcBusTimeoutError):
                proxy.connect(0.2)

            # calls made before the service starts are queued ...
            queued = [proxy.call_async("add", i, 1) for i in range(5)]
            proxy.send_call("note", "queued")
            expiring = quick.call_async("add", 0, 0)
            # ... each still bound by its own timeout
            exc = fails_within(expiring, 2.0)
            assert isinstance(exc, IpcBusRequestTimeoutError) and isinstance(exc, TimeoutError)
            assert "did not start" in str(exc)
            assert not any(f.done() for f in queued)

            # ... and sent when it starts, in order
            cmd_q.put(("start",))
            reports.get("started")
            assert [f.result(10) for f in queued] == [i + 1 for i in range(5)]
            wrapper = proxy.connect(5.0)
            assert proxy.is_started
            assert wrapper.notes() == ["queued"]
            wait_until(lambda: notes.starts)
            assert notes.starts[0]["started"] and "add" in notes.starts[0]["calls"]

            # a stop fails the calls in flight at once, and the proxy sees it stopped
            in_flight = proxy.call_async("slow", 10.0)
            time.sleep(0.2)
            cmd_q.put(("stop",))
            exc = fails_within(in_flight, 1.0)
            assert isinstance(exc, IpcBusRequestError) and "stopped" in str(exc)
            assert not proxy.is_started
            wait_until(lambda: notes.stops)
            assert "stopped" in notes.stops[0]
            assert not broker.is_service_available("calc")

            # calls made while stopped wait for the next start; the same proxy goes on
            later = proxy.call_async("add", 40, 2)
            time.sleep(0.2)
            assert not later.done()
            cmd_q.put(("start",))
            assert later.result(10) == 42
            assert proxy.is_started and wrapper.add(1, 2) == 3
            assert len(notes.starts) == 2 and len(notes.stops) == 1
            cmd_q.put(("quit",))
            proxy.close()
            quick.close()
    finally:
        main.close()


@pytest.mark.timeout(60)
def test_service_host_killed(broker: IpcBusBroker, sock_path: str, ctx: Any) -> None:
    proc, cmd_q, reports = host(ctx, sock_path, "calc")
    cmd_q.cancel_join_thread()
    main = IpcBusClient.create().connect(sock_path, peer_name="main")
    other = IpcBusClient.create().connect(sock_path, peer_name="other")
    try:
        with running([proc]):
            reports.get("host-ready")
            proxies = [IpcBusServiceProxy.create(c, "calc", call_timeout=30.0)
                       for c in (main, other)]
            notes = [Notes(p) for p in proxies]
            for p in proxies:
                p.connect(READY)
            assert broker.is_service_available("calc")
            in_flight = [p.call_async("slow", 20.0) for p in proxies]
            assert proxies[0].call("add", 1, 1) == 2  # the slow calls have reached the host
            os.kill(proc.pid, signal.SIGKILL)
            for future in in_flight:
                exc = fails_within(future, 1.0)
                assert isinstance(exc, IpcBusRequestError)
            wait_until(lambda: not any(p.is_started for p in proxies), timeout=1.0)
            wait_until(lambda: all(n.stops for n in notes), timeout=1.0)
            assert "has left the bus" in notes[0].stops[0]
            assert not broker.is_service_available("calc")
            # a call now waits for a new host (and times out without one)
            assert not proxies[0].call_async("add", 1, 1).done()
            for p in proxies:
                p.close()
    finally:
        other.close()
        main.close()


@pytest.mark.timeout(60)
def test_name_clash(broker: IpcBusBroker, sock_path: str, ctx: Any) -> None:
    main = IpcBusClient.create().connect(sock_path, peer_name="the-owner")
    second = IpcBusClient.create().connect(sock_path, peer_name="second")
    report_q = ctx.Queue()
    try:
        service = IpcBusService.create(main, "calc", Calc(main)).start()
        # another process
        with running([ctx.Process(target=clash_child, args=(sock_path, "calc", report_q))]):
            kind, type_name, is_service_error, text = Reports(report_q).get("refused")
        assert is_service_error and type_name == "IpcBusServiceError"
        assert "already started by" in text and "the-owner" in text and main.peer.id in text
        # another client of this process, another service object of the same client
        with pytest.raises(IpcBusServiceError, match="the-owner"):
            IpcBusService.create(second, "calc").start()
        with pytest.raises(IpcBusServiceError, match="another IpcBusService"):
            IpcBusService.create(main, "calc").start()
        assert isinstance(IpcBusServiceError("x"), IpcBusError)
        # the owner is unaffected; once it stops, the name is free
        proxy = IpcBusServiceProxy.create(second, "calc")
        assert proxy.connect(5.0).add(1, 2) == 3
        service.stop()
        wait_until(lambda: not proxy.is_started)
        usurper = IpcBusService.create(second, "calc").register_call_handler("add",
                                                                            lambda a, b: -1)
        usurper.start()
        assert proxy.connect(5.0).add(1, 2) == -1  # the same proxy, the new host
        usurper.stop()
        proxy.close()
    finally:
        second.close()
        main.close()


# -- availability -------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_availability_through_the_broker(broker: IpcBusBroker, sock_path: str) -> None:
    host_client = IpcBusClient.create().connect(sock_path, peer_name="host")
    asker = IpcBusClient.create().connect(sock_path, peer_name="asker")
    try:
        def available() -> bool:
            return bool(asker.request("/ipcbus/serviceAvailable", 5.0, "calc").payload)

        service = IpcBusService.create(host_client, "calc", Calc(host_client))
        assert not broker.is_service_available("calc") and not available()
        service.start()
        assert broker.is_service_available("calc") and available()
        assert broker.query_state()["services"] == {"calc": host_client.peer.id}
        service.stop()
        sync(host_client)
        assert not broker.is_service_available("calc") and not available()
        assert broker.query_state()["services"] == {}
        service.start()  # a service starts again
        assert broker.is_service_available("calc")
        host_client.close()  # leaving the bus releases its services
        wait_until(lambda: not broker.is_service_available("calc"))
        assert not available()
    finally:
        asker.close()
        host_client.close()


@pytest.mark.timeout(60)
def test_bridge_alone(ctx: Any) -> None:
    with IpcBusBridge.create().connect() as bridge:
        proc, cmd_q, reports = host(ctx, bridge.open_pipe(), "calc")
        kid = ctx.Process(target=proxy_child, args=(bridge.open_pipe(), "calc", 3, True,
                                                    reports.q))
        main = IpcBusClient.create().connect(peer_name="main")
        try:
            with running([proc, kid]):
                host_pid = reports.get("host-ready")[1]
                proxy = IpcBusServiceProxy.create(main, "calc")
                wrapper = proxy.connect(READY)
                assert wrapper.pid() == host_pid
                assert main.request("/ipcbus/serviceAvailable", 5.0, "calc").payload is True
                assert main.request("/ipcbus/serviceAvailable", 5.0, "nope").payload is False
                assert bridge.is_service_available("calc")
                assert "calc" in bridge.query_state()["services"]
                assert reports.get("proxy-ready")[2] == 5  # a pipe child's proxy
                cmd_q.put(("events", 3))
                assert reports.get("ticks")[2] == [[0, "t0"], [1, "t1"], [2, "t2"]]
                # the pipe child that hosts the service is killed: the bridge notices at once
                in_flight = proxy.call_async("slow", 20.0)
                assert wrapper.add(1, 1) == 2
                os.kill(proc.pid, signal.SIGKILL)
                assert isinstance(fails_within(in_flight, 1.0), IpcBusRequestError)
                wait_until(lambda: not proxy.is_started, timeout=1.0)
                assert not bridge.is_service_available("calc")
                assert main.request("/ipcbus/serviceAvailable", 5.0, "calc").payload is False
                proxy.close()
        finally:
            main.close()


@pytest.mark.timeout(60)
def test_bridge_linked_to_a_broker(broker: IpcBusBroker, sock_path: str, ctx: Any) -> None:
    with IpcBusBridge.create().connect(sock_path) as bridge:
        proc, cmd_q, reports = host(ctx, bridge.open_pipe(), "calc")  # behind the bridge
        main = IpcBusClient.create().connect(peer_name="main")  # the bridge's own process
        outside = IpcBusClient.create().connect(sock_path, peer_name="outside")  # on the broker
        try:
            with running([proc]):
                host_pid = reports.get("host-ready")[1]
                proxy = IpcBusServiceProxy.create(outside, "calc")
                notes = Notes(proxy)
                assert proxy.connect(READY).pid() == host_pid
                assert broker.is_service_available("calc")
                assert broker.query_state()["services"]["calc"]
                for client in (main, outside):
                    assert client.request("/ipcbus/serviceAvailable", 5.0, "calc").payload
                # the name is the bus's: a socket peer cannot take it
                with pytest.raises(IpcBusServiceError, match="already started by"):
                    IpcBusService.create(outside, "calc").start()
                # a service of the broker's side called from the bridge's side
                helper = IpcBusService.create(outside, "helper")
                helper.register_call_handler("double", lambda x: 2 * x).start()
                with IpcBusServiceProxy.create(main, "helper") as near:
                    assert near.connect(5.0).double(4) == 8
                cmd_q.put(("stop",))
                reports.get("stopped")
                wait_until(lambda: not proxy.is_started)
                assert notes.stops and not broker.is_service_available("calc")
                assert not main.request("/ipcbus/serviceAvailable", 5.0, "calc").payload
                cmd_q.put(("start",))
                assert proxy.connect(5.0).add(2, 2) == 4
                cmd_q.put(("quit",))
                proxy.close()
                helper.stop()
        finally:
            outside.close()
            main.close()


@pytest.mark.timeout(30)
def test_linked_bridge_is_service_available(broker: IpcBusBroker, sock_path: str) -> None:
    """``bridge.is_service_available()`` on a bridge linked to a broker sees the bus's services,
    those of its own side included (as ``/ipcbus/serviceAvailable`` does)."""
    with IpcBusBridge.create().connect(sock_path) as bridge:
        main = IpcBusClient.create().connect(peer_name="main")
        outside = IpcBusClient.create().connect(sock_path, peer_name="outside")
        try:
            near = IpcBusService.create(main, "near").start()  # on the bridge's side
            far = IpcBusService.create(outside, "far").start()  # on the broker's side
            assert main.request("/ipcbus/serviceAvailable", 5.0, "near").payload
            assert broker.is_service_available("near") and broker.is_service_available("far")
            assert bridge.is_service_available("near")
            assert bridge.is_service_available("far")
            near.stop()
            far.stop()
        finally:
            outside.close()
            main.close()


# -- the API in one process ---------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_handlers_wrapper_and_close(broker: IpcBusBroker, sock_path: str) -> None:
    host_client = IpcBusClient.create().connect(sock_path, peer_name="host")
    user = IpcBusClient.create().connect(sock_path, peer_name="user")
    try:
        service = IpcBusService.create(host_client, "svc")
        assert service.send_event("tick", 1) is False  # not started: nothing sent
        with pytest.raises(ValueError):
            service.register_call_handler("__getServiceStatus", lambda: None)
        with pytest.raises(TypeError):
            service.register_call_handler("x", 42)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            service.send_event(SERVICE_EVENT_STOP)
        with pytest.raises(TypeError):
            IpcBusService.create(host_client, 1)  # type: ignore[arg-type]
        with pytest.raises(IpcBusConnectionError):
            IpcBusServiceProxy.create(IpcBusClient.create(), "svc")

        waiter: concurrent.futures.Future[Any] = concurrent.futures.Future()
        service.register_call_handler("later", lambda: waiter)  # answered when it completes
        service.register_call_handler("one", lambda: 1)
        assert service.get_status() == {"started": False, "calls": ["later", "one"],
                                        "host": {"id": host_client.peer.id, "name": "host",
                                                 "pid": os.getpid()}}
        with service.start():
            assert service.is_started and service.get_status()["started"]
            proxy = IpcBusServiceProxy.create(user, "svc")
            wrapper = proxy.connect(5.0)
            assert wrapper.proxy is proxy
            assert set(proxy.status["calls"]) == {"later", "one"}
            future = proxy.call_async("later")
            time.sleep(0.1)
            assert not future.done()
            waiter.set_result("done")
            assert future.result(5) == "done"

            # calls registered while started are announced to proxies
            service.register_call_handler("two", lambda: 2)
            wait_until(lambda: "two" in dir(wrapper))
            assert wrapper.two() == 2
            service.unregister_call_handler("one")
            wait_until(lambda: "one" not in dir(wrapper))
            with pytest.raises(AttributeError):
                wrapper.one
            with pytest.raises(AttributeError):
                wrapper.x = 1

            # the wrapper is an emitter of the service's events; once, off
            got, once = Collector(), Collector()
            wrapper.on("tick", got).once("tick", once)
            assert wrapper.listener_count("tick") == 2 and "tick" in wrapper.event_names()
            assert service.send_event("tick", "a", 1) is True
            service.send_event("tick", "b", 2)
            got.wait(2)
            assert [i[0] for i in got.wait(2)] == ["a", "b"]  # handler(*args): no event
            assert once.wait(1) == [("a", (1,))]
            wrapper.off("tick", got)
            assert proxy.listener_count("tick") == 0
            with pytest.raises(TypeError):
                proxy.on(3, got)  # type: ignore[arg-type]

            # a result that cannot travel is a clear error
            service.register_call_handler("bad", lambda: object())
            with pytest.raises(IpcBusRequestError, match="cannot be sent"):
                proxy.call("bad")
        assert not service.is_started
        wait_until(lambda: not proxy.is_started)

        # closing the proxy fails what it holds, and later calls
        queued = proxy.call_async("two")
        proxy.close()
        with pytest.raises(IpcBusConnectionError):
            queued.result(2)
        with pytest.raises(IpcBusConnectionError):
            proxy.call("two")
        proxy.close()  # idempotent
        assert proxy.closed

        # closing the client fails queued calls too
        proxy2 = IpcBusServiceProxy.create(user, "svc")
        pending = proxy2.call_async("two")
        user.close()
        with pytest.raises(IpcBusConnectionError):
            pending.result(2)
    finally:
        user.close()
        host_client.close()


@pytest.mark.timeout(30)
def test_calls_from_listeners_and_handlers(broker: IpcBusBroker, sock_path: str) -> None:
    """A listener on the dispatch thread may wait for a service of its own process, even one
    that has not started yet (the start notice is dispatched while it waits)."""
    client = IpcBusClient.create().connect(sock_path, peer_name="solo")
    try:
        service = IpcBusService.create(client, "inner")
        service.register_call_handler("sq", lambda x: x * x)
        outer = IpcBusService.create(client, "outer")
        inner_proxy = IpcBusServiceProxy.create(client, "inner")
        # a handler that calls another service of the same client, on the same thread
        outer.register_call_handler("sq_plus_one", lambda x: inner_proxy.call("sq", x) + 1)
        outer.start()
        results: list[Any] = []
        done = threading.Event()

        def listener(event: IpcBusEvent) -> None:
            try:
                results.append(IpcBusServiceProxy.create(client, "outer").connect(5.0)
                               .sq_plus_one(3))
            except Exception as exc:  # pragma: no cover - reported below
                results.append(exc)
            done.set()

        client.on("go", listener)
        client.send("go")
        time.sleep(0.2)
        service.start()  # inner starts while the listener's call is queued behind it
        assert done.wait(10)
        assert results == [10]
        inner_proxy.close()
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_example_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "service_clock.py")],
                         capture_output=True, text=True, timeout=80)
    assert out.returncode == 0, out.stderr
    assert "tick" in out.stdout and "stopped" in out.stdout
