"""The ipcbus wire protocol: frames, headers, payloads and the handshake.

Pure code: bytes in, frames out. Nothing here touches a socket, a thread or a clock, so every
rule can be tested by feeding bytes to a :class:`FrameDecoder`.

Frame layout (integers big-endian)::

    offset  size  field
    0       2     H: header length (uint16, 1 .. MAX_HEADER)
    2       4     B: body length (uint32, 0 .. the connection's max message size)
    6       8     rid (uint64, 0 .. 2**63-1)
    14      H     header: msgpack array [kind, channel, sender, target, nfds]
    14+H    B     body: msgpack, opaque to the broker (it forwards the frame's bytes as they came)

Header fields:

    kind     int, one of :class:`Kind`
    channel  str, UTF-8, at most MAX_CHANNEL bytes ("" for control frames)
    sender   [id, name, type, pid] of the sending peer, or None for frames made by a router
    target   peer id (str) for peer-to-peer frames and answers, else None
    nfds     number of file descriptors that travel with this frame (0 .. MAX_FDS)

The rid (in the prefix) is the request id for REQUEST / RESPONSE / REQUEST_FAIL / CANCEL /
PEER_ADD, the reference count for SUBSCRIBE / UNSUBSCRIBE, else 0. It is kept out of the
header so that the header of every frame a peer sends on one channel repeats byte for byte,
requests and answers included: decoders cache decoded headers by their bytes, and senders
their encoded headers.

Descriptors travel as SCM_RIGHTS ancillary data on the same stream. A writer attaches a frame's
descriptors to a ``sendmsg`` whose data starts at or before the frame's first byte, so a reader
that queues every descriptor it receives, in order, can pop ``nfds`` of them for each frame it
decodes: descriptors never arrive after their frame.

Handshake: the first frame a client sends is HELLO with body ``{"magic": MAGIC, "version":
VERSION, "pid": int}``; the server answers WELCOME with ``{"version": VERSION, "pid": int,
"fds": bool, "max_message": int, "max_fds": int}`` or NOTICE with ``{"error": reason}`` and closes. A server
speaking a newer version answers with the highest version both sides know.

A frame with descriptors (nfds > 0) has the body ``[args, kinds]``: ``kinds`` says what each
descriptor was on the sender's side ("fd", "socket", "connection:r", "connection:w",
"connection:rw"), so the receiver gets the same kind of object back.

Payloads are msgpack with ``use_bin_type=True``: ``None``, ``bool``, ``int`` (-2**63 ..
2**64-1), ``float``, ``str``, ``bytes``, ``list``, ``dict``. Tuples come back as lists,
``bytearray`` and ``memoryview`` come back as ``bytes``; dict keys must be hashable after the
round trip (str, bytes, int, float, bool, None).
"""
from __future__ import annotations

import enum
import logging
import struct
import sys
from typing import Any, Iterator, List, Union

import msgpack

from ._bigbytes import new_bytes as _new_bytes
from .errors import IpcBusProtocolError

log = logging.getLogger("ipcbus")

MAGIC = "ipcbus"
VERSION = 2  # 2: the rid moved from the header to the prefix

