"""Issue 17 item 2 in the router, as pure code: a message or request on a channel with groups
goes to every plain subscriber as it came and to ONE member of each group, wrapped in
GROUPED (fewest requests in progress, ties in turn); membership, trust and clean-up. The
in-memory bus and endpoints are test_router.py's."""
from __future__ import annotations

import collections
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Frame, Kind
from ipcbus._router_groups import frame_bytes
from ipcbus.errors import IpcBusProtocolError

from test_router import Bus, FakeEndpoint, body_of, bus, info

__all__ = ["bus"]


def join(bus: Bus, ep: FakeEndpoint, peer: list[Any], channel: str, group: str,
         count: int = 1) -> None:
    bus.handle(ep, Kind.SUBSCRIBE, channel, peer, rid=count, body=P.pack_payload(group))


def leave(bus: Bus, ep: FakeEndpoint, peer: list[Any], channel: str, group: str,
          count: int = 0) -> None:
    bus.handle(ep, Kind.UNSUBSCRIBE, channel, peer, rid=count, body=P.pack_payload(group))


def unwrap(frame: Frame) -> tuple[str, Frame]:
    assert frame.kind == Kind.GROUPED and frame.sender is None
    group, raw = body_of(frame)
    dec = FrameDecoder()
    dec.feed(raw)
    inner = dec.frames()
    assert len(inner) == 1
    return group, inner[0]


def send(bus: Bus, ep: FakeEndpoint, peer: list[Any], channel: str, value: Any) -> None:
    bus.handle(ep, Kind.SEND, channel, peer, body=P.pack_payload([value]))


@pytest.fixture
def pool(bus: Bus) -> tuple[Bus, FakeEndpoint, list[Any], list[tuple[FakeEndpoint, list[Any]]]]:
    src = bus.endpoint("src")
    sender = bus.add_peer(src, "s")
    workers = []
    for i in range(3):
        ep = bus.endpoint(f"w{i}")
        peer = bus.add_peer(ep, f"w{i}")
        join(bus, ep, peer, "jobs", "pool")
        workers.append((ep, peer))
    return bus, src, sender, workers


def test_each_message_goes_to_one_member_in_turn(pool: Any) -> None:
    bus, src, sender, workers = pool
    for j in range(6):
        send(bus, src, sender, "jobs", j)
    got = {}
    for ep, peer in workers:
        frames = ep.take()
        got[peer[0]] = [P.unpack_payload(unwrap(f)[1].body)[0] for f in frames]
        assert all(f.target == peer[0] and f.channel == "jobs" for f in frames)
    assert got == {"w0": [0, 3], "w1": [1, 4], "w2": [2, 5]}
    assert src.take() == []  # the sender is no member: nothing echoed


def test_plain_subscribers_get_everything_as_it_came(pool: Any) -> None:
    bus, src, sender, workers = pool
    other = bus.endpoint("plain")
    watcher = bus.add_peer(other, "watch")
    bus.subscribe(other, watcher, "jobs")
    for j in range(4):
        send(bus, src, sender, "jobs", j)
    frames = other.take()
    assert [f.kind for f in frames] == [Kind.SEND] * 4
    assert sum(len(ep.take()) for ep, _ in workers) == 4


def test_a_run_is_balanced_message_by_message(pool: Any) -> None:
    bus, src, sender, workers = pool
    raw = b"".join(P.encode_frame(Kind.SEND, "jobs", sender, None, 0, P.pack_payload([j]))
                   for j in range(6))
    dec = FrameDecoder()
    dec.merge_runs = True
    dec.feed(raw)
    (run,) = dec.frames()
    assert run.count == 6 and len(frame_bytes(run)) == 6
    bus.router.handle(src, run)
    assert [len(ep.take()) for ep, _ in workers] == [2, 2, 2]


