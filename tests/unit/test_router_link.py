"""A bridge's router linked to a broker, as pure code: the upstream route of broadcasts,
peer-to-peer messages and requests, and joining through the link (the broker accepts an id
first). The in-memory bus and endpoints are test_router.py's."""
from __future__ import annotations

import pytest

from ipcbus import _protocol as P
from ipcbus._protocol import Kind
from ipcbus.errors import IpcBusProtocolError

from test_router import Bus, FakeEndpoint, bus, expect_fail, info

__all__ = ["bus"]  # the fixture, shared with test_router.py

# ---------------------------------------------------------------------------------------------
# upstream (a bridge linked to a broker)
# ---------------------------------------------------------------------------------------------

def test_upstream_routing() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")

    # PEER_ADD of a local peer: answered locally and announced upstream
    a = bus.add_peer(e1, "a")
    frames = up.take()
    assert [(f.kind, f.sender) for f in frames] == [(Kind.PEER_ADD, a)]
    b = bus.add_peer(e2, "b")
    assert [(f.kind, f.sender) for f in up.take()] == [(Kind.PEER_ADD, b)]

    # SUBSCRIBE of local peers: forwarded upstream on the first reference only
    bus.subscribe(e1, a, "ch")
    frames = up.take()
    assert [(f.kind, f.channel, f.sender_id) for f in frames] == [(Kind.SUBSCRIBE, "ch", "a")]
    bus.subscribe(e1, a, "ch")
    assert up.take() == []
    bus.subscribe(e2, b, "ch")
    assert [(f.kind, f.channel, f.sender_id) for f in up.take()] == [(Kind.SUBSCRIBE, "ch", "b")]

    # a local SEND: local subscribers (sender's own endpoint included) and upstream, once each
    sent = bus.handle(e1, Kind.SEND, "ch", a, body=P.pack_payload(["m1"]))
    assert e1.take_raw() == [bytes(sent.raw)]
    assert e2.take_raw() == [bytes(sent.raw)]
    assert up.take_raw() == [bytes(sent.raw)]
    # a SEND with no local subscriber still goes upstream
    sent = bus.handle(e1, Kind.SEND, "remote-only", a)
    assert up.take_raw() == [bytes(sent.raw)]
    assert e1.take_raw() == [] and e2.take_raw() == []

    # a SEND coming from upstream: local subscribers, never back upstream
    remote = info("r", "remote")
    sent = bus.handle(up, Kind.SEND, "ch", remote)
    assert e1.take_raw() == [bytes(sent.raw)]
    assert e2.take_raw() == [bytes(sent.raw)]
    assert up.take_raw() == []

    # a REQUEST with no local listener goes upstream instead of failing
    req = bus.request(e1, a, "far", 1)
    assert up.take_raw() == [bytes(req.raw)]
    assert e1.take_raw() == []
    assert ("a", 1) in bus.router.pending
    # ... and a REQUEST_FAIL from upstream (no sender: the broker speaks) fails it
    bus.fail(up, None, "a", 1, "no listener for 'far' on the bus")
    assert expect_fail(e1, "a", 1) == "no listener for 'far' on the bus"
    assert not bus.router.pending

    # a REQUEST with a local listener goes to it and upstream; an answer from upstream wins
    req = bus.request(e1, a, "ch", 2)
    assert e1.take_raw() == [bytes(req.raw)]
    assert e2.take_raw() == [bytes(req.raw)]
    assert up.take_raw() == [bytes(req.raw)]
    resp = bus.respond(up, remote, "a", 2, "from far")
    assert e1.take_raw() == [bytes(resp.raw)]
    assert not bus.router.pending
    # the local answer that comes later is dropped
    bus.respond(e2, b, "a", 2)
    assert e1.delivered == e2.delivered == up.delivered == []

    # UNSUBSCRIBE and PEER_REMOVE of local peers are forwarded upstream
    bus.unsubscribe(e2, b, "ch", 0)
    assert [(f.kind, f.channel, f.sender_id) for f in up.take()] == \
        [(Kind.UNSUBSCRIBE, "ch", "b")]
    bus.handle(e2, Kind.PEER_REMOVE, sender=b)
    assert [(f.kind, f.sender_id) for f in up.take()] == [(Kind.PEER_REMOVE, "b")]


def test_upstream_fail_only_when_every_side_failed() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    for ep in (e1, e2, up):
        ep.delivered.clear()
    bus.request(e1, a, "ch", 1)
    bus.fail(up, None, "a", 1)
    assert e1.take() == []  # b may still answer
    bus.fail(e2, b, "a", 1, "b gave up")
    assert expect_fail(e1, "a", 1) == "b gave up"
    # and the link closing fails a request that only upstream could answer
    bus.request(e1, a, "far", 2)
    bus.router.remove_endpoint(up)
    assert bus.router.upstream is None
    expect_fail(e1, "a", 2)
    assert not bus.router.pending


def test_upstream_peers_and_send_to() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    up.delivered.clear()
    # a SEND_TO a peer this router does not know goes upstream, no NOTICE
    sent = bus.handle(e1, Kind.SEND_TO, "ch", a, "elsewhere")
    assert up.take_raw() == [bytes(sent.raw)]
    assert e1.take_raw() == []
    # a remote peer announced by upstream gets no answer and no echo
    r = info("r")
    bus.handle(up, Kind.PEER_ADD, sender=r, rid=0)
    assert up.take_raw() == [] and e1.take_raw() == []
    assert bus.router.peers["r"].endpoint is up
    # a SEND_TO from upstream to a local peer reaches it
    sent = bus.handle(up, Kind.SEND_TO, "ch", r, "a")
    assert e1.take_raw() == [bytes(sent.raw)]
    # special channels go upstream when linked (the broker knows the whole bus)
    req = bus.request(e1, a, P.QUERY_STATE_CHANNEL, 9)
    assert up.take_raw() == [bytes(req.raw)]
    assert e1.take_raw() == []


