"""A federated broker's router, as pure code: what it tells its NATS link (this side's peers,
subscriptions, group memberships and services, never the link's own peers), and the link's
peers routed like a bridge's, except that a message that came over NATS is never balanced
among a group again (its origin broker chose the member). The in-memory bus and endpoints
are test_router.py's."""
from __future__ import annotations

from typing import Any

from ipcbus import _protocol as P
from ipcbus._protocol import Kind

from test_router import Bus, FakeEndpoint, bus, info

__all__ = ["bus"]  # the fixture, shared with test_router.py


def _joined(bus: Bus, fed: FakeEndpoint, peer: list[Any]) -> None:
    """A remote peer the link announces (the frames told to the link so far are taken)."""
    bus.handle(fed, Kind.PEER_ADD, sender=peer)
    assert fed.take()[-1].kind == Kind.RESPONSE


def test_the_link_is_told_of_this_side_only(bus: Bus) -> None:
    fed = bus.endpoint("federation", relay=True)
    bus.router.federation = fed
    e1 = bus.endpoint("e1")
    a = bus.add_peer(e1, "a")
    assert [(f.kind, f.sender) for f in fed.take()] == [(Kind.PEER_ADD, a)]
    bus.subscribe(e1, a, "ch")
    bus.subscribe(e1, a, "ch")  # a second reference: nothing new
    bus.handle(e1, Kind.SUBSCRIBE, "jobs", a, rid=1, body=P.pack_payload("pool"))
    bus.handle(e1, Kind.SERVICE_ADD, "clock", a, rid=7)
    told = fed.take()
    assert [(f.kind, f.channel) for f in told] == [
        (Kind.SUBSCRIBE, "ch"), (Kind.SUBSCRIBE, "jobs"), (Kind.SERVICE_ADD, "clock")]
    assert P.unpack_payload(told[1].body) == "pool"
    remote = info("r", "far")
    _joined(bus, fed, remote)
    bus.subscribe(fed, remote, "ch")  # the link's own peers are not told back to it
    assert fed.take() == []
    bus.handle(e1, Kind.PEER_REMOVE, sender=a)
    assert [(f.kind, f.sender_id) for f in fed.take()] == [(Kind.UNSUBSCRIBE, "a"),
                                                           (Kind.PEER_REMOVE, "a")]


def test_a_message_from_nats_is_not_balanced_again(bus: Bus) -> None:
    fed = bus.endpoint("federation", relay=True)
    bus.router.federation = fed
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    w1, w2 = bus.add_peer(e1, "w1"), bus.add_peer(e2, "w2")
    for ep, w in ((e1, w1), (e2, w2)):
        bus.handle(ep, Kind.SUBSCRIBE, "jobs", w, rid=1, body=P.pack_payload("pool"))
    remote = info("r", "boss")
    _joined(bus, fed, remote)
    fed.take()
    bus.handle(fed, Kind.SEND, "jobs", remote, body=P.pack_payload([1]))
    assert e1.take() == [] and e2.take() == []  # the origin chose (and sends GROUPED)
    sent = P.encode_frame(Kind.SEND, "jobs", remote, None, 0, P.pack_payload([2]))
    grouped = P.encode_frame(Kind.GROUPED, "jobs", None, "w2", 0,
                             P.pack_payload(["pool", sent]))
    bus.router.handle(fed, P.Frame(Kind.GROUPED, "jobs", None, "w2", 0, 0, grouped,
                                   len(grouped) - len(P.pack_payload(["pool", sent]))))
    assert [f.kind for f in e2.take()] == [Kind.GROUPED] and e1.take() == []
    # a local message is balanced here, among every member: local and remote
    remote_member = info("m", "far-worker")
    _joined(bus, fed, remote_member)
    bus.handle(fed, Kind.SUBSCRIBE, "jobs", remote_member, rid=1, body=P.pack_payload("pool"))
    for i in range(6):
        bus.handle(e1, Kind.SEND, "jobs", w1, body=P.pack_payload([i]))
    counts = [len(e1.take()), len(e2.take()), len(fed.take())]
    assert sum(counts) == 6 and all(counts), counts