def test_requests_go_to_the_member_with_fewest_in_progress(pool: Any) -> None:
    bus, src, sender, workers = pool
    for rid in (1, 2, 3):  # one each, in turn
        bus.request(src, sender, "jobs", rid)
    chosen = {ep.label: unwrap(f)[1].rid for ep, _ in workers for f in ep.take()}
    assert chosen == {"w0": 1, "w1": 2, "w2": 3}
    (ep1, w1), (ep2, w2) = workers[1], workers[2]
    bus.respond(ep1, w1, "s", 2)
    bus.respond(ep2, w2, "s", 3)
    assert [f.rid for f in src.take()] == [2, 3]
    for rid in (4, 5):  # w0 still has 1 in progress: w1 and w2 get these
        bus.request(src, sender, "jobs", rid)
    assert workers[0][0].take() == []
    assert len(ep1.take()) + len(ep2.take()) == 2


def test_an_answer_comes_only_from_the_chosen_member(pool: Any) -> None:
    bus, src, sender, workers = pool
    bus.request(src, sender, "jobs", 7)
    (ep0, w0), (ep1, w1) = workers[0], workers[1]
    assert len(ep0.take()) == 1
    bus.respond(ep1, w1, "s", 7, "forged")
    assert src.take() == [] and bus.router.dropped["forged_answers"] == 1
    bus.respond(ep0, w0, "s", 7, "real")
    assert body_of(src.take()[0]) == [True, "real"]


def test_a_member_leaving_fails_its_requests_and_leaves_the_group(pool: Any) -> None:
    bus, src, sender, workers = pool
    bus.request(src, sender, "jobs", 9)
    ep0, w0 = workers[0]
    assert len(ep0.take()) == 1
    bus.router.remove_endpoint(ep0)
    (fail,) = src.take()
    assert (fail.kind, fail.rid) == (Kind.REQUEST_FAIL, 9)
    for j in range(4):
        send(bus, src, sender, "jobs", j)
    assert [len(ep.take()) for ep, _ in workers[1:]] == [2, 2]
    assert "w0" not in bus.router.groups.of_peer


def test_leaving_and_reference_counts(pool: Any) -> None:
    bus, src, sender, workers = pool
    ep0, w0 = workers[0]
    join(bus, ep0, w0, "jobs", "pool")  # two references
    leave(bus, ep0, w0, "jobs", "pool", 1)
    assert "w0" in bus.router.groups.channels["jobs"]["pool"]
    leave(bus, ep0, w0, "jobs", "pool", 0)
    assert "w0" not in bus.router.groups.channels["jobs"]["pool"]
    for _, peer in workers[1:]:
        leave(bus, bus.router.peers[peer[0]].endpoint, peer, "jobs", "pool")
    assert bus.router.groups.channels == {} and bus.router.groups.of_peer == {}
    bus.request(src, sender, "jobs", 3)  # nobody left
    assert src.take()[0].kind == Kind.REQUEST_FAIL


def test_each_group_gets_one_and_a_member_only_of_its_own(bus: Bus) -> None:
    src = bus.endpoint("src")
    sender = bus.add_peer(src, "s")
    eps = {}
    for name, group in (("a1", "A"), ("a2", "A"), ("b1", "B")):
        ep = eps[name] = bus.endpoint(name)
        join(bus, ep, bus.add_peer(ep, name), "jobs", group)
    for j in range(4):
        send(bus, src, sender, "jobs", j)
    groups = {name: [unwrap(f)[0] for f in ep.take()] for name, ep in eps.items()}
    assert groups == {"a1": ["A", "A"], "a2": ["A", "A"], "b1": ["B"] * 4}


@pytest.mark.parametrize("group", ["", "x" * (P.MAX_GROUP + 1), "bad\ngroup", 7, ["x"]])
def test_a_bad_group_name_is_a_protocol_error(bus: Bus, group: Any) -> None:
    ep = bus.endpoint("e")
    peer = bus.add_peer(ep, "p")
    with pytest.raises(IpcBusProtocolError):
        bus.handle(ep, Kind.SUBSCRIBE, "jobs", peer, rid=1, body=P.pack_payload(group))
    assert bus.router.groups.channels == {}


