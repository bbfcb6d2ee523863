"""Requests across real processes: answers, rejections, races, timeouts, dead responders,
nested requests, slow listeners and argument checking.

Every cross-process test runs under ``spawn`` and ``fork`` (the ``ctx`` fixture). Children are
module-level functions; they report through multiprocessing queues and events, and are always
joined with a bound and killed in a ``finally``.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import pytest

import ipcbus
from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusPeer, IpcBusRequestError,
                    IpcBusRequestResponse)

import helpers
from helpers import Collector, elapsed, sync, wait_until

READY_TIMEOUT = 30.0  # a spawn child on a busy machine can take a while to import


# -- children (module level, so that spawn can import them) -----------------------------------
def _serve(path: str, name: str, channels: dict[str, str], ready_q: Any, stop: Any,
           extra: dict[str, Any]) -> None:
    """Connect as ``name``, answer ``channels`` (channel -> mode), report, wait for ``stop``.

    Modes: "echo" resolves {name, pid, args, n}; "reject" rejects with "nope" (args[0] ==
    "str") or ValueError("bad"); "never" receives and never answers; "hang" sets
    extra["got"] then blocks its dispatch thread forever; "late" waits for extra["release"],
    resolves, and reports resolve()'s result on extra["done_q"]; "nested" answers with the
    answer of its own request on "inner".
    """
    client = IpcBusClient.create().connect(path, peer_name=name)
    count = {"n": 0}

    def make(mode: str) -> Any:
        def listener(event: Any, *args: Any) -> None:
            count["n"] += 1
            req = event.request
            if mode == "echo":
                req.resolve({"name": name, "pid": os.getpid(), "args": list(args),
                             "n": count["n"]})
            elif mode == "reject":
                req.reject("nope" if args and args[0] == "str" else ValueError("bad"))
            elif mode == "never":
                if "got" in extra:
                    extra["got"].set()
            elif mode == "hang":
                extra["got"].set()
                threading.Event().wait()  # blocks until SIGKILL
            elif mode == "late":
                extra["release"].wait(10)
                ok = req.resolve({"name": name, "pid": os.getpid(), "args": list(args)})
                sync(client)  # the late answer has been routed (and dropped) by the broker
                extra["done_q"].put(ok)
            elif mode == "nested":
                inner = client.request("inner", 5, *args)
                req.resolve({"outer": name, "inner": inner.payload})
            else:  # pragma: no cover
                raise AssertionError(mode)
        return listener

    for channel, mode in channels.items():
        client.on(channel, make(mode))
    sync(client)  # every SUBSCRIBE above has been routed
    ready_q.put({"id": client.peer.id, "name": name, "pid": os.getpid()})
    stop.poll(60)
    client.close()


# -- helpers -----------------------------------------------------------------------------------


# -- answers -----------------------------------------------------------------------------------
class Children(helpers.Children):
    """helpers.Children with the ``_serve`` responder of this module."""

    def serve(self, path: Any, name: str, channels: dict[str, str],
              **extra: Any) -> tuple[Any, dict[str, Any]]:
        """A ``_serve`` child; returns (process, {"id", "name", "pid"}) once it is subscribed."""
        q = self.ctx.Queue()
        p = self.start(_serve, path, name, channels, q, self.stop, extra)
        info = q.get(timeout=READY_TIMEOUT)
        assert info["pid"] == p.pid
        return p, info


@pytest.fixture
def children(ctx: Any) -> Iterator[Children]:
    kids = Children(ctx)
    try:
        yield kids
    finally:
        kids.close()


@pytest.mark.timeout(60)
def test_request_answered_by_child(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    p, info = children.serve(broker.address, "responder", {"ask": "echo"})
    c = clients(broker.address)
    r = c.request("ask", 5, 1, "a", b"\x00")
    assert isinstance(r, IpcBusRequestResponse)
    assert r.err is None
    assert r.payload == {"name": "responder", "pid": p.pid, "args": [1, "a", b"\x00"], "n": 1}
    sender = r.event.sender
    assert isinstance(sender, IpcBusPeer)
    assert sender.id == info["id"]
    assert sender.name == "responder"
    assert sender.process.pid == p.pid
    assert sender.process.type == "socket"
    assert r.event.channel == "ask"


@pytest.mark.timeout(60)
def test_request_rejected(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    children.serve(broker.address, "rejecter", {"ask": "reject"})
    c = clients(broker.address)
    with pytest.raises(IpcBusRequestError) as ei:
        c.request("ask", 5, "str")
    assert not isinstance(ei.value, TimeoutError)
    assert ei.value.response is not None
    assert ei.value.response.err == "nope"

    with pytest.raises(IpcBusRequestError) as ei:
        c.request("ask", 5, "exc")
    assert ei.value.response is not None
    err = ei.value.response.err
    assert isinstance(err, str) and "ValueError" in err and "bad" in err


@pytest.mark.timeout(60)
def test_first_answer_wins(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    release = children.ctx.Event()
    done_q = children.ctx.Queue()
    children.serve(broker.address, "fast", {"race": "echo"})
    children.serve(broker.address, "slow", {"race": "late"}, release=release, done_q=done_q)
    c = clients(broker.address)

    fut = c.request_async("race", 5, 1)
    r = fut.result(timeout=5)
    assert r.err is None and r.payload["name"] == "fast" and r.payload["args"] == [1]

    release.set()  # now the slow responder answers too: its answer must be ignored
    assert done_q.get(timeout=10) is True  # it did answer (first in its own process)
    assert fut.result() is r and fut.exception() is None
    assert broker.query_state()["pending_requests"] == 0

    r2 = c.request("race", 5, 2)
    assert r2.err is None and r2.payload["name"] in ("fast", "slow")
    assert r2.payload["args"] == [2]
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)


# -- failures at once or at the timeout ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_request_timeout_is_cancelled(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    got = children.ctx.Event()
    children.serve(broker.address, "mute", {"mute": "never"}, got=got)
    c = clients(broker.address)

    t0 = time.monotonic()
    fut = c.request_async("mute", 0.5)
    assert got.wait(5)
    assert broker.query_state()["pending_requests"] == 1
    exc = fut.exception(timeout=5)
    took = time.monotonic() - t0
    assert isinstance(exc, IpcBusRequestError)
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, ipcbus.IpcBusRequestTimeoutError)
    assert isinstance(exc, ipcbus.IpcBusTimeoutError)
    assert 0.3 <= took <= 1.5, took
    # the client told the broker it gave up
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)

    # the blocking form raises the same way
    with elapsed() as t, pytest.raises(ipcbus.IpcBusRequestTimeoutError):
        c.request("mute", 0.5)
    assert 0.3 <= t[0] <= 1.5, t[0]
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)


@pytest.mark.timeout(30)
def test_request_without_listener_fails_at_once(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    c = clients(broker.address)
    with elapsed() as t, pytest.raises(IpcBusRequestError) as ei:
        c.request("nobody-listens", 5)
    assert t[0] < 0.5, t[0]
    assert not isinstance(ei.value, TimeoutError)
    assert broker.query_state()["pending_requests"] == 0

    # a listener that went away counts as none
    other = clients(broker.address)
    listener = Collector()
    other.on("gone", listener)
    sync(other)
    other.off("gone", listener)
    sync(other)
    with elapsed() as t, pytest.raises(IpcBusRequestError):
        c.request("gone", 5)
    assert t[0] < 0.5, t[0]


@pytest.mark.timeout(60)
def test_request_to_reaches_only_the_target(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    _, a = children.serve(broker.address, "A", {"ask": "echo"})
    pb, b = children.serve(broker.address, "B", {"ask": "echo"})
    c = clients(broker.address)

    for i in range(5):
        r = c.request_to(b["id"], "ask", 5, i)  # by id string
        assert r.payload["name"] == "B" and r.payload["args"] == [i]
        assert r.payload["n"] == i + 1
    peer_b = r.event.sender
    assert isinstance(peer_b, IpcBusPeer) and peer_b.id == b["id"] and peer_b.process.pid == pb.pid
    r = c.request_to(peer_b, "ask", 5, "peer")  # by IpcBusPeer
    assert r.payload["name"] == "B" and r.payload["n"] == 6

    r = c.request_to(a["id"], "ask", 5, "a")
    assert r.payload["name"] == "A"
    assert r.payload["n"] == 1  # A saw none of the requests sent to B

    with elapsed() as t, pytest.raises(IpcBusRequestError) as ei:
        c.request_to("no-such-peer", "ask", 5)
    assert t[0] < 0.5, t[0]
    assert not isinstance(ei.value, TimeoutError)

    with elapsed() as t, pytest.raises(IpcBusRequestError):
        c.request_to(b["id"], "not-listened", 5)  # a known peer without that listener
    assert t[0] < 0.5, t[0]


def _run_to_the_end(threads: list[threading.Thread]) -> None:
    """Start the threads and wait for every one of them (30 s each at most)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_request_async_many_threads(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    children.serve(broker.address, "echo", {"echo": "echo"})
    c = clients(broker.address)

    fut = c.request_async("echo", 5, "one")
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=5).payload["args"] == ["one"]

    nthreads, per = 4, 50
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(nthreads)

    def worker(k: int) -> None:
        try:
            start.wait(5)
            futs = {i: c.request_async("echo", 10, i)
                    for i in range(k * per, (k + 1) * per)}
            for i, f in futs.items():
                value = f.result(timeout=20)
                with lock:
                    results[i] = value
        except BaseException as exc:  # reported below
            errors.append(exc)

    _run_to_the_end([threading.Thread(target=worker, args=(k,)) for k in range(nthreads)])
    assert errors == []
    assert sorted(results) == list(range(nthreads * per))
    for i, r in results.items():
        assert r.err is None and r.payload["args"] == [i]


