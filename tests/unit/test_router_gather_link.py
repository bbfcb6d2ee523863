"""Issue 17 gaps through a bridge's link, in the routers as pure code (the Linked pair of
test_router_groups.py): a REQUEST_ALL of the bridge's side that the broker hands to a group
member behind the same link ends once that member has answered (its answer goes through the
broker, once); a broker-chosen member that fails fails the request at once (gathering or
not); a broker's REQUEST_ALL answered by a member below leaves no forged failure behind."""
from __future__ import annotations

from typing import Any

from ipcbus import _protocol as P
from ipcbus._protocol import Kind

from test_router import FakeEndpoint, body_of
from test_router_groups import Linked, join, unwrap


def linked_pool() -> tuple[Linked, FakeEndpoint, list[Any], list[tuple[FakeEndpoint, list[Any]]]]:
    """A bridge-side requester "bs", and one member "b0" of "pool" on "job", behind the link."""
    bus = Linked()
    bs_ep = bus.bridge.endpoint("bs")
    bs = bus.bridge.add_peer(bs_ep, "bs")
    ep = bus.bridge.endpoint("b0")
    member = bus.bridge.add_peer(ep, "b0")
    join(bus.bridge, ep, member, "job", "pool")
    bus.pump()
    return bus, bs_ep, bs, [(ep, member)]


def kinds(ep: FakeEndpoint) -> list[tuple[str, Any]]:
    return [(Kind(f.kind).name, body_of(f)) for f in ep.take()]


def test_a_gathering_of_the_bridges_side_ends_after_a_member_below_answered() -> None:
    bus, bs_ep, bs, [(ep, member)] = linked_pool()
    plain_ep = bus.broker.endpoint("plain")
    plain = bus.broker.add_peer(plain_ep, "plain")
    bus.broker.subscribe(plain_ep, plain, "job")
    bus.bridge.handle(bs_ep, Kind.REQUEST_ALL, "job", bs, None, 5, P.pack_payload([]))
    bus.pump()
    (grouped,) = ep.take()
    assert unwrap(grouped)[1].kind == Kind.REQUEST_ALL
    bus.bridge.respond(ep, member, "bs", 5, "b0")
    bus.pump()
    assert kinds(bs_ep) == [("RESPONSE", [True, "b0"])]  # once, through the broker
    (plain_req,) = plain_ep.take()
    bus.broker.respond(plain_ep, plain, "bs", 5, "plain")
    bus.pump()
    assert kinds(bs_ep) == [("RESPONSE", [True, "plain"]),
                            ("REQUEST_FAIL", "every receiver has answered")]
    assert not bus.bridge.router.pending and not bus.broker.router.pending
    assert bus.broker.router.dropped["forged_answers"] == 0


def test_a_member_below_that_fails_fails_the_request_at_once() -> None:
    for kind in (Kind.REQUEST, Kind.REQUEST_ALL):
        bus, bs_ep, bs, [(ep, member)] = linked_pool()
        bus.bridge.handle(bs_ep, kind, "job", bs, None, 6, P.pack_payload([]))
        bus.pump()
        assert len(ep.take()) == 1
        bus.bridge.fail(ep, member, "bs", 6, "ValueError: the listener failed")
        bus.pump()
        frames = kinds(bs_ep)
        assert frames[-1][0] == "REQUEST_FAIL", frames
        if kind == Kind.REQUEST:
            assert frames[-1][1] == "ValueError: the listener failed"
        assert not bus.bridge.router.pending and not bus.broker.router.pending


def test_a_brokers_gathering_answered_below_leaves_no_forged_failure() -> None:
    bus, _, _, [(ep, member)] = linked_pool()
    src = bus.broker.endpoint("src")
    s = bus.broker.add_peer(src, "s")
    bus.broker.handle(src, Kind.REQUEST_ALL, "job", s, None, 7, P.pack_payload([]))
    bus.pump()
    assert len(ep.take()) == 1
    bus.bridge.respond(ep, member, "s", 7, "b0")
    bus.pump()
    assert kinds(src) == [("RESPONSE", [True, "b0"]),
                          ("REQUEST_FAIL", "every receiver has answered")]
    assert bus.broker.router.dropped["forged_answers"] == 0
    assert not bus.bridge.router.pending and not bus.broker.router.pending
