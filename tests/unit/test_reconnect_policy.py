"""Reconnection as a pure unit (``ipcbus._client.reconnect``): the backoff of a
:class:`Reconnect` policy, the link's state machine (connected / down / closed) and what may be
called in each state, with an injected clock; hypothesis drives sequences of losses, attempts,
successes, closes and the passing of time against a model."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import IpcBusConnectionError, Reconnect
from ipcbus._client.reconnect import CLOSED, CONNECTED, DOWN, LinkState, policy_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_initial_up_to_maximum() -> None:
    policy = Reconnect(initial=0.05, maximum=2.0)
    assert [policy.delay(n) for n in range(8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert policy.delay(10_000) == 2.0  # no overflow however long it is down
    assert Reconnect() == Reconnect(0.05, 2.0, None)
    assert "give_up=None" in repr(Reconnect())


@pytest.mark.parametrize("kwargs, error", [
    ({"initial": 0}, ValueError), ({"initial": -1}, ValueError),
    ({"maximum": math.inf}, ValueError), ({"initial": 3.0, "maximum": 2.0}, ValueError),
    ({"give_up": 0}, ValueError), ({"initial": "1"}, TypeError), ({"give_up": True}, TypeError),
    ({"maximum": math.nan}, ValueError),
])
def test_bad_policies_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        Reconnect(**kwargs)  # type: ignore[arg-type]


def test_policy_of_the_connect_argument() -> None:
    assert policy_of(False) is None and policy_of(None) is None
    assert policy_of(True) == Reconnect()
    custom = Reconnect(initial=1.0, maximum=1.0, give_up=5.0)
    assert policy_of(custom) is custom
    with pytest.raises(TypeError):
        policy_of(1)


def test_a_loss_then_attempts_then_success() -> None:
    clock = Clock()
    link = LinkState(Reconnect(initial=0.1, maximum=0.3), clock)
    link.check_call()  # connected: calls go to the bus
    assert link.next_delay() is None  # no attempt while connected
    assert link.lost("the bus closed the connection")
    assert not link.lost("again")  # one loss at a time
    with pytest.raises(IpcBusConnectionError, match="down .*the bus closed"):
        link.check_call()
    delays = []
    for _ in range(4):
        delay = link.next_delay()
        assert delay is not None
        delays.append(delay)
        clock.now += delay
        link.attempt_failed("refused")
    assert delays == [0.1, 0.2, 0.3, 0.3]
    assert link.reconnected() and link.state == CONNECTED and link.attempts == 0
    link.check_call()
    assert link.lost("again") and link.next_delay() == 0.1  # a new loss starts over


def test_give_up_closes_for_good_and_never_waits_past_the_deadline() -> None:
    clock = Clock()
    link = LinkState(Reconnect(initial=1.0, maximum=4.0, give_up=2.5), clock)
    link.lost("gone")
    assert link.next_delay() == 1.0
    clock.now += 1.0
    link.attempt_failed("refused")
    assert link.next_delay() == 1.5  # 2.0, cut to what is left before giving up
    clock.now += 1.5
    link.attempt_failed("refused")
    assert link.next_delay() is None and link.state == CLOSED and link.gave_up
    with pytest.raises(IpcBusConnectionError, match="gave up reconnecting after 2.5 s"):
        link.check_call()
    assert not link.reconnected() and not link.lost("x") and not link.close()


def test_close_while_down_stops_attempts_and_refuses_a_late_success() -> None:
    link = LinkState(Reconnect(), Clock())
    link.lost("gone")
    assert link.close() and not link.close()
    assert link.next_delay() is None and not link.gave_up
    assert not link.reconnected()  # an attempt that joined meanwhile must leave again
    with pytest.raises(IpcBusConnectionError, match="closed"):
        link.check_call()


ops = st.lists(st.one_of(
    st.just(("lost",)), st.just(("attempt_failed",)), st.just(("reconnected",)),
    st.just(("close",)), st.just(("next",)),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=5)),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ops, st.floats(min_value=0.01, max_value=1), st.integers(min_value=1, max_value=8),
       st.one_of(st.none(), st.floats(min_value=0.1, max_value=10)))
def test_any_sequence_keeps_the_rules(steps: list[tuple[object, ...]], initial: float,
                                      factor: int, give_up: float | None) -> None:
    """Against a model: CLOSED is final; calls are allowed exactly when CONNECTED; a delay
    is the doubling backoff of the failed attempts, never past give_up; giving up happens
    only past the deadline while down; a success counts only while down."""
    clock = Clock()
    policy = Reconnect(initial=initial, maximum=initial * factor, give_up=give_up)
    link = LinkState(policy, clock)
    model, failed, since = CONNECTED, 0, 0.0
    for step in steps:
        op = step[0]
        if op == "tick":
            clock.now += float(step[1])  # type: ignore[arg-type]
        elif op == "lost":
            assert link.lost("gone") == (model == CONNECTED)
            if model == CONNECTED:
                model, failed, since = DOWN, 0, clock.now
        elif op == "attempt_failed":
            link.attempt_failed("refused")
            if model == DOWN:
                failed += 1
        elif op == "reconnected":
            assert link.reconnected() == (model == DOWN)
            if model == DOWN:
                model = CONNECTED
        elif op == "close":
            assert link.close() == (model != CLOSED)
            model = CLOSED
        else:
            delay = link.next_delay()
            if model != DOWN:
                assert delay is None
            elif give_up is not None and since + give_up - clock.now <= 0:  # (as rounded there)
                assert delay is None and link.gave_up
                model = CLOSED
            else:
                assert delay is not None and delay > 0
                expected = min(initial * 2 ** failed, initial * factor)
                if give_up is not None:
                    expected = min(expected, since + give_up - clock.now)
                assert delay == pytest.approx(expected)
        assert link.state == model
        if model == CONNECTED:
            link.check_call()
        else:
            with pytest.raises(IpcBusConnectionError):
                link.check_call()
