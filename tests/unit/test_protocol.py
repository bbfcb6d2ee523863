"""The wire protocol, tested as pure code: payloads, headers and their limits, the handshake.

Nothing here opens a socket or starts a thread: bytes go into a FrameDecoder, frames come out.
The decoder's own behaviour (streams cut anywhere, its receive modes, robustness) is
test_decoder.py's, which shares the helpers below.
"""
from __future__ import annotations

import datetime
import decimal
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_small_args, st.floats(allow_nan=False),
                          st.binary(max_size=30).map(bytearray),
                          st.sampled_from([P.BIG_BYTES - 1, P.BIG_BYTES]).map(lambda n: _Big(n))),
                max_size=8))
def test_pack_small_is_pack_args_for_small_flat_arguments_and_none_otherwise(
        items: list[Any]) -> None:
    """A client's ``send`` packs with pack_small and takes its full path (the arena, large
    bytes without a copy, other types) only on None: the same bytes as pack_args, or None
    for any argument that is not an exact scalar, str or a buffer under BIG_BYTES."""
    args = tuple(b"b" * x.n if isinstance(x, _Big) else x for x in items)
    body = P.pack_small(args)
    small = all(type(a) in (int, float, str, bytes, bytearray, bool, type(None)) and
                not (isinstance(a, (bytes, bytearray)) and len(a) >= P.BIG_BYTES) for a in args)
    assert (body is not None) == small
    if body is not None:
        assert body == P.pack_args(args) == P.pack_payload(args)


def test_pack_small_refuses_what_pack_args_refuses() -> None:
    with pytest.raises(ValueError, match="cannot send"):
        P.pack_small((2**64,))
    assert P.pack_small((_MyInt(1),)) is None  # a subclass: the full path decides


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


def test_a_requests_timeout_travels_to_two_significant_digits_so_headers_repeat() -> None:
    """A timeout computed per call (a service call's time left) must not make every header
    new: the writer sends ``wire_timeout(t)``, and the receiver reads it back."""
    assert [P.wire_timeout(t) for t in (4.9873, 4.9512, 0.12345, 7.5, 30.0)] == \
        [5.0, 5.0, 0.12, 7.5, 30.0]
    headers = {P.encode_header(int(Kind.REQUEST), "c", None, None, 0, P.wire_timeout(5 - i / 1000))
               for i in range(40)}
    assert len(headers) == 1
    raw = P.PREFIX.pack(len(next(iter(headers))), 0, 1) + next(iter(headers))
    assert P.request_timeout(raw) == 5.0
