"""The hub's output queue as a unit (``ipcbus._outqueue``): a fake writer that takes as many
bytes as a script says, so partial writes, descriptor batches and the slow consumer's cut
(keep the rest of the frame being written, drop the others) are tested without sockets."""
from __future__ import annotations

import os
from typing import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._outqueue import BATCH, OutQueue
from ipcbus._protocol import Kind


class Writer:
    """Takes at most ``budget[0]`` bytes per call (then the next budget; none left: would
    block), and records the bytes and the descriptors of each call."""

    def __init__(self, budgets: list[int]) -> None:
        self.budgets = list(budgets)
        self.data = bytearray()
        self.calls: list[tuple[int, list[int]]] = []  # (offset of the call's first byte, fds)

    def _take(self, buffers: Sequence[bytes | bytearray | memoryview], fds: Sequence[int]) -> int:
        if not self.budgets:
            raise BlockingIOError
        budget = self.budgets.pop(0)
        self.calls.append((len(self.data), list(fds)))
        sent = 0
        for buf in buffers:
            chunk = bytes(buf)[:budget - sent]
            self.data += chunk
            sent += len(chunk)
            if sent == budget:
                break
        return sent

    def send(self, buffers: Sequence[bytes | bytearray | memoryview],
             fds: Sequence[int] = ()) -> int:
        return self._take(buffers, fds)

    def send_one(self, data: memoryview) -> int:
        return self._take([data], ())


def frame(i: int, size: int = 10, nfds: int = 0) -> bytes:
    return P.encode_frame(Kind.SEND, "ch", ["p", "p", "socket", 1], body=bytes([i % 256]) * size,
                          nfds=nfds)


def test_one_frame_is_written_whole_or_its_rest_waits() -> None:
    q = OutQueue()
    raw = frame(1)
    q.push(raw, [])
    w = Writer([5])
    assert q.write(w) == (5, False)
    assert q.head_sent == 5 and q.out_bytes == len(raw) - 5
    w.budgets = [1000]
    assert q.write(w) == (len(raw) - 5, True)
    assert bytes(w.data) == raw and q.out_bytes == 0 and q.head_sent == 0 and not q.out


def test_would_block_writes_nothing() -> None:
    q = OutQueue()
    q.push(frame(1), [])
    q.push(frame(2), [])
    assert q.write(Writer([])) == (0, False)
    assert len(q.out) == 2


def test_descriptors_go_with_the_first_byte_of_their_call_and_are_closed_after() -> None:
    q = OutQueue()
    r, w_fd = os.pipe()
    q.push(frame(1), [])
    q.push(frame(2, nfds=1), [r])
    assert q.out_fds == 1
    w = Writer([10_000])
    assert q.write(w) == (len(frame(1)) + len(frame(2, nfds=1)), True)
    assert w.calls == [(0, [r])]  # the call starts at or before the frame's first byte
    assert q.out_fds == 0
    try:
        os.fstat(r)
        raise AssertionError("the queue's descriptor was not closed once written")
    except OSError:
        pass
    os.close(w_fd)


def test_at_most_max_fds_descriptors_and_batch_buffers_per_call() -> None:
    q = OutQueue()
    fds = [os.dup(0) for _ in range(P.MAX_FDS + 1)]
    q.push(frame(1, nfds=P.MAX_FDS), fds[:P.MAX_FDS])
    q.push(frame(2, nfds=1), fds[P.MAX_FDS:])
    for i in range(BATCH + 5):
        q.push(frame(i), [])
    w = Writer([10**9] * 10)
    written, drained = q.write(w)
    assert drained and written == len(w.data)
    assert [len(f) for _, f in w.calls][:2] == [P.MAX_FDS, 1]
    assert len(w.calls) >= 3  # BATCH buffers a call at most


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=12),
       st.lists(st.integers(1, 60), max_size=20))
def test_a_cut_keeps_exactly_the_rest_of_the_frame_being_written(
        runs: list[int], budgets: list[int]) -> None:
    """Whatever was written before the cut, what goes out in the end is whole frames:
    the decoder of the receiver never sees a frame cut short."""
    q = OutQueue()
    for i, n in enumerate(runs):
        q.push(b"".join(frame(i * 10 + k, size=7) for k in range(n)), [])
    w = Writer(budgets)
    q.write(w)
    q.discard_undelivered()
    assert q.out_bytes == sum(len(e[0]) for e in q.out) and len(q.out) <= 1
    w.budgets = [10**9]
    q.write(w)
    assert not q.out and q.out_bytes == 0
    dec = FrameDecoder()
    dec.feed(bytes(w.data))
    assert dec.pending_bytes == 0  # frames only, none cut
    assert all(f.kind == Kind.SEND for f in dec.frames())


def test_close_all_closes_every_queued_descriptor() -> None:
    q = OutQueue()
    r, w_fd = os.pipe()
    q.push(frame(1, nfds=1), [r])
    q.close_all()
    assert not q.out and q.out_fds == 0 and q.out_bytes == 0
    try:
        os.fstat(r)
        raise AssertionError("not closed")
    except OSError:
        pass
    os.close(w_fd)