@pytest.mark.timeout(60)
def test_blocking_requests_from_many_threads_and_a_timeout_among_them(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    """Blocking requests from 6 threads at once (one of them reads the socket, the others
    are handed their answers) while a seventh waits for a request nobody answers: each
    answer reaches its own caller, and the unanswered request times out on time although
    another thread holds the socket."""
    children.serve(broker.address, "both", {"echo": "echo", "mute": "never"})
    c = clients(broker.address)
    assert c.request("echo", 5, "warm").payload["args"] == ["warm"]
    nthreads, per = 6, 100
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    timed_out: list[float] = []
    start = threading.Barrier(nthreads + 1)

    def worker(k: int) -> None:
        try:
            start.wait(5)
            for i in range(k * per, (k + 1) * per):
                results[i] = c.request("echo", 10, i).payload["args"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    def mute() -> None:
        start.wait(5)
        t0 = time.monotonic()
        try:
            c.request("mute", 0.5)
        except ipcbus.IpcBusRequestTimeoutError:
            timed_out.append(time.monotonic() - t0)

    _run_to_the_end([threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
                    + [threading.Thread(target=mute)])
    assert errors == []
    assert results == {i: [i] for i in range(nthreads * per)}
    assert len(timed_out) == 1 and 0.45 <= timed_out[0] <= 1.5, timed_out


@pytest.mark.timeout(60)
def test_responder_killed_mid_request(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    got = children.ctx.Event()
    p, _ = children.serve(broker.address, "doomed", {"doom": "hang"}, got=got)
    c = clients(broker.address)

    fut = c.request_async("doom", 10)
    assert got.wait(10), "the responder never received the request"
    t_kill = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)
    exc = fut.exception(timeout=5)  # bounded: a hang would show as TimeoutError here
    took = time.monotonic() - t_kill
    assert isinstance(exc, IpcBusRequestError), exc
    assert not isinstance(exc, TimeoutError), exc
    assert took < 1.0, took
    p.join(5)
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)


# -- listeners that request -----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_nested_request_same_client(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    # the child's "outer" listener requests "inner", answered by the same client in that child
    _, info = children.serve(broker.address, "nest", {"outer": "nested", "inner": "echo"})
    c = clients(broker.address)
    r = c.request("outer", 5, 7)
    assert r.payload["outer"] == "nest"
    assert r.payload["inner"]["name"] == "nest" and r.payload["inner"]["args"] == [7]


@pytest.mark.timeout(60)
def test_nested_request_other_process(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    _, info = children.serve(broker.address, "inner-child", {"inner": "echo"})
    a = clients(broker.address, peer_name="A")
    b = clients(broker.address, peer_name="B")

    def outer(event: Any, x: Any) -> None:
        inner = a.request("inner", 5, x)
        event.request.resolve(["outer", inner.payload["name"], inner.payload["args"]])

    a.on("outer", outer)
    sync(a)
    r = b.request("outer", 5, 3)
    assert r.payload == ["outer", "inner-child", [3]]
    assert r.event.sender is not None and r.event.sender.id == a.peer.id


@pytest.mark.timeout(30)
def test_nested_request_same_client_in_this_process(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    a = clients(broker.address)
    a.on("inner", lambda e, x: e.request.resolve(x * 2))
    a.on("outer", lambda e, x: e.request.resolve(a.request("inner", 5, x).payload + 1))
    sync(a)
    assert a.request("outer", 5, 20).payload == 41  # requester is the listening client itself
    b = clients(broker.address)
    assert b.request("outer", 5, 1).payload == 3


@pytest.mark.timeout(60)
def test_slow_listener_does_not_delay_answers(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    children.serve(broker.address, "quick", {"fast": "echo"})
    a = clients(broker.address)
    started, release = threading.Event(), threading.Event()

    def slow(event: Any, *args: Any) -> None:
        started.set()
        release.wait(1.0)  # holds the dispatch thread of this process for up to 1 s

    a.on("slow", slow)
    sync(a)
    try:
        a.send("slow")
        assert started.wait(5)
        with elapsed() as t:
            r = a.request("fast", 5, "x")  # answered by the child while the listener blocks
        assert r.payload["args"] == ["x"]
        assert not release.is_set()
        assert t[0] < 0.5, t[0]
    finally:
        release.set()


def _stream(path: str, n: int, ready_q: Any, stop: Any) -> None:
    """Publish ``n`` numbered messages on "stream" when "go" arrives."""
    client = IpcBusClient.create().connect(path, peer_name="streamer")
    go = threading.Event()
    client.on("go", lambda event: go.set())
    sync(client)
    ready_q.put("ready")
    if go.wait(20):
        for i in range(n):
            client.send("stream", i)
        sync(client)
    stop.poll(30)
    client.close()


@pytest.mark.timeout(60)
def test_requests_in_a_loop_while_messages_stream_in(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    """A thread that reads its own answers (no other reader at that moment) queues the
    messages it reads on the way for the I/O threads: all arrive, in order, and no listener
    runs on the requesting thread."""
    n = 20_000
    children.serve(broker.address, "quick", {"fast": "echo"})
    ready_q = children.ctx.Queue()
    children.start(_stream, broker.address, n, ready_q, children.stop)
    assert ready_q.get(timeout=READY_TIMEOUT) == "ready"
    a = clients(broker.address)
    got: list[int] = []
    threads: set[int] = set()
    done = threading.Event()

    def on_stream(event: Any, i: int) -> None:
        got.append(i)
        threads.add(threading.get_ident())
        if i == n - 1:
            done.set()

    a.on("stream", on_stream)
    sync(a)
    a.send("go")
    answered = 0
    while not done.is_set() and answered < 20_000:
        assert a.request("fast", 5, answered).payload["args"] == [answered]
        answered += 1
    assert done.wait(20), len(got)
    assert got == list(range(n))
    assert threading.get_ident() not in threads
    assert answered > 0


# -- arguments -------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_bad_arguments_send_nothing(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    receiver = clients(broker.address, peer_name="receiver")
    got = Collector()
    receiver.on("ch", got)
    sync(receiver)
    s = clients(broker.address, peer_name="sender")

    bad_calls: list[Callable[[], object]] = [
        lambda: s.send("ch", object()),
        lambda: s.send("ch", {1, 2}),
        lambda: s.send("ch", "ok", [object()]),
        lambda: s.request("ch", 1, object()),
        lambda: s.request("ch", 1, {1, 2}),
        lambda: s.request_async("ch", 1, object()),
        lambda: s.request_to(receiver.peer, "ch", 1, {1}),
        lambda: s.send_to(receiver.peer, "ch", object()),
        lambda: s.send(123, "x"),  # type: ignore[arg-type]
        lambda: s.request(123, 1),  # type: ignore[arg-type]
        lambda: s.request_async(123, 1),  # type: ignore[arg-type]
        lambda: s.send_to(receiver.peer, 123, "x"),  # type: ignore[arg-type]
        lambda: s.request("ch", "x"),  # type: ignore[arg-type]
        lambda: s.request_async("ch", "x"),  # type: ignore[arg-type]
        lambda: s.request_to(receiver.peer, "ch", "x"),  # type: ignore[arg-type]
        lambda: s.send_to(42, "ch", "x"),  # type: ignore[arg-type]
        lambda: s.request_to(42, "ch", 1),  # type: ignore[arg-type]
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"bad call #{i} did not raise")

    s.send("ch", "marker")
    got.wait(1)
    sync(s)
    sync(receiver)
    assert got.args == [("marker",)]
    assert broker.query_state()["pending_requests"] == 0
    # the sender is still fine
    receiver.once("echo", lambda e, x: e.request.resolve(x))
    sync(receiver)
    assert s.request("echo", 5, "fine").payload == "fine"


# -- timeout values ----------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_default_timeout_for_none_and_zero(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    assert ipcbus.DEFAULT_TIMEOUT == 2.0
    mute = clients(broker.address)
    mute.on("mute", lambda e, *a: None)
    sync(mute)
    c = clients(broker.address)

    t0 = time.monotonic()
    fut_none = c.request_async("mute", None)
    with pytest.raises(ipcbus.IpcBusRequestTimeoutError):
        c.request("mute", 0)
    took_zero = time.monotonic() - t0
    exc = fut_none.exception(timeout=5)
    took_none = time.monotonic() - t0
    assert isinstance(exc, ipcbus.IpcBusRequestTimeoutError)
    assert 1.8 <= took_zero <= 3.5, took_zero
    assert 1.8 <= took_none <= 3.5, took_none


@pytest.mark.timeout(30)
def test_negative_timeout_waits_forever(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient]) -> None:
    responder = clients(broker.address)
    timers: list[threading.Timer] = []

    def late(event: Any, x: Any) -> None:
        t = threading.Timer(2.5, event.request.resolve, args=(x,))
        timers.append(t)
        t.start()

    responder.on("late", late)
    sync(responder)
    c = clients(broker.address)
    try:
        fut = c.request_async("late", -0.5, "again")  # runs alongside the blocking one
        with elapsed() as t:
            r = c.request("late", -1, "answer")
        assert r.payload == "answer"
        assert t[0] >= 2.4, t[0]
        assert fut.result(timeout=10).payload == "again"
    finally:
        for tm in timers:
            tm.cancel()


# -- the timeout timer -------------------------------------------------------------------------
def test_timer_cancel_skips_the_call_and_keeps_the_heap_small() -> None:
    """An answered request cancels its timeout: the call never runs, and cancelled entries
    do not pile up (they are compacted once they are the majority)."""
    from ipcbus._timer import Timer
    timer = Timer()
    fired = threading.Event()
    try:
        entries = [timer.call_at(time.monotonic() + 60.0, fired.set) for _ in range(5000)]
        for entry in entries:
            timer.cancel(entry)
            timer.cancel(entry)  # twice is harmless
        assert len(timer._heap) <= 1024
        soon = timer.call_at(time.monotonic() + 0.05, fired.set)
        timer.cancel(soon)
        assert not fired.wait(0.3)
        timer.call_at(time.monotonic() + 0.01, fired.set)
        assert fired.wait(5.0)
    finally:
        timer.stop()


def test_answered_requests_leave_no_timer_entries(broker: Any) -> None:
    """2 000 answered requests with a long timeout leave the timer heap small (a blocking
    request needs no timer entry; a Future's is cancelled by its answer)."""
    client = IpcBusClient.create().connect(broker.address, peer_name="timer-probe")
    try:
        client.on("echo", lambda event, x: event.request.resolve(x))
        sync(client)
        for i in range(2000):
            assert client.request("echo", 300.0, i).payload == i
            assert client.request_async("echo", 300.0, i).result(10).payload == i
        conn = client._conn
        assert conn is not None
        timer = conn.requests.timer
        assert len(timer._heap) - timer._cancelled <= 1
        assert len(timer._heap) <= 1024
    finally:
        client.close()