PREFIX = struct.Struct("!HIQ")  # header length, body length, rid
PREFIX_SIZE = PREFIX.size
MAX_HEADER = 8192
MAX_CHANNEL = 1024
MAX_FDS = 253  # the kernel's SCM_MAX_FD
DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024
DEFAULT_MAX_FDS = 64
MAX_CONTROL_BODY = 64 * 1024
# Peers: an id is at most MAX_PEER_ID bytes of UTF-8 without control characters (so it can
# never collide with a router's pseudo-ids, which start with NUL), a name at most
# MAX_PEER_NAME bytes. With a channel of MAX_CHANNEL bytes, every header a hub builds for a
# peer (a forwarded SUBSCRIBE, an answer) stays far under MAX_HEADER.
MAX_PEER_ID = 128
MAX_PEER_NAME = 4096
PEER_TYPES = frozenset({"main", "pipe", "socket", "node"})  # node: a Node peer via a gateway
# Subscriptions are reference counts: one SUBSCRIBE adds at most MAX_SUBSCRIBE_STEP, and a
# peer's count on one channel stays under MAX_SUBSCRIBE_COUNT (so the bus's state always
# encodes); a peer listens to at most MAX_CHANNELS_PER_PEER channels.
MAX_SUBSCRIBE_STEP = 1 << 16
MAX_SUBSCRIBE_COUNT = (1 << 31) - 1
MAX_CHANNELS_PER_PEER = 1 << 16
# A connection that is not a bridge's link carries at most this many peers (clients of one
# process).
MAX_PEERS_PER_CONNECTION = 4096


class Kind(enum.IntEnum):
    """Frame kinds. Values are part of the wire format: never renumber."""

    HELLO = 1  # client -> server, first frame
    WELCOME = 2  # server -> client, answer to HELLO
    PEER_ADD = 3  # sender joins through this connection; answered by RESPONSE(rid)
    PEER_REMOVE = 4  # sender leaves
    SUBSCRIBE = 5  # sender listens to channel; rid = count to add
    UNSUBSCRIBE = 6  # rid = count to remove, 0 = all
    SEND = 7  # broadcast to channel
    SEND_TO = 8  # to target's listeners of channel
    REQUEST = 9  # to every listener of channel (or target's only); answered by RESPONSE
    RESPONSE = 10  # to target, answers rid; body [resolved: bool, payload]
    REQUEST_FAIL = 11  # a router's failure of request rid of target; body reason (str)
    CANCEL = 12  # the requester gave up on rid
    NOTICE = 13  # router -> peer: body {"error": str} or {"closing": reason}
    SERVICE_ADD = 14  # sender hosts the service named by channel; answered like a request (rid)
    SERVICE_REMOVE = 15  # sender no longer hosts the service named by channel
    SPY_ADD = 16  # sender wants copies of the traffic on channels matching the glob in channel
    SPY_COPY = 17  # router -> spy (target): body = the bytes of a routed frame (or run), as is
    SPY_REMOVE = 18  # sender stops spying


KINDS = frozenset(int(k) for k in Kind)
_SEND, _SEND_TO = int(Kind.SEND), int(Kind.SEND_TO)  # plain ints for the decoder's hot loop
# the kinds a spy or a traffic log sees: messages between peers, not the bus's own bookkeeping
MESSAGE_KINDS = frozenset(int(k) for k in (Kind.SEND, Kind.SEND_TO, Kind.REQUEST, Kind.RESPONSE,
                                          Kind.REQUEST_FAIL))

# Special channels answered by the broker and the bridge themselves.
QUERY_STATE_CHANNEL = "/ipcbus/queryState"
SERVICE_AVAILABLE_CHANNEL = "/ipcbus/serviceAvailable"

# Services: calls are requests on the call channel; the service's events, and its "start" and
# "stop" notices, are broadcasts on the event channel whose first argument is the notice kind.
# When a service's host leaves the bus without stopping it, the router itself broadcasts
# ["stop", reason] there (with no sender), so proxies learn it at once.
SERVICE_CALL_PREFIX = "/ipcbus/service/call/"
SERVICE_EVENT_PREFIX = "/ipcbus/service/event/"
# Channels under RESERVED_PREFIX belong to the hub and the library's own protocols: anyone may
# send on direct channels and service call channels, only a service's host on its event
# channel, and requests on the two special channels are answered by the hub. The client API
# refuses the rest at the call; a hub refuses them on the wire.
RESERVED_PREFIX = "/ipcbus/"
DIRECT_PREFIX = "/ipcbus/direct/"


def service_call_channel(name: str) -> str:
    return SERVICE_CALL_PREFIX + name


