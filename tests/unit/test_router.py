"""The Router as pure code: in-memory endpoints, frames in, delivered frames out.

Each endpoint records what the router hands it; the tests decode those bytes with a
FrameDecoder and assert on kinds, targets, request ids and bodies. This module holds the
in-memory bus and tests peers, subscriptions, messages, services and posts; requests are
test_router_requests.py's, a bridge's link test_router_link.py's, trust test_router_trust.py's.
"""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Frame, Kind
from ipcbus._router import RateLimitedLog, Router
from ipcbus.errors import IpcBusProtocolError


class FakeEndpoint:
    """A connection that records the frames the router delivers to it (hashable by identity)."""

    def __init__(self, label: str, relay: bool = False, can_pass_fds: bool = True,
                 ptype: str = "socket", pid: int = 1000) -> None:
        self.label = label
        self.relay = relay
        self.ptype = ptype
        self.pid = pid
        self.can_pass_fds = can_pass_fds
        self.peers: dict[str, Any] = {}
        self.delivered: list[tuple[bytes, list[int]]] = []

    def deliver(self, raw: bytes | bytearray, fds: list[int], count: int = 1) -> None:
        self.delivered.append((bytes(raw), list(fds)))

    def take_raw(self) -> list[bytes]:
        raws = [raw for raw, _ in self.delivered]
        self.delivered.clear()
        return raws

    def take(self) -> list[Frame]:
        """Decode and clear everything delivered so far."""
        dec = FrameDecoder()
        for raw, _ in self.delivered:
            dec.feed(raw)
        self.delivered.clear()
        assert dec.pending_bytes == 0
        return dec.frames()

    def __repr__(self) -> str:
        return f"<FakeEndpoint {self.label}>"


def info(peer_id: str, name: str | None = None, type_: str = "socket", pid: int = 1000
         ) -> list[Any]:
    return [peer_id, name or f"name-{peer_id}", type_, pid]


def mkframe(kind: int, channel: str = "", sender: list[Any] | None = None,
            target: str | None = None, rid: int = 0, body: bytes = b"") -> Frame:
    dec = FrameDecoder()
    dec.feed(P.encode_frame(kind, channel, sender, target, rid, body))
    frames = dec.frames()
    assert len(frames) == 1
    return frames[0]


def body_of(frame: Frame) -> Any:
    return P.unpack_payload(frame.body)


class Bus:
    """A router with helpers to drive it as connected clients would."""

    def __init__(self, pid: int = 4242) -> None:
        self.router = Router(pid)
        self._rid = 100

    def endpoint(self, label: str, relay: bool = False, can_pass_fds: bool = True,
                 ptype: str = "socket", pid: int = 1000) -> FakeEndpoint:
        return FakeEndpoint(label, relay, can_pass_fds, ptype, pid)

    def handle(self, ep: FakeEndpoint, kind: int, channel: str = "",
               sender: list[Any] | None = None, target: str | None = None, rid: int = 0,
               body: bytes = b"") -> Frame:
        frame = mkframe(kind, channel, sender, target, rid, body)
        self.router.handle(ep, frame)
        return frame

    def add_peer(self, ep: FakeEndpoint, peer_id: str, **kw: Any) -> list[Any]:
        peer = info(peer_id, **kw)
        self._rid += 1
        self.handle(ep, Kind.PEER_ADD, sender=peer, rid=self._rid)
        up = self.router.upstream
        if up is not None and ep is not up:  # the broker accepts the id: then it is answered
            assert ep.take() == [] and isinstance(up, FakeEndpoint)
            self.handle(up, Kind.RESPONSE, target=peer_id, rid=self._rid,
                        body=P.pack_payload([True, {"pid": 1, "peer": peer}]))
        frames = ep.take()
        assert len(frames) == 1 and frames[0].kind == Kind.RESPONSE, frames
        answer = body_of(frames[0])[1]
        if isinstance(answer, dict):  # the peer as the router recorded it
            assert answer["peer"][:2] == peer[:2]
            return list(answer["peer"])
        return peer

    def subscribe(self, ep: FakeEndpoint, peer: list[Any], channel: str, count: int = 1) -> None:
        self.handle(ep, Kind.SUBSCRIBE, channel, peer, rid=count)

    def unsubscribe(self, ep: FakeEndpoint, peer: list[Any], channel: str, count: int = 1
                    ) -> None:
        self.handle(ep, Kind.UNSUBSCRIBE, channel, peer, rid=count)

    def request(self, ep: FakeEndpoint, peer: list[Any], channel: str, rid: int,
                target: str | None = None, body: Any = None) -> Frame:
        return self.handle(ep, Kind.REQUEST, channel, peer, target, rid,
                           P.pack_payload([] if body is None else body))

    def respond(self, ep: FakeEndpoint, peer: list[Any], requester: str, rid: int,
                payload: Any = "ok") -> Frame:
        return self.handle(ep, Kind.RESPONSE, "", peer, requester, rid,
                           P.pack_payload([True, payload]))

    def fail(self, ep: FakeEndpoint, peer: list[Any] | None, requester: str, rid: int,
             reason: str = "no listener here") -> Frame:
        return self.handle(ep, Kind.REQUEST_FAIL, "", peer, requester, rid,
                           P.pack_payload(reason))


