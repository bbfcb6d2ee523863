"""A hub connection's output queue: frames waiting to be written, with their descriptors.

Frames (or runs of frames) are queued as ``[view, fds]`` entries and written with as few
``sendmsg`` calls as the kernel allows: up to ``BATCH`` buffers a call, the descriptors of
every frame in the call attached to its first byte (at most ``MAX_FDS`` a call), so a reader
that queues the descriptors it receives in order can give each frame its own. The queue owns
the descriptors of its entries until they are written (then closed: the kernel has its own
copies) or discarded.

``head_sent`` counts the bytes of the first entry already written: a frame partly written
must be completed, or the stream would be corrupt (:meth:`OutQueue.discard_undelivered` keeps
that tail when a slow consumer is cut off).

The back-pressure fields (``full_since``, ``progress_at``, ``blocked``, ``unsent``) are the
state :class:`ipcbus._backpressure.BackPressure` reads and writes; the queue only carries them.
No socket is touched here except through the transport given to :meth:`OutQueue.write`.
"""
from __future__ import annotations

import collections
from typing import Any, Protocol, Sequence

from . import _protocol as P
from ._transport import close_fds

__all__ = ["OutQueue", "Writer", "BATCH"]

BATCH = 512  # buffers per sendmsg at most


class Writer(Protocol):
    """What the queue writes to (``StreamTransport``, or a fake in tests)."""

    def send(self, buffers: Sequence[bytes | bytearray | memoryview],
             fds: Sequence[int] = ()) -> int: ...

    def send_one(self, data: memoryview) -> int: ...


class OutQueue:
    """The output queue of one connection (the base of a hub's endpoint)."""

    __slots__ = ("out", "out_bytes", "out_fds", "head_sent", "full_since", "progress_at",
                 "blocked", "unsent")

    def __init__(self) -> None:
        self.out: collections.deque[list[Any]] = collections.deque()  # [view, fds]
        self.out_bytes = 0
        self.out_fds = 0
        self.head_sent = 0  # bytes of out[0] already written (a frame partly written)
        # back-pressure state (ipcbus._backpressure)
        self.full_since: float | None = None  # when it went over the limit
        self.progress_at = 0.0  # while over the limit: when a write last made progress
        self.blocked: set[Any] = set()  # sources held because this queue is full
        self.unsent: int | None = None  # the kernel's send queue at the last look

    def push(self, raw: bytes | bytearray, fds: list[int]) -> None:
        """Queue a frame (or run); the queue owns ``fds`` from now on."""
        self.out.append([memoryview(raw), fds])
        self.out_bytes += len(raw)
        self.out_fds += len(fds)

    def write(self, writer: Writer) -> tuple[int, bool]:
        """Write as much as the kernel takes now: (bytes written, whether the queue is empty).
        OSError (other than would-block) is the caller's: the connection has failed."""
        out = self.out
        if len(out) == 1 and not out[0][1]:  # the common case: one frame or run, no fds
            view = out[0][0]
            try:
                sent = writer.send_one(view)
            except (BlockingIOError, InterruptedError):
                return 0, False
            self.out_bytes -= sent
            if sent == len(view):
                out.clear()
                self.head_sent = 0
                return sent, True
            out[0][0] = view[sent:]
            self.head_sent += sent
            return sent, False
        written = 0
        while out:
            sent, total = self._write_batch(writer)
            written += sent
            if sent < total:
                return written, False
        return written, True

    def _write_batch(self, writer: Writer) -> tuple[int, int]:
        """One sendmsg of the first entries: (bytes written, bytes offered)."""
        out = self.out
        views: list[memoryview] = []
        fds: list[int] = []
        total = 0
        for entry in out:
            if entry[1]:
                if len(fds) + len(entry[1]) > P.MAX_FDS:
                    break
                fds.extend(entry[1])
            views.append(entry[0])
            total += len(entry[0])
            if len(views) >= BATCH:
                break
        try:
            sent = writer.send(views, fds)
        except (BlockingIOError, InterruptedError):
            return 0, total
        if fds:  # the kernel took them with the first byte of this write
            close_fds(fds)
            self.out_fds -= len(fds)
            for i in range(len(views)):
                out[i][1] = []
        self.out_bytes -= sent
        left = sent
        while left:
            head = out[0][0]
            if left >= len(head):
                left -= len(head)
                out.popleft()
                self.head_sent = 0
            else:
                out[0][0] = head[left:]
                self.head_sent += left
                left = 0
        return sent, total

    def discard_undelivered(self) -> None:
        """Drop every queued frame not yet started, closing their descriptors; keep the
        unwritten rest of the frame that is partly written (a run of frames is cut after
        that frame)."""
        out = self.out
        keep: memoryview | None = None
        if out and self.head_sent:
            keep = _rest_of_frame(out[0][0], self.head_sent)
        entries = list(out)
        out.clear()
        for i, entry in enumerate(entries):
            if i or keep is None:
                close_fds(entry[1])
        self.out_fds = 0
        if keep is not None and len(keep):
            out.append([keep, entries[0][1]])
            self.out_fds = len(entries[0][1])
        else:
            self.head_sent = 0
        self.out_bytes = len(keep) if keep is not None else 0

    def close_all(self) -> None:
        """Forget everything queued, closing the descriptors (the connection is dropped)."""
        for entry in self.out:
            close_fds(entry[1])
        self.out.clear()
        self.out_bytes = self.out_fds = 0


def _rest_of_frame(head: memoryview, sent: int) -> memoryview:
    """Of the unwritten part ``head`` of an entry whose first ``sent`` bytes went out: up to
    the end of the frame being written (an entry may be a run of frames)."""
    whole = memoryview(head.obj).cast("B") if isinstance(head.obj, (bytes, bytearray)) \
        else None
    if whole is None or len(whole) != sent + len(head):
        return head
    offset = 0
    while offset + P.PREFIX_SIZE <= len(whole):
        hlen, blen, _ = P.PREFIX.unpack_from(whole, offset)
        offset += P.PREFIX_SIZE + hlen + blen
        if offset >= sent:
            break
    return head[:max(0, min(offset, len(whole)) - sent)]