def service_event_channel(name: str) -> str:
    return SERVICE_EVENT_PREFIX + name


def check_peer_id(peer_id: object) -> str | None:
    """Why ``peer_id`` is not a valid peer id, or None if it is."""
    if type(peer_id) is not str or not peer_id:
        return "a peer id must be a non-empty str"
    if any(ord(c) < 32 or ord(c) == 127 for c in peer_id):
        return f"peer id {peer_id!r} contains control characters"
    if len(peer_id.encode("utf-8", "surrogatepass")) > MAX_PEER_ID:
        return f"peer id longer than {MAX_PEER_ID} bytes"
    return None


def check_peer_name(name: object) -> str | None:
    """Why ``name`` is not a valid peer name, or None if it is."""
    if type(name) is not str:
        return "a peer name must be a str"
    if len(name) * 4 > MAX_PEER_NAME and \
            len(name.encode("utf-8", "surrogatepass")) > MAX_PEER_NAME:
        return f"peer name longer than {MAX_PEER_NAME} bytes of UTF-8"
    return None

PeerTuple = List[Any]  # [id, name, type, pid] as it travels


def check_channel(channel: object) -> str:
    """Validate a channel name given by a user; raise TypeError/ValueError at the call."""
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, not {type(channel).__name__}")
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"channel is not encodable as UTF-8: {exc}") from None
    if not 1 <= size <= MAX_CHANNEL:
        raise ValueError(f"channel must be 1 to {MAX_CHANNEL} bytes of UTF-8, got {size}")
    return channel


def pack_payload(value: Any) -> bytes:
    """Encode user data; TypeError/ValueError (nothing sent) if it is not serializable."""
    try:
        return msgpack.packb(value, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise TypeError(f"cannot send this value on the bus: {exc}") from None
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"cannot send this value on the bus: {exc}") from None


BIG_BYTES = 64 * 1024  # a top-level bytes argument this large is sent without a copy
# One Packer for the common case: msgpack.packb builds a new one per call (0.59 against
# 0.12 µs a message). Sharing it between threads is safe only while packing cannot run Python
# code (which could switch threads in the middle of a pack): arguments that are all exact
# instances of these types. A build without a GIL gets no sharing at all.
_PACKER = msgpack.Packer(use_bin_type=True, datetime=False)
_FLAT = frozenset({int, float, str, bytes, bytearray, bool, type(None)})
_SHARE_PACKER = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
Body = Union[bytes, List[Union[bytes, bytearray]]]  # a body, or buffers to write in a row


def pack_args(items: tuple[Any, ...] | list[Any]) -> Body:
    """Encode a message's arguments (a msgpack array), like :func:`pack_payload`.

    A ``bytes``/``bytearray`` argument of BIG_BYTES or more is not copied into the body:
    the result is then a list of buffers (encoded parts, each large argument's bin32 header,
    the argument itself) whose concatenation is exactly the msgpack encoding, for a vectored
    write. The receiver decodes it as any body."""
    flat = _SHARE_PACKER
    for item in items:  # inline: this runs for every message sent
        cls = item.__class__
        if cls not in _FLAT:
            flat = False
        elif (cls is bytes or cls is bytearray) and len(item) >= BIG_BYTES:
            break
    else:
        if flat and (items.__class__ is tuple or items.__class__ is list):
            try:
                return _PACKER.pack(items)  # type: ignore[no-any-return]
            except (OverflowError, ValueError) as exc:  # an int over 64 bits, a lone surrogate
                raise ValueError(f"cannot send this value on the bus: {exc}") from None
        return pack_payload(items)
    n = len(items)
    head = bytes([0x90 | n]) if n < 16 else \
        (b"\xdc" + n.to_bytes(2, "big") if n < 2**16 else b"\xdd" + n.to_bytes(4, "big"))
    parts: list[bytes | bytearray] = []
    small = [head]
    for item in items:
        if _is_big(item):
            if len(item) >= 2**32:
                raise ValueError("cannot send this value on the bus: bytes longer than 4 GiB")
            small.append(b"\xc6" + len(item).to_bytes(4, "big"))
            parts.append(b"".join(small))
            parts.append(item)
            small = []
        else:
            small.append(pack_payload(item))
    if small:
        parts.append(b"".join(small))
    return parts


