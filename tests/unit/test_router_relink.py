"""A linked bridge that relinks to a new broker, as pure code (``_router_relink``): what it
sends upstream to re-announce its side (a function of the router's state), and what it does
with the broker's answers: peers with the same ids, then their subscriptions, groups and
services; a service granted again is told started (its host asked its status, the answer
broadcast as "start"); a refused id stays local-only; a refused name is taken off this side.
The broker and the bridge are two routers joined by a link the test pumps
(test_router_groups.Linked)."""
from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._protocol import Kind
from ipcbus._router_relink import RID_BASE, local_peers, peer_frames, service_claims

from test_router import Bus, FakeEndpoint, body_of
from test_router_groups import Linked, join, unwrap

STATUS = {"started": True, "calls": ["add"], "host": {"id": "h", "name": "name-h", "pid": 7}}


def broker_restarts(bus: Linked) -> None:
    """The link is lost (the bridge's router forgets it) and a new broker takes its place."""
    bus.bridge.router.remove_endpoint(bus.up)
    assert bus.bridge.router.upstream is None
    bus.broker = Bus()
    bus.link = bus.broker.endpoint("link", relay=True)
    bus.up = bus.bridge.endpoint("upstream", relay=True)
    bus.bridge.router.upstream = bus.up


def bridge_side(bus: Linked) -> tuple[dict[str, FakeEndpoint], dict[str, list[Any]]]:
    """Peers "a" (plain listener, group member), "h" (hosts service "calc") and "m" (a
    member of pool "calc-pool" of service "pooled"), each on its own endpoint of the bridge;
    and "r", a peer of the broker's side."""
    eps = {name: bus.bridge.endpoint(name) for name in "ahm"}
    peers = {name: bus.bridge.add_peer(ep, name) for name, ep in eps.items()}
    bus.bridge.subscribe(eps["a"], peers["a"], "news")
    bus.bridge.subscribe(eps["a"], peers["a"], "news")  # two references: one SUBSCRIBE up
    join(bus.bridge, eps["a"], peers["a"], "jobs", "pool")
    bus.bridge.handle(eps["h"], Kind.SERVICE_ADD, "calc", peers["h"], None, 5)
    bus.pump()
    bus.bridge.subscribe(eps["h"], peers["h"], P.service_call_channel("calc"))
    bus.bridge.handle(eps["m"], Kind.SERVICE_ADD, "pooled", peers["m"], None, 6,
                      P.pack_payload("calc-pool"))
    bus.pump()
    join(bus.bridge, eps["m"], peers["m"], P.service_call_channel("pooled"), "calc-pool")
    r_ep = bus.broker.endpoint("r")
    bus.broker.add_peer(r_ep, "r")
    bus.pump()
    for ep in eps.values():
        ep.take()
    return eps, peers


def test_the_re_announcement_is_a_function_of_the_routers_state() -> None:
    bus = Linked()
    eps, peers = bridge_side(bus)
    router = bus.bridge.router
    assert [p.id for p in local_peers(router)] == ["a", "h", "m"]  # not "r" (the broker's)
    frames = {p.id: [(f[0], f[1]) for f in map(_kind_channel, peer_frames(router, p))]
              for p in local_peers(router)}
    assert frames == {
        "a": [(Kind.SUBSCRIBE, "news"), (Kind.SUBSCRIBE, "jobs")],
        "h": [(Kind.SUBSCRIBE, P.service_call_channel("calc"))],
        "m": []}  # the pool's call channel waits for the name to be granted again
    assert {p.id: service_claims(router, p) for p in local_peers(router)} == {
        "a": [], "h": [("calc", None)], "m": [("pooled", "calc-pool")]}


def _kind_channel(raw: bytes) -> tuple[int, str]:
    hlen, _, _ = P.PREFIX.unpack_from(raw, 0)
    kind, channel, _, _, _ = P.decode_header(raw[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])
    return kind, channel


