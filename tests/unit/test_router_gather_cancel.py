"""Issue 17 items 3 and 4 in the router, as pure code: a CANCEL reaches the receivers still
expected (through a link too), and a REQUEST_ALL is gathered (every answer forwarded, one
REQUEST_FAIL at the end). The in-memory bus and endpoints are test_router.py's."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._protocol import Frame, Kind
from ipcbus.errors import IpcBusProtocolError

from test_router import Bus, FakeEndpoint, body_of, bus, expect_fail, info

__all__ = ["bus"]


def request_all(bus: Bus, ep: FakeEndpoint, peer: list[Any], channel: str, rid: int) -> Frame:
    return bus.handle(ep, Kind.REQUEST_ALL, channel, peer, None, rid, P.pack_payload([]))


def kinds(frames: list[Frame]) -> list[tuple[int, int]]:
    return [(f.kind, f.rid) for f in frames]


# -- cancelling -------------------------------------------------------------------------------
def test_cancel_reaches_each_receiver_endpoint_once(bus: Bus) -> None:
    e1, e2, e3, e4 = (bus.endpoint(n) for n in ("e1", "e2", "e3", "e4"))
    a = bus.add_peer(e1, "a")
    b1, b2 = bus.add_peer(e2, "b1"), bus.add_peer(e2, "b2")
    c = bus.add_peer(e3, "c")
    d = bus.add_peer(e4, "d")  # listens elsewhere: never told
    for ep, peer in ((e2, b1), (e2, b2), (e3, c)):
        bus.subscribe(ep, peer, "ch")
    bus.subscribe(e4, d, "other")
    bus.request(e1, a, "ch", 5)
    e2.take(), e3.take()
    cancel = bus.handle(e1, Kind.CANCEL, "ch", a, None, 5)
    assert e2.take_raw() == [bytes(cancel.raw)]  # once for the endpoint of b1 and b2
    assert e3.take_raw() == [bytes(cancel.raw)]
    assert e1.delivered == [] and e4.delivered == []
    assert not bus.router.pending


def test_cancel_after_the_answer_or_by_another_peer_does_nothing(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a, x = bus.add_peer(e1, "a"), bus.add_peer(e1, "x")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.request(e1, a, "ch", 1)
    e2.take()
    bus.handle(e1, Kind.CANCEL, "ch", x, None, 1)  # x's request 1: not in flight
    assert e2.delivered == [] and ("a", 1) in bus.router.pending
    bus.respond(e2, b, "a", 1)
    e1.take()
    bus.handle(e1, Kind.CANCEL, "ch", a, None, 1)  # answered already
    assert e2.delivered == [] and e1.delivered == []


def test_cancel_in_another_peers_name_is_a_protocol_error(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.request(e1, a, "ch", 1)
    e2.take()
    with pytest.raises(IpcBusProtocolError):
        bus.handle(e2, Kind.CANCEL, "ch", a, None, 1)  # e2 does not carry peer a
    assert ("a", 1) in bus.router.pending and e2.delivered == []


def test_cancel_through_a_link_both_ways() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    up.take()
    bus.subscribe(e2, b, "ch")
    up.take()
    # a local request went to b and upstream: the cancel goes to both
    bus.request(e1, a, "ch", 3)
    e2.take(), up.take()
    cancel = bus.handle(e1, Kind.CANCEL, "ch", a, None, 3)
    assert e2.take_raw() == [bytes(cancel.raw)] and up.take_raw() == [bytes(cancel.raw)]
    # a request from beyond the link, to b: the broker's CANCEL reaches b
    remote = info("r", "remote")
    bus.request(up, remote, "ch", 4)
    assert kinds(e2.take()) == [(Kind.REQUEST, 4)]
    cancel = bus.handle(up, Kind.CANCEL, "ch", remote, None, 4)
    assert e2.take_raw() == [bytes(cancel.raw)] and up.delivered == []
    # a local requester leaving: its local receivers are told, not upstream (the broker
    # sees the PEER_REMOVE and does the same there)
    bus.request(e1, a, "ch", 5)
    e2.take(), up.take()
    bus.router.remove_endpoint(e1)
    assert kinds(e2.take()) == [(Kind.CANCEL, 5)]
    assert [f.kind for f in up.take()] == [Kind.PEER_REMOVE]


# -- gathering --------------------------------------------------------------------------------
def test_request_all_forwards_every_answer_then_ends(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a = bus.add_peer(e1, "a")
    b1, b2 = bus.add_peer(e2, "b1"), bus.add_peer(e2, "b2")
    c = bus.add_peer(e3, "c")
    for ep, peer in ((e2, b1), (e2, b2), (e3, c)):
        bus.subscribe(ep, peer, "ch")
    req = request_all(bus, e1, a, "ch", 7)
    assert e2.take_raw() == [bytes(req.raw)] and e3.take_raw() == [bytes(req.raw)]
    r1 = bus.respond(e2, b1, "a", 7, "b1")
    bus.respond(e2, b1, "a", 7, "b1 again")  # a receiver answers once: dropped
    assert e1.take_raw() == [bytes(r1.raw)]
    r2 = bus.handle(e3, Kind.RESPONSE, "", c, "a", 7, P.pack_payload([False, "no"]))
    assert e1.take_raw() == [bytes(r2.raw)]
    assert ("a", 7) in bus.router.pending
    r3 = bus.respond(e2, b2, "a", 7, "b2")
    frames = e1.take()
    assert frames[0].raw == r3.raw and frames[1].kind == Kind.REQUEST_FAIL and len(frames) == 2
    assert not bus.router.pending


def test_request_all_without_listener_ends_at_once(bus: Bus) -> None:
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    request_all(bus, e1, a, "nobody", 1)
    assert "nobody" in expect_fail(e1, "a", 1)
    assert not bus.router.pending


def test_request_all_receivers_that_fail_or_leave(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    bus.subscribe(e2, b, "ch")
    bus.subscribe(e3, c, "ch")
    request_all(bus, e1, a, "ch", 2)
    e2.take(), e3.take()
    bus.fail(e2, b, "a", 2)  # b's process had no listener left: b is done
    assert e1.delivered == []
    bus.router.remove_endpoint(e3)  # c left: the last one
    assert kinds(e1.take()) == [(Kind.REQUEST_FAIL, 2)]
    assert not bus.router.pending


def test_request_all_on_a_reserved_channel_or_with_a_target(bus: Bus) -> None:
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    request_all(bus, e1, a, "/ipcbus/queryState", 1)
    assert "reserved" in expect_fail(e1, "a", 1)
    with pytest.raises(IpcBusProtocolError):
        bus.handle(e1, Kind.REQUEST_ALL, "ch", a, "a", 2, P.pack_payload([]))


def test_request_all_through_a_link_ends_only_when_the_broker_does() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    up.take()
    req = request_all(bus, e1, a, "ch", 9)
    assert up.take_raw() == [bytes(req.raw)] and e2.take_raw() == [bytes(req.raw)]
    r1, r2 = info("r1", "remote"), info("r2", "remote")
    f1 = bus.respond(up, r1, "a", 9, "r1")
    bus.respond(e2, b, "a", 9, "b")  # the local side is done; UPSTREAM is not
    f2 = bus.respond(up, r2, "a", 9, "r2")
    frames = e1.take()
    assert [f.kind for f in frames] == [Kind.RESPONSE] * 3
    assert frames[0].raw == f1.raw and frames[2].raw == f2.raw
    bus.fail(up, None, "a", 9, "every receiver has answered")  # the broker's end
    assert kinds(e1.take()) == [(Kind.REQUEST_FAIL, 9)]
    assert not bus.router.pending


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["answer", "fail", "leave", "cancel"]),
                          st.integers(0, 3)), max_size=14))
def test_request_all_sequences(steps: list[tuple[str, int]]) -> None:
    """Whatever the receivers do, in any order: the requester gets at most one answer per
    receiver, then exactly one end once none is left (none after a cancel), and the table
    empties."""
    bus = Bus()
    req_ep = bus.endpoint("req")
    a = bus.add_peer(req_ep, "a")
    eps = [bus.endpoint(f"e{i}") for i in range(4)]
    peers = [bus.add_peer(ep, f"p{i}") for i, ep in enumerate(eps)]
    for ep, peer in zip(eps, peers):
        bus.subscribe(ep, peer, "ch")
    request_all(bus, req_ep, a, "ch", 1)
    left: set[int] = set()
    done: set[int] = set()
    cancelled = False
    answers: list[str] = []
    ends = 0
    for what, i in steps:
        if i in left:
            continue
        if what == "answer":
            bus.respond(eps[i], peers[i], "a", 1, f"p{i}")
        elif what == "fail":
            bus.fail(eps[i], peers[i], "a", 1)
        elif what == "leave":
            bus.router.remove_endpoint(eps[i])
            left.add(i)
        elif not cancelled:
            bus.handle(req_ep, Kind.CANCEL, "ch", a, None, 1)
            cancelled = True
        if what in ("answer", "fail", "leave") and not cancelled:
            done.add(i)
        for frame in req_ep.take():
            if frame.kind == Kind.RESPONSE:
                assert ends == 0
                answers.append(body_of(frame)[1])
            else:
                assert frame.kind == Kind.REQUEST_FAIL
                ends += 1
    assert len(answers) == len(set(answers))  # at most one answer per receiver
    if cancelled:
        assert ends == 0 or len(done) == 4
    else:
        assert ends == (1 if len(done) == 4 else 0)
    assert (("a", 1) in bus.router.pending) == (not cancelled and len(done) < 4)
