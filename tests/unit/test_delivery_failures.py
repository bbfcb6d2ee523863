"""The receiving side of "failures reach the caller at once", without sockets: a request
frame handed to ``_client.delivery.deliver`` with fake clients. The process tells the hub
(``refuse(frame, reason, client)``) exactly when every local receiver had a listener raise and
none answered; the reason is "TypeName: message"; later answers from the process are refused."""
from __future__ import annotations

from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._client.delivery import PeerCache, deliver, failure_reason
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind
from ipcbus._types import IpcBusRequest


class FakeClient:
    def __init__(self, peer_id: str, listeners: list[Callable[..., Any]]) -> None:
        self._peer_id: str | None = peer_id
        self._spy_handler: Callable[[P.Frame], None] | None = None
        self._listeners: dict[str, Any] = {"job": listeners}
        self.sent: list[Any] = []

    @property
    def _member(self) -> Any:
        return self._peer_id

    def _take(self, key: str) -> list[Callable[..., Any]]:
        return list(self._listeners.get(key, []))

    def _connection_ended(self, conn: Any) -> None:
        pass

    def _pack_answer(self, resolved: bool, value: Any) -> Any:
        return P.pack_args([resolved, value])

    def _send_answer(self, channel: str, requester: str, rid: int, body: Any,
                     member: Any) -> None:
        self.sent.append((requester, rid, member))


def _request_frame() -> P.Frame:
    dec = FrameDecoder()
    dec.feed(P.encode_frame(Kind.REQUEST, "job", ["asker", "asker", "socket", 1], None, 9,
                            P.pack_payload([1])))
    return dec.frames()[0]


class Refusals:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, Any]] = []

    def __call__(self, frame: P.Frame, reason: str | None = None, client: Any = None) -> None:
        assert (frame.kind, frame.rid) == (Kind.REQUEST, 9)
        self.calls.append((reason, client))


def _raise(exc: BaseException) -> Callable[..., Any]:
    def listener(event: Any, *args: Any) -> None:
        raise exc
    return listener


def _answer(event: Any, *args: Any) -> None:
    event.request.resolve("ok")


def _silent(event: Any, *args: Any) -> None:
    pass


def _run(clients: list[FakeClient]) -> Refusals:
    refuse = Refusals()
    deliver(_request_frame(), clients, PeerCache(), refuse)
    return refuse


def test_a_lone_raising_receiver_fails_the_request_with_type_and_text() -> None:
    client = FakeClient("a", [_raise(ValueError("bad job"))])
    refuse = _run([client])
    assert refuse.calls == [("ValueError: bad job", client)]


@pytest.mark.parametrize("exc,reason", [(SystemExit(2), "SystemExit: 2"),
                                        (KeyboardInterrupt(), "KeyboardInterrupt")])
def test_system_exit_and_keyboard_interrupt_are_contained_and_fail_it(
        exc: BaseException, reason: str) -> None:
    assert _run([FakeClient("a", [_raise(exc)])]).calls[0][0] == reason
    assert failure_reason(exc) == reason


def test_an_unencodable_answer_raised_in_the_listener_fails_it() -> None:
    def listener(event: Any, *args: Any) -> None:
        event.request.resolve(object())
    reason = _run([FakeClient("a", [listener])]).calls[0][0]
    assert reason is not None and reason.startswith("TypeError: cannot send this value")


def test_a_later_answer_of_a_failed_process_is_refused_locally() -> None:
    kept: list[IpcBusRequest] = []

    def listener(event: Any, *args: Any) -> None:
        kept.append(event.request)
        raise ValueError("x")
    client = FakeClient("a", [listener])
    assert len(_run([client]).calls) == 1
    assert kept[0].resolve("late") is False and client.sent == []


behaviours = st.sampled_from(["raise", "answer", "silent", "answer-then-raise"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(behaviours, min_size=1, max_size=3), min_size=1, max_size=4))
def test_the_process_fails_exactly_when_every_receiver_raised_and_none_answered(
        plan: list[list[str]]) -> None:
    make: dict[str, Callable[[], list[Callable[..., Any]]]] = {"raise": lambda: [_raise(RuntimeError("r"))], "answer": lambda: [_answer],
            "silent": lambda: [_silent],
            "answer-then-raise": lambda: [_answer, _raise(RuntimeError("after"))]}
    clients = [FakeClient(f"c{i}", [ls for b in behaviours_ for ls in make[b]()])
               for i, behaviours_ in enumerate(plan)]
    refuse = _run(clients)
    answered = sum(len(c.sent) for c in clients)
    every_raised = all(any(b in ("raise", "answer-then-raise") for b in bs) for bs in plan)
    assert answered <= 1
    expected = every_raised and answered == 0
    assert len(refuse.calls) == (1 if expected else 0), (plan, refuse.calls)
    if expected:
        assert refuse.calls[0] == ("RuntimeError: r", clients[0])
