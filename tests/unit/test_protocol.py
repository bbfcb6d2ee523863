"""The wire protocol, tested as pure code: payloads, frames, the decoder's limits, the handshake.

Nothing here opens a socket or starts a thread: bytes go into a FrameDecoder, frames come out.
"""
from __future__ import annotations

import datetime
import decimal
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._protocol import (
    MAX_CHANNEL,
    MAX_FDS,
    MAX_HEADER,
    PREFIX,
    PREFIX_SIZE,
    Frame,
    Kind,
)
from ipcbus._decoder import FrameDecoder
from ipcbus.errors import IpcBusProtocolError

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def same(a: Any, b: Any) -> bool:
    """Deep equality that also checks types (True is not 1) and the sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        # msgpack keeps the insertion order of maps
        return (same(list(a.keys()), list(b.keys()))
                and same(list(a.values()), list(b.values())))
    return bool(a == b)


def decode(data: bytes, **kw: Any) -> list[Frame]:
    dec = FrameDecoder(**kw)
    dec.feed(data)
    frames = dec.frames()
    assert dec.pending_bytes == 0
    return frames


def one(data: bytes, **kw: Any) -> Frame:
    frames = decode(data, **kw)
    assert len(frames) == 1
    return frames[0]


def raw_frame(header: bytes, body: bytes = b"") -> bytes:
    """A frame around hand-made header bytes."""
    return PREFIX.pack(len(header), len(body), 0) + header + body


def header_of(fields: list[Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def feed_chunks(dec: FrameDecoder, data: bytes, sizes: list[int]) -> None:
    """Feed ``data`` in pieces whose sizes cycle through ``sizes``."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        dec.feed(data[pos:pos + n])
        pos += n
        i += 1


def recv_into_chunks(dec: FrameDecoder, data: bytes, sizes: list[int]) -> None:
    """Deliver ``data`` as a socket's recv_into would: through get_buffer / buffer_updated."""
    pos, i = 0, 0
    while pos < len(data):
        buf = dec.get_buffer()
        assert len(buf) > 0, "get_buffer returned an empty view"
        want = sizes[i % len(sizes)] if sizes else len(data)
        n = min(len(buf), want, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        del buf
        dec.buffer_updated(n)
        pos += n
        i += 1


# ---------------------------------------------------------------------------------------------
# payloads
# ---------------------------------------------------------------------------------------------

INT64 = st.integers(min_value=-2**63, max_value=2**64 - 1)
scalars = (st.none() | st.booleans() | INT64 | st.floats(allow_nan=False)
           | st.text() | st.binary())
payloads = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=6)
                      | st.dictionaries(st.text(max_size=10) | INT64, children, max_size=6)),
    max_leaves=25,
)


@FAST
@given(payloads)
def test_payload_round_trip(value: Any) -> None:
    data = P.pack_payload(value)
    assert isinstance(data, bytes)
    back = P.unpack_payload(data)
    assert same(back, value), (value, back)
    # memoryview / bytearray bodies decode the same (the decoder hands out memoryviews)
    assert same(P.unpack_payload(memoryview(data)), value)
    assert same(P.unpack_payload(bytearray(data)), value)


@pytest.mark.parametrize("value", [
    0, -1, 1, 2**63 - 1, -2**63, 2**63, 2**64 - 1, 0.0, -0.0, 1.5, math.inf, -math.inf,
    1e308, 5e-324, "", "é€😀", b"", b"\x00\xff", True, False, None, [], {}, {1: "a", "b": 2},
])
def test_payload_round_trip_edges(value: Any) -> None:
    assert same(P.unpack_payload(P.pack_payload(value)), value)


def test_payload_nan() -> None:
    back = P.unpack_payload(P.pack_payload(float("nan")))
    assert type(back) is float and math.isnan(back)
    back = P.unpack_payload(P.pack_payload([math.nan, {"x": -math.nan}]))
    assert math.isnan(back[0]) and math.isnan(back[1]["x"])


def test_payload_documented_conversions() -> None:
    """Tuples come back as lists; bytearray and memoryview come back as bytes."""
    assert same(P.unpack_payload(P.pack_payload((1, "a", (2, 3)))), [1, "a", [2, 3]])
    assert same(P.unpack_payload(P.pack_payload({"t": (1,)})), {"t": [1]})
    assert same(P.unpack_payload(P.pack_payload(bytearray(b"abc"))), b"abc")
    assert same(P.unpack_payload(P.pack_payload(memoryview(b"xyz"))), b"xyz")
    assert same(P.unpack_payload(P.pack_payload([bytearray(b"\x00"), memoryview(b"\x01")])),
                [b"\x00", b"\x01"])


class _Opaque:
    pass


