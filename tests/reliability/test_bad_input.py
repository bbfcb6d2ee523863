"""Bad input never takes the broker or the bridge down (docs/reliability.md, section 1):
hypothesis-generated frames on raw sockets and on raw bridge pipes, named cases, deep nesting,
pickle bodies. That one connection is closed with a logged reason, and a canary client is
served throughout.

Real processes and sockets, no mocked transport. Every test has a hard timeout; waits are
bounded (events, queues, ``wait_until``); children are module-level functions, joined with a
bound and killed in a ``finally``. Cases marked ``slow`` are left out of the default run
(``-m 'not slow'`` in pyproject.toml); with ``-m slow -s`` they print the figures of
docs/reliability.md.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipcbus import IpcBusClient, IpcBusProtocolError, IpcBusRequestError
from ipcbus import _protocol as P
from ipcbus._protocol import Kind

from helpers import Collector, elapsed, sync
from helpers.measure import report
from helpers.rawbus import Canary, Target, clean_after, make_target  # noqa: F401
from helpers.rawpeer import RawPeer  # a hand-driven peer on a raw socket


GOOD_SENDER = ["1.x", "x", "socket", 1]


def _prefixed(header: bytes, body: bytes = b"") -> bytes:
    return P.PREFIX.pack(len(header), len(body), 0) + header + body


def _header(fields: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def _utf8_header(raw_channel: bytes, sender: list[Any] | None) -> bytes:
    """A SEND header whose channel is a msgpack str holding ``raw_channel`` as is."""
    assert len(raw_channel) < 256
    header: bytes = (b"\x95" + msgpack.packb(int(Kind.SEND)) + b"\xd9"
                     + bytes([len(raw_channel)]) + raw_channel
                     + msgpack.packb(sender, use_bin_type=True) + msgpack.packb(None)
                     + msgpack.packb(0))
    return header


def _deep(levels: int) -> bytes:
    """A msgpack value nested ``levels`` arrays deep (no Python object that deep is built)."""
    return b"\x91" * levels + b"\xc0"


# Named cases: (name, phase, make(peer) -> bytes, expected words in the logged reason).
# phase "pre": the first bytes on a new connection; "post": after the handshake and PEER_ADD.
def _named_cases() -> list[tuple[str, str, Callable[[RawPeer], bytes], str]]:
    hello = P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid()))
    return [
        ("random-bytes", "pre",
         lambda p: random.Random(7).randbytes(64 * 1024), "protocol error"),
        ("silence", "pre", lambda p: b"", "handshake not completed"),
        ("half-a-hello", "pre", lambda p: hello[:9], "handshake not completed"),
        ("not-hello-first", "pre",
         lambda p: P.encode_frame(Kind.SEND, "x", GOOD_SENDER, body=P.pack_payload([1])),
         "handshake refused"),
        ("hello-without-magic", "pre",
         lambda p: P.encode_frame(Kind.HELLO, body=P.pack_payload({"magic": "nope"})),
         "handshake refused"),
        ("hello-body-not-msgpack", "pre",
         lambda p: P.encode_frame(Kind.HELLO, body=b"\xc1\xc1"), "handshake refused"),
        ("frame-over-size-limit-first", "pre",
         lambda p: P.PREFIX.pack(20, 2 * 1024 ** 3, 0) + b"\x00" * 20, "over the limit"),
        ("kind-is-a-str", "post",
         lambda p: _prefixed(_header(["7", "c", p.info, None, 0])), "unknown kind"),
        ("channel-is-an-int", "post",
         lambda p: _prefixed(_header([7, 5, p.info, None, 0])), "channel is not a str"),
        ("sender-is-a-str", "post",
         lambda p: _prefixed(_header([7, "c", "me", None, 0])), "sender is not"),
        ("target-is-bytes", "post",
         lambda p: _prefixed(_header([8, "c", p.info, b"t", 0])), "malformed frame header"),
        ("rid-over-2**63", "post",
         lambda p: P.PREFIX.pack(len(h := _header([9, "c", p.info, None, 0])), 0, 2**63) + h,
         "rid"),
        ("nfds-is-a-float", "post",
         lambda p: _prefixed(_header([7, "c", p.info, None, 1.0])), "nfds is not"),
        ("header-not-an-array", "post",
         lambda p: _prefixed(msgpack.packb({"kind": 7})), "malformed frame header"),
        ("header-bytes-garbage", "post",
         lambda p: _prefixed(b"\xc1" * 16), "malformed frame header"),
        ("unknown-kind-99", "post",
         lambda p: _prefixed(_header([99, "c", p.info, None, 0])), "unknown kind 99"),
        ("channel-not-utf8", "post",
         lambda p: _prefixed(_utf8_header(b"ab\xff\xfe", p.info)), "malformed frame header"),
        ("channel-1025-bytes", "post",
         lambda p: P.encode_frame(Kind.SEND, "a" * 1025, p.info), "channel longer than"),
        ("header-length-9000", "post",
         lambda p: P.PREFIX.pack(9000, 0, 0) + b"\x00" * 9000, "header length 9000"),
        ("frame-announcing-2GiB", "post",
         lambda p: P.PREFIX.pack(20, 2 * 1024 ** 3, 0) + b"\x00" * 4096, "over the limit"),
        ("nfds-without-descriptors", "post",
         lambda p: p.frame(Kind.SEND, "fuzz", body=P.pack_payload([[1], ["fd"] * 3]),
                           nfds=3), "descriptors"),
        ("hello-again", "post",
         lambda p: P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid())), "HELLO"),
        ("welcome-from-a-client", "post",
         lambda p: P.welcome_frame(1, True, 1000), "WELCOME"),
        ("send-without-sender", "post",
         lambda p: P.encode_frame(Kind.SEND, "fuzz", None, body=P.pack_payload([1])),
         "without a sender"),
    ]


NAMED = _named_cases()


@pytest.mark.timeout(90)
def test_named_bad_inputs_close_only_that_connection(make_target: Any) -> None:
    """Each named bad input closes its own connection with a logged reason; a canary client
    is served throughout, and nothing of the bad connections is left behind."""
    target = make_target()
    canary = Canary(target)
    try:
        failures: list[str] = []
        closed_in: dict[str, float] = {}
        seen = len(target.drops())
        for name, phase, make, words in NAMED + [
                ("spoofed-sender", "post", lambda p: P.encode_frame(
                    Kind.SEND, "fuzz", [canary.client.peer.id, "canary", "socket", 1],
                    body=P.pack_payload(["spoof"])), "not a peer of this connection")]:
            peer = target.raw()
            try:
                if phase == "post":
                    peer.join()
                peer.send(make(peer))
                took = peer.wait_eof(3.0)
            finally:
                peer.close()
            drops = target.drops()
            new, seen = drops[seen:], len(drops)
            if took is not None:
                closed_in[name] = took
            if took is None:
                failures.append(f"{name}: the connection was kept")
            elif len(new) != 1 or words not in new[0]:
                failures.append(f"{name}: logged {new!r}, expected one line with {words!r}")
            canary.check()
        clean_after(target, canary)
        deadline = {"silence", "half-a-hello"}
        report(f"named bad inputs ({target.kind})", cases=len(NAMED) + 1,
               closed_within_s=round(max(v for k, v in closed_in.items()
                                         if k not in deadline), 4),
               silent_ones_closed_within_s=round(max(v for k, v in closed_in.items()
                                                     if k in deadline), 3))
        assert canary.fuzz == 0  # no bad frame was routed on to the canary
        assert target.alive()
        assert "internal error" not in target.log() and "Traceback" not in target.log()
        assert failures == []
    finally:
        canary.close()


# -- generated frames --------------------------------------------------------------------------
# A case is (category, phase, make(peer) -> bytes). Categories and what must happen:
#   must close (a logged reason): "header" (a header the decoder refuses), "kind" (unknown
#     kind), "utf8" (channel not UTF-8), "oversize" (announced sizes over the limits), "spoof"
#     (a frame in the name of a peer that is not this connection's), "nfds" (descriptors
#     announced, none sent), and every "pre" case (before the handshake: refused, or dropped
#     at the handshake deadline);
#   must stay open: "truncated" (a valid frame cut short: the rest may still come), "body"
#     (a valid frame with any body bytes at all: the broker never decodes bodies; the canary
#     must decode-or-log-and-drop it, not crash its reader);
#   either: "random" after the handshake (but closed => a logged reason, always).
MUST_CLOSE = {"header", "kind", "utf8", "oversize", "spoof", "nfds"}
MUST_STAY = {"truncated", "body"}

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
real_kinds = st.sampled_from(sorted(P.KINDS))


@st.composite
def bad_headers(draw: Any) -> Callable[[RawPeer], bytes]:
    """Header arrays of 5+ fields with at least one field of a wrong type or value."""
    wrong = draw(st.sets(st.integers(0, 4), min_size=1))
    replacements = {i: draw(values) for i in wrong}
    extra = draw(st.lists(values, max_size=2))
    raw_header = draw(st.booleans())

    def make(peer: RawPeer) -> bytes:
        fields: list[Any] = [int(Kind.SEND), "fuzz", peer.info or GOOD_SENDER, None, 0]
        for i, v in replacements.items():
            fields[i] = v
        header = _header(fields + extra)
        try:
            P.decode_header(header)
        except IpcBusProtocolError:
            return _prefixed(header)
        return b""  # happened to be valid: filtered out below
    if raw_header:  # not even msgpack, or not an array
        data = draw(st.binary(min_size=1, max_size=64))
        try:
            P.decode_header(data)
        except Exception:
            return lambda peer: _prefixed(data)
        assume(False)
    return make


@st.composite
def cases(draw: Any) -> tuple[str, str, Callable[[RawPeer], bytes]]:
    category = draw(st.sampled_from(["random", "header", "kind", "utf8", "oversize", "spoof",
                                     "nfds", "truncated", "body"]))
    phase = "post"
    if category in ("random", "header", "oversize"):
        phase = draw(st.sampled_from(["pre", "post"]))
    make: Callable[[RawPeer], bytes]
    if category == "random":
        data = draw(st.binary(min_size=1, max_size=600))
        make = lambda peer: data  # noqa: E731
    elif category == "header":
        make = draw(bad_headers())
    elif category == "kind":
        kind = draw(st.integers(min_value=-2**63, max_value=2**64 - 1).filter(
            lambda k: k not in P.KINDS))
        make = lambda peer: _prefixed(_header([kind, "fuzz", peer.info, None, 0]))  # noqa
    elif category == "utf8":
        raw_channel = draw(st.binary(min_size=1, max_size=40).filter(_not_utf8))
        make = lambda peer: _prefixed(_utf8_header(raw_channel, peer.info))  # noqa: E731
    elif category == "oversize":
        hlen, blen = draw(st.one_of(
            st.tuples(st.just(0), st.integers(0, 100)),
            st.tuples(st.integers(P.MAX_HEADER + 1, 0xFFFF), st.integers(0, 100)),
            st.tuples(st.integers(1, 100), st.integers(P.DEFAULT_MAX_MESSAGE + 1, 0xFFFFFFFF))))
        tail = draw(st.binary(max_size=64))
        make = lambda peer: P.PREFIX.pack(hlen, blen, 0) + tail  # noqa: E731
    elif category == "spoof":
        kind = draw(real_kinds.filter(lambda k: k != Kind.PEER_ADD))
        other = draw(st.sampled_from(["canary", "stranger", "none"]))
        channel = draw(st.sampled_from(["fuzz", "canary", "x"]))

        def make(peer: RawPeer, kind: int = kind, other: str = other,
                 channel: str = channel) -> bytes:
            sender = {"canary": _canary_info, "stranger": ["9.stranger", "s", "socket", 9],
                      "none": None}[other]
            return P.encode_frame(kind, channel, sender, None, 1, P.pack_payload([1]))
    elif category == "nfds":
        nfds = draw(st.integers(1, P.MAX_FDS))
        kind = draw(st.sampled_from([Kind.SEND, Kind.SEND_TO, Kind.REQUEST]))
        make = lambda peer: peer.frame(kind, "fuzz", peer.info[0] if peer.info else None,  # noqa
                                       rid=5, body=b"\x90", nfds=nfds)
    elif category == "truncated":
        body = draw(st.binary(max_size=300))
        cut = draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True))

        def make(peer: RawPeer, body: bytes = body, cut: float = cut) -> bytes:
            frame = peer.frame(Kind.SEND, "fuzz", body=body)
            return frame[:max(1, int(len(frame) * cut))]
    else:  # body
        body = draw(st.one_of(st.binary(max_size=300), values.map(P.pack_payload),
                              st.integers(1, 20_000).map(_deep)))
        kind = draw(st.sampled_from([Kind.SEND, Kind.SEND_TO]))

        def make(peer: RawPeer, body: bytes = body, kind: int = kind) -> bytes:
            target = _canary_info[0] if kind == Kind.SEND_TO else None
            return peer.frame(kind, "fuzz", target, body=body)
    return category, phase, make


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


_canary_info: list[Any] = ["0.canary", "canary", "socket", 0]  # set by the test


def run_case(target: Target, canary: Canary, case: tuple[str, str, Callable[[RawPeer], bytes]],
             seen: list[int]) -> None:
    """Send one case on a new connection; check what must happen, and the canary."""
    category, phase, make = case
    peer = target.raw()
    try:
        if phase == "post":
            peer.join()
        data = make(peer)
        assume(data)
        peer.send(data)
        if phase == "pre" or category in MUST_CLOSE:
            took = peer.wait_eof(3.0)  # "pre" may wait for the handshake deadline (0.5 s)
            assert took is not None, f"{category}/{phase}: the connection was kept"
        else:
            canary.check()  # the broker has read past our bytes by now
            took = peer.wait_eof(0.02)
            if category in MUST_STAY:
                assert took is None, f"{category}: the connection was closed"
    finally:
        peer.close()
    canary.check()
    drops = target.drops()
    new = drops[seen[0]:]
    seen[0] = len(drops)
    if took is not None:
        assert len(new) == 1, f"{category}/{phase}: closed, logged {new!r}"
        assert re.search(r"protocol error|handshake", new[0]), new[0]
    clean_after(target, canary)


def fuzz(make_target: Any, examples: int) -> None:
    """Hypothesis-generated bad frames, each on a new raw socket (broker) or raw bridge pipe
    (bridge): closed => a logged reason; the canary is answered after every case; the broker
    (its process) or the bridge (its thread) is alive at the end and its state is clean."""
    target = make_target()
    canary = Canary(target)
    try:
        _canary_info[:] = [canary.client.peer.id, "canary", canary.client.peer.process.type,
                           os.getpid()]
        seen = [len(target.drops())]
        counts: collections.Counter[str] = collections.Counter()

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def run(case: tuple[str, str, Callable[[RawPeer], bytes]]) -> None:
            counts[case[0]] += 1
            run_case(target, canary, case, seen)

        with elapsed() as t:
            run()
        report(f"generated frames ({target.kind})", cases=sum(counts.values()),
               seconds=round(t[0], 1), by_category=dict(sorted(counts.items())),
               fuzz_bodies_decoded=canary.fuzz, connections_dropped=len(target.drops()))
        assert target.alive()
        log = target.log()
        assert "internal error" not in log and "Traceback" not in log, log[-2000:]
        assert set(counts) >= MUST_CLOSE | MUST_STAY
    finally:
        canary.close()


@pytest.mark.timeout(120)
def test_generated_frames_close_only_that_connection(make_target: Any) -> None:
    """400 generated cases per target (see :func:`fuzz`)."""
    fuzz(make_target, 400)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generated_frames_many(make_target: Any) -> None:
    """3 000 generated cases per target (see :func:`fuzz`)."""
    fuzz(make_target, 3000)


# -- bodies: never decoded by the broker; a receiving client logs and drops what it cannot --
@pytest.mark.timeout(60)
def test_payload_nested_10000_deep(make_target: Any, caplog: Any) -> None:
    """A body nested 10 000 arrays deep crosses the broker/bridge untouched (the raw sender
    stays connected); the receiving client logs and drops it, as a broadcast, as a request
    and as an answer, and its reader and dispatcher go on."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    target = make_target()
    canary = Canary(target)
    peer = target.raw()
    try:
        got = Collector()
        asked = Collector()
        canary.client.on("deep", got)
        canary.client.on("deep-ask", asked)
        sync(canary.client)
        peer.join("deep-sender")
        peer.send(peer.frame(Kind.SUBSCRIBE, "ask-raw", rid=1))
        deep = _deep(10_000)

        # a broadcast, then a normal one: only the second reaches the listener
        peer.send(peer.frame(Kind.SEND, "deep", body=deep)
                  + peer.frame(Kind.SEND, "deep", body=P.pack_payload(["after"])))
        assert got.wait(1)[0][1] == ("after",)
        # a request with a deep body: dropped by the receiving client (logged)
        peer.send(peer.frame(Kind.REQUEST, "deep-ask", rid=7, body=deep))
        # an answer with a deep body: the requester's request fails, its reader goes on
        future = canary.client.request_async("ask-raw", 5.0)
        request = peer.expect(Kind.REQUEST)
        peer.send(peer.frame(Kind.RESPONSE, "ask-raw", request.sender[0], request.rid, deep))
        with pytest.raises(IpcBusRequestError, match="undecodable answer"):
            future.result(5)
        canary.check()
        sync(canary.client)
        dropped = [r.getMessage() for r in caplog.records
                   if "dropped a message" in r.getMessage()]
        assert len(dropped) == 2, dropped
        assert all("StackError" in m or "malformed" in m for m in dropped), dropped
        assert asked.items == [] and len(got.items) == 1
        assert peer.wait_eof(0.05) is None  # the broker/bridge never looked into the bodies
        # and a Python value that deep is refused at the call, nothing sent
        value: Any = None
        for _ in range(10_000):
            value = [value]
        with pytest.raises(ValueError):
            canary.client.send("deep", value)
        canary.check()
        assert len(got.items) == 1
        assert target.alive()
    finally:
        peer.close()
        canary.close()


