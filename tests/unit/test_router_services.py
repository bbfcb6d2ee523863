"""Issue 17: a service hosted by a group (a pool), in the router as pure code. Hosts that add
the same name with the same group share its calls: each call goes to ONE member (fewest calls
in progress, ties in turn), in GROUPED; the service is started while one member hosts it and
its proxies hear "stop" only when the last member leaves; any member may send its events;
mixing exclusive and grouped hosts, or two groups, is refused. Through a link the broker
chooses among every member. The in-memory bus is test_router.py's, the link
test_router_groups.py's."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._protocol import Frame, Kind
from ipcbus._router_services import pool_refusal
from ipcbus.errors import IpcBusProtocolError

from test_router import Bus, FakeEndpoint, body_of, bus, expect_fail
from test_router_groups import Linked, join, unwrap

__all__ = ["bus"]

CALLS = P.service_call_channel("jobs")
EVENTS = P.service_event_channel("jobs")


def add(bus: Bus, ep: FakeEndpoint, peer: list[Any], rid: int, group: str | None = "pool",
        name: str = "jobs") -> Frame:
    """SERVICE_ADD (with a group: a pool's member) and, if granted, the member's listening."""
    body = b"" if group is None else P.pack_payload(group)
    return bus.handle(ep, Kind.SERVICE_ADD, name, peer, None, rid, body)


def host(bus: Bus, ep: FakeEndpoint, peer: list[Any], rid: int, group: str = "pool") -> int:
    """A member starts: the answer (number of members), then it listens in the group."""
    add(bus, ep, peer, rid, group)
    (answer,) = ep.take()
    assert (answer.kind, answer.rid) == (Kind.RESPONSE, rid), body_of(answer)
    join(bus, ep, peer, CALLS, group)
    count = body_of(answer)[1]
    assert isinstance(count, int)
    return count


@pytest.fixture
def pool(bus: Bus) -> tuple[Bus, FakeEndpoint, list[Any], list[tuple[FakeEndpoint, list[Any]]]]:
    src = bus.endpoint("proxy")
    proxy = bus.add_peer(src, "proxy")
    bus.subscribe(src, proxy, EVENTS)
    hosts = []
    for i in range(3):
        ep = bus.endpoint(f"h{i}")
        peer = bus.add_peer(ep, f"h{i}")
        assert host(bus, ep, peer, 1) == i + 1
        hosts.append((ep, peer))
    return bus, src, proxy, hosts


def test_each_call_goes_to_one_member_in_turn(pool: Any) -> None:
    bus, src, proxy, hosts = pool
    for rid in range(1, 7):
        bus.request(src, proxy, CALLS, rid, body=["work", rid])
    got = {}
    for ep, peer in hosts:
        frames = [unwrap(f) for f in ep.take()]
        assert all(group == "pool" and inner.kind == Kind.REQUEST for group, inner in frames)
        got[peer[0]] = [inner.rid for _, inner in frames]
    assert got == {"h0": [1, 4], "h1": [2, 5], "h2": [3, 6]}


def test_fewest_calls_in_progress_wins_and_only_the_chosen_answers(pool: Any) -> None:
    bus, src, proxy, hosts = pool
    for rid in (1, 2, 3):
        bus.request(src, proxy, CALLS, rid)
    given = {ep.label: unwrap(f)[1].rid for ep, _ in hosts for f in ep.take()}
    assert given == {"h0": 1, "h1": 2, "h2": 3}
    (e0, h0), (e1, h1), (e2, h2) = hosts
    bus.respond(e0, h0, "proxy", 2, "forged")  # h0 was not given call 2: dropped
    assert src.take() == [] and bus.router.dropped["forged_answers"] == 1
    bus.respond(e1, h1, "proxy", 2)
    assert [f.rid for f in src.take()] == [2]
    bus.request(src, proxy, CALLS, 4)  # h1 is the only one with none in progress
    assert [unwrap(f)[1].rid for f in e1.take()] == [4]
    assert e0.take() == [] and e2.take() == []


def test_plain_listeners_of_the_call_channel_get_no_call(pool: Any) -> None:
    bus, src, proxy, hosts = pool
    spy_ep = bus.endpoint("spy")
    spy = bus.add_peer(spy_ep, "spy")
    bus.subscribe(spy_ep, spy, CALLS)
    for rid in (1, 2, 3):
        bus.request(src, proxy, CALLS, rid)
    assert spy_ep.take() == []
    assert sum(len(ep.take()) for ep, _ in hosts) == 3


def test_a_member_that_leaves_fails_its_calls_and_the_others_serve_on(pool: Any) -> None:
    bus, src, proxy, hosts = pool
    for rid in (1, 2, 3):
        bus.request(src, proxy, CALLS, rid)
    for ep, _ in hosts:
        ep.take()
    bus.router.remove_endpoint(hosts[0][0])  # h0 had call 1
    assert expect_fail(src, "proxy", 1)
    assert bus.router.state()["services"] == {"jobs": ["h1", "h2"]}
    bus.request(src, proxy, CALLS, 4)
    assert sum(len(ep.take()) for ep, _ in hosts[1:]) == 1
    bus.handle(hosts[1][0], Kind.SERVICE_REMOVE, "jobs", hosts[1][1])
    assert src.take() == []  # h2 still hosts it: no "stop"
    assert bus.router.services == {"jobs": "h2"}
    bus.router.remove_endpoint(hosts[2][0])  # the last: its call fails, the proxies hear "stop"
    frames = src.take()
    assert [f.kind for f in frames].count(Kind.REQUEST_FAIL) == 1
    (stop,) = [f for f in frames if f.channel == EVENTS]
    assert body_of(stop)[0] == "stop"


def test_stop_only_when_the_last_member_leaves(pool: Any) -> None:
    bus, src, proxy, hosts = pool
    bus.handle(hosts[0][0], Kind.SERVICE_REMOVE, "jobs", hosts[0][1])
    bus.router.remove_endpoint(hosts[1][0])
    assert src.take() == []
    bus.handle(hosts[2][0], Kind.SERVICE_REMOVE, "jobs", hosts[2][1])
    (stop,) = src.take()
    assert stop.channel == EVENTS and stop.sender is None
    assert body_of(stop)[0] == "stop"
    assert bus.router.services == {} and bus.router.service_hosts.pools == {}
    bus.request(src, proxy, CALLS, 9)
    assert expect_fail(src, "proxy", 9)


def test_any_member_may_send_events_others_may_not(pool: Any) -> None:
    bus, src, proxy, hosts = pool
    for ep, peer in hosts:
        bus.handle(ep, Kind.SEND, EVENTS, peer, body=P.pack_payload(["event", "tick"]))
    assert len(src.take()) == 3
    other_ep = bus.endpoint("other")
    other = bus.add_peer(other_ep, "other")
    bus.handle(other_ep, Kind.SEND, EVENTS, other, body=P.pack_payload(["stop", "forged"]))
    assert src.take() == [] and bus.router.dropped["forged_events"] == 1


def test_mixing_and_other_groups_are_refused(bus: Bus) -> None:
    eps = [bus.endpoint(f"e{i}") for i in range(3)]
    peers = [bus.add_peer(ep, f"p{i}") for i, ep in enumerate(eps)]
    add(bus, eps[0], peers[0], 1, None)  # exclusive
    eps[0].take()
    add(bus, eps[1], peers[1], 2, "pool")
    assert "without a group" in expect_fail(eps[1], "p1", 2)
    add(bus, eps[0], peers[0], 3, "pool")  # its own host cannot turn it into a pool
    assert "without a group" in expect_fail(eps[0], "p0", 3)
    bus.handle(eps[0], Kind.SERVICE_REMOVE, "jobs", peers[0])
    assert host(bus, eps[1], peers[1], 4, "a") == 1
    add(bus, eps[2], peers[2], 5, "b")
    assert "group 'a', not 'b'" in expect_fail(eps[2], "p2", 5)
    add(bus, eps[2], peers[2], 6, None)
    assert "group='a'" in expect_fail(eps[2], "p2", 6)
    assert host(bus, eps[1], peers[1], 7, "a") == 1  # the same member again: still one


def test_only_members_join_the_group_of_a_call_channel(bus: Bus) -> None:
    ep = bus.endpoint("e")
    peer = bus.add_peer(ep, "p")
    with pytest.raises(IpcBusProtocolError, match="reserved"):
        join(bus, ep, peer, CALLS, "pool")
    ep2 = bus.endpoint("e2")
    member = bus.add_peer(ep2, "m")
    assert host(bus, ep2, member, 1, "pool") == 1
    with pytest.raises(IpcBusProtocolError, match="reserved"):
        join(bus, ep2, member, CALLS, "other")  # not the pool's group
    with pytest.raises(IpcBusProtocolError, match="reserved"):
        join(bus, ep2, member, P.service_call_channel("else"), "pool")


def test_refusal_rules() -> None:
    assert pool_refusal("s", None, None, None, "a") is None
    assert pool_refusal("s", None, "a", None, "a") is None  # the same host again
    assert pool_refusal("s", None, "a", None, "b") is not None
    assert pool_refusal("s", "g", "a", None, "a") is not None
    assert pool_refusal("s", "g", None, ("g", {"a": None}), "b") is None
    assert pool_refusal("s", "h", None, ("g", {"a": None}), "b") is not None
    assert pool_refusal("s", None, None, ("g", {"a": None}), "b") is not None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "leave", "call", "answer"]),
                          st.integers(0, 3)), max_size=40))
def test_random_hosts_and_calls_keep_the_rules(ops: list[tuple[str, int]]) -> None:
    """Any sequence: every call is delivered to at most one member, which hosts the service
    then; "stop" is heard exactly when the last member goes; the state lists the members."""
    bus = Bus()
    src = bus.endpoint("proxy")
    proxy = bus.add_peer(src, "proxy")
    bus.subscribe(src, proxy, EVENTS)
    eps: dict[int, tuple[FakeEndpoint, list[Any]]] = {}
    members: list[str] = []
    given_to: dict[int, str] = {}
    rid = 0
    for op, i in ops:
        rid += 1
        if op == "add" and i not in eps:
            ep = bus.endpoint(f"h{i}")
            eps[i] = (ep, bus.add_peer(ep, f"h{i}"))
            host(bus, *eps[i], rid)
            members.append(f"h{i}")
        elif op in ("remove", "leave") and i in eps:
            ep, peer = eps.pop(i)
            if op == "remove":
                bus.handle(ep, Kind.SERVICE_REMOVE, "jobs", peer)
            bus.router.remove_endpoint(ep)
            members.remove(peer[0])
            stops = [f for f in src.take() if f.channel == EVENTS]
            assert len(stops) == (0 if members else 1)
        elif op == "call":
            bus.request(src, proxy, CALLS, 1000 + rid)
            receivers = [(e, p) for e, p in eps.values() for f in e.take()]
            assert len(receivers) == (1 if members else 0)
            if receivers:
                given_to[1000 + rid] = receivers[0][1][0]
            else:
                expect_fail(src, "proxy", 1000 + rid)
        elif op == "answer" and given_to:
            call, member = given_to.popitem()
            found = [(e, p) for e, p in eps.values() if p[0] == member]
            if found:
                bus.respond(*found[0], "proxy", call)
        src.take()
        state = bus.router.state()["services"]
        assert state == ({"jobs": members} if members else {})


def test_through_a_link_the_broker_chooses_among_every_member() -> None:
    bus = Linked()
    src = bus.bridge.endpoint("proxy")  # the caller behind the bridge
    proxy = bus.bridge.add_peer(src, "proxy")
    m_ep = bus.broker.endpoint("m")
    m = bus.broker.add_peer(m_ep, "m")
    assert host(bus.broker, m_ep, m, 1) == 1
    b_eps = [bus.bridge.endpoint(f"b{i}") for i in range(2)]
    b_peers = [bus.bridge.add_peer(ep, f"b{i}") for i, ep in enumerate(b_eps)]
    for i, (ep, peer) in enumerate(zip(b_eps, b_peers)):
        add(bus.bridge, ep, peer, 5)
        bus.pump()
        (answer,) = ep.take()
        assert body_of(answer) == [True, i + 2]
        join(bus.bridge, ep, peer, CALLS, "pool")
        bus.pump()
    assert bus.broker.router.state()["services"] == {"jobs": ["m", "b0", "b1"]}
    assert bus.bridge.router.state()["services"] == {"jobs": ["b0", "b1"]}
    for rid in (1, 2, 3):
        bus.bridge.request(src, proxy, CALLS, rid)
        bus.pump()
    got = {ep.label: [unwrap(f)[1].rid for f in ep.take()] for ep in (m_ep, *b_eps)}
    assert sorted(len(v) for v in got.values()) == [1, 1, 1]
    for ep, peer in zip(b_eps, b_peers):  # the members behind the link answer there
        (rid,) = got[ep.label]
        bus.bridge.respond(ep, peer, "proxy", rid, peer[0])
    bus.pump()
    assert sorted(body_of(f)[1] for f in src.take()) == ["b0", "b1"]
    assert all(bus.broker.router.groups.load(p[0]) == 0 for p in b_peers)
    # a member behind the link may send the service's events; the last leaving stops it
    bus.bridge.handle(b_eps[0], Kind.SEND, EVENTS, b_peers[0], body=P.pack_payload(["event"]))
    bus.pump()
    assert bus.broker.router.dropped["forged_events"] == 0
    bus.broker.router.remove_endpoint(m_ep)
    for ep, peer in zip(b_eps, b_peers):
        bus.bridge.handle(ep, Kind.SERVICE_REMOVE, "jobs", peer)
        bus.pump()
    assert bus.broker.router.services == {} and bus.bridge.router.services == {}
