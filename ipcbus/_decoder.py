"""FrameDecoder: a byte stream in, frames out (the frame layout is in ``_protocol``'s docstring).

Pure code: it never reads a socket itself. Its owner reads into the view :meth:`get_buffer`
gives and reports the count with :meth:`buffer_updated` (or hands over bytes with :meth:`feed`);
whole frames are taken with :meth:`frames`. Size limits are enforced on the length prefix,
before anything is allocated. After an ``IpcBusProtocolError`` the stream is unusable.

One frame at a time is received in one of three modes, chosen by :meth:`get_buffer` once the
prefix of the next frame is known:

1. **chunk** (frames up to ``chunk`` bytes, the common case): reads go into one reusable
   buffer, and :meth:`_parse` cuts every whole frame out of it. With ``merge_runs``,
   consecutive SEND/SEND_TO frames with identical header bytes (one sender, one channel, no
   descriptors, no rid) become one :class:`~ipcbus._protocol.Frame` whose ``raw`` spans them
   all (``count`` > 1): a hub forwards the run in one write. Decoded headers are cached by
   their bytes (a sender's frames on one channel repeat theirs exactly).
2. **own buffer** (a larger frame): the rest of the frame is read into a ``bytearray`` of its
   own, which becomes ``frame.raw`` without a copy. A client gives the buffer of a dispatched
   frame back with :meth:`recycle`; the next large frame reuses it if nothing else refers to
   it (allocating and freeing tens of MiB per frame made the allocator return the memory to
   the kernel and fault it back in at every frame).
3. **direct bytes** (a client's decoder, ``direct_bytes = True``, for a message whose body
   starts with small arguments and then a bytes argument of ``BIG_BYTES`` or more): that
   argument is read straight into the ``bytes`` object the listener gets
   (``_bigbytes.new_bytes``), and the frame comes out as a
   :class:`~ipcbus._protocol.DecodedFrame` with its arguments decoded. Anything unusual
   falls back to mode 2.

The chunk buffer is sized lazily: it starts at ``initial`` bytes, so an idle connection costs
little, and grows fourfold up to ``chunk`` whenever a read fills it (a burst) or a frame does
not fit; :meth:`trim`, called now and then by a hub, shrinks it back when every read since
the previous call was small. Threads: one thread feeds a decoder; :meth:`drop_spare` is
the one call safe from another.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterator

import msgpack

from ._arrays import ext_hook
from ._bigbytes import new_bytes as _new_bytes
from ._protocol import (BIG_BYTES, DEFAULT_MAX_MESSAGE, MAX_HEADER, PREFIX, PREFIX_SIZE,
                        DecodedFrame, Frame, Kind, decode_header)
from .errors import IpcBusProtocolError

__all__ = ["FrameDecoder"]

log = logging.getLogger("ipcbus")

_SEND, _SEND_TO = int(Kind.SEND), int(Kind.SEND_TO)  # plain ints for the hot loop
_HEADER_CACHE = 512  # decoded headers kept (the cache is cleared when full)
_COMPACT_ROOM = PREFIX_SIZE + 4096  # the chunk is compacted when less room is left at its end
_SCAN = 4096  # arguments before a large bytes argument are decoded early if within this


def _find_big_bytes(body: memoryview) -> tuple[list[Any], int, int, int] | bool:
    """In the first bytes of a message body (a msgpack array): the arguments before its first
    bin32 of BIG_BYTES or more, the array's length, and where that bin's data starts and how
    long it is. True if more bytes are needed to tell; False if there is none within the
    first _SCAN bytes, or anything is unusual."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True,
                                ext_hook=ext_hook)
    unpacker.feed(body[:_SCAN])
    try:
        count = unpacker.read_array_header()
        leading: list[Any] = []
        for _ in range(count):
            at = unpacker.tell()
            if at + 5 > len(body):
                return len(body) < _SCAN
            if body[at] == 0xC6:
                length = int.from_bytes(body[at + 1:at + 5], "big")
                if length >= BIG_BYTES:
                    return leading, count, at + 5, length
            leading.append(unpacker.unpack())
    except msgpack.OutOfData:
        return len(body) < _SCAN
    except Exception:  # a tuple-keyed map, not an array: the ordinary path
        return False
    return False