def _is_big(item: Any) -> bool:
    return (item.__class__ is bytes or item.__class__ is bytearray) and len(item) >= BIG_BYTES


def body_size(body: Body) -> int:
    return len(body) if isinstance(body, bytes) else sum(len(b) for b in body)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if type(key) is list else key


def _map_with_tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_hashable(k): v for k, v in pairs}


def unpack_payload(data: bytes | bytearray | memoryview) -> Any:
    """Decode a body; IpcBusProtocolError if the bytes are not one msgpack value.

    A dict whose keys were tuples comes back with tuple keys (decoded on a slower path, taken
    only when the fast one meets such a key)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except TypeError:  # an array used as a map key: unhashable as a list
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                                   object_pairs_hook=_map_with_tuple_keys)
        except Exception as exc:
            raise IpcBusProtocolError(
                f"malformed message body: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise IpcBusProtocolError(f"malformed message body: {type(exc).__name__}: {exc}") from None


def unpack_control(data: bytes | bytearray | memoryview) -> Any:
    """Decode a small control body (handshake, notices) with tight limits."""
    if len(data) > MAX_CONTROL_BODY:
        raise IpcBusProtocolError(f"control body of {len(data)} bytes is too large")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_CONTROL_BODY, max_bin_len=MAX_CONTROL_BODY,
            max_array_len=4096, max_map_len=4096,
        )
    except Exception as exc:
        raise IpcBusProtocolError(f"malformed control body: {type(exc).__name__}: {exc}") from None


def encode_header(kind: int, channel: str, sender: PeerTuple | None, target: str | None,
                  nfds: int = 0) -> bytes:
    """The msgpack header of a frame."""
    header: bytes = msgpack.packb([kind, channel, sender, target, nfds], use_bin_type=True)
    if len(header) > MAX_HEADER:
        raise ValueError(f"frame header of {len(header)} bytes exceeds {MAX_HEADER}"
                         " (is the peer name too long?)")
    return header


def encode_frame(kind: int, channel: str = "", sender: PeerTuple | None = None,
                 target: str | None = None, rid: int = 0, body: bytes = b"",
                 nfds: int = 0) -> bytes:
    """A whole frame as one bytes object."""
    header = encode_header(kind, channel, sender, target, nfds)
    return PREFIX.pack(len(header), len(body), rid) + header + body


class Frame:
    """One decoded frame. ``raw`` holds its exact bytes, so a router can forward it unchanged."""

    __slots__ = ("kind", "channel", "sender", "target", "rid", "nfds", "raw", "body_offset", "fds",
                 "count")

    def __init__(self, kind: int, channel: str, sender: PeerTuple | None, target: str | None,
                 rid: int, nfds: int, raw: bytes | bytearray, body_offset: int) -> None:
        self.kind = kind
        self.channel = channel
        self.sender = sender
        self.target = target
        self.rid = rid
        self.nfds = nfds
        self.raw = raw
        self.body_offset = body_offset
        self.fds: list[int] = []
        self.count = 1  # > 1: ``raw`` holds a run of frames with this same header

    @property
    def body(self) -> memoryview:
        """The body (of the first frame, for a run: see :meth:`bodies`)."""
        if self.count == 1:
            return memoryview(self.raw)[self.body_offset:]
        blen = PREFIX.unpack_from(self.raw, 0)[1]
        return memoryview(self.raw)[self.body_offset:self.body_offset + blen]

    def bodies(self) -> list[memoryview]:
        """Every body of a run, in order (one for a single frame)."""
        view = memoryview(self.raw)
        if self.count == 1:
            return [view[self.body_offset:]]
        out = []
        offset, size = 0, len(view)
        unpack = PREFIX.unpack_from
        while offset < size:
            hlen, blen, _ = unpack(view, offset)
            start = offset + PREFIX_SIZE + hlen
            out.append(view[start:start + blen])
            offset = start + blen
        return out

    @property
    def sender_id(self) -> str | None:
        return self.sender[0] if self.sender is not None else None

    def __repr__(self) -> str:
        return (f"Frame({Kind(self.kind).name}, channel={self.channel!r}, sender={self.sender_id!r},"
                f" target={self.target!r}, rid={self.rid}, nfds={self.nfds},"
                f" body={len(self.raw) - self.body_offset}B)")


class DecodedFrame(Frame):
    """A message whose arguments were decoded as it arrived (``args``): a large bytes argument
    received straight into its own bytes object (see FrameDecoder ``direct_bytes``). ``raw``
    is that bytes object, so ``len(raw)`` still measures the frame; its body is not kept."""

    __slots__ = ("args",)

    def __init__(self, kind: int, channel: str, sender: PeerTuple | None, target: str | None,
                 rid: int, payload: bytes, args: list[Any]) -> None:
        super().__init__(kind, channel, sender, target, rid, 0, payload, len(payload))
        self.args = args


_SCAN = 4096  # arguments before a large bytes argument are decoded early if within this


def _find_big_bytes(body: memoryview) -> tuple[list[Any], int, int, int] | bool:
    """In the first bytes of a message body (a msgpack array): the arguments before its first
    bin32 of BIG_BYTES or more, the array's length, and where that bin's data starts and how
    long it is. True if more bytes are needed to tell; False if there is none within the
    first _SCAN bytes, or anything is unusual."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True)
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
    """A message being received with its large bytes argument straight into ``payload``."""

    __slots__ = ("frame", "leading", "count", "payload", "view", "fill", "tail", "tail_fill")

    def __init__(self, frame: tuple[int, str, Any, Any, int], leading: list[Any], count: int,
                 payload: bytes, view: memoryview, fill: int, tail: int) -> None:
        self.frame = frame  # kind, channel, sender, target, rid
        self.leading = leading
        self.count = count
        self.payload = payload
        self.view = view
        self.fill = fill
        self.tail = bytearray(tail)  # the body's bytes after the payload (later arguments)
        self.tail_fill = 0


