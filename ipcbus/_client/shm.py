"""A connection's side of large payloads through shared memory (SPEC "Large payloads through
shared memory"; the frames: ``_protocol.Kind.SHM_ARENA``; the hub's side: ``_hub_shm.py``).

*Sending* (:meth:`ConnectionShm.send`, from ``IpcBusClient.send``/``send_to``, and the
requests: ``shm_requests.py``): a
``bytes``/``bytearray``/``memoryview`` argument of at least the client's ``shm_threshold``
bytes, at the top level or one level down in a list, tuple or dict, is copied into a slot of
the connection's arena (one sealed memfd of ``shm_limit`` bytes, made at the first large
send and announced once, ``_shm_arena``) and replaced in the body by a placeholder; the frame
(SHM_MESSAGE) carries the slots. A broadcast writes the payload once, whatever the number of
receivers. A sender whose arena is full waits (the slots come back as the receivers release
them, SHM_FREE, read by the reader thread) for up to :data:`FULL_WAIT` seconds, then raises
:class:`~ipcbus.IpcBusTimeoutError`; a closed connection raises
:class:`~ipcbus.IpcBusConnectionError`. A message that could never fit goes inline.

*Receiving* (:meth:`ConnectionShm.on_frame`, on the reader, from ``connection.py``): an
arena's descriptor (SHM_ARENA) is mapped read-only and closed; the slots announced for the
next frame (SHM_SLOTS) become read-only views of the mapping in the message's arguments
(``shm_delivery.py``: listeners get ``bytes`` copied out of them, or the views themselves
with ``zero_copy=True``), and are released (SHM_RELEASE) once the message is delivered: a
receiver holds a slot from the hub's queueing to the end of its listeners (or of a
``retain()``). A GROUPED frame announced by SHM_SLOTS (this process has a group's chosen
member) carries the message with its placeholders: the carried frame is resolved the same
way (``ShmGrouped``); one that is malformed gives its slots back at once. An arena whose
owner has gone is unmapped.

Locks: ``lock`` guards the allocator and the arena's creation; held briefly, never while
writing to the socket except for the arena's one announcement.
"""
from __future__ import annotations

import functools
import logging
import mmap
import os
import threading
import time
from typing import Any, Callable

import msgpack

from .. import _protocol as P
from .. import _shm_arena as A
from .._arrays import ARRAY_SLOT_EXT, array_header, decode_array, ext_hook, is_array
from .._protocol import Kind
from .._shm_slots import EXT_CODE, SlotAllocator, ext_data, ext_index
from ..errors import IpcBusConnectionError, IpcBusProtocolError, IpcBusTimeoutError
from .delivery import grouped_frames
from .shm_delivery import Lease, ShmFrame, ShmGrouped

log = logging.getLogger("ipcbus")

__all__ = ["ConnectionShm", "SHM_THRESHOLD", "SHM_LIMIT", "FULL_WAIT", "check_shm_args",
           "wants", "AVAILABLE"]

AVAILABLE = A.AVAILABLE

SHM_THRESHOLD = 1 << 20  # default: arguments this large go through the arena
SHM_LIMIT = 256 << 20  # default: the arena's size
FULL_WAIT = float(os.environ.get("IPCBUS_SHM_WAIT", "30"))  # seconds a full arena is waited for
_SHM_ARENA, _SHM_SLOTS, _SHM_FREE = int(Kind.SHM_ARENA), int(Kind.SHM_SLOTS), int(Kind.SHM_FREE)
_RESPONSE, _GROUPED = int(Kind.RESPONSE), int(Kind.GROUPED)
# what may carry slots (SHM_MESSAGE's inner frame): messages, requests (shm_requests.py)
_MESSAGES = frozenset({int(Kind.SEND), int(Kind.SEND_TO), int(Kind.REQUEST),
                       int(Kind.REQUEST_ALL)})


def check_shm_args(threshold: object, limit: object) -> None:
    """``connect()``'s ``shm_threshold`` and ``shm_limit``: TypeError/ValueError."""
    for name, value in (("shm_threshold", threshold), ("shm_limit", limit)):
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0")
    assert isinstance(limit, int)
    if threshold and not 4096 <= limit <= A.MAX_ARENA:
        raise ValueError(f"shm_limit must be 4096 to {A.MAX_ARENA} bytes")


