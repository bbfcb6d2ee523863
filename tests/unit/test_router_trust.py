"""The trust principles of the router as properties, with hypothesis (pure code, no sockets):
whatever frames whatever connections send, with whatever senders they declare,

* every message the router forwards carries exactly the identity the router recorded for a
  peer of the connection it came from (identity by connection);
* an answer reaches a requester only from a peer the request was delivered to;
* every descriptor the router hands out is a copy made for one receiver, given once, and the
  copies of a post that cannot be completed are all closed (one owner per descriptor).
"""
from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Frame, Kind
from ipcbus._router import Router
from ipcbus.errors import IpcBusProtocolError

from test_router import FakeEndpoint


class FdLedger:
    """Fake ``dup_fds``: mints new descriptor numbers, fails on demand, and remembers who was
    given each one."""

    def __init__(self) -> None:
        self.next = itertools.count(1000)
        self.fail_after: int | None = None  # copies made before the next failure
        self.live: set[int] = set()

    def dup_fds(self, fds: list[int], n: int) -> list[list[int]]:
        copies: list[list[int]] = []
        for _ in range(n):
            if self.fail_after is not None:
                if self.fail_after == 0:
                    self.fail_after = None
                    for made in copies:  # all or none, as T.dup_copies does
                        self.live.difference_update(made)
                    raise OSError(24, "Too many open files")
                self.fail_after -= 1
            made = [next(self.next) for _ in fds]
            self.live.update(made)
            copies.append(made)
        return copies


PEERS = ["a", "b", "c"]
CHANNELS = ["ch", "other"]


def recorded(router: Router, peer_id: str) -> list[Any] | None:
    peer = router.peers.get(peer_id)
    return None if peer is None else peer.info


frames_st = st.lists(st.tuples(
    st.integers(0, 2),  # which endpoint sends
    st.sampled_from(["REQUEST", "REQUEST", "RESPONSE", "RESPONSE", "SEND", "SEND_TO", "POST",
                     "SUBSCRIBE"]),
    st.sampled_from(["own", "own", "own", "other"]),  # the sender id it declares
    st.sampled_from(["exact", "exact", "exact", "type", "pid", "name"]),  # how it is forged
    st.sampled_from(CHANNELS),
    st.sampled_from([None, None, *PEERS]),  # target
    st.integers(1, 2),  # rid
    st.integers(0, 3),  # copies to make before dup fails (3: never)
), max_size=40)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames_st)
def test_identity_answers_and_descriptors_hold_whatever_peers_send(script: list[Any]) -> None:
    ledger = FdLedger()
    router = Router(1, dup_fds=ledger.dup_fds)
    eps: list[FakeEndpoint] = []
    delivered_requests: dict[tuple[str, int], set[str]] = {}

    def join(i: int) -> None:
        """Peer PEERS[i] joins through a new connection of its own (again, after a drop)."""
        ep = FakeEndpoint(f"e{i}", ptype="socket", pid=100 + i)
        eps[i:i + 1] = [ep]
        peer_id = PEERS[i]
        router.handle(ep, _frame(Kind.PEER_ADD, "", [peer_id, peer_id, "main", 1], None, 1))
        channel = "other" if peer_id == "c" else "ch"  # c gets no request on "ch"
        router.handle(ep, _frame(Kind.SUBSCRIBE, channel, recorded(router, peer_id), None, 1))
        _take(ep, router, delivered_requests)

    for i in range(3):
        join(i)
    for who, kind_name, whose, forge, channel, target, rid, fail_after in script:
        ep = eps[who]
        sid = PEERS[who] if whose == "own" else PEERS[(who + 1) % 3]
        info = recorded(router, sid) or [sid, sid, "socket", 100 + who]
        sender = list(info)
        if forge == "type":
            sender[2] = "main" if sender[2] != "main" else "pipe"
        elif forge == "pid":
            sender[3] += 1
        elif forge == "name":
            sender[1] += "!"
        ledger.fail_after = None if fail_after == 3 else fail_after
        if kind_name == "POST":
            frame = _frame(Kind.SEND, channel, sender, None, rid, nfds=2)
            frame.fds = [1, 2]  # the received originals: the hub closes them after routing
        elif kind_name == "RESPONSE":
            frame = _frame(Kind.RESPONSE, "", sender, target or "a", rid,
                           P.pack_payload([True, sid]))
        else:
            frame = _frame(getattr(Kind, kind_name), channel, sender, target, rid)
        legit = sid in ep.peers and sender == ep.peers[sid].info
        try:
            router.handle(ep, frame)
        except IpcBusProtocolError:
            assert not legit or kind_name == "REQUEST", (kind_name, sender)
            router.remove_endpoint(ep)  # as the hub does before closing it
            join(who)
        else:
            assert legit, ("accepted a frame not from its recorded sender", sender)
        for other in eps:
            _take(other, router, delivered_requests)
    assert ledger.live == set(), "descriptors copied but never handed to anyone"


def _frame(kind: int, channel: str, sender: list[Any] | None, target: str | None, rid: int,
           body: bytes = b"", nfds: int = 0) -> Frame:
    dec = FrameDecoder()
    dec.feed(P.encode_frame(kind, channel, sender, target, rid, body, nfds))
    return dec.frames()[0]


def _take(ep: FakeEndpoint, router: Router, requests: dict[tuple[str, int], set[str]]) -> None:
    """Check what ``ep`` was given: senders as recorded, answers only from a receiver."""
    ledger_fds: list[int] = []
    for raw, fds in ep.delivered:
        dec = FrameDecoder()
        dec.feed(raw)
        for frame in dec.frames():
            if frame.sender is not None and frame.kind in P.MESSAGE_KINDS:
                peer = router.peers.get(frame.sender[0])
                if peer is not None:
                    assert frame.sender == peer.info
            if frame.kind == Kind.REQUEST and frame.sender is not None:
                requests.setdefault((frame.sender[0], frame.rid), set()).update(ep.peers)
            if frame.kind == Kind.RESPONSE and frame.sender is not None \
                    and frame.target is not None:
                assert frame.sender[0] in requests.get((frame.target, frame.rid), set()), \
                    "an answer from a peer the request was not delivered to"
            if frame.nfds:
                assert len(fds) == frame.nfds
        ledger_fds.extend(fds)
    assert len(set(ledger_fds)) == len(ledger_fds), "a descriptor given twice"
    # the endpoint owns what it was given: forget it in the ledger
    ledger = router.messages.dup.__self__  # type: ignore[attr-defined]
    ledger.live.difference_update(ledger_fds)
    ep.delivered.clear()
