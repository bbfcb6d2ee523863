"""The router's requests as pure code (``ipcbus._router_requests``): who gets a request, who
may answer it, when the requester is told it failed, and the special channels the router
answers itself. The in-memory bus and endpoints are test_router.py's."""
from __future__ import annotations

from typing import Any

import pytest

from ipcbus import _protocol as P
from ipcbus._protocol import Kind
from ipcbus.errors import IpcBusProtocolError

from test_router import Bus, body_of, bus, expect_fail

__all__ = ["bus"]  # the fixture, shared with test_router.py

# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


def test_request_without_listener_fails_at_once(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    bus.add_peer(e2, "b")
    bus.request(e1, a, "nobody", 7)
    assert "nobody" in expect_fail(e1, "a", 7)
    assert e2.take() == []
    assert not bus.router.pending


def test_request_to_every_listener_first_answer_wins(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a1, a2 = bus.add_peer(e1, "a1"), bus.add_peer(e1, "a2")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    for peer, ep in ((a1, e1), (a2, e1), (b, e2)):
        bus.subscribe(ep, peer, "svc")
    req = bus.request(e3, c, "svc", 1, body=["q"])
    assert e1.take_raw() == [bytes(req.raw)]  # once per endpoint
    assert e2.take_raw() == [bytes(req.raw)]
    assert e3.take_raw() == []
    assert list(bus.router.pending) == [("c", 1)]
    assert bus.router.pending.receivers(("c", 1)) == {"a1", "a2", "b"}
    resp = bus.respond(e2, b, "c", 1, "from b")
    assert e3.take_raw() == [bytes(resp.raw)]
    assert not bus.router.pending
    # a second answer is dropped
    bus.respond(e1, a1, "c", 1, "late")
    assert e1.delivered == e2.delivered == e3.delivered == []
    # and a late failure too
    bus.fail(e1, a2, "c", 1)
    assert e1.delivered == e2.delivered == e3.delivered == []


def test_request_reaches_a_listener_of_the_same_endpoint(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    b = bus.add_peer(ep, "b")
    bus.subscribe(ep, b, "ch")
    req = bus.request(ep, a, "ch", 3)
    assert ep.take_raw() == [bytes(req.raw)]
    resp = bus.respond(ep, b, "a", 3)
    assert ep.take_raw() == [bytes(resp.raw)]
    # even the requester's own listener (a request its own client must answer)
    bus.subscribe(ep, a, "self")
    req = bus.request(ep, a, "self", 4)
    assert ep.take_raw() == [bytes(req.raw)]
    resp = bus.respond(ep, a, "a", 4)
    assert ep.take_raw() == [bytes(resp.raw)]
    assert not bus.router.pending


def test_request_id_reused_while_pending_is_a_protocol_error(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.request(e1, a, "ch", 1)
    with pytest.raises(IpcBusProtocolError):
        bus.request(e1, a, "ch", 1)
    # the same rid from another requester is a different request
    bus.request(e2, b, "ch", 1)
    assert set(bus.router.pending) == {("a", 1), ("b", 1)}


def test_request_to(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    bus.subscribe(e2, b, "ch")
    bus.subscribe(e3, c, "ch")
    # to a listening peer: only its endpoint gets it
    req = bus.request(e1, a, "ch", 1, target="b")
    assert e2.take_raw() == [bytes(req.raw)]
    assert e3.take_raw() == [] and e1.take_raw() == []
    assert bus.router.pending.receivers(("a", 1)) == {"b"}
    resp = bus.respond(e2, b, "a", 1)
    assert e1.take_raw() == [bytes(resp.raw)]


def test_request_to_a_peer_not_listening_fails(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "other")
    bus.request(e1, a, "ch", 2, target="b")
    expect_fail(e1, "a", 2)
    assert e2.take() == []
    assert not bus.router.pending


def test_request_to_an_unknown_peer_fails(bus: Bus) -> None:
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    bus.request(e1, a, "ch", 3, target="ghost")
    assert "ghost" in expect_fail(e1, "a", 3)
    assert not bus.router.pending


def test_every_receiver_removed_fails_the_request_at_once(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    bus.subscribe(e1, a, "ch")
    bus.subscribe(e2, b, "ch")
    bus.request(e3, c, "ch", 5)
    e1.take(), e2.take()
    bus.router.remove_endpoint(e1)
    assert e3.take() == []  # b may still answer
    assert bus.router.pending.receivers(("c", 5)) == {"b"}
    bus.router.remove_endpoint(e2)
    expect_fail(e3, "c", 5)
    assert not bus.router.pending


def test_receiver_leaving_by_peer_remove_fails_the_request(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.request(e1, a, "ch", 6)
    e2.take()
    bus.handle(e2, Kind.PEER_REMOVE, sender=b)
    expect_fail(e1, "a", 6)
    assert not bus.router.pending


def test_requester_removed_forgets_pending(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.request(e1, a, "ch", 1)
    bus.request(e1, a, "ch", 2)
    e2.take()
    bus.router.remove_endpoint(e1)
    assert not bus.router.pending
    # its receivers are told (0.2: a requester leaving cancels its requests)
    assert sorted((f.kind, f.sender_id, f.rid) for f in e2.take()) == [
        (Kind.CANCEL, "a", 1), (Kind.CANCEL, "a", 2)]
    # the late answer goes nowhere
    bus.respond(e2, b, "a", 1)
    assert e1.delivered == [] and e2.delivered == []


def test_cancel_forgets_pending(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    bus.request(e1, a, "ch", 8)
    bus.request(e1, a, "ch", 9)
    e2.take()
    bus.handle(e1, Kind.CANCEL, "", a, None, 8)
    assert list(bus.router.pending) == [("a", 9)]
    assert [(f.kind, f.rid) for f in e2.take()] == [(Kind.CANCEL, 8)]  # the receiver is told
    bus.respond(e2, b, "a", 8)
    assert e1.delivered == []  # dropped
    # the receiver leaving does not fail a cancelled request
    bus.respond(e2, b, "a", 9)
    e1.take()
    bus.request(e1, a, "ch", 10)
    bus.handle(e1, Kind.CANCEL, "", a, None, 10)
    e2.take()
    bus.router.remove_endpoint(e2)
    assert e1.delivered == []
    assert not bus.router.pending


def test_request_fail_from_a_receiver_endpoint_drops_its_receivers(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a1, a2 = bus.add_peer(e1, "a1"), bus.add_peer(e1, "a2")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    bus.subscribe(e1, a1, "ch")
    bus.subscribe(e1, a2, "ch")
    bus.subscribe(e2, b, "ch")
    bus.request(e3, c, "ch", 4)
    e1.take(), e2.take()
    # e1's process had no listener left: both of its peers are dropped
    bus.fail(e1, a1, "c", 4, "no listener in process 1")
    assert e3.take() == []
    assert bus.router.pending.receivers(("c", 4)) == {"b"}
    bus.fail(e2, b, "c", 4, "no listener in process 2")
    reason = expect_fail(e3, "c", 4)
    assert reason == "no listener in process 2"
    assert not bus.router.pending
    # a REQUEST_FAIL from an endpoint that is not a receiver changes nothing
    bus.request(e3, c, "ch", 5)
    e1.take(), e2.take()
    bus.fail(e3, c, "c", 5)
    assert bus.router.pending.receivers(("c", 5)) == {"a1", "a2", "b"}
    assert e3.take() == []


def test_request_fail_without_target_is_a_protocol_error(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    with pytest.raises(IpcBusProtocolError):
        bus.handle(ep, Kind.REQUEST_FAIL, "", a, None, 1, P.pack_payload("x"))
    with pytest.raises(IpcBusProtocolError):
        bus.handle(ep, Kind.RESPONSE, "", a, None, 1, P.pack_payload([True, 1]))


def test_request_from_a_relay_is_not_sent_back_to_it(bus: Bus) -> None:
    relay = bus.endpoint("link", relay=True)
    local = bus.endpoint("local")
    r = bus.add_peer(relay, "r")
    r2 = bus.add_peer(relay, "r2")
    bus.subscribe(relay, r2, "ch")
    # only a listener on the relay's own side: nobody here can answer
    bus.request(relay, r, "ch", 1)
    expect_fail(relay, "r", 1)
    x = bus.add_peer(local, "x")
    bus.subscribe(local, x, "ch")
    req = bus.request(relay, r, "ch", 2)
    assert local.take_raw() == [bytes(req.raw)]
    assert relay.take_raw() == []
    assert bus.router.pending.receivers(("r", 2)) == {"x"}
    # a relay may speak for its side without a sender
    bus.request(local, x, "ch", 3)
    relay.take()
    bus.fail(relay, None, "x", 3)
    assert bus.router.pending.receivers(("x", 3)) == {"x"}


# ---------------------------------------------------------------------------------------------
# special channels
# ---------------------------------------------------------------------------------------------

def test_query_state_answered_by_the_router(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1", ptype="pipe", pid=11), bus.endpoint("e2", pid=22)
    a = bus.add_peer(e1, "a", name="alpha", type_="main", pid=1)  # the endpoint decides
    b = bus.add_peer(e2, "b", name="beta", type_="socket", pid=22)
    bus.subscribe(e1, a, "x", 2)
    bus.subscribe(e2, b, "x")
    bus.subscribe(e2, b, "y")
    bus.request(e1, a, P.QUERY_STATE_CHANNEL, 1)
    frames = e1.take()
    assert len(frames) == 1
    resp = frames[0]
    assert (resp.kind, resp.target, resp.rid) == (Kind.RESPONSE, "a", 1)
    ok, state = body_of(resp)
    assert ok is True
    assert state["pid"] == bus.router.pid
    peers = {p["id"]: p for p in state["peers"]}
    assert set(peers) == {"a", "b"}
    assert peers["a"]["name"] == "alpha" and peers["a"]["type"] == "pipe"
    assert peers["a"]["pid"] == 11
    assert peers["a"]["channels"] == {"x": 2}
    assert peers["b"]["channels"] == {"x": 1, "y": 1}
    assert state["channels"] == {"x": 2, "y": 1}
    assert state["pending_requests"] == 0
    assert e2.take() == []
    assert not bus.router.pending


def test_query_state_not_routed_to_listeners_of_that_channel(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, P.QUERY_STATE_CHANNEL)
    bus.request(e1, a, P.QUERY_STATE_CHANNEL, 1)
    assert [f.kind for f in e1.take()] == [Kind.RESPONSE]
    assert e2.take() == []


def test_service_available_unknown_name(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    bus.request(ep, a, P.SERVICE_AVAILABLE_CHANNEL, 3, body=["no-such-service"])
    frames = ep.take()
    assert len(frames) == 1
    assert (frames[0].kind, frames[0].target, frames[0].rid) == (Kind.RESPONSE, "a", 3)
    assert body_of(frames[0]) == [True, False]
    assert not bus.router.pending


@pytest.mark.parametrize("args", [[], [5], "name", None])
def test_service_available_without_a_name_fails(bus: Bus, args: Any) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    bus.handle(ep, Kind.REQUEST, P.SERVICE_AVAILABLE_CHANNEL, a, None, 4, P.pack_payload(args))
    expect_fail(ep, "a", 4)
    assert not bus.router.pending
