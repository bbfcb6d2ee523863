"""``FrameDecoder``'s own interface (``ipcbus._decoder``) beyond the round trips of
test_protocol.py: taking one frame for a handshake, and telling its owner that input waits."""
from __future__ import annotations

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind

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
