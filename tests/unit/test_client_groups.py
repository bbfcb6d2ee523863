"""Issue 17 item 2 on the receiving side, without sockets: frames handed to
``_client.delivery.deliver`` for an unconnected IpcBusClient. A plain frame runs the plain
listeners of its channel only; a GROUPED frame runs only the listeners of the group it names,
of the client it names; a grouped request with no listener of its group left is refused."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import IpcBusClient
from ipcbus import _protocol as P
from ipcbus._client.delivery import PeerCache, deliver
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind
from ipcbus._router_groups import grouped_frame

SENDER = ["s", "sender", "socket", 1]


def decode(raw: bytes) -> P.Frame:
    dec = FrameDecoder()
    dec.feed(raw)
    (frame,) = dec.frames()
    return frame


def plain(value: Any, kind: int = Kind.SEND, rid: int = 0) -> bytes:
    return P.encode_frame(kind, "jobs", SENDER, None, rid, P.pack_payload([value]))


def grouped(target: str, group: str, value: Any, kind: int = Kind.SEND, rid: int = 0
            ) -> P.Frame:
    return decode(grouped_frame("jobs", target, group, plain(value, kind, rid)))


def client(peer_id: str) -> IpcBusClient:
    c = IpcBusClient.create()  # never connected: subscriptions are not sent
    c._peer_id = peer_id
    return c


class Refusals:
    def __init__(self) -> None:
        self.calls: list[tuple[int, Any]] = []

    def __call__(self, frame: P.Frame, reason: str | None = None, client: Any = None) -> None:
        self.calls.append((frame.rid, client))


def test_group_listeners_run_only_for_their_group() -> None:
    a, b = client("a"), client("b")
    seen: list[tuple[str, str, Any]] = []
    a.on("jobs", lambda e, v: seen.append(("a", "plain", v)))
    a.on("jobs", lambda e, v: seen.append(("a", "pool", v)), group="pool")
    a.on("jobs", lambda e, v: seen.append(("a", "other", v)), group="other")
    b.on("jobs", lambda e, v: seen.append(("b", "pool", v)), group="pool")
    refuse = Refusals()
    deliver(decode(plain(1)), [a, b], PeerCache(), refuse)
    deliver(grouped("a", "pool", 2), [a, b], PeerCache(), refuse)
    deliver(grouped("b", "pool", 3), [a, b], PeerCache(), refuse)
    deliver(grouped("a", "other", 4), [a, b], PeerCache(), refuse)
    assert seen == [("a", "plain", 1), ("a", "pool", 2), ("b", "pool", 3), ("a", "other", 4)]
    assert refuse.calls == []


def test_once_and_off_in_a_group() -> None:
    a = client("a")
    seen: list[Any] = []

    def listener(e: Any, v: Any) -> None:
        seen.append(v)

    a.once("jobs", listener, group="pool")
    for v in (1, 2):
        deliver(grouped("a", "pool", v), [a], PeerCache(), Refusals())
    assert seen == [1]
    a.on("jobs", listener, group="pool")
    a.off("jobs", listener)  # not the group's: nothing removed
    deliver(grouped("a", "pool", 3), [a], PeerCache(), Refusals())
    a.off("jobs", listener, group="pool")
    deliver(grouped("a", "pool", 4), [a], PeerCache(), Refusals())
    assert seen == [1, 3]
    assert a.listener_count("jobs") == 0  # plain listeners only


def test_a_grouped_request_without_its_listeners_is_refused_at_once() -> None:
    a = client("a")
    a.on("jobs", lambda e, v: None)  # plain only: not a member of "pool"
    refuse = Refusals()
    deliver(grouped("a", "pool", 1, Kind.REQUEST, 5), [a], PeerCache(), refuse)
    assert refuse.calls == [(5, a)]


@pytest.mark.parametrize("group", ["", "x" * (P.MAX_GROUP + 1), "a\tb", 3])
def test_bad_group_names_raise_at_the_call(group: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        client("a").on("jobs", lambda e: None, group=group)


def test_no_groups_on_reserved_channels() -> None:
    with pytest.raises(ValueError):
        client("a").on(P.QUERY_STATE_CHANNEL, lambda e: None, group="g")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["plain", "a", "b"]), st.sampled_from(["c1", "c2"])),
                max_size=30))
def test_each_frame_runs_exactly_the_listeners_it_is_for(
        frames: list[tuple[str, str]]) -> None:
    clients = {name: client(name) for name in ("c1", "c2")}
    runs: list[tuple[str, str, int]] = []
    for name, c in clients.items():
        c.on("jobs", lambda e, v, n=name: runs.append((n, "plain", v)))
        for group in ("a", "b"):
            c.on("jobs", lambda e, v, n=name, g=group: runs.append((n, g, v)), group=group)
    expected: list[tuple[str, str, int]] = []
    for i, (group, target) in enumerate(frames):
        if group == "plain":
            frame = decode(plain(i))
            expected += [("c1", "plain", i), ("c2", "plain", i)]
        else:
            frame = grouped(target, group, i)
            expected.append((target, group, i))
        deliver(frame, list(clients.values()), PeerCache(), Refusals())
    assert runs == expected
