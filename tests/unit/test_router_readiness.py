"""Readiness in the pure router (``ipcbus._router_readiness``): ``/ipcbus/sync`` answered at
once, ``/ipcbus/waitListeners`` answered when enough peers listen (held until then, ended by
CANCEL or its requester leaving), both forwarded to the broker only by a linked bridge; and
:class:`ListenerWaits` against a model, with hypothesis. The in-memory bus is test_router.py's."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._protocol import Kind
from ipcbus._router_readiness import (SYNC_CHANNEL, WAIT_LISTENERS_CHANNEL, ListenerWaits,
                                      wait_arguments)
from ipcbus.errors import IpcBusProtocolError

from test_router import Bus, body_of, bus, expect_fail

__all__ = ["bus"]


def _answer(ep: Any, requester: str, rid: int) -> Any:
    frames = ep.take()
    assert len(frames) == 1, frames
    f = frames[0]
    assert (f.kind, f.target, f.rid) == (Kind.RESPONSE, requester, rid)
    ok, payload = body_of(f)
    assert ok is True
    return payload


def test_sync_is_answered_at_once_not_by_listeners_of_its_channel(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a, b = bus.add_peer(e1, "a"), bus.add_peer(e2, "b")
    bus.subscribe(e2, b, SYNC_CHANNEL)
    bus.request(e1, a, SYNC_CHANNEL, 1)
    assert _answer(e1, "a", 1) is None
    assert e2.take() == []
    assert not bus.router.pending


def test_wait_listeners_answers_at_once_when_enough_listen(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a, b = bus.add_peer(e1, "a"), bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.subscribe(e1, a, "ch")
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 1, body=["ch", 2])
    assert _answer(e1, "a", 1) == 2
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 2, body=["ch", 1])
    assert _answer(e1, "a", 2) == 2


def test_wait_listeners_is_held_until_a_subscription_reaches_the_count(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a, b, c = bus.add_peer(e1, "a"), bus.add_peer(e2, "b"), bus.add_peer(e3, "c")
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 1, body=["ch", 2])
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 2, body=["ch", 1])
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 3, body=["other", 1])
    assert e1.take() == []
    assert bus.router.state()["pending_requests"] == 3
    bus.subscribe(e2, b, "ch")
    assert _answer(e1, "a", 2) == 1
    bus.subscribe(e2, b, "ch")  # another reference of the same peer: still one listener
    assert e1.take() == []
    bus.subscribe(e3, c, "ch")
    assert _answer(e1, "a", 1) == 2
    assert bus.router.state()["pending_requests"] == 1  # "other" still waits


def test_a_held_wait_ends_with_cancel_or_its_requester(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a, b = bus.add_peer(e1, "a"), bus.add_peer(e2, "b")
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 1, body=["ch", 1])
    bus.request(e2, b, WAIT_LISTENERS_CHANNEL, 1, body=["ch", 1])
    bus.handle(e1, Kind.CANCEL, "", a, None, 1)
    bus.handle(e2, Kind.PEER_REMOVE, "", b)
    assert not bus.router.pending
    c = bus.add_peer(e2, "c")
    bus.subscribe(e2, c, "ch")
    assert e1.take() == [] and e2.take() == []
    assert len(bus.router.requests.waits) == 0  # the stale entries went with the subscription
    # a key reused after a cancel is a new request: not answered for the old one's channel
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 5, body=["x", 1])
    bus.handle(e1, Kind.CANCEL, "", a, None, 5)
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 5, body=["y", 1])
    bus.subscribe(e2, c, "x")
    assert e1.take() == []
    bus.subscribe(e2, c, "y")
    assert _answer(e1, "a", 5) == 1


def test_a_held_wait_reusing_its_request_id_is_a_protocol_error(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    bus.request(ep, a, WAIT_LISTENERS_CHANNEL, 1, body=["ch", 1])
    with pytest.raises(IpcBusProtocolError):
        bus.request(ep, a, WAIT_LISTENERS_CHANNEL, 1, body=["ch", 1])


@pytest.mark.parametrize("body", [None, [], ["ch"], ["ch", "1"], ["ch", 0], ["", 1],
                                  [1, 1], ["ch", True], ["x" * 2000, 1], ["ch", 1 << 40]])
def test_wait_listeners_with_bad_arguments_fails(bus: Bus, body: Any) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    bus.handle(ep, Kind.REQUEST, WAIT_LISTENERS_CHANNEL, a, None, 1,
               P.pack_payload(body) if body is not None else b"\xc1")
    assert WAIT_LISTENERS_CHANNEL in expect_fail(ep, "a", 1)
    assert not bus.router.pending


def test_a_linked_bridge_forwards_readiness_to_the_broker_only(bus: Bus) -> None:
    up = bus.endpoint("up", relay=True)
    bus.router.upstream = up
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a, b = bus.add_peer(e1, "a"), bus.add_peer(e2, "b")
    up.take()
    bus.subscribe(e2, b, SYNC_CHANNEL)
    bus.subscribe(e2, b, "ch")
    up.take()
    bus.request(e1, a, SYNC_CHANNEL, 1)
    bus.request(e1, a, WAIT_LISTENERS_CHANNEL, 2, body=["ch", 1])
    assert e2.take() == [] and e1.take() == []
    sent = up.take()
    assert [(f.kind, f.channel, f.rid) for f in sent] == [
        (Kind.REQUEST, SYNC_CHANNEL, 1), (Kind.REQUEST, WAIT_LISTENERS_CHANNEL, 2)]
    # the broker's answers go back to the requester
    bus.handle(up, Kind.RESPONSE, "", None, "a", 2, P.pack_payload([True, 3]))
    bus.handle(up, Kind.RESPONSE, "", None, "a", 1, P.pack_payload([True, None]))
    assert [body_of(f)[1] for f in e1.take()] == [3, None]
    assert not bus.router.pending
    # the broker never asks a bridge: refused rather than sent back up
    bus.handle(up, Kind.PEER_ADD, "", ["z", "z", "socket", 9])
    bus.handle(up, Kind.REQUEST, SYNC_CHANNEL, ["z", "z", "socket", 9], None, 7,
               P.pack_payload([]))
    assert [f.kind for f in up.take()] == [Kind.REQUEST_FAIL]


def test_wait_arguments() -> None:
    assert wait_arguments(["ch", 3], 1024) == ("ch", 3)
    assert isinstance(wait_arguments(["ch", -1], 1024), str)


# -- ListenerWaits against a model --------------------------------------------------------------
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from("xy"), st.integers(0, 5), st.integers(1, 4)),
    st.tuples(st.just("gone"), st.integers(0, 5)),
    st.tuples(st.just("listen"), st.sampled_from("xy"), st.integers(0, 6)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_listener_waits_answers_each_live_request_once_when_its_count_is_reached(
        script: list[Any]) -> None:
    waits: ListenerWaits[int] = ListenerWaits()
    table: dict[int, object] = {}  # key -> token: the requests in flight
    model: dict[int, tuple[str, int]] = {}  # key -> (channel, count) of live held requests

    def alive(key: int, token: object) -> bool:
        return table.get(key) is token

    for op in script:
        if op[0] == "add":
            _, channel, key, count = op
            if key in table:
                continue
            token = object()
            table[key] = token
            waits.add(channel, key, count, token, alive)
            model[key] = (channel, count)
        elif op[0] == "gone":
            table.pop(op[1], None)
            model.pop(op[1], None)
        else:
            _, channel, listeners = op
            ready = waits.ready(channel, listeners, alive)
            expected = sorted(k for k, (ch, n) in model.items()
                              if ch == channel and n <= listeners)
            assert sorted(ready) == expected
            for key in ready:
                del table[key], model[key]
        assert len(waits) >= len(model)
        assert len(waits) <= max(2 * len(model), 64) + 1