def test_no_groups_on_reserved_channels_and_none_in_anothers_name(bus: Bus) -> None:
    ep, other = bus.endpoint("e"), bus.endpoint("o")
    peer = bus.add_peer(ep, "p")
    bus.add_peer(other, "q")
    with pytest.raises(IpcBusProtocolError):
        join(bus, ep, peer, P.QUERY_STATE_CHANNEL, "g")
    with pytest.raises(IpcBusProtocolError):
        join(bus, other, peer, "jobs", "g")  # p is not a peer of that connection
    assert bus.router.groups.channels == {}


def test_a_peer_may_not_send_grouped(bus: Bus) -> None:
    ep = bus.endpoint("e")
    peer = bus.add_peer(ep, "p")
    with pytest.raises(IpcBusProtocolError):
        bus.handle(ep, Kind.GROUPED, "jobs", peer, "p", body=P.pack_payload(["g", b""]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["join", "leave", "send", "request", "answer",
                                             "drop"]),
                          st.integers(0, 3)), max_size=60))
def test_every_message_reaches_one_member_of_each_group(ops: list[tuple[str, int]]) -> None:
    """Whatever the members do, each message reaches exactly one current member of the group
    (or nobody when it is empty), and the bookkeeping stays consistent."""
    bus = Bus()
    src = bus.endpoint("src")
    sender = bus.add_peer(src, "s")
    eps = [bus.endpoint(f"e{i}") for i in range(4)]
    peers: list[list[Any] | None] = [None] * 4
    joined: set[int] = set()
    outstanding: dict[int, list[int]] = collections.defaultdict(list)
    rid = 0
    for op, i in ops:
        if op == "join":
            if peers[i] is None:
                peers[i] = bus.add_peer(eps[i], f"p{i}")
            join(bus, eps[i], peers[i], "ch", "g")  # type: ignore[arg-type]
            joined.add(i)
        elif op == "leave" and i in joined:
            leave(bus, eps[i], peers[i], "ch", "g")  # type: ignore[arg-type]
            joined.discard(i)
        elif op == "drop" and peers[i] is not None:
            bus.router.remove_endpoint(eps[i])
            eps[i].peers.clear()
            peers[i] = None
            joined.discard(i)
            outstanding.pop(i, None)
        elif op in ("send", "request"):
            rid += 1
            if op == "send":
                send(bus, src, sender, "ch", rid)
            else:
                bus.request(src, sender, "ch", rid)
            got = [k for k in range(4) if eps[k].delivered]
            if joined:
                assert len(got) == 1 and got[0] in joined
                (frame,) = eps[got[0]].take()
                assert frame.target == f"p{got[0]}" and unwrap(frame)[0] == "g"
                if op == "request":
                    outstanding[got[0]].append(rid)
            else:
                assert got == []
        elif op == "answer" and outstanding.get(i):
            bus.respond(eps[i], peers[i], "s", outstanding[i].pop(0))  # type: ignore[arg-type]
        src.take()
        for ep in eps:
            ep.take()
    groups = bus.router.groups
    assert set(groups.of_peer) == {f"p{i}" for i in joined}
    assert set(groups.channels.get("ch", {}).get("g", {})) == {f"p{i}" for i in joined}
    for i in joined:
        assert groups.load(f"p{i}") == len(outstanding[i])


# -- through a link: the broker chooses among every member, the bridge hands its choices on ----
class Linked:
    """A broker's router and a bridge's router, joined by a link the test pumps."""

    def __init__(self) -> None:
        self.broker, self.bridge = Bus(), Bus()
        self.link = self.broker.endpoint("link", relay=True)  # the broker's side of the link
        self.up = self.bridge.endpoint("upstream", relay=True)  # the bridge's side
        self.bridge.router.upstream = self.up

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for frame in self.up.take():
                self.broker.router.handle(self.link, frame)
                moved = True
            for frame in self.link.take():
                self.bridge.router.handle(self.up, frame)
                moved = True