def _sender(raw: bytes | bytearray) -> str:
    hlen, _, _ = P.PREFIX.unpack_from(raw, 0)
    sender = P.decode_header(raw[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])[2]
    return str(sender[0])


def test_a_new_broker_learns_the_bridges_side_again() -> None:
    bus = Linked()
    eps, peers = bridge_side(bus)
    broker_restarts(bus)
    sent = bus.bridge.router.relink.start()
    assert [P.PREFIX.unpack_from(raw, 0)[2] > RID_BASE for raw in sent] == [True] * 3
    bus.pump()
    new = bus.broker.router
    assert {pid: p.info for pid, p in new.peers.items()} == {
        pid: peers[pid] for pid in "ahm"}  # the same ids and identities
    assert new.subscribers["news"] == {"a": 1}
    assert new.groups.channels["jobs"]["pool"] == {"a": 1}
    assert new.services == {"calc": "h", "pooled": "m"}
    assert new.groups.channels[P.service_call_channel("pooled")]["calc-pool"] == {"m": 1}
    assert not any(ep.delivered for ep in (eps["a"],))  # nothing reaches a plain peer
    # each host is asked its status, in its own name, with a rid of the relink (a pool's
    # member in GROUPED, as it listens in its group)
    for name, service in (("h", "calc"), ("m", "pooled")):
        (ask,) = eps[name].take()
        if name == "m":
            group, ask = unwrap(ask)
            assert group == "calc-pool"
        assert (ask.kind, ask.channel, ask.sender_id, ask.target) == (
            Kind.REQUEST, P.service_call_channel(service), name, name)
        assert ask.rid > RID_BASE and body_of(ask) == ["__getServiceStatus"]
        # ... its answer becomes "start" on the event channel, for the proxies of both sides
        proxy_ep = bus.broker.endpoint(f"proxy-{name}")
        proxy = bus.broker.add_peer(proxy_ep, f"p{name}")
        bus.broker.subscribe(proxy_ep, proxy, P.service_event_channel(service))
        bus.bridge.respond(eps[name], peers[name], name, ask.rid, STATUS)
        assert eps[name].take() == []  # the answer is the router's, not the host's
        bus.pump()
        (start,) = proxy_ep.take()
        assert (start.kind, start.channel, start.sender_id) == (
            Kind.SEND, P.service_event_channel(service), name)
        assert body_of(start) == ["start", STATUS]
    # the plain RESPONSE path is back once no status question is out
    assert bus.bridge.router._handlers[Kind.RESPONSE] == bus.bridge.router.requests.on_response
    assert bus.bridge.router.relink.asks == {}


def test_a_refused_id_stays_local_only(caplog: pytest.LogCaptureFixture) -> None:
    bus = Linked()
    eps, peers = bridge_side(bus)
    broker_restarts(bus)
    taken_ep = bus.broker.endpoint("taken")
    bus.broker.add_peer(taken_ep, "a")  # another "a" joined the new broker first
    with caplog.at_level(logging.WARNING, logger="ipcbus"):
        bus.bridge.router.relink.start()
        bus.pump()
    assert "refused peer 'name-a' (a)" in caplog.text and "local-only" in caplog.text
    assert bus.bridge.router.relink.keeps_local("a")
    assert "news" not in bus.broker.router.subscribers  # none of its frames went up
    assert bus.broker.router.peers["a"].endpoint is taken_ep
    assert set(bus.broker.router.services) == {"calc", "pooled"}  # the others went on
    bus.bridge.subscribe(eps["h"], peers["h"], "local")  # the bridge's side goes on
    bus.bridge.handle(eps["a"], Kind.SEND, "local", peers["a"])
    assert [f.channel for f in eps["h"].take()][-1:] == ["local"]
    # ... and the link (LinkEndpoint.deliver) keeps "a"'s frames from the broker, also in a run
    relink = bus.bridge.router.relink
    raws = bus.up.take_raw()
    assert [_sender(r) for r in raws] == ["h", "a"]  # h's SUBSCRIBE, a's SEND
    assert [_sender(r) for r in map(relink.strip_local_only, raws) if r] == ["h"]
    assert relink.strip_local_only(raws[0]) is raws[0]  # nothing to strip: the same bytes
    assert relink.strip_local_only(raws[1] + raws[0] + raws[1]) == raws[0]
    # "a" leaves: its PEER_REMOVE is kept from the link too, and its id may join again
    bus.bridge.router.remove_endpoint(eps["a"])
    leaving = bus.up.take_raw()  # its UNSUBSCRIBEs, then its PEER_REMOVE
    assert {_sender(r) for r in leaving} == {"a"} and _kind_channel(leaving[-1])[0] == \
        Kind.PEER_REMOVE
    assert not any(relink.strip_local_only(r) for r in leaving)
    assert not relink.keeps_local("a") and not relink.local_only
    bus.bridge.add_peer(bus.bridge.endpoint("a2"), "a")  # asked of the broker as usual