def _bad(reason: str) -> IpcBusProtocolError:
    return IpcBusProtocolError(f"malformed frame header: {reason}")


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, str, Any, Any, int]:
    """Decode and validate a header: (kind, channel, sender, target, nfds);
    IpcBusProtocolError on anything unexpected."""
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                                 max_str_len=MAX_HEADER, max_bin_len=0, max_array_len=16,
                                 max_map_len=0)
    except Exception as exc:
        raise _bad(f"{type(exc).__name__}: {exc}") from None
    if type(fields) is not list or len(fields) < 5:
        raise _bad("not an array of at least 5 fields")
    kind, channel, sender, target, nfds = fields[:5]
    if type(kind) is not int or kind not in KINDS:
        raise _bad(f"unknown kind {kind!r}")
    if type(channel) is not str:
        raise _bad("channel is not a str")
    # UTF-8 takes at most 4 bytes a character: only long names need encoding to be measured.
    if len(channel) * 4 > MAX_CHANNEL and len(channel.encode("utf-8")) > MAX_CHANNEL:
        raise _bad(f"channel longer than {MAX_CHANNEL} bytes")
    if sender is not None:
        if (type(sender) is not list or len(sender) != 4 or type(sender[0]) is not str
                or not sender[0] or type(sender[1]) is not str or type(sender[2]) is not str
                or type(sender[3]) is not int):
            raise _bad("sender is not [id, name, type, pid]")
    if target is not None and type(target) is not str:
        raise _bad("target is not a str")
    if type(nfds) is not int or not 0 <= nfds <= MAX_FDS:
        raise _bad(f"nfds is not an int in 0..{MAX_FDS}")
    return kind, channel, sender, target, nfds