def test_a_group_spanning_a_link_is_one_pool() -> None:
    bus = Linked()
    src = bus.broker.endpoint("src")
    s = bus.broker.add_peer(src, "s")
    m_ep = bus.broker.endpoint("m")
    join(bus.broker, m_ep, bus.broker.add_peer(m_ep, "m"), "jobs", "pool")
    b_eps = [bus.bridge.endpoint(f"b{i}") for i in range(2)]
    b_peers = [bus.bridge.add_peer(ep, f"b{i}") for i, ep in enumerate(b_eps)]
    bs_ep = bus.bridge.endpoint("bs")
    bs = bus.bridge.add_peer(bs_ep, "bs")
    for ep, peer in zip(b_eps, b_peers):
        join(bus.bridge, ep, peer, "jobs", "pool")
    bus.pump()
    assert set(bus.broker.router.groups.channels["jobs"]["pool"]) == {"m", "b0", "b1"}
    assert bus.bridge.router.groups.channels["jobs"]["pool"]  # kept for the clean-up
    for j in range(3):  # from the broker's side: one each, in turn
        send(bus.broker, src, s, "jobs", j)
        bus.pump()
    for j in range(3, 6):  # from the bridge's side: the broker chooses too
        send(bus.bridge, bs_ep, bs, "jobs", j)
        bus.pump()
    got = {ep.label: sorted(P.unpack_payload(unwrap(f)[1].body)[0] for f in ep.take())
           for ep in (m_ep, *b_eps)}
    assert got == {"m": [0, 3], "b0": [1, 4], "b1": [2, 5]}
    # a request of the bridge's side, given to a member there: answered there, and the
    # broker sees the answer too (its entry and the member's load end)
    chosen = None
    for rid in (1, 2, 3):
        bus.bridge.request(bs_ep, bs, "jobs", rid)
        bus.pump()
        for ep, peer in zip(b_eps, b_peers):
            for f in ep.take():
                chosen = (ep, peer, unwrap(f)[1].rid)
        m_ep.take()
    assert chosen is not None
    ep, peer, rid = chosen
    bus.bridge.respond(ep, peer, "bs", rid, "done")
    bus.pump()
    assert [(f.kind, f.rid) for f in bs_ep.take()] == [(Kind.RESPONSE, rid)]
    assert not any(k == ("bs", rid) for k in bus.broker.router.pending)
    assert bus.broker.router.groups.load(peer[0]) == 0
    # a request from the broker's side to a member behind the link: answered through it
    for rid in (10, 11, 12):
        bus.broker.request(src, s, "jobs", rid)
        bus.pump()
    for ep, peer in zip(b_eps, b_peers):
        for f in ep.take():
            bus.bridge.respond(ep, peer, "s", unwrap(f)[1].rid, peer[0])
    bus.pump()
    answers = [body_of(f)[1] for f in src.take() if f.kind == Kind.RESPONSE]
    assert sorted(answers) == ["b0", "b1"]


def test_members_count_as_listeners_for_readiness(bus: Bus) -> None:
    src = bus.endpoint("src")
    s = bus.add_peer(src, "s")
    bus.handle(src, Kind.REQUEST, "/ipcbus/waitListeners", s, None, 4,
               P.pack_payload(["jobs", 2]))
    assert src.take() == []  # held: nobody listens yet
    eps = [bus.endpoint(f"w{i}") for i in range(2)]
    join(bus, eps[0], bus.add_peer(eps[0], "w0"), "jobs", "pool")
    assert src.take() == []
    peer = bus.add_peer(eps[1], "w1")
    bus.subscribe(eps[1], peer, "jobs")
    join(bus, eps[1], peer, "jobs", "pool")  # the same peer: still 2
    (answer,) = src.take()
    assert (answer.kind, answer.rid, body_of(answer)) == (Kind.RESPONSE, 4, [True, 2])
    assert bus.router.groups.listening("jobs") == 2