def test_a_refused_service_is_taken_off_this_side(caplog: pytest.LogCaptureFixture) -> None:
    bus = Linked()
    eps, peers = bridge_side(bus)
    broker_restarts(bus)
    other_ep = bus.broker.endpoint("other")
    other = bus.broker.add_peer(other_ep, "o")
    bus.broker.handle(other_ep, Kind.SERVICE_ADD, "calc", other, None, 9)  # took the name
    with caplog.at_level(logging.WARNING, logger="ipcbus"):
        bus.bridge.router.relink.start()
        bus.pump()
    assert "service 'calc' of name-h (h) not started again" in caplog.text
    assert bus.broker.router.services["calc"] == "o"
    assert "calc" not in bus.bridge.router.services  # its calls go to the broker's host
    assert [f.channel for f in eps["h"].take()] == []  # not asked its status


def test_the_link_lost_again_forgets_the_questions() -> None:
    bus = Linked()
    eps, _ = bridge_side(bus)
    broker_restarts(bus)
    bus.bridge.router.relink.start()
    assert bus.bridge.router.relink.asks
    bus.bridge.router.remove_endpoint(bus.up)
    assert bus.bridge.router.relink.asks == {}
    assert bus.bridge.router._handlers[Kind.RESPONSE] == bus.bridge.router.requests.on_response


def test_answers_that_are_not_the_relinks_go_on() -> None:
    """A client's own answers (small rids) and a stranger's reply to a relink rid are not
    taken by the relink."""
    relink = Linked().bridge.router.relink
    assert not relink.answer("a", 3, True, "")
    assert not relink.answer("a", RID_BASE + 1, True, "")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["x", "y", "z"]),
                          st.sampled_from([None, "g1", "g2"]), st.integers(1, 3)),
                max_size=25))
def test_the_new_broker_sees_what_the_old_one_saw(ops: list[tuple[int, str, str | None, int]]
                                                  ) -> None:
    """Any listening of the bridge's peers, announced live to the first broker or again to a
    new one after a restart, leaves both brokers with the same subscriptions and groups."""
    bus = Linked()
    eps = [bus.bridge.endpoint(f"e{i}") for i in range(4)]
    peers = [bus.bridge.add_peer(ep, f"p{i}") for i, ep in enumerate(eps)]
    for who, channel, group, count in ops:
        if group is None:
            bus.bridge.subscribe(eps[who], peers[who], channel, count)
        else:
            join(bus.bridge, eps[who], peers[who], channel, group, count)
    bus.pump()
    before = _listening(bus.broker)
    broker_restarts(bus)
    bus.bridge.router.relink.start()
    bus.pump()
    assert _listening(bus.broker) == before


def _listening(bus: Bus) -> tuple[dict[str, set[str]], dict[str, dict[str, set[str]]]]:
    router = bus.router
    plain = {ch: set(subs) for ch, subs in router.subscribers.items()}
    groups = {ch: {g: set(m) for g, m in gs.items()} for ch, gs in router.groups.channels.items()}
    return plain, groups