class _Direct:
    """Mode 3: a message being received with its large bytes argument straight into
    ``payload``, then the rest of its body (``tail``: the later arguments)."""

    __slots__ = ("frame", "leading", "count", "payload", "view", "fill", "tail", "tail_fill")

    def __init__(self, frame: tuple[int, str, Any, Any, int], leading: list[Any], count: int,
                 payload: bytes, view: memoryview, fill: int, tail: int) -> None:
        self.frame = frame  # kind, channel, sender, target, rid
        self.leading = leading  # the arguments before the payload, decoded
        self.count = count  # the number of arguments
        self.payload = payload
        self.view = view  # writable, over payload's buffer
        self.fill = fill
        self.tail = bytearray(tail)
        self.tail_fill = 0

    def next_view(self) -> memoryview:
        if self.fill < len(self.payload):
            return self.view[self.fill:]
        return memoryview(self.tail)[self.tail_fill:]

    def received(self, nbytes: int) -> bool:
        """Account for ``nbytes`` read into :meth:`next_view`; True once the frame is whole."""
        if self.fill < len(self.payload):
            self.fill += nbytes
        else:
            self.tail_fill += nbytes
        return self.fill >= len(self.payload) and self.tail_fill >= len(self.tail)

    def decoded(self) -> DecodedFrame | None:
        """The whole message, its arguments decoded (None, logged, if the tail is malformed:
        as the ordinary path drops a message with a malformed body)."""
        self.view.release()
        args = self.leading
        args.append(self.payload)
        kind, channel, sender, target, rid = self.frame
        if len(args) < self.count or self.tail:
            try:
                unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True,
                                            max_buffer_size=max(len(self.tail), 1),
                                            ext_hook=ext_hook)
                unpacker.feed(self.tail)
                for _ in range(self.count - len(args)):
                    args.append(unpacker.unpack())
                if unpacker.tell() != len(self.tail):
                    raise ValueError("bytes left after the last argument")
            except Exception as exc:
                log.error("dropped a message on %r from %s: malformed message body: %s: %s",
                          channel, sender[0] if sender else None, type(exc).__name__, exc)
                return None
        return DecodedFrame(kind, channel, sender, target, rid, self.payload, args)


