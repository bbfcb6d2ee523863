"""Issue 17 items 3 and 4 across real processes: a responder is told when its caller gives a
request up (``cancel()``, the caller's timeout), with the caller's timeout as delivered;
through a bridge's pipe child and its link too; a cancel after the answer does nothing; and
``request_all`` gathers every receiver's answer, returning when all have answered or left (a
SIGKILLed one), or at the timeout with what came (a silent one), ``[]`` at once with nobody.

Every test runs under spawn, fork and forkserver (the ``ctx`` fixture); children report on a
queue and are always stopped, joined with a bound and killed (``helpers.Children``).
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from typing import Any, Iterator

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestTimeoutError)

from helpers import Reports, elapsed, pid_of, sync



# -- children (module level, for spawn) ---------------------------------------------------------
def responder(address: Any, name: str, mode: str, report: Any, stop: Any) -> None:
    """Listen on "job" as ``name`` and report on ``report``: ("ready", name) once listening,
    ("got", name, timeout) for each request, ("cancelled", name, flag, late) when one is
    cancelled (``late``: a callback added after the cancel ran at once). Modes: "echo"
    resolves with the name, "reject" rejects with ValueError, "silent" never answers, "watch"
    never answers and watches for the cancel, "answer-watch" answers and watches too.
    On "status" it answers with the cancels it saw."""
    client = IpcBusClient.create().connect(address, peer_name=name)
    seen: list[str] = []

    def on_job(event: Any, *args: Any) -> None:
        req = event.request
        report.put(("got", name, req.timeout))

        def cancelled() -> None:
            late = threading.Event()
            req.on_cancel(late.set)  # already cancelled: runs at once, here
            seen.append("cancelled")
            report.put(("cancelled", name, req.cancelled, late.is_set()))

        if mode in ("watch", "silent", "answer-watch"):
            req.on_cancel(cancelled)
        if mode in ("echo", "answer-watch"):
            req.resolve(name)
        elif mode == "reject":
            req.reject(ValueError("bad"))

    client.on("job", on_job)
    client.on("status", lambda event: event.request.resolve(list(seen)))
    sync(client)
    report.put(("ready", name))
    stop.poll(60)
    client.close()


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def linked(broker: IpcBusBroker) -> Iterator[tuple[IpcBusBroker, IpcBusBridge]]:
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        yield broker, bridge
    finally:
        bridge.close()


# -- cancelling ----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_responder_sees_cancel_and_the_timeout_it_was_given(
        broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    kids.start(responder, broker.address, "w", "watch", q, kids.stop)
    reports.ready(1)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        future = caller.request_async("job", 7.5, "x")
        _, _, timeout = reports.next("got")
        assert timeout is not None and 7.0 < timeout <= 7.5
        assert future.cancel()
        assert reports.next("cancelled", 10) == ("cancelled", "w", True, True)
        # a request without a timeout says so
        future = caller.request_async("job", -1)
        assert reports.next("got") == ("got", "w", None)
        future.cancel()
        reports.next("cancelled", 10)
    finally:
        caller.close()


@pytest.mark.timeout(90)
def test_responder_sees_the_callers_timeout_as_a_cancel(
        broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    kids.start(responder, broker.address, "w", "watch", q, kids.stop)
    reports.ready(1)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        with pytest.raises(IpcBusRequestTimeoutError):
            caller.request("job", 0.5)
        _, _, timeout = reports.next("got")
        assert 0.3 < timeout <= 0.5
        assert reports.next("cancelled", 10)[2] is True
        # request_async's timeout (the timer) tells it too
        future = caller.request_async("job", 0.3)
        with pytest.raises(IpcBusRequestTimeoutError):
            future.result(10)
        assert reports.next("cancelled", 10)[2] is True
    finally:
        caller.close()


@pytest.mark.timeout(90)
def test_cancel_reaches_a_bridge_pipe_child_through_the_link(linked: Any, reporters: Any) -> None:
    broker, bridge = linked
    kids, reports, q = reporters
    kids.start(responder, bridge.open_pipe(), "piped", "watch", q, kids.stop)
    reports.ready(1)
    outsider = IpcBusClient.create().connect(broker.address, peer_name="outsider")
    inside = IpcBusClient.create().connect(peer_name="inside")  # the bridge's own process
    try:
        for caller in (outsider, inside):
            future = caller.request_async("job", 5.0)
            _, _, timeout = reports.next("got")
            assert 4.5 < timeout <= 5.0
            future.cancel()
            assert reports.next("cancelled", 10)[1:3] == ("piped", True)
    finally:
        outsider.close()
        inside.close()


@pytest.mark.timeout(90)
def test_a_cancel_after_the_answer_does_nothing(broker: IpcBusBroker, reporters: Any) -> None:
    """request_all to one that answers and one that does not: the caller's timeout cancels
    the request, and only the silent one is told (the answer came first)."""
    kids, reports, q = reporters
    kids.start(responder, broker.address, "answers", "answer-watch", q, kids.stop)
    kids.start(responder, broker.address, "silent", "silent", q, kids.stop)
    reports.ready(2)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        got = caller.request_all("job", 1.0)
        assert [r.payload for r in got] == ["answers"]
        assert reports.next("cancelled", 10)[1] == "silent"
        # the answering one saw no cancel, even after a round trip through its inbox
        peers = {p["name"]: p["id"] for p in broker.query_state()["peers"]}
        assert caller.request_to(peers["answers"], "status", 5.0).payload == []
        assert caller.request_to(peers["silent"], "status", 5.0).payload == ["cancelled"]
    finally:
        caller.close()


# -- request_all ----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_request_all_gathers_every_answer(broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    for name, mode in (("a", "echo"), ("b", "echo"), ("r", "reject")):
        kids.start(responder, broker.address, name, mode, q, kids.stop)
    assert reports.ready(3) == ["a", "b", "r"]
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        with elapsed() as took:
            got = caller.request_all("job", 20.0, 1)
        assert took[0] < 10  # all answered: no wait for the timeout
        assert sorted(r.payload for r in got if r.err is None) == ["a", "b"]
        rejected = [r for r in got if r.err is not None]
        assert len(rejected) == 1 and "ValueError: bad" in rejected[0].err
        assert rejected[0].event.sender is not None and rejected[0].event.sender.name == "r"
        # nobody listening: [] at once
        with elapsed() as took:
            assert caller.request_all("nobody", 20.0) == []
        assert took[0] < 5
    finally:
        caller.close()


@pytest.mark.timeout(90)
def test_request_all_with_a_dead_and_a_silent_responder(
        broker: IpcBusBroker, reporters: Any, ctx: Any) -> None:
    kids, reports, q = reporters
    kids.start(responder, broker.address, "a", "echo", q, kids.stop)
    # the one to be killed reports on a queue of its own: killed while holding a shared
    # queue's write lock, it would block every other writer
    dead_q = ctx.Queue()
    doomed = kids.start(responder, broker.address, "dead", "watch", dead_q, kids.stop)
    dead_reports = Reports(dead_q)
    reports.ready(1)
    dead_reports.ready(1)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        # a: answers; dead: SIGKILLed mid-request -> returns as soon as it is gone
        with elapsed() as took:
            future = pool.submit(caller.request_all, "job", 30.0)
            dead_reports.next("got")
            os.kill(pid_of(doomed), signal.SIGKILL)
            got = future.result(20)
        assert [r.payload for r in got] == ["a"] and took[0] < 20
        # a silent one: at the timeout, with what came (no error), and it is told
        kids.start(responder, broker.address, "silent", "silent", q, kids.stop)
        reports.ready(1)
        with elapsed() as took:
            got = caller.request_all("job", 1.5)
        assert [r.payload for r in got] == ["a"] and 1.4 < took[0] < 15
        assert reports.next("cancelled", 10)[1] == "silent"
    finally:
        pool.shutdown(wait=False)
        caller.close()


@pytest.mark.timeout(90)
def test_request_all_across_the_link(linked: Any, reporters: Any) -> None:
    """Receivers on both sides of a bridge's link: the broker gathers its own, the bridge ends
    only when both sides are done."""
    broker, bridge = linked
    kids, reports, q = reporters
    kids.start(responder, bridge.open_pipe(), "piped", "echo", q, kids.stop)
    kids.start(responder, broker.address, "socket", "echo", q, kids.stop)
    reports.ready(2)
    outsider = IpcBusClient.create().connect(broker.address, peer_name="outsider")
    inside = IpcBusClient.create().connect(peer_name="inside")
    inside.on("job", lambda event: event.request.resolve("inside"))
    sync(inside)
    try:
        for caller in (outsider, inside):
            with elapsed() as took:
                got = caller.request_all("job", 20.0)
            assert sorted(r.payload for r in got) == ["inside", "piped", "socket"]
            assert took[0] < 10
    finally:
        outsider.close()
        inside.close()