@pytest.mark.parametrize("reconnecting", [True, False])
def test_proxies_of_a_service_beyond_the_link(reconnecting: bool) -> None:
    """A proxy on the bridge's side of service "far", hosted by "r" on the broker's side:
    when the link goes it hears "stop" (a bridge that reconnects only: else as before), and
    once relinked the host is asked, in the proxy's name, to tell it "start"."""
    bus = Linked()
    bus.bridge.router.relink.reconnecting = reconnecting
    r_ep = bus.broker.endpoint("r")
    r = bus.broker.add_peer(r_ep, "r")
    bus.broker.handle(r_ep, Kind.SERVICE_ADD, "far", r, None, 3)
    bus.broker.subscribe(r_ep, r, P.service_call_channel("far"))
    p_ep = bus.bridge.endpoint("p")
    p = bus.bridge.add_peer(p_ep, "p")
    bus.bridge.subscribe(p_ep, p, P.service_event_channel("far"))
    bus.pump()
    r_ep.take()
    p_ep.take()
    broker_restarts(bus)
    stops = [body_of(f) for f in p_ep.take()]
    if not reconnecting:
        assert stops == []
        return
    assert stops == [["stop", "the link to the broker was lost"]]
    # the new broker: "r" is back first and hosts "far" again
    bus.broker.add_peer(r_ep, "r")
    bus.broker.handle(r_ep, Kind.SERVICE_ADD, "far", r, None, 4)
    bus.broker.subscribe(r_ep, r, P.service_call_channel("far"))
    r_ep.take()
    bus.bridge.router.relink.start()
    bus.pump()
    (ask,) = r_ep.take()  # the status question, in p's name, with the "new proxy" flag
    assert (ask.kind, ask.channel, ask.sender_id) == (
        Kind.REQUEST, P.service_call_channel("far"), "p")
    assert body_of(ask) == ["__getServiceStatus", True]
    # the host answers as it does to a new proxy: "start" to p, and the answer to the question
    bus.broker.handle(r_ep, Kind.SEND_TO, P.service_event_channel("far"), r, "p", 0,
                      P.pack_payload(["start", STATUS]))
    bus.broker.respond(r_ep, r, "p", ask.rid, STATUS)
    bus.pump()
    assert [body_of(f) for f in p_ep.take()] == [["start", STATUS]]  # the answer is dropped
    assert bus.bridge.router.relink.asks == {}


def test_a_host_that_cannot_give_its_status_is_not_told_started(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = Linked()
    eps, peers = bridge_side(bus)
    broker_restarts(bus)
    bus.bridge.router.relink.start()
    bus.pump()
    proxy_ep = bus.broker.endpoint("proxy")
    proxy = bus.broker.add_peer(proxy_ep, "p")
    bus.broker.subscribe(proxy_ep, proxy, P.service_event_channel("calc"))
    (ask,) = eps["h"].take()
    with caplog.at_level(logging.WARNING, logger="ipcbus"):
        bus.bridge.fail(eps["h"], peers["h"], "h", ask.rid, "no listener")  # stopped meanwhile
    assert "service 'calc' did not give its status" in caplog.text
    assert eps["h"].take() == []
    bus.pump()
    assert proxy_ep.take() == []  # no "start"
    (ask,) = eps["m"].take()  # the other question is still out: the handlers stay ours
    router = bus.bridge.router
    assert router._handlers[Kind.REQUEST_FAIL] == router.relink.on_request_fail
    group, ask = unwrap(ask)
    bus.bridge.respond(eps["m"], peers["m"], "m", ask.rid, STATUS)
    assert router._handlers[Kind.REQUEST_FAIL] == router.requests.on_request_fail
    assert router._handlers[Kind.RESPONSE] == router.requests.on_response
