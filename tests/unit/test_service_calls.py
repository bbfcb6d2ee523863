"""A service proxy's calls (``ipcbus._service_calls``), without a bus: queued in order with
their deadlines, in flight until one party takes them, and the errors they are failed with."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import (IpcBusConnectionError, IpcBusEvent, IpcBusRequestError,
                    IpcBusRequestResponse, IpcBusRequestTimeoutError)
from ipcbus._service_calls import CallQueue, ServiceCall


def call(name: str = "add", timeout: float | None = 2.0, oneway: bool = False) -> ServiceCall:
    return ServiceCall("calc", "/ipcbus/service/call/calc", name, (1, 2), timeout, oneway)


def test_queued_calls_leave_in_the_order_they_were_made() -> None:
    queue = CallQueue()
    calls = [call(f"c{i}", timeout=None if i % 2 else 1.0) for i in range(5)]
    for c in calls:
        queue.queue(c)
    assert queue.take_queued() == calls
    assert queue.take_queued() == []


def test_only_calls_past_their_deadline_expire() -> None:
    queue = CallQueue()
    early, late, forever = call(timeout=1.0), call(timeout=5.0), call(timeout=None)
    for c in (forever, late, early):
        queue.queue(c)
    assert early.deadline is not None and late.deadline is not None
    assert queue.take_expired(early.deadline) == [early]
    assert queue.take_expired(late.deadline - 0.001) == []
    assert queue.take_queued() == [forever, late]


def test_a_call_in_flight_is_taken_once() -> None:
    queue = CallQueue()
    c = call()
    queue.sending(c)
    assert queue.take_inflight(c) is True
    assert queue.take_inflight(c) is False  # the answer after the stop: nothing to settle


def test_a_stop_takes_what_is_in_flight_not_what_is_queued() -> None:
    queue = CallQueue()
    sent, waiting = call("sent"), call("waiting")
    queue.sending(sent)
    queue.queue(waiting)
    assert queue.take_all_inflight() == [sent]
    assert queue.take_inflight(sent) is False
    assert queue.take_queued() == [waiting]


def test_close_takes_everything_and_refuses_more() -> None:
    queue = CallQueue()
    queued, sent = call("queued"), call("sent")
    queue.queue(queued)
    queue.sending(sent)
    assert queue.close("the proxy was closed") == [queued, sent]
    with pytest.raises(Exception, match="the proxy was closed"):
        queue.queue(call())


def test_errors_name_the_service_and_the_call() -> None:
    c = call("div", timeout=1.5)
    assert c.label == "calc.div()"
    timeout = c.timeout_error(": service 'calc' did not start")
    assert isinstance(timeout, TimeoutError)
    assert str(timeout) == "calc.div() timed out after 1.5 s: service 'calc' did not start"
    response = IpcBusRequestResponse(IpcBusEvent("/x", None), err="ZeroDivisionError: no")
    rejected = c.failed(IpcBusRequestError("rejected", response))
    assert isinstance(rejected, IpcBusRequestError)
    assert str(rejected) == "calc.div() failed: ZeroDivisionError: no"
    assert rejected.response is response
    assert isinstance(c.failed(IpcBusRequestTimeoutError("t", response)),
                      IpcBusRequestTimeoutError)
    lost = c.failed(IpcBusConnectionError("the bus connection has closed"))
    assert str(lost) == "calc.div() failed: the bus connection has closed"
    other = KeyError("k")
    assert c.failed(other) is other


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["queue", "send", "start", "stop", "answer",
                                           "expire", "close"]),
                          st.integers(0, 7)), max_size=40))
def test_every_call_is_taken_at_most_once_whatever_happens(ops: list[tuple[str, int]]) -> None:
    """A model of the proxy's use: calls are queued or sent, the service starts (queued ones
    are sent) and stops, answers come for any call, the timer expires queued ones, the proxy
    closes. No call is ever taken twice; at the close every call not yet taken is taken."""
    queue = CallQueue()
    calls = [call(f"c{i}", timeout=float(i)) for i in range(8)]
    placed: set[int] = set()
    taken: list[int] = []
    closed = False
    for op, i in ops:
        c = calls[i]
        if closed:
            break
        if op == "queue" and i not in placed:
            queue.queue(c)
            placed.add(i)
        elif op == "send" and i not in placed:
            queue.sending(c)
            placed.add(i)
        elif op == "start":
            for q in queue.take_queued():  # sent again: in flight now
                queue.sending(q)
        elif op == "stop":
            taken += [calls.index(t) for t in queue.take_all_inflight()]
        elif op == "answer" and queue.take_inflight(c):
            taken.append(i)
        elif op == "expire":
            now = c.deadline
            assert now is not None
            expired = queue.take_expired(now)
            assert all(t.deadline is not None and t.deadline <= now for t in expired)
            taken += [calls.index(t) for t in expired]
        elif op == "close":
            taken += [calls.index(t) for t in queue.close("closed")]
            closed = True
    if not closed:
        taken += [calls.index(t) for t in queue.close("closed")]
    assert sorted(taken) == sorted(placed)