def settings(conn: Any, threshold: int, limit: int, member: Any) -> tuple[int, int]:
    """A client's (threshold, limit) on ``conn``, just joined as ``member``: off where
    descriptors cannot pass (TCP) or there is no memfd. The first client of a connection
    decides for it: with ``shm_threshold=0`` the connection sends and receives everything
    inline (the hub is told: an arena of size 0), whatever later clients ask."""
    shm: ConnectionShm = conn.shm
    if not conn.can_pass_fds or not AVAILABLE:
        return 0, limit
    with shm.lock:
        first, shm.decided = not shm.decided, True
        if first and not threshold:
            shm.inline = True
            try:
                conn.writer.write_now(P.encode_frame(Kind.SHM_ARENA, sender=member.info,
                                                     body=P.pack_payload({"size": 0})), member)
            except (OSError, IpcBusConnectionError):  # the connection's next use says so
                pass
    return (0 if shm.inline else threshold), limit


def _size(item: Any) -> int:
    cls = item.__class__
    if cls is bytes or cls is bytearray:
        return len(item)
    if cls is memoryview or is_array(item):
        return item.nbytes  # type: ignore[no-any-return]
    return -1


def wants(args: tuple[Any, ...], threshold: int) -> bool:
    """Whether any argument (or an item one level down) is a buffer of ``threshold`` bytes
    (plain loops, scalars skipped first: requests and answers run this when ``pack_small``
    did not take their arguments)."""
    for item in args:
        cls = item.__class__
        if cls is list or cls is tuple:
            values = item
        elif cls is dict:
            values = item.values()
        else:
            values = (item,)
        for value in values:
            cls = value.__class__
            if cls is int or cls is str or cls is float or cls is bool or value is None:
                continue
            if _size(value) >= threshold:
                return True
    return False


def _replace(args: tuple[Any, ...], threshold: int, found: list[Any]) -> list[Any]:
    """The arguments with placeholders for the large buffers, which go to ``found``."""
    def swap(item: Any) -> Any:
        if _size(item) >= threshold:
            found.append(item)
            if is_array(item):  # its dtype and shape travel with its slot
                return msgpack.ExtType(ARRAY_SLOT_EXT, msgpack.packb(
                    [*array_header(item), len(found) - 1]))
            return msgpack.ExtType(EXT_CODE, ext_data(len(found) - 1))
        return item

    out: list[Any] = []
    for item in args:
        cls = item.__class__
        if cls is list or cls is tuple:
            out.append([swap(x) for x in item])
        elif cls is dict:
            out.append({k: swap(v) for k, v in item.items()})
        else:
            out.append(swap(item))
    return out


def _as_bytes_view(buf: Any) -> memoryview:
    if is_array(buf):
        try:
            return memoryview(buf if buf.flags.c_contiguous else buf.copy(order="C")).cast("B")
        except (TypeError, ValueError):  # a dtype without a buffer format
            return memoryview(buf.tobytes())
    view = memoryview(buf)
    if view.c_contiguous:
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return memoryview(view.tobytes())