class _Trap:
    """Unpickling this would create a directory: proof that something ran wire data."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


@pytest.mark.timeout(60)
def test_pickle_payload_is_just_bytes(make_target: Any, tmp_path: Path, caplog: Any) -> None:
    """A pickle that would run code when loaded, sent as a raw body and as a bytes argument:
    the raw body is undecodable msgpack (logged, dropped), the argument arrives as the same
    bytes; nothing is unpickled anywhere."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    marker = tmp_path / "unpickled"
    _Trap.marker = str(marker)
    payload = pickle.dumps(_Trap(), protocol=pickle.HIGHEST_PROTOCOL)
    target = make_target()
    canary = Canary(target)
    peer = target.raw()
    try:
        got = Collector()
        canary.client.on("pickled", got)
        sync(canary.client)
        peer.join("pickler")
        peer.send(peer.frame(Kind.SEND, "pickled", body=payload))
        peer.send(peer.frame(Kind.SEND, "pickled", body=P.pack_payload([payload])))
        sender = IpcBusClient.create().connect(target.address(), peer_name="sender")
        try:
            sender.send("pickled", payload, {"nested": payload})
            items = got.wait(2)
        finally:
            sender.close()
        sync(canary.client)
        assert [a for _, a in got.items] == [(payload,), (payload, {"nested": payload})]
        assert any("dropped a message on 'pickled'" in r.getMessage() for r in caplog.records)
        assert not marker.exists()
        assert items and target.alive()
    finally:
        peer.close()
        canary.close()