def assert_clean(router: Router) -> None:
    assert router.peers == {}
    assert router.subscribers == {}
    assert router.channel_endpoints == {}
    assert not router.pending
    assert router.state()["pending_requests"] == 0


def assert_consistent(router: Router) -> None:
    """subscribers and channel_endpoints describe the same subscriptions."""
    for channel, subs in router.subscribers.items():
        assert subs, f"empty subscriber map left for {channel!r}"
        assert all(count > 0 for count in subs.values())
        expected: dict[Any, int] = {}
        for peer_id, count in subs.items():
            peer = router.peers[peer_id]
            assert peer.channels[channel] == count
            expected[peer.endpoint] = expected.get(peer.endpoint, 0) + 1
        assert router.channel_endpoints.get(channel) == expected
    assert set(router.channel_endpoints) == set(router.subscribers)
    for peer in router.peers.values():
        for channel, count in peer.channels.items():
            assert router.subscribers[channel][peer.id] == count


def expect_fail(ep: FakeEndpoint, requester: str, rid: int) -> str:
    frames = ep.take()
    assert len(frames) == 1, frames
    f = frames[0]
    assert (f.kind, f.target, f.rid) == (Kind.REQUEST_FAIL, requester, rid)
    reason = body_of(f)
    assert isinstance(reason, str) and reason
    return reason


@pytest.fixture
def bus() -> Bus:
    return Bus()


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------

def test_peer_add_answered_with_response(bus: Bus) -> None:
    ep = bus.endpoint("e1")
    peer = info("p1", "worker", "pipe", 77)
    bus.handle(ep, Kind.PEER_ADD, sender=peer, rid=5)
    frames = ep.take()
    assert len(frames) == 1
    resp = frames[0]
    assert resp.kind == Kind.RESPONSE
    assert resp.target == "p1"
    assert resp.rid == 5
    assert resp.sender is None  # made by the router
    assert body_of(resp) == [True, {"pid": bus.router.pid,
                                    "peer": ["p1", "worker", "socket", 1000]}]
    assert "p1" in bus.router.peers and "p1" in ep.peers
    p = bus.router.peers["p1"]
    # the endpoint's type and pid, not the frame's word (SPEC "Trust")
    assert (p.id, p.name, p.type, p.pid, p.endpoint) == ("p1", "worker", "socket", 1000, ep)