class ConnectionShm:
    """The shared-memory state of one connection (``conn``: its ``Connection``)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.freed = threading.Condition(self.lock)
        # sending: our arena (made at the first large send)
        self.mapping: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.slots: SlotAllocator | None = None
        # receiving: arenas by id; the slots announced for the next frame
        self.maps: dict[int, mmap.mmap] = {}
        self.pending: tuple[int, list[Any]] | None = None
        self.ended = False
        self.decided = False  # the first client has joined (``settings``)
        self.inline = False  # ...with shm_threshold=0: everything inline, both ways

    # -- sending -----------------------------------------------------------------------------
    def send(self, member: Any, kind: int, channel: str, target: str | None,
             args: tuple[Any, ...], threshold: int, limit: int, rid: int = 0,
             timeout: float | None = None) -> bool:
        """Send a message (or a request: ``rid``, ``timeout``; ``shm_requests.py``) through
        the arena if it has large buffers (False: it has none, or they could never fit: the
        caller sends it inline)."""
        if not wants(args, threshold):
            return False
        found: list[Any] = []
        body = P.pack_payload(_replace(args, threshold, found))
        views = [_as_bytes_view(b) for b in found]
        sizes = [len(v) for v in views]
        total = sum(sizes) + len(body)
        if total > self.conn.max_message:  # the bus's limit holds for the message as a whole
            raise ValueError(f"message of {total} bytes exceeds the bus limit of"
                             f" {self.conn.max_message} bytes")
        arena = self.slots.size if self.slots is not None else limit  # made by the first
        if sum(-(-n // 4096) * 4096 for n in sizes) > arena:
            return False
        offsets = self._alloc(sizes, limit, member)
        try:
            target_view = self.view
            if target_view is None:
                raise IpcBusConnectionError("the bus connection has closed")
            for offset, view in zip(offsets, views):
                target_view[offset:offset + len(view)] = view
            header = P.encode_header(kind, channel, member.info, target, 0,
                                     None if timeout is None else P.wire_timeout(timeout))
            inner = P.PREFIX.pack(len(header), len(body), rid) + header + body
            outer = P.encode_frame(Kind.SHM_MESSAGE, "", member.info, None, 0, P.pack_payload(
                [[[o, n] for o, n in zip(offsets, sizes)], inner]))
        except BaseException:
            self._give_back(offsets)  # never reached the hub: ours again
            raise
        try:  # (an interrupt here may come after the frame was written: the slots stay
            self.conn.writer.write_now(outer, member)  # the hub's until it frees them)
        except OSError as exc:
            self.conn.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None
        return True

    def _give_back(self, offsets: list[int]) -> None:
        with self.lock:
            for offset in offsets:
                if self.slots is not None and offset in self.slots.used:
                    self.slots.free(offset)
            self.freed.notify_all()

    def _alloc(self, sizes: list[int], limit: int, member: Any) -> list[int]:
        """Slots for ``sizes``, all or none; waits while the arena is full."""
        deadline = time.monotonic() + FULL_WAIT
        with self.lock:
            if self.slots is None:
                self._create(limit, member)
            slots = self.slots
            assert slots is not None
            while True:
                got: list[int] = []
                for n in sizes:
                    offset = slots.alloc(n)
                    if offset is None:
                        break
                    got.append(offset)
                if len(got) == len(sizes):
                    return got
                for offset in got:
                    slots.free(offset)
                if self.ended or self.conn.closed:
                    raise IpcBusConnectionError("the bus connection has closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IpcBusTimeoutError(
                        f"the shared-memory arena ({slots.size} bytes) stayed full for"
                        f" {FULL_WAIT:g} s: its receivers hold its slots")
                self.freed.wait(min(left, 0.1))

    def _create(self, limit: int, member: Any) -> None:
        """Make the arena and announce it to the hub (under ``lock``)."""
        self.conn.check_usable()
        fd, mapping = A.create_arena(limit)
        try:
            announce = P.encode_frame(Kind.SHM_ARENA, sender=member.info, nfds=1,
                                      body=P.pack_payload({"size": limit}))
            self.conn.writer.write([announce], [fd], member)
        except OSError as exc:
            mapping.close()
            os.close(fd)
            self.conn.check_usable()
            raise IpcBusConnectionError(f"cannot write to the bus: {exc}") from None
        except BaseException:
            mapping.close()
            os.close(fd)
            raise
        os.close(fd)  # the hub has its copy; the mapping keeps its own (Python's mmap dups it)
        self.mapping, self.view = mapping, memoryview(mapping)
        self.slots = SlotAllocator(limit)

    # -- receiving (the reader) -----------------------------------------------------------------
    def on_frame(self, frame: P.Frame) -> list[P.Frame]:
        """A frame of ours (kind SHM_*), or the frame that follows SHM_SLOTS: what is left
        for the dispatcher."""
        kind = frame.kind
        if kind == _SHM_SLOTS:
            slots = P.unpack_control(frame.body)
            if type(slots) is not list:
                raise IpcBusProtocolError("malformed SHM_SLOTS")
            self.pending = (frame.rid, slots)
            return []
        if kind == _SHM_ARENA:
            self._arena(frame)
            return []
        if kind == _SHM_FREE:
            self._free(P.unpack_control(frame.body))
            return []
        pending, self.pending = self.pending, None
        if pending is None:
            raise IpcBusProtocolError(f"unexpected {Kind(kind).name} frame from the bus")
        try:
            return self._resolve(frame, pending)
        except BaseException:
            self._release(pending)
            raise

    def _arena(self, frame: P.Frame) -> None:
        fds, frame.fds = frame.fds, []
        if fds:
            try:
                if len(fds) == 1 and frame.rid not in self.maps:
                    size = P.unpack_control(frame.body)[0]
                    self.maps[frame.rid] = A.map_readonly(fds[0], size)
            except (OSError, ValueError, TypeError, IndexError) as exc:  # its messages drop
                log.error("cannot map a shared-memory arena of the bus: %s", exc)
            finally:
                for fd in fds:
                    os.close(fd)
            return
        gone = self.maps.pop(frame.rid, None)  # its owner has left the bus
        if gone is not None:
            _unmap(gone)

    def _free(self, offsets: Any) -> None:
        with self.lock:
            slots = self.slots
            for offset in offsets if type(offsets) is list else ():
                if slots is not None and offset in slots.used:
                    slots.free(offset)
            self.freed.notify_all()

    def _resolve(self, frame: P.Frame, pending: tuple[int, list[Any]]) -> list[P.Frame]:
        """The message with views of its slots (``shm_delivery.ShmFrame``; a run is cut in
        two: only its first frame had slots). The slots are given back once it has been
        delivered, or now if it cannot be."""
        rest = _split_run(frame) if frame.count > 1 else []
        if rest:
            frame = rest.pop(0)
        one = self._grouped(frame, pending) if frame.kind == _GROUPED else \
            self._shm_frame(frame, pending)
        return [one, *rest] if one is not None else rest

    def _shm_frame(self, frame: P.Frame, pending: tuple[int, list[Any]]) -> P.Frame | None:
        """A message with views of its slots (None: dropped, its slots given back; a frame
        that is not a message: as it is, the slots given back)."""
        mapping = self.maps.get(pending[0])
        if frame.kind not in _MESSAGES or mapping is None:
            if frame.kind in _MESSAGES:
                log.error("dropped a message on %r: its shared memory is not mapped here",
                          frame.channel)
                frame = None  # type: ignore[assignment]
            self._release(pending)
            return frame
        slots, body = pending[1], bytes(frame.body)
        base = memoryview(mapping)
        views: list[memoryview] = []
        slot, as_bytes = _hooks(mapping, slots)

        def as_view(code: int, data: bytes) -> Any:
            if code != EXT_CODE:
                return as_bytes(code, data)  # an array, or another ext type
            offset, length = slot(data)
            views.append(base[offset:offset + length])
            return views[-1]

        def decode(hook: Callable[[int, bytes], Any]) -> list[Any]:
            args = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True,
                                   ext_hook=hook)
            return args if args.__class__ is list else [args]

        try:
            args = decode(as_view)
        except Exception as exc:
            log.error("dropped a message on %r from %s: malformed shared-memory message:"
                      " %s: %s", frame.channel, frame.sender_id, type(exc).__name__, exc)
            for view in views:
                view.release()
            self._release(pending)
            return None
        finally:
            base.release()
        lease = Lease(views, functools.partial(self._release, pending))
        biggest = max(views, key=len) if views else b""
        return ShmFrame(frame, args, lease, functools.partial(decode, as_bytes), biggest)

    def answer(self, frame: P.Frame) -> P.Frame:
        """The frame announced by the last SHM_SLOTS, an answer (the reader's
        ``_handle_frames``; ``shm_requests.py``): decoded at once with ``bytes`` copied out
        of its slots (a requester gets bytes, as from an inline answer), which are released
        now. An answer that cannot be decoded settles its request with an error."""
        pending, self.pending = self.pending, None
        assert pending is not None
        mapping = self.maps.get(pending[0])
        args: Any = None  # (settle_answer: "undecodable answer")
        try:
            if mapping is None or frame.kind != _RESPONSE:
                log.error("dropped the shared memory of an answer on %r: not mapped here",
                          frame.channel)
            else:
                args = msgpack.unpackb(bytes(frame.body), raw=False, strict_map_key=False,
                                       use_list=True, ext_hook=_hooks(mapping, pending[1])[1])
        except Exception as exc:
            log.error("malformed shared-memory answer on %r from %s: %s: %s", frame.channel,
                      frame.sender_id, type(exc).__name__, exc)
        finally:
            self._release(pending)
        return P.DecodedFrame(frame.kind, frame.channel, frame.sender, frame.target,
                              frame.rid, bytes(frame.raw), args)

    def _release(self, pending: tuple[int, list[Any]]) -> None:
        """Tell the hub we are done with the slots (in the name of any client of ours)."""
        offsets = [s[0] for s in pending[1] if type(s) is list and s]
        member = next((c._member for c in self.conn.client_list
                       if not c._member.left), None)
        if member is None or not offsets:
            return
        try:
            self.conn.writer.write_now(P.encode_frame(
                Kind.SHM_RELEASE, sender=member.info, rid=pending[0],
                body=P.pack_payload(offsets)), member)
        except (OSError, IpcBusConnectionError) as exc:
            log.debug("could not release shared-memory slots: %s", exc)

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """The connection has ended: our arena and every mapping go."""
        with self.lock:
            self.ended = True
            self.freed.notify_all()
            maps, self.maps = self.maps, {}
            if self.view is not None:
                self.view.release()
                self.view = None
            if self.mapping is not None:
                self.mapping.close()
                self.mapping = None
        for mapping in maps.values():
            _unmap(mapping)

    # -- receiving: a group's member ----------------------------------------------------------
    def _grouped(self, frame: P.Frame, pending: tuple[int, list[Any]]) -> P.Frame | None:
        """A GROUPED frame announced by SHM_SLOTS (this process has the group's chosen
        member): the frame it carries is resolved as a plain message is (its placeholders
        name the slots) and handed on as a :class:`ShmGrouped`; a malformed one is dropped
        and its slots given back."""
        try:
            group, inner = grouped_frames(frame)
            if len(inner) != 1:
                raise IpcBusProtocolError("a GROUPED frame with slots carries one frame")
        except IpcBusProtocolError as exc:
            log.error("dropped a grouped frame on %r: %s", frame.channel, exc)
            self._release(pending)
            return None
        one = self._shm_frame(inner[0], pending)
        return ShmGrouped(frame, group, one) if one.__class__ is ShmFrame else None


def _hooks(mapping: mmap.mmap, slots: list[Any]
           ) -> tuple[Callable[[bytes], tuple[int, int]], Callable[[int, bytes], Any]]:
    """For a body whose placeholders name ``slots`` of ``mapping``: the slot of a
    placeholder (checked), and msgpack's ext hook that gives ``bytes`` copied out of them
    (an array: always the receiver's own)."""
    def slot(data: bytes) -> tuple[int, int]:
        offset, length = slots[ext_index(data)]
        if offset < 0 or length < 0 or offset + length > len(mapping):
            raise ValueError("a slot outside the arena")
        return offset, length

    def as_bytes(code: int, data: bytes) -> Any:
        if code == ARRAY_SLOT_EXT:
            fields = msgpack.unpackb(data)
            offset, length = slot(ext_data(fields[2]))
            view = memoryview(mapping)[offset:offset + length]
            try:
                return decode_array(fields[0], fields[1], view)
            finally:
                view.release()
        if code != EXT_CODE:
            return ext_hook(code, data)
        offset, length = slot(data)
        return mapping[offset:offset + length]

    return slot, as_bytes


def _unmap(mapping: mmap.mmap) -> None:
    """Close a receiver's mapping; one a retained view still uses stays mapped until that
    view goes (the garbage collector unmaps it then)."""
    try:
        mapping.close()
    except BufferError:
        log.debug("a retained shared-memory view outlives its arena's mapping")


def _split_run(frame: P.Frame) -> list[P.Frame]:
    """The frames of a run (merged by the decoder), each on its own."""
    raw, out, offset = frame.raw, [], 0
    while offset < len(raw):
        hlen, blen, rid = P.PREFIX.unpack_from(raw, offset)
        end = offset + P.PREFIX_SIZE + hlen + blen
        out.append(P.Frame(frame.kind, frame.channel, frame.sender, frame.target, rid, 0,
                           bytes(raw[offset:end]), P.PREFIX_SIZE + hlen))
        offset = end
    return out
