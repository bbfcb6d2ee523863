"""The ipcbus wire protocol: frames, headers, payloads and the handshake.

Pure code: nothing here touches a socket, a thread, a clock or C memory. This module says how
bytes look on the wire: the limits, the frame kinds (:class:`Kind`, their one source), how a
header and a payload are encoded and validated, the :class:`Frame` a decoder gives, and the
handshake's bodies. Cutting frames out of a byte stream is :class:`ipcbus._decoder.FrameDecoder`'s
job; every rule here can be tested by feeding it bytes.

Frame layout (integers big-endian)::

    offset  size  field
    0       2     H: header length (uint16, 1 .. MAX_HEADER)
    2       4     B: body length (uint32, 0 .. the connection's max message size)
    6       8     rid (uint64, 0 .. 2**63-1)
    14      H     header: msgpack array [kind, channel, sender, target, nfds(, timeout)]
    14+H    B     body: msgpack, opaque to the broker (it forwards the frame's bytes as they came)

Header fields:

    kind     int, one of :class:`Kind`
    channel  str, UTF-8, at most MAX_CHANNEL bytes ("" for control frames)
    sender   [id, name, type, pid] of the sending peer, or None for frames made by a router
    target   peer id (str) for peer-to-peer frames and answers, else None
    nfds     number of file descriptors that travel with this frame (0 .. MAX_FDS)
    timeout  optional, REQUEST and REQUEST_ALL only: the requester's timeout in seconds
             (int or float >= 0) as it sent the request, to two significant digits
             (:func:`wire_timeout`: a timeout computed per call, such as a service call's
             time left, still repeats, so headers stay cached); absent when it waits
             without one.
             Routers ignore it (they forward the frame's bytes); a receiver shows it as
             ``event.request.timeout`` (:func:`request_timeout`). Decoders read the first
             five fields only, so older peers ignore it too.

Groups (0.2): SUBSCRIBE / UNSUBSCRIBE with a non-empty body subscribe to the channel as a
member of a group: body = msgpack str, the group name (checked like a channel: 1 to
MAX_GROUP bytes of UTF-8, no control characters). A member is counted apart from the
peer's plain subscription of the channel (its rid counts references the same way). An empty
body is a plain subscription, as in 0.1. The router delivers a message on a channel with
groups to its plain subscribers as it came, and once per group to the chosen member, wrapped
in GROUPED (see :class:`Kind`).

The rid (in the prefix) is the request id for REQUEST / REQUEST_ALL / RESPONSE / REQUEST_FAIL /
CANCEL / PEER_ADD, the reference count for SUBSCRIBE / UNSUBSCRIBE, else 0. It is kept out of the
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
import struct
import sys
from typing import Any, List, Union

import msgpack

from . import _arrays
from .errors import IpcBusProtocolError

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
MAX_GROUP = 256  # a group name: bytes of UTF-8, no control characters
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
    CANCEL = 12  # the requester gave up on rid; router -> receivers: the requester gave up
    NOTICE = 13  # router -> peer: body {"error": str} or {"closing": reason}
    SERVICE_ADD = 14  # sender hosts the service named by channel; answered like a request (rid)
    SERVICE_REMOVE = 15  # sender no longer hosts the service named by channel
    SPY_ADD = 16  # sender wants copies of the traffic on channels matching the glob in channel
    SPY_COPY = 17  # router -> spy (target): body = the bytes of a routed frame (or run), as is
    SPY_REMOVE = 18  # sender stops spying
    # 0.2: gathering. Like REQUEST, but the router forwards every receiver's RESPONSE to the
    # requester (each receiver answers once) and ends the gathering with one REQUEST_FAIL(rid)
    # when no receiver is left (all answered, failed or left). Through a link, UPSTREAM stands
    # for all the broker's receivers: its answers pass, and only the broker's REQUEST_FAIL
    # (its own gathering ended) drops it.
    REQUEST_ALL = 19
    # 0.2: groups. router -> peer (target = the member chosen): a SEND / REQUEST /
    # REQUEST_ALL delivered to ``target`` as the chosen member of a group of its channel
    # (through a link: broker -> bridge, which hands it on to ``target`` as it came).
    # channel = the message's channel, sender None, body = msgpack [group (str), the bytes of
    # the routed frame (or run) as they came]. Only the target's listeners of that group run
    # for it. A peer never sends one (a protocol error for its connection).
    GROUPED = 20
    # 0.2: large payloads through shared memory (``_hub_shm.py``, ``_client/shm.py``).
    # SHM_ARENA: peer -> hub, one sealed memfd (nfds 1), body {"size": n}: its arena, once;
    # hub -> peer: rid = the arena's id, with the memfd (nfds 1): map it; without: it is gone.
    # SHM_MESSAGE: peer -> hub, body [[[offset, length], ...], the bytes of a SEND, SEND_TO,
    # REQUEST, REQUEST_ALL or RESPONSE frame, its body with placeholders (EXT_CODE)].
    # SHM_SLOTS: hub -> peer, rid = arena id, body [[offset, length], ...]: the slots of the
    # next frame. SHM_RELEASE: peer -> hub, rid = arena id, body [offset, ...]: done with
    # them. SHM_FREE: hub -> the arena's peer, body [offset, ...]: free again.
    SHM_ARENA = 25
    SHM_MESSAGE = 26
    SHM_SLOTS = 27
    SHM_RELEASE = 28
    SHM_FREE = 29


KINDS = frozenset(int(k) for k in Kind)
# the only kinds that may carry descriptors (messages; a hub refuses them on any other frame)
FD_KINDS = frozenset({int(Kind.SEND), int(Kind.SEND_TO), int(Kind.SHM_ARENA)})
# the kinds a spy or a traffic log sees: messages between peers, not the bus's own bookkeeping
MESSAGE_KINDS = frozenset(int(k) for k in (Kind.SEND, Kind.SEND_TO, Kind.REQUEST, Kind.RESPONSE,
                                          Kind.REQUEST_FAIL, Kind.REQUEST_ALL))

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


def group_problem(group: object) -> str | None:
    """Why ``group`` is not a valid group name (None if it is)."""
    if not isinstance(group, str):
        return f"a group name must be a str, not {type(group).__name__}"
    try:
        size = len(group.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"the group name is not encodable as UTF-8: {exc}"
    if not 1 <= size <= MAX_GROUP:
        return f"a group name must be 1 to {MAX_GROUP} bytes of UTF-8, got {size}"
    if any(ord(c) < 32 or ord(c) == 127 for c in group):
        return f"the group name {group!r} contains control characters"
    return None


def check_group(group: object) -> str:
    """Validate a group name given by a user; raise TypeError/ValueError at the call."""
    problem = group_problem(group)
    if problem is not None:
        raise (TypeError if not isinstance(group, str) else ValueError)(problem)
    assert isinstance(group, str)
    return group


def pack_payload(value: Any) -> bytes:
    """Encode user data; TypeError/ValueError (nothing sent) if it is not serializable."""
    try:
        return msgpack.packb(value, use_bin_type=True, datetime=False,  # type: ignore[no-any-return]
                             default=_arrays.encode_default)  # numpy arrays: _arrays.py
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


def pack_small(items: tuple[Any, ...]) -> bytes | None:
    """:func:`pack_args`'s common case alone, in one pass: exact scalars, str and buffers
    under BIG_BYTES, packed by the shared Packer; None for anything else (a client's ``send``
    then takes its full path: ``client._send_message``)."""
    for item in items:  # inline: this runs for every message sent
        cls = item.__class__
        if cls not in _FLAT or ((cls is bytes or cls is bytearray) and len(item) >= BIG_BYTES):
            return None
    if not _SHARE_PACKER:
        return None
    try:
        return _PACKER.pack(items)  # type: ignore[no-any-return]
    except (OverflowError, ValueError) as exc:  # an int over 64 bits, a lone surrogate
        raise ValueError(f"cannot send this value on the bus: {exc}") from None


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
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                               ext_hook=_arrays.ext_hook)
    except TypeError:  # an array used as a map key: unhashable as a list
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                                   object_pairs_hook=_map_with_tuple_keys,
                                   ext_hook=_arrays.ext_hook)
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


def wire_timeout(timeout: float) -> float:
    """A request's timeout as its header carries it: two significant digits (4.9873 -> 5.0),
    so that the few values a program uses repeat and its headers are encoded once."""
    return float(f"{timeout:.2g}")


def encode_header(kind: int, channel: str, sender: PeerTuple | None, target: str | None,
                  nfds: int = 0, timeout: float | None = None) -> bytes:
    """The msgpack header of a frame (``timeout``: a request's, as the sixth field)."""
    fields: list[Any] = [kind, channel, sender, target, nfds]
    if timeout is not None:
        fields.append(timeout)
    header: bytes = msgpack.packb(fields, use_bin_type=True)
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
    received straight into its own bytes object (see ``_decoder``, mode 3). ``raw``
    is that bytes object, so ``len(raw)`` still measures the frame; its body is not kept."""

    __slots__ = ("args",)

    def __init__(self, kind: int, channel: str, sender: PeerTuple | None, target: str | None,
                 rid: int, payload: bytes, args: list[Any]) -> None:
        super().__init__(kind, channel, sender, target, rid, 0, payload, len(payload))
        self.args = args


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



_TIMEOUTS: dict[bytes, float | None] = {}  # header bytes -> the timeout they carry


def request_timeout(raw: bytes | bytearray) -> float | None:
    """The requester's timeout a REQUEST/REQUEST_ALL frame's header carries (seconds), or
    None (none, or not a valid one). Headers repeat byte for byte, so this is a lookup."""
    hlen = PREFIX.unpack_from(raw, 0)[0]
    key = bytes(raw[PREFIX_SIZE:PREFIX_SIZE + hlen])
    try:
        return _TIMEOUTS[key]
    except KeyError:
        pass
    timeout: float | None = None
    try:
        fields = msgpack.unpackb(key, raw=False, use_list=True, max_bin_len=0)
        value: Any = fields[5] if type(fields) is list and len(fields) > 5 else None
        if (type(value) is int or type(value) is float) and 0 <= value < 1e12:
            timeout = float(value)
    except Exception:  # a header the decoder accepted already: only the extra field matters
        pass
    if len(_TIMEOUTS) >= 256:
        _TIMEOUTS.clear()
    _TIMEOUTS[key] = timeout
    return timeout


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

