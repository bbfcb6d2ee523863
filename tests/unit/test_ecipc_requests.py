"""The requests an electron-common-ipc connection has in flight (``ipcbus.ecipc._requests``),
without sockets: each request is settled exactly once, by its answer, its deadline, its
client's close or the end of the connection."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import pytest

from ipcbus import (IpcBusConnectionError, IpcBusPeer, IpcBusProcess, IpcBusRequestError,
                    IpcBusRequestTimeoutError)
from ipcbus.ecipc import _codec as C
from ipcbus.ecipc import _envelope as E
from ipcbus.ecipc._requests import Pending, Requests, settle_answer


def answer(value: Any, resolve: bool = True) -> E.Incoming:
    header = {"kind": "RQR", "channel": "rid", "request": {"resolve": resolve}}
    return E.Incoming("RQR", header, memoryview(C.encode_array([value])))


def no_call_soon(fn: Callable[[], None]) -> None:
    raise AssertionError("nothing to notify")


def test_an_answer_takes_its_request_once() -> None:
    requests = Requests()
    pending = Pending(object(), "/ch")
    requests.add("r1", pending, None)
    assert len(requests) == 1
    taken = requests.take("r1")
    assert taken is pending and len(requests) == 0
    assert requests.take("r1") is None  # a second answer finds nothing to settle


def test_a_request_past_its_deadline_fails_with_a_timeout() -> None:
    requests = Requests()
    pending = Pending(object(), "/slow")
    requests.add("r1", pending, 0.05)
    with pytest.raises(IpcBusRequestTimeoutError, match="'/slow' timed out after 0.05 s"):
        pending.future.result(5)
    assert len(requests) == 0 and requests.take("r1") is None


def test_an_answered_request_does_not_time_out_later() -> None:
    requests = Requests()
    fast, slow = Pending(object(), "/fast"), Pending(object(), "/slow")
    requests.add("fast", fast, 0.05)
    requests.add("slow", slow, 0.1)
    assert requests.take("fast") is fast
    with pytest.raises(IpcBusRequestTimeoutError):
        slow.future.result(5)
    assert not fast.future.done()  # the one taken by its answer is its taker's to settle


def test_a_closing_client_takes_only_its_own_requests() -> None:
    requests = Requests()
    me, other = object(), object()
    mine = [Pending(me, "/a"), Pending(me, "/b")]
    theirs = Pending(other, "/c")
    requests.add("1", mine[0], 10)
    requests.add("2", theirs, None)
    requests.add("3", mine[1], None)
    assert requests.take_of(me) == mine
    assert len(requests) == 1 and requests.take("2") is theirs


def test_the_end_of_the_connection_takes_everything_and_refuses_more() -> None:
    requests = Requests()
    pendings = [Pending(object(), f"/{i}") for i in range(3)]
    for i, p in enumerate(pendings):
        requests.add(str(i), p, 10 if i else None)
    assert requests.close("the broker closed the connection") == pendings
    with pytest.raises(IpcBusConnectionError, match="the broker closed the connection"):
        requests.add("late", Pending(object(), "/late"), None)


def test_a_resolved_answer_settles_with_its_payload_and_sender() -> None:
    pending = Pending(object(), "/ch")
    sender = IpcBusPeer("n1", "node", IpcBusProcess("node", 7))
    settle_answer(pending, answer({"x": [1, 2]}), sender, no_call_soon)
    response = pending.future.result(0)
    assert response.payload == {"x": [1, 2]} and response.event.sender == sender


def test_a_rejected_answer_raises_with_its_text() -> None:
    pending = Pending(object(), "/ch")
    settle_answer(pending, answer("Error: no", resolve=False), None, no_call_soon)
    with pytest.raises(IpcBusRequestError, match="rejected: Error: no") as info:
        pending.future.result(0)
    assert info.value.response is not None and info.value.response.err == "Error: no"


def test_an_undecodable_answer_fails_the_request() -> None:
    pending = Pending(object(), "/ch")
    bad = E.Incoming("RQR", {"request": {"resolve": True}}, memoryview(b"\xff\x00"))
    settle_answer(pending, bad, None, no_call_soon)
    with pytest.raises(IpcBusRequestError, match="undecodable answer"):
        pending.future.result(0)


def test_a_probe_that_finds_the_service_started_makes_a_start_notice() -> None:
    class Client:
        notices: list[tuple[str, list[Any], Any]] = []

        def _notify(self, channel: str, args: list[Any], sender: Any) -> None:
            self.notices.append((channel, args, sender))

    client = Client()
    pending = Pending(client, "/ipcbus/service/call/clock")
    pending.status = pending.probe = True
    soon: list[Callable[[], None]] = []
    host = IpcBusPeer("n1", "node", IpcBusProcess("node", 7))
    settle_answer(pending, answer({"started": True, "callHandlers": ["now"]}), host, soon.append)
    status = pending.future.result(0).payload
    assert status["calls"] == ["now"] and status["host"]["id"] == "n1"
    assert len(soon) == 1 and not client.notices  # run later, where listeners run
    soon[0]()
    assert client.notices == [("/ipcbus/service/event/clock", ["start", status], host)]


def test_a_cancelled_future_is_left_alone() -> None:
    pending = Pending(object(), "/ch")
    assert pending.future.cancel()
    settle_answer(pending, answer(1), None, no_call_soon)
    assert pending.future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        pending.future.result(0)
