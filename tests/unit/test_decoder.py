"""``FrameDecoder`` (``ipcbus._decoder``) as pure code: bytes in, frames out, in every way a
stream can be cut, in its three receive modes (the chunk, a large frame's own buffer, large
bytes straight into the delivered object), and robust to any bytes. The wire format's own
rules (header fields, payloads, the handshake's bodies) are test_protocol.py's, whose helpers
this module shares."""
from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import MAX_CHANNEL, MAX_FDS, MAX_HEADER, PREFIX_SIZE, Frame, Kind
from ipcbus.errors import IpcBusProtocolError

from test_protocol import (FAST, QUICK, _small_args, decode, feed_chunks, header_of, one,
                           raw_frame, recv_into_chunks, same)

SENDER = ["a", "a", "socket", 1]


def test_take_frame_leaves_the_frames_after_it_for_the_loop() -> None:
    dec = FrameDecoder(merge_runs=True)
    dec.feed(P.encode_frame(Kind.HELLO, body=P.hello_body(5))
             + P.encode_frame(Kind.SEND, "c", SENDER, body=b"\x90")
             + P.encode_frame(Kind.SEND, "c", SENDER, body=b"\x90"))
    first = dec.take_frame()
    assert first is not None and first.kind == Kind.HELLO
    rest = dec.frames()
    assert [(f.kind, f.count) for f in rest] == [(Kind.SEND, 2)]
    assert dec.take_frame() is None


def test_has_input_while_frames_or_bytes_of_one_wait() -> None:
    dec = FrameDecoder()
    assert not dec.has_input
    raw = P.encode_frame(Kind.SEND, "c", SENDER, body=b"\x90")
    dec.feed(raw[:5])
    assert dec.has_input and dec.pending_bytes == 5
    dec.feed(raw[5:])
    assert dec.has_input and dec.pending_bytes == 0  # a whole frame waits
    assert len(dec.frames()) == 1 and not dec.has_input


def test_has_input_in_the_middle_of_a_frame_larger_than_the_chunk() -> None:
    dec = FrameDecoder(chunk=1024)
    raw = P.encode_frame(Kind.SEND, "c", SENDER, body=P.pack_payload([b"x" * 5000]))
    dec.feed(raw[:2000])  # mode 2: its own buffer
    assert dec.has_input
    dec.feed(raw[2000:])
    (frame,) = dec.frames()
    assert bytes(frame.raw) == raw and not dec.has_input


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