@pytest.mark.parametrize("value", [
    object(),
    _Opaque(),
    {1, 2},
    frozenset({1}),
    datetime.datetime(2024, 1, 2, 3, 4, 5),
    datetime.datetime.now(datetime.timezone.utc),
    datetime.date(2024, 1, 2),
    2**70,
    2**64,
    -2**63 - 1,
    complex(1, 2),
    decimal.Decimal("1.5"),
    [1, 2, object()],
    {"a": {"b": {1, 2}}},
    {"a": 2**70},
    ("ok", datetime.datetime(2024, 1, 1)),
], ids=lambda v: type(v).__name__)
def test_pack_payload_refuses_unserializable(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        P.pack_payload(value)
    assert isinstance(info.value, (TypeError, ValueError))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xd9"])
def test_unpack_payload_malformed(data: bytes) -> None:
    with pytest.raises(IpcBusProtocolError):
        P.unpack_payload(data)


# ---------------------------------------------------------------------------------------------
# frames: encode_frame -> FrameDecoder round trip
# ---------------------------------------------------------------------------------------------

# a channel of at most 256 characters is at most 1024 bytes of UTF-8
channels = st.text(max_size=256)
senders = st.none() | st.tuples(
    st.text(min_size=1, max_size=40), st.text(max_size=40),
    st.sampled_from(["main", "pipe", "socket"]) | st.text(max_size=10),
    st.integers(min_value=-2**63, max_value=2**64 - 1),
).map(list)
targets = st.none() | st.text(max_size=40)


@st.composite
def frame_specs(draw: Any, max_body: int = 300) -> dict[str, Any]:
    return {
        "kind": draw(st.sampled_from(list(Kind))),
        "channel": draw(channels),
        "sender": draw(senders),
        "target": draw(targets),
        "rid": draw(st.integers(min_value=0, max_value=2**63 - 1)),
        "nfds": draw(st.integers(min_value=0, max_value=MAX_FDS)),
        "body": draw(st.binary(max_size=max_body)),
    }


def encode(spec: dict[str, Any]) -> bytes:
    return P.encode_frame(spec["kind"], spec["channel"], spec["sender"], spec["target"],
                          spec["rid"], spec["body"], spec["nfds"])


def check_frame(frame: Frame, spec: dict[str, Any], raw: bytes) -> None:
    assert frame.kind == spec["kind"]
    assert type(frame.kind) is int
    assert frame.channel == spec["channel"]
    assert frame.sender == spec["sender"]
    assert frame.sender_id == (spec["sender"][0] if spec["sender"] is not None else None)
    assert frame.target == spec["target"]
    assert frame.rid == spec["rid"]
    assert frame.nfds == spec["nfds"]
    assert bytes(frame.body) == spec["body"]
    assert bytes(frame.raw) == raw  # forwarded unchanged by routers
    assert frame.fds == []
    repr(frame)


@FAST
@given(st.lists(frame_specs(), min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
       st.booleans())
def test_frame_round_trip_chunked(specs: list[dict[str, Any]], sizes: list[int],
                                  use_recv_into: bool) -> None:
    raws = [encode(s) for s in specs]
    stream = b"".join(raws)
    dec = FrameDecoder()
    if use_recv_into:
        recv_into_chunks(dec, stream, sizes)
    else:
        feed_chunks(dec, stream, sizes)
    frames = dec.frames()
    assert len(frames) == len(specs)
    for frame, spec, raw in zip(frames, specs, raws):
        check_frame(frame, spec, raw)
    assert dec.pending_bytes == 0
    assert dec.frames() == []


@QUICK
@given(st.lists(frame_specs(max_body=40), min_size=1, max_size=3))
def test_frame_round_trip_one_byte_at_a_time(specs: list[dict[str, Any]]) -> None:
    raws = [encode(s) for s in specs]
    stream = b"".join(raws)
    dec = FrameDecoder()
    got: list[Frame] = []
    boundaries = set()
    pos = 0
    for r in raws:
        pos += len(r)
        boundaries.add(pos)
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got.extend(dec)  # iteration takes the frames
        if i + 1 in boundaries:
            assert dec.pending_bytes == 0
        else:
            assert dec.pending_bytes > 0
    assert len(got) == len(specs)
    for frame, spec, raw in zip(got, specs, raws):
        check_frame(frame, spec, raw)


@FAST
@given(st.lists(frame_specs(max_body=5000), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=8),
       st.booleans())
def test_big_frames_through_small_chunk(specs: list[dict[str, Any]], sizes: list[int],
                                        use_recv_into: bool) -> None:
    """Frames larger than the decoder's chunk go through the dedicated buffer path."""
    raws = [encode(s) for s in specs]
    stream = b"".join(raws)
    dec = FrameDecoder(chunk=1024)
    if use_recv_into:
        recv_into_chunks(dec, stream, sizes)
    else:
        feed_chunks(dec, stream, sizes)
    frames = dec.frames()
    assert len(frames) == len(specs)
    for frame, spec, raw in zip(frames, specs, raws):
        check_frame(frame, spec, raw)
    assert dec.pending_bytes == 0


@pytest.mark.parametrize("chunk", [1024, 16384])
@pytest.mark.parametrize("delta", [-2, -1, 0, 1, 2])
@pytest.mark.parametrize("lead", [0, 1, 100, 700])
@pytest.mark.parametrize("mode", ["whole", "bytes", "recv_into", "recv_into_7"])
def test_frames_around_the_chunk_size(chunk: int, delta: int, lead: int, mode: str) -> None:
    """A frame of exactly chunk +/- a few bytes, after a small frame that shifts the start."""
    first = P.encode_frame(Kind.SEND, "a", None, None, 0, b"x" * lead)
    hdr_len = len(P.encode_header(Kind.SEND, "big", None, None, 0))
    body = bytes(range(256)) * ((chunk // 256) + 2)
    body = body[:chunk + delta - PREFIX_SIZE - hdr_len]
    second = P.encode_frame(Kind.SEND, "big", None, None, 0, body)
    assert len(second) == chunk + delta
    third = P.encode_frame(Kind.SEND, "c", None, None, 7, b"tail")
    stream = first + second + third + second
    dec = FrameDecoder(chunk=chunk)
    if mode == "whole":
        dec.feed(stream)
    elif mode == "bytes":
        for i in range(len(stream)):
            dec.feed(stream[i:i + 1])
    elif mode == "recv_into":
        recv_into_chunks(dec, stream, [])
    else:
        recv_into_chunks(dec, stream, [7, 1, 513, 4000])
    frames = dec.frames()
    assert [bytes(f.raw) for f in frames] == [first, second, third, second]
    assert bytes(frames[1].body) == body
    assert dec.pending_bytes == 0


def test_big_frame_buffer_is_filled_in_place() -> None:
    """A frame larger than the chunk: get_buffer hands out views of one dedicated buffer."""
    body = bytes(range(256)) * 40  # 10240 bytes
    raw = P.encode_frame(Kind.SEND, "ch", ["id", "n", "socket", 1], None, 0, body)
    dec = FrameDecoder(chunk=1024)
    dec.feed(raw[:100])
    assert dec.pending_bytes == 100
    assert dec.frames() == []
    buf = dec.get_buffer()
    assert 0 < len(buf) <= len(raw) - 100
    n = 0
    pos = 100
    while pos < len(raw):
        buf = dec.get_buffer()
        n = min(len(buf), 333)
        buf[:n] = raw[pos:pos + n]
        del buf
        dec.buffer_updated(n)
        pos += n
        if pos < len(raw):
            assert dec.pending_bytes == pos
            assert dec.frames() == []
    frames = dec.frames()
    assert len(frames) == 1
    assert bytes(frames[0].raw) == raw
    assert bytes(frames[0].body) == body
    assert dec.pending_bytes == 0
    # the decoder is back on its chunk buffer: small frames still work
    small = P.encode_frame(Kind.SEND, "x", None, None, 0, b"1")
    dec.feed(small)
    assert [bytes(f.raw) for f in dec.frames()] == [small]


def test_big_frame_up_to_max_message_is_accepted() -> None:
    body = b"\xab" * 5000
    raw = P.encode_frame(Kind.SEND, "ch", None, None, 0, body)
    assert bytes(one(raw, max_message=5000, chunk=1024).body) == body
    with pytest.raises(IpcBusProtocolError):
        decode(raw, max_message=4999, chunk=1024)


# ---------------------------------------------------------------------------------------------
# decoder robustness: random bytes and truncated frames
# ---------------------------------------------------------------------------------------------

def feed_expecting_only_protocol_errors(dec: FrameDecoder, data: bytes, sizes: list[int]) -> bool:
    """Feed; True if it raised IpcBusProtocolError (any other exception fails the test)."""
    try:
        feed_chunks(dec, data, sizes)
    except IpcBusProtocolError:
        return True
    frames = dec.frames()
    for f in frames:  # whatever was accepted is a well-formed frame
        assert f.kind in P.KINDS
        assert isinstance(f.channel, str) and len(f.channel.encode()) <= MAX_CHANNEL
        assert 0 <= f.nfds <= MAX_FDS
        assert isinstance(f.rid, int) and f.rid >= 0
    return False


@FAST
@given(st.binary(max_size=400),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5),
       st.sampled_from([(1 << 20, 1024), (P.DEFAULT_MAX_MESSAGE, 1024),
                        (P.DEFAULT_MAX_MESSAGE, FrameDecoder.CHUNK)]))
def test_decoder_random_bytes(data: bytes, sizes: list[int], limits: tuple[int, int]) -> None:
    max_message, chunk = limits
    feed_expecting_only_protocol_errors(FrameDecoder(max_message=max_message, chunk=chunk),
                                        data, sizes)


@FAST
@given(st.binary(min_size=1, max_size=200), st.binary(max_size=50))
def test_decoder_random_header_bytes(header: bytes, body: bytes) -> None:
    """A valid prefix around random header bytes: decoded or refused, nothing else."""
    assume(len(header) <= MAX_HEADER)
    feed_expecting_only_protocol_errors(FrameDecoder(), raw_frame(header, body), [1000])


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=8)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12,
)


@FAST
@given(st.lists(msgpack_values, min_size=0, max_size=8))
def test_decoder_random_header_arrays(fields: list[Any]) -> None:
    """Arbitrary msgpack arrays as headers: only IpcBusProtocolError, or a valid frame."""
    header = header_of(fields)
    assume(len(header) <= MAX_HEADER)
    feed_expecting_only_protocol_errors(FrameDecoder(), raw_frame(header, b"body"), [1000])


@FAST
@given(frame_specs(max_body=100), st.data())
def test_decoder_mutated_frames(spec: dict[str, Any], data: Any) -> None:
    """A valid frame with a few bytes changed: only IpcBusProtocolError, or frames."""
    raw = bytearray(encode(spec))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[i] = data.draw(st.integers(min_value=0, max_value=255))
    feed_expecting_only_protocol_errors(FrameDecoder(max_message=1 << 20, chunk=1024),
                                        bytes(raw) + bytes(raw), [17])


@FAST
@given(st.lists(frame_specs(max_body=3000), min_size=1, max_size=3), st.data())
def test_decoder_truncated_frames(specs: list[dict[str, Any]], data: Any) -> None:
    """A stream cut anywhere: whole frames come out, the rest stays pending; no error."""
    raws = [encode(s) for s in specs]
    stream = b"".join(raws)
    cut = data.draw(st.integers(min_value=1, max_value=len(stream) - 1))
    for chunk in (1024, FrameDecoder.CHUNK):
        dec = FrameDecoder(chunk=chunk)
        feed_chunks(dec, stream[:cut], [data.draw(st.integers(min_value=1, max_value=2000))])
        frames = dec.frames()
        complete = 0
        pos = 0
        for r in raws:
            if pos + len(r) <= cut:
                complete += 1
                pos += len(r)
            else:
                break
        assert [bytes(f.raw) for f in frames] == raws[:complete]
        assert dec.pending_bytes == cut - pos
        # and the rest of the stream completes it
        dec.feed(stream[cut:])
        assert [bytes(f.raw) for f in dec.frames()] == raws[complete:]
        assert dec.pending_bytes == 0


def test_every_truncation_of_a_frame_is_pending() -> None:
    raw = P.encode_frame(Kind.REQUEST, "chan", ["p1", "name", "socket", 42], "t", 9, b"body", 2)
    for cut in range(1, len(raw)):
        for chunk in (1024, FrameDecoder.CHUNK):
            dec = FrameDecoder(chunk=chunk)
            dec.feed(raw[:cut])
            assert dec.frames() == []
            assert dec.pending_bytes == cut


# ---------------------------------------------------------------------------------------------
# decoder: targeted malformed frames
# ---------------------------------------------------------------------------------------------

GOOD = [int(Kind.SEND), "ch", ["id", "name", "socket", 1], None, 0]


def expect_protocol_error(data: bytes, **kw: Any) -> IpcBusProtocolError:
    dec = FrameDecoder(**kw)
    with pytest.raises(IpcBusProtocolError) as info:
        dec.feed(data)
    return info.value


def test_good_hand_made_header_is_accepted() -> None:
    frame = one(raw_frame(header_of(GOOD), b"xyz"))
    assert (frame.kind, frame.channel, frame.sender, frame.target, frame.nfds) == tuple(GOOD)
    assert frame.rid == 0


def test_header_length_zero() -> None:
    expect_protocol_error(PREFIX.pack(0, 0, 0))
    expect_protocol_error(PREFIX.pack(0, 10, 0) + b"x" * 10)
    # refused on the 14-byte prefix alone, before any body byte arrives
    expect_protocol_error(PREFIX.pack(0, 10, 0))


def test_header_length_over_max_is_refused_on_the_prefix() -> None:
    expect_protocol_error(PREFIX.pack(MAX_HEADER + 1, 0, 0))
    expect_protocol_error(PREFIX.pack(0xFFFF, 0, 0))
    # MAX_HEADER itself is allowed by the prefix check: nothing raised until the header is in
    dec = FrameDecoder()
    dec.feed(PREFIX.pack(MAX_HEADER, 0, 0))
    assert dec.pending_bytes == PREFIX_SIZE


@pytest.mark.parametrize("chunk", [1024, FrameDecoder.CHUNK])
def test_body_over_max_message_is_refused_on_the_prefix(chunk: int) -> None:
    header = P.encode_header(Kind.SEND, "ch", None, None, 0)
    prefix = PREFIX.pack(len(header), 1001, 0)
    # the 6-byte prefix alone raises, before any header or body byte arrives
    expect_protocol_error(prefix, max_message=1000, chunk=chunk)
    # ... also when it arrives one byte at a time: nothing until the 6th byte
    dec = FrameDecoder(max_message=1000, chunk=chunk)
    for b in prefix[:-1]:
        dec.feed(bytes([b]))
    with pytest.raises(IpcBusProtocolError):
        dec.feed(prefix[-1:])
    # ... and through get_buffer / buffer_updated
    dec = FrameDecoder(max_message=1000, chunk=chunk)
    buf = dec.get_buffer()
    buf[:PREFIX_SIZE] = prefix
    del buf
    with pytest.raises(IpcBusProtocolError):
        dec.buffer_updated(PREFIX_SIZE)
    # ... and after a complete small frame in the same read
    small = P.encode_frame(Kind.SEND, "ok", None, None, 0, b"1")
    expect_protocol_error(small + prefix, max_message=1000, chunk=chunk)
    # exactly max_message is fine
    dec = FrameDecoder(max_message=1000, chunk=chunk)
    dec.feed(PREFIX.pack(len(header), 1000, 0))
    assert dec.pending_bytes == PREFIX_SIZE


def test_default_limit_refuses_a_huge_announced_body_without_allocating() -> None:
    expect_protocol_error(PREFIX.pack(10, P.DEFAULT_MAX_MESSAGE + 1, 0))
    expect_protocol_error(PREFIX.pack(10, 0xFFFFFFFF, 0))


@pytest.mark.parametrize("kind", [0, max(P.KINDS) + 1, 99, 127, 255, -1, 2**40, "7", 7.0, None,
                                  True, [7]])
def test_unknown_kind(kind: Any) -> None:
    expect_protocol_error(raw_frame(header_of([kind] + GOOD[1:])))


BAD_FIELDS = [
    # (index, bad value)
    (1, None), (1, 5), (1, b"bin"), (1, ["a"]), (1, True), (1, 1.5),
    (2, "peer"), (2, []), (2, ["id", "n", "t"]), (2, ["id", "n", "t", 1, 5]),
    (2, [1, "n", "t", 1]), (2, ["", "n", "t", 1]), (2, ["id", 1, "t", 1]),
    (2, ["id", "n", None, 1]), (2, ["id", "n", "t", "1"]), (2, ["id", "n", "t", 1.0]),
    (2, ["id", "n", "t", True]), (2, ["id", "n", "t", None]), (2, [None, "n", "t", 1]),
    (2, 5), (2, True), (2, b"peer"),
    (3, 5), (3, []), (3, b"x"), (3, True), (3, ["t"]), (3, 1.0),
    (4, -1), (4, MAX_FDS + 1), (4, 1000), (4, "1"), (4, 1.0), (4, None), (4, True), (4, [1]),
]


def test_rid_over_2_63_is_refused_on_the_prefix() -> None:
    header = header_of(GOOD)
    for rid in (2**63, 2**64 - 1):
        err = expect_protocol_error(PREFIX.pack(len(header), 0, rid))
        assert "rid" in str(err)
    frame = one(PREFIX.pack(len(header), 0, 2**63 - 1) + header)
    assert frame.rid == 2**63 - 1


@pytest.mark.parametrize("index,value", BAD_FIELDS, ids=[f"{i}-{v!r}" for i, v in BAD_FIELDS])
def test_wrong_type_in_header_field(index: int, value: Any) -> None:
    fields = list(GOOD)
    fields[index] = value
    expect_protocol_error(raw_frame(header_of(fields)))


def test_map_in_sender_is_refused() -> None:
    fields = list(GOOD)
    fields[2] = {"id": "x"}
    expect_protocol_error(raw_frame(header_of(fields)))


@pytest.mark.parametrize("channel", [
    "a" * (MAX_CHANNEL + 1),
    "a" * 5000,
    "é" * (MAX_CHANNEL // 2 + 1),  # 513 characters, 1026 bytes
    "€" * (MAX_CHANNEL // 3 + 1),  # 342 characters, 1026 bytes
    "😀" * (MAX_CHANNEL // 4 + 1),  # 257 characters, 1028 bytes
    "a" * 1023 + "é",  # 1024 characters, 1025 bytes
], ids=["ascii-1025", "ascii-5000", "2byte-1026", "3byte-1026", "4byte-1028", "mixed-1025"])
def test_channel_over_max_bytes_is_refused(channel: str) -> None:
    assert len(channel.encode("utf-8")) > MAX_CHANNEL
    fields = list(GOOD)
    fields[1] = channel
    expect_protocol_error(raw_frame(header_of(fields)))


@pytest.mark.parametrize("channel", ["a" * MAX_CHANNEL, "é" * (MAX_CHANNEL // 2),
                                     "😀" * (MAX_CHANNEL // 4), ""])
def test_channel_up_to_max_bytes_is_accepted(channel: str) -> None:
    frame = one(P.encode_frame(Kind.SEND, channel))
    assert frame.channel == channel


@pytest.mark.parametrize("raw_channel", [b"\xff\xfe", b"\xc3", b"a\x80b", b"\xed\xa0\x80"])
def test_invalid_utf8_channel(raw_channel: bytes) -> None:
    assert len(raw_channel) < 32
    header = (b"\x95" + msgpack.packb(int(Kind.SEND))
              + bytes([0xA0 | len(raw_channel)]) + raw_channel  # fixstr with raw bytes
              + msgpack.packb(None) + msgpack.packb(None) + msgpack.packb(0))
    expect_protocol_error(raw_frame(header))
    # the same hand-made layout with valid UTF-8 is accepted (the construction is right)
    good = (b"\x95" + msgpack.packb(int(Kind.SEND)) + b"\xa2ok"
            + msgpack.packb(None) + msgpack.packb(None) + msgpack.packb(0))
    assert one(raw_frame(good)).channel == "ok"


@pytest.mark.parametrize("nfds", [MAX_FDS + 1, 1000, 2**32])
def test_nfds_over_kernel_cap(nfds: int) -> None:
    fields = list(GOOD)
    fields[4] = nfds
    expect_protocol_error(raw_frame(header_of(fields)))


def test_nfds_at_kernel_cap_is_accepted() -> None:
    assert one(P.encode_frame(Kind.SEND, "c", nfds=MAX_FDS)).nfds == MAX_FDS


@pytest.mark.parametrize("header", [
    msgpack.packb({"kind": 7}),
    msgpack.packb(7),
    msgpack.packb("hello"),
    msgpack.packb(None),
    msgpack.packb(b"bytes", use_bin_type=True),
    msgpack.packb(GOOD[:4]),
    msgpack.packb([]),
    msgpack.packb(GOOD) + b"\x00",  # trailing bytes after the array
    msgpack.packb(GOOD)[:-1],  # truncated array
    b"\xc1",  # never-used msgpack byte
], ids=["map", "int", "str", "nil", "bin", "4-fields", "empty", "trailing", "truncated", "c1"])
def test_header_not_an_array_of_five(header: bytes) -> None:
    expect_protocol_error(raw_frame(header, b"body"))


def test_protocol_error_is_a_value_error() -> None:
    # the error hierarchy: IpcBusProtocolError is an IpcBusError and a ValueError
    from ipcbus.errors import IpcBusError
    err = expect_protocol_error(PREFIX.pack(0, 0, 0))
    assert isinstance(err, IpcBusError) and isinstance(err, ValueError)


# ---------------------------------------------------------------------------------------------
# check_channel
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 1, b"chan", ["a"], 1.5, bytearray(b"x")])
def test_check_channel_type(value: Any) -> None:
    with pytest.raises(TypeError):
        P.check_channel(value)


@pytest.mark.parametrize("value", ["", "a" * (MAX_CHANNEL + 1), "é" * (MAX_CHANNEL // 2 + 1),
                                   "😀" * 257, "\ud800"])
def test_check_channel_value(value: str) -> None:
    with pytest.raises(ValueError):
        P.check_channel(value)


@pytest.mark.parametrize("value", ["a", "a" * MAX_CHANNEL, "é" * (MAX_CHANNEL // 2),
                                   "€" * (MAX_CHANNEL // 3) + "a", "😀" * (MAX_CHANNEL // 4),
                                   "/ipcbus/queryState"])
def test_check_channel_ok(value: str) -> None:
    assert len(value.encode("utf-8")) <= MAX_CHANNEL
    assert P.check_channel(value) == value


def test_check_channel_multibyte_1024_bytes() -> None:
    value = "é" * 512
    assert len(value.encode("utf-8")) == 1024
    assert P.check_channel(value) == value


# ---------------------------------------------------------------------------------------------
# handshake
# ---------------------------------------------------------------------------------------------

def hello(body: Any, kind: int = Kind.HELLO) -> Frame:
    data = body if isinstance(body, bytes) else P.pack_payload(body)
    return one(P.encode_frame(kind, body=data))


def test_check_hello_accepts_good_hello() -> None:
    body = P.check_hello(one(P.encode_frame(Kind.HELLO, body=P.hello_body(4321))))
    assert body == {"magic": P.MAGIC, "version": P.VERSION, "pid": 4321}


def test_check_hello_accepts_a_newer_version() -> None:
    # a newer client: the server answers with the highest version both sides know
    body = P.check_hello(hello({"magic": P.MAGIC, "version": P.VERSION + 1, "pid": 1}))
    assert body["version"] == P.VERSION + 1


@pytest.mark.parametrize("body", [
    {"magic": "other", "version": 1, "pid": 1},
    {"magic": b"ipcbus", "version": 1, "pid": 1},
    {"version": 1, "pid": 1},
    {"magic": P.MAGIC.upper(), "version": 1, "pid": 1},
    {"magic": P.MAGIC, "pid": 1},
    {"magic": P.MAGIC, "version": 0, "pid": 1},
    {"magic": P.MAGIC, "version": -1, "pid": 1},
    {"magic": P.MAGIC, "version": "1", "pid": 1},
    {"magic": P.MAGIC, "version": 1.0, "pid": 1},
    {"magic": P.MAGIC, "version": True, "pid": 1},
    {"magic": P.MAGIC, "version": None, "pid": 1},
    [P.MAGIC, 1, 1],
    "ipcbus",
    None,
    b"\xc1",
    b"",
    b"\xdb" + struct.pack("!I", 100000) + b"x" * 100000,  # a huge str: over the control limit
], ids=lambda b: repr(b)[:30])
def test_check_hello_rejects(body: Any) -> None:
    with pytest.raises(IpcBusProtocolError):
        P.check_hello(hello(body))


@pytest.mark.parametrize("kind", [k for k in Kind if k != Kind.HELLO])
def test_check_hello_rejects_wrong_kind(kind: Kind) -> None:
    with pytest.raises(IpcBusProtocolError):
        P.check_hello(one(P.encode_frame(kind, body=P.hello_body(1))))


def test_check_welcome_returns_body() -> None:
    frame = one(P.welcome_frame(99, True, 12345))
    assert frame.kind == Kind.WELCOME
    body = P.check_welcome(frame)
    assert body["version"] == P.VERSION
    assert body["pid"] == 99
    assert body["fds"] is True
    assert body["max_message"] == 12345
    assert body["max_fds"] == P.DEFAULT_MAX_FDS
    body = P.check_welcome(one(P.welcome_frame(7, False, P.DEFAULT_MAX_MESSAGE)))
    assert body["fds"] is False and body["max_message"] == P.DEFAULT_MAX_MESSAGE


def test_welcome_frame_answers_the_common_version() -> None:
    assert P.check_welcome(one(P.welcome_frame(1, True, 10, version=P.VERSION + 5)))["version"] \
        == P.VERSION
    assert P.check_welcome(one(P.welcome_frame(1, True, 10, version=1)))["version"] == 1


def test_check_welcome_raises_on_notice_refusal() -> None:
    frame = one(P.notice_frame(None, error="wrong authkey"))
    assert frame.kind == Kind.NOTICE
    with pytest.raises(IpcBusProtocolError, match="wrong authkey"):
        P.check_welcome(frame)
    # a NOTICE whose body is not a dict is still a refusal
    with pytest.raises(IpcBusProtocolError):
        P.check_welcome(one(P.encode_frame(Kind.NOTICE, body=P.pack_payload("nope"))))
    with pytest.raises(IpcBusProtocolError):
        P.check_welcome(one(P.encode_frame(Kind.NOTICE, body=b"\xc1")))


@pytest.mark.parametrize("kind", [k for k in Kind if k not in (Kind.WELCOME, Kind.NOTICE)])
def test_check_welcome_rejects_other_kinds(kind: Kind) -> None:
    body = P.pack_payload({"version": 1, "pid": 1, "fds": True, "max_message": 10})
    with pytest.raises(IpcBusProtocolError):
        P.check_welcome(one(P.encode_frame(kind, body=body)))


@pytest.mark.parametrize("body", [
    {"pid": 1, "fds": True, "max_message": 10},
    {"version": "1", "pid": 1, "fds": True, "max_message": 10},
    {"version": 1, "pid": 1, "fds": True},
    {"version": 1, "pid": 1, "fds": True, "max_message": "10"},
    [1, 1, True, 10],
    None,
    b"\xc1",
])
def test_check_welcome_rejects_malformed_welcome(body: Any) -> None:
    data = body if isinstance(body, bytes) else P.pack_payload(body)
    with pytest.raises(IpcBusProtocolError):
        P.check_welcome(one(P.encode_frame(Kind.WELCOME, body=data)))


def test_unpack_control_limits() -> None:
    assert P.unpack_control(P.pack_payload({"a": [1, 2]})) == {"a": [1, 2]}
    with pytest.raises(IpcBusProtocolError):
        P.unpack_control(b"\x00" * (P.MAX_CONTROL_BODY + 1))
    with pytest.raises(IpcBusProtocolError):
        P.unpack_control(P.pack_payload({1: "int keys are not allowed in control bodies"}))
    with pytest.raises(IpcBusProtocolError):
        P.unpack_control(b"\xc1")


def test_encode_header_refuses_oversized_header() -> None:
    with pytest.raises(ValueError):
        P.encode_frame(Kind.PEER_ADD, sender=["id", "n" * (MAX_HEADER + 1), "socket", 1])


def test_dict_with_tuple_keys_round_trips_with_tuple_keys() -> None:
    from ipcbus._protocol import pack_payload as _pack, unpack_payload as _unpack
    value = {(1, (2, "x")): "a", "nested": [1, {(3,): None}], 4: b"b"}
    assert _unpack(_pack(value)) == value


# -- large arguments without a copy (pack_args) ------------------------------------------------
class _Big:
    def __init__(self, n: int) -> None:
        self.n = n


_small_args = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                        st.text(max_size=20), st.binary(max_size=300),
                        st.lists(st.integers(-2**63, 2**64 - 1), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_small_args,
                          st.sampled_from([P.BIG_BYTES, P.BIG_BYTES + 1, 70_000, 300_000]
                                          ).map(lambda n: _Big(n))),
                max_size=20),
       st.booleans())
def test_pack_args_is_the_same_encoding_without_copying_large_bytes(
        items: list[Any], as_bytearray: bool) -> None:
    """_Big(n) stands for a large bytes argument: the buffers pack_args returns
    concatenate to exactly pack_payload's encoding, the large arguments are the caller's own
    objects (not copies), and the body decodes to the arguments."""
    def big(n: int, i: int) -> bytes | bytearray:
        data = bytes([i % 251]) * n
        return bytearray(data) if as_bytearray else data

    args = tuple(big(x.n, i) if isinstance(x, _Big) else x for i, x in enumerate(items))
    body = P.pack_args(args)
    joined = body if isinstance(body, bytes) else b"".join(body)
    assert joined == P.pack_payload(args)
    assert P.body_size(body) == len(joined)
    large = [a for a in args if isinstance(a, (bytes, bytearray)) and len(a) >= P.BIG_BYTES]
    if large:
        assert isinstance(body, list)
        assert all(any(part is a for part in body) for a in large)
    else:
        assert isinstance(body, bytes)
    assert P.unpack_payload(joined) == [bytes(a) if isinstance(a, bytearray) else a
                                        for a in args]


def test_pack_args_refuses_unserializable_values_with_large_bytes() -> None:
    with pytest.raises(TypeError, match="cannot send"):
        P.pack_args((b"x" * P.BIG_BYTES, object()))


class _MyInt(int):
    pass


_flat_args = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                       st.floats(allow_nan=False), st.text(max_size=20),
                       st.binary(max_size=300), st.binary(max_size=30).map(bytearray),
                       st.integers(0, 10).map(_MyInt),
                       st.lists(st.integers(-2**63, 2**64 - 1), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.lists(_flat_args, max_size=8), st.booleans())
def test_pack_args_of_flat_values_matches_msgpack(items: list[Any], as_list: bool) -> None:
    """Flat arguments (exact int, float, str, bytes, bool, None) go through the shared
    Packer, others through msgpack.packb: the bytes are msgpack's either way."""
    args: tuple[Any, ...] | list[Any] = list(items) if as_list else tuple(items)
    assert P.pack_args(args) == msgpack.packb(args, use_bin_type=True, datetime=False)


@pytest.mark.parametrize("bad,error", [
    ((2**64,), ValueError), ((-2**63 - 1,), ValueError), (("\ud800",), ValueError),
    ((1, "x", object()), TypeError), ((decimal.Decimal(1),), TypeError)])
def test_pack_args_errors_leave_the_shared_packer_clean(bad: tuple[Any, ...],
                                                        error: type[Exception]) -> None:
    with pytest.raises(error, match="cannot send"):
        P.pack_args(bad)
    assert P.pack_args((1, b"ok", "fine")) == msgpack.packb((1, b"ok", "fine"),
                                                             use_bin_type=True)


def test_pack_args_from_many_threads_at_once() -> None:
    """The shared Packer is used by every thread: 8 threads packing distinct values get
    their own bytes back every time."""
    import threading
    failures: list[Any] = []

    def work(t: int) -> None:
        for i in range(5000):
            args = (t, i, "x" * (i % 50), bytes([t]) * (i % 300), i * 0.5, None, True)
            if P.pack_args(args) != msgpack.packb(args, use_bin_type=True):
                failures.append((t, i))
                return

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_recycled_buffer_receives_the_next_large_frame() -> None:
    """A large frame's buffer given back is reused for the next large frame of similar size
    (shrunk in place), and never while something still has a view of it."""
    body = b"y" * (FrameDecoder.CHUNK * 2)
    frame = P.encode_frame(Kind.SEND, "big", sender=["p", "n", "socket", 1], body=body)
    dec = FrameDecoder()
    dec.feed(frame)
    first = dec.frames()[0]
    assert bytes(first.raw) == frame
    buf = first.raw
    dec.recycle(first)
    assert first.raw == b""
    buf_id = id(buf)
    del buf
    dec.feed(frame[:-10] + b"z" * 10)
    second = dec.frames()[0]
    assert id(second.raw) == buf_id
    assert bytes(second.raw).endswith(b"z" * 10)
    view = memoryview(second.raw)  # still in use: the decoder must not reuse it
    dec.recycle(second)
    dec.feed(frame[:-1] + b"w")
    third = dec.frames()[0]
    assert bytes(third.raw).endswith(b"w")
    assert bytes(view).endswith(b"z" * 10)  # untouched
    view.release()


# ---------------------------------------------------------------------------------------------
# large bytes arguments received straight into their own bytes object (direct_bytes)
# ---------------------------------------------------------------------------------------------

def _frame_parts(kind: int, args: tuple[Any, ...], nfds: int = 0) -> bytes:
    body = P.pack_args(args)
    joined = body if isinstance(body, bytes) else b"".join(body)
    return P.encode_frame(kind, "ch", ["id", "n", "socket", 1], "peer" if kind == Kind.SEND_TO
                          else None, 0, joined, nfds)


def _args_of(frame: P.Frame) -> list[Any]:
    if isinstance(frame, P.DecodedFrame):
        return frame.args
    args = P.unpack_payload(frame.body)
    return args if isinstance(args, list) else [args]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_small_args, max_size=4), st.lists(_small_args, max_size=3),
       st.sampled_from([P.BIG_BYTES, 70_000, 300_000]),
       st.sampled_from([Kind.SEND, Kind.SEND_TO, Kind.REQUEST]),
       st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=6),
       st.booleans())
def test_direct_bytes_decodes_the_same_arguments(
        before: list[Any], after: list[Any], size: int, kind: int, sizes: list[int],
        direct: bool) -> None:
    """Whatever the reads, a decoder with direct_bytes gives the same frames and arguments as
    one without; a message's large bytes argument comes back as bytes, equal to what was sent."""
    big = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    args = (*before, big, *after)
    small = P.encode_frame(Kind.SEND, "s", None, None, 0, P.pack_payload([1]))
    stream = small + _frame_parts(kind, args) + small + _frame_parts(Kind.SEND, (big,)) + small
    dec = FrameDecoder(chunk=1024)
    dec.direct_bytes = direct
    recv_into_chunks(dec, stream, sizes)
    frames = dec.frames()
    assert [f.kind for f in frames] == [Kind.SEND, kind, Kind.SEND, Kind.SEND, Kind.SEND]
    assert dec.pending_bytes == 0
    assert _args_of(frames[1]) == list(args)
    assert _args_of(frames[3]) == [big]
    assert all(_args_of(frames[i]) == [1] for i in (0, 2, 4))
    for frame in (frames[1], frames[3]):
        got = [a for a in _args_of(frame) if isinstance(a, bytes) and len(a) == size]
        assert got and all(type(a) is bytes for a in got)
        if isinstance(frame, P.DecodedFrame):
            assert direct and frame.kind != Kind.REQUEST
            assert len(frame.raw) == size  # what a client's queue budget counts


def test_direct_bytes_receives_into_the_delivered_object() -> None:
    """The large argument is the object the reads went into: no copy after the last read."""
    big = b"\x5a" * 300_000
    raw = _frame_parts(Kind.SEND, (3, "x", big))
    dec = FrameDecoder(chunk=1024)
    dec.direct_bytes = True
    recv_into_chunks(dec, raw, [2000, 100_000])
    [frame] = dec.frames()
    assert isinstance(frame, P.DecodedFrame)
    assert frame.args == [3, "x", big]
    assert frame.args[2] is frame.raw
    assert hash(frame.args[2]) == hash(big)  # a proper bytes object: hashable, comparable


def test_direct_bytes_not_for_frames_with_descriptors() -> None:
    big = b"\x01" * 200_000
    raw = _frame_parts(Kind.SEND, (big,), nfds=1)
    dec = FrameDecoder(chunk=1024)
    dec.direct_bytes = True
    recv_into_chunks(dec, raw, [5000])
    [frame] = dec.frames()
    assert not isinstance(frame, P.DecodedFrame)
    assert frame.nfds == 1


def test_direct_bytes_drops_a_message_with_a_malformed_tail(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """A body whose bytes after the large argument are not the announced arguments is dropped
    and logged, as the ordinary path does; the stream goes on."""
    big = b"\x02" * 100_000
    body = b"\x92\xc6" + len(big).to_bytes(4, "big") + big + b"\xc1"  # 0xc1: never used
    raw = P.encode_frame(Kind.SEND, "ch", ["id", "n", "socket", 1], None, 0, body)
    small = P.encode_frame(Kind.SEND, "s", None, None, 0, P.pack_payload([1]))
    dec = FrameDecoder(chunk=1024)
    dec.direct_bytes = True
    with caplog.at_level("ERROR", logger="ipcbus"):
        recv_into_chunks(dec, raw + small, [3000])
    frames = dec.frames()
    assert [f.channel for f in frames] == ["s"]
    assert "malformed message body" in caplog.text