class FrameDecoder:
    """Turns a byte stream into frames, enforcing the size limits before allocating.

    Use :meth:`get_buffer` / :meth:`buffer_updated` to read straight into the decoder's memory
    (a frame larger than the chunk gets a buffer of its own and is handed over without a copy),
    or :meth:`feed` with bytes. Decoded frames are taken with :meth:`frames` or iteration.
    After an :class:`IpcBusProtocolError` the stream is unusable: close the connection.

    The reusable read buffer is sized lazily: it starts at ``initial`` bytes (16 KiB), so an
    idle connection costs little, and grows fourfold, up to ``chunk`` (256 KiB), whenever a
    read fills it to its end (a burst: two such reads reach the full size) or a frame does
    not fit in it. :meth:`trim`, called now and then by a hub, shrinks it back when every read
    since the previous call was small (at most half the initial size): an idle or trickling
    connection gives the memory back, a busy one keeps its buffer.
    """

    CHUNK = 256 * 1024  # the largest reusable buffer; a frame larger than this gets its own
    INITIAL = 16 * 1024  # the buffer of a new or idle connection

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, chunk: int = CHUNK,
                 merge_runs: bool = False, initial: int = INITIAL) -> None:
        self.max_message = max_message
        # Merge consecutive SEND / SEND_TO frames with identical header bytes (one sender,
        # one channel, no descriptors) into one Frame whose ``raw`` spans them all, with
        # ``count`` > 1: a router forwards the run at once, a client decodes it in a loop.
        self.merge_runs = merge_runs
        self._chunk = chunk
        self._initial = min(initial, chunk)
        self._size = self._initial  # len(self._buf)
        self._buf = bytearray(self._size)
        self._peak = 0  # the largest read since the last trim()
        self._start = 0  # first unconsumed byte in _buf
        self._end = 0  # end of valid data in _buf
        self._big: bytearray | None = None  # dedicated buffer of a frame larger than the chunk
        self._spare: bytearray | None = None  # a large frame's buffer, given back for reuse
        self._big_fill = 0
        self._big_body_offset = 0
        # A client's decoder receives the large bytes argument of a message straight into
        # the bytes object it delivers (one copy less: 16 MiB messages cost the subscriber
        # about 2 ms less each).
        self.direct_bytes = False
        self._direct: _Direct | None = None
        self._ready: list[Frame] = []
        # Header bytes -> validated fields: a sender's frames on one channel repeat their
        # header exactly, so most frames skip msgpack decoding and validation.
        self._headers: dict[bytes, tuple[int, str, Any, Any, int]] = {}

    # -- feeding ---------------------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """A writable view to receive the next bytes into (never empty)."""
        if self._big is not None:
            return memoryview(self._big)[self._big_fill:]
        direct = self._direct
        if direct is not None:
            if direct.fill < len(direct.payload):
                return direct.view[direct.fill:]
            return memoryview(direct.tail)[direct.tail_fill:]
        avail = self._end - self._start
        if avail >= PREFIX_SIZE:
            hlen, blen, rid = PREFIX.unpack_from(self._buf, self._start)
            self._check_prefix(hlen, blen, rid)
            total = PREFIX_SIZE + hlen + blen
            if total > self._size:
                started: bool | None = False
                if total > self._chunk and self.direct_bytes and _new_bytes is not None:
                    started = self._begin_direct(hlen, blen, rid)
                    if started:
                        return self.get_buffer()
                if total > self._chunk and started is not None:
                    # Give this frame its own buffer, so a large body is received in place.
                    big = self._take_spare(total)
                    big[:avail] = self._buf[self._start:self._end]
                    self._start = self._end = 0
                    self._big, self._big_fill = big, avail
                    self._big_body_offset = PREFIX_SIZE + hlen
                    return memoryview(big)[avail:]
                size = self._size
                while size < total:
                    size *= 4
                self._resize(min(size, self._chunk))
        if self._start and (self._size - self._end) < PREFIX_SIZE + 4096:
            self._buf[:avail] = self._buf[self._start:self._end]
            self._start, self._end = 0, avail
        return memoryview(self._buf)[self._end:]

    def _begin_direct(self, hlen: int, blen: int, rid: int) -> bool | None:
        """Start receiving a large message's big bytes argument into its own bytes object, if
        it is a message (no descriptors) whose body begins with such an argument after a few
        small ones. None: more bytes are needed to tell (and there is room to read them)."""
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

    def _direct_updated(self, direct: _Direct, nbytes: int) -> None:
        if direct.fill < len(direct.payload):
            direct.fill += nbytes
        else:
            direct.tail_fill += nbytes
        if direct.fill < len(direct.payload) or direct.tail_fill < len(direct.tail):
            return
        self._direct = None
        direct.view.release()
        args = direct.leading
        args.append(direct.payload)
        kind, channel, sender, target, rid = direct.frame
        if len(args) < direct.count or direct.tail:
            try:
                unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True,
                                            max_buffer_size=max(len(direct.tail), 1))
                unpacker.feed(direct.tail)
                for _ in range(direct.count - len(args)):
                    args.append(unpacker.unpack())
                if unpacker.tell() != len(direct.tail):
                    raise ValueError("bytes left after the last argument")
            except Exception as exc:  # as the ordinary path does with a malformed body
                log.error("dropped a message on %r from %s: malformed message body: %s: %s",
                          channel, sender[0] if sender else None, type(exc).__name__, exc)
                return
        self._ready.append(DecodedFrame(kind, channel, sender, target, rid, direct.payload,
                                        args))

    def recycle(self, frame: Frame) -> None:
        """Take back the buffer of a large frame that has been dispatched (``frame.raw`` is
        emptied): the next large frame is received into it. Allocating and freeing tens of
        MiB a frame, from two threads, made glibc return the memory to the kernel and fault
        it back in at every frame (W4 16 MiB: -40%)."""
        raw = frame.raw
        if raw.__class__ is bytearray and len(raw) > self._chunk:
            frame.raw = b""
            self._spare = raw

    def drop_spare(self) -> None:
        """Let the kept large buffer go (the connection is idle): safe from any thread."""
        self._spare = None

    def _take_spare(self, total: int) -> bytearray:
        spare, self._spare = self._spare, None
        # Reused only if nothing else refers to it (no view, no frame): our name and the
        # argument of getrefcount are its only references.
        if spare is not None and total <= len(spare) <= 2 * total \
                and sys.getrefcount(spare) == 2:
            del spare[total:]  # shrinks in place
            return spare
        return bytearray(total)

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last :meth:`get_buffer` view and decode."""
        if self._direct is not None:
            self._direct_updated(self._direct, nbytes)
            return
        if self._big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                big, self._big = self._big, None
                self._finish(big, 0, len(big))
            return
        self._end += nbytes
        if nbytes > self._peak:
            self._peak = nbytes
        full = self._end == self._size
        self._parse()
        if full and self._size < self._chunk:  # more was probably waiting: read more at once
            self._resize(min(self._size * 4, self._chunk))

    def _resize(self, size: int) -> None:
        """A new reusable buffer of ``size`` bytes, holding the bytes not decoded yet."""
        avail = self._end - self._start
        buf = bytearray(size)
        buf[:avail] = self._buf[self._start:self._end]
        self._buf, self._size = buf, size
        self._start, self._end = 0, avail

    def trim(self) -> None:
        """Shrink the buffer back to its initial size if every read since the last call was
        at most half that size and what it holds fits (a hub calls this once a second)."""
        if self._size > self._initial and self._peak <= self._initial // 2 \
                and self._end - self._start <= self._initial // 2:
            self._resize(self._initial)
        self._peak = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read elsewhere."""
        view = memoryview(data).cast("B")
        while len(view):
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    @property
    def buffer_size(self) -> int:
        """The size of the reusable read buffer now (for tests and figures)."""
        return self._size

    # -- decoding --------------------------------------------------------------------------
    def _check_prefix(self, hlen: int, blen: int, rid: int) -> None:
        if rid >= 2**63:
            raise IpcBusProtocolError(f"frame rid {rid} is over 2**63-1")
        if not 1 <= hlen <= MAX_HEADER:
            raise IpcBusProtocolError(f"frame header length {hlen} is outside 1..{MAX_HEADER}")
        if blen > self.max_message:
            raise IpcBusProtocolError(
                f"frame announces a body of {blen} bytes, over the limit of {self.max_message}")

    def _parse(self) -> None:
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
                if len(cache) >= 512:
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

    def _finish(self, raw: bytes | bytearray, offset: int, total: int) -> None:
        hlen, blen, rid = PREFIX.unpack_from(raw, offset)
        kind, channel, sender, target, nfds = decode_header(
            memoryview(raw)[offset + PREFIX_SIZE:offset + PREFIX_SIZE + hlen])
        self._ready.append(Frame(kind, channel, sender, target, rid, nfds, raw,
                                 PREFIX_SIZE + hlen))

    def frames(self) -> list[Frame]:
        """Take the frames decoded so far."""
        ready, self._ready = self._ready, []
        return ready

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames())

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not form a whole frame yet."""
        if self._big is not None:
            return self._big_fill
        if self._direct is not None:
            return 1 + self._direct.fill + self._direct.tail_fill  # never 0 in the middle
        return self._end - self._start


def hello_body(pid: int) -> bytes:
    return pack_payload({"magic": MAGIC, "version": VERSION, "pid": pid})


def check_hello(frame: Frame) -> dict[str, Any]:
    """Validate a client's HELLO frame; return its body."""
    if frame.kind != Kind.HELLO:
        raise IpcBusProtocolError(f"expected HELLO as the first frame, got kind {frame.kind}")
    body = unpack_control(frame.body)
    if type(body) is not dict or body.get("magic") != MAGIC:
        raise IpcBusProtocolError("HELLO without the ipcbus magic: not an ipcbus client")
    version = body.get("version")
    if type(version) is not int or version < 1:
        raise IpcBusProtocolError(f"HELLO with an invalid version {version!r}")
    return body


def welcome_frame(pid: int, fds: bool, max_message: int, version: int = VERSION,
                  max_fds: int = DEFAULT_MAX_FDS) -> bytes:
    body = pack_payload({"version": min(version, VERSION), "pid": pid, "fds": fds,
                         "max_message": max_message, "max_fds": max_fds})
    return encode_frame(Kind.WELCOME, body=body)


def check_welcome(frame: Frame) -> dict[str, Any]:
    """Validate the server's answer to HELLO; raise IpcBusProtocolError or return the body."""
    if frame.kind == Kind.NOTICE:
        body = unpack_control(frame.body)
        reason = body.get("error") if isinstance(body, dict) else None
        raise IpcBusProtocolError(f"the server refused the connection: {reason}")
    if frame.kind != Kind.WELCOME:
        raise IpcBusProtocolError(f"expected WELCOME, got kind {frame.kind}")
    body = unpack_control(frame.body)
    if (type(body) is not dict or type(body.get("version")) is not int
            or type(body.get("max_message")) is not int):
        raise IpcBusProtocolError("malformed WELCOME")
    return body


def notice_frame(target: str | None, **fields: Any) -> bytes:
    return encode_frame(Kind.NOTICE, target=target, body=pack_payload(fields))

