"""What a federation link knows (ipcbus._federation_state), without NATS or sockets: local
interest as subscriptions to hold, the other brokers' peers (ids unique across the bus), and
requests across (first answer, every part ended, no responders, cancels, outages)."""
from __future__ import annotations

from typing import Any

from hypothesis import given, strategies as st

from ipcbus import _protocol as P
from ipcbus._federation_state import FederationState
from ipcbus._protocol import Kind


def info(pid: int, name: str = "p") -> list[Any]:
    return [f"{pid}.abc", name, "socket", pid]


def ann(state: FederationState, kind: Kind, channel: str, who: list[Any], group: str | None = None,
        link: str | None = None) -> Any:
    body = P.pack_payload(group) if group is not None else b""
    raw = P.encode_frame(kind, channel, who, None, 0, body)
    offset = len(raw) - len(body)
    if link is None:
        return state.local(kind, channel, who, raw, offset)
    return state.remote(link, kind, channel, who, raw, offset)


def test_local_interest_is_held_while_a_peer_listens() -> None:
    s = FederationState("A")
    a, b = info(1), info(2)
    ann(s, Kind.PEER_ADD, "", a)
    ann(s, Kind.PEER_ADD, "", b)
    assert ann(s, Kind.SUBSCRIBE, "jobs", a) == ("sub", "jobs")
    assert ann(s, Kind.SUBSCRIBE, "jobs", b) is None
    assert ann(s, Kind.SUBSCRIBE, "jobs", a, group="pool") is None  # members: no subject
    assert ann(s, Kind.UNSUBSCRIBE, "jobs", a) is None
    assert ann(s, Kind.UNSUBSCRIBE, "jobs", b) == ("unsub", "jobs")
    frames = s.local_frames()  # replayed to a link that joins: peers first, then the rest
    kinds = [P.decode_header(f[P.PREFIX_SIZE:P.PREFIX_SIZE + P.PREFIX.unpack_from(f)[0]])[0]
             for f in frames]
    assert kinds == [Kind.PEER_ADD, Kind.PEER_ADD, Kind.SUBSCRIBE]


def test_remote_ids_are_unique_across_the_bus() -> None:
    s = FederationState("A")
    ann(s, Kind.PEER_ADD, "", info(1))
    assert not ann(s, Kind.PEER_ADD, "", info(1), link="B")  # collides with a local id
    assert ann(s, Kind.PEER_ADD, "", info(2), link="B")
    assert not ann(s, Kind.PEER_ADD, "", info(2), link="C")  # taken by B's peer
    assert s.counters["id_collisions"] == 2
    assert not ann(s, Kind.SUBSCRIBE, "x", info(9), link="B")  # unknown: nothing in its name
    assert ann(s, Kind.SUBSCRIBE, "x", info(2), link="B")
    assert s.interest("x") == {"B"} and s.knows(info(2)[0]) == "B"
    assert s.remote_gone("B") == [info(2)]
    assert s.interest("x") == set() and s.knows(info(2)[0]) is None


def test_first_answer_ends_a_request() -> None:
    s = FederationState("A")
    n, _ = s.send_out(("r", 1), {"B", "C"}, False, "ch", True)
    assert s.answered(n, "B", False) == (("r", 1), False)
    assert s.answered(n, "C", False) is None  # late: the first one won


def test_failures_end_a_request_only_when_every_part_has() -> None:
    s = FederationState("A")
    n, _ = s.send_out(("r", 1), {"B", "C"}, False, "ch", True)
    assert s.answered(n, "B", True) == (("r", 1), False)
    assert s.answered(n, "C", True) == (("r", 1), True)
    assert not s.pending


def test_gathering_ends_with_every_link_s_failure() -> None:
    s = FederationState("A")
    n, _ = s.send_out(("r", 2), {"B", "C"}, True, "ch", True)
    assert s.answered(n, "B", False) == (("r", 2), False)
    assert s.answered(n, "B", False) == (("r", 2), False)  # several answers from one side
    assert s.answered(n, "B", True) == (("r", 2), False)
    assert s.answered(n, "C", True) == (("r", 2), True)


def test_a_grouped_member_adds_a_part() -> None:
    s = FederationState("A")
    n, _ = s.send_out(("r", 3), {"B"}, False, "ch", True)
    n2, _ = s.send_out(("r", 3), {"C"}, False, "ch", False)
    assert n2 == n
    assert s.no_responders(n) == (("r", 3), False)  # the channel's part ended; C's did not
    assert s.answered(n, "C", True) == (("r", 3), True)