def test_upstream_request_to_an_unknown_peer_goes_upstream() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    up.delivered.clear()
    req = bus.request(e1, a, "ch", 1, target="elsewhere")
    assert up.take_raw() == [bytes(req.raw)]
    assert e1.take_raw() == []
    assert ("a", 1) in bus.router.pending
    resp = bus.respond(up, info("elsewhere"), "a", 1)
    assert e1.take_raw() == [bytes(resp.raw)]
    assert not bus.router.pending
    # a request_to from upstream for a peer unknown here fails back upstream, not in a loop
    bus.request(up, info("r"), "ch", 2, target="ghost")
    expect_fail(up, "r", 2)
    assert not bus.router.pending


def test_upstream_with_a_remote_subscriber_gets_a_broadcast_once() -> None:
    """Once per endpoint holds for the upstream too, when it has announced a subscribed peer."""
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    r = info("r")
    bus.handle(up, Kind.PEER_ADD, sender=r, rid=0)
    bus.handle(up, Kind.SUBSCRIBE, "ch", r, rid=1)
    up.delivered.clear()
    assert bus.router.channel_endpoints == {"ch": {up: 1}}
    sent = bus.handle(e1, Kind.SEND, "ch", a)
    assert up.take_raw() == [bytes(sent.raw)]


# ---------------------------------------------------------------------------------------------
# joining through a linked bridge: the broker accepts the id first
# ---------------------------------------------------------------------------------------------

def _linked(bus: Bus) -> FakeEndpoint:
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    return up


def test_a_join_waits_for_the_broker_and_frames_before_it_are_refused(bus: Bus) -> None:
    up = _linked(bus)
    e1 = bus.endpoint("e1", ptype="pipe", pid=7)
    bus.handle(e1, Kind.PEER_ADD, sender=info("p", "child", "main", 1), rid=3)
    assert e1.take() == []  # not answered yet
    asked = up.take()
    assert [(f.kind, f.sender, f.rid) for f in asked] == [(Kind.PEER_ADD, ["p", "child", "pipe", 7],
                                                           3)]
    with pytest.raises(IpcBusProtocolError, match="not a peer of this connection"):
        bus.handle(e1, Kind.SUBSCRIBE, "ch", ["p", "child", "pipe", 7], rid=1)
    # a second join of the same id meanwhile is refused at once
    e2 = bus.endpoint("e2")
    bus.handle(e2, Kind.PEER_ADD, sender=info("p"), rid=9)
    assert "taken" in expect_fail(e2, "p", 9)


def test_a_join_refused_by_the_broker_is_refused_here(bus: Bus) -> None:
    up = _linked(bus)
    e1 = bus.endpoint("e1")
    bus.handle(e1, Kind.PEER_ADD, sender=info("p"), rid=3)
    up.take()
    bus.fail(up, None, "p", 3, "peer id 'p' is taken")
    assert expect_fail(e1, "p", 3) == "peer id 'p' is taken"
    assert "p" not in bus.router.peers and bus.router.joining == {}


def test_a_joiner_that_leaves_before_the_answer_gives_the_id_back(bus: Bus) -> None:
    up = _linked(bus)
    e1 = bus.endpoint("e1")
    bus.handle(e1, Kind.PEER_ADD, sender=info("p"), rid=3)
    asked = up.take()[0]
    bus.router.remove_endpoint(e1)
    bus.handle(up, Kind.RESPONSE, target="p", rid=3, body=P.pack_payload([True, None]))
    assert [(f.kind, f.sender) for f in up.take()] == [(Kind.PEER_REMOVE, asked.sender)]
    assert e1.take() == [] and "p" not in bus.router.peers


def test_joins_in_flight_fail_when_the_link_closes(bus: Bus) -> None:
    up = _linked(bus)
    e1 = bus.endpoint("e1")
    bus.handle(e1, Kind.PEER_ADD, sender=info("p"), rid=3)
    bus.router.remove_endpoint(up)
    assert "link to the broker has closed" in expect_fail(e1, "p", 3)
    # with no link any more, the same id joins at once
    assert bus.add_peer(e1, "p")[0] == "p"


def test_a_frame_over_a_links_limit_fails_the_request_or_tells_the_sender(bus: Bus) -> None:
    link = bus.endpoint("link", relay=True)
    far = bus.add_peer(link, "far", type_="pipe")
    bus.subscribe(link, far, "ch")
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    req = bus.request(e1, a, "ch", 4)
    link.take()
    bus.router.undeliverable(link, req.raw, "over the limit of the link")
    assert expect_fail(e1, "a", 4) == "over the limit of the link"
    sent = bus.handle(e1, Kind.SEND, "ch", a, body=P.pack_payload([1]))
    bus.router.undeliverable(link, sent.raw, "over the limit of the link")
    notice = e1.take()
    assert [(f.kind, f.target) for f in notice] == [(Kind.NOTICE, "a")]
    assert bus.router.state()["dropped"]["over_link_limit"] == 2