class FrameDecoder:
    """Turns a byte stream into frames (see the module's docstring for the three modes)."""

    CHUNK = 256 * 1024  # the largest reusable buffer; a frame larger than this gets its own
    INITIAL = 16 * 1024  # the buffer of a new or idle connection

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, chunk: int = CHUNK,
                 merge_runs: bool = False, initial: int = INITIAL) -> None:
        self.max_message = max_message
        self.merge_runs = merge_runs  # mode 1: merge runs of identical headers
        self.direct_bytes = False  # mode 3 allowed (a client's decoder)
        self._chunk = chunk
        self._initial = min(initial, chunk)
        # mode 1: the reusable buffer, and the undecoded bytes in it
        self._size = self._initial  # len(self._buf)
        self._buf = bytearray(self._size)
        self._start = 0  # first unconsumed byte in _buf
        self._end = 0  # end of valid data in _buf
        self._peak = 0  # the largest read since the last trim()
        # mode 2: the frame's own buffer, how much of it is filled; a buffer given back
        self._big: bytearray | None = None
        self._big_fill = 0
        self._spare: bytearray | None = None
        # mode 3
        self._direct: _Direct | None = None
        self._ready: list[Frame] = []
        # header bytes -> validated fields
        self._headers: dict[bytes, tuple[int, str, Any, Any, int]] = {}

    # -- feeding ---------------------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """A writable view to receive the next bytes into (never empty)."""
        if self._big is not None:  # mode 2
            return memoryview(self._big)[self._big_fill:]
        if self._direct is not None:  # mode 3
            return self._direct.next_view()
        avail = self._end - self._start
        if avail >= PREFIX_SIZE:
            hlen, blen, rid = PREFIX.unpack_from(self._buf, self._start)
            self._check_prefix(hlen, blen, rid)
            total = PREFIX_SIZE + hlen + blen
            if total > self._size:
                if total > self._chunk:
                    view = self._begin_large(hlen, blen, rid, total)
                    if view is not None:
                        return view
                size = self._size
                while size < total:
                    size *= 4
                self._resize(min(size, self._chunk))
        if self._start and (self._size - self._end) < _COMPACT_ROOM:
            self._buf[:avail] = self._buf[self._start:self._end]
            self._start, self._end = 0, avail
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last :meth:`get_buffer` view and decode."""
        direct = self._direct
        if direct is not None:  # mode 3
            if direct.received(nbytes):
                self._direct = None
                frame = direct.decoded()
                if frame is not None:
                    self._ready.append(frame)
            return
        if self._big is not None:  # mode 2
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                big, self._big = self._big, None
                self._ready.append(self._whole_frame(big))
            return
        self._end += nbytes
        if nbytes > self._peak:
            self._peak = nbytes
        full = self._end == self._size
        self._parse()
        if full and self._size < self._chunk:  # more was probably waiting: read more at once
            self._resize(min(self._size * 4, self._chunk))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read elsewhere."""
        view = memoryview(data).cast("B")
        while len(view):
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    # -- taking frames -----------------------------------------------------------------------
    def frames(self) -> list[Frame]:
        """Take the frames decoded so far."""
        ready, self._ready = self._ready, []
        return ready

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames())

    def take_frame(self) -> Frame | None:
        """Take the first frame decoded so far, if any, leaving the others for
        :meth:`frames` (a handshake reads one frame; what follows it is the loop's)."""
        return self._ready.pop(0) if self._ready else None

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not form a whole frame yet."""
        if self._big is not None:
            return self._big_fill
        if self._direct is not None:
            return 1 + self._direct.fill + self._direct.tail_fill  # never 0 in the middle
        return self._end - self._start

    @property
    def has_input(self) -> bool:
        """Whether frames, or bytes of a frame, wait here (its owner should decode before it
        waits for the socket again)."""
        return bool(self._ready) or self.pending_bytes > 0

    # -- memory -------------------------------------------------------------------------------
    def recycle(self, frame: Frame) -> None:
        """Take back the buffer of a large frame that has been dispatched (``frame.raw`` is
        emptied): the next large frame is received into it (mode 2)."""
        raw = frame.raw
        if raw.__class__ is bytearray and len(raw) > self._chunk:
            frame.raw = b""
            self._spare = raw

    def drop_spare(self) -> None:
        """Let the kept large buffer go (the connection is idle): safe from any thread."""
        self._spare = None

    def trim(self) -> None:
        """Shrink the buffer back to its initial size if every read since the last call was
        at most half that size and what it holds fits (a hub calls this once a second)."""
        if self._size > self._initial and self._peak <= self._initial // 2 \
                and self._end - self._start <= self._initial // 2:
            self._resize(self._initial)
        self._peak = 0

    @property
    def buffer_size(self) -> int:
        """The size of the reusable read buffer now (for tests and figures)."""
        return self._size

    # -- modes 2 and 3: a frame larger than the chunk -------------------------------------------
    def _begin_large(self, hlen: int, blen: int, rid: int, total: int) -> memoryview | None:
        """Start receiving a frame larger than the chunk in mode 3 or 2; the view to read
        into, or None if more of its bytes must be read into the chunk first (to tell
        whether mode 3 applies)."""
        if self.direct_bytes and _new_bytes is not None:
            started = self._begin_direct(hlen, blen, rid)
            if started is None:
                return None
            if started:
                assert self._direct is not None
                return self._direct.next_view()
        avail = self._end - self._start
        big = self._take_spare(total)
        big[:avail] = self._buf[self._start:self._end]
        self._start = self._end = 0
        self._big, self._big_fill = big, avail
        return memoryview(big)[avail:]

    def _begin_direct(self, hlen: int, blen: int, rid: int) -> bool | None:
        """Start mode 3 if the frame is a message (no descriptors) whose body begins with a
        big bytes argument after a few small ones. None: more bytes are needed to tell (and
        there is room to read them)."""
        buf, start, end = self._buf, self._start, self._end
        body_at = start + PREFIX_SIZE + hlen
        room = self._size - end >= 64 or start >= 4096  # (get_buffer compacts at start)
        if end <= body_at:
            return None if room else False
        key = bytes(buf[start + PREFIX_SIZE:body_at])
        fields = self._headers.get(key)
        if fields is None:
            fields = decode_header(key)
        kind, channel, sender, target, nfds = fields
        if nfds or (kind != _SEND and kind != _SEND_TO):
            return False
        found = _find_big_bytes(memoryview(buf)[body_at:end])
        if found is True:
            return None if room else False
        if found is False:
            return False
        leading, count, data_at, length = found
        tail = blen - data_at - length
        have = end - body_at - data_at
        if tail < 0 or have >= length:  # malformed, or all here anyway: the ordinary path
            return False
        assert _new_bytes is not None
        payload, view = _new_bytes(length)
        view[:have] = buf[body_at + data_at:end]
        self._start = self._end = 0
        self._direct = _Direct((kind, channel, sender, target, rid), leading, count, payload,
                               view, have, tail)
        return True

    def _take_spare(self, total: int) -> bytearray:
        spare, self._spare = self._spare, None
        # Reused only if nothing else refers to it (no view, no frame): our name and the
        # argument of getrefcount are its only references.
        if spare is not None and total <= len(spare) <= 2 * total \
                and sys.getrefcount(spare) == 2:
            del spare[total:]  # shrinks in place
            return spare
        return bytearray(total)

    def _whole_frame(self, raw: bytearray) -> Frame:
        hlen, _, rid = PREFIX.unpack_from(raw, 0)
        kind, channel, sender, target, nfds = decode_header(
            memoryview(raw)[PREFIX_SIZE:PREFIX_SIZE + hlen])
        return Frame(kind, channel, sender, target, rid, nfds, raw, PREFIX_SIZE + hlen)

    # -- mode 1: the chunk ----------------------------------------------------------------------
    def _resize(self, size: int) -> None:
        """A new reusable buffer of ``size`` bytes, holding the bytes not decoded yet."""
        avail = self._end - self._start
        buf = bytearray(size)
        buf[:avail] = self._buf[self._start:self._end]
        self._buf, self._size = buf, size
        self._start, self._end = 0, avail

    def _check_prefix(self, hlen: int, blen: int, rid: int) -> None:
        if rid >= 2**63:
            raise IpcBusProtocolError(f"frame rid {rid} is over 2**63-1")
        if not 1 <= hlen <= MAX_HEADER:
            raise IpcBusProtocolError(f"frame header length {hlen} is outside 1..{MAX_HEADER}")
        if blen > self.max_message:
            raise IpcBusProtocolError(
                f"frame announces a body of {blen} bytes, over the limit of {self.max_message}")

    def _parse(self) -> None:
        """Cut every whole frame out of the chunk (merging runs)."""
        buf, start, end = self._buf, self._start, self._end
        unpack_prefix = PREFIX.unpack_from
        ready, cache, runs = self._ready, self._headers, self.merge_runs
        run: Frame | None = None  # the run being extended, and where its bytes start
        run_key = b""
        run_start = 0
        while end - start >= PREFIX_SIZE:
            hlen, blen, rid = unpack_prefix(buf, start)
            if not 1 <= hlen <= MAX_HEADER or blen > self.max_message or rid >= 2**63:
                self._check_prefix(hlen, blen, rid)
            total = PREFIX_SIZE + hlen + blen
            if end - start < total:
                break
            key = bytes(buf[start + PREFIX_SIZE:start + PREFIX_SIZE + hlen])
            if run is not None:
                if key == run_key and not rid:
                    run.count += 1
                    start += total
                    continue
                run.raw = bytes(buf[run_start:start])
                run = None
            fields = cache.get(key)
            if fields is None:
                fields = decode_header(key)
                if len(cache) >= _HEADER_CACHE:
                    cache.clear()
                cache[key] = fields
            kind, channel, sender, target, nfds = fields
            frame = Frame(kind, channel, sender, target, rid, nfds, b"", PREFIX_SIZE + hlen)
            ready.append(frame)
            if runs and not nfds and not rid and (kind == _SEND or kind == _SEND_TO):
                run, run_key, run_start = frame, key, start
            else:
                frame.raw = bytes(buf[start:start + total])
            start += total
        if run is not None:
            run.raw = bytes(buf[run_start:start])
        if start == end:
            start = end = 0
        self._start, self._end = start, end