def test_cancel_outage_and_a_link_that_leaves() -> None:
    s = FederationState("A")
    s.send_out(("r", 1), {"B"}, False, "ch", True)
    s.send_out(("r", 2), {"B", "C"}, False, "ch", True)
    s.send_out(("r", 3), {"C"}, False, "ch", True)
    assert s.cancel(("r", 3)) == {"C"} and s.cancel(("r", 3)) == set()
    assert s.link_failed("B") == [("r", 1)]
    assert s.fail_all() == [("r", 2)]


def test_owed_answers() -> None:
    s = FederationState("A")
    s.owe(("r", 1), "reply.1", False)
    s.owe(("r", 2), "reply.2", True)
    assert s.answer_to(("r", 1), False) == "reply.1"
    assert s.answer_to(("r", 1), False) is None
    assert s.answer_to(("r", 2), False) == "reply.2"  # a gathering: more may come
    assert s.answer_to(("r", 2), True) == "reply.2"
    assert s.answer_to(("r", 2), True) is None


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", "c"]), st.booleans()),
                max_size=60))
def test_interest_matches_the_local_listeners(ops: list[tuple[int, str, bool]]) -> None:
    """Whatever the order of (un)subscriptions, the subjects held are exactly the channels
    with a local plain listener, and every change is reported once."""
    s = FederationState("A")
    for pid in range(4):
        ann(s, Kind.PEER_ADD, "", info(pid))
    listening: set[tuple[int, str]] = set()
    held: set[str] = set()
    for pid, channel, on in ops:
        if on == ((pid, channel) in listening):
            continue  # the broker announces transitions only
        change = ann(s, Kind.SUBSCRIBE if on else Kind.UNSUBSCRIBE, channel, info(pid))
        (listening.add if on else listening.discard)((pid, channel))
        if change is not None:
            (held.add if change[0] == "sub" else held.discard)(change[1])
        assert held == {c for _, c in listening}


def test_silent_links_are_found_with_an_injected_clock() -> None:
    s = FederationState("A")
    assert not s.heard("B", 0.0)  # not known yet: its side should be asked for
    ann(s, Kind.PEER_ADD, "", info(2), link="B")
    assert s.heard("B", 1.0) and not s.heard("C", 1.0)
    s.heard("C", 3.0)
    assert s.silent(4.0, 2.5) == ["B"]
    assert s.remote_gone("B") == [info(2)] and s.silent(10.0, 2.5) == ["C"]


def test_a_run_crosses_only_if_every_frame_carries_its_header() -> None:
    from ipcbus._federation_inbound import uniform
    a = P.encode_frame(Kind.SEND, "ch", info(1), None, 0, b"\x91\x01")
    b = P.encode_frame(Kind.SEND, "ch", info(1), None, 0, b"\x91\x02")
    other = P.encode_frame(Kind.SEND, "ch", info(2), None, 0, b"\x91\x02")
    hlen = P.PREFIX.unpack_from(a, 0)[0]
    assert uniform(a, hlen) and uniform(a + b, hlen)
    assert not uniform(a + other, hlen)  # another sender hidden in the run
    assert not uniform(a + b[:-1], hlen) and not uniform(a + b"\x00", hlen)


@given(st.lists(st.tuples(st.sampled_from(["B", "C", "D"]), st.booleans()), max_size=20),
       st.booleans())
def test_a_gathering_ends_once_when_its_last_link_fails(events: list[tuple[str, bool]],
                                                        gather: bool) -> None:
    """Whatever comes back in whatever order: the broker hears "every part ended" exactly
    once, when the last link's part ends (a plain request also ends at its first answer)."""
    s = FederationState("A")
    n, _ = s.send_out(("r", 1), {"B", "C", "D"}, gather, "ch", True)
    open_links, ended, finished = {"B", "C", "D"}, 0, False
    for link, final in events:
        found = s.answered(n, link, final)
        if finished:
            assert found is None
            continue
        assert found is not None
        if final or not gather:
            open_links.discard(link)
        if found[1]:
            ended += 1
            assert not open_links
        if found[1] or (not gather and not final):
            finished = True
    assert ended <= 1
    assert finished == (n not in s.pending)


def test_a_whole_side_again_keeps_what_is_known() -> None:
    s = FederationState("A")
    assert s.keep_only("B", set()) == [] and "B" in s.remotes  # known, with no peer yet
    assert s.heard("B", 0.0)
    ann(s, Kind.PEER_ADD, "", info(2), link="B")
    ann(s, Kind.PEER_ADD, "", info(3), link="B")
    assert not ann(s, Kind.PEER_ADD, "", info(2), link="B")  # listed again: nothing new
    assert s.keep_only("B", {info(2)[0]}) == [info(3)]  # the one missing has left
    assert s.knows(info(2)[0]) == "B" and s.knows(info(3)[0]) is None