def test_duplicate_peer_id_refused(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    bus.add_peer(e1, "dup")
    bus.handle(e2, Kind.PEER_ADD, sender=info("dup", "other"), rid=9)
    frames = e2.take()
    assert len(frames) == 1
    assert frames[0].kind == Kind.REQUEST_FAIL
    assert frames[0].target == "dup" and frames[0].rid == 9
    assert isinstance(body_of(frames[0]), str)
    assert e2.peers == {}
    assert bus.router.peers["dup"].endpoint is e1
    assert bus.router.peers["dup"].name == "name-dup"
    assert e1.take() == []
    # also refused on the same connection
    bus.handle(e1, Kind.PEER_ADD, sender=info("dup"), rid=10)
    frames = e1.take()
    assert [(f.kind, f.rid) for f in frames] == [(Kind.REQUEST_FAIL, 10)]


def test_peer_add_without_sender_is_a_protocol_error(bus: Bus) -> None:
    with pytest.raises(IpcBusProtocolError):
        bus.handle(bus.endpoint("e"), Kind.PEER_ADD, rid=1)


@pytest.mark.parametrize("kind", [Kind.PEER_REMOVE, Kind.SUBSCRIBE, Kind.UNSUBSCRIBE, Kind.SEND,
                                  Kind.SEND_TO, Kind.REQUEST, Kind.RESPONSE, Kind.REQUEST_FAIL,
                                  Kind.CANCEL, Kind.NOTICE])
def test_frame_from_a_non_peer_of_the_endpoint_is_a_protocol_error(bus: Bus, kind: Kind) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    bus.subscribe(e1, a, "ch")
    # a peer of another connection
    with pytest.raises(IpcBusProtocolError):
        bus.handle(e2, kind, "ch", a, "a", 1)
    # a peer nobody knows
    with pytest.raises(IpcBusProtocolError):
        bus.handle(e2, kind, "ch", info("ghost"), "a", 1)
    # no sender at all, from an ordinary (non-relay) connection
    with pytest.raises(IpcBusProtocolError):
        bus.handle(e2, kind, "ch", None, "a", 1)
    assert e1.take() == [] and e2.take() == []
    assert not bus.router.pending
    assert bus.router.subscribers == {"ch": {"a": 1}}


@pytest.mark.parametrize("kind", [Kind.HELLO, Kind.WELCOME])
def test_handshake_kinds_are_protocol_errors_after_the_handshake(bus: Bus, kind: Kind) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    with pytest.raises(IpcBusProtocolError):
        bus.handle(ep, kind, "", a)


def test_peer_remove(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    b = bus.add_peer(ep, "b")
    bus.subscribe(ep, a, "ch")
    bus.subscribe(ep, b, "ch")
    bus.handle(ep, Kind.PEER_REMOVE, sender=a)
    assert "a" not in bus.router.peers and "a" not in ep.peers
    assert bus.router.subscribers == {"ch": {"b": 1}}
    assert bus.router.channel_endpoints == {"ch": {ep: 1}}
    assert_consistent(bus.router)
    # the id is free again
    bus.add_peer(bus.endpoint("e2"), "a")


# ---------------------------------------------------------------------------------------------
# subscriptions
# ---------------------------------------------------------------------------------------------

def test_subscribe_reference_counts(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    s = bus.add_peer(e2, "s")
    bus.subscribe(e1, a, "ch")
    bus.subscribe(e1, a, "ch")
    assert bus.router.subscribers == {"ch": {"a": 2}}
    assert bus.router.channel_endpoints == {"ch": {e1: 1}}
    bus.unsubscribe(e1, a, "ch", 1)
    assert bus.router.subscribers == {"ch": {"a": 1}}
    sent = bus.handle(e2, Kind.SEND, "ch", s, body=P.pack_payload([1]))
    assert e1.take_raw() == [bytes(sent.raw)]  # still subscribed
    bus.unsubscribe(e1, a, "ch", 1)
    assert bus.router.subscribers == {} and bus.router.channel_endpoints == {}
    bus.handle(e2, Kind.SEND, "ch", s, body=P.pack_payload([2]))
    assert e1.take_raw() == [] and e2.take_raw() == []
    # unsubscribing more than subscribed is harmless
    bus.unsubscribe(e1, a, "ch", 5)
    assert_consistent(bus.router)


def test_subscribe_count_in_rid(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    bus.subscribe(ep, a, "ch", 3)
    assert bus.router.subscribers == {"ch": {"a": 3}}
    bus.unsubscribe(ep, a, "ch", 2)
    assert bus.router.subscribers == {"ch": {"a": 1}}
    bus.subscribe(ep, a, "ch", 0)  # 0 counts as one
    assert bus.router.subscribers == {"ch": {"a": 2}}


def test_unsubscribe_rid_zero_removes_all(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    b = bus.add_peer(ep, "b")
    for _ in range(3):
        bus.subscribe(ep, a, "ch")
    bus.subscribe(ep, b, "ch")
    bus.unsubscribe(ep, a, "ch", 0)
    assert bus.router.subscribers == {"ch": {"b": 1}}
    assert bus.router.channel_endpoints == {"ch": {ep: 1}}
    assert bus.router.peers["a"].channels == {}
    bus.unsubscribe(ep, b, "ch", 0)
    assert bus.router.subscribers == {} and bus.router.channel_endpoints == {}


def test_subscribe_without_channel_is_a_protocol_error(bus: Bus) -> None:
    ep = bus.endpoint("e")
    a = bus.add_peer(ep, "a")
    with pytest.raises(IpcBusProtocolError):
        bus.subscribe(ep, a, "")


_ops = st.lists(st.tuples(st.sampled_from(["sub", "unsub", "unsub_all", "remove_peer",
                                           "remove_ep"]),
                          st.integers(0, 2), st.integers(0, 2), st.sampled_from(["x", "y", "z"]),
                          st.integers(0, 3)),
                max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_subscription_bookkeeping_random_operations(ops: list[tuple[str, int, int, str, int]]
                                                    ) -> None:
    """Any sequence of subscribe/unsubscribe/leave keeps the maps consistent, and a broadcast
    reaches exactly the endpoints that have a subscribed peer, once each."""
    bus = Bus()
    eps = [bus.endpoint(f"e{i}") for i in range(3)]
    peers: dict[tuple[int, int], list[Any]] = {}
    model: dict[tuple[int, int], dict[str, int]] = {}

    def peer(e: int, p: int) -> list[Any]:
        key = (e, p)
        if key not in peers:
            peers[key] = bus.add_peer(eps[e], f"p{e}{p}")
            model[key] = {}
        return peers[key]

    for op, e, p, channel, count in ops:
        if op == "sub":
            bus.subscribe(eps[e], peer(e, p), channel, count)
            model[(e, p)][channel] = model[(e, p)].get(channel, 0) + max(count, 1)
        elif op in ("unsub", "unsub_all"):
            c = 0 if op == "unsub_all" else max(count, 1)
            bus.unsubscribe(eps[e], peer(e, p), channel, c)
            left = 0 if c == 0 else max(model[(e, p)].get(channel, 0) - c, 0)
            if left:
                model[(e, p)][channel] = left
            else:
                model[(e, p)].pop(channel, None)
        elif op == "remove_peer":
            if (e, p) in peers:
                bus.handle(eps[e], Kind.PEER_REMOVE, sender=peers.pop((e, p)))
                model.pop((e, p))
        else:
            bus.router.remove_endpoint(eps[e])
            for key in [k for k in peers if k[0] == e]:
                peers.pop(key)
                model.pop(key)
        assert_consistent(bus.router)
        expected_subs: dict[str, dict[str, int]] = {}
        for (me, mp), chans in model.items():
            for ch, n in chans.items():
                expected_subs.setdefault(ch, {})[f"p{me}{mp}"] = n
        assert bus.router.subscribers == expected_subs
    # a broadcast from an outside peer reaches each endpoint with a subscriber once
    out = bus.endpoint("out")
    o = bus.add_peer(out, "outsider")
    for ep in eps:
        ep.delivered.clear()
    for channel in ("x", "y", "z"):
        sent = bus.handle(out, Kind.SEND, channel, o)
        for i, ep in enumerate(eps):
            expected = 1 if any(channel in chans for (me, _), chans in model.items()
                                if me == i) else 0
            assert ep.take_raw() == [bytes(sent.raw)] * expected
    for ep in eps + [out]:
        bus.router.remove_endpoint(ep)
    assert_clean(bus.router)


# ---------------------------------------------------------------------------------------------
# broadcast and peer-to-peer
# ---------------------------------------------------------------------------------------------

def test_broadcast_once_per_endpoint(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a1, a2 = bus.add_peer(e1, "a1"), bus.add_peer(e1, "a2")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    for peer, ep in ((a1, e1), (a2, e1), (b, e2)):
        bus.subscribe(ep, peer, "news")
    sent = bus.handle(e3, Kind.SEND, "news", c, body=P.pack_payload(["hello", 1]))
    assert e1.take_raw() == [bytes(sent.raw)]  # two subscribed peers, one delivery
    assert e2.take_raw() == [bytes(sent.raw)]
    assert e3.take_raw() == []  # c is not subscribed
    # other channels do not leak
    bus.handle(e3, Kind.SEND, "other", c)
    assert e1.take_raw() == e2.take_raw() == e3.take_raw() == []


def test_broadcast_echoed_to_the_senders_own_endpoint(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e1, a, "ch")
    sent = bus.handle(e1, Kind.SEND, "ch", a)
    assert e1.take_raw() == [bytes(sent.raw)]
    assert e2.take_raw() == []
    # a peer of the same process that listens gets what a non-listening sibling sends
    a2 = bus.add_peer(e1, "a2")
    sent = bus.handle(e1, Kind.SEND, "ch", a2)
    assert e1.take_raw() == [bytes(sent.raw)]
    # and one delivery even when both sender and receiver of that endpoint listen
    bus.subscribe(e1, a2, "ch")
    bus.subscribe(e2, b, "ch")
    sent = bus.handle(e1, Kind.SEND, "ch", a)
    assert e1.take_raw() == [bytes(sent.raw)]
    assert e2.take_raw() == [bytes(sent.raw)]


def test_broadcast_not_echoed_to_the_relay_it_came_from(bus: Bus) -> None:
    relay = bus.endpoint("link", relay=True)
    local = bus.endpoint("local")
    r = bus.add_peer(relay, "r")
    r2 = bus.add_peer(relay, "r2")
    x = bus.add_peer(local, "x")
    bus.subscribe(relay, r, "ch")
    bus.subscribe(local, x, "ch")
    sent = bus.handle(relay, Kind.SEND, "ch", r2)
    assert local.take_raw() == [bytes(sent.raw)]
    assert relay.take_raw() == []  # the relay served its own side already
    # but a broadcast from elsewhere does reach the relay
    sent = bus.handle(local, Kind.SEND, "ch", x)
    assert relay.take_raw() == [bytes(sent.raw)]
    assert local.take_raw() == [bytes(sent.raw)]


def test_send_without_subscribers_delivers_nothing(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "something-else")
    bus.handle(e1, Kind.SEND, "nobody", a, body=P.pack_payload([1]))
    assert e1.delivered == [] and e2.delivered == []


def test_send_forwards_fds(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    bus.subscribe(e2, b, "ch")
    frame = mkframe(Kind.SEND, "ch", a)
    frame.nfds, frame.fds = 2, [11, 12]
    bus.router.handle(e1, frame)
    assert e2.delivered == [(bytes(frame.raw), [11, 12])]


def test_send_to_known_peer(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a = bus.add_peer(e1, "a")
    b = bus.add_peer(e2, "b")
    c = bus.add_peer(e3, "c")
    bus.subscribe(e3, c, "ch")  # a listener elsewhere does not get peer-to-peer frames
    sent = bus.handle(e1, Kind.SEND_TO, "ch", a, "b", body=P.pack_payload(["direct"]))
    assert e2.take_raw() == [bytes(sent.raw)]
    assert e1.take_raw() == [] and e3.take_raw() == []
    # to oneself: back to one's own endpoint
    sent = bus.handle(e2, Kind.SEND_TO, "ch", b, "b")
    assert e2.take_raw() == [bytes(sent.raw)]


def test_send_to_unknown_peer_notice(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a = bus.add_peer(e1, "a")
    bus.add_peer(e2, "b")
    bus.handle(e1, Kind.SEND_TO, "ch", a, "nobody")
    frames = e1.take()
    assert len(frames) == 1
    notice = frames[0]
    assert notice.kind == Kind.NOTICE
    assert notice.target == "a"
    body = body_of(notice)
    assert isinstance(body, dict) and "nobody" in body["error"]
    assert e2.take() == []


# ---------------------------------------------------------------------------------------------
# remove_endpoint
# ---------------------------------------------------------------------------------------------

def test_remove_endpoint_cleans_everything(bus: Bus) -> None:
    eps = [bus.endpoint(f"e{i}") for i in range(3)]
    peers = [[bus.add_peer(ep, f"p{i}{j}") for j in range(2)] for i, ep in enumerate(eps)]
    for i, ep in enumerate(eps):
        for j, peer in enumerate(peers[i]):
            for ch in ("x", "y", f"only{i}"):
                bus.subscribe(ep, peer, ch, j + 1)
    # requests in every direction, some answered
    rid = 0
    for i, ep in enumerate(eps):
        for peer in peers[i]:
            rid += 1
            bus.request(ep, peer, "x", rid)
    bus.respond(eps[1], peers[1][0], "p00", 1)
    assert_consistent(bus.router)
    assert len(bus.router.pending) == 5

    bus.router.remove_endpoint(eps[0])
    assert_consistent(bus.router)
    assert "only0" not in bus.router.subscribers
    assert "only0" not in bus.router.channel_endpoints
    assert all(eps[0] not in m for m in bus.router.channel_endpoints.values())
    assert all(key[0] not in ("p00", "p01") for key in bus.router.pending)
    assert all(not ({"p00", "p01"} & bus.router.pending.receivers(key))
               for key in bus.router.pending)
    assert eps[0].peers == {}

    bus.router.remove_endpoint(eps[1])
    bus.router.remove_endpoint(eps[2])
    assert_clean(bus.router)
    assert bus.router.state()["channels"] == {}
    assert bus.router.state()["peers"] == []
    # removing twice is harmless
    bus.router.remove_endpoint(eps[0])
    assert_clean(bus.router)


# ---------------------------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------------------------

def service_available(bus: Bus, ep: FakeEndpoint, peer: list[Any], name: str, rid: int) -> bool:
    bus.request(ep, peer, P.SERVICE_AVAILABLE_CHANNEL, rid, body=[name])
    frames = ep.take()
    assert len(frames) == 1 and frames[0].kind == Kind.RESPONSE and frames[0].rid == rid
    ok, value = body_of(frames[0])
    assert ok is True
    return bool(value)


def test_service_registry(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    host = bus.add_peer(e1, "host")
    other = bus.add_peer(e2, "other")
    watcher = bus.add_peer(e3, "watcher")
    bus.subscribe(e3, watcher, P.service_event_channel("clock"))
    assert not service_available(bus, e3, watcher, "clock", 1)
    bus.handle(e1, Kind.SERVICE_ADD, "clock", host, None, 2)
    frames = e1.take()
    assert [(f.kind, f.target, f.rid) for f in frames] == [(Kind.RESPONSE, "host", 2)]
    assert service_available(bus, e3, watcher, "clock", 3)
    assert bus.router.state()["services"] == {"clock": "host"}
    # a second host of the same name is refused
    bus.handle(e2, Kind.SERVICE_ADD, "clock", other, None, 4)
    expect_fail(e2, "other", 4)
    assert bus.router.services == {"clock": "host"}
    # only the host can remove it
    bus.handle(e2, Kind.SERVICE_REMOVE, "clock", other)
    assert bus.router.services == {"clock": "host"}
    bus.handle(e1, Kind.SERVICE_REMOVE, "clock", host)
    assert bus.router.services == {}
    # the router tells the proxies (the host no longer may: the name is free)
    stopped = e3.take()
    assert [(f.kind, f.channel, f.sender) for f in stopped] == \
        [(Kind.SEND, P.service_event_channel("clock"), None)]
    assert body_of(stopped[0]) == ["stop", "service 'clock' was stopped by its host"]
    assert not service_available(bus, e3, watcher, "clock", 5)
    # the host leaving without stopping: the router broadcasts ["stop", reason] itself
    bus.handle(e1, Kind.SERVICE_ADD, "clock", host, None, 6)
    e1.take()
    bus.router.remove_endpoint(e1)
    assert bus.router.services == {}
    frames = e3.take()
    assert len(frames) == 1
    stop = frames[0]
    assert (stop.kind, stop.channel, stop.sender) == (Kind.SEND, P.service_event_channel("clock"),
                                                      None)
    kind, reason = body_of(stop)
    assert kind == "stop" and isinstance(reason, str)
    assert e2.take() == []


def test_service_add_with_upstream_is_asked_of_the_broker() -> None:
    bus = Bus()
    up = bus.endpoint("upstream", relay=True)
    bus.router.upstream = up
    e1 = bus.endpoint("e1")
    host = bus.add_peer(e1, "host")
    up.delivered.clear()
    add = bus.handle(e1, Kind.SERVICE_ADD, "clock", host, None, 7)
    assert up.take_raw() == [bytes(add.raw)]
    assert e1.take_raw() == []
    resp = bus.handle(up, Kind.RESPONSE, "", None, "host", 7, P.pack_payload([True, None]))
    assert e1.take_raw() == [bytes(resp.raw)]
    assert not bus.router.pending
    rm = bus.handle(e1, Kind.SERVICE_REMOVE, "clock", host)
    assert up.take_raw() == [bytes(rm.raw)]


# ---------------------------------------------------------------------------------------------
# frames carrying descriptors: all or nothing
# ---------------------------------------------------------------------------------------------

def post(bus: Bus, ep: FakeEndpoint, kind: int, channel: str, sender: list[Any],
         target: str | None, rid: int, fds: list[int]) -> Frame:
    dec = FrameDecoder()
    dec.feed(P.encode_frame(kind, channel, sender, target, rid, P.pack_payload([[], ["fd"]]),
                            len(fds)))
    frame = dec.frames()[0]
    frame.fds = list(fds)
    bus.router.handle(ep, frame)
    return frame


def test_post_reaches_every_capable_endpoint_and_answers_the_count(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a = bus.add_peer(e1, "a")
    for ep, pid in ((e2, "b"), (e3, "c")):
        bus.subscribe(ep, bus.add_peer(ep, pid), "ports")
    frame = post(bus, e1, Kind.SEND, "ports", a, None, 3, [10, 11])
    assert e2.delivered == [(bytes(frame.raw), [10, 11])]
    assert e3.delivered == [(bytes(frame.raw), [10, 11])]
    frames = e1.take()
    assert [(f.kind, f.target, f.rid) for f in frames] == [(Kind.RESPONSE, "a", 3)]
    assert body_of(frames[0]) == [True, 2]


def test_post_to_an_endpoint_that_cannot_pass_fds_sends_nothing(bus: Bus) -> None:
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    tcp = bus.endpoint("tcp", can_pass_fds=False)
    a = bus.add_peer(e1, "a")
    bus.subscribe(e2, bus.add_peer(e2, "b"), "ports")
    bus.subscribe(tcp, bus.add_peer(tcp, "t"), "ports")
    post(bus, e1, Kind.SEND, "ports", a, None, 4, [10])
    assert e2.delivered == [] and tcp.delivered == []
    expect_fail(e1, "a", 4)
    post(bus, e1, Kind.SEND_TO, "ports", a, "t", 5, [10])
    assert tcp.delivered == []
    expect_fail(e1, "a", 5)
    # peer-to-peer to an unknown peer with an answer asked: REQUEST_FAIL, not a NOTICE
    post(bus, e1, Kind.SEND_TO, "ports", a, "ghost", 6, [10])
    expect_fail(e1, "a", 6)
    assert not bus.router.pending


def test_peer_provoked_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warn = RateLimitedLog(lambda: now[0], interval=10.0)
    with caplog.at_level("WARNING", logger="ipcbus"):
        assert warn.warning("k", "first %d", 1)
        assert not any(warn.warning("k", "again %d", i) for i in range(50))
        assert warn.warning("other", "another kind")  # keys are separate
        now[0] = 10.0
        assert warn.warning("k", "later")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["first 1", "another kind",
                        "later (and 50 more like it in the last 10 s)"]
