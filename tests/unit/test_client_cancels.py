"""The receiving side's table of delivered requests (``ipcbus._client.cancels``), pure: a
cancel marks a request and runs its callbacks once; answered requests leave; the table stays
bounded; and the timeout a request's header carries (``_protocol.request_timeout``)."""
from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._client.cancels import Delivered, run_cancel
from ipcbus._protocol import Kind


def test_cancel_runs_callbacks_once_and_late_ones_at_once() -> None:
    table = Delivered()
    state = table.add(("r", 1), 2.5, 1)
    seen: list[str] = []
    state.add(lambda: seen.append("early"))
    run_cancel(table, "r", 1)
    assert state.cancelled and seen == ["early"] and ("r", 1) not in table
    state.add(lambda: seen.append("late"))  # after the cancel: at once
    run_cancel(table, "r", 1)  # again: nothing
    assert seen == ["early", "late"] and state.timeout == 2.5


def test_answered_requests_leave_and_a_later_cancel_does_nothing() -> None:
    table = Delivered()
    state = table.add(("r", 1), None, 2)  # a request_all delivered to two clients
    seen: list[str] = []
    state.add(lambda: seen.append("x"))
    state.answered()
    assert ("r", 1) in table
    state.answered()
    assert len(table) == 0
    run_cancel(table, "r", 1)
    assert not state.cancelled and seen == []


def test_a_raising_callback_is_contained() -> None:
    table = Delivered()
    state = table.add(("r", 1), None, 1)
    seen: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    state.add(boom)
    state.add(lambda: seen.append(1))
    run_cancel(table, "r", 1)
    assert seen == [1]


@given(st.lists(st.tuples(st.sampled_from(["add", "answer", "cancel"]), st.integers(0, 40)),
                max_size=200))
def test_bounded_whatever_happens(steps: list[tuple[str, int]]) -> None:
    table = Delivered(limit=8)
    states: dict[int, Any] = {}
    for what, rid in steps:
        if what == "add":
            states[rid] = table.add(("r", rid), None, 1)
        elif what == "answer" and rid in states:
            states.pop(rid).answered()
            assert ("r", rid) not in table
        elif what == "cancel":
            run_cancel(table, "r", rid)
            assert ("r", rid) not in table
        assert len(table) <= 8


def test_request_timeout_in_the_header() -> None:
    sender = ["p", "name", "socket", 1]
    with_timeout = P.encode_frame(Kind.REQUEST, "ch", sender, None, 1)
    assert P.request_timeout(with_timeout) is None
    header = P.encode_header(Kind.REQUEST, "ch", sender, None, 0, 1.5)
    raw = P.PREFIX.pack(len(header), 0, 1) + header
    assert P.request_timeout(raw) == 1.5
    assert P.decode_header(header) == (Kind.REQUEST, "ch", sender, None, 0)  # ignored there
    bad = P.encode_header(Kind.REQUEST, "ch", sender, None, 0, -1)
    assert P.request_timeout(P.PREFIX.pack(len(bad), 0, 1) + bad) is None
